"""Quality per time: SWD against training wall-clock minutes for the quickstart's configuration
and the tutorial's, on the same data (the 64 real butterflies at 32 px), on this machine; and
the SWD scale of that data (its two halves against each other, and pure noise against it).

Run by hand: `python -m benchmarks.quality [--minutes 6] [--out runs/quality]`. Each
configuration trains for `--minutes` of training time (the evaluations' own time is not
counted), evaluated `--evaluations` times with the same SWD settings, 64 samples each.
`--scale-only` prints only the scale: the SWD of part of each data set against the rest (what a
perfect model would score at that sample count) and of uniform noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smithsonian-butterflies-64"

COMMON = """
[run]
output_dir = "{output_dir}"
seed = 0
num_epochs = 100000
max_steps = {max_steps}
save_image_epochs = 100000
save_model_epochs = 100000
overwrite_output_dir = true
log_with = "none"

[dataset]
name = "imagefolder"
path = "{data}"
image_size = 32
batch_size = 16

[noise_scheduler]
name = "ddpm"
num_train_timesteps = 1000

[sampling]
scheduler = "dpm-solver++"
num_inference_steps = 20
thresholding = true
sample_max_value = 1.0
num_images = 4

[evaluation]
metrics = ["swd"]
every_n_steps = {every}
num_samples = 64
batch_size = 32
seed = 1000
"""

CONFIGS = {
    # recipes/quickstart.toml's model and optimiser
    "quickstart": (1e-3, 50, """
[model]
name = "unet2d"
layers_per_block = 1
block_out_channels = [32, 64, 64]
down_block_types = ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
up_block_types = ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
norm_num_groups = 8
"""),
    # recipes/butterflies.toml's (the tutorial's) six-level UNet, lr and warm-up
    "tutorial": (1e-4, 500, """
[model]
name = "unet2d"
layers_per_block = 2
block_out_channels = [128, 128, 256, 256, 512, 512]
down_block_types = ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]
"""),
}


def recipe_text(name: str, output_dir: Path, max_steps: int, every: int) -> str:
    lr, warmup, model = CONFIGS[name]
    return (COMMON.format(output_dir=output_dir.as_posix(), max_steps=max_steps, every=every, data=DATA.as_posix())
            + model + f'\n[optimizer]\nname = "adamw"\nlr = {lr}\n\n[lr_schedule]\nname = "cosine"\n'
            f"num_warmup_steps = {warmup}\n")


def seconds_per_step(name: str, folder: Path) -> float:
    """Training seconds per optimizer step of a configuration, from a short run (steps 3 to 6)."""
    from difftool import recipe as recipes
    from difftool.engine import train

    path = folder / f"{name}-probe.toml"
    path.write_text(recipe_text(name, folder / f"{name}-probe", 6, 1000).replace('metrics = ["swd"]\nevery_n_steps = 1000\n', 'metrics = ["swd"]\n'))
    train(recipes.load(path))
    lines = [json.loads(line) for line in (folder / f"{name}-probe" / "logs" / "history.jsonl").read_text().splitlines()]
    times = {line["step"]: line["time"] for line in lines if "loss" in line}
    return (times[6] - times[3]) / 3


def curve(output_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training minutes, swd) of each evaluation: a step's training time is its loss
    line's time after the session's start, less the evaluations before it."""
    history = [json.loads(line) for line in (output_dir / "logs" / "history.jsonl").read_text().splitlines()]
    start = next(line["time"] for line in history if line.get("event") == "start")
    loss_time = {line["step"]: line["time"] for line in history if "loss" in line}
    evaluations = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    points, spent = [], 0.0
    for evaluation in evaluations:
        points.append((evaluation["step"], (loss_time[evaluation["step"]] - start - spent) / 60, evaluation["values"]["swd"]))
        spent += evaluation["seconds"]
    return points


def butterflies(size: int = 32):
    """The 64 real butterflies as uint8 (64, 3, size, size)."""
    from PIL import Image

    from difftool.data import decode

    return torch.stack([decode(Image.open(p), size) for p in sorted(DATA.glob("*.png"))])


def synthetic(size: int = 32, count: int = 1024):
    """The quickstart's data: its synthetic butterflies as uint8 (count, 3, size, size)."""
    from difftool.builtins.synthetic import synthetic_butterflies
    from difftool.data import decode

    rows = synthetic_butterflies(count=count, seed=0, size=size)
    return torch.stack([decode(rows[i]["image"], size) for i in range(count)])


def scale(images, samples: int) -> tuple[float, float]:
    """SWD of `samples` images of a data set against the others (the floor a perfect model
    reaches at that sample count), and of `samples` uniform-noise images against all of it."""
    from difftool.builtins.swd import swd

    halves = swd()
    halves.update_reference(images[samples:])
    halves.update(images[:samples])
    noise = swd()
    noise.update_reference(images)
    noise.update(torch.randint(0, 256, (samples, *images.shape[1:]), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8))
    return halves.compute()["swd"], noise.compute()["swd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--evaluations", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--configs", default="quickstart,tutorial")
    parser.add_argument("--scale-only", action="store_true", help="only the SWD scale of the data sets")
    args = parser.parse_args()
    from difftool import recipe as recipes
    from difftool.engine import train

    args.out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    halves, noise = scale(butterflies(), 32)
    print(f"SWD scale, 64 real butterflies at 32 px: 32 of them vs the other 32 {halves:.1f}; "
          f"32 uniform-noise images vs all 64 {noise:.1f}")
    halves, noise = scale(synthetic(), 256)  # as `difftool eval runs/quickstart` measures: 256 samples
    print(f"SWD scale, the quickstart's 1024 synthetic butterflies at 32 px: 256 vs the other 768 {halves:.1f}; "
          f"256 uniform-noise images vs all 1024 {noise:.1f}\n")
    if args.scale_only:
        return
    print("| configuration | step | training minutes | SWD |")
    print("|---|---|---|---|")
    for name in args.configs.split(","):
        per_step = seconds_per_step(name, args.out)
        steps = max(args.evaluations, round(args.minutes * 60 / per_step))
        every = max(1, steps // args.evaluations)
        steps = every * args.evaluations
        path = args.out / f"{name}.toml"
        path.write_text(recipe_text(name, args.out / name, steps, every))
        started = time.perf_counter()
        train(recipes.load(path))
        for step, minutes, value in curve(args.out / name):
            print(f"| {name} | {step} | {minutes:.1f} | {value:.1f} |", flush=True)
        print(f"<!-- {name}: {per_step:.2f} s/step probed, {time.perf_counter() - started:.0f} s in all -->", flush=True)


if __name__ == "__main__":
    main()
