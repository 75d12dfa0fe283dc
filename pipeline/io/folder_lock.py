"""An exclusive lock on an output folder, so two runs never write one folder's tensors at once,
and the clean-up of temp files that a killed run left behind.

`fcntl.flock` on a file in the folder: the kernel drops it when the holder exits, killed or not,
so a crashed run never leaves a stale lock behind (a lock *file* alone would).
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ResDxError

LOCK_NAME = ".resdx.lock"


@contextmanager
def folder_lock(folder: Path, what: str = "ingest") -> Iterator[None]:
    """Hold the folder's lock for the block; `ResDxError(code="busy")` when another run holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResDxError(f"another {what} holds {folder}", code="busy",
                             hint="wait for it to finish, or give this run its own output folder "
                                  "(ingest.out_dir)") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


_TEMP = re.compile(r"^\.tmp-(?:(\d+)-)?")
STALE_TEMP_S = 24 * 3600  # a temp file without a writer's PID (an older version) this old is abandoned


def remove_temp_files(*folders: Path) -> int:
    """Delete `.tmp-*` files (atomic writes never renamed) whose writer is gone; returns how many.

    The writer's PID is in the name (`pipeline.io.artifacts.atomic_write`): a live PID means a
    running process (another ingest sharing the cache) still writes it.
    """
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            match = _TEMP.match(f.name)
            if not match or not f.is_file():
                continue
            pid = int(match.group(1)) if match.group(1) else None
            if _writer_gone(pid, f):
                f.unlink(missing_ok=True)
                removed += 1
    return removed


def _writer_gone(pid: int | None, f: Path) -> bool:
    if pid is None:
        return time.time() - f.stat().st_mtime > STALE_TEMP_S
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
