"""Writing outputs so that nothing is ever half-written: temp file or folder, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from difftool.errors import DifftoolError

FINISHED_MARKER = "model_index.json"  # written last by every saved pipeline


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def save_image(image, path: Path) -> None:
    """Save a PIL image atomically, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(write, output_dir: Path) -> None:
    """Call `write(folder)` on a temp folder, then swap each item it wrote into `output_dir`.

    The marker (model_index.json) moves last, so a folder that has it is complete.
    """
    for stale in output_dir.glob(".saving-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        write(staging)
        for name in sorted(os.listdir(staging), key=lambda n: n == FINISHED_MARKER):
            if (staging / name).is_dir():
                replace_dir(staging / name, output_dir / name)
            else:
                os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`, replacing any folder there (renamed aside, then deleted)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


def prepare_output_dir(output_dir: Path, overwrite: bool, recipe_path: str) -> None:
    """Refuse to train into a folder that holds a finished run, unless told to overwrite it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DifftoolError(f"{recipe_path}: [run] output_dir = '{output_dir}' is a file; choose a folder")
    if (output_dir / FINISHED_MARKER).exists() and not overwrite:
        raise DifftoolError(
            f"{recipe_path}: [run] output_dir = '{output_dir}' already holds a finished run; choose "
            "another output_dir (e.g. --set run.output_dir=runs/new) or set "
            "run.overwrite_output_dir = true to replace it"
        )
