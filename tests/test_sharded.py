"""Scaling out through Accelerate: the example configs, FSDP/DeepSpeed refusals and settings, and
a real 2-process launch from a config file that checkpoints, resumes and saves a loadable pipeline."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difftool import sharding
from difftool.checkpoints import save_only_trainable
from difftool.errors import DifftoolError
from difftool.testing import running

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE")


@pytest.fixture
def launched(monkeypatch):
    """Set the environment as `accelerate launch` would for a config; cleared afterwards."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)

    def launch(**env: str):
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return launch


def launch_env(config: Path) -> tuple[SimpleNamespace, dict]:
    """(arguments, environment) that `accelerate launch --config_file CONFIG` gives its processes,
    by Accelerate's own launch code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "difftool", "run", "r.toml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_example_config_loads_and_launches_what_it_says(launched):
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {  # config: (distributed_type, processes, machines, what difftool makes of it on a GPU machine)
        "cpu-2proc.yaml": ("MULTI_GPU", 2, 1, None),
        "multi-gpu.yaml": ("MULTI_GPU", 8, 1, None),
        "two-nodes.yaml": ("MULTI_GPU", 16, 2, None),
        "deepspeed-zero2.yaml": ("DEEPSPEED", 8, 1, None),
        "fsdp.yaml": ("FSDP", 8, 1, "splits the model's weights"),
        "fsdp-cpu-2proc.yaml": ("FSDP", 2, 1, "splits the model's weights"),
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes, machines, refusal) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
        args, env = launch_env(CONFIGS / name)
        assert args.num_processes == processes
        launched(**{key: value for key, value in env.items() if key in LAUNCH_ENV})
        found = sharding.problem(cuda_available=True)
        assert found is None if refusal is None else refusal in found, (name, found)
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2  # FSDP2, as recommended
    args, _ = launch_env(CONFIGS / "two-nodes.yaml")
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 0, "8")


def test_fsdp_and_zero3_are_refused_zero2_is_not(launched, tmp_path):
    assert sharding.problem(cuda_available=False) is None  # no FSDP/DeepSpeed launch: nothing to refuse
    launched(ACCELERATE_USE_FSDP="true")
    message = sharding.problem(cuda_available=True)
    assert "FSDP" in message and "main process alone" in message and "deepspeed-zero2.yaml" in message
    launched(ACCELERATE_USE_FSDP="false", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    assert sharding.problem(cuda_available=True) is None
    launched(ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    assert "ZeRO stage 3" in sharding.problem(cuda_available=True)
    config = tmp_path / "ds.json"  # a DeepSpeed config file decides the stage
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    launched(ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config))
    assert "ZeRO stage 3" in sharding.problem(cuda_available=True)
    config.write_text("{not json")
    with pytest.raises(DifftoolError, match="could not be read"):
        sharding.problem(cuda_available=True)
    launched(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(tmp_path / "absent.json"), ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    assert sharding.problem(cuda_available=True) is None
    with pytest.raises(DifftoolError, match="no CUDA GPU.*cpu-2proc.yaml"):
        sharding.check_launch(cuda_available=False)


def test_deepspeed_takes_gradient_clipping_from_the_recipe():
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    recipe = {"run": {"max_grad_norm": 0.5}}
    plugin = DeepSpeedPlugin(zero_stage=2)  # as Accelerate builds it from the launch's environment
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    sharding.configure(recipe, accelerator)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    # Accelerate's own filling of "auto" values, at prepare, keeps it
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=8,
                                    train_batch_size=16, gradient_accumulation_steps=1)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 8
    chosen = DeepSpeedPlugin(zero_stage=2, gradient_clipping=2.0)  # a value the config names stays
    sharding.configure({"run": {"max_grad_norm": 0.0}}, SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=chosen)))
    assert chosen.deepspeed_config["gradient_clipping"] == 2.0


def test_trainable_only_checkpoints_are_left_to_deepspeed_and_fsdp():
    from accelerate.utils import DistributedType

    for kind, hooked in ((DistributedType.NO, True), (DistributedType.MULTI_CPU, True),
                         (DistributedType.DEEPSPEED, False), (DistributedType.FSDP, False)):
        registered = []
        accelerator = SimpleNamespace(distributed_type=kind, register_save_state_pre_hook=registered.append,
                                      register_load_state_pre_hook=registered.append)
        save_only_trainable(accelerator)
        assert bool(registered) == hooked, kind


def launch(config: str, recipe: Path, cwd: Path, *overrides: str):
    return running([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                    "-m", "difftool", "run", str(recipe), *[a for o in overrides for a in ("--set", o)]], cwd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_an_fsdp_launch_on_cpus_is_refused_before_anything_is_built(tiny_recipe, tmp_path):
    output_dir = tmp_path / "fsdp"
    with launch("fsdp-cpu-2proc.yaml", tiny_recipe(output_dir=output_dir), tmp_path) as process:
        _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "error: this run was launched with an Accelerate FSDP config, but this machine has no CUDA GPU" in err
    assert "configs/accelerate/cpu-2proc.yaml" in err
    assert "difftool/" not in err  # no traceback of difftool's (torchrun prints its own summary)
    assert not output_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_deepspeed_launch_on_cpus_is_refused(tiny_recipe, tmp_path):
    output_dir = tmp_path / "deepspeed"
    with launch("deepspeed-zero2.yaml", tiny_recipe(output_dir=output_dir), tmp_path) as process:
        _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "launched with an Accelerate DeepSpeed config, but this machine has no CUDA GPU" in err
    assert not output_dir.exists()


def test_two_processes_from_the_cpu_config_checkpoint_resume_and_save_a_loadable_pipeline(tiny_recipe, tmp_path):
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    from difftool import integrity

    output_dir = tmp_path / "ddp"
    recipe = tiny_recipe(output_dir=output_dir)
    # 16 images in batches of 8 per process, 2 processes: 1 optimizer step per epoch
    with launch("cpu-2proc.yaml", recipe, tmp_path, "run.num_epochs=1", "run.checkpointing_steps=1") as process:
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    first = output_dir / "checkpoints" / "checkpoint-1"
    assert integrity.verify(first) is None
    listed = json.loads((first / integrity.MANIFEST).read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= listed.keys()  # every process's part
    with launch("cpu-2proc.yaml", recipe, tmp_path, "run.num_epochs=2", "run.checkpointing_steps=1",
                "run.resume_from_checkpoint='latest'") as process:
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "resumed from" in err and "at step 1" in err
    final = load_file(output_dir / "checkpoints" / "checkpoint-2" / "model.safetensors")
    pipeline = DDPMPipeline.from_pretrained(output_dir)
    loaded = pipeline.unet.state_dict()
    assert final.keys() == loaded.keys()
    assert all(torch.equal(final[name], loaded[name]) for name in final)
