"""The `unet2d` model: diffusers' UNet2DModel from keyword arguments or a local folder."""

import inspect
from pathlib import Path

from diffusers import UNet2DModel

from difftool.errors import DifftoolError, hub_unreachable


def unet2d(pretrained: str | None = None, **config):
    """A new UNet2DModel(**config), or the one saved at `pretrained` (a run or model folder)."""
    if pretrained is None:
        return UNet2DModel(**config)
    if config:
        raise DifftoolError(
            f"[model] `pretrained` loads the saved architecture, so {sorted(config)} cannot be "
            "set beside it; remove those keys"
        )
    path = Path(pretrained).expanduser()
    if (path / "unet" / "config.json").is_file():
        return UNet2DModel.from_pretrained(path, subfolder="unet")
    if (path / "config.json").is_file():
        return UNet2DModel.from_pretrained(path)
    if path.exists() or pretrained.count("/") != 1:
        raise DifftoolError(
            f"[model] pretrained = '{pretrained}' is not a saved UNet: expected "
            f"{path}/unet/config.json (a difftool run) or {path}/config.json (a model folder)"
        )
    try:  # a hub id: a pipeline repo keeps its UNet in unet/, a model repo at the top
        return UNet2DModel.from_pretrained(pretrained, subfolder="unet")
    except OSError:
        try:
            return UNet2DModel.from_pretrained(pretrained)
        except OSError as exc:
            raise hub_unreachable(f"the model '{pretrained}'", exc) from exc


# Expose UNet2DModel's own parameters so recipe keys are checked against them.
unet2d.__signature__ = inspect.Signature(
    [inspect.Parameter("pretrained", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
       for n, p in inspect.signature(UNet2DModel).parameters.items() if n != "self"]
)
