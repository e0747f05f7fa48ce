"""How long `difftool list schedulers` takes, and whether it imports torch.

Run by hand: `python -m benchmarks.startup [--runs 5]`.
"""

import argparse
import statistics
import subprocess
import sys
import time

LIST = "from difftool.cli import main\ntry: main(['list', 'schedulers'])\nexcept SystemExit: pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", LIST], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    baseline = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - started)
    probe = subprocess.run([sys.executable, "-c", LIST + "import sys; print('torch' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    print(f"difftool list schedulers: median {statistics.median(times):.3f} s over {runs} runs "
          f"(bare python: {statistics.median(baseline):.3f} s); torch imported: {probe.stdout.split()[-1]}")


if __name__ == "__main__":
    main()
