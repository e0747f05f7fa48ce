"""Finished runs: the saved recipe, the model loaded back (an adapted run's base rebuilt from its
recipe, with its adapters loaded), the check of a sampling scheduler against the run's objective,
and `difftool sample`, which draws a grid from one.

This module sits above build, adapters and sampling, which never import it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from difftool.errors import DifftoolError
from difftool.sampling import Prompting


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


def load_run(run_dir: Path):
    """(denoiser, training scheduler, LatentDiffusion or None) of a finished run: an adapted run
    is its base with its adapters loaded, where a fused copy was saved too."""
    from diffusers import DiffusionPipeline

    from difftool import build
    from difftool.adapters import MARKER
    from difftool.latent import LatentDiffusion, absent_components

    if (run_dir / MARKER).is_file():
        model, training_scheduler = adapted_model(run_dir)
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


def adapted_model(run_dir: Path):
    """A finished adapted run's model (the base its recipe names, with the run's adapters
    loaded) and its noise scheduler."""
    from difftool import build
    from difftool import recipe as recipes
    from difftool.adapters import MARKER, load

    recipe = recipes.load(run_dir / "recipe.toml")
    from difftool.integrity import damaged_output

    try:
        folder = json.loads((run_dir / MARKER).read_text()).get("base_model_folder")
    except (ValueError, AttributeError) as exc:
        raise damaged_output(run_dir, f"its {MARKER} is damaged ({exc})") from exc
    pretrained = recipe["model"].get("pretrained")
    if folder and pretrained and not Path(pretrained).expanduser().exists():  # a relative path, from elsewhere
        recipe["model"]["pretrained"] = folder
    model = build.model(recipe)
    load(build.adapters(recipe, model), build.denoiser(model), recipe, run_dir)
    return model, build.noise_scheduler(recipe, model)


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


def sample_run(run_dir: Path, scheduler: str | None, steps: int | None, num_images: int | None,
               seed: int | None, out: Path | None, overwrite: bool, prompting: Prompting | None = None) -> Path:
    """Generate a grid from a finished run's pipeline; what is not given comes from its recipe.
    A text-to-image run samples `prompting`'s prompt with classifier-free guidance, or inpaints."""
    from accelerate import PartialState
    from PIL import Image

    from difftool.conditioning import check_guidance, grid_labels, guidance, indices, read_names
    from difftool.files import save_image
    from difftool.plugins import registry
    from difftool.recipe import SCHEMA
    from difftool.sampling import generate, grid, inpaint, sampling_scheduler, text_to_image

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
        rows, labels = len(labels), grid_labels(labels, num_images)
        images = generate(unet, chosen, len(labels), steps, seed, image_size, device, labels=labels, null_label=len(names),
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


def first(*values):
    """The first value that is not None (the last when all are)."""
    return next((v for v in values if v is not None), values[-1])
