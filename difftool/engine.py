"""The training loop: the diffusers tutorial's Accelerate loop, driven by a recipe."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from difftool import (__version__, adapters, build, checkpoints, conditioning, evaluation, files, lock, plugins, sharding,
                      trackers)
from difftool.data import flip_batch, shuffled_tags
from difftool.errors import DifftoolError, Interrupted
from difftool.precision import effective, resolve, tf32
from difftool.recipe import Recipe, dump
from difftool.sampling import generate, grid, text_to_image
from difftool.state import TrainState

console = Console(stderr=True)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # for frozen parts


@dataclass
class Plan:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


@dataclass
class Parts:
    """The recipe's built components that the loop uses besides those in TrainState."""

    noise_scheduler: object
    objective: object  # the difftool.objective.Objective: forward process, target, model time
    sampler: object
    loss_weighting: object
    timestep_sampler: object
    loader: object
    validation: object  # a DataLoader of held-out images, or None
    adapters: list  # the difftool.adapters.Adapter of each [[adapters]] entry
    recipe_text: str  # the resolved recipe with provenance, as written into every checkpoint
    latent: object = None  # the LatentDiffusion model, for text-to-image; else None
    latent_cache: object = None  # its LatentCache, when [dataset] cache is on
    evaluation: object = None  # difftool.evaluation.InTraining when [evaluation] every_n_steps is set
    classes: list | None = None  # the class names of a class-conditional run, else None
    saved_step: int | None = None  # the step of the newest checkpoint saved (or resumed from)
    done: bool = False  # the last epoch's saves are done
    compiled: object = None  # run.compile: torch.compile of the prepared model, for training steps only


def train(recipe: Recipe, force: bool = False) -> Path:
    """Train as the recipe says; returns the output folder holding the saved pipeline."""
    run = recipe["run"]
    output_dir = Path(run["output_dir"])
    resume, notes = checkpoints.resume_path(recipe)
    check_output_dir = functools.partial(files.prepare_output_dir, output_dir, run["overwrite_output_dir"],
                                         resume is not None, recipe.where("run"))
    check_output_dir()  # before anything is built, so a refused run fails at once
    accelerator = make_accelerator(run, output_dir)
    if accelerator.is_main_process:
        for note in notes:
            console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    state = parts = None
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(tf32(run["allow_tf32"]))
            parts, state, plan = prepare(recipe, accelerator)
            if accelerator.is_main_process:
                held.enter_context(lock.hold(output_dir, recipe.where("run")))
                check_output_dir()  # again, now that no other run can write here
                if run["overwrite_output_dir"] and resume is None and (dropped := checkpoints.discard(output_dir)):
                    console.print(f"overwrite_output_dir = true: removed the earlier run's {dropped} checkpoint(s)")
            accelerator.wait_for_everyone()
            if resume is not None:
                checkpoints.check_unchanged(resume, recipe, force)
                checkpoints.load(accelerator, resume)
                parts.saved_step = state.global_step
                if accelerator.is_main_process:
                    checkpoints.prune(output_dir, run["checkpoints_total_limit"])
                    console.print(f"resumed from {resume} at step {state.global_step}")
            if accelerator.is_main_process:
                if not files.finished(output_dir):  # else recipe.toml describes the model there until it is replaced
                    files.write_text(output_dir / files.RECIPE, parts.recipe_text, "the run's recipe")
                accelerator.init_trackers("difftool")
            plugins.call("on_train_start", state=state)
            loop(state, parts, plan)
            parts.done = True
            plugins.call("on_train_end", state=state)
    except KeyboardInterrupt:
        kept = "the last saved pipeline, checkpoints and samples" if files.finished(output_dir) else "the checkpoints and samples saved so far"
        step = state.global_step if state is not None else 0
        raise Interrupted(f"interrupted at step {step}; {output_dir} keeps {kept}, each complete") from None
    except (files.WriteFailed, plugins.HookFailed) as exc:
        if state is not None and parts.done:
            kept = f"The run had finished: {output_dir} holds its model and samples, complete"
        else:
            kept = kept_after_failure(state, output_dir)
        raise DifftoolError(f"{exc}. {kept}") from exc
    except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors, and Python's (PIL's)
        if not out_of_memory(exc):
            raise
        raise DifftoolError(out_of_memory_message(exc, recipe, state, output_dir)) from exc
    finally:
        accelerator.end_training()
    return output_dir


