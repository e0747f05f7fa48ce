"""Text-to-image: Stable Diffusion (and SDXL) fine-tuning, LoRA, latent caching, guidance, inpainting.

Every test works offline on tiny random pipelines that difftool.tiny_models builds from configs
and saves in diffusers layout, trained from recipes/sd-lora-tiny.toml.
"""

import json
import tomllib
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

import difftool
from difftool import recipe as recipes
from difftool.engine import train
from difftool.latent import LatentDiffusion
from difftool.latent_cache import vae_digest

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sd-lora-tiny.toml"
needs_lora = pytest.mark.skipif(find_spec("difftool_lora") is None, reason="needs the difftool-lora plugin")


def sd_recipe(tmp_path: Path, pretrained: Path, name: str = "run", source: Path = TINY_RECIPE, **sections) -> Path:
    """`source` (recipes/sd-lora-tiny.toml) pointed at `pretrained` and tmp_path, each given
    section's keys updated (None removes a key or section); returns the recipe file."""
    data = tomllib.loads(source.read_text())
    data["run"]["output_dir"] = str(tmp_path / name)
    data["model"]["pretrained"] = str(pretrained)
    data["dataset"]["latent_cache_dir"] = str(tmp_path / "latent-cache")
    for section, keys in sections.items():
        if keys is None:
            data.pop(section)
            continue
        table = data.setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class Watcher:
    """Records the model's weights at the start and end of training, and every step's loss."""

    def __init__(self):
        self.start, self.end, self.losses = {}, {}, []

    @staticmethod
    def weights(state):
        return {n: p.detach().clone() for n, p in state.accelerator.unwrap_model(state.model).named_parameters()}

    @difftool.hookimpl
    def on_train_start(self, state):
        self.start = self.weights(state)

    @difftool.hookimpl
    def on_step_end(self, state):
        self.losses.append(state.loss)

    @difftool.hookimpl
    def on_train_end(self, state):
        self.end = self.weights(state)


@needs_lora
def test_lora_training_changes_only_the_lora_weights(plugin, tiny_sd, tmp_path):
    watcher = plugin(Watcher(), "watcher")
    out = train(recipes.load(sd_recipe(tmp_path, tiny_sd)))
    assert len(watcher.losses) == 8 and all(np.isfinite(watcher.losses))
    changed = {n for n in watcher.start if not torch.equal(watcher.start[n], watcher.end[n])}
    lora = {n for n in watcher.start if "lora_" in n}
    assert lora and changed == lora  # every LoRA weight moved; the UNet, VAE and text encoder did not
    assert all(n.startswith("unet.") for n in lora)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "adapters.json").is_file()
    assert not (out / "unet").exists()  # an adapted run saves the adapter, not the base
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.png", "0001.png", "step-000004.png",
                                                                   "step-000008.png"]


