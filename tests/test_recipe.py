"""Recipe reading, overrides and validation: every bad input is one clear message."""

import pytest

import difftool
from difftool import recipe as recipes
from difftool.adapters import Adapter
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
        "loss_weighting": "none", "timestep_sampler": "uniform", "objective": "ddpm", "evaluation.swd": "swd",
    }
    assert recipe["evaluation"]["metrics"] == ["swd"] and recipe["evaluation"]["every_n_steps"] is None


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


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lr=0", "[optimizer] lr = 0 must be a positive number, e.g. 1e-4"),
    ("optimizer.lr=-1e-4", "[optimizer] lr = -0.0001 must be a positive number, e.g. 1e-4"),
    ("optimizer.lr=\"fast\"", "[optimizer] lr = 'fast' must be a positive number, e.g. 1e-4"),
    ("optimizer.lr=true", "[optimizer] lr = True must be a positive number"),
    ("optimizer.lr=nan", "[optimizer] lr = nan must be a positive number"),
    ("optimizer.param_groups=[{modules=\"down_blocks.*\", lr=0}]",
     "[[optimizer.param_groups]] #1 lr = 0 must be a positive number, e.g. 1e-4"),
    ("run.seed=-1", "[run] seed = -1 must be an integer from 0 to 4294967295 (2**32 - 1)"),
    (f"run.seed={2**32}", f"[run] seed = {2**32} must be an integer from 0 to 4294967295"),
    ("sampling.seed=-1", "[sampling] seed = -1 must be an integer from 0 to 4294967295"),
    ("run.output_dir=\"\"", "[run] output_dir = '' must name a folder, e.g. runs/my-run"),
    ("run.output_dir=\"   \"", "[run] output_dir = '   ' must name a folder, e.g. runs/my-run"),
    ("sampling.prompts=[\"a butterfly\", 3]", "[sampling] prompts = ['a butterfly', 3] must be a list of strings"),
    ("optimizer.param_groups=5", "[optimizer] param_groups = 5 must be a list"),
])
def test_values_the_engine_would_choke_on_are_refused_in_validation(tiny_recipe, override, expected):
    message = error_of(tiny_recipe(), override)
    assert expected in message and message.count("\n") == 0


def test_lr_has_no_upper_bound_and_check_reports_a_zero_lr(tiny_recipe, cli):
    assert recipes.load(tiny_recipe(), ["optimizer.lr=1.0", f"run.seed={2**32 - 1}"])["optimizer"]["lr"] == 1.0
    code, _, err = cli("check", tiny_recipe(), "--set", "optimizer.lr=0")
    assert code == 1 and "[optimizer] lr = 0 must be a positive number, e.g. 1e-4" in err
    assert "internal error" not in err


def test_a_recipe_that_is_not_utf8_says_where_and_how_to_fix_it(tiny_recipe, cli):
    path = tiny_recipe()
    text = path.read_text().replace("[run]", "# papillon \u00e9t\u00e9\n[run]")
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    message = error_of(path)
    assert f"{path} is not UTF-8 text: byte {offset} (line 2) is b'\\xe9'" in message
    assert "save it as UTF-8" in message
    code, _, err = cli("check", path)
    assert code == 1 and "is not UTF-8 text" in err and "internal error" not in err
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark is fine
    assert recipes.load(path)["run"]["seed"] == 0


def test_a_folder_given_as_the_recipe_suggests_the_recipes_in_it(tmp_path, cli):
    folder = tmp_path / "recipes"
    folder.mkdir()
    assert "is a folder, not a file; it holds no .toml files" in error_of(folder)
    for name in ("b.toml", "a.toml", "notes.txt"):
        (folder / name).write_text("")
    message = error_of(folder)
    assert message == f"recipe {folder} is a folder, not a file; give one of its recipes, e.g. {folder / 'a.toml'}, {folder / 'b.toml'}"
    code, _, err = cli("run", folder)
    assert code == 1 and "is a folder, not a file" in err


def test_set_picks_a_table_of_an_array_by_index(tiny_recipe):
    path = tiny_recipe('\n[[optimizer.param_groups]]\nmodules = "down_blocks.*"\nlr = 1e-5\n')
    recipe = recipes.load(path, ["optimizer.param_groups.0.lr=2e-5"])
    assert recipe["optimizer"]["param_groups"][0]["lr"] == 2e-5
    assert "'optimizer.param_groups' is an array of 1 table(s); pick one by its index" in error_of(
        path, "optimizer.param_groups.1.lr=1")
    assert "'run.seed' is not a table" in error_of(path, "run.seed.x=1")


# The sweep: a value of the wrong type for every engine key in SCHEMA, so new keys are covered.

WRONG = {
    int: ["{a=1}", '"x"', "true", "1.5"],  # true: a bool is not an int here
    float: ["{a=1}", '"x"', "true"],
    bool: ["{a=1}", '"x"', "1"],
    str: ["{a=1}", "1", "true", "[1]"],
    list: ["{a=1}", '"x"', "1"],
}
OPTIONAL_TABLES = '\n[attention]\nprocessor = "vanilla"\n\n[[adapters]]\nname = "noop"\n'


class NoopAdapter:
    """An in-process adapter plugin, so the sweep's [[adapters]] needs no installed plugin."""

    @difftool.hookimpl
    def register_adapters(self, register):
        register("noop", lambda model: Adapter(), "changes nothing")


def test_the_sweeps_base_recipe_is_valid(tiny_recipe, plugin, cli):
    plugin(NoopAdapter(), "noop-adapter")
    code, out, err = cli("check", tiny_recipe(OPTIONAL_TABLES))
    assert code == 0, err
    assert "│ attention " in out and "│ adapters.0 " in out and "noop" in out


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in recipes.SCHEMA.items() for k in keys])
def test_every_engine_key_refuses_a_wrong_type(tiny_recipe, plugin, cli, section, key):
    plugin(NoopAdapter(), "noop-adapter")
    path = tiny_recipe(OPTIONAL_TABLES)
    table = "adapters.0" if section == "adapters" else section
    for value in WRONG[recipes.SCHEMA[section][key][0]]:
        code, _, err = cli("check", path, "--set", f"{table}.{key}={value}")
        assert code == 1, (value, err)
        assert f"[{table}] {key} = " in err and "internal error" not in err and "Traceback" not in err, (value, err)
