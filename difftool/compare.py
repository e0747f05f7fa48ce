"""`difftool compare`: a table (and CSV, JSON, a plot) of runs side by side, one row per setting.

Runs whose recipes differ only in the seed and the bookkeeping keys of [run] are one setting:
their numbers are given as mean ± std over the seeds. A run's numbers come from its files:

- `logs/history.jsonl` (difftool.history): the final training loss (the mean over the last steps),
  the best val_loss, the wall time and the training images per second;
- `metrics.jsonl` (the evaluations made during training; the last one counts) or, where there is
  none, the newest `evaluations/*.json` (`difftool eval`): each metric's value.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftool import files
from difftool.recipe import flatten
from difftool.errors import DifftoolError

HISTORY = Path("logs") / "history.jsonl"  # written by difftool.history.HistoryTracker
METRICS = "metrics.jsonl"  # one line per evaluation during training
EVALUATIONS = "evaluations"  # the results of `difftool eval`, one JSON file each
SWEEP = "sweep.json"  # a sweep's record, which gives its runs' order
# recipe keys that do not make a different setting
IGNORED = {"run.seed", "run.output_dir", "run.resume_from_checkpoint", "run.overwrite_output_dir"}
MISSING = "—"
UNSET = "(unset)"
LOSS, VAL_LOSS, WALL, SPEED = "loss", "val_loss", "wall_time_s", "images_per_s"
HEADERS = {LOSS: "loss (last {last})", VAL_LOSS: "best val_loss", WALL: "wall time", SPEED: "images/s"}
OWN_COLUMNS = (LOSS, VAL_LOSS, WALL, SPEED)


@dataclass
class Session:
    """One training session of a run: from its start line to the next one."""

    start: float
    num_processes: int
    end: float  # the time of its last line
    optimizer_steps: int = 0  # lines with a loss: the optimizer steps it took

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class History:
    """A run's logged values per step (the value written last wins) and its sessions."""

    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of each step with a finite number for `key`, in step order."""
        return [(step, value) for step in sorted(self.steps)
                if (value := number(self.steps[step].get(key))) is not None]


@dataclass
class Run:
    """One run folder: its recipe (flattened) and what its files say."""

    folder: Path
    recipe: dict[str, Any]
    history: History | None
    evaluations: list[dict] = field(default_factory=list)  # metrics.jsonl's lines
    metrics: dict[str, float | None] = field(default_factory=dict)  # the last evaluation's values
    numbers: dict[str, float | None] = field(default_factory=dict)  # column -> value


@dataclass
class Setting:
    """Runs that differ only in their seed (and bookkeeping): one row."""

    runs: list[Run]
    values: dict[str, Any] = field(default_factory=dict)  # differing key -> this setting's value
    numbers: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)  # mean, std, count

    @property
    def names(self) -> list[str]:
        return [run.folder.name for run in self.runs]

    def label(self) -> str:
        """How legends name it: its differing keys, else its first run's folder."""
        if self.values:
            return ", ".join(f"{key}={shown(value)}" for key, value in self.values.items())
        return self.names[0] + (f" (+{len(self.runs) - 1})" if len(self.runs) > 1 else "")


@dataclass
class Report:
    """The comparison: the keys that differ between settings, the number columns, the rows."""

    keys: list[str]
    columns: list[str]
    settings: list[Setting]
    last: int