def prepare(recipe: Recipe, accelerator: Accelerator) -> tuple[Parts, TrainState, Plan]:
    """Build every component of the recipe and the run's state, ready to train or resume."""
    run = recipe["run"]
    sharding.configure(recipe, accelerator)  # DeepSpeed's settings from the recipe (make_accelerator refused the rest)
    set_seed(run["seed"])
    train_rows, validation_rows = build.datasets(recipe)  # first: a class-conditional model needs its classes
    classes = build.class_names(recipe, train_rows)
    model = build.model(recipe, num_classes=None if classes is None else len(classes))
    latent = model if build.is_latent(model) else None
    captions = latent is not None
    if captions:
        build.check_captions(recipe, train_rows)
    applied = build.adapters(recipe, model)
    build.gradient_checkpointing(recipe, model)
    model.train()  # a pretrained model loads in eval mode, where an adapter's dropout would not act
    if run["fuse_adapters"]:
        adapters.check_fusable(applied, recipe)
    noise_scheduler = build.noise_scheduler(recipe, model)
    trained = build.objective(recipe, noise_scheduler)  # before the sampling scheduler inherits its config
    parts = Parts(
        noise_scheduler=noise_scheduler,
        objective=trained,
        sampler=build.sampling_scheduler(recipe, noise_scheduler),
        loss_weighting=build.component(recipe, "loss_weighting"),
        timestep_sampler=build.component(recipe, "timestep_sampler"),
        loader=accelerator.prepare(build.dataloader(recipe, train_rows, captions=captions, classes=classes)),
        validation=None if validation_rows is None else build.dataloader(
            recipe, validation_rows, shuffle=False, captions=captions, classes=classes),
        adapters=applied,
        recipe_text=dump(recipe, provenance(recipe)),
        latent=latent,
        classes=classes,
    )
    build.check_guidance(recipe, latent is not None, classes)
    if latent is not None:
        latent.cast_frozen(WEIGHT_DTYPES[effective(accelerator.mixed_precision, accelerator.device.type)])
        parts.latent_cache = build.latent_cache(recipe, latent)
        latent.text_cache = build.text_cache(recipe, latent)  # encode_prompts reads through it
    parts.evaluation = evaluation.in_training(recipe, accelerator.device, latent is not None, noise_scheduler, parts.sampler,
                                              classes)
    schedulers = build.scheduler_roles(model, noise_scheduler, parts.sampler,
                                       parts.evaluation.scheduler if parts.evaluation is not None else None)
    build.check_objective(recipe, trained, schedulers, parts.timestep_sampler, parts.loss_weighting)
    optimizer = build.optimizer(recipe, model)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # one with train and eval modes steps in train mode (hookspecs.register_optimizers)
    plan = make_plan(recipe, len(parts.loader))
    lr_schedule = build.lr_schedule(recipe, optimizer, plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # sampling, validation and saving use the model as it is: in eval mode and without
    # gradients a compiled one would compile again, for a few calls each
    parts.compiled = torch.compile(model) if run["compile"] else None
    ema = build.ema(recipe, accelerator.unwrap_model(model))  # on the device the model is on now
    set_seed(run["seed"], device_specific=True)  # each process its own noise, timesteps and flips
    state = TrainState(recipe, accelerator, model, optimizer, lr_schedule, Path(run["output_dir"]), ema)
    checkpoints.save_only_trainable(accelerator)
    for stateful in (lr_schedule, state, ema):
        if stateful is not None:
            accelerator.register_for_checkpointing(stateful)
    return parts, state, plan


def kept_after_failure(state: TrainState | None, output_dir: Path) -> str:
    """What a run that stopped on a failure keeps, and how to go on from it."""
    found = checkpoints.complete(output_dir)
    step = state.global_step if state is not None else 0
    if found and state is not None and found[-1].name == f"checkpoint-{step}":
        return (f"The run's state at its last step ({step}) is saved in {found[-1]}: once the cause is fixed, "
                "rerun with --set run.resume_from_checkpoint=latest to go on from there without training again")
    model = "; the model saved at an earlier epoch is intact" if files.finished(output_dir) else ""
    if not step and not found:
        return f"Nothing was trained yet{model}"
    if found:
        return (f"The run stopped at step {step}; {found[-1]} (the newest checkpoint) and everything saved before "
                f"it are intact{model}: once the cause is fixed, resume with --set run.resume_from_checkpoint=latest")
    return f"The run stopped at step {step} before saving any checkpoint (run.checkpointing_steps saves them){model}"


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of memory, on a GPU or on the CPU."""
    text = str(exc)
    return (isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", ()))) or "out of memory" in text
            or "DefaultCPUAllocator: can't allocate memory" in text or "not enough memory" in text)


def out_of_memory_message(exc: BaseException, recipe: Recipe, state: TrainState | None, output_dir: Path) -> str:
    """Out of memory, with the sizes that caused it and what to lower."""
    table = recipe["dataset"]
    first_line = str(exc).strip().splitlines()[0][:300]
    where = "before training" if state is None else f"at step {state.global_step + 1}"
    message = (f"out of memory {where} ({first_line}) with dataset.image_size = {table['image_size']} and "
               f"batch_size = {table['batch_size']}: lower image_size or batch_size (gradient_accumulation_steps "
               "keeps the effective batch), or use a smaller model")
    if state is not None and state.global_step:
        message += f". {kept_after_failure(state, output_dir)}"
    return message


def make_accelerator(run: dict, output_dir: Path) -> Accelerator:
    """The Accelerator of the tutorial, with the recipe's precision, accumulation and tracker."""
    from difftool.history import HistoryTracker

    trackers.check_installed(run["log_with"], "[run]")
    # before the Accelerator: on a CPU it would quietly drop an FSDP or DeepSpeed config
    sharding.check_launch()
    precision = resolve(run["mixed_precision"])
    # a second run in one process (tests, notebooks, benchmarks) may want another precision;
    # Accelerate keeps the first unless its state is reset (the process group is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # on a machine without CUDA, accelerate sets up gloo for `accelerate launch
        # --multi_gpu --num_processes N` only when told to use the CPU
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=run["gradient_accumulation_steps"],
        # logs/history.jsonl, whatever the tracker, so that `difftool compare` can read every run
        log_with=[*([] if run["log_with"] == "none" else [run["log_with"]]), HistoryTracker(output_dir)],
        project_dir=str(output_dir / "logs"),
    )
    if accelerator.is_main_process and effective(precision, accelerator.device.type) != precision:
        console.print("[yellow]mixed_precision = 'fp16' needs a GPU; on this CPU the run is fp32 "
                      "(set run.mixed_precision = 'auto' to use bf16 where the CPU runs it natively)[/]")
    elif accelerator.is_main_process and run["mixed_precision"] == "auto":
        console.print(f"mixed_precision = 'auto': {precision} on {accelerator.device.type}")
    return accelerator


def make_plan(recipe: Recipe, batches_per_epoch: int) -> Plan:
    """Optimizer steps per epoch and in all, capped by run.max_steps."""
    run = recipe["run"]
    per_epoch = math.ceil(batches_per_epoch / run["gradient_accumulation_steps"])
    total = per_epoch * run["num_epochs"]
    return Plan(per_epoch, min(total, run["max_steps"] or total))


def loop(state: TrainState, parts: Parts, plan: Plan) -> None:
    """Epochs of steps, from where a checkpoint left off; samples and saves at epoch ends."""
    with progress_bar(state.accelerator) as progress:
        task = progress.add_task("train", total=plan.total_steps, completed=state.global_step,
                                 epoch=state.epoch, loss=state.loss, lr=state.lr_schedule.get_last_lr()[0], speed=0.0)
        while True:
            if state.global_step < plan.total_steps and state.epoch < plan.num_epochs:
                train_epoch(state, parts, plan, lambda speed: progress.update(
                    task, completed=state.global_step, epoch=state.epoch, loss=state.loss,
                    lr=state.lr_schedule.get_last_lr()[0], speed=speed))
            last = state.global_step >= plan.total_steps or state.epoch >= plan.num_epochs - 1
            end_of_epoch(state, parts, last)  # also after resuming a run that has nothing left to do
            if last:
                break
            state.epoch, state.batches_done = state.epoch + 1, 0


