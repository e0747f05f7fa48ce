"""`difftool push`: a finished run folder to a model repository on the Hugging Face Hub.

What is uploaded is decided here, once, for the dry run and the upload alike (`plan`): the whole
folder but the checkpoints, the logs (unless asked for), the lock and every hidden or temporary
file. The upload is huggingface_hub's `upload_folder`, which makes one commit: it lands whole or
not at all, so a failed push leaves nothing of the run half-uploaded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from difftool import files
from difftool.card import CARD, point_to, write_missing
from difftool.errors import DifftoolError

# upload_folder's ignore_patterns (fnmatch on paths relative to the run, where * also matches /)
IGNORED = [
    "checkpoints/",  # training state for resuming, several times the model's size
    ".*", "*/.*",  # hidden: the run's lock, temporary files of atomic writes, .saving-*/.old-* folders
    "*.tmp", "*.lock", "*~",
]
LOGS = "logs/"  # TensorBoard logs and history.jsonl: uploaded only with --with-logs
LOGIN = ("log in with `hf auth login` (or set HF_TOKEN to a token with write access, from "
         "https://huggingface.co/settings/tokens)")
NOTHING = "Nothing was uploaded (the upload is a single commit, made only once every file is sent)"


@dataclass
class Planned:
    """A file that a push uploads: its path in the repository and its size in bytes."""

    path: str
    size: int


def ignored(with_logs: bool) -> list[str]:
    """upload_folder's ignore_patterns: a new list each time (upload_folder appends to it)."""
    return [*IGNORED] if with_logs else [*IGNORED, LOGS]


