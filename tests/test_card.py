"""Model cards and `difftool push`: every finished run has a README.md in the Hub's format, written
with the model; push uploads a finished run in one commit, lists it with --dry-run, and fails with
one message where the Hub cannot be reached. Nothing here touches the network."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml

from difftool import card, hub
from difftool import recipe as recipes
from difftool.engine import train
from difftool.testing import TINY_RECIPE

SIZE = 16  # px: each run, its grid and its evaluation take a second or two
QUICK = [f"dataset.size={SIZE}", f"dataset.image_size={SIZE}", "run.max_steps=1", "run.num_epochs=1"]
LABELS = ["dataset.labels=true", 'dataset.label_column="label"', "dataset.label_dropout=0.2"]
EVALUATED = ["evaluation.every_n_steps=1", "evaluation.num_samples=8", 'evaluation.metrics=["swd"]']


def trained(folder: Path, settings: list[str], extra: str = "") -> Path:
    path = folder / "recipe.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()) + extra)
    return train(recipes.load(path, QUICK + settings))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished unconditional run, evaluated once (metrics.jsonl)."""
    return trained(tmp_path_factory.mktemp("finished"), EVALUATED)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A finished class-conditional run, trained with label dropout."""
    return trained(tmp_path_factory.mktemp("labelled"), LABELS)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, finished) -> Path:
    """A finished LoRA run on `finished` (its [model] pretrained)."""
    pytest.importorskip("difftool_lora", reason="pip install -e plugins/difftool-lora")
    folder = tmp_path_factory.mktemp("adapted")
    text = TINY_RECIPE.format(output_dir=(folder / "run").as_posix())
    text = re.sub(r"\[model\].*?\n\n", f'[model]\nname = "unet2d"\npretrained = "{finished.as_posix()}"\n\n', text,
                  flags=re.S)
    path = folder / "recipe.toml"
    path.write_text(text + '\n[[adapters]]\nname = "lora"\nr = 4\n')
    return train(recipes.load(path, QUICK))


def parsed(run: Path) -> tuple[dict, str]:
    """(the card's front matter, its body), after checking that the Hub's own parser agrees."""
    text = (run / card.CARD).read_text(encoding="utf-8")
    found = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert found, text[:200]
    meta = yaml.safe_load(found.group(1))
    assert huggingface_hub.ModelCard(text).data.to_dict() == meta
    return meta, found.group(2)


def python_code(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, body
    return blocks[0]


def copy(run: Path, tmp_path: Path, card_too: bool = True) -> Path:
    """A copy of a finished run to change; without its card, it is a run from before cards."""
    folder = Path(shutil.copytree(run, tmp_path / run.parent.name))
    if not card_too:
        (folder / card.CARD).unlink()
    return folder


# the card a run writes

def test_a_finished_run_has_a_model_card_in_the_hubs_format(finished):
    meta, body = parsed(finished)
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "difftool", "unconditional-image-generation"} <= set(meta["tags"])
    assert not {"base_model", "license", "datasets"} & set(meta)  # nothing unknown is guessed
    for expected in ("`unet2d`", "`synthetic-butterflies`", f"{SIZE} px", "1 optimizer step", "8 images",
                     "`adamw` (lr = 0.001)", "`cosine`", "fp32", "DDPM"):
        assert expected in body, expected
    grid = re.search(r"!\[[^]]*\]\((samples/\d{4}\.png)\)", body).group(1)
    assert (finished / grid).is_file()  # the grid saved right after the model, from the same weights
    last = json.loads((finished / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| swd | {last['values']['swd']:.4g} |" in body and f"at step {last['step']}" in body
    assert not list(finished.glob(".saving-*")) and not list(finished.glob(".README*"))


def test_the_cards_code_loads_the_model_with_diffusers(finished):
    _, body = parsed(finished)
    code = python_code(body)
    assert "DDPMPipeline.from_pretrained" in code
    scope = {}
    exec(code, scope)
    assert len(scope["images"]) == 4 and scope["images"][0].size == (SIZE, SIZE)


def test_a_class_conditional_runs_card_lists_its_classes_and_samples_them(labelled):
    meta, body = parsed(labelled)
    names = json.loads((labelled / "classes.json").read_text())["names"]
    assert "class-conditional" in meta["tags"] and "pipeline_tag" not in meta
    for label, name in enumerate(names):
        assert f"| {label} | {name} |" in body
    code = python_code(body)
    assert "class_labels" in code and "scale = 4" in code  # guidance: trained with label dropout
    scope = {}
    exec(code, scope)
    assert tuple(scope["images"].shape) == (4, 3, SIZE, SIZE)


def test_an_adapter_runs_card_names_its_base_model(adapted, finished):
    meta, body = parsed(adapted)
    assert "lora" in meta["tags"]
    assert "base_model" not in meta  # a local folder is no Hub id: the Hub refuses paths there
    assert f"from `{finished.as_posix()}` (a local folder)" in body and "`lora` (r = 4)" in body
    assert f"difftool sample {adapted.as_posix()}" in body  # diffusers alone cannot load it
    recipe = card.read_recipe(adapted)
    recipe["model"]["pretrained"] = "someone/tiny-base"  # the same run, on a base from the Hub
    meta = yaml.safe_load(card.build(recipe, card.read(adapted, recipe)).split("---")[1])
    assert meta["base_model"] == "someone/tiny-base"


def test_a_fine_tune_takes_its_bases_license_and_a_hub_dataset_is_named(finished):
    recipe = card.read_recipe(finished)
    recipe["model"] = {"name": "unet2d", "pretrained": "google/ddpm-cifar10-32"}
    recipe["dataset"].update(name="huggingface", path="huggan/smithsonian_butterflies_subset")
    recipe["objective"]["name"] = "flow-matching"
    contents = card.Contents(names=frozenset({"model_index.json"}), pipeline={"_class_name": "DDPMPipeline"},
                             base_card={"license": "apache-2.0"})
    meta = yaml.safe_load(card.build(recipe, contents).split("---")[1])
    assert meta["base_model"] == "google/ddpm-cifar10-32" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["huggan/smithsonian_butterflies_subset"] and "flow-matching" in meta["tags"]
    recipe["dataset"]["path"] = "data/butterflies"  # a local folder, as the run found it
    meta = yaml.safe_load(card.build(recipe, card.Contents(local=frozenset({"data/butterflies"}))).split("---")[1])
    assert "datasets" not in meta and "license" not in meta


def test_a_latent_loras_card_loads_it_onto_its_base_pipeline(finished):
    recipe = card.read_recipe(finished)
    recipe["model"] = {"name": "stable-diffusion", "pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    recipe["adapters"] = [{"name": "lora", "r": 4}]
    recipe["sampling"].update(prompts=["a blue butterfly"], guidance_scale=7.5)
    text = card.build(recipe, card.Contents(names=frozenset({"adapters.json", card.LORA_WEIGHTS})), "me/sd-lora")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["pipeline_tag"] == "text-to-image" and {"text-to-image", "lora"} <= set(meta["tags"])
    code = python_code(text)
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in code
    assert 'pipeline.load_lora_weights("me/sd-lora")' in code and '"a blue butterfly"' in code


def test_a_latent_runs_card_without_a_lora_file_says_how_to_use_its_adapters(finished):
    recipe = card.read_recipe(finished)
    recipe["model"] = {"name": "stable-diffusion", "pretrained": "models/sd"}
    recipe["adapters"] = [{"name": "loha", "r": 4}]  # peft's layout only: diffusers' loader reads LoRA alone
    text = card.build(recipe, card.Contents(names=frozenset({"adapters.json", "adapters"})), "me/sd-loha")
    assert "load_lora_weights(" not in text and "`loha`" in text and "difftool sample" in text
    assert "fuse_adapters = true" in text


def test_the_card_says_how_the_images_were_cut(finished):
    recipe = card.read_recipe(finished)
    recipe["dataset"].update(center_crop=True, random_flip=False)
    assert f"{SIZE} px (centre-cropped)" in card.build(recipe, card.Contents())
    recipe["dataset"].update(center_crop=False, random_crop=True, buckets=True, bucket_step=16)
    assert f"aspect-ratio buckets of about {SIZE}² px, sides in steps of 16 px (random crops)" in card.build(
        recipe, card.Contents())


def test_the_card_links_the_grid_saved_with_the_model():
    recipe = {"run": {"num_epochs": 30, "save_image_epochs": 10, "max_steps": 100}}
    assert card.epoch_grid(recipe, 9, 50) == "samples/0009.png"  # every save_image_epochs
    assert card.epoch_grid(recipe, 10, 55) is None  # no grid at this epoch: the newest earlier one
    assert card.epoch_grid(recipe, 12, 100) == "samples/0012.png"  # the last epoch, by max_steps
    assert card.epoch_grid(recipe, 29, 90) == "samples/0029.png"  # the last epoch, by num_epochs


def test_a_card_that_cannot_be_made_never_costs_the_model(finished, tmp_path, monkeypatch, capsys):
    shutil.copy(finished / "recipe.toml", tmp_path / "recipe.toml")
    state = SimpleNamespace(output_dir=finished, epoch=0, global_step=1, accelerator=SimpleNamespace(num_processes=1))
    monkeypatch.setattr(card, "build", lambda *args, **kwargs: 1 / 0)
    card.write(tmp_path, state)
    assert not (tmp_path / card.CARD).exists() and "model card could not be made" in capsys.readouterr().err


# difftool push

@pytest.fixture
def hub_calls(monkeypatch):
    """huggingface_hub's create_repo and upload_folder replaced by recorders (online, logged in)."""
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(**kwargs):
        uploaded = [p.path for p in hub.plan(kwargs["folder_path"], with_logs="logs/" not in kwargs["ignore_patterns"])]
        calls.append(("upload_folder", kwargs, uploaded))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/1")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def listed(out: str) -> list[str]:
    """The paths a dry run lists."""
    return [line.split()[-1] for line in out.splitlines() if re.match(r"^\s*[\d.]+ [kMG]?B\s", line)]


def test_a_dry_run_lists_the_files_and_leaves_out_checkpoints_and_logs(finished, tmp_path, cli, monkeypatch):
    run = copy(finished, tmp_path)
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"0" * 10)
    (run / ".recipe.abc.toml").write_text("a temporary file of an atomic write")
    monkeypatch.setattr(huggingface_hub, "create_repo", None)  # a dry run calls nothing of the Hub
    monkeypatch.setattr(huggingface_hub, "upload_folder", None)
    code, out, err = cli("push", run, "--repo-id", "me/tiny", "--dry-run")
    assert code == 0, err
    paths = listed(out)
    assert {"README.md", "model_index.json", "recipe.toml", "metrics.jsonl", "unet/config.json"} <= set(paths)
    assert "unet/diffusion_pytorch_model.safetensors" in paths and "samples/0000.png" in paths
    assert not [p for p in paths if p.startswith(("checkpoints/", "logs/", ".")) or "/." in p]
    size = (run / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert f"{size / 1e6:.1f} MB  unet/diffusion_pytorch_model.safetensors" in out
    assert f"{len(paths)} files" in out and "nothing was written or uploaded" in out
    code, out, err = cli("push", run, "--repo-id", "me/tiny", "--dry-run", "--with-logs")
    assert "logs/history.jsonl" in listed(out)


def test_a_run_from_before_cards_gets_one_before_it_is_pushed(finished, tmp_path, cli, hub_calls):
    run = copy(finished, tmp_path, card_too=False)
    code, out, err = cli("push", run, "--repo-id", "me/tiny", "--dry-run")
    assert code == 0, err
    assert "README.md would be written first" in out and "README.md" in listed(out)
    assert not (run / card.CARD).exists() and not hub_calls
    code, out, err = cli("push", run, "--repo-id", "me/tiny", "--private")
    assert code == 0, err
    meta, body = parsed(run)
    assert meta["library_name"] == "diffusers" and 'DDPMPipeline.from_pretrained("me/tiny")' in body
    assert "1 optimizer step" in body  # the steps, from logs/history.jsonl
    (_, repo_id, options), (_, upload, uploaded) = hub_calls
    assert repo_id == "me/tiny" and options["private"] is True and options["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == run
    assert "checkpoints/" in upload["ignore_patterns"] and "logs/" in upload["ignore_patterns"]
    assert "README.md" in uploaded and "pushed" in out and "commit/1" in out


def test_push_points_the_cards_code_at_the_repository(finished, tmp_path, cli, hub_calls):
    run = copy(finished, tmp_path)
    before = (run / card.CARD).read_text()
    code, out, err = cli("push", run, "--repo-id", "me/tiny", "--dry-run")
    assert code == 0 and "would load the model from me/tiny" in out and (run / card.CARD).read_text() == before
    code, out, err = cli("push", run, "--repo-id", "me/tiny")
    assert code == 0, err
    _, body = parsed(run)
    assert 'DDPMPipeline.from_pretrained("me/tiny")' in python_code(body)
    assert [call[0] for call in hub_calls] == ["create_repo", "upload_folder"]


def clean(code: int, out: str, err: str) -> str:
    """The one message of a refused command: exit 1, no traceback."""
    assert code == 1, out + err
    assert "Traceback" not in out + err and "internal error" not in err and err.count("error:") == 1, err
    return " ".join(err.split())


def test_push_offline_says_the_hub_cannot_be_reached(finished, tmp_path, cli, monkeypatch):
    run = copy(finished, tmp_path, card_too=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = clean(*cli("push", run, "--repo-id", "me/tiny"))
    assert "cannot reach the Hugging Face Hub" in message and "HF_HUB_OFFLINE" in message
    assert "Nothing was uploaded" in message and "single commit" in message
    assert not (run / card.CARD).exists()  # and nothing was written


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_push_without_a_network_is_one_message(finished, tmp_path, cli, hub_calls, monkeypatch, failing):
    import httpx2

    def unreachable(*args, **kwargs):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, failing, unreachable)
    message = clean(*cli("push", finished, "--repo-id", "me/tiny"))
    assert "cannot reach the Hugging Face Hub" in message and "Nothing was uploaded" in message
    assert ("may now exist, empty" in message) == (failing == "upload_folder")


def test_push_with_a_connection_error_from_python_is_one_message(finished, cli, hub_calls, monkeypatch):
    def refused(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "create_repo", refused)
    assert "cannot reach the Hugging Face Hub" in clean(*cli("push", finished, "--repo-id", "me/tiny"))


def test_push_without_a_token_says_how_to_log_in(finished, cli, hub_calls, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    message = clean(*cli("push", finished, "--repo-id", "me/tiny"))
    assert "not logged in" in message and "hf auth login" in message and not hub_calls


def test_a_rejected_token_says_how_to_log_in(finished, cli, hub_calls, monkeypatch):
    import httpx2

    def rejected(*args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise huggingface_hub.errors.HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(huggingface_hub, "create_repo", rejected)
    message = clean(*cli("push", finished, "--repo-id", "me/tiny"))
    assert "did not accept your token" in message and "hf auth login" in message


def test_push_refuses_a_run_being_written(finished, tmp_path, cli, hub_calls):
    from difftool import lock

    run = copy(finished, tmp_path)
    with lock.hold(run, "test"):
        message = clean(*cli("push", run, "--repo-id", "me/tiny"))
    assert "is being written by a difftool run" in message and not hub_calls


def test_push_refuses_what_is_not_a_finished_run(tmp_path, cli, finished):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a run")
    message = clean(*cli("push", tmp_path / "notes", "--repo-id", "me/tiny", "--dry-run"))
    assert "is not a difftool run" in message
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    assert "has not finished" in clean(*cli("push", unfinished, "--repo-id", "me/tiny"))
    assert "does not exist" in clean(*cli("push", tmp_path / "missing", "--repo-id", "me/tiny"))
    assert "not a Hub repository id" in clean(*cli("push", finished, "--repo-id", "not an id", "--dry-run"))
