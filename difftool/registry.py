"""Named component registries: lookup with did-you-mean, signature checks, building."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from difftool import contracts
from difftool.errors import DifftoolError

BUILTIN_PLUGIN = "difftool"

# kind -> (singular noun for messages, context arguments the engine passes to factories)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "models": ("model", ("image_size", "num_classes")),
    "schedulers": ("scheduler", ()),
    "datasets": ("dataset", ("generate_images",)),
    "lr_schedules": ("LR schedule", ("optimizer", "num_training_steps")),
    "optimizers": ("optimizer", ("params",)),
    "attention_processors": ("attention processor", ("model", "layer")),
    "adapters": ("adapter", ("model", "text_encoders")),
    "loss_weightings": ("loss weighting", ()),
    "timestep_samplers": ("timestep sampler", ()),
    "metrics": ("metric", ("device",)),
    "objectives": ("objective", ("noise_scheduler", "image_size")),
}


def suggest(word: str, choices) -> str:
    """'; did you mean 'x'?' for the closest choices, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""


@dataclass
class Entry:
    """One registered component: a factory (or a lazy "module:attr" string) and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any] | str
    description: str
    plugin: str

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    def load(self) -> Callable[..., Any]:
        """The factory itself, importing a lazy one on first use."""
        if isinstance(self.factory, str):
            module_name, _, attr = self.factory.partition(":")
            try:
                self.factory = getattr(importlib.import_module(module_name), attr)
            except Exception as exc:
                raise DifftoolError(
                    f"{KINDS[self.kind][0]} '{self.name}' from plugin '{self.plugin}' points at "
                    f"'{self.factory}', which cannot be imported ({type(exc).__name__}: {exc}); "
                    f"reinstall or update that plugin"
                ) from exc
        return self.factory

    def parameters(self) -> tuple[dict[str, inspect.Parameter], bool]:
        """The factory's keyword parameters, and whether it takes **kwargs."""
        params = inspect.signature(self.load()).parameters
        named = {
            n: p for n, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
        }
        return named, any(p.kind is p.VAR_KEYWORD for p in params.values())

    def check(self, keys, where: str, also=()) -> None:
        """Raise if a recipe key is not a parameter of the factory, or a required one is missing.

        `also`: other keys valid in the same table, offered as suggestions too.
        """
        params, open_ended = self.parameters()
        context = KINDS[self.kind][1]
        settable = [n for n in params if n not in context]
        problems = []
        if not open_ended:
            for key in keys:
                if key not in settable:
                    problems.append(f"unknown key '{key}'{suggest(key, [*settable, *also])}")
        for name in settable:
            if params[name].default is inspect.Parameter.empty and name not in keys:
                problems.append(f"missing required key '{name}'")
        if problems:
            accepted = ", ".join(settable) or "no keys"
            raise DifftoolError(
                f"{where}: {KINDS[self.kind][0]} '{self.name}' {'; '.join(problems)} "
                f"(it accepts: {accepted})"
            )

    def build(self, kwargs: dict[str, Any], where: str, **context: Any) -> Any:
        """Call the factory with the recipe's kwargs plus the context arguments it accepts;
        what it returns must keep its kind's contract (difftool.contracts)."""
        params, open_ended = self.parameters()
        given = {k: v for k, v in context.items() if open_ended or k in params}
        try:
            built = self.load()(**kwargs, **given)
        except DifftoolError:
            raise
        except Exception as exc:
            raise DifftoolError(
                f"{where}: {KINDS[self.kind][0]} '{self.name}' (plugin '{self.plugin}') "
                f"could not be built: {type(exc).__name__}: {exc}"
            ) from exc
        contracts.check(self.kind, built, noun=KINDS[self.kind][0], name=self.name, plugin=self.plugin, where=where)
        return built


@dataclass
class Registry:
    """All components of one kind. Bare names resolve unless two plugins claim them."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)  # qualified name -> entry
    by_name: dict[str, list[Entry]] = field(default_factory=dict)  # bare name -> claimants

    def add(self, entry: Entry) -> None:
        self.entries[entry.qualified_name] = entry
        claimants = self.by_name.setdefault(entry.name, [])
        claimants.append(entry)
        # built-ins keep their bare names: sort them first
        claimants.sort(key=lambda e: e.plugin != BUILTIN_PLUGIN)

    def clashes(self) -> list[list[Entry]]:
        """Names claimed by more than one plugin."""
        return [c for c in self.by_name.values() if len(c) > 1]

    def visible(self) -> list[tuple[str, Entry]]:
        """(name to write in a recipe, entry) for every entry, sorted by name."""
        rows = []
        for name, claimants in self.by_name.items():
            for entry in claimants:
                unique = len(claimants) == 1 or (entry is claimants[0] and entry.plugin == BUILTIN_PLUGIN)
                rows.append((name if unique else entry.qualified_name, entry))
        return sorted(rows, key=lambda row: row[0])

    def get(self, name: str) -> Entry:
        noun = KINDS[self.kind][0]
        if name in self.entries:
            return self.entries[name]
        claimants = self.by_name.get(name, [])
        if len(claimants) == 1 or (claimants and claimants[0].plugin == BUILTIN_PLUGIN):
            return claimants[0]
        if claimants:
            options = " or ".join(f"'{e.qualified_name}'" for e in claimants)
            plugins = " and ".join(f"'{e.plugin}'" for e in claimants)
            raise DifftoolError(f"{noun} '{name}' is registered by both plugins {plugins}; write {options}")
        names = [n for n, _ in self.visible()]
        raise DifftoolError(
            f"unknown {noun} '{name}'{suggest(name, names)} "
            f"(run `difftool list {self.kind}` to see the {len(names)} available; a plugin package "
            "may add it: pip install it, then `difftool plugins` lists what it gives)"
        )
