"""Stable Diffusion 3: flow-matching fine-tuning and LoRA of the transformer, and sampling.

Every test works offline on a tiny random SD3 pipeline (two CLIPs, no T5) that
difftool.tiny_models builds from configs and saves in diffusers layout, trained from
recipes/sd3-lora-tiny.toml.
"""

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool import recipe as recipes
from difftool.engine import train
from difftool.latent import LatentDiffusion, stable_diffusion_3
from difftool.runs import load_run
from difftool.tiny_models import TEXT_WIDTH, write_sd3
from test_text_to_image import sd_recipe

SD3_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sd3-lora-tiny.toml"
needs_lora = pytest.mark.skipif(find_spec("difftool_lora") is None, reason="needs the difftool-lora plugin")
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # how diffusers loads an SD3 pipeline saved without its T5


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return write_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def sd3_recipe(tmp_path: Path, pretrained: Path, name: str = "run", **sections) -> Path:
    """recipes/sd3-lora-tiny.toml pointed at `pretrained` and tmp_path (see test_text_to_image.sd_recipe)."""
    return sd_recipe(tmp_path, pretrained, name, SD3_RECIPE, **sections)


def generate(pipeline):
    return pipeline("a blue butterfly", negative_prompt="a black butterfly", guidance_scale=5.0,
                    num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def test_sd3_conditions_its_transformer_as_the_pipeline_does(tiny_sd3):
    latent = stable_diffusion_3(str(tiny_sd3))
    assert isinstance(latent, LatentDiffusion) and latent.sd3 and latent.component == "transformer"
    assert type(latent.unet).__name__ == "SD3Transformer2DModel" and latent.text_encoder_3 is None
    conditioning = latent.encode_prompts(["a blue butterfly", ""], 32)
    # 77 CLIP tokens (the two CLIPs side by side) then 256 T5 tokens (zeros: no T5), joint_attention_dim wide
    assert conditioning["encoder_hidden_states"].shape == (2, 77 + 256, 2 * TEXT_WIDTH)
    assert conditioning["pooled_projections"].shape == (2, 2 * TEXT_WIDTH)
    noisy, times = torch.randn(2, 16, 16, 16), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        ours = latent(noisy, times, **conditioning)[0]
        theirs = latent.unet(hidden_states=noisy, timestep=times, **conditioning).sample
    assert ours.shape == noisy.shape and torch.equal(ours, theirs)
    pipeline = latent.pipeline()
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline" and pipeline.transformer is latent.unet


def test_sd3_fine_tuning_by_flow_matching_saves_a_pipeline_diffusers_loads_and_samples(cli, tiny_sd3, tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    code, out, err = cli("run", sd3_recipe(tmp_path, tiny_sd3, adapters=None, run={"max_steps": 2}))
    assert code == 0, err
    run = tmp_path / "run"
    assert json.loads((run / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    scheduler = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    assert not (run / "unet").exists()

    def weights(model):
        return {name: value.clone() for name, value in model.state_dict().items()}

    base, tuned = (weights(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"))
                   for folder in (tiny_sd3, run))
    assert any(not torch.equal(base[name], tuned[name]) for name in base)  # the transformer trained
    vae_before, vae_after = (weights(AutoencoderKL.from_pretrained(folder, subfolder="vae")) for folder in (tiny_sd3, run))
    assert all(torch.equal(vae_before[name], vae_after[name]) for name in vae_before)  # the VAE did not

    images = generate(StableDiffusion3Pipeline.from_pretrained(run, **NO_T5))
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    code, out, err = cli("sample", run, "--prompt", "a blue butterfly", "--steps", "2", "--num-images", "2")
    assert code == 0, err
    with Image.open(run / "samples" / "sample-flow-euler-2.png") as grid:
        assert grid.size == (64, 32)


@needs_lora
def test_sd3_lora_loads_into_diffusers_as_difftool_samples_it(cli, tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = train(recipes.load(sd3_recipe(tmp_path, tiny_sd3, optimizer={"lr": 1e-2})))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.png", "0001.png", "step-000004.png",
                                                                   "step-000008.png"]
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("transformer.") and ".lora_" in key for key in saved)
    assert any(".add_q_proj." in key for key in saved)  # the text stream's projections too, as the recipe asks
    assert not (out / "transformer").exists()  # an adapted run saves the adapter, not the base

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **NO_T5)
    base = generate(pipeline)
    pipeline.load_lora_weights(out)
    with_lora = generate(pipeline)
    assert with_lora.shape == (1, 32, 32, 3) and np.isfinite(with_lora).all()
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the images
    transformer, scheduler, latent = load_run(out)  # difftool's own reload: the base with its adapter
    assert latent.sd3 and transformer is latent.unet
    assert np.abs(generate(latent.pipeline(transformer, scheduler)) - with_lora).max() < 1e-4

    code, _, err = cli("sample", out, "--prompt", "a blue butterfly", "--steps", "2", "--num-images", "1",
                       "--out", tmp_path / "one.png")
    assert code == 0, err
    with Image.open(tmp_path / "one.png") as image:
        assert image.size == (32, 32)


def test_sd3_recipe_mistakes_are_clear_errors(cli, tiny_sd3, tmp_path):
    # without [objective] the run is DDPM's, which cannot noise by SD3's flow-match scheduler
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "ddpm", objective=None))
    assert code == 1 and "scheduler 'FlowMatchEulerDiscreteScheduler' does not fit objective 'ddpm'" in err
    assert 'set [objective] name = "flow-matching"' in err
    # naming no scheduler either: the noise scheduler is a DDPM one, and the pipeline's own says otherwise
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "ddpm-only", objective=None, noise_scheduler={"name": None},
                                           sampling={"scheduler": None}))
    assert code == 1 and "[model] scheduler 'FlowMatchEulerDiscreteScheduler' does not fit objective 'ddpm'" in err
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "ddpm-sampler", sampling={"scheduler": "ddim"}))
    assert code == 1 and "scheduler 'DDIMScheduler' does not fit objective 'flow-matching'" in err
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "odd-size", dataset={"image_size": 30}))
    assert code == 1 and "must be divisible by 4 for this VAE and transformer" in err
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "too-big", dataset={"image_size": 128}))
    assert code == 1 and "position embeddings cover at most 16; use at most 64" in err
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "buckets-too-big", dataset={
        "image_size": 32, "buckets": True, "bucket_step": 8, "bucket_min": 8, "bucket_max": 96}))
    assert code == 1 and "bucket_max = 96 makes buckets with sides up to 96 px" in err
    assert "at most 64 px a side; set bucket_max to at most 64" in err
    code, _, err = cli("check", sd3_recipe(tmp_path, tiny_sd3, "buckets", dataset={
        "image_size": 32, "buckets": True, "bucket_step": 8}))  # bucket_max: 64 by default
    assert code == 0, err


def test_the_sd3_recipe_is_valid(cli, tiny_sd3):
    code, out, err = cli("check", SD3_RECIPE, "--set", f'model.pretrained="{tiny_sd3.as_posix()}"')
    assert code == 0, err
    assert "stable-diffusion-3" in out and "flow-matching" in out and "flow-euler" in out and "lora" in out
