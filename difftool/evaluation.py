"""Measuring sample quality: generate images in batches, stream them and the reference images
through the recipe's metrics, and return named values.

Used by `difftool eval` (a finished run, or a folder of images made by any program) and by the
engine ([evaluation] every_n_steps). Reference statistics are cached on disk
(difftool.metrics.ReferenceCache). Nothing here draws from torch's global RNG, and the engine
evaluates under `torch.random.fork_rng`, so evaluation never changes training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from difftool.errors import DifftoolError
from difftool.metrics import ReferenceCache, fingerprint, folder_fingerprint

METRICS_FILE = "metrics.jsonl"  # output_dir/metrics.jsonl: one line per evaluation during training
EVALUATIONS = "evaluations"  # run_dir/evaluations/*.json: the results of `difftool eval`
# [dataset] keys that do not change the reference images (read as image_size squares, whatever
# the training's buckets, crops and captions)
NOT_IMAGES = {"batch_size", "num_workers", "cache", "random_flip", "caption_dropout", "latent_cache_dir", "caption_column",
              "shuffle_tags", "keep_tags", "random_crop", "buckets", "bucket_step", "bucket_min", "bucket_max"}


@dataclass
class Reference:
    """Where the reference images come from, what identifies them, and how many there are."""

    description: str
    fingerprint: str
    count: int
    read: Callable[[int, int], Any]  # (start, stop) -> uint8 tensor (stop - start, 3, size, size)

    def batches(self, batch_size: int) -> Iterator:
        for start in range(0, self.count, batch_size):
            yield self.read(start, min(start + batch_size, self.count))


def stack(pixels: list):
    """uint8 (3, s, s) tensors -> one (N, 3, s, s) tensor."""
    import torch

    return torch.stack(pixels)


def dataset_reference(recipe, image_size: int | None = None) -> Reference:
    """Every image of the recipe's dataset (training and held-out rows), at its image size."""
    from difftool import build
    from difftool.data import decode

    table = recipe["dataset"]
    size = image_size or table["image_size"]
    rows = build.rows(recipe, recipe.kwargs("dataset"))
    folders = [folder_fingerprint(Path(v)) for v in table.values() if isinstance(v, str) and Path(v).is_dir()]
    identity = fingerprint({k: v for k, v in table.items() if k not in NOT_IMAGES}, size,
                           getattr(rows, "_fingerprint", None), folders, len(rows))

    def read(start: int, stop: int):
        return stack([decode(rows[i]["image"], size, table["center_crop"]) for i in range(start, stop)])

    return Reference(f"dataset '{table['name']}' ({len(rows)} images)", identity, len(rows), read)


def image_files(folder: Path, what: str) -> list[Path]:
    """The image files under `folder` (recursively, sorted); an error if there are none."""
    from PIL import Image

    if not folder.exists():
        raise DifftoolError(f"{what} {folder} does not exist; give a folder of images (PNG, JPEG, ...)")
    if not folder.is_dir():
        raise DifftoolError(f"{what} {folder} is a file; give a folder of images (PNG, JPEG, ...)")
    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not found:
        raise DifftoolError(f"{what} {folder} holds no images (PNG, JPEG, WebP, ...); give a folder that does")
    return found


def folder_reference(folder: Path, image_size: int, center_crop: bool = False, what: str = "--reference") -> Reference:
    """The images of a folder, resized to `image_size` as the dataset's are."""
    from difftool.data import decode

    files = image_files(folder, what)
    identity = fingerprint(str(folder.resolve()), folder_fingerprint(folder), image_size, center_crop)

    def read(start: int, stop: int):
        return stack([decode({"path": str(p), "bytes": None}, image_size, center_crop) for p in files[start:stop]])

    return Reference(f"{folder} ({len(files)} images)", identity, len(files), read)


def first_image_size(folder: Path) -> int:
    """The shorter side of the first image in `folder` (the size to evaluate a folder at)."""
    from PIL import Image

    with Image.open(image_files(folder, "--images")[0]) as image:
        return min(image.size)


