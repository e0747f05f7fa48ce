"""One run per output folder: an OS-level lock held for the whole run.

The lock is `flock` on `output_dir/.difftool.lock` (a byte-range lock on Windows). The operating
system releases it when the process ends, however it ends, so a killed run never leaves a stale
lock behind. The file also says who holds it (process, host, start time, command), which is how
a refused second run names the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from difftool.errors import DifftoolError
from difftool.files import LOCK, writing


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on the open file `fd` without waiting; False if another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file tells it."""
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("started", 0)))
    return f"process {who.get('pid')} on {who.get('host')} (since {since}: {who.get('command')})"


@contextlib.contextmanager
def hold(output_dir: Path, where: str):
    """Create `output_dir` if needed and hold its lock for the block; refuse if another run holds it."""
    path = output_dir / LOCK
    with writing("the output folder", output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not try_lock(fd):
            raise DifftoolError(
                f"{where} output_dir = '{output_dir}' is in use by another difftool run: {holder(path)}; "
                "wait for it to finish or stop it, or choose another output_dir (e.g. --set run.output_dir=runs/new)"
            )
        who = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        with writing("the output folder's lock file", path):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(who).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
