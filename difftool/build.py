"""Turning a validated recipe into the objects the training loop needs."""

from __future__ import annotations

from fnmatch import fnmatch

from difftool.errors import DifftoolError
from difftool.recipe import Recipe


def model(recipe: Recipe):
    """The model, fitted to the image size, with its attention processors and adapters applied."""
    built = recipe.entries["model"].build(recipe.kwargs("model"), recipe.where("model"))
    fit_image_size(built, recipe["dataset"]["image_size"], recipe.where("dataset"))
    if "attention" in recipe.data:
        set_attention(recipe, built)
    for i, table in enumerate(recipe["adapters"]):
        section = f"adapters.{i}"
        adapted = recipe.entries[section].build(recipe.kwargs(section, table), recipe.where(section), model=built)
        built = built if adapted is None else adapted
    return built


def fit_image_size(built, image_size: int, where: str) -> None:
    """Check the model can take `image_size` images, and record it as the model's sample_size."""
    config = getattr(built, "config", None)
    downsamples = max(len(getattr(config, "down_block_types", ()) or ()) - 1, 0)
    factor = 2 ** downsamples
    if image_size % factor:
        raise DifftoolError(
            f"{where} image_size = {image_size} must be divisible by {factor}, since the model "
            f"halves the resolution {downsamples} times; use {image_size // factor * factor or factor}"
        )
    sample_size = getattr(config, "sample_size", None)
    if sample_size is None and hasattr(built, "register_to_config"):
        built.register_to_config(sample_size=image_size)
    elif isinstance(sample_size, int) and sample_size != image_size:
        raise DifftoolError(
            f"{where} image_size = {image_size} but the model's sample_size is {sample_size}; "
            "make them equal"
        )


def attention_layers(built) -> dict:
    """'{module}.processor' -> attention module, named as diffusers' `attn_processors` names them.

    Walks the modules itself because not every diffusers model (UNet2DModel among them)
    has `attn_processors`/`set_attn_processor`.
    """
    return {f"{name}.processor": module for name, module in built.named_modules() if hasattr(module, "set_processor")}


def set_attention(recipe: Recipe, built) -> None:
    """Give every attention layer matching [attention] layers a processor from its factory."""
    table, entry = recipe["attention"], recipe.entries["attention"]
    layers = attention_layers(built)
    matched = [name for name in layers if fnmatch(name, table["layers"])]
    if not matched:
        raise DifftoolError(
            f"{recipe.where('attention')} layers = '{table['layers']}' matches no attention layer; "
            f"the model has: {', '.join(layers) or 'none'}"
        )
    kwargs = recipe.kwargs("attention")
    for name in matched:
        layers[name].set_processor(entry.build(kwargs, recipe.where("attention"), model=built, layer=name))


def noise_scheduler(recipe: Recipe):
    """The training (noise) scheduler."""
    return recipe.entries["noise_scheduler"].build(recipe.kwargs("noise_scheduler"), recipe.where("noise_scheduler"))


def sampling_scheduler(recipe: Recipe, training_scheduler):
    """The [sampling] scheduler, inheriting the training scheduler's config."""
    from difftool.sampling import sampling_scheduler as inherit

    return inherit(recipe.entries["sampling"], dict(training_scheduler.config),
                   recipe.kwargs("sampling"), recipe.where("sampling"))


def dataloader(recipe: Recipe):
    """A shuffling DataLoader over the preprocessed dataset."""
    import torch

    from difftool.data import ImageDataset

    table = recipe["dataset"]
    rows = recipe.entries["dataset"].build(recipe.kwargs("dataset"), recipe.where("dataset"))
    if len(rows) == 0:
        raise DifftoolError(f"{recipe.where('dataset')} dataset '{table['name']}' is empty")
    if "image" not in rows[0]:
        raise DifftoolError(
            f"{recipe.where('dataset')} dataset '{table['name']}' rows have no 'image' column "
            f"(they have {list(rows[0])})"
        )
    workers = table["num_workers"]
    return torch.utils.data.DataLoader(
        ImageDataset(rows, table["image_size"], table["random_flip"]),
        batch_size=table["batch_size"], shuffle=True, num_workers=workers,
        persistent_workers=workers > 0,
    )


def optimizer(recipe: Recipe, built):
    """The optimizer over trainable parameters, split into the recipe's param_groups."""
    trainable = [(n, p) for n, p in built.named_parameters() if p.requires_grad]
    groups, taken = [], set()
    for i, spec in enumerate(recipe["optimizer"]["param_groups"]):
        patterns = [spec["modules"]] if isinstance(spec["modules"], str) else spec["modules"]
        members = [
            (n, p) for n, p in trainable
            if n not in taken and any(fnmatch(n, pat) or fnmatch(n, f"{pat}.*") for pat in patterns)
        ]
        if not members:
            raise DifftoolError(
                f"{recipe.path}: [[optimizer.param_groups]] #{i + 1} modules = {spec['modules']!r} matches "
                f"no trainable parameter; names look like '{trainable[0][0]}'"
            )
        taken.update(n for n, _ in members)
        groups.append({**{k: v for k, v in spec.items() if k != "modules"}, "params": [p for _, p in members]})
    rest = [p for n, p in trainable if n not in taken]
    if rest:
        groups.append({"params": rest})
    return recipe.entries["optimizer"].build(recipe.kwargs("optimizer"), recipe.where("optimizer"), params=groups)


def lr_schedule(recipe: Recipe, optim, num_training_steps: int):
    """The LR schedule over `num_training_steps` optimizer steps."""
    return recipe.entries["lr_schedule"].build(
        recipe.kwargs("lr_schedule"), recipe.where("lr_schedule"),
        optimizer=optim, num_training_steps=num_training_steps,
    )
