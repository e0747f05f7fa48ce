"""Where a difftool training step's time goes besides the model: the engine's step under cProfile,
split into the work the tutorial's loop also does (forward and loss, backward, optimizer step)
and what difftool adds around it (data, flips, noise, bookkeeping, logging, hooks, progress).

Run by hand: `python -m benchmarks.overhead [--size small-32] [--steps 40]`. The first 5 steps
are left out (warm-up). The small UNet shows the overhead at its largest share of a step.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

from benchmarks.train import BATCH, SIZES, StepLog, benchmark_recipe, train_logged

# engine functions, by what they do; cumulative times (a parent's include its children's)
PARTS = {
    "forward + loss": ("objective.py", "compute_loss"),
    "backward": ("accelerator.py", "backward"),
    "optimizer step": ("optimizer.py", "step"),
    "gradient clipping": ("accelerator.py", "clip_grad_norm_"),
    "zero_grad": ("optimizer.py", "zero_grad"),
    "next batch (data loader)": ("data_loader.py", "__iter__"),
    "inputs (flip, labels)": ("engine.py", "model_inputs"),
    "times and noise": ("objective.py", "add_noise"),
    "bookkeeping and logging (step_taken)": ("engine.py", "step_taken"),
    "hooks, sampling, checkpoints (after_step)": ("engine.py", "after_step"),
    "whole step (train_step)": ("engine.py", "train_step"),
}


def cumulative(stats: pstats.Stats, file_end: str, function: str) -> float:
    total = 0.0
    for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items():
        if filename.endswith(file_end) and name == function:
            total += cumtime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small-32", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    size, unet = SIZES[args.size]
    recipe = benchmark_recipe(size, unet, args.steps)
    log = StepLog()
    profiler = cProfile.Profile()

    class Window:  # profile steps 6 .. N only
        import difftool

        @difftool.hookimpl
        def on_step_end(self, state):
            if state.global_step == 5:
                profiler.enable()

    from difftool.plugins import load_plugins, pm

    load_plugins()
    pm.register(Window(), name="benchmark-window")
    try:
        train_logged(recipe, log)
    finally:
        profiler.disable()
        pm.unregister(name="benchmark-window")
    stats = pstats.Stats(profiler)
    steps = args.steps - 5
    wall = (log.stamps[-1] - log.stamps[4]) / steps
    print(f"{args.size}, batch {BATCH}: {wall * 1000:.1f} ms per step (wall clock of steps 6 to {args.steps}, with the profiler on)")
    print("| part | ms per step (profiled) |")
    print("|---|---|")
    for label, (file_end, function) in PARTS.items():
        print(f"| {label} | {cumulative(stats, file_end, function) / steps * 1000:.1f} |")


if __name__ == "__main__":
    main()
