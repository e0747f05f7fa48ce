"""How long difftool takes to start: `difftool list schedulers` (and whether it imports torch),
a recipe with a typo reported by `difftool check`, `difftool check recipes/quickstart.toml`, and
`difftool run recipes/quickstart.toml` from process start to the end of its first optimizer step.

Run by hand: `python -m benchmarks.startup [--runs 5]`. Each command runs in a fresh process;
the medians of wall time are printed. The two commands that import diffusers run with diffusers'
package imports deferred (`difftool.deferred`, the default) and without
(`DIFFTOOL_DEFER_IMPORTS=0`), alternating, so the two columns are measured side by side.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIST = "from difftool.cli import main\ntry: main(['list', 'schedulers'])\nexcept SystemExit: pass\n"
TYPO = '[run]\noutput_dir = "runs/typo"\nsed = 1\n\n[dataset]\nname = "synthetic-butterflies"\n'
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
# Runs the quickstart and leaves at the end of the first optimizer step, printing how long after
# the parent's time stamp (DIFFTOOL_T0) that was: process start, imports, set-up and one step.
FIRST_STEP = """
import os, sys, time
import pluggy
from difftool.plugins import pm

class FirstStep:
    @pluggy.HookimplMarker("difftool")
    def on_step_end(self, state):
        print(time.time() - float(os.environ["DIFFTOOL_T0"]), flush=True)
        os._exit(0)

pm.register(FirstStep(), "first-step")
from difftool.cli import main
main(["run", sys.argv[1], "--set", "run.output_dir=" + sys.argv[2], "--force"])
"""


def seconds(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, env=env)
    return time.perf_counter() - started


def first_step(folder: Path, env: dict) -> float:
    env = {**env, "DIFFTOOL_T0": repr(time.time())}
    done = subprocess.run([sys.executable, "-c", FIRST_STEP, str(QUICKSTART), str(folder / "run")],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"the quickstart did not reach its first step:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def side_by_side(label: str, measure, runs: int) -> None:
    times = {"deferred": [], "not deferred": []}
    for _ in range(runs):
        for name, flag in (("not deferred", "0"), ("deferred", "1")):
            times[name].append(measure({**os.environ, "DIFFTOOL_DEFER_IMPORTS": flag}))
    print(f"{label}: median {statistics.median(times['not deferred']):.2f} s without deferred imports, "
          f"{statistics.median(times['deferred']):.2f} s with (runs: "
          + "; ".join(f"{name} " + ", ".join(f"{t:.2f}" for t in values) for name, values in times.items()) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    listing = statistics.median(seconds([sys.executable, "-c", LIST]) for _ in range(runs))
    baseline = statistics.median(seconds([sys.executable, "-c", "pass"]) for _ in range(runs))
    probe = subprocess.run([sys.executable, "-c", LIST + "import sys; print('torch' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    print(f"difftool list schedulers: median {listing:.3f} s over {runs} runs "
          f"(bare python: {baseline:.3f} s); torch imported: {probe.stdout.split()[-1]}")
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        typo = folder / "typo.toml"
        typo.write_text(TYPO)
        typo_seconds = statistics.median(seconds([sys.executable, "-m", "difftool", "check", str(typo)])
                                         for _ in range(runs))
        print(f"difftool check on a recipe with an unknown key: median {typo_seconds:.2f} s")
        side_by_side("difftool check recipes/quickstart.toml",
                     lambda env: seconds([sys.executable, "-m", "difftool", "check", str(QUICKSTART)], env), runs)
        side_by_side("difftool run recipes/quickstart.toml, start to first step",
                     lambda env: first_step(folder, env), runs)


if __name__ == "__main__":
    main()
