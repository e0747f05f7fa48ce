"""Class-conditional training end to end: labels from the dataset, classes.json, label dropout,
classifier-free guidance, one sample row per class, `difftool sample --class`, the dit model,
`difftool eval` cycling through the classes, and exact resume with label dropout on."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftool import conditioning, evaluation, sampling
from difftool import recipe as recipes
from difftool.engine import train
from difftool.testing import TINY_RECIPE

from test_training import assert_identical, read_state

# synthetic-butterflies' 16 images with labels = true have all six wing colours, sorted by name
COLOURS = ["black", "blue", "brown", "orange", "white", "yellow"]
SIZE = 16  # images of 16 px keep every run, sample and evaluation here quick
SMALL = [f"dataset.size={SIZE}", f"dataset.image_size={SIZE}"]
LABELLED = ["dataset.labels=true", 'dataset.label_column="label"', "dataset.label_dropout=0.2"]
ONE_STEP = SMALL + ["run.max_steps=1", "run.num_epochs=1"]
TINY_DIT = ['model={name = "dit", num_layers = 2, num_attention_heads = 2, attention_head_dim = 16, patch_size = 4}']


def write_recipe(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()))
    return path


def trained(folder: Path, settings: list[str]) -> Path:
    return train(recipes.load(write_recipe(folder), settings))


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def clean(code: int, out: str, err: str) -> str:
    """stderr of a refused command, after asserting it is one message and no crash."""
    assert code == 1, out + err
    assert "Traceback" not in out + err and "internal error" not in out + err, out + err
    assert err.count("error: ") == 1, err  # besides diffusers' loading progress bar, one message
    return " ".join(err[err.index("error: "):].split())


def grid_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size  # (width, height)


class Spy:
    """Wraps a function, keeping the keywords of every call."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.function(*args, **kwargs)


class Kept(logging.Handler):
    """Keeps the messages logged."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A class-conditional unet2d run (1 step, label_dropout 0.2), its epoch grid of 3 [sampling]
    classes x 2 images, and the keywords the engine sampled it with."""
    spy = Spy(sampling.generate)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("difftool.engine.generate", spy)
        run = trained(tmp_path_factory.mktemp("labelled"),
                      LABELLED + ONE_STEP + ['sampling.classes=["white", "blue", "orange"]', "sampling.num_images=6"])
    return run, spy.calls


# a class-conditional unet2d run and `difftool sample`

def test_a_class_conditional_unet_trains_and_saves_its_classes(labelled_run):
    run, calls = labelled_run
    assert json.loads((run / conditioning.NAMES_FILE).read_text()) == {"names": COLOURS}
    assert conditioning.read_names(run) == COLOURS
    config = json.loads((run / "unet" / "config.json").read_text())
    assert config["num_class_embeds"] == len(COLOURS) + 1  # the null class is the last row
    (call,) = calls
    assert call["labels"].tolist() == [4, 4, 1, 1, 3, 3]  # one row per [sampling] class, in its order
    assert call["null_label"] == len(COLOURS) and call["guidance_scale"] == conditioning.CLASS_GUIDANCE
    # 3 rows of 2: not the near-square 2 x 3 an unconditional grid of 6 would be
    assert grid_size(run / "samples" / "0000.png") == (2 * SIZE, 3 * SIZE)


def test_sample_draws_one_row_per_asked_class_with_guidance(labelled_run, cli, tmp_path, monkeypatch):
    run, _ = labelled_run
    spy = Spy(sampling.generate)
    monkeypatch.setattr("difftool.sampling.generate", spy)
    out = tmp_path / "grid.png"
    code, stdout, err = cli("sample", run, "--class", "blue", "--class", "orange", "--guidance-scale", "3",
                            "--num-images", "4", "--out", out)
    assert code == 0, err
    assert grid_size(out) == (2 * SIZE, 2 * SIZE) and "wrote" in stdout
    (call,) = spy.calls
    assert call["labels"].tolist() == [1, 1, 3, 3] and call["guidance_scale"] == 3.0 and call["null_label"] == 6
    # one image per class: 2 rows of 1 (an unconditional grid of 2 is one row)
    code, _, err = cli("sample", run, "--class", "blue", "--class", "orange", "--num-images", "2", "--out",
                       tmp_path / "two.png")
    assert code == 0, err
    assert grid_size(tmp_path / "two.png") == (SIZE, 2 * SIZE)
    assert spy.calls[-1]["guidance_scale"] == conditioning.CLASS_GUIDANCE  # trained with label dropout


