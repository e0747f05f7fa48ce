"""Writing outputs so that nothing is ever half-written: temp file or folder, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from difftool.errors import DifftoolError

# written last by every save: a pipeline's model_index.json, an adapted run's adapters.json
FINISHED_MARKERS = ("model_index.json", "adapters.json")
RECIPE = "recipe.toml"  # a run's resolved recipe; at the top of output_dir, it describes the saved model
LOCK = ".difftool.lock"  # held by the run writing into output_dir (difftool.lock)
CACHE_ENV = "DIFFTOOL_CACHE_DIR"  # the root of difftool's caches (cache_root)
# why a write failed, by errno, and what to do about it
WRITE_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free space there (df -h shows how much is left) or put output_dir on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space or ask for a larger quota, or put output_dir elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose an output_dir on a writable disk"),
    errno.EACCES: ("permission denied", "choose an output_dir you can write to, or fix the folder's permissions"),
    errno.EPERM: ("operation not permitted", "choose an output_dir you can write to, or fix the folder's permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose an output_dir whose parents are folders"),
    errno.EEXIST: ("a part of the path is a file, not a folder", "choose an output_dir whose parents are folders"),
    errno.EIO: ("an input/output error (the disk may be failing)", "check the disk, or put output_dir on another one"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter output_dir"),
}


class WriteFailed(DifftoolError):
    """Something could not be written: `what`, at `path`, and why (an errno's plain words)."""

    def __init__(self, what: str, path: Path, reason: str, fix: str):
        super().__init__(f"could not write {what} ({path}): {reason}; {fix}")
        self.what, self.path, self.reason = what, path, reason


def write_errno(exc: BaseException, path: Path) -> int | None:
    """The errno behind a failed write: the exception's own (or its cause's), the "os error N" that
    safetensors' Rust errors carry, else what the file system says now (read-only, or nearly
    full: torch.save reports a full disk only as "unexpected pos"). None if none of these."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        if found := re.search(r"os error (\d+)", str(seen)):
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail * stats.f_frsize < 1 << 20:
        return errno.ENOSPC
    return None


def write_failed(exc: BaseException, what: str, path: Path) -> WriteFailed | None:
    """The WriteFailed for an exception raised while writing `what` to `path`, or None when it
    does not come from the file system (then it is a bug, and goes on as it is)."""
    if isinstance(exc, DifftoolError):
        return None
    code = write_errno(exc, path)
    if code is None:
        return None
    reason, fix = WRITE_PROBLEMS.get(code, (os.strerror(code).lower(), "check the disk and the folder"))
    return WriteFailed(what, path, reason, fix)


@contextlib.contextmanager
def writing(what: str, path: Path, cleanup=None):
    """Turn a failed write inside the block into a WriteFailed naming `what`, `path` and why;
    `cleanup()` then removes what the failed write left (after the cause is read off the disk)."""
    try:
        yield
    except Exception as exc:
        failed = write_failed(exc, what, path)
        if cleanup is not None:
            cleanup()
        if failed is None:
            raise
        raise failed from exc


def cache_root() -> Path:
    """Where difftool keeps its caches (latents, reference statistics, metric networks):
    $DIFFTOOL_CACHE_DIR, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)/difftool."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "difftool"


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


def write_text(path: Path, text: str, what: str = "a file") -> None:
    """Write a text file atomically."""
    with writing(what, path), atomic_path(path) as tmp:
        tmp.write_text(text)


def json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file ([] if there is none); lines that do not parse (the
    last one of a killed run) are skipped."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def append_line(path: Path, line: str, what: str = "a log") -> None:
    """Append one line to a text file (a log: each line is whole or, after a crash, the last
    may be cut short, which its readers skip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(what, path), open(path, "a", encoding="utf-8") as file:
        file.write(line.rstrip("\n") + "\n")


def save_image(image, path: Path, what: str = "an image") -> None:
    """Save a PIL image atomically, in the format its suffix names."""
    with writing(what, path), atomic_path(path) as tmp:
        image.save(tmp)


def publish(write, output_dir: Path, what: str = "the model") -> None:
    """Call `write(folder)` on a temp folder, then swap each item it wrote into `output_dir`.

    The markers (FINISHED_MARKERS) move last, so a folder that has one is complete. If writing
    fails (a full disk, say), `output_dir` is left as it was and a WriteFailed says why.
    """
    for stale in output_dir.glob(".saving-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = None
    with writing(what, output_dir, cleanup=lambda: staging and shutil.rmtree(staging, ignore_errors=True)):
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
        write(staging)
        usual_modes(staging)
    try:
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


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` was made by a difftool run: a saved model, checkpoints, a run's lock, or a
    recipe.toml that difftool wrote (it has a [provenance] table)."""
    import tomllib

    if finished(folder) or (folder / "checkpoints").is_dir() or (folder / LOCK).is_file():
        return True
    try:
        return "provenance" in tomllib.loads((folder / RECIPE).read_text())
    except (OSError, ValueError):
        return False


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool, where: str) -> None:
    """Refuse to train into a file, into a folder that holds other things than a difftool run
    (".", say), into a finished run unless told to overwrite it, or over the checkpoints of an
    unfinished run unless resuming it or told to overwrite it."""
    named = f"{where} output_dir = '{output_dir}'"
    if output_dir.exists() and not output_dir.is_dir():
        raise DifftoolError(f"{named} is a file; choose a folder")
    if not output_dir.is_dir():
        return
    entries = sorted(name for name in os.listdir(output_dir) if name != LOCK)
    if entries and not is_run_folder(output_dir):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DifftoolError(
            f"{named} is not empty and holds no difftool run (it has {shown}); a run would mix its "
            "files with these and could replace some of them: choose a new or empty folder, "
            "e.g. --set run.output_dir=runs/new"
        )
    if finished(output_dir) and not (overwrite or resuming):
        raise DifftoolError(
            f"{named} already holds a finished run; choose "
            "another output_dir (e.g. --set run.output_dir=runs/new) or set "
            "run.overwrite_output_dir = true to replace it"
        )
    saved = list((output_dir / "checkpoints").glob("checkpoint-*"))
    if saved and not finished(output_dir) and not (overwrite or resuming):
        raise DifftoolError(
            f"{named} holds {len(saved)} checkpoint(s) of an unfinished run; "
            "resume it with run.resume_from_checkpoint = \"latest\" (--set run.resume_from_checkpoint=latest), "
            "choose another output_dir, or set run.overwrite_output_dir = true to start over"
        )
