"""Recipe reading, overrides and validation: every bad input is one clear message."""

import pytest

from difftool import recipe as recipes
from difftool.errors import DifftoolError


def error_of(path, *overrides) -> str:
    with pytest.raises(DifftoolError) as info:
        recipes.load(path, list(overrides))
    return str(info.value)


def test_tiny_recipe_is_valid_with_defaults_filled(tiny_recipe):
    recipe = recipes.load(tiny_recipe())
    assert recipe["run"]["gradient_accumulation_steps"] == 1
    assert recipe["dataset"]["random_flip"] is True
    assert recipe.kwargs("dataset") == {"count": 16, "size": 32}
    assert recipe.kwargs("noise_scheduler") == {"num_train_timesteps": 100}
    assert {s: e.name for s, e in recipe.entries.items()} == {
        "dataset": "synthetic-butterflies", "model": "unet2d", "noise_scheduler": "ddpm",
        "optimizer": "adamw", "lr_schedule": "cosine", "sampling": "ddim",
        "loss_weighting": "none", "timestep_sampler": "uniform",
    }


def test_overrides_parse_as_toml_and_fall_back_to_text(tiny_recipe):
    recipe = recipes.load(tiny_recipe(), [
        "run.max_steps=20", "dataset.random_flip=false", "run.output_dir=runs/other",
        "model.block_out_channels=[16, 32]", "noise_scheduler.beta_schedule=\"scaled_linear\"",
    ])
    assert recipe["run"]["max_steps"] == 20
    assert recipe["dataset"]["random_flip"] is False
    assert recipe["run"]["output_dir"] == "runs/other"
    assert recipe["model"]["block_out_channels"] == [16, 32]
    assert recipe.kwargs("noise_scheduler")["beta_schedule"] == "scaled_linear"


def test_sampling_scheduler_defaults_to_the_noise_scheduler(tiny_recipe):
    path = tiny_recipe()
    path.write_text(path.read_text().replace('scheduler = "ddim"\n', ""))
    recipe = recipes.load(path, ["noise_scheduler.name=\"pndm\""])
    assert recipe["sampling"]["scheduler"] == "pndm"
    assert recipe.entries["sampling"].name == "pndm"


@pytest.mark.parametrize("override, expected", [
    ("run.num_epoch=3", "[run] unknown key 'num_epoch'; did you mean 'num_epochs'?"),
    ("trian.seed=1", "unknown section [trian]"),
    ("run.seed=\"zero\"", "[run] seed = 'zero' must be an integer"),
    ("run.seed=true", "[run] seed = True must be an integer"),
    ("dataset.batch_size=0", "[dataset] batch_size = 0 must be a positive integer"),
    ("run.mixed_precision=\"fp8\"", "[run] mixed_precision = 'fp8' must be one of 'no', 'fp16', 'bf16'"),
    ("noise_scheduler.name=\"ddmp\"", "[noise_scheduler] unknown scheduler 'ddmp'; did you mean 'ddpm'"),
    ("noise_scheduler.beta_strat=0.1", "unknown key 'beta_strat'; did you mean 'beta_start'?"),
    ("dataset.cuont=3", "unknown key 'cuont'; did you mean 'count'?"),
    ("lr_schedule.name=\"cosine-warmup\"", "unknown LR schedule 'cosine-warmup'"),
    ("sampling.scheduler=\"eulr\"", "did you mean 'euler'"),
    ("optimizer.param_groups=[{lr=1e-5}]", "#1 needs modules = "),
    ("optimizer.param_groups=[{modules=\"down_blocks.*\", lrr=1e-5}]", "unknown key 'lrr'; did you mean 'lr'?"),
])
def test_bad_values_name_the_file_key_and_fix(tiny_recipe, override, expected):
    path = tiny_recipe()
    message = error_of(path, override)
    assert message.startswith(str(path))
    assert expected in message


def test_several_problems_are_reported_together(tiny_recipe):
    message = error_of(tiny_recipe(), "run.num_epoch=3", "dataset.batch_size=-1")
    assert "2 problems" in message and "num_epoch" in message and "batch_size" in message


def test_missing_required_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[dataset]\nimage_size = 32\n")
    message = error_of(path)
    assert "[run] missing required key 'output_dir'" in message
    assert "[dataset] missing required key 'name'" in message


def test_missing_file_and_syntax_error_with_line(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\noutput_dir = 'x'\nseed = = 1\n")
    assert "invalid TOML" in error_of(bad) and "line 3" in error_of(bad)


def test_bad_override_syntax(tiny_recipe):
    assert "expected SECTION.KEY=VALUE" in error_of(tiny_recipe(), "run.seed")


def test_dump_round_trips_with_provenance(tiny_recipe, tmp_path):
    recipe = recipes.load(tiny_recipe())
    text = recipes.dump(recipe, {"versions": {"difftool": "0"}})
    written = tmp_path / "written.toml"
    written.write_text(text)
    again = recipes.load(written)
    assert again.data == recipe.data
