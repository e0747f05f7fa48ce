"""Training speed: the tutorial's loop against `difftool run`, same data, model and batch,
alternating in one process, with achieved GFLOP/s against this machine's matmul peaks.

Run by hand: `python -m benchmarks.train [--sizes small-32,tutorial-64,tutorial-128]
[--precisions no,auto] [--steps 4] [--rounds 2] [--data DIR]`. Each run's first step
(warm-up) is left out; the figure is the median step time over the rest, over all rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import difftool
from benchmarks import tutorial

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smithsonian-butterflies-64"
TUTORIAL_UNET = {
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "layers_per_block": 2,
}
SMALL_UNET = {  # the quickstart's
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
SIZES = {"small-32": (32, SMALL_UNET), "tutorial-64": (64, TUTORIAL_UNET), "tutorial-128": (128, TUTORIAL_UNET)}
BATCH = 16


def time_tutorial(data: Path, size: int, unet: dict, steps: int) -> list[float]:
    """Step times of the tutorial's own loop (fp32: its fp16 needs a GPU)."""
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        config = tutorial.TrainingConfig(image_size=size, train_batch_size=BATCH, mixed_precision="no", output_dir=out)
        tutorial.run(str(data), config, max_steps=steps, on_step=lambda step, loss: stamps.append(time.perf_counter()),
                     **unet)
    return [b - a for a, b in zip(stamps, stamps[1:])]


class StepLog:
    """A difftool plugin that keeps the time and loss of every optimizer step."""

    def __init__(self):
        self.stamps, self.losses = [], []

    @difftool.hookimpl
    def on_step_end(self, state):
        self.stamps.append(time.perf_counter())
        self.losses.append(state.loss)

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def recipe_file(data: dict, folder: Path) -> Path:
    """Write a recipe (as a dict) to folder/recipe.toml."""
    import tomli_w

    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def train_logged(recipe: dict, log: StepLog | None = None) -> StepLog:
    """`difftool run` of `recipe` (its [run] output_dir filled in with a temp folder), in this
    process, with every step's time and loss logged (into `log`, any plugin object, if given)."""
    from difftool import recipe as recipes
    from difftool.engine import train
    from difftool.plugins import load_plugins, pm

    load_plugins()
    log = log or StepLog()
    pm.register(log, name="benchmark-step-log")
    try:
        with tempfile.TemporaryDirectory() as out:
            recipe["run"]["output_dir"] = str(Path(out) / "run")  # a new folder: the recipe file sits beside it
            train(recipes.load(recipe_file(recipe, Path(out))))
    finally:
        pm.unregister(name="benchmark-step-log")
    return log


def benchmark_recipe(size: int, unet: dict, steps: int, data: Path = DATA, **sections) -> dict:
    """The recipe (as a dict) of the benchmarks' difftool runs: `steps` steps of the tutorial's
    work on `data` (AdamW at 1e-4, DDPM 1000), sampling cut to one image of one step, nothing
    saved before the end; `sections` add or update keys, e.g. run={"compile": True}."""
    recipe = {
        "run": {"num_epochs": 1000, "max_steps": steps, "save_image_epochs": 100000, "save_model_epochs": 100000},
        "dataset": {"name": "imagefolder", "path": str(data), "image_size": size, "batch_size": BATCH},
        "model": {"name": "unet2d", **unet},
        "noise_scheduler": {"name": "ddpm", "num_train_timesteps": 1000},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1},
    }
    for section, keys in sections.items():
        recipe.setdefault(section, {}).update(keys)
    return recipe


def time_difftool(data: Path, size: int, unet: dict, steps: int, precision: str) -> list[float]:
    """Step times of `difftool run` on the same work, with the tutorial's schedule."""
    return train_logged(benchmark_recipe(size, unet, steps, data, run={"mixed_precision": precision},
                                         lr_schedule={"name": "cosine", "num_warmup_steps": 500})).step_times()


def flops_per_step(size: int, unet: dict) -> float:
    """FLOPs of one forward + backward of a batch, counted on the meta device (no compute)."""
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet2DModel(sample_size=size, **unet)
        x = torch.randn(BATCH, 3, size, size)
        t = torch.zeros(BATCH, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.sum().backward()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of large square matmuls (the most this CPU does in `dtype`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 1:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small-32,tutorial-64,tutorial-128")
    parser.add_argument("--precisions", default="no,auto", help="difftool's mixed_precision values to run")
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first one left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    from difftool.precision import resolve

    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, size=256, seconds=0.5)
    print(f"matmul peaks: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s; 'auto' is '{resolve('auto')}' here")
    print("| size | loop | mixed precision | img/s | vs tutorial | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sizes.split(","):
        size, unet = SIZES[name]
        flops = flops_per_step(size, unet)
        times: dict[str, list[float]] = {"tutorial": []}
        for _ in range(args.rounds):  # alternate, so that drifts in machine speed hit all alike
            times["tutorial"] += time_tutorial(args.data, size, unet, args.steps)
            for precision in args.precisions.split(","):
                times.setdefault(precision, []).extend(time_difftool(args.data, size, unet, args.steps, precision))
        base = BATCH / statistics.median(times["tutorial"])
        for loop, measured in times.items():
            speed = BATCH / statistics.median(measured)
            precision = "no" if loop == "tutorial" else resolve(loop)
            achieved = flops / statistics.median(measured) / 1e9
            peak = bf16 if precision == "bf16" else fp32
            label = "tutorial" if loop == "tutorial" else "difftool"
            shown = "no" if loop == "tutorial" else (loop if loop == precision else f"{loop} ({precision})")
            print(f"| {name} | {label} | {shown} | {speed:.2f} | {speed / base:.2f}x | {achieved:.0f} | "
                  f"{100 * achieved / peak:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
