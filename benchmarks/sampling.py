"""Sample-grid time: the tutorial's `evaluate` (DDPMPipeline, 1000 steps, 16 images) against
difftool's grid with the quickstart's sampler (DPM-Solver++, 25 steps, 16 images, batched).

Run by hand: `python -m benchmarks.sampling [--sizes small-32,tutorial-64] [--ddpm-steps 1000]`.
With `--ddpm-steps N` below 1000, DDPM's time is measured over N steps and scaled to 1000
(each DDPM step is one model call on the same batch, so time grows linearly).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.train import SIZES

GRID = 16


def ddpm_grid_seconds(unet, steps: int) -> float:
    """The tutorial's evaluate(): DDPMPipeline(batch_size=16), timed over `steps`, scaled to 1000."""
    from diffusers import DDPMPipeline, DDPMScheduler

    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    pipeline(batch_size=GRID, generator=torch.manual_seed(0), num_inference_steps=steps)
    return (time.perf_counter() - started) * 1000 / steps


def difftool_grid_seconds(unet, size: int) -> float:
    """difftool's grid as the quickstart recipe samples it."""
    from diffusers import DDPMScheduler

    from difftool.plugins import registry
    from difftool.sampling import generate, sampling_scheduler

    entry = registry("schedulers").get("dpm-solver++")
    sampler = sampling_scheduler(entry, dict(DDPMScheduler(num_train_timesteps=1000).config),
                                 {"thresholding": True, "sample_max_value": 1.0}, "benchmark")
    started = time.perf_counter()
    generate(unet, sampler, num_images=GRID, num_inference_steps=25, seed=0, image_size=size, device="cpu")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small-32,tutorial-64")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    args = parser.parse_args()
    from diffusers import UNet2DModel

    print("| size | tutorial: DDPM 1000 | difftool: DPM-Solver++ 25 | faster |")
    print("|---|---|---|---|")
    for name in args.sizes.split(","):
        size, config = SIZES[name]
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=size, **config).eval()
        ddpm = ddpm_grid_seconds(unet, args.ddpm_steps)
        ours = difftool_grid_seconds(unet, size)
        measured = "" if args.ddpm_steps == 1000 else f" (from {args.ddpm_steps} steps)"
        print(f"| {name} | {ddpm:.0f} s{measured} | {ours:.1f} s | {ddpm / ours:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
