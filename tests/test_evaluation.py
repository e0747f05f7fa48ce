"""Evaluation: [evaluation] during training (same weights, exact resume, metrics.jsonl, the
reference cache), `difftool eval` of runs and image folders, and its errors."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difftool
from difftool import recipe as recipes
from difftool.engine import train
from difftool.errors import DifftoolError
from difftool.metrics import Metric

from test_engine import tb_scalars
from test_training import RESUMABLE, assert_identical, read_state


class MeanColour(Metric):
    """A tiny real metric: the distance between the mean colours of generated and reference
    images, from running sums (so it streams). Counts its reference passes."""

    reference_passes = 0

    def __init__(self, min_samples: int = 1, prompts: bool = False):
        self.min_samples, self.needs_prompts = min_samples, prompts
        self.reference = torch.zeros(4, dtype=torch.float64)  # sum of r, g, b and the count
        self.generated = torch.zeros(4, dtype=torch.float64)

    @staticmethod
    def sums(images):
        return torch.cat([images.double().mean(dim=(2, 3)).sum(0), torch.tensor([len(images)], dtype=torch.float64)])

    def update_reference(self, images):
        if not self.reference[3]:
            MeanColour.reference_passes += 1
        self.reference += self.sums(images)

    def reference_state(self):
        return {"sums": self.reference}

    def load_reference_state(self, state):
        self.reference = state["sums"].clone()

    def update(self, images, prompts=None):
        if self.needs_prompts:
            assert prompts and len(prompts) == len(images)
        self.generated += self.sums(images)

    def compute(self):
        mean = lambda sums: sums[:3] / sums[3]  # noqa: E731
        return {"colour_distance": float((mean(self.generated) - mean(self.reference)).norm())}

    def reset(self):
        self.generated.zero_()


class MetricPlugin:
    @difftool.hookimpl
    def register_metrics(self, register):
        register("mean-colour", MeanColour, "distance of mean colours")


EVALUATION = ['evaluation.metrics=["mean-colour"]', "evaluation.every_n_steps=2", "evaluation.num_samples=6",
              "evaluation.batch_size=4"]


@pytest.fixture
def metric(plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    MeanColour.reference_passes = 0
    plugin(MetricPlugin(), "metric-plugin")


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluation_changes_nothing_in_training_and_logs_every_evaluation(tiny_recipe, tmp_path, metric):
    path = tiny_recipe()
    without = train(recipes.load(path, ["run.max_steps=4", f'run.output_dir="{tmp_path / "off"}"']))
    with_eval = train(recipes.load(path, ["run.max_steps=4", f'run.output_dir="{tmp_path / "on"}"', *EVALUATION]))
    a = load_file(without / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(with_eval / "unet" / "diffusion_pytorch_model.safetensors")
    assert_identical(a, b, "unet")
    assert [s for s, _ in tb_scalars(without)["loss"]] == [s for s, _ in tb_scalars(with_eval)["loss"]]
    assert [v for _, v in tb_scalars(without)["loss"]] == [v for _, v in tb_scalars(with_eval)["loss"]]
    lines = read_lines(with_eval / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    assert all(line["num_samples"] == 6 and line["seconds"] > 0 for line in lines)
    assert all(0 <= line["values"]["colour_distance"] < 255 * 3 ** 0.5 for line in lines)
    logged = tb_scalars(with_eval)["eval/colour_distance"]
    assert [s for s, _ in logged] == [2, 4]
    assert [v for _, v in logged] == pytest.approx([line["values"]["colour_distance"] for line in lines])
    assert MeanColour.reference_passes == 1  # the second evaluation used the reference in memory
    assert not (without / "metrics.jsonl").exists()


def test_the_last_step_is_evaluated_and_the_reference_is_cached(tiny_recipe, tmp_path, metric):
    path = tiny_recipe()
    out = train(recipes.load(path, ["run.max_steps=3", *EVALUATION]))
    assert [line["step"] for line in read_lines(out / "metrics.jsonl")] == [2, 3]
    assert MeanColour.reference_passes == 1
    cached = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(cached) == 1 and "mean-colour-32px" in cached[0].name
    train(recipes.load(path, ["run.max_steps=2", "run.overwrite_output_dir=true", *EVALUATION]))
    assert MeanColour.reference_passes == 1  # from the cache, not recomputed
    train(recipes.load(path, ["run.max_steps=2", "run.overwrite_output_dir=true", "dataset.count=12", *EVALUATION]))
    assert MeanColour.reference_passes == 2  # other data: another cache entry
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2


def test_exact_resume_holds_with_evaluation_on(tiny_recipe, tmp_path, metric):
    import shutil

    settings = RESUMABLE + EVALUATION + ["evaluation.every_n_steps=2"]
    straight = train(recipes.load(tiny_recipe(output_dir=tmp_path / "straight"), settings))
    halves = tmp_path / "halves"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", halves / "checkpoints" / "checkpoint-3")
    train(recipes.load(tiny_recipe(output_dir=halves, name="halves.toml"),
                       settings + ['run.resume_from_checkpoint="latest"']))
    assert_identical(read_state(straight / "checkpoints" / "checkpoint-6"), read_state(halves / "checkpoints" / "checkpoint-6"))
    a, b = read_lines(straight / "metrics.jsonl"), read_lines(halves / "metrics.jsonl")
    assert [line["step"] for line in a] == [2, 4, 6, 8] and [line["step"] for line in b] == [4, 6, 8]
    assert [line["values"] for line in a[1:]] == [line["values"] for line in b]  # EMA weights measured alike


def test_eval_command_on_a_run_and_on_a_folder(tiny_recipe, tmp_path, cli, metric):
    out = train(recipes.load(tiny_recipe(), ["run.max_steps=2"]))
    result = tmp_path / "result.json"
    code, stdout, err = cli("eval", out, "--metric", "mean-colour", "--num-samples", "5", "--steps", "2",
                            "--json", result)
    assert code == 0, err
    assert "colour_distance" in stdout and "5 samples vs dataset 'synthetic-butterflies' (16 images)" in stdout
    saved = json.loads(result.read_text())
    (written,) = (out / "evaluations").glob("*.json")
    assert json.loads(written.read_text())["values"] == saved["values"]
    assert saved["settings"]["num_samples"] == 5 and saved["settings"]["num_inference_steps"] == 2
    assert saved["settings"]["scheduler"] == "ddim" and saved["settings"]["metrics"] == ["mean-colour"]
    code, stdout2, _ = cli("eval", out, "--metric", "mean-colour", "--num-samples", "5", "--steps", "2")
    assert code == 0 and json.loads(written.read_text())["values"] == saved["values"]  # deterministic

    fake, real = tmp_path / "fake", tmp_path / "real"
    for folder, colour in ((fake, (255, 0, 0)), (real, (0, 0, 255))):
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    code, stdout, err = cli("eval", "--images", fake, "--reference", real, "--metric", "mean-colour", "--json", result)
    assert code == 0, err
    assert json.loads(result.read_text())["values"]["colour_distance"] == pytest.approx(255 * 2 ** 0.5, rel=1e-6)
    assert json.loads(result.read_text())["settings"]["image_size"] == 40


def test_eval_errors_are_one_clear_message(tiny_recipe, tmp_path, cli, metric):
    out = train(recipes.load(tiny_recipe(), ["run.max_steps=1"]))
    code, _, err = cli("eval", out, "--metric", "mean-color")
    assert code == 1 and "unknown metric 'mean-color'; did you mean 'mean-colour'?" in err and "Traceback" not in err
    code, _, err = cli("eval", out, "--metric", "mean-colour", "--reference", tmp_path / "nowhere")
    assert code == 1 and f"--reference {tmp_path / 'nowhere'} does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("eval", out, "--metric", "mean-colour", "--reference", tmp_path / "empty")
    assert code == 1 and "holds no images" in err
    code, _, err = cli("eval", tmp_path / "empty", "--metric", "mean-colour")
    assert code == 1 and "is not a finished difftool run" in err
    code, _, err = cli("eval", "--images", tmp_path / "empty")
    assert code == 1 and "holds no images" in err
    code, _, err = cli("eval")
    assert code == 1 and "give either RUN_DIR" in err


def test_recipe_evaluation_problems_are_found_before_training(tiny_recipe, tmp_path, cli, metric):
    path = tiny_recipe()
    code, _, err = cli("check", path, "--set", 'evaluation.metrics=["mean-colur"]', "--set", "evaluation.every_n_steps=2")
    assert code == 1 and "unknown metric 'mean-colur'; did you mean 'mean-colour'?" in err
    code, _, err = cli("check", path, "--set", "evaluation.kid.subset_size=10")
    assert code == 1 and "[evaluation.kid] configures metric 'kid', which [evaluation] metrics does not list" in err
    code, _, err = cli("check", path, "--set", 'evaluation.metrics=["mean-colour"]', "--set", "evaluation.mean-colour.min_sample=4")
    assert code == 1 and "unknown key 'min_sample'; did you mean 'min_samples'?" in err
    many = ['evaluation.metrics=["mean-colour"]', "evaluation.every_n_steps=2", "evaluation.num_samples=4",
            "evaluation.mean-colour.min_samples=50"]
    code, _, err = cli("check", path, *[a for s in many for a in ("--set", s)])
    assert code == 1 and "num_samples = 4 is too few for 'mean-colour', which needs at least 50" in err
    with pytest.raises(DifftoolError, match="reference, dataset 'synthetic-butterflies' \\(16 images\\), has too few"):
        train(recipes.load(path, [*many[:2], "evaluation.num_samples=50", "evaluation.mean-colour.min_samples=50"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    prompts = ['evaluation.metrics=["mean-colour"]', "evaluation.every_n_steps=2", "evaluation.mean-colour.prompts=true"]
    code, _, err = cli("check", path, *[a for s in prompts for a in ("--set", s)])
    assert code == 1 and "scores images against their prompts, and this run's model is unconditional" in err
    code, _, err = cli("check", path, "--set", 'evaluation.metrics=["mean-colour"]', "--set", "evaluation.every_n_steps=2",
                       "--set", f'evaluation.reference="{tmp_path / "missing"}"')
    assert code == 1 and "does not exist" in err


def test_clip_score_on_an_unconditional_run_is_refused_before_it_is_built(tiny_recipe, cli, monkeypatch):
    monkeypatch.delenv("DIFFTOOL_CLIP_MODEL", raising=False)
    code, _, err = cli("check", tiny_recipe(), "--set", 'evaluation.metrics=["clip-score"]', "--set", "evaluation.every_n_steps=2")
    assert code == 1 and "metric 'clip-score' scores images against their prompts, and this run's model is unconditional" in err


def test_the_built_in_swd_is_the_default_and_metrics_are_listed(tiny_recipe, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = cli("list", "metrics")
    assert code == 0 and all(name in out for name in ("swd", "fid", "kid", "clip-score"))
    run = train(recipes.load(tiny_recipe(), ["run.max_steps=1"]))
    code, out, err = cli("eval", run, "--num-samples", "4", "--steps", "2")
    assert code == 0, err
    (written,) = (run / "evaluations").glob("*.json")
    assert written.name == "swd_ddim_2steps_4samples_seed0.json"
    values = json.loads(written.read_text())["values"]
    assert set(values) == {"swd", "swd_32", "swd_16"} and values["swd"] > 0
    assert values["swd"] == pytest.approx((values["swd_32"] + values["swd_16"]) / 2)


class PromptLog(MeanColour):
    """MeanColour that needs prompts, and keeps those it was given."""

    seen: list = []

    def __init__(self):
        super().__init__(prompts=True)

    def update(self, images, prompts=None):
        PromptLog.seen.extend(prompts)
        super().update(images, prompts)


class PromptPlugin:
    @difftool.hookimpl
    def register_metrics(self, register):
        register("prompt-log", PromptLog, "mean colours, with the prompts kept")


def test_a_text_to_image_run_is_evaluated_on_its_prompts(plugin, tmp_path, monkeypatch):
    from difftool.tiny_models import write_pipeline
    from test_text_to_image import sd_recipe

    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    plugin(PromptPlugin(), "prompt-plugin")
    PromptLog.seen = []
    pipeline = write_pipeline(tmp_path / "tiny-sd")
    evaluation = {"metrics": ["prompt-log"], "every_n_steps": 1, "num_samples": 3, "batch_size": 2,
                  "num_inference_steps": 2}
    recipe = sd_recipe(tmp_path, pipeline, adapters=None, evaluation=evaluation, run={"max_steps": 1},
                       sampling={"prompts": ["a red butterfly", "a blue butterfly"]})
    out = train(recipes.load(recipe))
    (line,) = read_lines(out / "metrics.jsonl")
    assert line["step"] == 1 and line["num_samples"] == 3 and line["values"]["colour_distance"] >= 0
    assert PromptLog.seen == ["a red butterfly", "a blue butterfly", "a red butterfly"]
