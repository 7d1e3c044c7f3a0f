"""Exclusive flock on a file: one builder of a dataset, one pretraining per cell, one writer
of a replay store or a spool folder.

``FileLock`` waits for the lock (a ``with`` block); ``try_lock`` takes it without waiting and
returns the descriptor (closing it releases the lock) or None while another process holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def try_lock(path: str | os.PathLike, *, write: bool = True) -> int | None:
    """flock ``path`` (created if missing) without waiting: its descriptor, or None if held.

    ``write=False`` opens it read-only: flock needs no write access, and a descriptor open for
    writing keeps the file system from being remounted read-only (EBUSY)."""
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds the flock on ``path`` (a missing file: nobody)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases ours
    return False


class FileLock:
    """Wait for the flock on ``path`` and hold it for a ``with`` block."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock
