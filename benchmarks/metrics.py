"""Metric cost: seconds per 1,000 images for the built-in `swd` metric (default settings), at
each image size:

- reference: building the reference state from 1,000 images (update_reference in batches,
  then reference_state), what a first evaluation against a data set pays once;
- cached: with that state loaded, update with 1,000 generated images, then compute(), what
  every later evaluation pays (compute() sorts 2 x 2,048 projections of each level's 128,000
  descriptors, and is most of it).

The images are difftool's synthetic butterflies (the cost does not depend on their content).
Each figure is the best of `--rounds`, after a warm-up on a few images: this VM's speed drifts.
compute()'s cost grows with the descriptors kept, so it stops growing at max_descriptors
(131,072: 1,024 images at 128 descriptors each); 10,000 images cost 10x the updates and the
same compute().

Run by hand: `python -m benchmarks.metrics [--sizes 32,64] [--images 1000] [--batch 100] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
import torch

from difftool.builtins.swd import swd
from difftool.builtins.synthetic import synthetic_butterflies


def cpu_name() -> str:
    """lscpu's model name ("unknown" where lscpu is missing)."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def butterflies(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` synthetic butterflies as a uint8 tensor (N, 3, size, size)."""
    rows = synthetic_butterflies(count, seed=seed, size=size)
    return torch.from_numpy(np.stack([np.asarray(row["image"]) for row in rows])).permute(0, 3, 1, 2).contiguous()


def batches(images: torch.Tensor, batch: int):
    """`images` in batches of `batch`."""
    return (images[start:start + batch] for start in range(0, len(images), batch))


def time_swd(reference: torch.Tensor, generated: torch.Tensor, batch: int) -> dict[str, float]:
    """Seconds for each stage: the reference pass, then with its state loaded into a fresh
    metric, the generated pass and compute()."""
    started = time.perf_counter()
    metric = swd()
    for images in batches(reference, batch):
        metric.update_reference(images)
    state = metric.reference_state()
    reference_s = time.perf_counter() - started

    started = time.perf_counter()
    metric = swd()
    metric.load_reference_state(state)
    for images in batches(generated, batch):
        metric.update(images)
    update_s = time.perf_counter() - started
    started = time.perf_counter()
    values = metric.compute()
    compute_s = time.perf_counter() - started
    return {"reference": reference_s, "update": update_s, "compute": compute_s, "swd": values["swd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"`swd` (default settings), {args.images} images each side, batches of {args.batch}, best of "
          f"{args.rounds}; seconds per 1,000 images (compute(): seconds, once per evaluation)\n")
    print(f"| size | reference state | cached: update | cached: compute() of {args.images} | cached: total | swd |")
    print("|---|---|---|---|---|---|")
    per_1000 = 1000 / args.images
    for size in (int(text) for text in args.sizes.split(",")):
        reference = butterflies(args.images, size, seed=0)
        generated = butterflies(args.images, size, seed=1)
        time_swd(reference[:8], generated[:8], args.batch)  # warm-up
        rounds = [time_swd(reference, generated, args.batch) for _ in range(args.rounds)]
        times = {stage: min(r[stage] for r in rounds) for stage in rounds[0]}
        print(f"| {size} px | {times['reference'] * per_1000:.2f} s | {times['update'] * per_1000:.2f} s | "
              f"{times['compute']:.1f} s | {times['update'] * per_1000 + times['compute']:.1f} s | "
              f"{times['swd']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
