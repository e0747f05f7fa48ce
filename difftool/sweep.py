"""`difftool sweep`: one run per combination of recipe values (and per seed), one after another.

Every combination's recipe is validated before anything trains. The sweep's state is
`OUT/sweep.json`, rewritten (atomically) after each run:

    {"recipe": "recipes/x.toml", "overrides": ["run.max_steps=20"], "seeds": 2,
     "grid": {"loss_weighting.name": ["none", "min-snr"]},
     "runs": [{"name": "loss_weighting.name=none_seed=0", "output_dir": "OUT/loss_weighting.name=none_seed=0",
               "settings": {"loss_weighting.name": "none", "run.seed": 0}, "status": "finished"}, ...]}

A status is "pending", "finished" or "failed: <message>". Running the same sweep again skips the
finished runs and resumes the others from their latest checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from difftool import checkpoints, files
from difftool import recipe as recipes
from difftool.errors import DifftoolError, Interrupted

STATE = "sweep.json"
PENDING, FINISHED, FAILED = "pending", "finished", "failed"
# the keys a sweep sets itself in every run
OWN_KEYS = ("run.output_dir", "run.resume_from_checkpoint", "run.overwrite_output_dir")
# the run keys that do not change what a run trains: left out when a finished run's recipe is compared
BOOKKEEPING = ("resume_from_checkpoint", "overwrite_output_dir")
UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")  # characters kept out of run folder names
MAX_NAME = 150  # file names may have 255 bytes; leave room for the suffixes of temp folders


@dataclass
class Axis:
    """One --grid KEY=V1,V2,...: the key, and each value as typed and as parsed."""

    key: str
    texts: list[str]
    values: list[Any]


@dataclass
class Run:
    """One run of the sweep: its settings, folder, validated recipe and status."""

    name: str
    settings: dict[str, Any]  # grid key -> value, and run.seed
    overrides: list[str]  # --set texts that make its recipe from the base one
    output_dir: Path
    status: str = PENDING
    recipe: Any = None  # difftool.recipe.Recipe, once validated
    action: str = "train"  # skip, resume, restart or train

    def record(self) -> dict[str, Any]:
        """Its entry in sweep.json."""
        return {"name": self.name, "output_dir": self.output_dir.as_posix(), "settings": self.settings,
                "status": self.status}


@dataclass
class Sweep:
    """A sweep: its base recipe and --set overrides, its grid and seeds, its folder and runs."""

    recipe_path: Path
    overrides: list[str]
    axes: list[Axis]
    seeds: int
    out: Path
    runs: list[Run]

    def save(self) -> None:
        """Rewrite OUT/sweep.json, atomically."""
        state = {
            "recipe": str(self.recipe_path),
            "overrides": self.overrides,
            "seeds": self.seeds,
            "grid": {axis.key: axis.values for axis in self.axes},
            "runs": [run.record() for run in self.runs],
        }
        files.write_text(self.out / STATE, json.dumps(state, indent=2, default=str) + "\n", "the sweep's record")


def split_values(text: str) -> list[str]:
    """'a,[1,2],"x,y"' -> ['a', '[1,2]', '"x,y"']: commas split only outside brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_axis(text: str) -> Axis:
    """One --grid option: KEY=V1,V2,... with each value parsed as TOML, as --set does."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise DifftoolError(f"--grid '{text}': expected SECTION.KEY=VALUE1,VALUE2,..., "
                            "e.g. --grid loss_weighting.name=none,min-snr")
    if key in OWN_KEYS:
        raise DifftoolError(f"--grid '{text}': the sweep sets {key} itself (use --out for the folder)")
    texts = split_values(raw)
    if "" in texts:
        raise DifftoolError(f"--grid '{text}': a value is empty (two commas in a row, or one at an end)")
    values = [recipes.parse_override(f"{key}={value}")[1] for value in texts]
    return Axis(key, texts, values)


def parse_grid(options: list[str], seeds: int) -> list[Axis]:
    """The --grid options as axes, each key once."""
    axes = [parse_axis(text) for text in options]
    keys = [axis.key for axis in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise DifftoolError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2,...")
    if seeds > 1 and "run.seed" in keys:
        raise DifftoolError("--grid run.seed=... and --seeds both pick seeds; use one of them")
    return axes


def value_name(axis: Axis, index: int) -> str:
    """How a value appears in run folder names: a string as itself, anything else as typed without
    brackets, quotes and spaces ([64, 64] -> 64,64); characters unsafe in file names (or awkward
    in a shell) become '-'."""
    value = axis.values[index]
    text = value if isinstance(value, str) else re.sub(r"[\s\[\]{}\"']", "", axis.texts[index])
    return UNSAFE.sub("-", text)


def short_name(name: str) -> str:
    """`name`, shortened with a digest of it if it is too long for a folder name."""
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


def run_table(recipe_path: Path, overrides: list[str]) -> dict[str, Any]:
    """The base recipe's [run] table with the --set overrides ({} where it has none, or not a table)."""
    table = recipes.read(recipe_path, overrides).get("run")
    return table if isinstance(table, dict) else {}


