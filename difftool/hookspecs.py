"""The plugin contract: one hook per component kind, each given a `register` callback, and
training hooks that observe or extend a run.

A plugin implements any of these with `@difftool.hookimpl`. In a registration hook it calls
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
    """Register models. Factory context: `image_size` (the recipe's [dataset] image_size) and
    `num_classes` (the classes of a class-conditional run, None for an unconditional one).

    Returns a diffusers model (`nn.Module`) called as `model(sample, timestep, return_dict=False,
    **conditioning)`; a class-conditional one takes `class_labels` (int64, one per sample, where
    `num_classes` is the null class of classifier-free guidance). Optional attribute:
    `size_multiple` (an int image sizes must be divisible by; default 1). Optional method:
    `enable_gradient_checkpointing()` (diffusers' models have it), which `[run]
    gradient_checkpointing = true` needs.
    """


@hookspec
def register_schedulers(register):
    """Register noise schedulers. Factory context: none. Returns a diffusers scheduler.

    For sampling, the factory is also called with the training scheduler's config keys
    that its signature accepts (as diffusers' `from_config` does).
    """


@hookspec
def register_datasets(register):
    """Register datasets. Factory context: `generate_images`, a callable (prompt, count,
    folder) that makes `folder` hold at least `count` images of `prompt`, generating the missing
    ones with the recipe's base text-to-image model and its [sampling] settings (only the main
    process generates; every process must call it, the others wait); its
    `folder_for(prompt)` is a folder under difftool's cache for that model and prompt. The
    `dreambooth` dataset uses it for prior preservation's class images.

    Returns a `datasets.Dataset` or a map-style sequence whose rows have an `image`
    column of PIL images; the engine resizes, flips and normalises them. A row's optional
    `loss_weight` (a number >= 0) multiplies its loss in training and validation.
    """


@hookspec
def register_lr_schedules(register):
    """Register LR schedules. Factory context: `optimizer`, `num_training_steps`
    (optimizer steps). Returns a torch LR scheduler, stepped once per optimizer step."""


@hookspec
def register_optimizers(register):
    """Register optimizers. Factory context: `params` (parameter groups). Returns a torch
    optimizer; recipe keys other than `param_groups` are its keyword arguments.

    An optimizer with `train()` and `eval()` methods (a schedule-free one keeps other weights for
    evaluation than for training) is returned in train mode, and the engine calls `train()` again
    before the first step. The engine switches it to eval mode
    for sampling, validation, evaluation and saving the output model (the EMA weights, if on, go
    over the eval weights), then back to train mode, restoring the training weights bit for bit
    (difftool.engine.optimizer_eval_mode). Checkpoints are saved in train mode, so the model and
    optimizer state in them are those training goes on from, and resuming is exact.
    """


@hookspec
def register_attention_processors(register):
    """Register attention processors. Factory context: `model`, `layer` (the layer's name,
    e.g. "mid_block.attentions.0.processor"); called once per matched layer. Returns a
    processor that diffusers' `Attention.set_processor` accepts."""


@hookspec
def register_adapters(register):
    """Register adapters. Factory context: `model` (the denoiser), `text_encoders` (a
    text-to-image model's CLIP text encoders by pipeline name, "text_encoder" and, for SDXL and
    SD3, "text_encoder_2"; {} for a pixel model). Adds trainable weights to the model (and to
    any text encoder it adapts) in place (e.g. `model.add_adapter(...)`), freezes what should
    stay frozen, and returns a `difftool.adapters.Adapter` that saves, reloads and (optionally)
    fuses those weights, naming the text encoders it adapted in `text_encoders()`."""


@hookspec
def register_objectives(register):
    """Register training objectives. Factory context: `noise_scheduler`, `image_size`.

    Returns a `difftool.objective.Objective`: the forward process (how clean data and noise
    mix at a time value), the training target, the time value the model is given, and whether
    times are integer indices or a continuous t in [0, 1]. The factory (or the class it is) may
    carry a `scheduler` attribute: the noise scheduler a recipe gets when it names none.
    """


@hookspec
def register_loss_weightings(register):
    """Register loss weightings. Factory context: none. Returns a callable
    `(times, objective) -> weights` giving one weight per sample (a tensor of shape (batch,)),
    or None for equal weights. `objective` offers `snr(times)`, `prediction_type` and
    `num_train_timesteps`; a weighting that does not fit an objective raises DifftoolError
    saying so (difftool calls it once before training, so the message comes at once)."""


@hookspec
def register_timestep_samplers(register):
    """Register timestep samplers. Factory context: none. Returns a callable
    `(batch_size, num_train_timesteps, device) -> times`, drawn with torch's global RNG (so
    resumed runs draw the same ones): int64 indices in [0, num_train_timesteps), or, when
    num_train_timesteps is None (a continuous objective such as flow matching), float t in
    [0, 1]."""


@hookspec
def register_metrics(register):
    """Register sample-quality metrics. Factory context: `device` (where to compute, e.g.
    the accelerator's). Returns a `difftool.metrics.Metric`: it takes reference and generated
    images in batches (uint8 tensors (N, 3, H, W)), keeps statistics rather than images, can
    save and restore its reference statistics (cached on disk by difftool), and computes a
    dict of named floats. Recipe keys ([evaluation.NAME]) are its keyword arguments."""


# Training hooks. `state` is a difftool.state.TrainState: accelerator, model, optimizer,
# lr_schedule, recipe, output_dir, global_step, epoch, loss (the last optimizer step's), ...
# They run in every process; check `state.accelerator.is_main_process` before writing files.
# A hook that raises stops the run with a message naming its plugin (difftool.plugins.call).
# What every registration hook's factory returns is checked when it is built (difftool.contracts).


@hookspec
def on_train_start(state):
    """Called once the components are built (and a checkpoint restored), before the first step."""


@hookspec
def on_step_end(state):
    """Called after every optimizer step, with `state.loss` and `state.global_step` updated."""


@hookspec
def on_checkpoint(state, path):
    """Called after a checkpoint is complete at `path` (a pathlib.Path)."""


@hookspec
def on_samples(state, images):
    """Called in the main process with the list of PIL images of each sample grid."""


@hookspec
def on_train_end(state):
    """Called once after the last step and the final save."""
