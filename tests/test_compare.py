"""Run histories, `difftool sweep` and `difftool compare`, on real tiny runs."""

import csv
import json
import shutil
import statistics
import time
from pathlib import Path

import pytest

import difftool
from difftool import compare, sweep
from difftool.errors import DifftoolError
from difftool.testing import TINY_RECIPE

SMALL = ["run.max_steps=2", "dataset.batch_size=4", "run.save_image_epochs=100", "sampling.num_images=1"]
VALIDATION = "\n[validation]\nevery_n_steps = 1\nfraction = 0.25\nnum_batches = 1\n"
SETTINGS = ["loss_weighting.name=none", "loss_weighting.name=min-snr"]
NAMES = [f"{setting}_seed={seed}" for setting in SETTINGS for seed in (0, 1)]


def history_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "history.jsonl").read_text().splitlines()]


def table_cells(stdout: str) -> list[list[str]]:
    """The cells of each row of the rich table printed (header first)."""
    return [[cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]]
            for line in stdout.splitlines() if line.replace("┃", "│").count("│") > 2]


def final_loss(run: Path, last: int = 20) -> float:
    """The mean loss of the last steps, computed here from the raw lines (no resume in these runs)."""
    losses = {line["step"]: line["loss"] for line in history_lines(run) if "loss" in line}
    return statistics.fmean([losses[step] for step in sorted(losses)][-last:])


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A sweep of 2 loss weightings x 2 seeds, 2 steps each, with val_loss at every step:
    (the recipe, the sweep's folder, the lines it reported)."""
    folder = tmp_path_factory.mktemp("sweep")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()) + VALIDATION)
    lines: list[str] = []
    sweep.sweep(recipe, ["loss_weighting.name=none,min-snr"], seeds=2, overrides=SMALL, report=lines.append)
    return recipe, folder / "run-sweep", lines


def test_sweep_trains_each_combination_and_seed_and_records_it(swept):
    _, out, lines = swept
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(NAMES)
    assert all((out / name / "model_index.json").is_file() for name in NAMES)
    state = json.loads((out / "sweep.json").read_text())
    assert state["grid"] == {"loss_weighting.name": ["none", "min-snr"]} and state["seeds"] == 2
    assert state["overrides"] == SMALL and state["recipe"].endswith("tiny.toml")
    assert [run["name"] for run in state["runs"]] == NAMES  # the grid's order, seeds innermost
    assert [run["status"] for run in state["runs"]] == ["finished"] * 4
    assert state["runs"][3]["settings"] == {"loss_weighting.name": "min-snr", "run.seed": 1}
    assert len(lines) == 8 and sum("trained" in line for line in lines) == 4
    written = (out / NAMES[3] / "recipe.toml").read_text()
    assert 'name = "min-snr"' in written and "seed = 1" in written


def test_history_has_a_start_line_and_one_loss_line_per_step(swept):
    _, out, _ = swept
    lines = history_lines(out / NAMES[0])
    assert lines[0].keys() == {"event", "time", "num_processes"} and lines[0]["num_processes"] == 1
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert [line["step"] for line in lines if "val_loss" in line] == [1, 2]
    assert [line["lr"] for line in lines if "loss" in line] == [pytest.approx(1e-3), 0.0]  # cosine, 2 steps
    assert all(line["nonfinite_steps"] == 0 for line in lines if "loss" in line)
    times = [line["time"] for line in lines]
    assert times == sorted(times) and times[-1] - times[0] < 600
    assert list((out / NAMES[0] / "logs").rglob("events.out.tfevents.*"))  # tensorboard as well


def test_the_same_sweep_again_skips_every_finished_run(cli, swept):
    recipe, out, _ = swept
    weights = [out / name / "unet" / "diffusion_pytorch_model.safetensors" for name in NAMES]
    before = [(p.stat().st_mtime_ns, (p.parent.parent / "logs" / "history.jsonl").read_text()) for p in weights]
    sets = [arg for text in SMALL for arg in ("--set", text)]
    code, stdout, err = cli("sweep", recipe, "--grid", "loss_weighting.name=none,min-snr", "--seeds", "2", *sets)
    assert code == 0, err
    assert stdout.count("skipped, finished already") == 4 and "trained" not in stdout
    assert [(p.stat().st_mtime_ns, (p.parent.parent / "logs" / "history.jsonl").read_text()) for p in weights] == before


