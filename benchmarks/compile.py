"""`run.compile` and `run.allow_tf32` on the job: the quickstart's UNet (or the tutorial's) trained
through `difftool run`, each setting in a fresh process, alternating, with every step timed.

Run by hand: `python -m benchmarks.compile [--size small-32] [--steps 60] [--rounds 2]`.
For compile, the first step holds the compiling: its extra time over an eager first step,
divided by what each later step saves, is the break-even run length in steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.train import BATCH, SIZES, benchmark_recipe, train_logged

SETTINGS = {"eager": {}, "compile": {"compile": True}, "tf32": {"allow_tf32": True}}


def child(size_name: str, steps: int, setting: str) -> None:
    """Train in this process and print the step stamps as JSON (the parent's side of a run)."""
    import time

    size, unet = SIZES[size_name]
    started = time.perf_counter()
    log = train_logged(benchmark_recipe(size, unet, steps, run=SETTINGS[setting]))
    print(json.dumps({"started": started, "stamps": log.stamps, "losses": log.losses}))


def measure(size_name: str, steps: int, setting: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile", "--child", setting, "--size", size_name,
                           "--steps", str(steps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stamps = result["stamps"]
    # the first step from the moment training was asked for (building, compiling, one step)
    return {"first": stamps[0] - result["started"], "steps": [b - a for a, b in zip(stamps, stamps[1:])],
            "losses": result["losses"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small-32", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="eager,compile,tf32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.steps, args.child)
        return
    names = args.settings.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):  # alternating, so that the machine's drift hits every setting alike
        for name in names:
            runs[name].append(measure(args.size, args.steps, name))
    eager_first = statistics.median(r["first"] for r in runs["eager"])
    eager_step = statistics.median(t for r in runs["eager"] for t in r["steps"][2:])
    print(f"{args.size}, batch {BATCH}, {args.steps} steps, {args.rounds} rounds")
    print("| setting | first step (s) | later steps, median (s) | vs eager | final loss | break-even |")
    print("|---|---|---|---|---|---|")
    for name in names:
        first = statistics.median(r["first"] for r in runs[name])
        step = statistics.median(t for r in runs[name] for t in r["steps"][2:])
        loss = statistics.median(r["losses"][-1] for r in runs[name])
        saved = eager_step - step
        if name != "compile":  # the others cost nothing up front
            even = ""
        elif saved > 0:
            even = f"{(first - eager_first) / saved:.0f} steps"
        else:
            even = "never (no step is faster)"
        print(f"| {name} | {first:.1f} | {step:.3f} | {eager_step / step:.2f}x | {loss:.4f} | {even} |", flush=True)


if __name__ == "__main__":
    main()
