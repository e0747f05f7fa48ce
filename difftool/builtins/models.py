"""The built-in pixel-space denoiser `unet2d` (diffusers' UNet2DModel), new from keyword
arguments or loaded from a local folder, and what it shares with `dit` (difftool.builtins.dit).

Both take the engine's context: `image_size` (the recipe's [dataset] image_size) and
`num_classes` (the classes of a class-conditional run, None for an unconditional one). A
class-conditional model takes `class_labels` (int64, one per sample), where label `num_classes`
is the null class of classifier-free guidance. Every model returned has `size_multiple`, the int
image sizes must be divisible by.
"""

import inspect
import json
from pathlib import Path

from diffusers import UNet2DModel

from difftool.errors import DifftoolError, hub_unreachable

MODEL_NAMES = {"UNet2DModel": "unet2d", "DiTTransformer2DModel": "dit"}  # saved class -> our name

def load_saved(cls, pretrained: str, config: dict, what: str):
    """The `cls` model saved at `pretrained`: a difftool run folder (its denoiser in unet/), a
    model folder (config.json at the top) or a hub id; `what` names it in messages."""
    if config:
        raise DifftoolError(
            f"[model] `pretrained` loads the saved architecture, so {sorted(config)} cannot be "
            "set beside it; remove those keys"
        )
    path = Path(pretrained).expanduser()
    for folder, options in ((path / "unet", {"subfolder": "unet"}), (path, {})):
        if (folder / "config.json").is_file():
            check_saved_class(cls, pretrained, folder / "config.json")
            return cls.from_pretrained(path, **options)
    if path.exists() or pretrained.count("/") != 1:
        raise DifftoolError(
            f"[model] pretrained = '{pretrained}' is not a saved {what}: expected "
            f"{path}/unet/config.json (a difftool run) or {path}/config.json (a model folder)"
        )
    try:  # a hub id: a pipeline repo keeps its denoiser in unet/, a model repo at the top
        return cls.from_pretrained(pretrained, subfolder="unet")
    except OSError:
        try:
            return cls.from_pretrained(pretrained)
        except OSError as exc:
            raise hub_unreachable(f"the model '{pretrained}'", exc) from exc


def check_saved_class(cls, pretrained: str, config_file: Path) -> None:
    """Refuse a saved model of another class than `cls`: diffusers would try to build a `cls`
    from the other model's settings, and fail obscurely or load unmatched weights."""
    try:
        saved = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # let from_pretrained say what is wrong with it
    if saved and saved != cls.__name__:
        hint = f"; use name = '{MODEL_NAMES[saved]}'" if saved in MODEL_NAMES else ""
        raise DifftoolError(f"[model] pretrained = '{pretrained}' holds a {saved}, not a {cls.__name__}{hint}")


def signature(cls, **defaults) -> inspect.Signature:
    """`pretrained`, then `cls`'s own parameters (with `defaults` replacing its defaults), then the
    context, all keyword-only: recipe keys are checked against it, and the registry passes the
    context names it lists."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=keyword, default=defaults.get(n, p.default))
           for n, p in inspect.signature(cls).parameters.items() if n != "self"]
    return inspect.Signature(
        [inspect.Parameter("pretrained", keyword, default=None), *own]
        + [inspect.Parameter(n, keyword, default=None) for n in ("image_size", "num_classes")]
    )


def unet2d(pretrained: str | None = None, *, image_size: int | None = None, num_classes: int | None = None, **config):
    """A new UNet2DModel(**config), or the one saved at `pretrained` (a run or model folder).

    A new one's `sample_size` defaults to `image_size`; in a class-conditional run it gets
    `num_class_embeds = num_classes + 1` (the last row for the null class) unless the recipe
    sets `num_class_embeds` or `class_embed_type` itself.
    """
    if pretrained is None:
        if image_size is not None:
            config.setdefault("sample_size", image_size)
        if num_classes is not None and config.get("num_class_embeds") is None and config.get("class_embed_type") is None:
            config["num_class_embeds"] = num_classes + 1
        check_unet_classes(config.get("num_class_embeds"), config.get("class_embed_type"), num_classes)
        model = UNet2DModel(**config)
    else:
        model = load_saved(UNet2DModel, pretrained, config, "UNet")
        check_unet_classes(model.config.num_class_embeds, model.config.class_embed_type, num_classes, pretrained)
    model.size_multiple = 2 ** max(len(model.config.down_block_types) - 1, 0)
    return model


def check_unet_classes(embeds: int | None, embed_type: str | None, num_classes: int | None,
                       pretrained: str | None = None) -> None:
    """A UNet's class embedding (`num_class_embeds` rows, or a `class_embed_type`) must hold
    `num_classes` classes and the null class, and a class-conditional UNet needs a
    class-conditional run; `pretrained` names a saved UNet in messages."""
    key = "num_class_embeds" if embed_type is None else "class_embed_type"
    setting = f"{key} = {embeds if embed_type is None else repr(embed_type)}"
    saved = f"[model] pretrained = '{pretrained}'"
    if num_classes is None:
        if embeds is not None or embed_type is not None:
            raise DifftoolError(
                f"{saved} is a class-conditional UNet ({setting}), which needs labelled data: set [dataset] label_column"
                if pretrained else
                f"[model] {setting} makes a class-conditional UNet, which needs labelled data: set [dataset] "
                f"label_column, or remove {key}"
            )
    elif embed_type is None and embeds is None:  # only a saved UNet: a new one gets num_class_embeds
        raise DifftoolError(f"{saved} is an unconditional UNet (no num_class_embeds), so it cannot take the "
                            f"{num_classes} classes of [dataset] label_column; remove label_column")
    elif embed_type is None and embeds < num_classes + 1:
        raise DifftoolError(
            f"{saved if pretrained else '[model]'} num_class_embeds = {embeds} is too few for {num_classes} classes "
            f"and the null class (label {num_classes}, classifier-free guidance's unconditional case): it must be "
            f"at least {num_classes + 1}" + ("" if pretrained else "; remove it to get that")
        )


# Expose the models' own parameters so recipe keys are checked against them.
unet2d.__signature__ = signature(UNet2DModel)
