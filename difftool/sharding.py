"""Sharded training through Accelerate (FSDP, DeepSpeed): what a launch asked for, what difftool
refuses under it, and the DeepSpeed settings it takes from the recipe. The scale-out is Accelerate's.

`accelerate launch --config_file configs/accelerate/X.yaml` tells the processes it starts what to
do through environment variables (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, ...). They are
read here, before any Accelerator exists, so that a refused launch fails before anything is built.

- On a machine without CUDA, Accelerate never turns FSDP or DeepSpeed on: in CPU mode (which
  difftool uses for several CPU processes) it trains plain data-parallel instead, without a word.
  difftool refuses that launch rather than pretend.
- FSDP, and DeepSpeed ZeRO stage 3, split the parameters themselves across the processes. difftool
  samples, validates and saves the model in the main process alone, which needs every weight
  there, so these are refused.
- DeepSpeed ZeRO stages 0 to 2 split optimizer state and gradients but keep the whole model in
  every process: everything works as with DDP. DeepSpeed's "auto" gradient clipping is set from
  run.max_grad_norm (Accelerate fills batch size and accumulation from the data loader and the
  Accelerator).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from difftool.errors import DifftoolError

FSDP, DEEPSPEED = "FSDP", "DeepSpeed"
CONFIGS = "configs/accelerate"


def launched_with() -> str | None:
    """FSDP or DeepSpeed when `accelerate launch` was given such a config, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DEEPSPEED
    return None


def zero_stage() -> int:
    """The ZeRO stage of a DeepSpeed launch: its deepspeed_config_file's, else the config's
    zero_stage (2, Accelerate's default, when it names none)."""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        try:
            return int(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            raise DifftoolError(f"the DeepSpeed config file {config_file} could not be read ({exc}); "
                                "fix its JSON, or use zero_stage in the Accelerate config instead") from exc
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def problem(cuda_available: bool) -> str | None:
    """Why this launch cannot train with difftool, or None."""
    mode = launched_with()
    if mode is None:
        return None
    if not cuda_available:
        from accelerate import __version__ as accelerate_version

        return (f"this run was launched with an Accelerate {mode} config, but this machine has no CUDA GPU: "
                f"Accelerate {accelerate_version} uses {mode} only on GPUs (on CPUs it would train plain "
                f"data-parallel instead). Launch on GPUs, or use {CONFIGS}/cpu-2proc.yaml for several CPU processes")
    stage = zero_stage() if mode == DEEPSPEED else None
    if mode == FSDP or stage >= 3:
        sharded = "FSDP" if mode == FSDP else f"DeepSpeed ZeRO stage {stage}"
        return (f"this run was launched with {sharded}, which splits the model's weights across the processes, "
                "but difftool samples, validates and saves the model in the main process alone, which needs all of "
                f"them: launch with DeepSpeed ZeRO stage 2 ({CONFIGS}/deepspeed-zero2.yaml), which splits the "
                f"optimizer state and gradients but keeps the whole model in each GPU, or DDP ({CONFIGS}/multi-gpu.yaml)")
    return None


def check_launch(cuda_available: bool | None = None) -> None:
    """Refuse a launch that difftool cannot train with (one message: the problem and the fix)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if message := problem(cuda_available):
        raise DifftoolError(message)


def configure(recipe, accelerator) -> None:
    """Under DeepSpeed, set the config's "auto" gradient clipping to run.max_grad_norm (0: none),
    which DeepSpeed applies itself; before anything is prepared. Elsewhere, nothing."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = float(recipe["run"]["max_grad_norm"] or 0.0)


def saves_own_state(accelerator) -> bool:
    """Whether Accelerate's save_state writes the model through FSDP or DeepSpeed (every process
    its part, in their own formats) rather than as one state dict that difftool's hooks can edit."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

