"""Fixtures for testing difftool and its plugins with pytest: a tiny recipe that trains in
seconds on CPU, in-process plugin registration, and the CLI run in-process.

Use them from a conftest.py: `from difftool.testing import cli, plugin, tiny_recipe, tiny_sd, tiny_sdxl`.
Importing this module also keeps Hugging Face libraries offline, and points difftool's cache
folder ($DIFFTOOL_CACHE_DIR) at a new temporary folder unless it is set already, so tests never
read or fill the user's caches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFTOOL_CACHE_DIR", tempfile.mkdtemp(prefix="difftool-tests-cache-"))
os.environ["COLUMNS"] = "200"  # rich tables unwrapped, so assertions see whole lines

TINY_RECIPE = """
[run]
output_dir = "{output_dir}"
seed = 0
num_epochs = 2
save_image_epochs = 1
save_model_epochs = 1

[dataset]
name = "synthetic-butterflies"
count = 16
size = 32
image_size = 32
batch_size = 8

[model]
name = "unet2d"
block_out_channels = [32, 64]
down_block_types = ["DownBlock2D", "AttnDownBlock2D"]
up_block_types = ["AttnUpBlock2D", "UpBlock2D"]
layers_per_block = 1
norm_num_groups = 8

[noise_scheduler]
name = "ddpm"
num_train_timesteps = 100

[optimizer]
name = "adamw"
lr = 1e-3

[lr_schedule]
name = "cosine"
num_warmup_steps = 1

[sampling]
scheduler = "ddim"
num_inference_steps = 2
num_images = 4
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write the tiny recipe (plus extra TOML) to a file; returns its path."""

    def write(extra: str = "", output_dir: Path | None = None, name: str = "tiny.toml") -> Path:
        path = tmp_path / name
        out = output_dir or tmp_path / "run"
        path.write_text(TINY_RECIPE.format(output_dir=out.as_posix()) + extra)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline folder (difftool.tiny_models), written once per
    test session; tests read it and never change it (copy it to change it)."""
    from difftool.tiny_models import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline folder, as tiny_sd."""
    from difftool.tiny_models import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), xl=True)


@pytest.fixture
def plugin():
    """Register in-process plugin objects for one test; unregistered afterwards."""
    from difftool.plugins import load_plugins, pm

    load_plugins()
    names = []

    def register(obj, name: str):
        pm.register(obj, name=name)
        names.append(name)
        return obj

    yield register
    for name in names:
        pm.unregister(name=name)


@pytest.fixture
def cli(capsys):
    """Run `difftool ARGS` in-process; returns (exit code, stdout, stderr)."""
    from difftool.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@contextlib.contextmanager
def running(args: list[str], cwd: Path, **popen):
    """Start `args` (e.g. [sys.executable, "-m", "difftool", "run", ...]) in its own process group,
    with output piped as text, and kill the group when the block ends, pass or fail.

    The child gets the default Ctrl-C handler: a test suite started from a background job
    ignores SIGINT, and a Python child would inherit that and never see a KeyboardInterrupt.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **popen.pop("env", {})}
    process = subprocess.Popen(
        args, cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=popen.pop("stdout", subprocess.PIPE), stderr=popen.pop("stderr", subprocess.PIPE),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def assert_identical(a, b, where: str = "state") -> None:
    """Assert that two nested states (dicts, lists, tensors, arrays, plain values: a checkpoint's
    model, optimizer and random states, say) are bit-identical; `where` names the first
    difference. For tests of exact resume: a resumed run against one that never stopped."""
    import numpy as np
    import torch

    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
