"""Runs are never lost or silently wrong: the output folder's lock, occupied folders, damaged
checkpoints and runs, full and read-only disks, failing plugin hooks, running out of memory.

Each test asserts the exit status, the message, and that nothing else in the output folder changed.
"""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difftool
from difftool import integrity
from difftool.testing import running

FAST = ["--set", "run.num_epochs=1", "--set", "run.save_image_epochs=100"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock file aside) with a digest of its contents."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".difftool.lock"}


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def clean_error(code: int, err: str, expected_code: int = 1) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs of its own (so it can be filled or made read-only); skipped where mounting
    is not allowed (not root, or in a container without the capability)."""
    mounted = []

    def mount(size: str = "64m", options: str = "") -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; returns the filler file."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as file:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    file.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


class FillDisk:
    """A plugin that fills the disk under `folder` once a training hook reaches a step."""

    def __init__(self, folder: Path, hook: str, step: int):
        self.folder, self.hook, self.step, self.filler = folder, hook, step, None

    def maybe_fill(self, state):
        if self.filler is None and state.global_step >= self.step:
            self.filler = fill(self.folder)

    @difftool.hookimpl
    def on_step_end(self, state):
        if self.hook == "on_step_end":
            self.maybe_fill(state)

    @difftool.hookimpl
    def on_checkpoint(self, state, path):
        if self.hook == "on_checkpoint":
            self.maybe_fill(state)


# -- the output folder ---------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_stale_lock(cli, tiny_recipe, tmp_path):
    output_dir = tmp_path / "shared"
    recipe = tiny_recipe(output_dir=output_dir)
    command = [sys.executable, "-m", "difftool", "run", str(recipe), "--set", "run.num_epochs=1000",
               "--set", "run.save_model_epochs=1000", "--set", "run.save_image_epochs=1000"]
    with running(command, tmp_path) as first:
        deadline = time.monotonic() + 240
        while not (output_dir / "recipe.toml").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (output_dir / "recipe.toml").exists(), first.communicate()
        before = snapshot(output_dir)["recipe.toml"]
        code, _, err = cli("run", recipe, "--set", "run.seed=7")
        clean_error(code, err)
        assert "is in use by another difftool run" in err and f"process {first.pid}" in err, err
        assert snapshot(output_dir)["recipe.toml"] == before  # still the first run's
        assert not (output_dir / "model_index.json").exists()
        os.killpg(first.pid, signal.SIGKILL)  # as if the machine lost it: no clean-up ran
        first.communicate()
    assert (output_dir / ".difftool.lock").exists()  # the file stays, its lock died with the process
    code, _, err = cli("run", recipe, "--set", "run.max_steps=1")
    assert code == 0, err
    assert (output_dir / "model_index.json").exists()


def test_an_occupied_current_folder_is_refused_and_keeps_its_recipe(cli, tiny_recipe, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    recipe = tiny_recipe(output_dir=Path("."))
    shutil.copy(recipe, project / "recipe.toml")
    (project / "notes.txt").write_text("mine")
    before = snapshot(project)
    monkeypatch.chdir(project)
    for output_dir in (".", "./"):
        code, _, err = cli("run", "recipe.toml", "--set", f'run.output_dir="{output_dir}"')
        clean_error(code, err)
        assert "is not empty and holds no difftool run" in err and "notes.txt" in err and "recipe.toml" in err
        assert snapshot(project) == before and sorted(os.listdir(project)) == ["notes.txt", "recipe.toml"]
    code, _, err = cli("run", "recipe.toml", "--set", 'run.output_dir=""')
    clean_error(code, err)
    assert "output_dir" in err and snapshot(project) == before


def test_an_empty_current_folder_is_a_fine_output_dir(cli, tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = cli("run", recipe, "--set", 'run.output_dir="."', "--set", "run.max_steps=1", *FAST)
    assert code == 0, err
    assert (empty / "model_index.json").exists() and (empty / "recipe.toml").exists()


def test_checkpoints_of_an_unfinished_run_are_not_trained_over(cli, tiny_recipe, tmp_path):
    output_dir = tmp_path / "unfinished"
    recipe = tiny_recipe(output_dir=output_dir)
    code, _, err = cli("run", recipe, "--set", "run.checkpointing_steps=1", "--set", "run.max_steps=2", *FAST)
    assert code == 0, err
    (output_dir / "model_index.json").unlink()  # as if the run had been killed before its final save
    before = snapshot(output_dir)
    code, _, err = cli("run", recipe)
    clean_error(code, err)
    assert "holds 2 checkpoint(s) of an unfinished run" in err and "resume_from_checkpoint" in err
    assert snapshot(output_dir) == before
    code, _, err = cli("run", recipe, "--set", "run.overwrite_output_dir=true", "--set", "run.max_steps=1", *FAST)
    assert code == 0, err
    assert "removed the earlier run's 2 checkpoint(s)" in err
    assert not (output_dir / "checkpoints").exists()  # "latest" can never pick up the earlier run's state


def test_resume_latest_without_checkpoints_says_it_starts_from_the_beginning(cli, tiny_recipe, tmp_path):
    code, _, err = cli("run", tiny_recipe(), "--set", "run.resume_from_checkpoint=latest", "--set", "run.max_steps=1", *FAST)
    assert code == 0, err
    assert "holds no checkpoint yet, so the run starts from the beginning" in err


# -- damaged checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run of 3 steps with a checkpoint after each, copied afresh for each test that damages it."""
    from difftool import recipe as recipes
    from difftool.engine import train
    from difftool.testing import TINY_RECIPE

    folder = tmp_path_factory.mktemp("checkpointed")
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()))
    run = train(recipes.load(path, ["run.checkpointing_steps=1", "run.max_steps=3", "run.num_epochs=2",
                                    "run.save_image_epochs=100"]))
    (run / "model_index.json").unlink()  # unfinished: resuming it has one step... none left, it just saves
    return run