def train_epoch(state: TrainState, parts: Parts, plan: Plan, report) -> None:
    """The epoch's remaining batches (a resumed run picks up mid-epoch), until the plan is done."""
    accelerator = state.accelerator
    images_per_step = (state.recipe["dataset"]["batch_size"] * state.recipe["run"]["gradient_accumulation_steps"]
                       * accelerator.num_processes)
    parts.loader.set_epoch(state.epoch)
    batches = parts.loader
    if state.batches_done:
        batches = accelerator.skip_first_batches(parts.loader, state.batches_done)
        batches.set_epoch(state.epoch)
    started, steps = time.perf_counter(), 0
    for batch in batches:
        if not train_step(state, parts, batch):
            continue
        steps += 1
        report(steps * images_per_step / (time.perf_counter() - started))
        after_step(state, parts)
        if state.global_step >= plan.total_steps:
            break


def model_inputs(state: TrainState, parts: Parts, batch: dict, training: bool = True, generator=None):
    """(clean samples, conditioning keywords for the model) of a batch: the images themselves,
    randomly flipped in training; for a latent model, their VAE latents (cached if on) and their
    captions' text embeddings, captions dropped to "" at the caption_dropout rate in training.

    A flip mirrors the image's mask with it (put back into `batch` as "masks", for the loss) and
    its crop's left offset (difftool.data.flip_batch). For SDXL, each image's original size and
    crop offset and the batch's size (its bucket) go to its size and crop ids."""
    table = state.recipe["dataset"]
    images, crops = batch["images"], batch.get("crop_top_lefts")
    if training and table["random_flip"]:
        images, masks, crops = flip_batch(images, batch.get("masks"), crops, batch.get("resized_sizes"))
        if masks is not None:
            batch["masks"] = masks
    latent = parts.latent
    if latent is None:
        labels = batch.get("labels")
        if labels is not None and training:
            labels = conditioning.dropped(labels, table["label_dropout"], len(parts.classes))
        return images, conditioning.model_labels(build.denoiser(state.model), labels, images.shape[0], images.device)
    if parts.latent_cache is not None:
        parameters = parts.latent_cache.encode(images, latent.encode_images)
    else:
        parameters = latent.encode_images(images)
    captions = list(batch["captions"])
    if training and table["shuffle_tags"]:
        captions = [shuffled_tags(caption, table["keep_tags"]) for caption in captions]
    if training and table["caption_dropout"]:
        dropped = (torch.rand(len(captions)) < table["caption_dropout"]).tolist()
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
    return latent.sample_latents(parameters, generator), latent.encode_prompts(
        captions, table["image_size"], batch.get("original_sizes"), crops, tuple(images.shape[-2:]))


def train_step(state: TrainState, parts: Parts, batch: dict) -> bool:
    """One micro-batch; returns True when it completed an optimizer step (not a skipped one)."""
    accelerator, model, run = state.accelerator, state.model, state.recipe["run"]
    settings = state.recipe["objective"]
    state.batches_done += 1
    batch = dict(batch)  # model_inputs puts the masks it flipped with their images back into it
    clean, keywords = model_inputs(state, parts, batch)
    weights = loss_weights(batch, clean)
    trained = parts.objective
    times = trained.times(parts.timestep_sampler, clean.shape[0], clean.device)
    noise, noisy = trained.add_noise(clean, times, settings["noise_offset"])
    with accelerator.accumulate(model):
        forward = model if parts.compiled is None else parts.compiled
        loss = trained.compute_loss(forward, clean, noise, noisy, times, settings, parts.loss_weighting, keywords,
                                    **({} if weights is None else {"element_weights": weights}))
        value = loss.detach().item()  # the one device sync of the step
        if finite_everywhere(accelerator, value):
            accelerator.backward(loss)
            state.window_losses.append(value)
        else:
            state.window_nonfinite = True
        if not accelerator.sync_gradients:
            return False
        if state.window_nonfinite:
            state.optimizer.zero_grad()
            return step_skipped(state)
        if run["max_grad_norm"]:
            accelerator.clip_grad_norm_(model.parameters(), run["max_grad_norm"])
        state.optimizer.step()
        state.optimizer.zero_grad()
        return step_taken(state)


