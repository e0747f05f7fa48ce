"""How long difftool takes to start: `difftool list schedulers` (and whether it imports torch),
a recipe with a typo reported by `difftool check`, and `difftool check recipes/quickstart.toml`.

Run by hand: `python -m benchmarks.startup [--runs 5]`. Each command runs in a fresh process;
the medians of wall time are printed.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIST = "from difftool.cli import main\ntry: main(['list', 'schedulers'])\nexcept SystemExit: pass\n"
TYPO = '[run]\noutput_dir = "runs/typo"\nsed = 1\n\n[dataset]\nname = "synthetic-butterflies"\n'
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    listing = median_seconds([sys.executable, "-c", LIST], runs)
    baseline = median_seconds([sys.executable, "-c", "pass"], runs)
    probe = subprocess.run([sys.executable, "-c", LIST + "import sys; print('torch' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    print(f"difftool list schedulers: median {listing:.3f} s over {runs} runs "
          f"(bare python: {baseline:.3f} s); torch imported: {probe.stdout.split()[-1]}")
    with tempfile.TemporaryDirectory() as folder:
        typo = Path(folder) / "typo.toml"
        typo.write_text(TYPO)
        seconds = median_seconds([sys.executable, "-m", "difftool", "check", str(typo)], runs)
        print(f"difftool check on a recipe with an unknown key: median {seconds:.2f} s")
        seconds = median_seconds([sys.executable, "-m", "difftool", "check", str(QUICKSTART)], runs)
        print(f"difftool check recipes/quickstart.toml: median {seconds:.2f} s")


if __name__ == "__main__":
    main()
