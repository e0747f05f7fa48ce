"""The speed levers: mixed_precision = "auto", the uint8 image cache and JPEG draft decoding."""

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool import data, precision
from difftool import recipe as recipes
from difftool.engine import train
from difftool.plugins import registry


def test_auto_precision_follows_the_hardware(monkeypatch):
    assert [precision.resolve(p) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    on_this_cpu = precision.resolve("auto")
    assert on_this_cpu == ("bf16" if precision.cpu_bf16_is_faster() else "no")
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: True)
    assert precision.resolve("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve("auto") == "fp16"


def test_auto_precision_trains_and_runs_in_one_process_may_differ(tiny_recipe, tmp_path, capsys):
    train(recipes.load(tiny_recipe(), ['run.mixed_precision="auto"', "run.max_steps=1"]))
    assert "mixed_precision = 'auto':" in capsys.readouterr().err
    for wanted in ("bf16", "no"):
        train(recipes.load(tiny_recipe(output_dir=tmp_path / wanted), [f'run.mixed_precision="{wanted}"', "run.max_steps=1"]))


@pytest.mark.skipif(find_spec("difftool_lora") is None, reason="recipes/sd-lora-tiny.toml needs the difftool-lora plugin")
def test_fp16_on_a_cpu_keeps_a_text_to_image_models_frozen_parts_in_fp32(tmp_path):
    """The README says an fp16 run on a CPU trains in fp32: its frozen text encoder and VAE too."""
    from difftool.engine import make_accelerator, prepare
    from difftool.tiny_models import write_pipeline

    assert precision.effective("fp16", "cpu") == "no" and precision.effective("fp16", "cuda") == "fp16"
    assert precision.effective("bf16", "cpu") == "bf16"
    pipeline = write_pipeline(tmp_path / "tiny-sd")
    recipe = recipes.load(Path(__file__).parents[1] / "recipes" / "sd-lora-tiny.toml", [
        f'run.output_dir="{(tmp_path / "run").as_posix()}"', f'model.pretrained="{pipeline.as_posix()}"',
        'run.mixed_precision="fp16"', f'dataset.latent_cache_dir="{(tmp_path / "cache").as_posix()}"'])
    accelerator = make_accelerator(recipe["run"], tmp_path / "run")
    parts, _, _ = prepare(recipe, accelerator)
    assert parts.latent.text_encoder.dtype == torch.float32 and parts.latent.vae.dtype == torch.float32
    accelerator.end_training()


def photos(folder, count=6, size=(768, 512)):
    """`count` JPEG photos of random smooth colours, in `folder`."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        coarse = Image.fromarray((rng.random((4, 6, 3)) * 255).astype(np.uint8))
        coarse.resize(size, Image.BICUBIC).save(folder / f"{i}.jpg", quality=95)
    return folder


def test_each_image_is_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    rows = registry("datasets").get("imagefolder").build({"path": str(photos(tmp_path / "photos"))}, "test")
    calls = []
    real_decode = data.decode
    monkeypatch.setattr(data, "decode", lambda value, size, center_crop=False: calls.append(1) or real_decode(value, size, center_crop))
    cached = data.ImageDataset(rows, 32)
    first = [cached[i]["images"] for i in range(len(rows))]
    again = [cached[i]["images"] for i in range(len(rows))]
    assert len(calls) == len(rows)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    uncached = data.ImageDataset(rows, 32, cache=False)
    assert all(torch.equal(uncached[i]["images"], first[i]) for i in range(len(rows)))
    assert len(calls) == 2 * len(rows)
    assert first[0].dtype == torch.float32 and first[0].shape == (3, 32, 32)
    assert -1.0 <= first[0].min() and first[0].max() <= 1.0


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    path = photos(tmp_path / "photos", count=1) / "0.jpg"
    drafted = data.decode({"path": str(path), "bytes": None}, 64).float()
    with Image.open(path) as image:
        full = torch.from_numpy(np.array(image.convert("RGB").resize((64, 64), Image.BILINEAR))).permute(2, 0, 1).float()
    assert drafted.shape == (3, 64, 64)
    assert (drafted - full).abs().mean() < 2.0  # out of 255: the same picture


def test_loader_workers_share_one_cache(tmp_path):
    rows = [{"image": Image.new("RGB", (40, 40), (i * 40, 0, 0))} for i in range(6)]
    dataset = data.ImageDataset(rows, 16, shared=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = [batch["images"] for batch in loader]
    assert dataset.filled.all()  # filled by the workers, seen here
    assert torch.equal(torch.cat(batches), torch.stack([dataset[i]["images"] for i in range(6)]))


def test_training_with_and_without_the_cache_is_identical(tiny_recipe, tmp_path):
    weights = []
    for cache in ("true", "false"):
        output_dir = train(recipes.load(tiny_recipe(output_dir=tmp_path / cache), [f"dataset.cache={cache}", "run.max_steps=3"]))
        weights.append((output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert weights[0] == weights[1]


class StepLosses:
    """A plugin that keeps every optimizer step's loss and whether TF32 matmuls were on."""

    def __init__(self):
        self.losses, self.tf32 = [], []

    @__import__("difftool").hookimpl
    def on_step_end(self, state):
        self.losses.append(state.loss)
        self.tf32.append(precision.tf32_on())


def test_compile_trains_the_same_model_and_saves_a_plain_pipeline(tiny_recipe, tmp_path, plugin, monkeypatch):
    """run.compile compiles the training steps only: the losses match eager ones to compiler
    rounding, and the saved pipeline is the plain model (no torch.compile wrapper in its keys).
    Dynamo traces and guards the step as with the default backend, which then compiles the
    graph with inductor; that takes minutes on 2 cores, so here the graph runs as traced
    (backend "eager"), and benchmarks/compile.py measures inductor."""
    import functools

    from diffusers import UNet2DModel

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    losses = {}
    for compiled in (False, True):
        log = plugin(StepLosses(), f"losses-{compiled}")
        out = tmp_path / f"run-{compiled}"
        train(recipes.load(tiny_recipe(output_dir=out), [f"run.compile={str(compiled).lower()}", "run.max_steps=3"]))
        losses[compiled] = list(log.losses)
        saved = UNet2DModel.from_pretrained(out / "unet")
        assert not any("_orig_mod" in key for key in saved.state_dict())
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_allow_tf32_is_on_for_the_run_only_and_changes_nothing_on_a_cpu(tiny_recipe, tmp_path, plugin):
    before = precision.tf32_on()
    losses = {}
    for allowed in (False, True):
        log = plugin(StepLosses(), f"tf32-{allowed}")
        train(recipes.load(tiny_recipe(output_dir=tmp_path / str(allowed)),
                           [f"run.allow_tf32={str(allowed).lower()}", "run.max_steps=2"]))
        assert log.tf32[-2:] == [allowed, allowed]
        losses[allowed] = log.losses[-2:]
    assert precision.tf32_on() == before
    assert losses[True] == losses[False]  # CPUs have no TF32
