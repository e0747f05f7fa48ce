"""Checkpoints: Accelerate's save_state/load_state, written atomically, pruned, checked on resume.

A checkpoint is `output_dir/checkpoints/checkpoint-{global_step}/`: written to a hidden temp
folder and renamed into place, so every folder with that name was complete when saved. Each
carries the resolved recipe with the versions that made it (recipe.toml) and, written last, a
manifest of its files' sizes and digests (manifest.json), checked before the checkpoint is
loaded: a file damaged since (truncated by a copy, deleted by hand) is named, and "latest"
falls back to the newest undamaged checkpoint.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from difftool import integrity
from difftool.adapters import trainable_state
from difftool.errors import DifftoolError
from difftool.files import RECIPE, replace_dir, usual_modes, writing

NAME = re.compile(r"^checkpoint-(\d+)$")
# sections whose change makes a checkpoint a different experiment
PROTECTED = ("dataset", "model", "noise_scheduler", "optimizer", "attention", "adapters", "ema")
TRAINABLE_FILE = "trainable_parameters.safetensors"


def folder(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def complete(output_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first."""
    found = [p for p in folder(output_dir).glob("checkpoint-*") if NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def resume_path(recipe) -> tuple[Path | None, list[str]]:
    """The checkpoint run.resume_from_checkpoint names, checked against its manifest, and notes
    for the user. "latest" is the newest undamaged checkpoint (None, said in a note, if there is
    none yet); a damaged checkpoint named by its path is refused, naming the damaged file."""
    wanted = recipe["run"]["resume_from_checkpoint"]
    where = f"{recipe.where('run')} resume_from_checkpoint = '{wanted}'"
    if wanted is None:
        return None, []
    if wanted == "latest":
        output_dir = Path(recipe["run"]["output_dir"])
        found = complete(output_dir)
        if not found:
            return None, [f"resume_from_checkpoint = \"latest\": {folder(output_dir)} holds no checkpoint yet, "
                          "so the run starts from the beginning"]
        notes = []
        for path in reversed(found):
            problem = integrity.verify(path)
            if problem is None:
                if notes:
                    notes.append(f"resuming from {path.name} instead, the newest undamaged checkpoint")
                return path, notes
            notes.append(f"{path} is damaged: {problem}")
        raise DifftoolError(
            f"{where}: every checkpoint in {folder(output_dir)} is damaged ({'; '.join(notes)}); restore one "
            "from a backup, or set overwrite_output_dir = true and no resume_from_checkpoint to start over"
        )
    path = Path(wanted)
    if not (path / RECIPE).is_file():
        raise DifftoolError(
            f"{where} is not a difftool checkpoint "
            "(no recipe.toml in it); give a checkpoints/checkpoint-N folder or \"latest\""
        )
    if problem := integrity.verify(path):
        others = [p.name for p in complete(path.parent.parent) if p != path and integrity.verify(p) is None]
        offer = f"resume from another checkpoint ({', '.join(others[-3:])})" if others else "restore it from a backup"
        raise DifftoolError(f"{where}: the checkpoint is damaged: {problem}; {offer}")
    return path, []


def load(accelerator, path: Path) -> None:
    """Restore the training state saved in the checkpoint at `path`."""
    try:
        accelerator.load_state(str(path))
    except DifftoolError:
        raise
    except Exception as exc:  # a checkpoint without a manifest, from before manifests existed
        raise DifftoolError(
            f"could not load the checkpoint {path} ({type(exc).__name__}: {str(exc)[:300]}); it is damaged or "
            "was made by another version: resume from another checkpoint, or start over"
        ) from exc


def changed_keys(saved: dict, current: dict) -> list[str]:
    """'section.key: old -> new' for every protected value that differs."""
    from difftool.recipe import REQUIRED, SCHEMA, differences, flatten

    def protected(data: dict) -> dict:  # no [[adapters]] at all is written as none: leave both out
        return flatten({section: data[section] for section in PROTECTED if data.get(section) not in (None, [])})

    # a checkpoint written before a key existed has the key's default: not a change
    defaults = {f"{section}.{key}": spec[1] for section in PROTECTED for key, spec in SCHEMA.get(section, {}).items()
                if spec[1] is not REQUIRED and spec[1] is not None}
    old = protected(saved)
    old.update({key: value for key, value in defaults.items() if key not in old and key.split(".")[0] in saved})
    return differences(old, protected(current))


def check_unchanged(path: Path, recipe, force: bool) -> None:
    """Refuse to resume if the recipe changed the model, data or optimizer, unless forced."""
    saved = tomllib.loads((path / RECIPE).read_text())
    changes = changed_keys(saved, recipe.data)
    if changes and not force:
        raise DifftoolError(
            f"{recipe.path}: cannot resume from {path}: the recipe changed what it trained:\n  - "
            + "\n  - ".join(changes)
            + "\nrestore those values, start a new output_dir, or pass --force to resume anyway"
        )


def save(accelerator, output_dir: Path, step: int, recipe_text: str, limit: int | None) -> Path:
    """Save the full training state as checkpoint-{step}; returns its path. All processes call it.
    A failed save (a full disk, say) leaves no partial folder behind and raises WriteFailed."""
    final = folder(output_dir) / f"checkpoint-{step}"
    staging = folder(output_dir) / f".saving-checkpoint-{step}"
    main = accelerator.is_main_process
    with writing(f"checkpoint-{step}", final, cleanup=lambda: main and shutil.rmtree(staging, ignore_errors=True)):
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            (staging / RECIPE).write_text(recipe_text)
            usual_modes(staging)
            integrity.write_manifest(staging, step=step)
            replace_dir(staging, final)
            prune(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: Path, limit: int | None) -> None:
    """Delete the oldest checkpoints beyond `limit`, and temp folders left by killed saves."""
    for stale in folder(output_dir).glob(".saving-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if limit:
        for old in complete(output_dir)[:-limit]:
            shutil.rmtree(old)


def remove(output_dir: Path, step: int) -> None:
    """Delete checkpoint-{step} if there is one (and the checkpoints folder, if that empties it)."""
    shutil.rmtree(folder(output_dir) / f"checkpoint-{step}", ignore_errors=True)
    if folder(output_dir).is_dir() and not any(folder(output_dir).iterdir()):
        folder(output_dir).rmdir()


def discard(output_dir: Path) -> int:
    """Delete every checkpoint in `output_dir` (an earlier run's, when a new one overwrites it);
    returns how many there were."""
    found = complete(output_dir)
    shutil.rmtree(folder(output_dir), ignore_errors=True)
    return len(found)


def save_only_trainable(accelerator) -> None:
    """Make checkpoints of a mostly frozen model (e.g. with adapters) hold only its trainable weights.

    Accelerate saves whole models; these hooks replace that for models with frozen parameters,
    which are rebuilt from the recipe on resume. Under DeepSpeed (and FSDP) Accelerate hands the
    model to DeepSpeed's own checkpointing, every process writing its part, so no hook is added:
    such checkpoints hold the whole model, frozen parts included, and the manifest lists every
    process's files.
    """
    from safetensors.torch import load_file, save_file

    from difftool.sharding import saves_own_state

    if saves_own_state(accelerator):
        return

    def frozen(model) -> bool:
        return any(not p.requires_grad for p in model.parameters())

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if frozen(models[i]):
                save_file(trainable_state(models[i]), str(Path(output_dir) / f"{i}_{TRAINABLE_FILE}"))
                weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            file = Path(input_dir) / f"{i}_{TRAINABLE_FILE}"
            if file.is_file():
                state = load_file(str(file))
                missing = set(n for n, p in models[i].named_parameters() if p.requires_grad) - state.keys()
                if missing:
                    raise DifftoolError(f"{input_dir} lacks trainable weights {sorted(missing)[:3]}; was it made by another recipe?")
                models[i].load_state_dict(state, strict=False)
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
