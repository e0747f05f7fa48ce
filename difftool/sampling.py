"""Generating images with a UNet and any registered scheduler, and laying them out as a grid."""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any

from difftool.errors import DifftoolError
from difftool.registry import Entry


def sampling_scheduler(entry: Entry, training_config: dict[str, Any], overrides: dict[str, Any], where: str):
    """Build the sampling scheduler from the training scheduler's config, as `from_config` does:
    keys the factory accepts are inherited (betas, prediction type, ...), `overrides` win."""
    params, open_ended = entry.parameters()
    inherited = {k: v for k, v in training_config.items() if not k.startswith("_") and (open_ended or k in params)}
    return entry.build({**inherited, **overrides}, where)


def generate(unet, scheduler, num_images: int, num_inference_steps: int, seed: int,
             image_size: int, device, autocast=contextlib.nullcontext) -> list:
    """`num_images` PIL images from seeded noise, denoised in one batch."""
    import torch
    from diffusers.utils import numpy_to_pil

    generator = torch.Generator().manual_seed(seed)
    shape = (num_images, unet.config.in_channels, image_size, image_size)
    sample = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            with autocast():
                prediction = unet(scheduler.scale_model_input(sample, t), t).sample
            sample = scheduler.step(prediction.float(), t, sample, **step_kwargs).prev_sample
    pixels = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return numpy_to_pil(pixels)


def grid(images: list):
    """The images in one PIL image, as close to square as their count allows."""
    from diffusers.utils import make_image_grid

    rows = math.isqrt(len(images))
    while len(images) % rows:
        rows -= 1
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def sample_run(run_dir: Path, scheduler: str | None, steps: int | None, num_images: int | None,
               seed: int | None, out: Path | None, overwrite: bool) -> Path:
    """Generate a grid from a finished run's pipeline; what is not given comes from its recipe."""
    import tomllib

    from accelerate import PartialState
    from diffusers import DiffusionPipeline
    from PIL import Image

    from difftool import adapters
    from difftool.files import finished, save_image
    from difftool.plugins import registry
    from difftool.recipe import SCHEMA

    if not finished(run_dir):
        raise DifftoolError(f"{run_dir} is not a finished difftool run (it has no saved pipeline or adapters); "
                            "give the output_dir of a run that saved its model")
    recipe_file = run_dir / "recipe.toml"
    saved = tomllib.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    sampling = saved.get("sampling", {})
    name = scheduler or sampling.get("scheduler", "ddpm")
    # the run's own scheduler settings apply only to the run's own scheduler
    overrides = {} if scheduler else {k: v for k, v in sampling.items() if k not in SCHEMA["sampling"]}
    entry = registry("schedulers").get(name)
    steps = steps or sampling.get("num_inference_steps")
    num_images = num_images or sampling.get("num_images", 16)
    seed = seed if seed is not None else sampling.get("seed", saved.get("run", {}).get("seed", 0))
    if out is not None and out.suffix.lower() not in Image.registered_extensions():
        raise DifftoolError(f"--out {out}: give a file name with an image extension, e.g. grid.png")
    if (run_dir / adapters.MARKER).is_file():  # base + adapters, even where a fused copy was saved too
        unet, training_scheduler = adapters.adapted_model(run_dir)
    else:
        pipeline = DiffusionPipeline.from_pretrained(run_dir)
        unet, training_scheduler = pipeline.unet, pipeline.scheduler
    chosen = sampling_scheduler(entry, dict(training_scheduler.config), overrides, f"--scheduler {name}")
    steps = steps or chosen.config.num_train_timesteps
    out = out or run_dir / "samples" / f"sample-{name.replace(':', '-')}-{steps}.png"
    if out.exists() and not overwrite:
        raise DifftoolError(f"{out} already exists; choose another --out or pass --overwrite")
    device = PartialState().device
    unet = unet.to(device).eval()
    images = generate(unet, chosen, num_images, steps, seed, unet.config.sample_size, device)
    save_image(grid(images), out)
    return out
