"""Write a file whole or not at all: a temporary file in the same folder, renamed into place.

Readers see the old or the new content, never a torn one. ``fsync=True`` also makes the
new content survive an OS crash or power loss: the temporary file is synced before the
rename, and the folder (the rename itself) after it. Without it a power loss may leave
the old file, the new one or an empty one; a process crash never does.

``write_atomic`` takes the content as bytes; ``replacing`` hands out the temporary path for a
writer that wants a path (``torch.save``, a copy) or checks the file before it goes in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The temporary file ``write_atomic`` uses for ``path``: hidden, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace ``path`` by ``data`` atomically; on any error no temporary file is left behind."""
    with replacing(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the ``with`` block to write (and check); renamed onto
    ``path`` when the block ends, removed if it raises (``path`` keeps its old content then)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
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
