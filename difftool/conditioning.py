"""Class conditioning: class names saved with a run, labels given to the model, label dropout
and classifier-free guidance (Ho & Salimans 2022).

A class-conditional model of C classes takes `class_labels` 0..C-1, and C for the null class:
the unconditional case it learns from labels dropped at [dataset] label_dropout, and the one
guidance steers away from: prediction = unconditional + scale * (conditional - unconditional).
"""

from __future__ import annotations

import json
from pathlib import Path

from difftool.errors import DifftoolError
from difftool.registry import suggest

NAMES_FILE = "classes.json"  # beside a class-conditional run's model: {"names": [...]}
TEXT_GUIDANCE, CLASS_GUIDANCE = 7.5, 4.0  # [sampling] guidance_scale when unset (SD's and DiT's)


def guidance(value: float | None, text: bool, null_trained: bool = True) -> float:
    """The guidance scale: the one given, else a text-to-image or a class-conditional default
    (1, no guidance, for a class-conditional model whose null class was never trained)."""
    if value is not None:
        return value
    return TEXT_GUIDANCE if text else CLASS_GUIDANCE if null_trained else 1.0


def check_guidance(scale: float | None, label_dropout: float, where: str) -> None:
    """Guidance of a class-conditional model needs the null class, learnt from dropped labels.
    `where` is a recipe's "[sampling]" or a command's option ("--guidance-scale")."""
    if scale not in (None, 1.0) and not label_dropout:
        option = where.startswith("--")
        fix = (f"leave {where} out (or give 1), or train with [dataset] label_dropout (e.g. 0.1)" if option else
               "set [dataset] label_dropout (e.g. 0.1) for guidance, or guidance_scale = 1.0")
        raise DifftoolError(f"{where} {'' if option else 'guidance_scale = '}{scale} needs the unconditional (null "
                            "class) case, which the model learns only from dropped labels, and [dataset] "
                            f"label_dropout = 0 drops none; {fix}")


def write_names(folder: Path, names: list[str]) -> None:
    (folder / NAMES_FILE).write_text(json.dumps({"names": names}, indent=1) + "\n")


def read_names(run_dir: Path) -> list[str] | None:
    """The class names of a finished run, or None for an unconditional one."""
    file = Path(run_dir) / NAMES_FILE
    if not file.is_file():
        return None
    try:
        names = json.loads(file.read_text())["names"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DifftoolError(f"{file} is damaged ({exc}); it lists the run's classes as {{\"names\": [...]}}, in the "
                            "order of the dataset's labels: restore it from the run's newest checkpoint or rewrite it") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DifftoolError(f"{file} is damaged: names must be a list of strings")
    return names


def indices(names: list[str], asked: list[str], where: str) -> list[int]:
    """The label of each asked class name (all classes when none is asked)."""
    if not asked:
        return list(range(len(names)))
    found = []
    for name in asked:
        if name not in names:
            raise DifftoolError(f"{where.rstrip(':')}: unknown class '{name}'{suggest(name, names)}; the run's classes are "
                                f"{', '.join(names)}")
        found.append(names.index(name))
    return found


def requires_labels(model) -> bool:
    """Whether the model cannot run without class labels: diffusers' transformers with
    AdaLayerNormZero (norm_type "ada_norm_zero", as DiT) embed one with the timestep, so an
    unconditional one is built for a single class and given class 0."""
    return getattr(getattr(model, "config", None), "norm_type", None) == "ada_norm_zero"


def class_conditional(model) -> bool:
    """Whether a pixel-space denoiser was built for class labels: a UNet with a class embedding
    (num_class_embeds or class_embed_type), a DiT of more than one class (an unconditional one
    has the single class 0)."""
    config = getattr(model, "config", None)
    if requires_labels(model):
        return (getattr(config, "num_embeds_ada_norm", None) or 1) > 1
    return getattr(config, "num_class_embeds", None) is not None or getattr(config, "class_embed_type", None) is not None


def model_labels(model, labels, batch_size: int, device) -> dict:
    """The model's class keywords: `labels` when given, class 0 for a model that needs one."""
    import torch

    if labels is not None:
        return {"class_labels": labels.to(device)}
    if requires_labels(model):
        return {"class_labels": torch.zeros(batch_size, dtype=torch.int64, device=device)}
    return {}


def dropped(labels, rate: float, null: int):
    """`labels` with each replaced by the null class with probability `rate` (torch's global RNG)."""
    import torch

    if not rate:
        return labels
    drop = torch.rand(labels.shape[0], device=labels.device) < rate
    return torch.where(drop, torch.full_like(labels, null), labels)


def guided(model, sample, timestep, labels, guidance_scale: float, null: int):
    """The model's prediction for `labels`, guided: with a scale of 1 the conditional one alone,
    else the conditional and null-class predictions in one batch, combined."""
    import torch

    if guidance_scale == 1.0:
        return model(sample, timestep, class_labels=labels).sample
    both = model(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                 class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def grid_labels(labels: list[int], num_images: int):
    """The labels of a sample grid with one row for each of `labels`, in order: `num_images`
    shared between them (at least one each), as an int64 tensor."""
    import torch

    per_class = max(1, num_images // len(labels))
    return torch.tensor([label for label in labels for _ in range(per_class)])
