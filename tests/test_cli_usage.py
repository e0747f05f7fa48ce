"""Command-line usage errors: typer's own message and exit status 2, difftool's errors status 1,
never "internal error" or a traceback, whatever the arguments."""

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer

import difftool
from difftool import cli as cli_module
from difftool.testing import TINY_RECIPE

NOT_A_NAME = "Not A Name!"  # no scheduler, kind, plugin name or --set is called that


def clean(code: int, out: str, err: str) -> str:
    """Both streams, after asserting neither shows a crash."""
    both = out + err
    assert "internal error" not in both and "Traceback" not in both, both
    return both


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished unconditional run (1 optimizer step), for `sample`'s options."""
    from difftool import recipe as recipes
    from difftool.engine import train

    folder = tmp_path_factory.mktemp("finished")
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()))
    return train(recipes.load(path, ["run.max_steps=1", "run.num_epochs=1", "sampling.num_images=1"]))


def test_no_arguments_prints_the_help_in_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "difftool"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    both = clean(done.returncode, done.stdout, done.stderr)
    # click >= 8.2 treats a bare group as a usage error (2); older click printed the help and exited 0
    assert done.returncode in (0, 2) and "Usage" in both and "sample" in both and "error:" not in both


@pytest.mark.parametrize("args, code, expected", [
    ([], (0, 2), "Usage"),
    (["nosuch"], 2, "No such command 'nosuch'"),
    (["run", "--bogus"], 2, "No such option: --bogus"),
    (["--bogus"], 2, "No such option: --bogus"),
    (["run"], 2, "Missing argument 'recipe'"),
    (["plugins", "new"], 2, "Missing argument 'name'"),
    (["sample", "runs/x", "--steps", "0"], 2, "'--steps'"),
    (["sample", "runs/x", "--steps", "-1"], 2, "'--steps'"),
    (["sample", "runs/x", "--steps", "x"], 2, "'--steps'"),
    (["sample", "runs/x", "--num-images", "0"], 2, "'--num-images'"),
    (["sample", "runs/x", "--seed", "-1"], 2, "'--seed'"),
    (["sample", "runs/x", "--seed", str(2**32)], 2, "'--seed'"),
    (["sample", "runs/x", "--guidance-scale", "-1"], 2, "'--guidance-scale'"),
    (["sample", "runs/x", "--guidance-scale", "inf"], 2, "'--guidance-scale'"),
    (["sample", "runs/x", "--strength", "2"], 2, "'--strength'"),
    (["sample", "runs/x", "--denoising-end", "1.5"], 2, "'--denoising-end'"),
    (["sample", "runs/x", "--steps"], 2, "'--steps' requires an argument"),
    (["list", "nosuchkind"], 1, "error: unknown kind 'nosuchkind'"),
    (["sample", "runs/no-such-run"], 1, "error: runs/no-such-run is not a finished difftool run"),
    (["--version"], 0, f"difftool {difftool.__version__}"),
    (["--help"], 0, "Usage"),
    (["sample", "--help"], 0, "--num-images"),
])
def test_usage(cli, args, code, expected):
    got, out, err = cli(*args)
    both = clean(got, out, err)
    assert got in code if isinstance(code, tuple) else got == code, both
    assert expected.lower() in both.lower()
    if got == 2:
        assert "error:" not in both  # typer's message ("Usage: difftool ..." and an Error box), not difftool's


def test_ctrl_c_outside_training_exits_130(cli, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "show_plugins", interrupted)
    code, out, err = cli("plugins")
    assert code == 130 and "interrupted" in clean(code, out, err)


def test_other_exceptions_are_internal_errors_with_a_traceback_under_debug(cli, monkeypatch):
    def broken():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_module, "show_plugins", broken)
    code, _, err = cli("plugins")
    assert code == 1 and "internal error: ZeroDivisionError: a bug (please report it" in err
    assert "Traceback" not in err
    code, _, err = cli("--debug", "plugins")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_plugins_new_with_a_file_as_dir(cli, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    code, out, err = cli("plugins", "new", "my-thing", "--dir", file)
    assert code == 1 and f"--dir {file} is a file" in clean(code, out, err)


# The sweep: every parameter of every command, from typer's command tree, given bad values.

def parameters():
    """(command path, click parameter, its Python annotation) for every command's parameters."""
    found = []

    def walk(command, path):
        hints = typing.get_type_hints(inspect.unwrap(command.callback)) if command.callback else {}
        found.extend((path, param, hints.get(param.name)) for param in command.params)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(cli_module.app), ())
    return found


def bare(annotation):
    """int for Optional[int], list for list[str], ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return bare(args[0])
    return typing.get_origin(annotation) or annotation


BAD = {int: ["x", "1.5", "-1"], float: ["x", "-1", "nan", "inf"], str: [NOT_A_NAME], list: [NOT_A_NAME]}
CREATED = {("plugins", "new", "directory")}  # Path parameters that need not exist (they are created)
CASES = []
for path, param, annotation in parameters():
    kind = bare(annotation)
    if kind is bool:
        continue  # flags take no value
    if kind is Path:
        values = ["<file>"] + ([] if (*path, param.name) in CREATED else ["<missing>"])
    else:
        assert kind in BAD, f"{' '.join(path)} {param.name}: give the sweep bad values for {annotation}"
        values = BAD[kind]
    CASES += [pytest.param(path, param, value, id=f"{'-'.join(path)}-{param.name}={value}") for value in values]


def test_the_sweep_covers_every_command():
    commands = {case.values[0] for case in CASES}
    assert commands == {("run",), ("check",), ("list",), ("sample",), ("plugins", "new"), ("eval",), ("sweep",),
                        ("compare",), ("push",), ("export",)}


@pytest.mark.parametrize("path, param, value", CASES)
def test_every_parameter_refuses_bad_values(cli, tiny_recipe, finished_run, tmp_path, path, param, value):
    value = {"<file>": tmp_path / "not-a-folder.txt", "<missing>": tmp_path / "missing" / "thing"}.get(value, value)
    (tmp_path / "not-a-folder.txt").write_text("not a recipe, an image or a folder\n")
    arguments = {"recipe": tiny_recipe(), "run_dir": finished_run, "name": "my-thing"}
    positional = [value if p.name == param.name else arguments[p.name]
                  for p in path_command(path).params if p.param_type_name == "argument" and p.name in arguments]
    if param.param_type_name == "argument" and param.name not in arguments:
        positional.append(value)
    options = [] if param.param_type_name == "argument" else [param.opts[0], value]
    extra = ["--dir", tmp_path / "plugins"] if path == ("plugins", "new") and param.name != "directory" else []
    code, out, err = cli(*path, *positional, *options, *extra)
    both = clean(code, out, err)
    assert code in (1, 2), both
    if code == 2:  # typer's message names the parameter
        assert (param.opts[0] if options else param.name).lower() in both.lower(), both
    else:
        assert both.count("error:") == 1, both


def path_command(path):
    command = typer.main.get_command(cli_module.app)
    for name in path:
        command = command.commands[name]
    return command