def test_an_unknown_class_is_one_clear_message(labelled_run, cli, tmp_path):
    run, _ = labelled_run
    err = clean(*cli("sample", run, "--class", "orang", "--out", tmp_path / "x.png"))
    assert "--class: unknown class 'orang'" in err and "did you mean 'orange'?" in err
    assert "the run's classes are " + ", ".join(COLOURS) in err
    assert not (tmp_path / "x.png").exists()


def test_guidance_needs_a_run_trained_with_label_dropout(cli, tmp_path):
    run = trained(tmp_path, TINY_DIT + LABELLED[:2] + ONE_STEP + ["sampling.num_images=2"])
    err = clean(*cli("sample", run, "--guidance-scale", "3", "--out", tmp_path / "x.png"))
    assert "--guidance-scale 3.0 needs the unconditional (null class) case" in err
    assert "label_dropout = 0 drops none" in err and "leave --guidance-scale out" in err
    assert cli("sample", run, "--guidance-scale", "1", "--out", tmp_path / "one.png")[0] == 0  # no guidance: fine
    assert not (tmp_path / "x.png").exists()


def test_a_run_without_its_class_names_is_refused_clearly(labelled_run, cli, tmp_path):
    run = shutil.copytree(labelled_run[0], tmp_path / "run")
    (run / conditioning.NAMES_FILE).unlink()
    for command in (["sample", run, "--out", tmp_path / "x.png"], ["eval", run, "--num-samples", "2"]):
        err = clean(*cli(*command))
        assert "its model is class-conditional, and classes.json, the names of its classes, is missing" in err
        assert "the run's output is damaged" in err
    assert not (tmp_path / "x.png").exists()


def test_class_conditional_models_are_told_apart():
    from difftool.plugins import registry

    def built(name, num_classes, **config):
        return registry("models").get(name).build(config, "test", image_size=SIZE, num_classes=num_classes)

    unet = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    dit = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=4)
    assert conditioning.class_conditional(built("unet2d", 3, **unet))
    assert not conditioning.class_conditional(built("unet2d", None, **unet))
    assert conditioning.class_conditional(built("dit", 3, **dit))
    assert not conditioning.class_conditional(built("dit", None, **dit))  # one class, label 0


# dit

