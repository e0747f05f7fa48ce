"""Generating images with a UNet and any registered scheduler, and laying them out as a grid."""

from __future__ import annotations

import contextlib
import inspect
import json
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


def sample_run(run_dir: Path, scheduler: str | None, steps: int | None, num_images: int | None,
               seed: int | None, out: Path | None, overwrite: bool, prompting: Prompting | None = None) -> Path:
    """Generate a grid from a finished run's pipeline; what is not given comes from its recipe.
    A text-to-image run samples `prompting`'s prompt with classifier-free guidance, or inpaints."""
    import torch
    from accelerate import PartialState
    from PIL import Image

    from difftool.conditioning import check_guidance, guidance, indices, read_names, rows_of
    from difftool.files import save_image
    from difftool.plugins import registry
    from difftool.recipe import SCHEMA

    prompting = prompting or Prompting()
    saved = saved_recipe(run_dir)
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
    unet, training_scheduler, latent = load_run(run_dir)
    names = read_names(run_dir)
    text_only = [name for name in vars(prompting) if name not in ("guidance_scale", "classes")]
    if latent is None and (asked := prompting.asked(*text_only)):
        kind = "a class-conditional" if names else "an unconditional"
        raise DifftoolError(f"{', '.join(asked)} need a text-to-image run, and {run_dir} holds {kind} model; leave them out")
    if latent is None and names is None and (asked := prompting.asked("classes", "guidance_scale")):
        raise DifftoolError(f"{', '.join(asked)} need a class-conditional run (--guidance-scale: or a text-to-image one), "
                            f"and {run_dir} holds an unconditional model; leave them out")
    if latent is not None and prompting.classes:
        raise DifftoolError(f"--class is for class-conditional runs, and {run_dir} holds a text-to-image model; "
                            "give --prompt instead")
    chosen = sampling_scheduler(entry, dict(training_scheduler.config), overrides, f"--scheduler {name}")
    check_scheduler(saved, training_scheduler, chosen, f"--scheduler {name}")
    steps = steps or chosen.config.num_train_timesteps
    kind = "inpaint" if prompting.image or prompting.mask else "sample"
    if prompting.refiner is not None and kind != "inpaint":
        raise DifftoolError("--refiner is for SDXL inpainting; give --image and --mask too")
    out = out or run_dir / "samples" / f"{kind}-{name.replace(':', '-')}-{steps}.png"
    if out.exists() and not overwrite:
        raise DifftoolError(f"{out} already exists; choose another --out or pass --overwrite")
    device = PartialState().device
    unet = unet.to(device).eval()
    image_size = saved.get("dataset", {}).get("image_size") or unet.config.sample_size
    rows = None
    if latent is None and names is None:
        images = generate(unet, chosen, num_images, steps, seed, image_size, device)
    elif latent is None:
        labels = indices(names, prompting.classes or sampling.get("classes") or [], "--class")
        dropout = saved.get("dataset", {}).get("label_dropout", 0.0)
        scale = first(prompting.guidance_scale, sampling.get("guidance_scale"), None)
        check_guidance(scale, dropout, "--guidance-scale" if prompting.guidance_scale is not None else "[sampling]")
        per_class, rows = max(1, num_images // len(labels)), len(labels)
        images = generate(unet, chosen, per_class * rows, steps, seed, image_size, device,
                          labels=torch.tensor(rows_of(labels, per_class)), null_label=len(names),
                          guidance_scale=guidance(scale, False, bool(dropout)))
    else:
        latent.to(device)
        text = dict(
            prompts=[prompting.prompt] if prompting.prompt is not None else sampling.get("prompts") or [""],
            negative_prompt=first(prompting.negative_prompt, sampling.get("negative_prompt"), ""),
            guidance_scale=guidance(first(prompting.guidance_scale, sampling.get("guidance_scale"), None), True),
            num_images=num_images, num_inference_steps=steps, seed=seed, image_size=image_size,
        )
        if kind == "inpaint":
            images = inpaint(latent.pipeline(unet, chosen), prompting, **text)
        else:
            images = text_to_image(latent.pipeline(unet, chosen), **text)
    save_image(grid(images, rows=rows), out)
    return out


def saved_recipe(run_dir: Path) -> dict[str, Any]:
    """The tables of a finished run's recipe.toml ({} for a run saved without one)."""
    import tomllib

    from difftool.files import finished

    if not finished(run_dir):
        raise DifftoolError(f"{run_dir} is not a finished difftool run (it has no saved pipeline or adapters); "
                            "give the output_dir of a run that saved its model")
    recipe_file = run_dir / "recipe.toml"
    try:
        return tomllib.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DifftoolError(f"{recipe_file} is damaged ({exc}); restore it from the run's newest checkpoint "
                            "(checkpoints/checkpoint-N/recipe.toml) or from a backup") from exc


def check_scheduler(saved: dict[str, Any], training_scheduler, scheduler, where: str) -> None:
    """Refuse a sampling scheduler that does not fit the objective the run was trained with
    (a DDPM one for a flow-matching model, say), rebuilt from its saved recipe."""
    from difftool.plugins import registry
    from difftool.recipe import SCHEMA

    table = saved.get("objective", {})
    name = table.get("name", "ddpm")
    kwargs = {k: v for k, v in table.items() if k not in SCHEMA["objective"]}
    objective = registry("objectives").get(name).build(
        kwargs, "the run's [objective]", noise_scheduler=training_scheduler,
        image_size=saved.get("dataset", {}).get("image_size"))
    if problem := objective.check_scheduler(scheduler, "sampling"):
        raise DifftoolError(f"{where} does not fit the run's objective '{name}': it {problem}")


def first(*values):
    """The first value that is not None (the last when all are)."""
    return next((v for v in values if v is not None), values[-1])


def load_run(run_dir: Path):
    """(denoiser, training scheduler, LatentDiffusion or None) of a finished run: an adapted run
    is its base with its adapters loaded, where a fused copy was saved too."""
    from diffusers import DiffusionPipeline

    from difftool import adapters, build
    from difftool.latent import LatentDiffusion, absent_components

    if (run_dir / adapters.MARKER).is_file():
        model, training_scheduler = adapters.adapted_model(run_dir)
        return with_classes(run_dir, build.denoiser(model), training_scheduler, model if build.is_latent(model) else None)
    from difftool.integrity import damaged_output, weights_problem

    try:
        components = json.loads((run_dir / "model_index.json").read_text())
    except ValueError as exc:
        raise damaged_output(run_dir, f"its model_index.json is damaged ({exc})") from exc
    for name in components:  # checked before diffusers meets them, and logs its own errors
        if (run_dir / name).is_dir() and (problem := weights_problem(run_dir / name)):
            raise damaged_output(run_dir, problem)
    try:
        with dit_as_unet():
            pipeline = DiffusionPipeline.from_pretrained(run_dir, **absent_components(run_dir))
    except Exception as exc:
        raise damaged_output(run_dir, f"its model could not be loaded ({type(exc).__name__}: {str(exc)[:300]})") from exc
    latent = LatentDiffusion(pipeline, str(run_dir)) if hasattr(pipeline, "text_encoder") else None
    # a latent model holds its denoiser as `unet` whatever the pipeline calls it (SD3: transformer)
    return with_classes(run_dir, pipeline.unet if latent is None else latent.unet, pipeline.scheduler, latent)


def with_classes(run_dir: Path, unet, training_scheduler, latent):
    """The loaded run, once a class-conditional model is known to have its class names beside it
    (without them it would be sampled as unconditional, and fail for want of labels)."""
    from difftool.conditioning import NAMES_FILE, class_conditional
    from difftool.integrity import damaged_output

    if latent is None and class_conditional(unet) and not (run_dir / NAMES_FILE).is_file():
        raise damaged_output(run_dir, f"its model is class-conditional, and {NAMES_FILE}, the names of its classes, "
                                      "is missing")
    return unet, training_scheduler, latent


@contextlib.contextmanager
def dit_as_unet():
    """Quiet diffusers' loader about the DiT a dit run saves as DDPMPipeline's `unet` (a slot
    typed UNet2DModel), which it would warn about at every load; other warnings pass."""
    import logging

    def keep(record) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for unet:") and "DiTTransformer2DModel" in message)

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
