"""The plugin manager: built-ins and entry-point plugins, loaded once, lazily, failures kept.

`DIFFTOOL_LOAD_PLUGINS` (a comma-separated list of entry-point names, or empty for none)
picks which third-party plugins load, so a broken one can always be worked around.
"""

from __future__ import annotations

import functools
import os
import traceback
from dataclasses import dataclass
from importlib import metadata

import pluggy

from difftool import __version__, hookspecs
from difftool.errors import DifftoolError
from difftool.registry import BUILTIN_PLUGIN, KINDS, Entry, Registry

ENTRY_POINT_GROUP = "difftool"


@dataclass
class Failure:
    """A plugin that could not be imported or could not register its components."""

    plugin: str
    stage: str
    error: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, dropping the built registries whenever plugins change."""

    def register(self, plugin, name=None):
        registered = super().register(plugin, name)
        registries.cache_clear()
        return registered

    def unregister(self, plugin=None, name=None):
        removed = super().unregister(plugin, name)
        registries.cache_clear()
        return removed


pm = PluginManager("difftool")
pm.add_hookspecs(hookspecs)
failures: list[Failure] = []
versions: dict[str, str] = {BUILTIN_PLUGIN: __version__}  # plugin name -> package version


@functools.cache
def load_plugins() -> None:
    """Register the built-ins and the entry-point plugins, once."""
    from difftool import builtins

    pm.register(builtins, name=BUILTIN_PLUGIN)
    load_entry_points()


def load_entry_points() -> None:
    """Register every entry point in the `difftool` group; record, never raise, failures."""
    wanted = os.environ.get("DIFFTOOL_LOAD_PLUGINS")
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (allowed is not None and ep.name not in allowed) or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            failures.append(Failure(ep.name, "import", f"{type(exc).__name__}: {exc}"))
            continue
        if ep.dist is not None:
            versions[ep.name] = ep.dist.version


@functools.cache
def registries() -> dict[str, Registry]:
    """Every kind's registry, built by calling each plugin's `register_<kind>` hook."""
    load_plugins()
    failures[:] = [f for f in failures if f.stage == "import"]
    built = {kind: Registry(kind) for kind in KINDS}
    for kind, registry in built.items():
        for impl in getattr(pm.hook, f"register_{kind}").get_hookimpls():

            def register(name, factory, description=None, _plugin=impl.plugin_name, _kind=kind):
                registry.add(Entry(_kind, name, factory, (description or "").strip(), _plugin))

            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:
                failures.append(Failure(impl.plugin_name, f"register_{kind}", f"{type(exc).__name__}: {exc}"))
    return built


def registry(kind: str) -> Registry:
    """The registry of one kind (models, schedulers, ...)."""
    return registries()[kind]


def plugin_version(name: str) -> str:
    """The installed version of a plugin's package, or '' for in-process plugins."""
    if name in versions:
        return versions[name]
    return str(getattr(pm.get_plugin(name), "__version__", ""))


class HookFailed(DifftoolError):
    """A plugin's training hook raised."""


def call(hook: str, **kwargs) -> None:
    """Call the training hook `hook` of every plugin. One that raises is named: its error becomes
    a HookFailed (a DifftoolError from the plugin itself goes on as it is)."""
    caller = getattr(pm.hook, hook)
    try:
        caller(**kwargs)
    except DifftoolError:
        raise
    except Exception as exc:
        raise HookFailed(
            f"plugin '{culprit(caller, exc)}' failed in its {hook} hook ({type(exc).__name__}: {exc}); "
            "update or fix that plugin, or leave it out with DIFFTOOL_LOAD_PLUGINS (a comma-separated "
            "list of the plugins to load)"
        ) from exc


def culprit(caller, exc: BaseException) -> str:
    """The plugin whose implementation of the hook `caller` raised `exc` (the innermost one on the
    traceback), found by the code objects of the implementations."""
    plugins = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
    named = [plugins[frame.f_code] for frame, _ in traceback.walk_tb(exc.__traceback__) if frame.f_code in plugins]
    return named[-1] if named else "(unknown)"
