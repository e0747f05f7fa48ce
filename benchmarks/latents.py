"""Latent caching: text-to-image training epochs that run the VAE on every image, against
epochs that read the VAE's latents from difftool's cache.

The VAE has Stable Diffusion 1.5's architecture (random weights: the cost is the same); the
UNet and the text encoder are difftool.tiny_models' tiny ones, so the figures show what the
cache takes out of a step rather than SD's UNet cost. random_flip is off, so that the second
epoch finds every latent cached (with it on, each image has two latents to fill).

Run by hand: `python -m benchmarks.latents [--images 64] [--size 256] [--batch 8]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import difftool
from benchmarks.train import StepLog, train_logged

# Stable Diffusion 1.5's vae/config.json
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


class EpochLog(StepLog):
    """StepLog, plus the time training started."""

    @difftool.hookimpl
    def on_train_start(self, state):
        self.stamps.append(time.perf_counter())


def write_pipeline(folder: Path) -> Path:
    """A tiny Stable Diffusion pipeline whose VAE is SD 1.5's."""
    from diffusers import AutoencoderKL

    from difftool.tiny_models import write_pipeline as write_tiny

    write_tiny(folder)
    AutoencoderKL(**SD15_VAE).save_pretrained(folder / "vae")
    return folder


def run_epochs(pipeline: Path, cache_dir: Path, images: int, size: int, batch: int, epochs: int, cache: bool) -> list[float]:
    """Seconds per epoch of a tiny-SD LoRA-less run on captioned synthetic butterflies."""
    recipe = {
        "run": {"seed": 0, "num_epochs": epochs, "save_image_epochs": 10_000, "save_model_epochs": 10_000,
                "log_with": "none"},
        "dataset": {"name": "synthetic-butterflies", "count": images, "size": size, "captions": True,
                    "image_size": size, "batch_size": batch, "random_flip": False, "cache": cache,
                    "latent_cache_dir": str(cache_dir)},
        "model": {"name": "stable-diffusion", "pretrained": str(pipeline)},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1},
    }
    log = train_logged(recipe, EpochLog())
    per_epoch = -(-images // batch)
    ends = log.stamps[::per_epoch]
    return [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        pipeline = write_pipeline(Path(folder) / "pipeline")
        cache_dir = Path(folder) / "cache"
        plain = run_epochs(pipeline, cache_dir, args.images, args.size, args.batch, 2, cache=False)
        filling = run_epochs(pipeline, cache_dir, args.images, args.size, args.batch, 2, cache=True)
        warm = run_epochs(pipeline, cache_dir, args.images, args.size, args.batch, 1, cache=True)
    rate = [args.images / seconds for seconds in plain + filling + warm]
    print(f"{args.images} images of {args.size} px, batch {args.batch}, SD 1.5 VAE, tiny UNet and text encoder")
    print("| epoch | img/s | vs VAE every epoch |")
    print("|---|---|---|")
    labels = ["VAE every epoch: epoch 1", "VAE every epoch: epoch 2", "cache, new: epoch 1 (fills it)",
              "cache, new: epoch 2", "cache, from an earlier run: epoch 1"]
    baseline = sum(rate[:2]) / 2
    for label, value in zip(labels, rate):
        print(f"| {label} | {value:.3g} | {value / baseline:.2f}x |")


if __name__ == "__main__":
    main()