@pytest.fixture
def damaged_copy(checkpointed, tiny_recipe, tmp_path):
    def copy():
        run = tmp_path / "run"
        shutil.copytree(checkpointed, run)
        return run, tiny_recipe(output_dir=run)
    return copy


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_every_checkpoint_has_a_manifest_of_its_files(checkpointed):
    checkpoint = checkpointed / "checkpoints" / "checkpoint-3"
    manifest = (checkpoint / "manifest.json").read_text()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "recipe.toml"):
        assert f'"{name}"' in manifest
    assert integrity.verify(checkpoint) is None


@pytest.mark.parametrize("damage, named", [
    (lambda c: cut(c / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    (lambda c: cut(c / "random_states_0.pkl", 0.9), "random_states_0.pkl is truncated"),
])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(cli, damaged_copy, damage, named):
    run, recipe = damaged_copy()
    damage(run / "checkpoints" / "checkpoint-3")
    before = snapshot(run)
    code, _, err = cli("run", recipe, "--set", f'run.resume_from_checkpoint="{run / "checkpoints" / "checkpoint-3"}"')
    clean_error(code, err)
    assert "the checkpoint is damaged" in err and named in err and "checkpoint-2" in err
    assert snapshot(run) == before
    code, _, err = cli("run", recipe, "--set", "run.resume_from_checkpoint=latest")
    assert code == 0, err
    assert named in err and "resuming from checkpoint-2 instead, the newest undamaged checkpoint" in err
    assert "resumed from" in err and "at step 2" in err


def test_all_checkpoints_damaged_is_an_error_naming_each(cli, damaged_copy):
    run, recipe = damaged_copy()
    for checkpoint in (run / "checkpoints").iterdir():
        cut(checkpoint / "model.safetensors")
    before = snapshot(run)
    code, _, err = cli("run", recipe, "--set", "run.resume_from_checkpoint=latest")
    clean_error(code, err)
    assert "every checkpoint" in err and err.count("model.safetensors is truncated") == 3
    assert snapshot(run) == before


def test_a_damaged_checkpoint_without_manifest_is_an_error_not_a_crash(cli, damaged_copy):
    run, recipe = damaged_copy()
    checkpoint = run / "checkpoints" / "checkpoint-3"
    (checkpoint / "manifest.json").unlink()  # as made before manifests existed
    cut(checkpoint / "optimizer.bin")
    code, _, err = cli("run", recipe, "--set", "run.resume_from_checkpoint=latest")
    clean_error(code, err)
    assert f"could not load the checkpoint {checkpoint}" in err and "resume from another checkpoint" in err


# -- damaged finished runs -----------------------------------------------------------------


@pytest.fixture
def finished_copy(tiny_recipe, tmp_path, cli):
    code, _, err = cli("run", tiny_recipe(), "--set", "run.max_steps=1", *FAST)
    assert code == 0, err
    return tmp_path / "run"


def test_sample_names_deleted_or_damaged_files(cli, finished_copy):
    run = finished_copy
    (run / "recipe.toml").write_text("[run\noutput_dir = ")
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert f"{run / 'recipe.toml'} is damaged" in err
    shutil.copy(run / "recipe.toml", run / "recipe.toml.bak")
    (run / "recipe.toml").unlink()
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    cut(weights)
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert f"{weights} is truncated" in err
    weights.unlink()
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert f"{run / 'unet'} has no weights file" in err
    (run / "model_index.json").write_text('{"unet": ')
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert "its model_index.json is damaged" in err
    assert not (run / "samples" / "sample-ddim-1.png").exists()


class LastLayer:
    """An adapter that trains only the UNet's last convolution, saved by the default Adapter."""

    @difftool.hookimpl
    def register_adapters(self, register):
        from difftool.adapters import Adapter

        def last_layer(model):
            model.requires_grad_(False)
            model.conv_out.requires_grad_(True)
            return Adapter()

        register("last-layer", last_layer, "trains conv_out alone")


def test_sample_names_a_damaged_adapted_run(cli, plugin, tiny_recipe, tmp_path):
    plugin(LastLayer(), name="last-layer")
    recipe = tiny_recipe('\n[[adapters]]\nname = "last-layer"\n')
    code, _, err = cli("run", recipe, "--set", "run.max_steps=1", *FAST)
    assert code == 0, err
    run = tmp_path / "run"
    weights = run / "adapters" / "0-last-layer" / "adapter_weights.safetensors"
    cut(weights)
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert f"the adapter could not be loaded: {weights} is truncated" in err and "the run's output is damaged" in err
    (run / "adapters.json").write_text("{broken")
    code, _, err = cli("sample", run, "--steps", "1")
    clean_error(code, err)
    assert "its adapters.json is damaged" in err and "resume_from_checkpoint" in err


# -- faults of the machine -----------------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoints(cli, plugin, tiny_recipe, disk):
    output_dir = disk() / "run"
    plugin(FillDisk(output_dir.parent, "on_step_end", step=2), name="fill-disk")
    code, _, err = cli("run", tiny_recipe(output_dir=output_dir), "--set", "run.checkpointing_steps=1", *FAST)
    clean_error(code, err)
    assert f"could not write checkpoint-2 ({output_dir / 'checkpoints' / 'checkpoint-2'}): the disk is full" in err
    assert "checkpoint-1 (the newest checkpoint) and everything saved before it are intact" in err
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-1"]  # nothing half-written
    assert integrity.verify(output_dir / "checkpoints" / "checkpoint-1") is None


def test_disk_full_while_writing_a_sample_grid_is_named(cli, plugin, tiny_recipe, disk):
    output_dir = disk() / "run"
    plugin(FillDisk(output_dir.parent, "on_step_end", step=2), name="fill-disk")
    code, _, err = cli("run", tiny_recipe(output_dir=output_dir), "--set", "run.save_model_epochs=100")
    clean_error(code, err)
    assert f"could not write the sample grid ({output_dir / 'samples' / '0000.png'}): the disk is full" in err
    assert "before saving any checkpoint" in err
    assert not [p for p in output_dir.rglob("*") if p.name.startswith(".") and p.name != ".difftool.lock"]


def test_disk_full_during_the_final_save_over_a_finished_run_loses_nothing(cli, plugin, tiny_recipe, disk):
    output_dir = disk() / "run"
    recipe = tiny_recipe(output_dir=output_dir)
    code, _, err = cli("run", recipe, *FAST)
    assert code == 0, err
    first = snapshot(output_dir)
    assert first.keys() >= {"recipe.toml", "model_index.json", "unet/diffusion_pytorch_model.safetensors"}
    filling = plugin(FillDisk(output_dir.parent, "on_checkpoint", step=1), name="fill-disk")
    overwrite = ["--set", "run.overwrite_output_dir=true", "--set", "run.seed=3", *FAST]
    code, _, err = cli("run", recipe, *overwrite)
    clean_error(code, err)
    assert f"could not write the model ({output_dir}): the disk is full" in err
    assert "state at its last step (2) is saved in" in err and "resume_from_checkpoint=latest" in err
    after = snapshot(output_dir)
    for name in first:  # the earlier run's model and its recipe, together, untouched
        if not name.startswith(("logs/", "samples/")):
            assert after[name] == first[name], name
    assert "seed = 0" in (output_dir / "recipe.toml").read_text()
    filling.filler.unlink()  # space freed: the rerun only saves, without training again
    code, _, err = cli("run", recipe, *overwrite, "--set", "run.resume_from_checkpoint=latest")
    assert code == 0, err
    assert "resumed from" in err and "at step 2" in err
    assert "seed = 3" in (output_dir / "recipe.toml").read_text()
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert snapshot(output_dir)[weights] != first[weights]  # the second run's model, with its recipe
    assert not (output_dir / "checkpoints").exists()  # the final state's checkpoint went once saved


def test_a_read_only_disk_is_named_before_anything_is_written(cli, tiny_recipe, disk):
    read_only = disk(options=",ro")
    code, _, err = cli("run", tiny_recipe(output_dir=read_only / "run"), *FAST)
    clean_error(code, err)
    assert f"could not write the output folder ({read_only / 'run'}): the file system is read-only" in err
    assert "choose an output_dir on a writable disk" in err


def test_an_output_dir_under_a_file_is_named(cli, tiny_recipe, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, _, err = cli("run", tiny_recipe(output_dir=tmp_path / "a-file" / "run"), *FAST)
    clean_error(code, err)
    assert "could not write the output folder" in err and "a part of the path is a file, not a folder" in err
    assert (tmp_path / "a-file").read_text() == "x"


def test_an_output_dir_without_write_permission_is_named(tiny_recipe, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: run without the capability that lets it
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
            pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*prefix, sys.executable, "-m", "difftool", "run", str(tiny_recipe(output_dir=locked / "run"))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    clean_error(done.returncode, done.stderr)
    assert f"could not write the output folder ({locked / 'run'}): permission denied" in done.stderr
    assert not any(locked.iterdir())


# -- plugins and memory --------------------------------------------------------------------


class Raising:
    def __init__(self, hook: str):
        self.hook = hook

    @difftool.hookimpl
    def on_step_end(self, state):
        if self.hook == "on_step_end" and state.global_step == 2:
            raise ValueError("a bug in the plugin")

    @difftool.hookimpl
    def on_train_end(self, state):
        if self.hook == "on_train_end":
            raise KeyError("another bug")


def test_a_raising_hook_is_named_and_the_finished_model_is_kept(cli, plugin, tiny_recipe, tmp_path):
    plugin(Raising("on_train_end"), name="buggy-plugin")
    code, _, err = cli("run", tiny_recipe(), *FAST)
    clean_error(code, err)
    assert "plugin 'buggy-plugin' failed in its on_train_end hook (KeyError" in err
    assert f"The run had finished: {tmp_path / 'run'} holds its model and samples, complete" in err
    assert (tmp_path / "run" / "model_index.json").exists()


def test_a_hook_raising_mid_run_is_named_with_what_is_kept(cli, plugin, tiny_recipe, tmp_path):
    plugin(Raising("on_step_end"), name="buggy-plugin")
    code, _, err = cli("run", tiny_recipe(), "--set", "run.checkpointing_steps=1", *FAST)
    clean_error(code, err)
    assert "plugin 'buggy-plugin' failed in its on_step_end hook (ValueError: a bug in the plugin)" in err
    assert "checkpoint-1 (the newest checkpoint)" in err


class OutOfMemory:
    @difftool.hookimpl
    def register_timestep_samplers(self, register):
        def sampler(batch_size, num_train_timesteps, device):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 412.00 GiB")
        register("oom", lambda: sampler, "runs out of memory")


def test_out_of_memory_names_the_sizes_that_caused_it(cli, plugin, tiny_recipe):
    plugin(OutOfMemory(), name="oom-plugin")
    code, _, err = cli("run", tiny_recipe(), "--set", 'timestep_sampler.name="oom"', *FAST)
    clean_error(code, err)
    assert "out of memory" in err and "Tried to allocate 412.00 GiB" in err
    assert "image_size = 32 and batch_size = 8" in err and "lower image_size or batch_size" in err


def test_check_refuses_an_image_size_whose_activations_cannot_fit(cli, tiny_recipe):
    from difftool import memory

    code, _, err = cli("check", tiny_recipe(), "--set", "dataset.image_size=4096", "--set", "dataset.batch_size=16")
    clean_error(code, err)
    assert "one training step at image_size = 4096 and batch_size = 16 needs at least 571.0 GiB" in err
    assert "lower image_size or batch_size" in err
    code, _, err = cli("check", tiny_recipe(), "--set", "dataset.image_size=131072")
    clean_error(code, err)
    assert "needs more than 16 EiB for its activations" in err
    code, _, err = cli("check", tiny_recipe(), "--set", "dataset.image_size=128", "--set", "dataset.batch_size=16")
    assert code == 0, err
    from difftool import recipe as recipes, build

    model = build.model(recipes.load(tiny_recipe(), ["dataset.image_size=64"]))
    floor = memory.convolution_bytes(model, 16, 64, 3)
    assert 0 < floor < 0.77 * 2**30  # below the 0.77 GiB peak measured for a real step at this size


def test_an_image_size_too_big_for_memory_is_an_error(cli, tiny_recipe, tmp_path):
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("with overcommit_memory = 1 a huge allocation succeeds and the OOM killer ends the process")
    code, _, err = cli("run", tiny_recipe(), "--set", "dataset.image_size=131072", *FAST)
    clean_error(code, err)
    assert "out of memory" in err and "image_size = 131072" in err


# -- the latent cache ----------------------------------------------------------------------


def test_the_latent_cache_re_encodes_a_damaged_entry_and_survives_a_full_disk(disk, capsys):
    from difftool.latent_cache import LatentCache
    from difftool.tiny_models import vae

    torch.manual_seed(0)
    model = vae().eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []

    def encode(batch):
        calls.append(len(batch))
        return model.encode(batch).latent_dist.parameters.detach()

    cache = LatentCache(disk(), model)
    first = cache.encode(pixels, encode)
    entries = sorted(cache.folder.rglob("*.safetensors"))
    assert len(entries) == 2 and calls == [2]
    cut(entries[0])  # damaged on disk: encoded again and rewritten
    assert torch.allclose(cache.encode(pixels, encode), first, atol=1e-5) and calls == [2, 1]  # batch of 1 vs 2
    assert torch.allclose(cache.encode(pixels, encode), first, atol=1e-5) and calls == [2, 1]
    fill(cache.folder)
    more = torch.rand(3, 3, 16, 16) * 2 - 1
    assert cache.encode(more, encode).shape[0] == 3 and not cache.writable
    err = capsys.readouterr().err
    assert "could not write a latent cache entry" in err and "the disk is full" in err
    assert "goes on without caching latents" in err
    assert cache.encode(more, encode).shape[0] == 3 and calls == [2, 1, 3, 3]
