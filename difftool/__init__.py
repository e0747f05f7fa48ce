"""difftool: train diffusion models from TOML recipes, with components resolved from plugins."""

from difftool import deferred
from difftool.hookspecs import hookimpl

deferred.install()  # diffusers' UNet and transformer packages run their __init__ only when asked

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
