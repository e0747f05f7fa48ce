"""Mixed precision's accuracy and speed: the quickstart's model trained for a few dozen steps in
fp32 and in bf16 (or fp16 on CUDA) from the same seed, loss curves and step times compared.

Run by hand: `python -m benchmarks.precision [--steps 40] [--precisions no,bf16]`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.train import DATA, SMALL_UNET, StepLog, benchmark_recipe, train_logged


def run(precision: str, steps: int, data: Path) -> StepLog:
    """The quickstart UNet trained `steps` steps at 32 px in `precision`, each step logged."""
    return train_logged(benchmark_recipe(32, SMALL_UNET, steps, data, run={"mixed_precision": precision},
                                         optimizer={"lr": 1e-3}))


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
        step = statistics.median(seen.step_times())
        print(f"| {precision} | {step:.3f} | {statistics.mean(seen.losses[:quarter]):.4f} | "
              f"{statistics.mean(seen.losses[-quarter:]):.4f} |")


if __name__ == "__main__":
    main()
