"""Where a training step's time goes: torch.profiler over one step (after a warm-up step) of a
UNet, the top operators by their own CPU time.

Run by hand: `python -m benchmarks.profile [--size tutorial-128] [--top 12]`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.train import BATCH, SIZES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tutorial-128")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from diffusers import UNet2DModel
    from torch.profiler import ProfilerActivity, profile

    size, config = SIZES[args.size]
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=size, **config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, timesteps = torch.randn(BATCH, 3, size, size), torch.randint(0, 1000, (BATCH,))

    def step():
        loss = F.mse_loss(model(images, timesteps).sample, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
