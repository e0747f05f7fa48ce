"""Defer the package-wide imports of two diffusers packages until something asks for them.

`diffusers.models.unets` and `diffusers.models.transformers` each import every model of their
kind in their `__init__`. Importing one UNet therefore imports every UNet and every transformer,
and with them peft, scipy and most of transformers: about 4 of the 11 s that the quickstart took
here to reach its first step. diffusers has no switch for this (its top-level package is lazy,
these two are not).

`install()` puts a finder on `sys.meta_path` that hands those two packages out with their
`__init__` not yet run: their submodules import as usual (`diffusers.models.unets.unet_2d`), and
the first attribute looked up on the package itself (`from diffusers.models.unets import
UNet2DConditionModel`) runs the real `__init__` and answers from it. Nothing is hidden or
replaced: every name the packages define is there once asked for, and a package imported before
`install()` is left as it is. `DIFFTOOL_DEFER_IMPORTS=0` turns it off.
"""

import importlib.abc
import os
import sys

PACKAGES = ("diffusers.models.unets", "diffusers.models.transformers", "diffusers.hooks", "scipy.stats")


class _DeferredInit(importlib.abc.Loader):
    """Wraps a package's loader: its module is created, and its `__init__` runs on first lookup."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        def run_init(name):
            del module.__dict__["__getattr__"]  # the real __init__ may define its own
            self.loader.exec_module(module)
            return getattr(module, name)

        module.__getattr__ = run_init

    def __getattr__(self, name):  # resource readers, is_package, ... from the real loader
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PACKAGES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and spec.submodule_search_locations is not None:
                    spec.loader = _DeferredInit(spec.loader)
                return spec
        return None


def install() -> None:
    """Defer the two packages' `__init__` in this process (idempotent; imports nothing)."""
    if os.environ.get("DIFFTOOL_DEFER_IMPORTS", "1") == "0":
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