def test_compare_shows_one_row_per_setting_in_the_table_csv_json_and_plot(cli, swept, tmp_path):
    _, original, _ = swept
    out = tmp_path / "sweep"
    shutil.copytree(original, out)
    # metrics as the evaluation writes them: during training (metrics.jsonl), or by `difftool eval`
    swd = {NAMES[2]: 0.30, NAMES[3]: 0.20}
    for name, value in swd.items():
        lines = [{"step": step, "time": 1000.0 + step, "seconds": 0.5, "num_samples": 8, "values": values}  # long ago
                 for step, values in ((1, {"swd": 9.0, "swd_32": 9.0}), (2, {"swd": value, "swd_32": value / 2}))]
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name, value in ((NAMES[0], 0.5), (NAMES[1], 0.7)):
        (out / name / "evaluations").mkdir()
        result = {"values": {"swd": value, "swd_32": value / 2}, "settings": {"num_samples": 8}, "time": time.time()}
        (out / name / "evaluations" / "swd_ddim_2steps_8samples_seed0.json").write_text(json.dumps(result))
        stale = {**result, "values": {"swd": 99.0}, "time": result["time"] - 100}
        (out / name / "evaluations" / "older.json").write_text(json.dumps(stale))
    files = [tmp_path / "report.csv", tmp_path / "report.json", tmp_path / "report.png"]
    code, stdout, err = cli("compare", out, "--csv", files[0], "--json", files[1], "--plot", files[2], "--last", "1")
    assert code == 0, err

    report = json.loads(files[1].read_text())
    assert report["keys"] == ["loss_weighting.name"]
    assert report["columns"] == ["loss", "val_loss", "swd", "swd_32", "wall_time_s", "images_per_s"]
    rows = {row["settings"]["loss_weighting.name"]: row for row in report["rows"]}
    assert list(rows) == ["none", "min-snr"] and all(row["n"] == 2 for row in rows.values())
    for setting, names in (("none", NAMES[:2]), ("min-snr", NAMES[2:])):
        losses = [final_loss(out / name, last=1) for name in names]
        values = rows[setting]["values"]
        assert values["loss"]["mean"] == pytest.approx(statistics.fmean(losses))
        assert values["loss"]["std"] == pytest.approx(statistics.stdev(losses))
        best = [min(line["val_loss"] for line in history_lines(out / name) if "val_loss" in line) for name in names]
        assert values["val_loss"]["mean"] == pytest.approx(statistics.fmean(best))
        walls = [history_lines(out / name)[-1]["time"] - history_lines(out / name)[0]["time"] for name in names]
        assert values["wall_time_s"]["mean"] == pytest.approx(statistics.fmean(walls))
        speeds = [2 * 4 / wall for wall in walls]  # 2 steps of 4 images, 1 process; no evaluation in them
        assert values["images_per_s"]["mean"] == pytest.approx(statistics.fmean(speeds))
    assert rows["none"]["values"]["swd"]["mean"] == pytest.approx(0.6)  # the newest evaluations/*.json
    assert rows["min-snr"]["values"]["swd"] == {"mean": pytest.approx(0.25), "std": pytest.approx(0.0707107), "count": 2}
    assert rows["min-snr"]["values"]["swd_32"]["mean"] == pytest.approx(0.125)
    assert rows["none"]["runs"] == NAMES[:2]

    header, *body = table_cells(stdout)
    assert header == ["loss_weighting.name", "n", "loss (last 1)", "best val_loss", "swd", "swd_32", "wall time", "images/s"]
    assert [row[:2] for row in body] == [["none", "2"], ["min-snr", "2"]]
    assert body[1][2].startswith(f"{rows['min-snr']['values']['loss']['mean']:.4g} ± ")
    assert body[1][4] == "0.25 ± 0.071" and body[0][4] == "0.6 ± 0.14"

    with open(files[0], newline="") as file:
        records = list(csv.DictReader(file))
    assert [record["loss_weighting.name"] for record in records] == ["none", "min-snr"]
    for record, row in zip(records, report["rows"]):
        assert record["n"] == "2" and record["runs"] == ";".join(row["runs"])
        for column in report["columns"]:
            assert float(record[f"{column}_mean"]) == pytest.approx(row["values"][column]["mean"])
            assert float(record[f"{column}_std"]) == pytest.approx(row["values"][column]["std"])

    from PIL import Image

    with Image.open(files[2]) as image:
        assert image.format == "PNG" and image.width >= 1000  # 3 panels a row: loss, val_loss, swd ...
    assert not list(tmp_path.glob(".report*"))  # no temp files left


