"""End-to-end training runs on tiny models: outputs, logs, reproducibility, safety."""

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftool import recipe as recipes
from difftool.engine import train

from difftool.testing import TINY_RECIPE, running


def tb_scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (output_dir / "logs").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def unet_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run (2 epochs x 2 steps), shared by the tests that only read its outputs."""
    folder = tmp_path_factory.mktemp("finished")
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()))
    return train(recipes.load(path))


def test_run_writes_samples_pipeline_and_resolved_recipe(finished_run):
    assert sorted(p.name for p in (finished_run / "samples").iterdir()) == ["0000.png", "0001.png"]
    from PIL import Image

    assert Image.open(finished_run / "samples" / "0001.png").size == (64, 64)  # 2 x 2 grid of 32 px
    written = recipes.load(finished_run / "recipe.toml")
    assert written["dataset"]["count"] == 16
    text = (finished_run / "recipe.toml").read_text()
    assert "[provenance.versions]" in text and "diffusers = " in text and "torch = " in text
    assert not list(finished_run.glob(".saving-*"))


def test_tensorboard_has_loss_and_lr_per_optimizer_step(finished_run):
    scalars = tb_scalars(finished_run)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert all(0 < value < 10 for _, value in scalars["loss"])
    lrs = [value for _, value in scalars["lr"]]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1]  # warm-up, then cosine decay


def test_saved_pipeline_loads_with_diffusers_and_generates(finished_run):
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(finished_run)
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert images[0].size == (32, 32)


def test_same_seed_same_weights_and_training_changes_them(tiny_recipe, tmp_path, finished_run):
    again = train(recipes.load(tiny_recipe(output_dir=tmp_path / "again")))
    first, second = unet_weights(finished_run), unet_weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train(recipes.load(tiny_recipe(output_dir=tmp_path / "other", name="o.toml"), ["run.seed=1"]))
    assert not all(torch.equal(first[k], v) for k, v in unet_weights(other).items())


def test_accumulation_and_max_steps_count_optimizer_steps(tiny_recipe, tmp_path):
    output_dir = train(recipes.load(tiny_recipe(), [
        "run.gradient_accumulation_steps=2", "run.num_epochs=5", "run.max_steps=3",
        'lr_schedule={name="warmup-cosine", warmup_steps=1}',
    ]))
    assert [step for step, _ in tb_scalars(output_dir)["loss"]] == [1, 2, 3]
    assert (output_dir / "samples" / "0002.png").exists()  # the last epoch sampled


def test_finished_output_dir_is_refused_unless_overwrite(cli, tiny_recipe, finished_run):
    before = unet_weights(finished_run)
    recipe = tiny_recipe(output_dir=finished_run)
    code, _, err = cli("run", recipe)
    assert code == 1 and "already holds a finished run" in err and "overwrite_output_dir" in err
    assert "Traceback" not in err
    assert all(torch.equal(before[k], v) for k, v in unet_weights(finished_run).items())
    code, _, err = cli("run", recipe, "--set", "run.overwrite_output_dir=true", "--set", "run.seed=5")
    assert code == 0, err
    assert not all(torch.equal(before[k], v) for k, v in unet_weights(finished_run).items())


def test_sample_command_with_any_scheduler(cli, finished_run, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = cli("sample", finished_run, "--scheduler", "euler", "--steps", "3",
                            "--num-images", "4", "--seed", "1", "--out", out)
    assert code == 0, err
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    code, _, err = cli("sample", finished_run, "--out", out, "--steps", "2")
    assert code == 1 and "already exists" in err
    code, _, err = cli("sample", finished_run, "--out", out, "--steps", "2", "--overwrite")
    assert code == 0, err
    code, _, _ = cli("sample", finished_run, "--steps", "2", "--num-images", "1")
    assert code == 0 and (finished_run / "samples" / "sample-ddim-2.png").exists()
    code, _, err = cli("sample", tmp_path, "--steps", "2")
    assert code == 1 and "is not a finished difftool run" in err
    code, _, err = cli("sample", finished_run, "--scheduler", "eulr")
    assert code == 1 and "did you mean 'euler'" in err
    code, _, err = cli("sample", finished_run, "--out", tmp_path / "grid")
    assert code == 1 and "image extension" in err


def test_cli_errors_are_one_line_without_traceback(cli, tiny_recipe, tmp_path):
    code, _, err = cli("run", tmp_path / "missing.toml")
    assert code == 1 and "recipe file not found" in err and "Traceback" not in err
    code, _, err = cli("check", tiny_recipe(), "--set", "dataset.image_size=31")
    assert code == 1 and "image_size = 31 must be divisible by 2" in err
    code, _, err = cli("run", tiny_recipe(), "--set", "dataset.count=0")
    assert code == 1 and "count must be >= 1" in err and "Traceback" not in err
    code, _, err = cli("--debug", "run", tiny_recipe(), "--set", "dataset.count=0")
    assert code == 1 and "Traceback" in err


def test_ctrl_c_stops_cleanly_and_keeps_what_was_saved(tiny_recipe, tmp_path):
    output_dir = tmp_path / "interrupted"
    recipe = tiny_recipe(output_dir=output_dir)
    with running([sys.executable, "-m", "difftool", "run", str(recipe), "--set", "run.num_epochs=1000",
                  "--set", "run.save_image_epochs=1000"], tmp_path) as process:
        deadline = time.monotonic() + 240
        while not (output_dir / "model_index.json").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (output_dir / "model_index.json").exists(), process.communicate()
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(output_dir)


def test_two_processes_with_accelerate_launch(tiny_recipe, tmp_path):
    output_dir = tmp_path / "ddp"
    recipe = tiny_recipe(output_dir=output_dir)
    with running([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "difftool", "run", str(recipe), "--set", "evaluation.every_n_steps=1", "--set", "evaluation.num_samples=5",
        "--set", "evaluation.batch_size=2",
    ], tmp_path) as process:
        _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    # 16 images in batches of 8 shared by 2 processes: 1 optimizer step per epoch
    assert [step for step, _ in tb_scalars(output_dir)["loss"]] == [1, 2]
    assert (output_dir / "model_index.json").exists()
    # evaluation: each process generated its share (3 samples, 1 of them padding), gathered to 5
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(line["num_samples"] == 5 for line in lines)
    assert all(line["values"]["swd"] > 0 for line in lines)
    assert [step for step, _ in tb_scalars(output_dir)["eval/swd"]] == [1, 2]
