"""difftool: train diffusion models from TOML recipes, with components resolved from plugins."""

from difftool.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