def number(value: Any) -> float | None:
    """`value` as a finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_column(name: str) -> str:
    """The column of a metric: its name, or eval/NAME where that is the name of another column."""
    return f"eval/{name}" if name in OWN_COLUMNS else name


def metric_name(column: str) -> str:
    """The metric a column shows (the inverse of metric_column)."""
    return column[5:] if column.startswith("eval/") and column[5:] in OWN_COLUMNS else column


def shown(value: Any) -> str:
    """A recipe value as the table shows it: strings as they are, the rest as JSON (true, [32, 64])."""
    if value is UNSET or isinstance(value, str):
        return str(value)
    return json.dumps(value, default=str)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders that the arguments name: each is a run (it holds recipe.toml) or a folder of
    runs (a sweep's, say), whose subfolders holding recipe.toml are taken in the sweep's order."""
    found: list[Path] = []
    for path in paths:
        if (path / files.RECIPE).is_file():
            found.append(path)
        elif not path.exists():
            raise DifftoolError(f"{path} does not exist; give run folders or folders of runs (a sweep's --out)")
        elif not path.is_dir():
            raise DifftoolError(f"{path} is a file; give a run folder (it holds {files.RECIPE}) or a folder of runs")
        else:
            runs = [p for p in path.iterdir() if p.is_dir() and (p / files.RECIPE).is_file()]
            if not runs:
                raise DifftoolError(f"{path} is neither a run folder (it has no {files.RECIPE}) nor a folder of "
                                    "runs (none of its subfolders has one); give the output_dir of a run or a sweep")
            found += sorted(runs, key=sweep_order(path))
    unique: dict[Path, Path] = {}
    for folder in found:
        unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def sweep_order(folder: Path):
    """A sort key putting a sweep's runs in the order its sweep.json lists them, others after, by name."""
    try:
        listed = [run["name"] for run in json.loads((folder / SWEEP).read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    return lambda path: (listed.index(path.name) if path.name in listed else len(listed), path.name)


def read_recipe(folder: Path) -> dict[str, Any]:
    """The run's recipe.toml, flattened, without its [provenance]."""
    path = folder / files.RECIPE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DifftoolError(f"cannot read {path} ({exc}); is the run folder damaged?") from exc
    data.pop("provenance", None)
    return flatten(data)


def read_history(folder: Path) -> History | None:
    """The run's history, or None where it has none (yet). A resumed session's first step drops
    what earlier sessions logged beyond it (trained again); a session that starts afresh (its
    first line is step 1 with a loss, or step 0) drops the earlier sessions (an earlier run in
    the same folder); for each step and key, the last line wins."""
    if not (folder / HISTORY).is_file():
        return None
    history = History()
    stepped = True  # whether the current session has logged a step yet
    for line in files.json_lines(folder / HISTORY):
        when = number(line.get("time"))
        if line.get("event") == "start":
            processes = line.get("num_processes")
            history.sessions.append(Session(when or 0.0, processes if isinstance(processes, int) else 1, when or 0.0))
            stepped = False
            continue
        step = line.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        session = history.sessions[-1] if history.sessions else None
        if session is not None and when is not None:
            session.end = max(session.end, when)
        if not stepped:
            if step == 0 or (step == 1 and "loss" in line):
                history.steps, history.sessions = {}, history.sessions[-1:]
            else:
                history.steps = {s: values for s, values in history.steps.items() if s <= step}
            stepped = True
        values = {key: value for key, value in line.items() if key not in ("step", "time")}
        history.steps.setdefault(step, {}).update(values)
        if session is not None and "loss" in values:
            session.optimizer_steps += 1
    return history


def last_evaluation(folder: Path, evaluations: list[dict]) -> dict[str, float | None]:
    """The metrics of the run's last evaluation during training, else of its newest `difftool eval`."""
    for line in reversed(evaluations):
        if isinstance(line.get("values"), dict):
            return {key: number(value) for key, value in line["values"].items()}
    results = []
    for path in (folder / EVALUATIONS).glob("*.json"):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and isinstance(result.get("values"), dict):
            results.append((number(result.get("time")) or path.stat().st_mtime, path.name, result["values"]))
    if not results:
        return {}
    return {key: number(value) for key, value in max(results)[2].items()}


def wall_time(history: History | None) -> float | None:
    """Seconds the run trained: each session from its start line to its last line, summed."""
    if history is None or not history.sessions:
        return None
    return sum(session.seconds for session in history.sessions)


def images_per_second(run: Run) -> float | None:
    """Training images per second: each session's optimizer steps times the images of a step
    (batch size x accumulation x processes), over the wall time less the evaluations in it."""
    history = run.history
    seconds = wall_time(history)
    batch, accumulation = run.recipe.get("dataset.batch_size"), run.recipe.get("run.gradient_accumulation_steps", 1)
    if seconds is None or not isinstance(batch, int) or not isinstance(accumulation, int):
        return None
    images = sum(s.optimizer_steps * s.num_processes for s in history.sessions) * batch * accumulation
    for line in run.evaluations:  # those made inside a session; a later `difftool eval` is not training time
        ended, took = number(line.get("time")), number(line.get("seconds"))
        if ended is not None and took is not None and any(s.start <= ended - took <= s.end for s in history.sessions):
            seconds -= took
    return images / seconds if images and seconds > 0 else None


def read_run(folder: Path, last: int) -> Run:
    """A run folder's recipe and numbers; what it lacks (no history yet, no metrics) is None."""
    run = Run(folder, read_recipe(folder), read_history(folder), files.json_lines(folder / METRICS))
    run.metrics = last_evaluation(folder, run.evaluations)
    losses = [value for _, value in run.history.series(LOSS)] if run.history else []
    val_losses = [value for _, value in run.history.series(VAL_LOSS)] if run.history else []
    run.numbers = {
        LOSS: statistics.fmean(losses[-last:]) if losses else None,
        VAL_LOSS: min(val_losses) if val_losses else None,
        **{metric_column(name): value for name, value in run.metrics.items()},
        WALL: wall_time(run.history),
        SPEED: images_per_second(run),
    }
    return run


def setting_key(run: Run) -> str:
    """What makes a setting: the recipe without the ignored keys."""
    return json.dumps({k: v for k, v in run.recipe.items() if k not in IGNORED}, sort_keys=True, default=str)


def aggregate(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, standard deviation over the seeds (None for one), count) of the values present."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def compare(paths: list[Path], last: int = 20) -> Report:
    """Read the runs the paths name and group them into settings, one row each."""
    runs = [read_run(folder, last) for folder in run_folders(paths)]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    settings = [Setting(group) for group in groups.values()]
    keys = differing_keys(settings)
    for setting in settings:
        setting.values = {key: setting.runs[0].recipe.get(key, UNSET) for key in keys}
    metrics = dict.fromkeys(metric_column(name) for run in runs for name in run.metrics)
    columns = [LOSS, *([VAL_LOSS] if any(run.numbers[VAL_LOSS] is not None for run in runs) else []),
               *metrics, WALL, SPEED]
    for setting in settings:
        setting.numbers = {c: aggregate([run.numbers.get(c) for run in setting.runs]) for c in columns}
    return Report(keys, columns, settings, last)


def differing_keys(settings: list[Setting]) -> list[str]:
    """The recipe keys whose value is not the same in every setting, in recipe order."""
    recipes = [setting.runs[0].recipe for setting in settings]
    ordered = dict.fromkeys(key for recipe in recipes for key in recipe if key not in IGNORED)
    return [key for key in ordered
            if len({json.dumps(recipe.get(key, UNSET), sort_keys=True, default=str) for recipe in recipes}) > 1]


def formatted(column: str, mean: float | None, std: float | None) -> str:
    """A number cell: mean ± std (std where there are several seeds), '—' where there is none."""
    if mean is None:
        return MISSING
    if column == WALL:
        text = duration(mean)
        return f"{text} ± {duration(std)}" if std is not None else text
    digits = ".1f" if column == SPEED else ".4g"
    return f"{mean:{digits}} ± {std:.2g}" if std is not None else f"{mean:{digits}}"


def duration(seconds: float) -> str:
    """12.3 s, 4 m 10 s, 2 h 05 m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} m {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} m"


def header(report: Report, column: str) -> str:
    """A number column's heading in the table and the plot."""
    return HEADERS.get(column, column).format(last=report.last)


def table(report: Report):
    """The report as a rich Table: the differing keys, n, then the numbers."""
    from rich.table import Table

    runs, settings = sum(len(s.runs) for s in report.settings), len(report.settings)
    title = f"{runs} run{'s' * (runs != 1)}, {settings} setting{'s' * (settings != 1)}"
    result = Table(title=title)
    if not report.keys:
        result.add_column("runs", overflow="fold")
    for key in report.keys:  # the settings stay whole; a narrow terminal folds the numbers
        result.add_column(key, no_wrap=True)
    result.add_column("n", justify="right", no_wrap=True)
    for column in report.columns:
        result.add_column(header(report, column), justify="right", overflow="fold")
    for setting in report.settings:
        cells = [] if report.keys else [", ".join(setting.names)]
        cells += [shown(setting.values[key]) for key in report.keys]
        cells.append(str(len(setting.runs)))
        cells += [formatted(column, *setting.numbers[column][:2]) for column in report.columns]
        result.add_row(*cells)
    return result


def rows(report: Report) -> list[dict[str, Any]]:
    """The rows as plain data: runs, n, the differing keys' values, and each number's mean, std
    and count (of the runs that have it)."""
    return [{
        "runs": setting.names,
        "n": len(setting.runs),
        "settings": {key: (None if value is UNSET else value) for key, value in setting.values.items()},
        "values": {column: {"mean": mean, "std": std, "count": count}
                   for column, (mean, std, count) in setting.numbers.items()},
    } for setting in report.settings]


def write_json(report: Report, path: Path) -> None:
    """The rows as JSON: {"keys": [...], "columns": [...], "rows": [...]}."""
    data = {"keys": report.keys, "columns": report.columns, "last": report.last, "rows": rows(report)}
    files.write_text(path, json.dumps(data, indent=2, default=str) + "\n", "the comparison (JSON)")


def write_csv(report: Report, path: Path) -> None:
    """The rows as CSV: runs (';'-separated), n, each differing key, then COLUMN_mean and COLUMN_std."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["runs", "n", *report.keys, *(f"{c}_{part}" for c in report.columns for part in ("mean", "std"))])
    for row in rows(report):
        cells = [";".join(row["runs"]), row["n"]]
        cells += ["" if value is None else shown(value) for value in row["settings"].values()]
        for column in report.columns:
            value = row["values"][column]
            cells += ["" if value[part] is None else repr(value[part]) for part in ("mean", "std")]
        writer.writerow(cells)
    files.write_text(path, buffer.getvalue(), "the comparison (CSV)")


def running_mean(values: list[float], window: int) -> list[float]:
    """Each value replaced by the mean of it and the window - 1 before it (fewer at the start)."""
    sums, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        sums.append(total / min(i + 1, window))
    return sums


def run_series(run: Run, panel: str) -> dict[int, float]:
    """step -> value of one panel's curve for one run: the smoothed loss, val_loss, or a metric."""
    if panel in (LOSS, VAL_LOSS):
        found = run.history.series(panel) if run.history else []
        if panel == LOSS and found:
            smoothed = running_mean([v for _, v in found], max(1, round(0.05 * len(found))))
            found = [(step, value) for (step, _), value in zip(found, smoothed)]
        return dict(found)
    name, points = metric_name(panel), {}
    for line in run.evaluations:
        values, step = line.get("values"), line.get("step")
        if isinstance(values, dict) and isinstance(step, int) and (value := number(values.get(name))) is not None:
            points[step] = value
    return points


def setting_curve(setting: Setting, panel: str) -> tuple[list[int], list[float], list[float] | None]:
    """(steps, mean, std or None) over the setting's runs that have the curve, at their shared steps."""
    curves = [curve for run in setting.runs if (curve := run_series(run, panel))]
    if not curves:
        return [], [], None
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    means = [statistics.fmean(curve[s] for curve in curves) for s in steps]
    stds = [statistics.stdev(curve[s] for curve in curves) for s in steps] if len(curves) > 1 else None
    return steps, means, stds


def check_report_path(path: Path, suffix: str, option: str) -> None:
    """Refuse to write a report (which replaces the file) to a folder, or to a file not named
    like one: a recipe or an image given by mistake."""
    if path.suffix.lower() != suffix:
        raise DifftoolError(f"{option} {path}: give a file name ending in {suffix}")
    if path.is_dir():
        raise DifftoolError(f"{option} {path} is a folder; give a file name ending in {suffix}")


def plot_format(path: Path) -> str:
    """The image format the plot's file name asks for (png, pdf, svg, ...), refusing others."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kind = path.suffix.lstrip(".").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if kind not in supported:
        raise DifftoolError(f"--plot {path}: give a file name ending in .png (or .pdf, .svg, .jpg: "
                            "any format matplotlib writes)")
    if path.is_dir():
        raise DifftoolError(f"--plot {path} is a folder; give a file name ending in .png")
    return kind


def plot(report: Report, path: Path) -> None:
    """One subplot each for the loss (a running mean over 5% of the steps), val_loss and each
    metric against the step: a line per setting (the mean over its seeds), ± std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kind = plot_format(path)
    panels = [c for c in report.columns if c not in (WALL, SPEED)]
    curves = {panel: [(setting, setting_curve(setting, panel)) for setting in report.settings] for panel in panels}
    panels = [panel for panel in panels if any(steps for _, (steps, _, _) in curves[panel])] or [LOSS]
    columns = min(3, len(panels))
    rows_ = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows_, columns, figsize=(5 * columns, 3.6 * rows_), squeeze=False)
    try:
        for axis, panel in zip(axes.flat, panels):
            for index, (setting, (steps, means, stds)) in enumerate(curves[panel]):
                if not steps:
                    continue
                color = f"C{index % 10}"  # a setting's colour is the same in every panel
                axis.plot(steps, means, color=color, label=setting.label(), marker="o" if len(steps) < 3 else None)
                if stds is not None:
                    axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                      color=color, alpha=0.2, linewidth=0)
            axis.set_title("loss (running mean)" if panel == LOSS else panel)
            values = [y for line in axis.lines for y in line.get_ydata()]
            if panel in (LOSS, VAL_LOSS) and values and min(values) > 0 and max(values) > 10 * min(values):
                axis.set_yscale("log")  # a loss falls by orders of magnitude: show the later steps too
            axis.set_xlabel("step")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            if not axis.lines:
                axis.text(0.5, 0.5, "no history yet", ha="center", va="center", transform=axis.transAxes)
        for axis in list(axes.flat)[len(panels):]:
            axis.set_visible(False)
        legend = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
        handles, labels = list(legend.values()), list(legend)
        if handles:
            figure.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small")
            figure.tight_layout(rect=(0, 0.05 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
        else:
            figure.tight_layout()
        with files.writing("the comparison plot", path), files.atomic_path(path) as tmp:
            figure.savefig(tmp, format=kind, dpi=100)
    finally:
        plt.close(figure)
