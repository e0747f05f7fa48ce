"""Mixed precision's accuracy and speed: the quickstart's model trained for a few dozen steps in
fp32 and in bf16 (or fp16 on CUDA) from the same seed, loss curves and step times compared.

Run by hand: `python -m benchmarks.precision [--steps 40] [--precisions no,bf16]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import difftool
from benchmarks.train import BATCH, DATA, SMALL_UNET, recipe_file


class Losses:
    """A difftool plugin that keeps every optimizer step's loss and time."""

    def __init__(self):
        self.losses, self.stamps = [], []

    @difftool.hookimpl
    def on_step_end(self, state):
        self.losses.append(state.loss)
        self.stamps.append(time.perf_counter())


def run(precision: str, steps: int, data: Path) -> Losses:
    from difftool import recipe as recipes
    from difftool.engine import train
    from difftool.plugins import load_plugins, pm

    load_plugins()
    seen = Losses()
    pm.register(seen, name="benchmark-losses")
    try:
        with tempfile.TemporaryDirectory() as out:
            train(recipes.load(recipe_file({
                "run": {"output_dir": out, "num_epochs": 1000, "max_steps": steps, "mixed_precision": precision,
                        "save_image_epochs": 1000, "save_model_epochs": 1000},
                "dataset": {"name": "imagefolder", "path": str(data), "image_size": 32, "batch_size": BATCH},
                "model": {"name": "unet2d", **SMALL_UNET},
                "optimizer": {"name": "adamw", "lr": 1e-3},
                "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1},
            }, Path(out))))
    finally:
        pm.unregister(name="benchmark-losses")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    runs = {p: run(p, args.steps, args.data) for p in args.precisions.split(",")}
    quarter = max(args.steps // 4, 1)
    print(f"| mixed precision | s/step | mean loss, first {quarter} steps | mean loss, last {quarter} steps |")
    print("|---|---|---|---|")
    for precision, seen in runs.items():
        step = statistics.median(b - a for a, b in zip(seen.stamps, seen.stamps[1:]))
        print(f"| {precision} | {step:.3f} | {statistics.mean(seen.losses[:quarter]):.4f} | "
              f"{statistics.mean(seen.losses[-quarter:]):.4f} |")


if __name__ == "__main__":
    main()