@dataclass
class Evaluator:
    """The recipe's metrics, ready to measure batches of generated images against a reference."""

    metrics: dict[str, Any]  # name -> built metric
    kwargs: dict[str, dict]  # name -> its recipe keys (part of the cache key)
    reference: Reference | None
    image_size: int
    cache: ReferenceCache = field(default_factory=ReferenceCache)
    prepared: bool = False

    def check_counts(self, num_samples: int, where: str) -> None:
        """Refuse a number of samples (or a reference) too small for a metric."""
        for name, metric in self.metrics.items():
            needed = getattr(metric, "min_samples", 1)
            if num_samples < needed:
                raise DifftoolError(f"{where} num_samples = {num_samples} is too few for '{name}', which needs at "
                                    f"least {needed} generated images; raise it to {needed} or more")
            if getattr(metric, "needs_reference", True) and self.reference and self.reference.count < needed:
                raise DifftoolError(f"the reference, {self.reference.description}, has too few images for '{name}', "
                                    f"which needs at least {needed}; give a larger reference")

    def prepare_reference(self, batch_size: int, report=None) -> None:
        """Give every metric its reference statistics: from the cache, else from one pass over
        the reference images (then cached)."""
        if self.prepared:
            return
        missing = {}
        for name, metric in self.metrics.items():
            if not getattr(metric, "needs_reference", True):
                continue
            if self.reference is None:
                raise DifftoolError(f"metric '{name}' compares with reference images; give --reference FOLDER")
            path = self.cache.path(name, metric, self.reference.fingerprint, self.image_size, self.kwargs.get(name, {}))
            if not self.cache.load(path, metric):
                missing[name] = path
        if missing:
            if report:
                report(f"reference statistics for {', '.join(missing)}: reading {self.reference.description}")
            for images in self.reference.batches(batch_size):
                for name in missing:
                    self.metrics[name].update_reference(images)
            for name, path in missing.items():
                self.cache.save(path, self.metrics[name])
        self.prepared = True

    def measure(self, batches: Iterable[tuple[Any, list[str] | None]]) -> dict[str, float]:
        """Stream (images, prompts) batches through every metric; their values, by name."""
        for metric in self.metrics.values():
            metric.reset()
        for images, prompts in batches:
            if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
                raise DifftoolError(f"generated images are {images.shape[-1]}x{images.shape[-2]} px, the evaluation's "
                                    f"reference {self.image_size} px; give images of one size")
            for metric in self.metrics.values():
                metric.update(images, prompts if getattr(metric, "needs_prompts", False) else None)
        values: dict[str, float] = {}
        for metric in self.metrics.values():
            values.update({k: float(v) for k, v in metric.compute().items()})
        return values