@needs_lora
def test_lora_loads_into_diffusers_and_generates_with_guidance_like_the_fused_pipeline(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = train(recipes.load(sd_recipe(tmp_path, tiny_sd, run={"fuse_adapters": True}, optimizer={"lr": 1e-2})))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("unet.") for key in saved)

    def generate(pipeline):
        return pipeline("a blue butterfly", negative_prompt="a black butterfly", guidance_scale=7.5,
                        num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    base = generate(pipeline)
    pipeline.load_lora_weights(out)
    with_lora = generate(pipeline)
    fused = generate(StableDiffusionPipeline.from_pretrained(out, safety_checker=None))
    assert with_lora.shape == (1, 32, 32, 3) and np.isfinite(with_lora).all()
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the images
    assert np.abs(with_lora - fused).max() < 1e-4  # and the fused pipeline is the same model


def test_cached_latents_give_the_losses_of_encoding_every_epoch(plugin, monkeypatch, tiny_sd, tmp_path):
    encoded = []
    encode = LatentDiffusion.encode_images
    monkeypatch.setattr(LatentDiffusion, "encode_images", lambda self, pixels: encoded.append(len(pixels)) or encode(self, pixels))

    watcher = plugin(Watcher(), "watcher")

    def losses(name, cache=True, **dataset):
        watcher.losses, encoded[:] = [], []
        train(recipes.load(sd_recipe(tmp_path, tiny_sd, name, adapters=None, dataset={"cache": cache, **dataset})))
        return watcher.losses, sum(encoded)

    uncached, every_epoch = losses("uncached", cache=False)
    assert every_epoch == 2 * 16  # 16 images, 2 epochs
    filling, first = losses("filling")
    assert 16 <= first < every_epoch  # each image once per orientation that random_flip chose
    cached, none = losses("cached")
    assert none == 0  # the VAE never ran: every latent came from the cache
    assert np.allclose(cached, uncached, rtol=1e-5, atol=0) and np.allclose(filling, uncached, rtol=1e-5, atol=0)
    _, resized = losses("resized", image_size=24)
    assert resized == first  # another resolution is another key: nothing stale is reused
    assert len(list((tmp_path / "latent-cache" / "latents").iterdir())) == 1


def test_the_latent_cache_key_changes_with_the_vae_weights_and_dtype(tiny_sd):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    digest = vae_digest(vae)
    assert vae_digest(AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")) == digest
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-3
    assert vae_digest(vae) != digest
    assert vae_digest(vae.to(torch.float16)) not in (digest, vae_digest(vae.float()))


def captioned_folder(folder: Path, count: int = 8) -> Path:
    """`count` synthetic butterflies as PNGs with a metadata.jsonl of their captions."""
    from difftool.builtins.synthetic import synthetic_butterflies

    folder.mkdir()
    lines = []
    for i, row in enumerate(synthetic_butterflies(count, size=32, captions=True)):
        row["image"].save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "caption": row["text"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_full_fine_tuning_from_a_captioned_imagefolder_saves_a_pipeline_that_samples(plugin, cli, tiny_sd, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = plugin(PromptRecorder(), "prompts")
    data = captioned_folder(tmp_path / "captioned")
    dataset = {"name": "imagefolder", "path": str(data), "caption_column": "caption", "count": None, "size": None,
               "captions": None, "caption_dropout": 0.5, "batch_size": 4}
    recipe = sd_recipe(tmp_path, tiny_sd, adapters=None, dataset=dataset, noise_scheduler={"prediction_type": "v_prediction"})
    code, out, err = cli("run", recipe)
    assert code == 0, err
    run = tmp_path / "run"
    assert json.loads((run / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((run / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    captions = {row["caption"] for row in map(json.loads, (data / "metadata.jsonl").read_text().splitlines())}
    assert "" in prompts.seen and set(prompts.seen) - {""} <= captions  # caption dropout, at 50%
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.*")))).Reload()
    assert "samples" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]

    code, out, err = cli("sample", run, "--prompt", "a blue butterfly", "--negative-prompt", "a black butterfly",
                         "--guidance-scale", "5", "--steps", "2", "--scheduler", "dpm-solver++", "--num-images", "2")
    assert code == 0, err
    with Image.open(run / "samples" / "sample-dpm-solver++-2.png") as grid:
        assert grid.size == (64, 32)


class PromptRecorder:
    """Records the captions the model is conditioned on in training."""

    def __init__(self):
        self.seen = []

    @difftool.hookimpl
    def on_train_start(self, state):
        latent = state.accelerator.unwrap_model(state.model)
        encode = latent.encode_prompts
        latent.encode_prompts = lambda prompts, *sizes: self.seen.extend(prompts) or encode(prompts, *sizes)


@needs_lora
def test_inpainting_keeps_the_unmasked_pixels_and_repaints_the_masked_ones(cli, tiny_sd, tmp_path):
    from difftool.builtins.synthetic import synthetic_butterflies

    cli("run", sd_recipe(tmp_path, tiny_sd, run={"max_steps": 2}))
    image = synthetic_butterflies(1, size=32)[0]["image"]
    image.save(tmp_path / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, out, err = cli("sample", tmp_path / "run", "--prompt", "a blue butterfly", "--image", tmp_path / "image.png",
                         "--mask", tmp_path / "mask.png", "--steps", "2", "--num-images", "1", "--out", tmp_path / "painted.png")
    assert code == 0, err
    painted = np.asarray(Image.open(tmp_path / "painted.png").convert("RGB"), dtype=np.int16)
    original = np.asarray(image, dtype=np.int16)
    keep = mask == 0
    assert np.abs(painted[keep] - original[keep]).max() <= 1
    assert np.abs(painted[~keep] - original[~keep]).mean() > 10


@needs_lora
def test_sdxl_lora_trains_loads_into_diffusers_and_inpaints_with_a_refiner(cli, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    code, out, err = cli("run", sd_recipe(tmp_path, tiny_sdxl, model={"name": "stable-diffusion-xl"}, run={"max_steps": 2}))
    assert code == 0, err
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_lora_weights(tmp_path / "run")
    images = pipeline("a blue butterfly", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    Image.new("RGB", (32, 32), (200, 120, 30)).save(tmp_path / "image.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "mask.png")  # keep everything
    code, out, err = cli("sample", tmp_path / "run", "--image", tmp_path / "image.png", "--mask", tmp_path / "mask.png",
                         "--refiner", tmp_path, "--steps", "2", "--num-images", "1")
    assert code == 1 and "is not a diffusers pipeline folder" in err
    code, out, err = cli("sample", tmp_path / "run", "--image", tmp_path / "image.png", "--mask", tmp_path / "mask.png",
                         "--refiner", tiny_sdxl, "--denoising-end", "0.5", "--steps", "4", "--num-images", "1",
                         "--out", tmp_path / "painted.png")
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "painted.png").convert("RGB")).tolist() == np.asarray(
        Image.open(tmp_path / "image.png")).tolist()


def test_text_to_image_mistakes_are_clear_errors(cli, tiny_sd, tiny_recipe, tmp_path):
    code, _, err = cli("run", sd_recipe(tmp_path, tiny_sd, "uncaptioned", adapters=None, dataset={"captions": False}))
    assert code == 1 and "no 'text' column" in err and "metadata.jsonl" in err
    (tmp_path / "not-a-pipeline").mkdir()
    code, _, err = cli("check", sd_recipe(tmp_path, tmp_path / "not-a-pipeline", "folder"))
    assert code == 1 and "not a diffusers pipeline folder" in err
    code, _, err = cli("check", sd_recipe(tmp_path, tiny_sd, "odd-size", dataset={"image_size": 30}))
    assert code == 1 and "must be divisible by 4" in err

    assert cli("run", tiny_recipe("", tmp_path / "unconditional"))[0] == 0
    code, _, err = cli("sample", tmp_path / "unconditional", "--prompt", "a cat")
    assert code == 1 and "--prompt need a text-to-image run" in err
    assert cli("run", sd_recipe(tmp_path, tiny_sd, "t2i", adapters=None, run={"max_steps": 1}))[0] == 0
    code, _, err = cli("sample", tmp_path / "t2i", "--image", tmp_path / "missing.png")
    assert code == 1 and "needs both --image and --mask" in err
    code, _, err = cli("sample", tmp_path / "t2i", "--image", tmp_path / "missing.png", "--mask", tmp_path / "missing.png")
    assert code == 1 and "missing.png is not a readable image" in err
    code, _, err = cli("sample", tmp_path / "t2i", "--refiner", tiny_sd)
    assert code == 1 and "--refiner is for SDXL inpainting" in err
    code, _, err = cli("sample", tmp_path / "t2i", "--refiner", tiny_sd, "--image", tmp_path / "t2i" / "samples" / "0000.png",
                       "--mask", tmp_path / "t2i" / "samples" / "0000.png")
    assert code == 1 and "for Stable Diffusion XL runs" in err


def test_the_stable_diffusion_recipe_is_valid(cli, tiny_sd):
    recipe = TINY_RECIPE.parent / "sd-lora.toml"
    code, out, err = cli("check", recipe, "--set", f'model.pretrained="{tiny_sd.as_posix()}"')
    assert code == 0, err
    assert "stable-diffusion" in out and "lora" in out and "min-snr" in out


def test_an_inpainting_unet_is_refused_for_training(cli, tiny_sd, tmp_path):
    import shutil

    folder = tmp_path / "inpainting"
    shutil.copytree(tiny_sd, folder)
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(folder / "unet")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(folder / "unet")
    code, _, err = cli("check", sd_recipe(tmp_path, folder))
    assert code == 1 and "takes 9 input channels but the VAE gives 4" in err


def test_a_datasets_folder_with_its_own_image_and_caption_columns_trains(plugin, tiny_sd, tmp_path):
    import datasets

    from difftool.builtins.synthetic import synthetic_butterflies

    rows = synthetic_butterflies(8, size=32, captions=True)
    table = datasets.Dataset.from_dict({"picture": [r["image"] for r in rows], "prompt": [r["text"] for r in rows]})
    (tmp_path / "parquet").mkdir()
    table.cast_column("picture", datasets.Image()).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    prompts = plugin(PromptRecorder(), "prompts")
    dataset = {"name": "huggingface", "path": str(tmp_path / "parquet"), "image_column": "picture",
               "caption_column": "prompt", "count": None, "size": None, "captions": None, "caption_dropout": 0.0}
    train(recipes.load(sd_recipe(tmp_path, tiny_sd, adapters=None, dataset=dataset, run={"max_steps": 2})))
    assert len(prompts.seen) == 8 and set(prompts.seen) <= {r["text"] for r in rows}