def loss_weights(batch: dict, clean: torch.Tensor) -> torch.Tensor | None:
    """The element weights of a batch's loss (Objective.compute_loss's `element_weights`), or
    None when the batch has neither masks nor per-sample weights.

    - `batch["masks"]`: float (B, 1, H, W) in [0, 1] at the images' pixel size, white = counts,
      flipped with their images (model_inputs leaves the flipped ones in the batch). They are
      resized to the clean samples' size by area interpolation (each latent pixel gets the mean
      of the mask over the 8 x 8 pixels it encodes, as kohya-ss/sd-scripts does), and multiply
      every channel's loss there. Grey is a partial weight: OneTrainer's unmasked_weight w is a
      mask whose black is painted w * 255 grey.
    - `batch["loss_weights"]`: one float per sample (a row's `loss_weight`, e.g. DreamBooth's
      prior_loss_weight on class images), multiplying that sample's loss.

    The objective then averages the weighted loss over all elements (difftool.objective.loss), so
    a masked-out region contributes nothing, not even through the mean."""
    masks, per_sample = batch.get("masks"), batch.get("loss_weights")
    weights = None
    if masks is not None:
        weights = masks.to(clean.device, torch.float32)
        if weights.shape[2:] != clean.shape[2:]:
            weights = torch.nn.functional.interpolate(weights, size=tuple(clean.shape[2:]), mode="area")
    if per_sample is not None:
        from difftool.objective import broadcast

        per_sample = broadcast(torch.as_tensor(per_sample).to(clean.device, torch.float32), clean)
        weights = per_sample if weights is None else weights * per_sample
    return weights


def finite_everywhere(accelerator, value: float) -> bool:
    """Whether the loss is finite in every process (so that all of them skip a step together)."""
    if accelerator.num_processes == 1:
        return math.isfinite(value)
    nonfinite = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=accelerator.device)
    return accelerator.reduce(nonfinite, "sum").item() == 0


def step_taken(state: TrainState) -> bool:
    """Bookkeeping after an optimizer step: LR, counters, EMA, logs."""
    state.lr_schedule.step()
    state.global_step += 1
    state.nonfinite_in_a_row = 0
    state.loss = sum(state.window_losses) / len(state.window_losses)
    state.window_losses = []
    if state.ema is not None:
        state.ema.update(state.accelerator.unwrap_model(state.model), state.global_step)
    state.accelerator.log({"loss": state.loss, "lr": state.lr_schedule.get_last_lr()[0], "step": state.global_step,
                           "nonfinite_steps": state.nonfinite_total}, step=state.global_step)
    return True


def step_skipped(state: TrainState) -> bool:
    """A window whose loss was NaN/Inf: no update, counted, logged; too many in a row stops."""
    state.window_losses, state.window_nonfinite = [], False
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    state.accelerator.log({"nonfinite_steps": state.nonfinite_total}, step=state.global_step)
    if state.accelerator.is_main_process:
        console.print(f"[yellow]non-finite loss at step {state.global_step + 1}: update skipped[/]")
    limit = state.recipe["run"]["max_nonfinite_steps"]
    if state.nonfinite_in_a_row >= limit:
        found = checkpoints.complete(state.output_dir)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
        raise DifftoolError(
            f"{limit} optimizer steps in a row had a non-finite loss (NaN/Inf), so the run stopped at "
            f"step {state.global_step}; {kept}. Lower the learning rate, check the data, or use "
            "mixed_precision = 'bf16' instead of 'fp16'"
        )
    return False