def plan(recipe_path: Path, overrides: list[str], axes: list[Axis], seeds: int, out: Path) -> list[Run]:
    """Every run of the sweep, in order: the combinations of the axes' values (the cartesian
    product, the first axis slowest), and for each, its seeds."""
    base_seed = run_table(recipe_path, overrides).get("seed", 0)
    runs, names = [], set()
    for indices in itertools.product(*(range(len(axis.values)) for axis in axes)):
        for offset in range(seeds):
            settings = {axis.key: axis.values[i] for axis, i in zip(axes, indices)}
            parts = [f"{axis.key}={value_name(axis, i)}" for axis, i in zip(axes, indices)]
            texts = [f"{axis.key}={axis.texts[i]}" for axis, i in zip(axes, indices)]
            if seeds > 1 or "run.seed" not in settings:
                seed = base_seed + offset if type(base_seed) is int else base_seed
                settings["run.seed"] = seed
                texts.append(f"run.seed={json.dumps(seed)}")
                if seeds > 1:
                    parts.append(f"seed={seed}")
            name = short_name(UNSAFE.sub("-", "_".join(parts)).lstrip(".-") or "base")
            while name in names:  # values that differ only in unsafe characters
                name += "+"
            names.add(name)
            runs.append(Run(name, settings, texts, out / name))
    return runs


def resolved_recipe(recipe_path: Path, overrides: list[str], run: Run):
    """The run's recipe validated, with the sweep's own keys set for how it goes on (resume,
    restart or a first start); raises DifftoolError naming the problem."""
    data = recipes.read(recipe_path, overrides)
    for text in run.overrides:
        recipes.override(data, text)
    table = data.setdefault("run", {})
    if isinstance(table, dict):  # else validate says what is wrong with it
        table["output_dir"] = run.output_dir.as_posix()
        table.pop("resume_from_checkpoint", None)
        if run.action == "resume":
            table["resume_from_checkpoint"] = "latest"
        elif run.action == "restart":
            table["overwrite_output_dir"] = True
    recipe = recipes.validate(data, str(recipe_path))
    if run.action == "skip" and (changes := changed_keys(run.output_dir, recipe)):
        raise DifftoolError(f"{run.output_dir} is a finished run of another recipe ({'; '.join(changes[:5])}); "
                            "give the sweep another --out, or remove that folder to train it again")
    if run.action == "resume":  # a damaged checkpoint, or one of another recipe, is named before anything trains
        path, _ = checkpoints.resume_path(recipe)
        checkpoints.check_unchanged(path, recipe, force=False)
    return recipe


def changed_keys(output_dir: Path, recipe) -> list[str]:
    """'section.key: old -> new' for each value of the finished run's recipe.toml that `recipe` changes."""
    saved = tomllib.loads((output_dir / files.RECIPE).read_text())
    wanted = tomllib.loads(recipes.dump(recipe, {}))

    def flat(data: dict) -> dict[str, Any]:
        data.pop(recipes.PROVENANCE, None)
        for key in BOOKKEEPING:
            data.get("run", {}).pop(key, None)
        return recipes.flatten(data)

    return recipes.differences(flat(saved), flat(wanted))


def decide(run: Run, previous: dict[str, str]) -> None:
    """How the run goes on, from its recorded status and its folder: skip a finished run, resume
    from the latest checkpoint, train afresh over an earlier attempt that saved a model but did
    not finish (a hook that failed after the final save, say), or start."""
    done = files.finished(run.output_dir)
    if previous.get(run.name) == FINISHED and done:
        run.action, run.status = "skip", FINISHED
    elif checkpoints.complete(run.output_dir):
        run.action = "resume"
    elif done:
        run.action = "restart"
    else:
        run.action = "train"


