"""What each kind's factory must return (as difftool/hookspecs.py says), checked as soon as it
returns, so that a plugin's mistake is named when it is built rather than met mid-training.

The checks are duck-typed where they can be, so third-party classes pass: a scheduler needs
only the attributes the engine uses, not a diffusers base class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from difftool.errors import DifftoolError

# Each check returns None when the value fits, else what is wrong with it ("" when the promise
# says it all).


def module(value: Any) -> str | None:
    import torch

    return None if isinstance(value, torch.nn.Module) else ""


def attributes(*names: str) -> Callable[[Any], str | None]:
    """A check that a value has every one of `names`."""

    def check(value: Any) -> str | None:
        missing = [n for n in names if not hasattr(value, n)]
        if not missing:
            return None
        return "" if len(missing) == len(names) else f"it has no {', '.join(missing)}"

    return check


def sequence(value: Any) -> str | None:
    if isinstance(value, (str, bytes, Mapping)):  # len() and [] too, but not a sequence of rows
        return ""
    return attributes("__len__", "__getitem__")(value)


def callable_(value: Any) -> str | None:
    return None if callable(value) else ""


def optional_callable(value: Any) -> str | None:
    return None if value is None else callable_(value)


def adapter(value: Any) -> str | None:
    from difftool.adapters import Adapter  # a light module: it imports torch only inside functions

    return None if isinstance(value, Adapter) else ""


# kind -> (what its factory returns, the check)
CONTRACTS: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "models": ("a torch.nn.Module (e.g. a diffusers model)", module),
    "schedulers": ("a diffusers scheduler (with config, set_timesteps and step)",
                   attributes("config", "set_timesteps", "step")),
    "datasets": ("a map-style dataset (len() and [i] giving rows, e.g. a datasets.Dataset)", sequence),
    "lr_schedules": ("a torch LR scheduler (with step, state_dict, load_state_dict and get_last_lr)",
                     attributes("step", "state_dict", "load_state_dict", "get_last_lr")),
    "optimizers": ("a torch optimizer (with step, zero_grad, state_dict, load_state_dict and param_groups)",
                   attributes("step", "zero_grad", "state_dict", "load_state_dict", "param_groups")),
    "attention_processors": ("an attention processor (a callable that Attention.set_processor takes)", callable_),
    "adapters": ("a difftool.adapters.Adapter", adapter),
    "loss_weightings": ("a callable (times, objective) -> weights, or None",
                        optional_callable),
    "timestep_samplers": ("a callable (batch_size, num_train_timesteps, device) -> timesteps", callable_),
    "objectives": ("a difftool.objective.Objective (with noisy, target, snr, model_time, times and compute_loss)",
                   attributes("noisy", "target", "snr", "model_time", "times", "fixed_times", "add_noise",
                              "compute_loss", "check_scheduler", "continuous", "prediction_type")),
    "metrics": ("a metric (with update_reference, reference_state, load_reference_state, update, compute "
                "and reset; see difftool.metrics.Metric)",
                attributes("update_reference", "reference_state", "load_reference_state", "update", "compute", "reset")),
}


def describe(value: Any) -> str:
    """What a factory returned, for messages: its type's name, and a short repr of a plain value."""
    if value is None:
        return "None"
    name = type(value).__qualname__
    if isinstance(value, (str, bytes, int, float, list, tuple, dict)):
        text = repr(value)
        return f"{name} {text if len(text) <= 40 else text[:36] + ' ...'}"
    return name


def check(kind: str, value: Any, *, noun: str, name: str, plugin: str, where: str) -> None:
    """Raise if `value`, what a `kind` factory returned, is not what that kind promises."""
    promise, test = CONTRACTS[kind]
    problem = test(value)
    if problem is not None:
        raise DifftoolError(
            f"{where}: {noun} '{name}' (plugin '{plugin}') returned {describe(value)}, not {promise}"
            f"{f': {problem}' if problem else ''}; update the plugin, or report this to its authors"
        )
