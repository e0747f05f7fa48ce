"""The optimizers train through the real engine; the engine switches an optimizer's train and
eval modes where its contract says (and never changes training by it); schedule-free runs resume
bit for bit and output their averaged weights; adamw-8bit says why it cannot run where it cannot."""

import re
import shutil
import sys
import types
from collections import Counter
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("difftool_optimizers", reason="pip install -e plugins/difftool-optimizers")

import difftool  # noqa: E402
from difftool import recipe as recipes  # noqa: E402
from difftool.engine import train  # noqa: E402
from difftool.errors import DifftoolError  # noqa: E402
from difftool.testing import assert_identical  # noqa: E402
from difftool_optimizers import factories  # noqa: E402

CONSTANT = 'lr_schedule={name="constant"}'
HAS_BNB = find_spec("bitsandbytes") is not None
# the engine functions in which an optimizer with modes must be in eval mode
OUTPUT_PHASES = ("save_samples", "validate", "evaluate", "write_model")


class Final:
    """Keeps copies of the weights when training starts and ends, and the optimizer."""

    optimizer = start = weights = names = None

    @difftool.hookimpl
    def on_train_start(self, state):
        model = state.accelerator.unwrap_model(state.model)
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}

    @difftool.hookimpl
    def on_train_end(self, state):
        self.optimizer = getattr(state.optimizer, "optimizer", state.optimizer)
        model = state.accelerator.unwrap_model(state.model)
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def unet_weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_installed_plugin_lists_its_optimizers(cli):
    code, out, _ = cli("list", "optimizers")
    assert code == 0
    for name in ("prodigy", "adamw-schedulefree", "adamw-8bit"):
        assert re.search(rf"{name}\s.*difftool-optimizers", out), name


@pytest.mark.parametrize("name", [
    "prodigy",
    pytest.param("adamw-8bit", marks=pytest.mark.skipif(not HAS_BNB, reason="pip install 'difftool-optimizers[bnb]'")),
])
def test_optimizer_trains_a_tiny_run(tiny_recipe, plugin, name):
    final = plugin(Final(), "final")
    settings = [f'optimizer={{name="{name}"}}', CONSTANT, "run.max_steps=2", "dataset.batch_size=4"]
    run = train(recipes.load(tiny_recipe(), settings))
    saved = unet_weights(run)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[n], final.weights[n]) for n in final.weights)  # no modes: saved as trained
    assert sum(not torch.equal(final.start[n], final.weights[n]) for n in final.weights) > len(final.weights) // 2
    if name == "prodigy":  # 2 steps with the settings its authors recommend for diffusion models
        group = final.optimizer.param_groups[0]
        assert group["k"] == 2 and group["lr"] == 1.0 and group["weight_decay"] == 0.01
        assert group["use_bias_correction"] and group["safeguard_warmup"] and group["d"] >= group["d0"]
    else:  # the large tensors' moments are kept in 8 bits
        states = [s for s in final.optimizer.state.values() if "state1" in s]
        assert any(s["state1"].dtype == torch.uint8 for s in states)