def plan(run_dir: Path, with_logs: bool = False) -> list[Planned]:
    """The files `upload_folder` will upload from `run_dir`, filtered as it filters them."""
    from huggingface_hub.utils import filter_repo_objects

    run_dir = Path(run_dir)
    found = {p.relative_to(run_dir).as_posix(): p for p in sorted(run_dir.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(found, ignore_patterns=ignored(with_logs))
    return [Planned(path, found[path].stat().st_size) for path in kept]


def size_text(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def check_run(run_dir: Path) -> None:
    """Refuse what is not a finished run, with one message."""
    if not run_dir.exists():
        raise DifftoolError(f"{run_dir} does not exist; give the output_dir of a finished run")
    if not run_dir.is_dir():
        raise DifftoolError(f"{run_dir} is a file; give the output_dir of a finished run, a folder")
    if not files.finished(run_dir):
        if files.is_run_folder(run_dir):
            raise DifftoolError(f"{run_dir} is a run that has not finished (it has no saved model yet: no "
                                f"{' or '.join(files.FINISHED_MARKERS)}); let it finish, or resume it, then push it")
        raise DifftoolError(f"{run_dir} is not a difftool run (it has no {' or '.join(files.FINISHED_MARKERS)}, "
                            "which a run writes when it saves its model); give the output_dir of a finished run")
    if not (run_dir / files.RECIPE).is_file():
        raise DifftoolError(f"{run_dir} has a saved model but no {files.RECIPE}; it was not saved by difftool, "
                            "or is damaged: upload it with `hf upload` instead")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise DifftoolError(f"--repo-id '{repo_id}' is not a Hub repository id ({exc}); "
                            "give NAMESPACE/NAME, e.g. your-name/quickstart-butterflies") from exc


@contextlib.contextmanager
def no_run_writing(run_dir: Path):
    """Hold the run folder's lock while uploading, so that no `difftool run` replaces the model
    halfway; refuse when a run holds it now."""
    from difftool.lock import holder, try_lock

    path = run_dir / files.LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:  # a read-only folder: lock the existing file, or go on without (no run can write there)
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        if not try_lock(fd):
            raise DifftoolError(f"{run_dir} is being written by a difftool run ({holder(path)}); push it once "
                                "that run has finished")
        yield
    finally:
        os.close(fd)


def offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def network_errors() -> tuple[type, ...]:
    """The exceptions of a Hub that cannot be reached: Python's, and those of the HTTP library
    huggingface_hub uses (whichever of them it has imported)."""
    found: list[type] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def push_error(exc: Exception, repo_id: str, step: str) -> DifftoolError | None:
    """The one message for a failed push (None: not a Hub problem, a bug that goes on as it is).
    `step` says how far the push got: "create" the repository, or "upload" the files."""
    from huggingface_hub import errors

    created = f" (the repository {repo_id} may now exist, empty of this run)" if step == "upload" else ""
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return DifftoolError(f"cannot reach the Hugging Face Hub: HF_HUB_OFFLINE is set; unset it to push. {NOTHING}")
    if isinstance(exc, errors.LocalTokenNotFoundError):
        return DifftoolError(f"not logged in to the Hugging Face Hub: {LOGIN}. {NOTHING}")
    if isinstance(exc, errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        message = (getattr(exc, "server_message", None) or str(exc)).strip().splitlines()
        said = message[0][:300] if message else type(exc).__name__
        if status == 401:
            return DifftoolError(f"the Hugging Face Hub did not accept your token ({said}): {LOGIN}. "
                                 f"{NOTHING}{created}")
        if status == 403:
            return DifftoolError(f"your token may not write to {repo_id} ({said}): use a token with write access to "
                                 f"that namespace, or push to your own (--repo-id YOUR-NAME/NAME). {NOTHING}{created}")
        return DifftoolError(f"the Hugging Face Hub refused the push to {repo_id} ({status or 'error'}: {said}). "
                             f"{NOTHING}{created}")
    if isinstance(exc, network_errors()) or (isinstance(exc, OSError) and "connect" in str(exc).lower()):
        return DifftoolError(f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {exc}); check this machine's "
                             f"network and proxy settings, then push again. {NOTHING}{created}")
    return None


def push(run_dir: Path, repo_id: str, private: bool = False, dry_run: bool = False, with_logs: bool = False,
         report: Callable[[str], None] = print) -> list[Planned]:
    """Upload the finished run in `run_dir` to the model repository `repo_id` (created if
    needed) in one commit; with `dry_run`, only say what would be uploaded. A run without a
    model card gets one first. Returns the files uploaded (or that would be)."""
    run_dir = Path(run_dir)
    check_run(run_dir)
    check_repo_id(repo_id)
    card = write_missing(run_dir, repo_id, dry_run=True)
    repointed = f"its code would load the model from {repo_id} instead of the run folder"
    if dry_run:
        planned = plan(run_dir, with_logs)
        if card is not None:
            planned = sorted([*planned, Planned(CARD, len(card.encode()))], key=lambda p: p.path)
            report(f"{run_dir} has no model card: {CARD} would be written first, from its recipe.toml")
        elif point_to(run_dir, repo_id, dry_run=True):
            report(f"{CARD}: {repointed}")
        for item in planned:
            report(f"{size_text(item.size):>10}  {item.path}")
        total = sum(item.size for item in planned)
        report(f"{len(planned)} files, {size_text(total)}, would be uploaded to {repo_id} "
               f"({'private' if private else 'public'}) in one commit; left out: checkpoints/, "
               f"{'' if with_logs else 'logs/ (--with-logs adds it), '}hidden and temporary files. "
               "Dry run: nothing was written or uploaded")
        return planned
    if offline():
        raise DifftoolError(f"cannot reach the Hugging Face Hub: HF_HUB_OFFLINE is set; unset it to push "
                            f"(`difftool push {run_dir} --repo-id {repo_id} --dry-run` lists what would go). {NOTHING}")
    from huggingface_hub import create_repo, get_token, upload_folder

    if not get_token():
        raise DifftoolError(f"not logged in to the Hugging Face Hub: {LOGIN}. {NOTHING}")
    with no_run_writing(run_dir):
        if card is not None:
            write_missing(run_dir, repo_id)
            report(f"wrote the model card {run_dir / CARD} (the run is from before model cards)")
        elif point_to(run_dir, repo_id):
            report(f"{run_dir / CARD}: {repointed}")
        planned = plan(run_dir, with_logs)
        total = sum(item.size for item in planned)
        step = "create"
        try:
            url = create_repo(repo_id, private=private, exist_ok=True)
            step = "upload"
            report(f"uploading {len(planned)} files ({size_text(total)}) to {url} in one commit")
            commit = upload_folder(repo_id=repo_id, folder_path=run_dir, ignore_patterns=ignored(with_logs),
                                   commit_message=f"difftool push of {run_dir.name}")
        except Exception as exc:
            failed = push_error(exc, repo_id, step)
            if failed is None:
                raise
            raise failed from exc
    report(f"pushed {len(planned)} files ({size_text(total)}) to {url}: {getattr(commit, 'commit_url', commit)}")
    return planned
