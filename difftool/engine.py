"""The training loop: the diffusers tutorial's Accelerate loop, driven by a recipe."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from difftool import __version__, build, files
from difftool.errors import DifftoolError, Interrupted
from difftool.recipe import Recipe, dump
from difftool.sampling import generate, grid

console = Console(stderr=True)


@dataclass
class Plan:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def train(recipe: Recipe) -> Path:
    """Train as the recipe says; returns the output folder holding the saved pipeline."""
    run = recipe["run"]
    output_dir = Path(run["output_dir"])
    files.prepare_output_dir(output_dir, run["overwrite_output_dir"], recipe.path)
    accelerator = Accelerator(
        # on a machine without CUDA, accelerate sets up gloo for `accelerate launch
        # --multi_gpu --num_processes N` only when told to use the CPU
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=run["mixed_precision"],
        gradient_accumulation_steps=run["gradient_accumulation_steps"],
        log_with=None if run["log_with"] == "none" else run["log_with"],
        project_dir=str(output_dir / "logs"),
    )
    if run["mixed_precision"] == "fp16" and accelerator.device.type == "cpu" and accelerator.is_main_process:
        console.print("[yellow]mixed_precision = 'fp16' needs a GPU; on this CPU the run is fp32 "
                      "(set run.mixed_precision = 'bf16' for CPU mixed precision)[/]")
    set_seed(run["seed"])

    model = build.model(recipe)
    noise_scheduler = build.noise_scheduler(recipe)
    sampler = build.sampling_scheduler(recipe, noise_scheduler)
    optimizer = build.optimizer(recipe, model)
    loader = accelerator.prepare(build.dataloader(recipe))
    plan = make_plan(recipe, len(loader))
    lr_schedule = build.lr_schedule(recipe, optimizer, plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(output_dir / "recipe.toml", dump(recipe, provenance(recipe)))
        accelerator.init_trackers("difftool")
    try:
        loop(recipe, accelerator, model, noise_scheduler, sampler, optimizer, lr_schedule, loader, plan)
    except KeyboardInterrupt:
        kept = "the last saved pipeline and samples" if (output_dir / files.FINISHED_MARKER).exists() else "the samples saved so far"
        raise Interrupted(f"interrupted; {output_dir} keeps {kept}, each complete") from None
    finally:
        accelerator.end_training()
    return output_dir


def make_plan(recipe: Recipe, batches_per_epoch: int) -> Plan:
    """Optimizer steps per epoch and in all, capped by run.max_steps."""
    run = recipe["run"]
    per_epoch = math.ceil(batches_per_epoch / run["gradient_accumulation_steps"])
    total = per_epoch * run["num_epochs"]
    return Plan(per_epoch, min(total, run["max_steps"] or total))


def loop(recipe, accelerator, model, noise_scheduler, sampler, optimizer, lr_schedule, loader, plan) -> None:
    """The tutorial's loop: noise, predict, MSE, backward, clip, step; samples and saves per epoch."""
    run = recipe["run"]
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    images_per_step = recipe["dataset"]["batch_size"] * run["gradient_accumulation_steps"] * accelerator.num_processes
    global_step, losses = 0, []
    with progress_bar(accelerator) as progress:
        task = progress.add_task("train", total=plan.total_steps, epoch=0, loss=float("nan"), lr=0.0, speed=0.0)
        for epoch in range(plan.num_epochs):
            model.train()
            started, epoch_steps = time.perf_counter(), 0
            for batch in loader:
                clean = batch["images"]
                noise = torch.randn_like(clean)
                timesteps = torch.randint(0, num_train_timesteps, (clean.shape[0],), device=clean.device, dtype=torch.int64)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                with accelerator.accumulate(model):
                    prediction = model(noisy, timesteps, return_dict=False)[0]
                    loss = F.mse_loss(prediction.float(), target(noise_scheduler, prediction_type, clean, noise, timesteps))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and run["max_grad_norm"]:
                        accelerator.clip_grad_norm_(model.parameters(), run["max_grad_norm"])
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(loss.detach().item())
                if not accelerator.sync_gradients:
                    continue
                lr_schedule.step()
                global_step += 1
                epoch_steps += 1
                logs = {"loss": sum(losses) / len(losses), "lr": lr_schedule.get_last_lr()[0], "step": global_step}
                losses.clear()
                accelerator.log(logs, step=global_step)
                speed = epoch_steps * images_per_step / (time.perf_counter() - started)
                progress.update(task, advance=1, epoch=epoch, loss=logs["loss"], lr=logs["lr"], speed=speed)
                if global_step >= plan.total_steps:
                    break
            end_of_epoch(recipe, accelerator, model, noise_scheduler, sampler, epoch,
                         last=global_step >= plan.total_steps)
            if global_step >= plan.total_steps:
                break


def target(noise_scheduler, prediction_type: str, clean, noise, timesteps):
    """What the model learns to predict: the noise, the velocity or the clean image."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps).float()
    if prediction_type == "sample":
        return clean.float()
    raise DifftoolError(f"[noise_scheduler] prediction_type = '{prediction_type}' is not one of epsilon, v_prediction, sample")


def end_of_epoch(recipe, accelerator, model, noise_scheduler, sampler, epoch: int, last: bool) -> None:
    """Save a sample grid and the pipeline when the recipe's epoch intervals (or the end) say so."""
    run = recipe["run"]
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        if (epoch + 1) % run["save_image_epochs"] == 0 or last:
            save_samples(recipe, accelerator, unet, sampler, epoch)
        if (epoch + 1) % run["save_model_epochs"] == 0 or last:
            from diffusers import DDPMPipeline

            files.save_pipeline(DDPMPipeline(unet=unet, scheduler=noise_scheduler), Path(run["output_dir"]))
    accelerator.wait_for_everyone()


def save_samples(recipe, accelerator, unet, sampler, epoch: int) -> None:
    """A grid of [sampling] images, at output_dir/samples/{epoch:04d}.png."""
    sampling, run = recipe["sampling"], recipe["run"]
    unet.eval()
    images = generate(
        unet, sampler,
        num_images=sampling["num_images"],
        num_inference_steps=sampling["num_inference_steps"] or sampler.config.num_train_timesteps,
        seed=run["seed"] if sampling["seed"] is None else sampling["seed"],
        image_size=recipe["dataset"]["image_size"],
        device=accelerator.device,
        autocast=accelerator.autocast,
    )
    unet.train()
    files.save_image(grid(images), Path(run["output_dir"]) / "samples" / f"{epoch:04d}.png")


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
