"""Generating images with a UNet and any registered scheduler, and laying them out as a grid."""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
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
             image_size: int, device, autocast=contextlib.nullcontext, labels=None, guidance_scale: float = 1.0,
             null_label: int | None = None) -> list:
    """`num_images` PIL images from seeded noise, denoised in one batch; of a class-conditional
    model, of `labels` (an int64 tensor, one per image) with classifier-free guidance at
    `guidance_scale` away from the `null_label` class (the model's number of classes)."""
    import torch
    from diffusers.utils import numpy_to_pil

    from difftool.conditioning import guided, model_labels

    generator = torch.Generator().manual_seed(seed)
    shape = (num_images, unet.config.in_channels, image_size, image_size)
    # flow-match schedulers start from unit noise and take the sample as it is
    sample = torch.randn(shape, generator=generator).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    extra = {} if labels is not None else model_labels(unet, None, num_images, device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timesteps = t.expand(num_images)  # one per sample, as transformers (DiT) need
            with autocast():
                if labels is None:
                    prediction = unet(scale(sample, t), timesteps, **extra).sample
                else:
                    prediction = guided(unet, scale(sample, t), timesteps, labels.to(device), guidance_scale,
                                        null_label)
            sample = scheduler.step(prediction.float(), t, sample, **step_kwargs).prev_sample
    pixels = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return numpy_to_pil(pixels)


def text_to_image(pipeline, prompts: list[str], negative_prompt: str, guidance_scale: float, num_images: int,
                  num_inference_steps: int, seed: int, image_size: int, autocast=contextlib.nullcontext) -> list:
    """`num_images` PIL images from a diffusers text-to-image pipeline, going round `prompts`,
    with classifier-free guidance at `guidance_scale` away from `negative_prompt`."""
    import torch

    chosen = [prompts[i % len(prompts)] for i in range(num_images)]
    with torch.no_grad(), autocast():
        return pipeline(prompt=chosen, negative_prompt=[negative_prompt] * num_images, guidance_scale=guidance_scale,
                        num_inference_steps=num_inference_steps, height=image_size, width=image_size,
                        generator=torch.Generator().manual_seed(seed)).images


def grid(images: list, rows: int | None = None):
    """The images in one PIL image: in `rows` rows, else as close to square as their count allows."""
    from diffusers.utils import make_image_grid

    if rows:
        return make_image_grid(images, rows=rows, cols=len(images) // rows)
    rows = math.isqrt(len(images))
    while len(images) % rows:
        rows -= 1
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


@dataclass
class Prompting:
    """What `difftool sample` asks of a text-to-image run; None takes the run's [sampling] value."""

    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    image: Path | None = None  # inpaint this image ...
    mask: Path | None = None  # ... where this mask is white
    strength: float = 1.0
    refiner: Path | None = None  # an SDXL refiner folder that finishes the base's denoising
    denoising_end: float = 0.8  # the fraction of denoising the base does before the refiner
    classes: list[str] = field(default_factory=list)  # a class-conditional run: the classes to draw, one row each

    def asked(self, *names: str) -> list[str]:
        """The options given (of `names`, or of all)."""
        defaults = Prompting()
        return [f"--{'class' if name == 'classes' else name.replace('_', '-')}" for name in names or vars(self)
                if getattr(self, name) != getattr(defaults, name)]


def inpaint(pipeline, prompting: Prompting, prompts: list[str], negative_prompt: str, guidance_scale: float,
            num_images: int, num_inference_steps: int, seed: int, image_size: int) -> list:
    """Repaint where the mask is white (SD inpainting; for SDXL with --refiner, the base denoises
    up to `denoising_end` and the refiner finishes, as diffusers' base+refiner recipe does).
    Image and mask are resized to the run's resolution, and the pixels outside the mask are
    pasted back from the image, so what was to be kept is kept exactly."""
    import torch
    from diffusers import AutoPipelineForInpainting
    from PIL import Image

    if not (prompting.image and prompting.mask):
        raise DifftoolError("inpainting needs both --image and --mask (white where to repaint)")
    image, mask = (open_image(path, mode, image_size) for path, mode in ((prompting.image, "RGB"), (prompting.mask, "L")))
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    base = AutoPipelineForInpainting.from_pipe(pipeline)
    call = dict(prompt=[prompts[0]] * num_images, negative_prompt=[negative_prompt] * num_images, image=image,
                mask_image=mask, height=image_size, width=image_size, strength=prompting.strength,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
    with torch.no_grad():
        if prompting.refiner is None:
            painted = base(**call, generator=torch.Generator().manual_seed(seed)).images
        else:
            refiner = load_refiner(prompting.refiner, pipeline)
            latents = base(**call, denoising_end=prompting.denoising_end, output_type="latent",
                           generator=torch.Generator().manual_seed(seed)).images
            painted = refiner(**{**call, "image": latents}, denoising_start=prompting.denoising_end,
                              generator=torch.Generator().manual_seed(seed)).images
    return [Image.composite(result.resize(image.size), image, mask) for result in painted]


def open_image(path: Path, mode: str, size: int):
    """The image at `path` in `mode` ("RGB", or "L" for a mask), resized to size x size. It is made
    RGB first by `difftool.images.to_rgb` (upright, 16-bit scaled, transparency over white)."""
    from PIL import Image

    from difftool.images import DECODE_ERRORS, to_rgb

    try:
        with Image.open(path) as image:
            return to_rgb(image).convert(mode).resize((size, size), Image.BICUBIC)
    except DECODE_ERRORS as exc:
        raise DifftoolError(f"{path} is not a readable image ({exc}); give a PNG or JPEG") from exc


def load_refiner(folder: Path, base):
    """The SDXL inpainting refiner at `folder`, sharing the base's second text encoder and VAE."""
    from diffusers import StableDiffusionXLInpaintPipeline

    if not hasattr(base, "text_encoder_2"):
        raise DifftoolError("--refiner is for Stable Diffusion XL runs; this run is not one")
    if not (Path(folder) / "model_index.json").is_file():
        raise DifftoolError(f"--refiner {folder} is not a diffusers pipeline folder (no model_index.json); "
                            "point it at a local SDXL refiner")
    refiner = StableDiffusionXLInpaintPipeline.from_pretrained(folder, text_encoder_2=base.text_encoder_2, vae=base.vae)
    refiner.set_progress_bar_config(disable=True)
    return refiner.to(base.device)