def test_a_class_conditional_dit_trains_and_samples_a_class(cli, tmp_path, monkeypatch):
    run = trained(tmp_path, TINY_DIT + LABELLED + ONE_STEP + ["sampling.num_images=2"])
    config = json.loads((run / "unet" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["num_embeds_ada_norm"] == len(COLOURS)
    assert conditioning.read_names(run) == COLOURS
    # 2 images asked, 6 classes: every class still gets a row of one
    assert grid_size(run / "samples" / "0000.png") == (SIZE, 6 * SIZE)
    spy = Spy(sampling.generate)
    monkeypatch.setattr("difftool.sampling.generate", spy)
    warnings = Kept()
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        code, _, err = cli("sample", run, "--class", "white", "--num-images", "3", "--out", tmp_path / "white.png")
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
    assert code == 0, err
    assert grid_size(tmp_path / "white.png") == (3 * SIZE, SIZE)
    assert spy.calls[0]["labels"].tolist() == [4, 4, 4] and spy.calls[0]["null_label"] == 6
    # difftool saves the DiT as DDPMPipeline's `unet`; loading it says nothing about that
    assert not [m for m in warnings.messages if "Expected types" in m], warnings.messages


def test_an_unconditional_dit_trains_and_samples_with_class_0(cli, tmp_path, monkeypatch):
    from diffusers import DiTTransformer2DModel

    run = trained(tmp_path, TINY_DIT + ONE_STEP + ["sampling.num_images=2"])
    assert not (run / conditioning.NAMES_FILE).exists()
    assert json.loads((run / "unet" / "config.json").read_text())["num_embeds_ada_norm"] == 1
    seen = []
    forward = DiTTransformer2DModel.forward

    def recording(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        seen.append(class_labels)
        return forward(self, hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(DiTTransformer2DModel, "forward", recording)
    code, _, err = cli("sample", run, "--steps", "2", "--num-images", "3", "--out", tmp_path / "grid.png")
    assert code == 0, err
    assert len(seen) == 2 and all(labels.tolist() == [0, 0, 0] for labels in seen)
    assert grid_size(tmp_path / "grid.png") == (3 * SIZE, SIZE)
    # class options on an unconditional run are refused, each with one clear message
    err = clean(*cli("sample", run, "--class", "blue", "--out", tmp_path / "x.png"))
    assert "--class" in err and "class-conditional" in err and "holds an unconditional model" in err
    err = clean(*cli("sample", run, "--guidance-scale", "3", "--out", tmp_path / "x.png"))
    assert "--guidance-scale" in err and "holds an unconditional model" in err
    assert not (tmp_path / "x.png").exists()


# evaluation

def test_eval_of_a_class_conditional_run_cycles_through_the_classes(labelled_run, cli, tmp_path, monkeypatch):
    run, _ = labelled_run
    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    spy = Spy(sampling.generate)
    monkeypatch.setattr("difftool.sampling.generate", spy)
    result = tmp_path / "result.json"
    code, stdout, err = cli("eval", run, "--metric", "swd", "--num-samples", "8", "--batch-size", "3", "--steps", "2",
                            "--json", result)
    assert code == 0, err
    assert [label for call in spy.calls for label in call["labels"].tolist()] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert all(call["guidance_scale"] == conditioning.CLASS_GUIDANCE and call["null_label"] == 6 for call in spy.calls)
    values = json.loads(result.read_text())["values"]
    assert "swd" in values and values["swd"] > 0
    assert "8 samples vs dataset 'synthetic-butterflies' (16 images)" in stdout


def test_generated_batches_give_sample_i_class_i_mod_the_classes(monkeypatch):
    calls = []

    def fake_generate(unet, scheduler, count, steps, seed, image_size, device, autocast=None, labels=None,
                      guidance_scale=1.0, null_label=None):
        calls.append((seed, labels.tolist(), guidance_scale, null_label))
        return [Image.new("RGB", (image_size, image_size))] * count

    monkeypatch.setattr("difftool.sampling.generate", fake_generate)
    generation = evaluation.Generation(num_samples=7, batch_size=2, num_inference_steps=1, seed=10, image_size=8,
                                       guidance_scale=2.5, num_classes=3)
    batches = list(evaluation.generated_batches(object(), None, generation, "cpu"))
    assert [indices for _, _, indices in batches] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [c[1] for c in calls] == [[0, 1], [2, 0], [1, 2], [0]]
    assert all(c[2] == 2.5 and c[3] == 3 for c in calls) and [c[0] for c in calls] == [10, 12, 14, 16]
    assert batches[0][0].shape == (2, 3, 8, 8) and batches[0][0].dtype == torch.uint8
    # a second process's share keeps the labels of the samples' own indices
    calls.clear()
    list(evaluation.generated_batches(object(), None, generation, "cpu", process_index=1, num_processes=2))
    assert [c[1] for c in calls] == [[1, 2], [0, 1]]  # samples 4..7 (7: padding, dropped when gathered)


# label dropout and guidance, unit by unit

def test_label_dropout_replaces_about_that_fraction_with_the_null_class():
    labels = torch.arange(10_000) % 6
    torch.manual_seed(0)
    kept = conditioning.dropped(labels, 0.5, null=6)
    null = kept == 6
    assert 0.47 < null.float().mean().item() < 0.53
    assert torch.equal(kept[~null], labels[~null])  # the others are untouched
    torch.manual_seed(0)
    assert torch.equal(conditioning.dropped(labels, 0.5, null=6), kept)  # torch's global RNG: seeded, repeatable
    assert conditioning.dropped(labels, 0.0, null=6) is labels


class Output:
    def __init__(self, sample):
        self.sample = sample


class FakeModel:
    """A prediction that depends on sample, timestep and label, with its calls kept."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, class_labels):
        self.calls.append((sample.shape[0], class_labels.tolist()))
        return Output(sample * (class_labels + 1).view(-1, 1, 1, 1) + timestep.view(-1, 1, 1, 1) / 10)


def test_guidance_combines_the_conditional_and_null_predictions():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 3, 4, 4, generator=generator)
    timestep, labels = torch.tensor([5, 5, 5]), torch.tensor([0, 2, 1])
    model = FakeModel()
    guided = conditioning.guided(model, sample, timestep, labels, 3.0, null=4)
    assert model.calls == [(6, [0, 2, 1, 4, 4, 4])]  # one batch: conditional, then the null class
    conditional = FakeModel()(sample, timestep, labels).sample
    unconditional = FakeModel()(sample, timestep, torch.full_like(labels, 4)).sample
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))
    model = FakeModel()
    torch.testing.assert_close(conditioning.guided(model, sample, timestep, labels, 1.0, null=4), conditional)
    assert model.calls == [(3, [0, 2, 1])]  # scale 1: the conditional prediction alone, one call


def test_guidance_defaults():
    assert conditioning.guidance(None, text=True) == 7.5
    assert conditioning.guidance(None, text=False) == 4.0
    assert conditioning.guidance(None, text=False, null_trained=False) == 1.0
    assert conditioning.guidance(2.0, text=False, null_trained=False) == 2.0
    conditioning.check_guidance(None, 0.0, "[sampling]")
    conditioning.check_guidance(1.0, 0.0, "[sampling]")
    conditioning.check_guidance(3.0, 0.1, "[sampling]")


# recipe problems found by `difftool check`

@pytest.mark.parametrize("settings, expected", [
    (["dataset.label_dropout=0.2"],
     ["[dataset] label_dropout = 0.2 drops class labels, and the run has none", "set label_column"]),
    (['sampling.classes=["blue"]'],
     ["[sampling] classes = ['blue'] names classes of a class-conditional model, and this run is unconditional",
      "set [dataset] label_column, or remove classes"]),
    (["dataset.labels=true", 'dataset.label_column="species"'],
     ["label_column = 'species': the rows have no such column (they have ['image', 'label'])",
      "set label_column to one of them"]),
    (LABELLED[:2] + ["dataset.count=1"],
     ["class-conditional training needs at least 2 classes; label_column = 'label' has 1 (['brown'])"]),
    (LABELLED[:2] + ["dataset.label_dropout=1.0"], ["[dataset] label_dropout = 1.0 must be a fraction in [0, 1)"]),
    (LABELLED[:2] + ["sampling.guidance_scale=3"],
     ["[sampling] guidance_scale = 3 needs the unconditional (null class) case", "label_dropout = 0 drops none",
      "set [dataset] label_dropout (e.g. 0.1) for guidance, or guidance_scale = 1.0"]),
    (["sampling.guidance_scale=3"], ["guidance_scale = 3 guides a class-conditional or text-to-image model"]),
], ids=["dropout-without-labels", "classes-without-labels", "missing-column", "one-class", "dropout-1",
        "guidance-without-dropout", "guidance-unconditional"])
def test_check_refuses_class_settings_that_cannot_work(cli, tmp_path, settings, expected):
    err = clean(*cli("check", write_recipe(tmp_path), *sets(*settings)))
    assert all(part in err for part in expected), err


def test_check_accepts_a_class_conditional_recipe(cli, tmp_path):
    code, out, err = cli("check", write_recipe(tmp_path), *sets(*LABELLED, 'sampling.classes=["blue"]'))
    assert code == 0 and "is valid" in out, err


def test_check_refuses_an_unknown_sampling_class(cli, tmp_path):
    err = clean(*cli("check", write_recipe(tmp_path), *sets(*LABELLED, 'sampling.classes=["orang"]')))
    assert "unknown class 'orang'" in err and "did you mean 'orange'?" in err


# resume

def test_resume_with_label_dropout_is_bit_identical(tmp_path):
    # 12 images in batches of 4: 3 steps an epoch, so checkpoint 2 is mid-epoch; half the labels dropped.
    # A UNet without attention, and one image at the end, keep the 6 steps quick.
    settings = SMALL + LABELLED + ["dataset.label_dropout=0.5", "dataset.count=12", "dataset.batch_size=4",
                                   "run.max_steps=4", "run.checkpointing_steps=2", "run.save_image_epochs=100",
                                   "run.save_model_epochs=100", 'sampling.classes=["blue"]', "sampling.num_images=1",
                                   "model.block_out_channels=[16, 32]", 'model.down_block_types=["DownBlock2D", "DownBlock2D"]',
                                   'model.up_block_types=["UpBlock2D", "UpBlock2D"]']
    (tmp_path / "straight").mkdir()
    straight = trained(tmp_path / "straight", settings)
    (tmp_path / "halves").mkdir()
    halves = tmp_path / "halves" / "run"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", halves / "checkpoints" / "checkpoint-2")
    train(recipes.load(write_recipe(tmp_path / "halves"), settings + ['run.resume_from_checkpoint="latest"']))
    first, second = (read_state(folder / "checkpoints" / "checkpoint-4") for folder in (straight, halves))
    assert "model.safetensors" in first and "random_states_0.pkl" in first
    assert_identical(first, second)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert_identical(load_file(straight / weights), load_file(halves / weights), "unet")
    assert conditioning.read_names(halves) == conditioning.read_names(straight) == COLOURS
