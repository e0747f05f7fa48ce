"""The plugin contract: one hook per component kind, each given a `register` callback.

A plugin implements any of these with `@difftool.hookimpl` and calls
`register(name, factory, description=None)` once per component. `factory` is a callable,
or a lazy "package.module:attribute" string imported on first use (keeps `difftool list`
fast). The engine calls the factory with the keys of the recipe table that named it
(minus `name`) as keyword arguments, plus the context listed for its kind; a factory
may leave out context arguments it does not need.
"""

import pluggy

hookspec = pluggy.HookspecMarker("difftool")
hookimpl = pluggy.HookimplMarker("difftool")


@hookspec
def register_models(register):
    """Register models. Factory context: none. Returns a diffusers model (`nn.Module`)."""


@hookspec
def register_schedulers(register):
    """Register noise schedulers. Factory context: none. Returns a diffusers scheduler.

    For sampling, the factory is also called with the training scheduler's config keys
    that its signature accepts (as diffusers' `from_config` does).
    """


@hookspec
def register_datasets(register):
    """Register datasets. Factory context: none.

    Returns a `datasets.Dataset` or a map-style sequence whose rows have an `image`
    column of PIL images; the engine resizes, flips and normalises them.
    """


@hookspec
def register_lr_schedules(register):
    """Register LR schedules. Factory context: `optimizer`, `num_training_steps`
    (optimizer steps). Returns a torch LR scheduler, stepped once per optimizer step."""


@hookspec
def register_optimizers(register):
    """Register optimizers. Factory context: `params` (parameter groups). Returns a torch
    optimizer; recipe keys other than `param_groups` are its keyword arguments."""


@hookspec
def register_attention_processors(register):
    """Register attention processors. Factory context: `model`, `layer` (the layer's name,
    e.g. "mid_block.attentions.0.processor"); called once per matched layer. Returns a
    processor that diffusers' `Attention.set_processor` accepts."""


@hookspec
def register_adapters(register):
    """Register adapters. Factory context: `model`. Adds trainable weights to the model
    (e.g. `model.add_adapter(...)`), freezes what should stay frozen, returns the model."""