def after_step(state: TrainState, parts: Parts) -> None:
    """Hooks, validation and checkpoints at their step intervals."""
    run, validation = state.recipe["run"], state.recipe["validation"]
    plugins.call("on_step_end", state=state)
    every = state.recipe["sampling"]["every_n_steps"]
    if every and state.global_step % every == 0:
        if state.accelerator.is_main_process:
            save_samples(state, parts, state.accelerator.unwrap_model(state.model), f"step-{state.global_step:06d}.png")
        state.accelerator.wait_for_everyone()
    if parts.validation is not None and state.global_step % validation["every_n_steps"] == 0:
        validate(state, parts)
    if parts.evaluation is not None and state.global_step % state.recipe["evaluation"]["every_n_steps"] == 0:
        evaluate(state, parts)
    if run["checkpointing_steps"] and state.global_step % run["checkpointing_steps"] == 0:
        checkpoint(state, parts)


def checkpoint(state: TrainState, parts: Parts) -> Path:
    """Save the training state as checkpoint-{global_step} (all processes call it). Never inside
    weights_for_output: an optimizer with train and eval modes is in train mode here, so the
    checkpoint holds the weights and state that training goes on from."""
    path = checkpoints.save(state.accelerator, state.output_dir, state.global_step,
                            parts.recipe_text, state.recipe["run"]["checkpoints_total_limit"])
    parts.saved_step = state.global_step
    plugins.call("on_checkpoint", state=state, path=path)
    return path


def validate(state: TrainState, parts: Parts) -> None:
    """Mean loss over the first num_batches held-out batches, with noise and timesteps fixed by
    the batch index, so every evaluation measures the same thing. The weights are the trained
    ones (not the EMA's), with the optimizer in eval mode where it has one (optimizer_eval_mode).
    The loss is weighted by the batch's loss masks and per-sample loss weights as in training
    (loss_weights), so val_loss measures what training minimises; as before, the [loss_weighting]
    over timesteps is not applied, so val_loss compares runs with different weightings."""
    accelerator, settings = state.accelerator, state.recipe["objective"]
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(state.model)
        trained = parts.objective
        model.eval()
        losses = []
        with torch.no_grad(), accelerator.autocast(), optimizer_eval_mode(state.optimizer):
            for index, batch in zip(range(state.recipe["validation"]["num_batches"]), parts.validation):
                batch = {**batch, "images": batch["images"].to(accelerator.device)}
                generator = torch.Generator().manual_seed(index)
                clean, keywords = model_inputs(state, parts, batch, training=False, generator=generator)
                times = trained.fixed_times(clean.shape[0], generator).to(clean.device)
                noise, noisy = trained.add_noise(clean, times, generator=generator)
                weights = loss_weights(batch, clean)
                losses.append(trained.compute_loss(model, clean, noise, noisy, times, settings, conditioning=keywords,
                                                   **({} if weights is None else {"element_weights": weights})).item())
        model.train()
        state.val_loss = sum(losses) / len(losses)
        accelerator.log({"val_loss": state.val_loss}, step=state.global_step)
    accelerator.wait_for_everyone()


def evaluate(state: TrainState, parts: Parts) -> None:
    """The [evaluation] metrics of the output weights (EMA when enabled): samples split across
    the processes and gathered, measured in the main process, logged as eval/<name> and
    appended to output_dir/metrics.jsonl. Under fork_rng, and with its own generators, it
    leaves every random state as it found it, so training goes on exactly as without it."""
    accelerator, settings = state.accelerator, parts.evaluation
    started = time.perf_counter()
    model = accelerator.unwrap_model(state.model)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    values = None
    with torch.random.fork_rng(devices=devices), weights_for_output(state, model):
        unet = build.denoiser(model)
        unet.eval()
        batches = evaluation.gathered(evaluation.generated_batches(
            unet, settings.scheduler, settings.generation, accelerator.device, parts.latent, accelerator.autocast,
            accelerator.process_index, accelerator.num_processes), accelerator, settings.generation.num_samples)
        if accelerator.is_main_process:
            settings.evaluator.prepare_reference(settings.generation.batch_size, console.print)
            values = settings.evaluator.measure(batches)
        else:
            for _ in batches:  # this process's share, gathered by the main one
                pass
        unet.train()
    settings.evaluated_step = state.global_step
    if accelerator.is_main_process:
        seconds = time.perf_counter() - started
        accelerator.log({f"eval/{name}": value for name, value in values.items()}, step=state.global_step)
        line = evaluation.metrics_line(state.global_step, seconds, settings.generation.num_samples, values)
        files.append_line(state.output_dir / evaluation.METRICS_FILE, line, "the evaluation's metrics")
        shown = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        console.print(f"step {state.global_step}: {escape(shown)} ({seconds:.1f} s)", highlight=False)
    accelerator.wait_for_everyone()