def test_compare_shows_dashes_for_what_a_run_lacks_and_refuses_other_folders(cli, swept, tmp_path):
    _, original, _ = swept
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(original / NAMES[0] / "recipe.toml", bare / "recipe.toml")  # a run that has logged nothing yet
    code, stdout, err = cli("compare", bare, "--json", tmp_path / "bare.json")
    assert code == 0, err
    assert "bare" in stdout and stdout.count("—") == 3  # loss, wall time, images/s
    row = json.loads((tmp_path / "bare.json").read_text())["rows"][0]
    assert row["values"]["loss"] == {"mean": None, "std": None, "count": 0}

    code, _, err = cli("compare", tmp_path / "bare.json")
    assert code == 1 and "is a file" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("compare", tmp_path / "empty")
    assert code == 1 and "neither a run folder" in err and "Traceback" not in err
    code, _, err = cli("compare", bare, "--plot", tmp_path / "plot.txt")
    assert code == 1 and "ending in .png" in err


def test_a_bad_value_in_any_combination_is_reported_before_anything_trains(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    code, _, err = cli("sweep", recipe, "--grid", "optimizer.lr=1e-3,-1", "--grid",
                       "model.block_out_channels=[32,64],[64, 64]", "--seeds", "2", "--out", tmp_path / "out")
    assert code == 1
    assert "4 of the 8 runs cannot train" in err
    for name in ("optimizer.lr=-1_model.block_out_channels=32,64_seed=0",
                 "optimizer.lr=-1_model.block_out_channels=64,64_seed=1"):
        assert name in err
    assert err.count("lr = -1 must be a positive number") == 4 and "lr=1e-3" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_grid_values_split_at_top_level_commas_only():
    assert sweep.split_values("[32,64],[64,64]") == ["[32,64]", "[64,64]"]
    assert sweep.split_values('"a,b",c, {x = 1, y = [1, 2]}') == ['"a,b"', "c", "{x = 1, y = [1, 2]}"]
    axis = sweep.parse_axis('model.block_out_channels=[32,64],[64,64]')
    assert axis.values == [[32, 64], [64, 64]]
    axis = sweep.parse_axis('sampling.prompts=["a cat, sitting"],[]')
    assert axis.values == [["a cat, sitting"], []]
    for bad, words in (("optimizer.lr", "expected SECTION.KEY=VALUE1"), ("optimizer.lr=1,,2", "a value is empty"),
                       ("run.output_dir=a,b", "sets run.output_dir itself")):
        with pytest.raises(DifftoolError, match=words):
            sweep.parse_axis(bad)
    with pytest.raises(DifftoolError, match="twice"):
        sweep.parse_grid(["optimizer.lr=1", "optimizer.lr=2"], seeds=1)


class Trouble:
    """A plugin that fails the run with one learning rate when it starts, and presses Ctrl-C in
    the run with another once its first checkpoint is saved."""

    def __init__(self, fail_lr: float | None, interrupt_lr: float | None):
        self.fail_lr, self.interrupt_lr = fail_lr, interrupt_lr

    @difftool.hookimpl
    def on_train_start(self, state):
        if state.recipe["optimizer"]["lr"] == self.fail_lr:
            raise RuntimeError("the data went missing")

    @difftool.hookimpl
    def on_checkpoint(self, state, path):
        if state.recipe["optimizer"]["lr"] == self.interrupt_lr and state.global_step == 1:
            raise KeyboardInterrupt


def test_failed_runs_are_listed_and_an_interrupted_run_resumes_from_its_checkpoint(cli, plugin, tiny_recipe, tmp_path):
    recipe, out = tiny_recipe(), tmp_path / "out"
    trouble = plugin(Trouble(fail_lr=2e-3, interrupt_lr=1e-3), name="trouble")
    args = ["sweep", recipe, "--grid", "optimizer.lr=2e-3,1e-3", "--out", out, "--set", "run.log_with='none'",
            "--set", "run.checkpointing_steps=1", *(arg for text in SMALL for arg in ("--set", text))]
    failing, interrupted = out / "optimizer.lr=2e-3", out / "optimizer.lr=1e-3"

    code, stdout, err = cli(*args)  # the first run fails, Ctrl-C in the second after its checkpoint-1
    assert code == 130 and "sweep interrupted in optimizer.lr=1e-3" in err and "run the same command again" in err
    state = json.loads((out / "sweep.json").read_text())
    assert state["runs"][0]["status"].startswith("failed: plugin 'trouble' failed in its on_train_start hook")
    assert state["runs"][1]["status"] == "pending"
    assert (interrupted / "checkpoints" / "checkpoint-1").is_dir() and not (interrupted / "model_index.json").exists()

    trouble.interrupt_lr = None  # the second run resumes; the first fails again
    code, stdout, err = cli(*args)
    assert code == 1 and "1 of the 2 runs failed" in err and "optimizer.lr=2e-3: plugin 'trouble' failed" in err
    assert "[2/2] optimizer.lr=1e-3: resuming from its latest checkpoint" in stdout
    assert "resumed from" in err and "at step 1" in err
    lines = history_lines(interrupted)
    assert [line.get("event") for line in lines].count("start") == 2
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert not list((interrupted / "logs").rglob("events.out.tfevents.*"))  # log_with = "none"
    assert compare.read_history(interrupted).sessions[1].optimizer_steps == 1

    trouble.fail_lr = None  # the failed run now trains, in its folder from before; the finished one is skipped
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "[1/2] optimizer.lr=2e-3: training" in stdout and "[2/2] optimizer.lr=1e-3: skipped" in stdout
    assert [run["status"] for run in json.loads((out / "sweep.json").read_text())["runs"]] == ["finished"] * 2
    assert (failing / "model_index.json").is_file()


def test_history_tracker_writes_json_scalars_and_mends_a_line_cut_short(tmp_path):
    import numpy as np

    from difftool.history import HistoryTracker

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "history.jsonl").write_text('{"event": "start"}\n{"step": 3, "lo')  # a killed session
    tracker = HistoryTracker(tmp_path)
    tracker.start()
    tracker.log({"loss": float("nan"), "lr": np.float32(0.5), "step": np.int64(4), "note": "x", "grid": np.zeros(3)}, step=4)
    tracker.finish()
    lines = (tmp_path / "logs" / "history.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 3, "lo'
    start, logged = json.loads(lines[2]), json.loads(lines[3])
    assert start["event"] == "start" and start["num_processes"] == 1
    assert logged == {"step": 4, "time": logged["time"], "loss": None, "lr": 0.5, "note": "x"}


def test_history_reader_keeps_the_last_line_per_step_and_sums_the_sessions(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "recipe.toml").write_text('[run]\ngradient_accumulation_steps = 2\n[dataset]\nbatch_size = 4\n')
    lines = [
        {"event": "start", "time": 100.0, "num_processes": 2},
        {"step": 1, "time": 101.0, "loss": 1.0}, {"step": 2, "time": 102.0, "loss": 0.9},
        {"step": 2, "time": 102.5, "val_loss": 0.8}, {"step": 3, "time": 110.0, "loss": 0.7},  # checkpoint at 2, then killed
        {"event": "start", "time": 200.0, "num_processes": 1},
        {"step": 3, "time": 201.0, "loss": 0.6}, {"step": 4, "time": 204.0, "loss": None},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 5, "ti'  # cut short by a kill
    (run / "logs" / "history.jsonl").write_text(text)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "time": 203.0, "seconds": 1.0, "values": {"swd": 0.1}}) + "\n")
    history = compare.read_history(run)
    assert history.series("loss") == [(1, 1.0), (2, 0.9), (3, 0.6)]  # step 4's NaN loss is no number
    assert history.series("val_loss") == [(2, 0.8)]
    assert [s.seconds for s in history.sessions] == [10.0, 4.0]
    result = compare.read_run(run, last=2)
    assert result.numbers["loss"] == pytest.approx(0.75) and result.numbers["wall_time_s"] == 14.0
    # 3 steps x 2 processes, then 2 steps x 1 process, of 4 x 2 images each, in 14 s less 1 s of evaluation
    assert result.numbers["images_per_s"] == pytest.approx((3 * 2 + 2 * 1) * 8 / 13.0)

    again = [{"event": "start", "time": 300.0, "num_processes": 1}, {"step": 1, "time": 302.0, "loss": 0.5}]
    with open(run / "logs" / "history.jsonl", "a") as file:  # overwrite_output_dir: a new run from step 1
        file.write("\n" + "".join(json.dumps(line) + "\n" for line in again))
    history = compare.read_history(run)
    assert history.series("loss") == [(1, 0.5)] and [s.seconds for s in history.sessions] == [2.0]
