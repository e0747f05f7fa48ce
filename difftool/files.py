"""Writing outputs so that nothing is ever half-written: temp file or folder, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from difftool.errors import DifftoolError

# written last by every save: a pipeline's model_index.json, an adapted run's adapters.json
FINISHED_MARKERS = ("model_index.json", "adapters.json")


def finished(output_dir: Path) -> bool:
    """Whether `output_dir` holds a completely saved pipeline or adapters."""
    return any((output_dir / marker).is_file() for marker in FINISHED_MARKERS)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; on success it replaces `path`, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    usual_mode(Path(tmp), 0o666)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def usual_mode(path: Path, mode: int) -> None:
    """Give a temp file (`mode` 0o666) or folder (0o777), which mkstemp/mkdtemp make owner-only,
    the mode that new ones get under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def usual_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the usual mode (safetensors writes its files
    owner-only), so a run can be shared like any other output."""
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            usual_mode(Path(root) / name, 0o777)
        for name in names:
            usual_mode(Path(root) / name, 0o666)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_image(image, path: Path) -> None:
    """Save a PIL image atomically, in the format its suffix names."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def publish(write, output_dir: Path) -> None:
    """Call `write(folder)` on a temp folder, then swap each item it wrote into `output_dir`.

    The markers (FINISHED_MARKERS) move last, so a folder that has one is complete.
    """
    for stale in output_dir.glob(".saving-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        write(staging)
        usual_modes(staging)
        with interrupts_deferred():
            for marker in FINISHED_MARKERS:  # incomplete until they move back in
                (output_dir / marker).unlink(missing_ok=True)
            for name in sorted(os.listdir(staging), key=lambda n: n in FINISHED_MARKERS):
                if (staging / name).is_dir():
                    replace_dir(staging / name, output_dir / name)
                else:
                    os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C until the block is done (only the main thread receives signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


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
    if finished(output_dir) and not overwrite:
        raise DifftoolError(
            f"{recipe_path}: [run] output_dir = '{output_dir}' already holds a finished run; choose "
            "another output_dir (e.g. --set run.output_dir=runs/new) or set "
            "run.overwrite_output_dir = true to replace it"
        )