def read_state(out: Path) -> dict[str, str]:
    """The status of each run that an earlier sweep into `out` recorded (name -> status)."""
    path = out / STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        return {run["name"]: run["status"] for run in state["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DifftoolError(f"{path} is damaged ({exc}); remove it to start the sweep's record afresh "
                            "(finished runs are then trained again)") from exc


def prepare(recipe_path: Path, grid: list[str], seeds: int, out: Path | None, overrides: list[str]) -> Sweep:
    """The sweep, every run's recipe validated; every problem of every combination is reported at
    once, before anything is written."""
    if seeds < 1:
        raise DifftoolError(f"--seeds {seeds}: give 1 or more")
    axes = parse_grid(grid, seeds)
    if out is None:
        output_dir = run_table(recipe_path, overrides).get("output_dir")
        if not isinstance(output_dir, str) or not output_dir.strip():
            raise DifftoolError(f"{recipe_path}: [run] has no output_dir, so the sweep has no default "
                                "folder; give one with --out")
        out = Path(output_dir.rstrip("/\\") + "-sweep")
    if out.exists() and not out.is_dir():
        raise DifftoolError(f"--out {out} is a file; choose a folder for the sweep's runs")
    runs = plan(recipe_path, overrides, axes, seeds, out)
    previous = read_state(out)
    problems = []
    for run in runs:
        decide(run, previous)
        try:
            run.recipe = resolved_recipe(recipe_path, overrides, run)
        except DifftoolError as exc:
            problems.append(f"{run.name}: {exc}")
    if problems:
        count = ("every run" if len(problems) == len(runs) > 1 else
                 f"{len(problems)} of the {len(runs)} runs" if len(problems) > 1 else "a run")
        raise DifftoolError(f"the sweep was not started: {count} cannot train:\n  - " + "\n  - ".join(
            problem.replace("\n", "\n    ") for problem in problems))
    return Sweep(recipe_path, overrides, axes, seeds, out, runs)


def sweep(recipe_path: Path, grid: list[str], seeds: int = 1, out: Path | None = None,
          overrides: list[str] = (), report: Callable[[str], None] = print) -> Sweep:
    """Train every run of the sweep that is not finished yet, one after another, recording each
    outcome in OUT/sweep.json; `report` gets one line (rich markup) per run. Raises
    DifftoolError naming the failed runs at the end, Interrupted on Ctrl-C."""
    from difftool.engine import train

    planned = prepare(Path(recipe_path), grid, seeds, out, list(overrides))
    planned.save()
    runs = planned.runs
    for number, run in enumerate(runs, 1):
        where = f"[{number}/{len(runs)}] {run.name}"
        if run.action == "skip":
            report(f"{where}: [dim]skipped, finished already[/]")
            continue
        report(f"{where}: {starting_words(run)}")
        started = time.perf_counter()
        try:
            train(run.recipe)
        except (Interrupted, KeyboardInterrupt) as exc:  # the run stays pending, to be resumed
            planned.save()
            raise Interrupted(f"sweep interrupted in {run.name}: {str(exc) or 'before training'}; run the same "
                              "command again to go on") from None
        except DifftoolError as exc:
            run.status = f"{FAILED}: {exc}"
            report(f"{where}: [red]failed[/]: {escape(first_line(exc))}")
        except BaseException as exc:
            run.status = f"{FAILED}: {type(exc).__name__}: {exc}"
            planned.save()
            raise
        else:
            run.status = FINISHED
            report(f"{where}: [green]trained[/] in {time.perf_counter() - started:.1f} s")
        planned.save()
    failed = [run for run in runs if run.status.startswith(FAILED)]
    if failed:
        listed = "\n  - ".join(f"{run.name}: {first_line(run.status[len(FAILED) + 2:])}" for run in failed)
        raise DifftoolError(f"{len(failed)} of the {len(runs)} runs failed (the others are done; "
                            f"{planned.out / STATE} has each one's full message):\n  - {listed}")
    return planned


def starting_words(run: Run) -> str:
    """What happens to a run that is not skipped."""
    if run.action == "resume":
        return "resuming from its latest checkpoint"
    if run.action == "restart":
        return "training again (an earlier attempt saved a model but did not finish)"
    return "training"


def first_line(message: Any) -> str:
    """The first line of an error's message."""
    return str(message).strip().splitlines()[0] if str(message).strip() else "(no message)"