def build_metrics(recipe, names: list[str], device=None, text_to_image: bool | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
    """The metrics `names`, built from the registry with the recipe's [evaluation.NAME] keys.
    With `text_to_image` False, a metric whose factory says it `needs_prompts` is refused
    before it is built (building may need files an unconditional run has no use for)."""
    from difftool.plugins import registry
    from difftool.recipe import metric_kwargs

    metrics, kwargs = {}, {}
    entries = {name: registry("metrics").get(name) for name in names}
    if text_to_image is False:
        check_fits({name: entry.load() for name, entry in entries.items()}, False, [], "[evaluation]")
    for name, entry in entries.items():
        kwargs[name] = metric_kwargs(recipe, name) if recipe is not None else {}
        where = f"[evaluation.{name}]" if recipe is None else recipe.where(f"evaluation.{name}")
        entry.check(list(kwargs[name]), where)
        metrics[name] = entry.build(kwargs[name], where, device=device)
    return metrics, kwargs


def check_fits(metrics: dict[str, Any], text_to_image: bool, prompts: list[str], where: str) -> None:
    """Refuse a metric that needs prompts on an unconditional model, or without prompts."""
    for name, metric in metrics.items():
        if getattr(metric, "needs_prompts", False):
            if not text_to_image:
                raise DifftoolError(f"{where} metric '{name}' scores images against their prompts, and this run's "
                                    "model is unconditional; leave it out (swd, fid and kid fit any run)")
            if not any(prompts):
                raise DifftoolError(f"{where} metric '{name}' needs prompts; set [sampling] prompts = [\"...\"]")


def to_uint8(images: list):
    """PIL images -> uint8 tensor (N, 3, H, W), as they would be saved."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


@dataclass
class Generation:
    """How to generate the evaluation's samples."""

    num_samples: int
    batch_size: int
    num_inference_steps: int
    seed: int
    image_size: int
    prompts: list[str] = field(default_factory=list)  # text-to-image: cycled through
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_classes: int | None = None  # class-conditional: sample i is of class i % num_classes

    def share(self, process_index: int, num_processes: int) -> list[tuple[int, int]]:
        """(first sample, count) of each batch of one process's share; every process gets the
        same number of batches (the last may repeat samples, dropped after gathering)."""
        per_process = math.ceil(self.num_samples / num_processes)
        start = process_index * per_process
        return [(start + i, min(self.batch_size, per_process - i)) for i in range(0, per_process, self.batch_size)]


def generated_batches(unet, scheduler, generation: Generation, device, latent=None, autocast=None,
                      process_index: int = 0, num_processes: int = 1) -> Iterator[tuple[Any, list[str], list[int]]]:
    """This process's share of the samples, batch by batch: (uint8 images, prompts, sample
    indices). A batch's seed is `seed + its first sample's index`."""
    import contextlib

    import torch

    from difftool.sampling import generate, text_to_image

    autocast = autocast or contextlib.nullcontext
    for first, count in generation.share(process_index, num_processes):
        seed = generation.seed + first
        indices = list(range(first, first + count))
        prompts = [generation.prompts[i % len(generation.prompts)] if generation.prompts else "" for i in indices]
        if latent is None and generation.num_classes:
            images = generate(unet, scheduler, count, generation.num_inference_steps, seed, generation.image_size,
                              device, autocast, labels=torch.tensor([i % generation.num_classes for i in indices]),
                              guidance_scale=generation.guidance_scale, null_label=generation.num_classes)
        elif latent is None:
            images = generate(unet, scheduler, count, generation.num_inference_steps, seed, generation.image_size,
                              device, autocast)
        else:
            images = text_to_image(latent.pipeline(unet, scheduler), prompts, generation.negative_prompt,
                                   generation.guidance_scale, count, generation.num_inference_steps, seed,
                                   generation.image_size, autocast)
        yield to_uint8(images), prompts, indices


def gathered(batches: Iterator, accelerator, total: int) -> Iterator[tuple[Any, list[str]]]:
    """(images, prompts) of every process's batches, gathered to all in process order; the
    samples past `total` (the padding of the last share) dropped."""
    import torch

    several = accelerator is not None and accelerator.num_processes > 1
    for batch in batches:
        if several:
            from accelerate.utils import gather_object

            parts = gather_object([(batch[0].cpu(), batch[1], batch[2])])
            batch = (torch.cat([p[0] for p in parts]), [x for p in parts for x in p[1]], [x for p in parts for x in p[2]])
        images, prompts, indices = batch
        keep = [i for i, index in enumerate(indices) if index < total]
        if keep:
            yield images[keep], [prompts[i] for i in keep]


def table_rows(values: dict[str, float]) -> list[tuple[str, str]]:
    """(name, value) rows for printing."""
    return [(name, f"{value:.4g}" if math.isfinite(value) else str(value)) for name, value in values.items()]


def json_values(values: dict[str, float]) -> dict[str, float | None]:
    """Metric values for JSON, which has no NaN or infinity: those become null."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def metrics_line(step: int, seconds: float, num_samples: int, values: dict[str, float]) -> str:
    """One line of output_dir/metrics.jsonl."""
    return json.dumps({"step": step, "time": time.time(), "seconds": round(seconds, 3),
                       "num_samples": num_samples, "values": json_values(values)})


@dataclass
class InTraining:
    """[evaluation] during training: the metrics, the sampling scheduler and what to generate."""

    evaluator: Evaluator
    scheduler: Any
    generation: Generation
    evaluated_step: int | None = None


def generation_settings(recipe, scheduler, num_samples: int | None = None, steps: int | None = None,
                        seed: int | None = None, batch_size: int | None = None, text_to_image: bool = False,
                        num_classes: int | None = None) -> Generation:
    """What to generate, from the recipe's [evaluation] (then [sampling]) unless given; of a
    class-conditional model, every class in turn."""
    from difftool.conditioning import guidance

    table, sampling = recipe["evaluation"], recipe["sampling"]
    return Generation(
        num_samples=num_samples or table["num_samples"],
        batch_size=batch_size or table["batch_size"] or recipe["dataset"]["batch_size"],
        num_inference_steps=steps or table["num_inference_steps"] or sampling["num_inference_steps"]
        or scheduler.config.num_train_timesteps,
        seed=table["seed"] if seed is None else seed,
        image_size=recipe["dataset"]["image_size"],
        prompts=list(sampling["prompts"]),
        negative_prompt=sampling["negative_prompt"],
        guidance_scale=guidance(sampling["guidance_scale"], text_to_image, bool(recipe["dataset"]["label_dropout"])),
        num_classes=num_classes,
    )


def evaluation_scheduler(recipe, training_scheduler, sampler):
    """[evaluation] scheduler, inheriting the training scheduler's config; else the [sampling] one."""
    from difftool.sampling import sampling_scheduler

    if recipe["evaluation"]["scheduler"] is None:
        return sampler
    return sampling_scheduler(recipe.entries["evaluation"], dict(training_scheduler.config), {}, recipe.where("evaluation"))


def reference_for(recipe, metrics: dict, folder: str | Path | None, image_size: int) -> Reference | None:
    """The reference of metrics that need one: `folder`, else [evaluation] reference, else the
    recipe's dataset; None where no metric needs one."""
    if not any(getattr(m, "needs_reference", True) for m in metrics.values()):
        return None
    folder = folder or recipe["evaluation"]["reference"]
    if folder:
        return folder_reference(Path(folder), image_size, recipe["dataset"]["center_crop"],
                                "--reference" if folder != recipe["evaluation"]["reference"] else "[evaluation] reference =")
    return dataset_reference(recipe, image_size)


def in_training(recipe, device, text_to_image: bool, training_scheduler, sampler,
                classes: list[str] | None = None) -> InTraining | None:
    """The run's evaluation when [evaluation] every_n_steps is set, checked before training."""
    table = recipe["evaluation"]
    if not table["every_n_steps"]:
        return None
    metrics, kwargs = build_metrics(recipe, table["metrics"], device, text_to_image)
    check_fits(metrics, text_to_image, recipe["sampling"]["prompts"], recipe.where("evaluation"))
    image_size = recipe["dataset"]["image_size"]
    evaluator = Evaluator(metrics, kwargs, reference_for(recipe, metrics, None, image_size), image_size)
    evaluator.check_counts(table["num_samples"], recipe.where("evaluation"))
    scheduler = evaluation_scheduler(recipe, training_scheduler, sampler)
    return InTraining(evaluator, scheduler, generation_settings(
        recipe, scheduler, text_to_image=text_to_image, num_classes=None if classes is None else len(classes)))


def check_recipe(recipe, built_model, text_to_image: bool) -> None:
    """What `difftool check` can find out about [evaluation] before a run: the metrics build
    (weights files found), fit the model, have enough samples and a reference."""
    table = recipe["evaluation"]
    if not table["every_n_steps"]:
        return
    metrics, kwargs = build_metrics(recipe, table["metrics"], text_to_image=text_to_image)
    check_fits(metrics, text_to_image, recipe["sampling"]["prompts"], recipe.where("evaluation"))
    # the dataset is not built by `check`, so the reference's size is found before the first step
    Evaluator(metrics, kwargs, None, recipe["dataset"]["image_size"]).check_counts(
        table["num_samples"], recipe.where("evaluation"))
    if table["reference"]:
        image_files(Path(table["reference"]), "[evaluation] reference =")


@dataclass
class Asked:
    """What `difftool eval` was asked; None takes the run's [evaluation] (then [sampling]) value."""

    metrics: list[str] = field(default_factory=list)
    num_samples: int | None = None
    scheduler: str | None = None
    steps: int | None = None
    reference: Path | None = None
    seed: int | None = None
    batch_size: int | None = None


def evaluate_run(run_dir: Path, asked: Asked, report=None) -> tuple[dict[str, float], dict[str, Any]]:
    """Generate from a finished run (its adapters and EMA weights, as `difftool sample` loads
    them) and measure the samples; returns (values, settings)."""
    from accelerate import PartialState

    from difftool import recipe as recipes
    from difftool.conditioning import read_names
    from difftool.plugins import registry
    from difftool.runs import check_scheduler, load_run, saved_recipe
    from difftool.sampling import sampling_scheduler

    saved = saved_recipe(run_dir)
    if not saved:
        raise DifftoolError(f"{run_dir} has no recipe.toml, so its data and settings are unknown; "
                            "generate images with `difftool sample` and use `difftool eval --images FOLDER --reference ...`")
    recipe = recipes.validate(saved, str(run_dir / "recipe.toml"))
    names = asked.metrics or recipe["evaluation"]["metrics"]
    device = PartialState().device
    name = asked.scheduler or recipe["evaluation"]["scheduler"] or recipe["sampling"]["scheduler"]
    entry = registry("schedulers").get(name)
    unet, training_scheduler, latent = load_run(run_dir)
    metrics, kwargs = build_metrics(recipe, names, device, latent is not None)
    check_fits(metrics, latent is not None, recipe["sampling"]["prompts"], "--metric")
    # the run's own [sampling] settings (thresholding, ...) go with its own sampling scheduler
    overrides = recipe.kwargs("sampling") if name == recipe["sampling"]["scheduler"] else {}
    scheduler = sampling_scheduler(entry, dict(training_scheduler.config), overrides, f"--scheduler {name}")
    check_scheduler(saved, training_scheduler, scheduler, f"--scheduler {name}")
    classes = read_names(run_dir)
    generation = generation_settings(recipe, scheduler, asked.num_samples, asked.steps, asked.seed, asked.batch_size,
                                     latent is not None, None if classes is None else len(classes))
    image_size = generation.image_size
    reference = reference_for(recipe, metrics, asked.reference, image_size)
    evaluator = Evaluator(metrics, kwargs, reference, image_size)
    evaluator.check_counts(generation.num_samples, "--num-samples:")
    evaluator.prepare_reference(generation.batch_size, report)
    if report:
        report(f"generating {generation.num_samples} samples ({name}, {generation.num_inference_steps} steps)")
    unet = unet.to(device).eval()
    if latent is not None:
        latent.to(device)
    values = evaluator.measure(gathered(generated_batches(unet, scheduler, generation, device, latent), None,
                                        generation.num_samples))
    settings = {
        "run": str(run_dir), "metrics": names, "metric_settings": kwargs, "num_samples": generation.num_samples,
        "scheduler": name, "num_inference_steps": generation.num_inference_steps, "seed": generation.seed,
        "image_size": image_size, "reference": reference.description if reference else None,
        "reference_fingerprint": reference.fingerprint if reference else None,
    }
    return values, settings


def evaluate_images(folder: Path, asked: Asked, image_size: int | None = None, report=None) -> tuple[dict[str, float], dict[str, Any]]:
    """Measure a folder of images made by any program against `asked.reference`."""
    from accelerate import PartialState

    names = asked.metrics or ["swd"]
    metrics, kwargs = build_metrics(None, names, PartialState().device)
    for name, metric in metrics.items():
        if getattr(metric, "needs_prompts", False):
            raise DifftoolError(f"--metric {name} scores images against their prompts, which a folder of images "
                                "does not have; evaluate the run that made them instead")
    size = image_size or first_image_size(folder)
    if asked.reference is None:
        raise DifftoolError("--images needs --reference FOLDER: the real images to compare with")
    reference = folder_reference(asked.reference, size)
    generated = folder_reference(folder, size, what="--images")
    evaluator = Evaluator(metrics, kwargs, reference, size)
    evaluator.check_counts(generated.count, f"--images {folder} holds {generated.count} images:")
    batch_size = asked.batch_size or 64
    evaluator.prepare_reference(batch_size, report)
    values = evaluator.measure((images, None) for images in generated.batches(batch_size))
    settings = {"images": str(folder), "metrics": names, "metric_settings": kwargs, "num_samples": generated.count,
                "image_size": size, "reference": reference.description, "reference_fingerprint": reference.fingerprint}
    return values, settings


def result_name(settings: dict[str, Any]) -> str:
    """The file name of an evaluation's result in run_dir/evaluations/."""
    parts = ["-".join(settings["metrics"]), settings["scheduler"], f"{settings['num_inference_steps']}steps",
             f"{settings['num_samples']}samples", f"seed{settings['seed']}"]
    return "_".join(str(p).replace(":", "-").replace("/", "-") for p in parts) + ".json"


def result_text(values: dict[str, float], settings: dict[str, Any], seconds: float) -> str:
    """An evaluation's result as JSON: values, the settings that produced them, when, how long."""
    return json.dumps({"values": json_values(values), "settings": settings, "time": time.time(), "seconds": round(seconds, 3)},
                      indent=2) + "\n"
