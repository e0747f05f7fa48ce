"""What a run knows about itself: handed to training hooks and checkpointed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the fields a checkpoint carries (the rest is rebuilt from the recipe)
COUNTERS = ("global_step", "epoch", "batches_done", "nonfinite_in_a_row", "nonfinite_total")


@dataclass
class TrainState:
    """The run's objects and counters; `loss` is the last optimizer step's mean loss."""

    recipe: Any
    accelerator: Any
    model: Any
    optimizer: Any
    lr_schedule: Any
    output_dir: Path
    ema: Any = None
    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch already trained on
    loss: float = math.nan
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    val_loss: float = math.nan
    window_losses: list = field(default_factory=list)  # micro-batch losses of the current step
    window_nonfinite: bool = False  # a micro-batch of the current step had a NaN/Inf loss
    extra: dict = field(default_factory=dict)  # free room for plugins

    def state_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def load_state_dict(self, saved: dict[str, int]) -> None:
        for name in COUNTERS:
            setattr(self, name, saved[name])

