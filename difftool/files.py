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


def save_pipeline(pipeline, output_dir: Path) -> None:
    """`pipeline.save_pretrained` into a temp folder, then swap each item into `output_dir`.

    The marker file (model_index.json) moves last, so a folder that has it is complete.
    """
    for stale in output_dir.glob(".saving-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        pipeline.save_pretrained(staging)
        names = sorted(os.listdir(staging), key=lambda n: n == FINISHED_MARKER)
        for name in names:
            target = output_dir / name
            if target.is_dir():
                old = staging / f".old-{name}"
                os.replace(target, old)
                os.replace(staging / name, target)
                shutil.rmtree(old)
            else:
                os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