def test_prodigy_warns_about_an_adamw_learning_rate(capsys):
    factories.prodigy([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    assert "leave lr at 1.0" in capsys.readouterr().err
    factories.prodigy([torch.nn.Parameter(torch.zeros(2))])
    assert capsys.readouterr().err == ""


class Moded(torch.optim.AdamW):
    """AdamW with train and eval modes, as a schedule-free optimizer has. Its eval weights are
    the training weights + 0.1, so that what the run saved is recognisable; leaving eval mode
    subtracts 0.1, which rounds, so training goes on unchanged only where the engine puts the
    training weights back exactly. It records the engine function of every eval(), the mode of
    every step and state_dict() (a checkpoint), and whether each step started from the weights
    the step before it left."""

    OFFSET = 0.1

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, lr=lr)
        self.mode, self.evaluated_in, self.saved_in, self.stepped_in = "train", [], [], []
        self.left, self.unchanged = None, []

    def weights(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def eval(self):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name not in OUTPUT_PHASES:
            frame = frame.f_back
        self.evaluated_in.append(frame.f_code.co_name if frame else None)
        self.mode = "eval"
        for p in self.weights():
            p.add_(self.OFFSET)

    @torch.no_grad()
    def train(self):
        self.mode = "train"
        for p in self.weights():
            p.sub_(self.OFFSET)

    def step(self, closure=None):
        self.stepped_in.append(self.mode)
        if self.left is not None:
            self.unchanged.append(all(torch.equal(p, kept) for p, kept in zip(self.weights(), self.left)))
        result = super().step(closure)
        self.left = [p.detach().clone() for p in self.weights()]
        return result

    def state_dict(self):
        self.saved_in.append(self.mode)
        return super().state_dict()


class ModedPlugin:
    made = []

    @difftool.hookimpl
    def register_optimizers(self, register):
        def moded(params, lr: float = 1e-3):
            self.made.append(Moded(params, lr))
            return self.made[-1]

        register("moded", moded, "AdamW with recorded train and eval modes")


def test_engine_switches_modes_for_output_and_never_changes_training(tiny_recipe, plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    recorder = plugin(ModedPlugin(), "moded-plugin")
    final = plugin(Final(), "final")
    run = train(recipes.load(tiny_recipe(), [
        'optimizer={name="moded"}', CONSTANT, "dataset.count=20", "dataset.batch_size=4", "run.max_steps=2",
        "run.num_epochs=1", "run.checkpointing_steps=1",
        "sampling.every_n_steps=1", "validation.every_n_steps=1", "validation.fraction=0.2",
        'evaluation.metrics=["swd"]', "evaluation.every_n_steps=1", "evaluation.num_samples=2",
        "evaluation.swd={directions=8, repeats=1}",
    ]))
    optimizer = recorder.made[-1]
    assert optimizer.mode == "train"
    # 2 steps; state_dict() for Accelerate's device placement, then for the checkpoints at steps 1 and 2
    assert optimizer.stepped_in == ["train"] * 2 and optimizer.saved_in == ["train"] * 3
    # samples, validation and evaluation after each step; at the end, the model and a sample grid
    assert Counter(optimizer.evaluated_in) == {"save_samples": 3, "validate": 2, "evaluate": 2, "write_model": 1}
    assert optimizer.unchanged == [True]  # step 2 started where step 1 left, eval and train in between
    saved = unet_weights(run)  # the eval weights: the training weights + 0.1
    for name, trained in final.weights.items():
        assert torch.allclose(saved[name], trained + Moded.OFFSET, atol=1e-6), name


# 12 images in batches of 4: 3 steps per epoch, so checkpoint-2 is mid-epoch; samples (eval mode)
# come just before each checkpoint
SCHEDULE_FREE = ['optimizer={name="adamw-schedulefree", lr=2e-3, warmup_steps=2}', "dataset.count=12",
                 "dataset.batch_size=4",
                 "run.max_steps=4", "run.checkpointing_steps=2", "run.save_image_epochs=100",
                 "run.save_model_epochs=100", "sampling.every_n_steps=2"]


def checkpoint_state(path):
    """The checkpoint's model weights, optimizer state and random states."""
    return {"model": load_file(path / "model.safetensors"),
            "optimizer": torch.load(path / "optimizer.bin", weights_only=False),
            "random": torch.load(path / "random_states_0.pkl", weights_only=False)}


def test_schedulefree_resumes_bit_for_bit_and_outputs_its_average(tiny_recipe, tmp_path, capsys, plugin):
    final = plugin(Final(), "final")
    straight = train(recipes.load(tiny_recipe(output_dir=tmp_path / "straight"), SCHEDULE_FREE))
    assert "is not a constant schedule" in capsys.readouterr().err  # the tiny recipe's cosine
    halves = tmp_path / "halves"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", halves / "checkpoints" / "checkpoint-2")
    train(recipes.load(tiny_recipe(output_dir=halves, name="halves.toml"),
                       SCHEDULE_FREE + ['run.resume_from_checkpoint="latest"']))
    end = checkpoint_state(straight / "checkpoints" / "checkpoint-4")
    assert_identical(end, checkpoint_state(halves / "checkpoints" / "checkpoint-4"))
    assert_identical(unet_weights(straight), unet_weights(halves), "unet")

    # the checkpoint is in train mode (weights y); the saved model has the average x = y + (1 - 1/beta1)(z - y)
    group = end["optimizer"]["param_groups"][0]
    assert group["train_mode"] and group["k"] == 4
    beta1 = group["betas"][0]
    names = list(final.weights)  # in the optimizer's order, which numbers its state
    saved, zs = unet_weights(straight), end["optimizer"]["state"]
    for index, name in enumerate(names):
        y, z = end["model"][name], zs[index]["z"]
        assert torch.allclose(saved[name], y.lerp(z, 1 - 1 / beta1), atol=1e-6), name
    assert sum(not torch.equal(saved[n], end["model"][n]) for n in names) > len(names) // 2


def test_adamw_8bit_without_bitsandbytes_is_refused_by_check(cli, tiny_recipe):
    if HAS_BNB:
        pytest.skip("bitsandbytes is installed")
    code, _, err = cli("check", tiny_recipe(), "--set", 'optimizer={name="adamw-8bit"}')
    assert code == 1
    assert "[optimizer] name = 'adamw-8bit' needs bitsandbytes, which is not installed" in err
    assert "pip install 'difftool-optimizers[bnb]'" in err and "name = 'adamw'" in err


def test_adamw_8bit_with_a_bitsandbytes_that_needs_a_gpu_is_refused(monkeypatch):
    class GpuOnly:  # what a bitsandbytes without CPU kernels does at the first step
        def __init__(self, params, **settings):
            self.params, self.state = params, {}

        def step(self):
            raise NotImplementedError("no kernel for optimizer_update_8bit_blockwise on cpu")

    fake = types.SimpleNamespace(__version__="0.45.0", optim=types.SimpleNamespace(AdamW8bit=GpuOnly))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DifftoolError, match=r"no CUDA GPU is visible and bitsandbytes 0\.45\.0 cannot run its 8-bit "
                                            r"AdamW on the CPU \(NotImplementedError: no kernel .*\); upgrade it"):
        factories.adamw_8bit([torch.nn.Parameter(torch.zeros(8))])
