"""Every built-in component resolves by name and works."""

import pytest
import torch

from difftool import build
from difftool import recipe as recipes
from difftool.errors import DifftoolError
from difftool.plugins import registry
from difftool.sampling import generate, sampling_scheduler

TINY_UNET = dict(
    sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return registry("models").get("unet2d").build(TINY_UNET, "test").eval()


def test_every_builtin_has_a_description():
    for kind in ("models", "schedulers", "datasets", "lr_schedules", "optimizers", "attention_processors"):
        entries = [entry for _, entry in registry(kind).visible() if entry.plugin == "difftool"]
        assert entries, kind
        assert all(entry.description for entry in entries)


def test_required_scheduler_names_are_there():
    names = {name for name, _ in registry("schedulers").visible()}
    assert {"ddpm", "ddim", "pndm", "dpm-solver++", "euler", "euler-ancestral", "heun", "lms", "unipc", "deis"} <= names


FLOW = ("flow-euler", "flow-heun")


@pytest.mark.parametrize("name", [name for name, _ in registry("schedulers").visible() if name not in FLOW])
def test_every_scheduler_samples_from_a_ddpm_trained_config(unet, name):
    training = registry("schedulers").get("ddpm").build({"beta_schedule": "scaled_linear", "beta_start": 0.001}, "test")
    scheduler = sampling_scheduler(registry("schedulers").get(name), dict(training.config), {}, "test")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_start == 0.001
    images = generate(unet, scheduler, num_images=2, num_inference_steps=4, seed=0, image_size=16, device="cpu")
    assert len(images) == 2 and images[0].size == (16, 16)


@pytest.mark.parametrize("name", FLOW)
def test_flow_schedulers_sample_from_a_flow_trained_config(unet, name):
    training = registry("schedulers").get("flow-euler").build({"shift": 3.0}, "test")
    scheduler = sampling_scheduler(registry("schedulers").get(name), dict(training.config), {}, "test")
    assert scheduler.config.shift == 3.0
    images = generate(unet, scheduler, num_images=2, num_inference_steps=4, seed=0, image_size=16, device="cpu")
    assert len(images) == 2 and images[0].size == (16, 16)


@pytest.mark.parametrize("name, kwargs", [
    ("constant", {}), ("constant-with-warmup", {"num_warmup_steps": 2}), ("linear", {"num_warmup_steps": 2}),
    ("cosine", {"num_warmup_steps": 2}), ("cosine-with-restarts", {"num_warmup_steps": 2, "num_cycles": 2}),
    ("polynomial", {"num_warmup_steps": 2, "power": 2.0}), ("warmup-cosine", {"warmup_steps": 2, "eta_min": 1e-6}),
])
def test_every_lr_schedule_builds_and_steps(name, kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = registry("lr_schedules").get(name).build(kwargs, "test", optimizer=optimizer, num_training_steps=10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert all(0 <= lr <= 0.1 + 1e-12 for lr in lrs)


def test_warmup_cosine_follows_the_article():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = registry("lr_schedules").get("warmup-cosine").build(
        {"warmup_steps": 4, "eta_min": 0.01}, "test", optimizer=optimizer, num_training_steps=14)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(14):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1)  # start_factor 0.1
    assert lrs[4] == pytest.approx(1.0)  # warm-up done
    assert lrs[14] == pytest.approx(0.01)  # annealed to eta_min
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizers_with_param_groups(tiny_recipe, name):
    recipe = recipes.load(tiny_recipe(), [
        f'optimizer.name="{name}"', "optimizer.lr=0.01",
        'optimizer.param_groups=[{modules="down_blocks.*", lr=1e-5}, {modules=["mid_block"], lr=2e-5}]',
    ])
    model = build.model(recipe)
    optimizer = build.optimizer(recipe, model)
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [1e-5, 2e-5, 0.01]
    counts = [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups]
    assert sum(counts) == sum(p.numel() for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("down_blocks.") for p in optimizer.param_groups[0]["params"])


def test_param_group_matching_nothing_is_an_error(tiny_recipe):
    recipe = recipes.load(tiny_recipe(), ['optimizer.param_groups=[{modules="encoder.*", lr=1e-5}]'])
    with pytest.raises(DifftoolError, match="matches no trainable parameter; names look like 'conv_in.weight'"):
        build.optimizer(recipe, build.model(recipe))


@pytest.mark.parametrize("name, kwargs", [("default", {}), ("sdpa", {}), ("vanilla", {}), ("sliced", {"slice_size": 1})])
def test_attention_processors_match_the_default(tiny_recipe, name, kwargs):
    extra = "".join(f"\n{k} = {v}" for k, v in kwargs.items())
    torch.manual_seed(0)
    reference = build.model(recipes.load(tiny_recipe()))
    torch.manual_seed(0)
    model = build.model(recipes.load(tiny_recipe(f'\n[attention]\nprocessor = "{name}"{extra}\n')))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(model(x, t).sample, reference(x, t).sample, atol=1e-5)


def test_attention_layers_pattern_picks_layers(tiny_recipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = build.model(recipes.load(tiny_recipe('\n[attention]\nprocessor = "vanilla"\nlayers = "mid_block.*"\n')))
    kinds = {name: type(m.processor) for name, m in build.attention_layers(model).items()}
    assert kinds.pop("mid_block.attentions.0.processor") is AttnProcessor
    assert kinds and set(kinds.values()) == {AttnProcessor2_0}
    with pytest.raises(DifftoolError, match="matches no attention layer; the model has: down_blocks.1.attentions.0.processor"):
        build.model(recipes.load(tiny_recipe('\n[attention]\nprocessor = "vanilla"\nlayers = "encoder.*"\n')))


def test_image_size_must_fit_the_unet(tiny_recipe):
    recipe = recipes.load(tiny_recipe(), ["dataset.image_size=33"])
    with pytest.raises(DifftoolError, match="image_size = 33 must be divisible by 2, the model's size multiple; use 32"):
        build.model(recipe)
    recipe = recipes.load(tiny_recipe(), ["model.sample_size=64"])
    with pytest.raises(DifftoolError, match="image_size = 32 but the model's sample_size is 64"):
        build.model(recipe)


def test_unet2d_loads_pretrained_from_a_model_or_run_folder(tmp_path, unet):
    unet.save_pretrained(tmp_path / "model")
    unet.save_pretrained(tmp_path / "run" / "unet")
    entry = registry("models").get("unet2d")
    for path in (tmp_path / "model", tmp_path / "run"):
        loaded = entry.build({"pretrained": str(path)}, "test")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
    with pytest.raises(DifftoolError, match="cannot be set beside it"):
        entry.build({"pretrained": str(tmp_path / "model"), "layers_per_block": 2}, "test")
    with pytest.raises(DifftoolError, match="is not a saved UNet"):
        entry.build({"pretrained": str(tmp_path)}, "test")


def test_unet2d_from_an_unreachable_hub_says_so():
    with pytest.raises(DifftoolError, match="could not load the model 'someone/some-model' from the Hugging Face Hub.*imagefolder"):
        registry("models").get("unet2d").build({"pretrained": "someone/some-model"}, "test")


def test_synthetic_butterflies_dataset(tiny_recipe):
    recipe = recipes.load(tiny_recipe())
    training, validation = build.datasets(recipe)
    assert validation is None and len(training) == 16
    batch = next(iter(build.dataloader(recipe, training)))["images"]
    assert batch.shape == (8, 3, 32, 32)
    assert -1.0 <= batch.min() < 0 < batch.max() <= 1.0


def test_imagefolder_reads_the_real_butterflies(tiny_recipe, butterflies):
    path = tiny_recipe()
    path.write_text(path.read_text().replace("count = 16\nsize = 32\n", ""))
    recipe = recipes.load(path, ['dataset.name="imagefolder"', f'dataset.path="{butterflies}"'])
    loader = build.dataloader(recipe, build.datasets(recipe)[0])
    assert len(loader.dataset) == 64
    assert next(iter(loader))["images"].shape == (8, 3, 32, 32)


def test_imagefolder_errors_name_the_problem(tmp_path):
    entry = registry("datasets").get("imagefolder")
    with pytest.raises(DifftoolError, match="no such folder"):
        entry.build({"path": str(tmp_path / "missing")}, "[dataset]")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DifftoolError, match="holds no image files"):
        entry.build({"path": str(tmp_path / "empty")}, "[dataset]")
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DifftoolError, match=r"broken.png is not a readable image.*remove or replace it"):
        entry.build({"path": str(folder)}, "[dataset]")


def test_huggingface_dataset_offline_points_at_local_options():
    with pytest.raises(DifftoolError) as info:
        registry("datasets").get("huggingface").build({"path": "huggan/smithsonian_butterflies_subset"}, "[dataset]")
    message = str(info.value)
    assert "could not load the dataset 'huggan/smithsonian_butterflies_subset' from the Hugging Face Hub" in message
    assert "imagefolder" in message and "recipes/quickstart.toml" in message
