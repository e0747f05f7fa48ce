"""Data loading speed on full-size photos: the tutorial's `set_transform` path against
difftool's loader, its first epoch (decoding, filling the uint8 cache) and a later one.

Run by hand: `python -m benchmarks.loader [--images 1000] [--size 64] [--workers 0,2]`.
The JPEGs (768x512, generated) are written once to a temp folder and reused.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import tutorial
from benchmarks.train import BATCH, recipe_file


def make_jpegs(count: int) -> Path:
    """`count` 768x512 JPEGs of smooth random colour fields with noise, made once."""
    from PIL import Image

    folder = Path(tempfile.gettempdir()) / f"difftool-benchmark-jpegs-{count}"
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.random((4, 6, 3)) * 255
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((768, 512), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def images_per_second(loader) -> float:
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - started)


def tutorial_speed(folder: Path, size: int) -> float:
    config = tutorial.TrainingConfig(image_size=size, train_batch_size=BATCH)
    dataset = tutorial.make_dataset(str(folder), config)
    return images_per_second(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True))


def difftool_speeds(folder: Path, size: int, workers: int) -> tuple[float, float]:
    """(first epoch, second epoch) images/s of build.dataloader on the imagefolder dataset."""
    from difftool import build
    from difftool import recipe as recipes

    with tempfile.TemporaryDirectory() as out:
        recipe = recipes.load(recipe_file({
            "run": {"output_dir": out},
            "dataset": {"name": "imagefolder", "path": str(folder), "image_size": size, "batch_size": BATCH,
                        "num_workers": workers},
        }, Path(out)))
        loader = build.dataloader(recipe, build.rows(recipe, recipe.kwargs("dataset")))
        first = images_per_second(loader)
        loader.sampler.set_epoch(1)
        return first, images_per_second(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    folder = make_jpegs(args.images)
    base = tutorial_speed(folder, args.size)
    print(f"{args.images} JPEGs of 768x512 to {args.size} px, batch {BATCH}")
    print("| loader | workers | epoch | img/s | vs tutorial |")
    print("|---|---|---|---|---|")
    print(f"| tutorial (set_transform) | 0 | every | {base:.0f} | 1.0x |")
    for workers in (int(w) for w in args.workers.split(",")):
        first, later = difftool_speeds(folder, args.size, workers)
        print(f"| difftool | {workers} | first (decode + cache) | {first:.0f} | {first / base:.1f}x |")
        print(f"| difftool | {workers} | later (cached) | {later:.0f} | {later / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
