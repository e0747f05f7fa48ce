"""Checkpoints, exact resume, EMA, objectives, NaN handling, training hooks and validation."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import difftool
from difftool import integrity, objective
from difftool.adapters import Adapter
from difftool import recipe as recipes
from difftool.engine import train
from difftool.errors import DifftoolError
from difftool.plugins import registry
from difftool.testing import assert_identical, running

# 24 images in batches of 8 with 2 micro-batches per step: 3 batches, 2 optimizer steps per
# epoch (the second one ends the epoch early), so step 3 lands mid-epoch and mid-shuffle.
RESUMABLE = ["dataset.count=24", "run.gradient_accumulation_steps=2", "run.num_epochs=4",
             "run.checkpointing_steps=3", "run.save_image_epochs=100", "run.save_model_epochs=100",
             "ema.enabled=true", "ema.decay=0.9"]


def read_state(path):
    """Every file of a checkpoint, loaded (tensors, arrays, dicts), by file name."""
    loaded = {}
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            loaded[file.name] = load_file(file)
        elif file.suffix in (".bin", ".pkl"):
            loaded[file.name] = torch.load(file, weights_only=False)
    return loaded


def tb_scalars(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return values


def test_resume_mid_epoch_with_accumulation_is_bit_identical(tiny_recipe, tmp_path):
    straight = train(recipes.load(tiny_recipe(output_dir=tmp_path / "straight"), RESUMABLE))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    halves = tmp_path / "halves"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", halves / "checkpoints" / "checkpoint-3")
    train(recipes.load(tiny_recipe(output_dir=halves, name="halves.toml"),
                       RESUMABLE + ['run.resume_from_checkpoint="latest"']))
    first, second = read_state(straight / "checkpoints" / "checkpoint-6"), read_state(halves / "checkpoints" / "checkpoint-6")
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= first.keys()
    assert_identical(first, second)
    assert first["custom_checkpoint_1.pkl"]["batches_done"] == 3  # step 6 ended epoch 2
    for folder in ("unet", "unet_raw"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(halves / folder / "diffusion_pytorch_model.safetensors")
        assert_identical(a, b, folder)
    raw = load_file(straight / "unet_raw" / "diffusion_pytorch_model.safetensors")
    averaged = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(raw[k], averaged[k]) for k in raw)  # the pipeline has the EMA weights
    steps = [s for s, _ in tb_scalars(halves)["loss"]]
    assert steps == [4, 5, 6, 7, 8]


def test_resume_can_train_longer_and_prunes(tiny_recipe, tmp_path):
    output_dir = tmp_path / "run"
    path = tiny_recipe(output_dir=output_dir)
    train(recipes.load(path, ["run.max_steps=3", "run.checkpointing_steps=1"]))
    assert len(list((output_dir / "checkpoints").iterdir())) == 3
    train(recipes.load(path, ["run.max_steps=4", "run.checkpointing_steps=1", "run.checkpoints_total_limit=2",
                              'run.resume_from_checkpoint="latest"']))
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert [s for s, _ in tb_scalars(output_dir)["loss"]] == [1, 2, 3, 4]


def test_latest_without_checkpoints_starts_fresh_and_bad_path_is_an_error(tiny_recipe, tmp_path):
    path = tiny_recipe()
    train(recipes.load(path, ["run.max_steps=1", 'run.resume_from_checkpoint="latest"']))
    with pytest.raises(DifftoolError, match="is not a difftool checkpoint"):
        recipes_loaded = recipes.load(path, [f'run.resume_from_checkpoint="{tmp_path}"', "run.overwrite_output_dir=true"])
        train(recipes_loaded)


def test_resume_refuses_a_changed_recipe_unless_forced(tiny_recipe, cli, tmp_path):
    output_dir = tmp_path / "run"
    path = tiny_recipe(output_dir=output_dir)
    train(recipes.load(path, ["run.max_steps=2", "run.checkpointing_steps=2"]))
    resume = ["--set", 'run.resume_from_checkpoint="latest"', "--set", "run.max_steps=3"]
    code, _, err = cli("run", path, *resume, "--set", "model.layers_per_block=2", "--set", "optimizer.lr=0.5")
    assert code == 1 and "cannot resume" in err
    assert "model.layers_per_block: 1 -> 2" in err and "optimizer.lr: 0.001 -> 0.5" in err and "--force" in err
    code, _, err = cli("run", path, *resume, "--set", "optimizer.lr=0.5", "--force")
    assert code == 0, err
    code, _, err = cli("run", path, "--set", 'run.resume_from_checkpoint="latest"', "--set", "run.max_steps=4",
                       "--set", "sampling.num_images=2")  # sampling is not protected
    assert code == 0, err


def test_sigkill_during_training_leaves_complete_checkpoints(tiny_recipe, tmp_path):
    output_dir = tmp_path / "killed"
    path = tiny_recipe(output_dir=output_dir)
    with running([sys.executable, "-m", "difftool", "run", str(path), "--set", "run.num_epochs=1000",
                  "--set", "run.checkpointing_steps=1", "--set", "run.save_image_epochs=1000",
                  "--set", "run.save_model_epochs=1000"], tmp_path, stdout=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not (output_dir / "checkpoints" / "checkpoint-2").exists():
            time.sleep(0.05)
        time.sleep(random.uniform(0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    found = sorted((output_dir / "checkpoints").glob("checkpoint-*"))
    assert len(found) >= 2
    for checkpoint in found:
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "recipe.toml"} <= {f.name for f in checkpoint.iterdir()}
        assert integrity.verify(checkpoint) is None and integrity.has_manifest(checkpoint)
    newest = max(int(p.name.split("-")[1]) for p in found)
    train(recipes.load(path, ['run.resume_from_checkpoint="latest"', f"run.max_steps={newest + 1}",
                              "run.num_epochs=1000", "run.checkpointing_steps=1"]))
    assert (output_dir / "checkpoints" / f"checkpoint-{newest + 1}").is_dir()
    assert not list((output_dir / "checkpoints").glob(".saving-*"))
    assert (output_dir / "model_index.json").exists()


class Recorder:
    """Records every training hook call."""

    def __init__(self):
        self.calls = []

    @difftool.hookimpl
    def on_train_start(self, state):
        self.calls.append(("start", state.global_step))

    @difftool.hookimpl
    def on_step_end(self, state):
        assert state.model is not None and state.optimizer is not None and state.recipe["run"]
        self.calls.append(("step", state.global_step, state.epoch, round(state.loss, 6)))

    @difftool.hookimpl
    def on_checkpoint(self, state, path):
        self.calls.append(("checkpoint", state.global_step, path.name))

    @difftool.hookimpl
    def on_samples(self, state, images):
        self.calls.append(("samples", state.epoch, len(images)))

    @difftool.hookimpl
    def on_train_end(self, state):
        self.calls.append(("end", state.global_step))


def test_training_hooks_see_the_run(plugin, tiny_recipe):
    recorder = plugin(Recorder(), "recorder")
    train(recipes.load(tiny_recipe(), ["run.checkpointing_steps=2", "run.save_image_epochs=2"]))
    kinds = [call[0] for call in recorder.calls]
    assert kinds == ["start", "step", "step", "checkpoint", "step", "step", "checkpoint", "samples", "end"]
    steps = [call for call in recorder.calls if call[0] == "step"]
    assert [(s[1], s[2]) for s in steps] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert all(0 < s[3] < 10 for s in steps)
    assert ("checkpoint", 4, "checkpoint-4") in recorder.calls and ("samples", 1, 4) in recorder.calls


class NaNAfter:
    """A loss weighting that turns NaN from the `start`-th call on (or only at that call); call 1
    is the trial before training (build.check_objective)."""

    def __init__(self, start, once=False):
        self.start, self.once, self.count = start, once, 0

    @difftool.hookimpl
    def register_loss_weightings(self, register):
        def factory():
            def weights(timesteps, objective):
                self.count += 1
                bad = self.count == self.start if self.once else self.count >= self.start
                return torch.full(timesteps.shape, float("nan") if bad else 1.0)

            return weights

        register("nan-after", factory, "NaN after a while")


def test_nonfinite_steps_are_skipped_counted_and_logged(plugin, tiny_recipe):
    plugin(NaNAfter(3, once=True), "nan-once")
    output_dir = train(recipes.load(tiny_recipe('\n[loss_weighting]\nname = "nan-after"\n')))
    scalars = tb_scalars(output_dir)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]  # 4 batches, one skipped
    assert max(v for _, v in scalars["nonfinite_steps"]) == 1
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_steps_stop_the_run(plugin, tiny_recipe):
    plugin(NaNAfter(4), "nan-forever")
    path = tiny_recipe('\n[loss_weighting]\nname = "nan-after"\n')
    with pytest.raises(DifftoolError) as info:
        train(recipes.load(path, ["run.num_epochs=10", "run.checkpointing_steps=1", "run.max_nonfinite_steps=3"]))
    message = str(info.value)
    assert "3 optimizer steps in a row had a non-finite loss" in message and "stopped at step 2" in message
    assert "checkpoint-2" in message


def test_objectives_prediction_types_and_weightings(tiny_recipe):
    output_dir = train(recipes.load(tiny_recipe(), [
        'noise_scheduler.prediction_type="v_prediction"', 'objective.loss="huber"', "objective.noise_offset=0.05",
        'loss_weighting={name="min-snr", gamma=5.0}', 'timestep_sampler={name="logit-normal", std=0.5}',
    ]))
    import json

    saved = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_min_snr_weights_follow_the_paper():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from difftool.builtins.objectives import DDPM

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([1, 100, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weighting = registry("loss_weightings").get("min-snr").build({"gamma": 5.0}, "test")
    epsilon, velocity = DDPM(scheduler), DDPM(DDPMScheduler(prediction_type="v_prediction"))
    assert torch.allclose(weighting(timesteps, epsilon), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(weighting(timesteps, velocity), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert weighting(timesteps, epsilon)[0] < 1 and weighting(timesteps, epsilon)[-1] == 1
    assert registry("loss_weightings").get("none").build({}, "test")(timesteps, epsilon) is None


def test_timestep_samplers_stay_in_range():
    torch.manual_seed(0)
    uniform = registry("timestep_samplers").get("uniform").build({}, "test")(4000, 1000, "cpu")
    middle = registry("timestep_samplers").get("logit-normal").build({"std": 0.5}, "test")(4000, 1000, "cpu")
    for timesteps in (uniform, middle):
        assert timesteps.dtype == torch.int64 and timesteps.min() >= 0 and timesteps.max() <= 999
    assert abs(middle.float().mean() - 500) < 20 and middle.float().std() < uniform.float().std()


def test_loss_types_and_noise_offset():
    prediction, wanted = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    assert objective.loss(prediction, wanted, "mse", 1.0, None) == 4.0
    assert objective.loss(prediction, wanted, "l1", 1.0, None) == 2.0
    assert objective.loss(prediction, wanted, "huber", 1.0, None) == 1.5
    assert objective.loss(prediction, wanted, "mse", 1.0, torch.tensor([0.0, 1.0])) == 2.0
    from diffusers import DDPMScheduler

    clean = torch.zeros(64, 3, 8, 8)
    torch.manual_seed(0)
    noise, _ = objective.add_noise(DDPMScheduler(), clean, torch.zeros(64, dtype=torch.int64), 1.0)
    per_channel_mean = noise.mean(dim=(2, 3))
    assert per_channel_mean.std() > 0.8  # the offset shifts whole channels


class Frozen:
    """An optimizer that never changes the weights (a recipe's lr must be positive)."""

    @difftool.hookimpl
    def register_optimizers(self, register):
        class Still(torch.optim.SGD):
            def step(self, closure=None):
                return None

        register("still", lambda params, lr=1.0: Still(params, lr=lr), "never steps")


def test_validation_loss_is_deterministic(tiny_recipe, plugin):
    plugin(Frozen(), name="frozen")
    output_dir = train(recipes.load(tiny_recipe(), [
        "dataset.count=20", 'optimizer={name="still"}', "validation.every_n_steps=1", "validation.fraction=0.2",
        'lr_schedule={name="constant"}',
    ]))
    values = [v for _, v in tb_scalars(output_dir)["val_loss"]]
    assert len(values) == 4 and len(set(values)) == 1  # same model, same noise, same loss


def test_validation_needs_a_usable_hold_out(tiny_recipe):
    from difftool import build

    with pytest.raises(DifftoolError, match="has none; hold out a fraction instead"):
        build.datasets(recipes.load(tiny_recipe(), ["validation.every_n_steps=1", 'validation.split="test"']))
    training, held_out = build.datasets(recipes.load(tiny_recipe(), ["validation.every_n_steps=1", "validation.fraction=0.25"]))
    assert (len(training), len(held_out)) == (12, 4)


class LoraLike:
    """An adapter plugin: peft LoRA on the attention projections, the base frozen."""

    @difftool.hookimpl
    def register_adapters(self, register):
        def lora(model, r: int = 4):
            from peft import LoraConfig, inject_adapter_in_model

            model.requires_grad_(False)
            config = LoraConfig(r=r, lora_alpha=r, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False)
            inject_adapter_in_model(config, model)
            return Adapter()

        register("test-lora", lora, "LoRA for the tests")


def test_checkpoints_of_a_mostly_frozen_model_hold_only_trainable_weights(plugin, tiny_recipe, cli, tmp_path):
    plugin(LoraLike(), "lora-like")
    adapters = '\n[[adapters]]\nname = "test-lora"\nr = 4\n'
    steps = ["run.max_steps=3", "run.checkpointing_steps=1"]
    full = train(recipes.load(tiny_recipe(output_dir=tmp_path / "full"), steps))
    lora = train(recipes.load(tiny_recipe(adapters, output_dir=tmp_path / "lora", name="lora.toml"), steps))

    def size(folder):
        return sum(f.stat().st_size for f in (folder / "checkpoints" / "checkpoint-2").iterdir())

    files = {f.name for f in (lora / "checkpoints" / "checkpoint-2").iterdir()}
    assert "0_trainable_parameters.safetensors" in files and "model.safetensors" not in files
    trainable = load_file(lora / "checkpoints" / "checkpoint-2" / "0_trainable_parameters.safetensors")
    assert trainable and all("lora_" in name for name in trainable)
    assert size(lora) * 5 < size(full)
    # the run saves the adapter alone; `sample` loads it onto the base its recipe names
    assert (lora / "adapters.json").is_file() and not (lora / "unet").exists()
    assert load_file(lora / "adapters" / "0-test-lora" / "adapter_weights.safetensors").keys() == trainable.keys()
    code, out, err = cli("sample", lora, "--num-images", "1", "--steps", "2")
    assert code == 0, err
    assert (lora / "samples" / "sample-ddim-2.png").is_file()
    rank_two = train(recipes.load(tiny_recipe(adapters.replace("r = 4", "r = 2"), output_dir=tmp_path / "r2",
                                              name="r2.toml"), ["run.max_steps=1"]))
    weights = "adapters/0-test-lora/adapter_weights.safetensors"
    shutil.copy(lora / weights, tmp_path / "kept.safetensors")
    shutil.copy(rank_two / weights, lora / weights)
    code, _, err = cli("sample", lora, "--num-images", "1", "--steps", "2", "--overwrite")
    assert code == 1 and "does not hold this adapter's weights" in err
    shutil.copy(tmp_path / "kept.safetensors", lora / weights)
    code, _, err = cli("run", tiny_recipe(adapters, output_dir=tmp_path / "fused", name="fused.toml"),
                       "--set", "run.fuse_adapters=true")
    assert code == 1 and "adapter 'test-lora' cannot be fused" in err and not (tmp_path / "fused").exists()
    code, _, err = cli("check", tmp_path / "fused.toml", "--set", "run.fuse_adapters=true")
    assert code == 1 and "cannot be fused" in err
    # resuming restores the adapter weights exactly; the frozen base is rebuilt from the recipe
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(lora / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    train(recipes.load(tiny_recipe(adapters, output_dir=resumed, name="resumed.toml"),
                       steps + ['run.resume_from_checkpoint="latest"']))
    assert_identical(read_state(lora / "checkpoints" / "checkpoint-3"), read_state(resumed / "checkpoints" / "checkpoint-3"))


@pytest.mark.parametrize("name", ["euler", "dpm-solver++", "unipc"])
def test_any_noise_scheduler_noises_like_ddpm_with_the_same_betas(name):
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear")
    other = registry("schedulers").get(name).build({"beta_schedule": "scaled_linear"}, "test")
    clean, timesteps = torch.randn(3, 3, 4, 4), torch.tensor([0, 500, 999])
    torch.manual_seed(0)
    noise, noisy = objective.add_noise(other, clean, timesteps)
    assert torch.allclose(noisy, ddpm.add_noise(clean, noise, timesteps), atol=1e-6)
    velocity = objective.target(other, "v_prediction", clean, noise, timesteps)
    assert torch.allclose(velocity, ddpm.get_velocity(clean, noise, timesteps), atol=1e-6)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_ema_averages_on_either_device(tiny_recipe, on_cpu):
    from difftool import build

    recipe = recipes.load(tiny_recipe(), ["ema.enabled=true", "ema.decay=0.5", f"ema.on_cpu={str(on_cpu).lower()}"])
    model = build.model(recipe)
    ema = build.ema(recipe, model)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step)
    with ema.swapped_in(model):
        averaged = [p.clone() for p in model.parameters()]
    assert not any(torch.equal(a, p) for a, p in zip(averaged, model.parameters()))


def test_changing_ema_on_resume_is_refused(tiny_recipe, tmp_path):
    path = tiny_recipe(output_dir=tmp_path / "run")
    train(recipes.load(path, ["run.max_steps=1", "run.checkpointing_steps=1"]))
    with pytest.raises(DifftoolError, match="ema.enabled: False -> True"):
        train(recipes.load(path, ["run.max_steps=2", 'run.resume_from_checkpoint="latest"', "ema.enabled=true"]))


def test_outputs_get_the_usual_file_mode(tiny_recipe):
    old = os.umask(0o022)
    try:
        output_dir = train(recipes.load(tiny_recipe(), ["run.max_steps=1", "run.checkpointing_steps=1"]))
    finally:
        os.umask(old)
    for written in ("recipe.toml", "samples/0000.png", "unet/diffusion_pytorch_model.safetensors",
                    "checkpoints/checkpoint-1/model.safetensors"):
        assert (output_dir / written).stat().st_mode & 0o777 == 0o644, written
    assert (output_dir / "unet").stat().st_mode & 0o777 == 0o755


def test_check_builds_optimizer_and_schedule(cli, tiny_recipe):
    code, _, err = cli("check", tiny_recipe(), "--set", "optimizer.betas=[2.0, 0.9]")
    assert code == 1 and "optimizer 'adamw'" in err and "could not be built" in err and "beta" in err