def end_of_epoch(state: TrainState, parts: Parts, last: bool) -> None:
    """Save the pipeline (EMA weights if enabled) and a sample grid at the recipe's epoch intervals.

    Before the last save, the final state goes into a checkpoint (unless it is in one already),
    so that a save that fails (a full disk, a plugin's hook) loses no training: a rerun with
    resume_from_checkpoint = "latest" only saves. Once everything is saved, that checkpoint is
    deleted again unless the recipe's checkpointing_steps asked for one at this step."""
    accelerator, run, epoch = state.accelerator, state.recipe["run"], state.epoch
    if last and parts.saved_step != state.global_step:
        checkpoint(state, parts)
    if last and parts.evaluation is not None and parts.evaluation.evaluated_step != state.global_step:
        evaluate(state, parts)  # the final weights are always measured
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(state.model)
        if (epoch + 1) % run["save_model_epochs"] == 0 or last:
            files.publish(lambda folder: write_model(state, parts, model, folder), state.output_dir)
        if (epoch + 1) % run["save_image_epochs"] == 0 or last:
            save_samples(state, parts, model, f"{epoch:04d}.png")
        every = run["checkpointing_steps"]
        if last and not (every and state.global_step % every == 0):
            checkpoints.remove(state.output_dir, state.global_step)
    accelerator.wait_for_everyone()


def save_samples(state: TrainState, parts: Parts, model, name: str) -> None:
    """Sample with the output weights into samples/`name` and every tracker that takes images;
    calls on_samples."""
    with weights_for_output(state, model):
        images = sample_images(state, parts, model)
    picture = grid(images, rows=len(sampled_classes(state, parts)) if parts.classes is not None else None)
    files.save_image(picture, state.output_dir / "samples" / name, "the sample grid")
    if state.accelerator.is_main_process:
        trackers.log_images(state.accelerator, "samples", picture, state.global_step)
    plugins.call("on_samples", state=state, images=images)


def write_model(state: TrainState, parts: Parts, model, folder: Path) -> None:
    """What the run produced, with EMA weights when [ema] is enabled: the adapters alone (and,
    with run.fuse_adapters, the fused pipeline) for an adapted model, else the pipeline
    (DDPMPipeline, or the latent model's own) by save_pretrained, with the raw weights in
    unet_raw/. A latent model's LoRA is also saved as pytorch_lora_weights.safetensors, which
    the diffusers pipeline's `load_lora_weights(folder)` loads. The run's recipe.toml goes with
    them, so that the recipe beside a model is always the one that made it, and so does the
    model card, README.md (difftool.card), written last from the recipe and what was saved."""
    from difftool import card

    (folder / files.RECIPE).write_text(parts.recipe_text)
    if parts.classes is not None:
        conditioning.write_names(folder, parts.classes)
    unet = build.denoiser(model)
    if state.ema is not None and not parts.adapters:
        with optimizer_eval_mode(state.optimizer):  # the weights without the EMA's average
            unet.save_pretrained(folder / "unet_raw")
    with weights_for_output(state, model):
        if parts.adapters:
            adapters.save(parts.adapters, unet, state.recipe, folder)
            if parts.latent is not None:
                parts.latent.save_lora_weights(folder)
        if not parts.adapters or state.recipe["run"]["fuse_adapters"]:
            output_unet = adapters.fused(parts.adapters, unet) if parts.adapters else unet
            encoders = adapters.fused_text_encoders(parts.adapters)  # {} unless an adapter is on them
            pipeline(parts, output_unet, parts.noise_scheduler, encoders).save_pretrained(folder)
    card.write(folder, state)


