"""Write a file whole or not at all: a temporary file in the same folder, renamed into place.

Readers see the old or the new content, never a torn one. ``fsync=True`` also makes the
new content survive an OS crash or power loss: the temporary file is synced before the
rename, and the folder (the rename itself) after it. Without it a power loss may leave
the old file, the new one or an empty one; a process crash never does.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The temporary file ``write_atomic`` uses for ``path``: hidden, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace ``path`` by ``data`` atomically; on any error no temporary file is left behind."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. disk full: leave no partial file behind
            os.unlink(tmp)
        raise
    if fsync:
        fsync_path(path.parent)  # the rename itself


def fsync_path(path: Path) -> None:
    """fsync a file or a folder; a missing one (e.g. a chunk zarr deleted) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
