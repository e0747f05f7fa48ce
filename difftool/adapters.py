"""Adapters: the contract an adapter factory fulfils, and how adapted runs save and reload them.

An adapter factory adds trainable weights to the model in place (freezing what should stay
frozen) and returns an `Adapter`, which knows how to save, reload and fuse those weights.
An adapted run saves only the adapters, each in `adapters/{index}-{name}/`, and then
`adapters.json` (its finished marker); the frozen base is the one its recipe names
(difftool.runs rebuilds it to load a finished run).
"""

from __future__ import annotations

import json
from pathlib import Path

from difftool.errors import DifftoolError

MARKER = "adapters.json"
WEIGHTS = "adapter_weights.safetensors"


def trainable_state(model) -> dict:
    """The model's trainable weights by name, on the CPU, ready for safetensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Adapter:
    """What an adapter factory returns. The defaults save and reload the model's trainable
    parameters, which suits one adapter per model; subclasses give their own file layout,
    and `fuse` where the adapter can be merged into the base weights."""

    def save(self, model, folder: Path) -> None:
        """Write this adapter's weights into the (existing, empty) `folder`."""
        from safetensors.torch import save_file

        save_file(trainable_state(model), str(folder / WEIGHTS))

    def load(self, model, folder: Path) -> None:
        """Load weights that `save` wrote into a model that this adapter's factory just adapted."""
        from safetensors.torch import load_file

        state = load_file(str(folder / WEIGHTS))
        expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        if {n: value.shape for n, value in state.items()} != expected:
            raise DifftoolError(f"{folder} does not hold this adapter's weights (it has {len(state)} tensors, "
                                f"the adapted model {len(expected)} trainable ones); was it saved by another recipe?")
        model.load_state_dict(state, strict=False)

    def fuse(self, model):
        """The model with this adapter merged into its base weights: a plain model that loads
        without the plugin. The model passed in may be changed. Optional. It is also called on
        a copy of each text encoder `text_encoders` names, for the fused pipeline."""
        raise NotImplementedError

    def text_encoders(self) -> dict:
        """{pipeline name ("text_encoder", "text_encoder_2"): module} of the text encoders this
        adapter adapted too (those of its factory's `text_encoders` context it put weights on);
        its `save` and `load` cover them, with the denoiser they are given. None by default."""
        return {}


def check_fusable(adapters: list[Adapter], recipe) -> None:
    """Refuse run.fuse_adapters before training when an adapter has no `fuse`."""
    for adapter, table in zip(adapters, recipe["adapters"]):
        if type(adapter).fuse is Adapter.fuse:
            raise DifftoolError(f"{recipe.where('run')} fuse_adapters = true, but adapter '{table['name']}' "
                                "cannot be fused into the model; set fuse_adapters = false")


def folders(recipe) -> list[str]:
    """The folder of each [[adapters]] entry inside a run: adapters/{index}-{name}."""
    return [f"adapters/{i}-{table['name'].replace(':', '-')}" for i, table in enumerate(recipe["adapters"])]


def save(adapters: list[Adapter], model, recipe, folder: Path) -> None:
    """Save every adapter's weights under `folder`, then the marker listing them."""
    names = folders(recipe)
    for adapter, name in zip(adapters, names):
        (folder / name).mkdir(parents=True)
        adapter.save(model, folder / name)
    pretrained = recipe["model"].get("pretrained")
    local = pretrained is not None and Path(pretrained).expanduser().exists()
    listing = {"base_model": recipe["model"], "adapters": names,
               "base_model_folder": str(Path(pretrained).expanduser().resolve()) if local else None}
    (folder / MARKER).write_text(json.dumps(listing, indent=2) + "\n")


def load(adapters: list[Adapter], model, recipe, run_dir: Path) -> None:
    """Load a finished adapted run's weights into `model`, freshly adapted from its recipe."""
    from difftool.integrity import damaged_output, weights_problem

    for adapter, name in zip(adapters, folders(recipe)):
        if not (run_dir / name).is_dir():
            raise DifftoolError(f"{run_dir} has no {name}/; its adapters were not saved completely")
        try:
            adapter.load(model, run_dir / name)
        except DifftoolError:
            raise
        except Exception as exc:
            problem = weights_problem(run_dir / name) or f"{type(exc).__name__}: {str(exc)[:300]}"
            raise damaged_output(run_dir / name, f"the adapter could not be loaded: {problem}") from exc


def fused(adapters: list[Adapter], model):
    """A copy of `model` with every adapter merged in (the last added first)."""
    import copy

    merged = copy.deepcopy(model)
    for adapter in reversed(adapters):
        merged = adapter.fuse(merged)
    return merged


def fused_text_encoders(adapters: list[Adapter]) -> dict:
    """{pipeline name: a copy of that text encoder with every adapter on it merged in (the last
    added first)} for the text encoders the adapters adapted; {} when none did. Copies, so
    that training goes on with the adapters in place after a save."""
    import copy

    merged = {}
    for adapter in reversed(adapters):
        for name, encoder in adapter.text_encoders().items():
            merged[name] = adapter.fuse(merged[name] if name in merged else copy.deepcopy(encoder))
    return merged