def pipeline(parts: Parts, unet, scheduler, text_encoders: dict | None = None):
    """The diffusers pipeline of the run: DDPMPipeline, or the latent model's with `unet` (and
    `text_encoders` by pipeline name in place of its own: the fused copies)."""
    from diffusers import DDPMPipeline

    if parts.latent is not None:
        return parts.latent.pipeline(unet, scheduler, text_encoders)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


@contextlib.contextmanager
def weights_for_output(state: TrainState, model):
    """Within the block, `model` holds the weights the run outputs: the optimizer's evaluation
    weights where it has train and eval modes (optimizer_eval_mode), and over them the EMA
    weights when [ema] is enabled. Afterwards, the training weights exactly as they were."""
    with optimizer_eval_mode(state.optimizer):
        with state.ema.swapped_in(model) if state.ema is not None else contextlib.nullcontext(model):
            yield model


@contextlib.contextmanager
def optimizer_eval_mode(optimizer):
    """Within the block, an optimizer that has `train()` and `eval()` methods (a schedule-free one
    trains at other weights than those it evaluates at) is in eval mode, the parameters holding
    its evaluation weights. Afterwards it is back in train mode, and the parameters are put back
    bit for bit (eval then train may round), so that sampling, validation, evaluation and saving
    never change the training. Other optimizers are left alone. Checkpoints are saved outside
    such a block, in train mode: the state training goes on from, so resuming is exact."""
    from accelerate.optimizer import AcceleratedOptimizer

    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if not (callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))):
        yield
        return
    parameters = [p for group in inner.param_groups for p in group["params"]]
    training = [p.detach().to("cpu", copy=True) for p in parameters]  # off the GPU, as the EMA's store
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for parameter, kept in zip(parameters, training):
                parameter.copy_(kept)


def sample_images(state: TrainState, parts: Parts, model) -> list:
    """The [sampling] images from the current weights: unconditional; of the [sampling] classes
    (all by default), one row each, with classifier-free guidance for a class-conditional model;
    or of the [sampling] prompts with classifier-free guidance for a latent model."""
    sampling, run = state.recipe["sampling"], state.recipe["run"]
    unet = build.denoiser(model)
    unet.eval()
    settings = dict(
        num_images=sampling["num_images"],
        num_inference_steps=sampling["num_inference_steps"] or parts.sampler.config.num_train_timesteps,
        seed=run["seed"] if sampling["seed"] is None else sampling["seed"],
        image_size=state.recipe["dataset"]["image_size"],
        autocast=state.accelerator.autocast,
    )
    if parts.latent is not None:
        images = text_to_image(parts.latent.pipeline(scheduler=parts.sampler), sampling["prompts"] or [""],
                               sampling["negative_prompt"], conditioning.guidance(sampling["guidance_scale"], True),
                               **settings)
    elif parts.classes is not None:
        labels = conditioning.grid_labels(sampled_classes(state, parts), settings.pop("num_images"))
        images = generate(unet, parts.sampler, num_images=len(labels), device=state.accelerator.device, labels=labels,
                          guidance_scale=conditioning.guidance(sampling["guidance_scale"], False,
                                                               bool(state.recipe["dataset"]["label_dropout"])),
                          null_label=len(parts.classes), **settings)
    else:
        images = generate(unet, parts.sampler, device=state.accelerator.device, **settings)
    unet.train()
    return images


def sampled_classes(state: TrainState, parts: Parts) -> list[int]:
    """The labels of the [sampling] classes (every class when it names none)."""
    return conditioning.indices(parts.classes, state.recipe["sampling"]["classes"], state.recipe.where("sampling"))


def provenance(recipe: Recipe) -> dict:
    """Versions of difftool, its libraries and every plugin the recipe uses."""
    from importlib.metadata import version

    from difftool.plugins import plugin_version

    libraries = {"difftool": __version__, **{name: version(name) for name in ("torch", "diffusers", "accelerate", "datasets")}}
    plugins = {e.plugin: plugin_version(e.plugin) for e in recipe.entries.values()}
    return {"recipe_file": recipe.path, "versions": libraries, "plugins": plugins}


def progress_bar(accelerator: Accelerator) -> Progress:
    """A rich progress bar showing epoch, step, loss, lr and images/s (main process only)."""
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[speed]:.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not accelerator.is_local_main_process,
    )
