"""The run history: every value the engine logs, one JSON line each, whatever tracker the recipe picks.

`HistoryTracker` is an Accelerate tracker that appends to `output_dir/logs/history.jsonl`:

- `{"event": "start", "time": T, "num_processes": N}` when a training session starts (a new
  run, and each resume);
- `{"step": S, "time": T, **values}` for each `accelerator.log(values, step=S)`: the JSON scalars
  among the values, with NaN and infinities written as null.

Lines are flushed one by one. A session interrupted after its last checkpoint leaves lines for
steps that the next session trains again; readers (difftool.compare) take the last line per step.
A run started afresh over an earlier one (overwrite_output_dir, or a restart before the first
checkpoint) appends too: its first line (step 1 with a loss, or step 0) tells readers that the
lines before it belong to the earlier run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

from difftool import files

FILE = Path("logs") / "history.jsonl"


def json_scalar(value: Any) -> tuple[bool, Any]:
    """(whether `value` is a scalar JSON can hold, that value): numbers as int or float (NaN
    and infinities as None), strings, booleans, None; anything else (an image, a tensor) is not."""
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, numbers.Integral):
        return True, int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return True, number if math.isfinite(number) else None
    return False, None


class HistoryTracker(GeneralTracker):
    """Appends every logged value to `output_dir/logs/history.jsonl` (main process only).

    The file is opened when Accelerate starts the tracker (in `init_trackers`), which writes the
    session's start line; `num_processes` is read then, when the Accelerator exists.
    """

    name = "history"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, output_dir: Path):
        super().__init__()
        self.path = Path(output_dir) / FILE
        self.file = None

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def start(self) -> None:
        from accelerate.state import PartialState

        self.open()
        self.write({"event": "start", "time": time.time(), "num_processes": PartialState().num_processes})

    def store_init_configuration(self, values: dict) -> None:
        """Nothing: the run's configuration is its recipe.toml."""

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        if self.file is None:  # an Accelerate that does not call start()
            self.start()
        line: dict[str, Any] = {"step": step, "time": time.time()}
        for key, value in values.items():
            ok, scalar = json_scalar(value)
            if ok:
                line[key] = scalar
        self.write(line)

    @on_main_process
    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def open(self) -> None:
        """Open the file for appending, ending a line that a killed session left half-written."""
        with files.writing("the run history", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_short = False
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    cut_short = existing.read(1) != b"\n"
            self.file = open(self.path, "a", encoding="utf-8")
            if cut_short:
                self.file.write("\n")

    def write(self, line: dict) -> None:
        """Append one line and flush it, so a killed run keeps every line written before."""
        with files.writing("the run history", self.path):
            self.file.write(json.dumps(line, allow_nan=False) + "\n")
            self.file.flush()
