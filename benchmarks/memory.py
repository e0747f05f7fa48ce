"""Memory savers: peak memory and step time with gradient checkpointing, the text-embedding and
latent caches, and VAE slicing, on and off.

Two models: (a) the tutorial's UNet (113.7 M parameters, benchmarks.train's TUTORIAL_UNET) at
128 px, batch 16; (b) a text-to-image UNet: difftool.tiny_models' tiny Stable Diffusion with SD
1.5's VAE (benchmarks.latents' pipeline) at 256 px, on captioned synthetic butterflies. Each
configuration trains a few steps in a fresh subprocess, which reports its peak memory during the
training steps (the saves at the end left out): on CUDA `torch.cuda.max_memory_allocated`; on a
CPU the process's peak RSS (VmHWM, reset when training starts where Linux allows, so that
building the model does not count), and how far above the RSS at the start of training it went.
The step time is the median over the steps after the first.

Run by hand: `python -m benchmarks.memory [--models a,b] [--steps 2] [--batch-b 4]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import difftool

RESULT = "benchmark-result: "  # the child's last line: RESULT + JSON


def status_bytes(field: str) -> int | None:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryLog:
    """A difftool plugin: the time of each optimizer step, and the peak memory up to the last."""

    def __init__(self):
        self.stamps, self.start_rss, self.peak, self.reset = [], None, None, False

    @difftool.hookimpl
    def on_train_start(self, state):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_rss = status_bytes("VmRSS")
        try:  # "5" resets the peak RSS (Linux 4.0 and later)
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            pass
        self.stamps.append(time.perf_counter())

    @difftool.hookimpl
    def on_step_end(self, state):
        import torch

        self.stamps.append(time.perf_counter())
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = status_bytes("VmHWM")
            if self.peak is None:
                import resource

                self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def recipe(config: dict) -> dict:
    """The recipe of one configuration (see CONFIGS)."""
    from benchmarks.train import TUTORIAL_UNET

    steps, batch = config["steps"], config["batch"]
    run = {"num_epochs": 1, "max_steps": steps, "save_image_epochs": 10_000, "save_model_epochs": 10_000,
           "log_with": "none", "gradient_checkpointing": config["checkpointing"]}
    common = {"optimizer": {"name": "adamw", "lr": 1e-4},
              "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1}}
    if config["model"] == "a":
        return {"run": run, **common,
                "dataset": {"name": "synthetic-butterflies", "count": batch * steps, "size": 128, "image_size": 128,
                            "batch_size": batch},
                "model": {"name": "unet2d", **TUTORIAL_UNET},
                "noise_scheduler": {"name": "ddpm", "num_train_timesteps": 1000}}
    return {"run": run, **common,
            "dataset": {"name": "synthetic-butterflies", "count": batch * steps, "size": 256, "captions": True,
                        "image_size": 256, "batch_size": batch, "random_flip": False, "cache": config["cache"],
                        "latent_cache_dir": config["cache_dir"]},
            "model": {"name": "stable-diffusion", "pretrained": config["pipeline"], "vae_slicing": config["slicing"]}}


def child(config: dict) -> None:
    """Train one configuration in this process; print its figures as the last line."""
    import torch

    from benchmarks.train import train_logged

    log = train_logged(recipe(config), MemoryLog())
    times = [b - a for a, b in zip(log.stamps, log.stamps[1:])]
    print(RESULT + json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu", "peak": log.peak,
                               "start_rss": log.start_rss, "reset": log.reset,
                               "step_s": statistics.median(times[1:] or times)}), flush=True)


def measure(config: dict) -> dict:
    """One configuration in a fresh subprocess."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(config)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def configurations(models: str, steps: int, batch_b: int, pipeline: str, folder: Path) -> list[tuple[str, dict]]:
    """(label, config) of every configuration, in the order they run."""
    found = []
    if "a" in models:
        for checkpointing in (False, True):
            found.append((f"(a) tutorial UNet 128 px, batch 16 | checkpointing {'on' if checkpointing else 'off'}",
                          {"model": "a", "steps": steps, "batch": 16, "checkpointing": checkpointing}))
    if "b" in models:
        base = {"model": "b", "steps": steps, "batch": batch_b, "pipeline": pipeline, "checkpointing": False,
                "slicing": False, "cache": False, "cache_dir": str(folder / "cache")}
        for label, change in (("plain: no cache, no slicing, no checkpointing", {}),
                              ("checkpointing", {"checkpointing": True}),
                              ("VAE slicing", {"slicing": True}),
                              ("caches on (text + latents), new: they fill", {"cache": True}),
                              ("caches on, full (from the run above)", {"cache": True}),
                              ("checkpointing + slicing + caches full", {"checkpointing": True, "slicing": True,
                                                                         "cache": True})):
            found.append((f"(b) tiny SD + SD 1.5 VAE 256 px, batch {batch_b} | {label}", {**base, **change}))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="a,b", help="a: the tutorial's UNet; b: text-to-image")
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration (the first one is not timed)")
    parser.add_argument("--batch-b", type=int, default=4, help="the text-to-image batch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as folder:
        pipeline = ""
        if "b" in args.models:
            from benchmarks.latents import write_pipeline

            pipeline = str(write_pipeline(Path(folder) / "pipeline"))
        print("| model, batch | configuration | peak memory | above the start of training | s/step |")
        print("|---|---|---|---|---|")
        for label, config in configurations(args.models, args.steps, args.batch_b, pipeline, Path(folder)):
            result = measure(config)
            model, setting = label.split(" | ")
            gib = 2**30
            above = "" if result["device"] == "cuda" or result["start_rss"] is None else (
                f"{(result['peak'] - result['start_rss']) / gib:.2f} GiB")
            kind = "allocated (CUDA)" if result["device"] == "cuda" else "RSS" + ("" if result["reset"] else ", whole process")
            print(f"| {model} | {setting} | {result['peak'] / gib:.2f} GiB {kind} | {above} | {result['step_s']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
