"""Append-only columns of equal length in a Zarr group, written in whole chunks.

Why this exists rather than ``array.append``: a naive append resizes every
array and read-modify-writes the last chunk on every call (~114k rows/s for one
array here). This table stages appended rows in memory, keeps the rows of the
last, partly filled chunk in memory too, and at ``flush`` writes every touched
chunk whole (rows past the end hold the fill value), for all columns
concurrently; arrays grow by large steps, so resizes are rare.

Crash safety relies on two facts: each chunk and each ``zarr.json`` is written to a
temporary file and renamed into place (so a chunk on disk is always a complete old or
new version): by zarr's LocalStore (zarr >= 3.1.3, see ``ZARR_ATOMIC_WRITES``), and by
``chunk_encoder`` / ``_write_chunk``, which encode whole chunks with the array's own
codecs and write them the same way, without zarr's per-write indexing; and a rewritten
chunk holds the same values as before for every row that was already flushed. The table
itself keeps no length on disk: its owner records the flushed length (see ``ReplayStore``),
and rows at or past that length are never trusted.

Writes run off the owner's thread: ``snapshot`` takes what a flush writes (views of the
full chunks, which never change in memory, and a copy of the last, partly filled one) as
a ``TableWrite``, which any thread can ``run`` while more rows are staged; the owner then
calls ``flushed`` (or ``abandoned`` if it failed).

Durability: ``TableWrite.written_files`` names every file the write replaced, created or
deleted (the chunks it rewrote, the arrays' ``zarr.json`` after a resize), so that the
owner can ``fsync_files`` them before it records the new length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .atomic_file import fsync_path, replacing

# The first zarr whose LocalStore writes every file to a temporary file and renames it
# into place (zarr-python PR #3412); older ones write chunks in place, so a kill during
# a flush can tear a chunk that holds flushed rows.
ZARR_ATOMIC_WRITES = "3.1.3"


def zarr_writes_atomically() -> bool:
    """Whether the installed zarr (``zarr.__version__``) is ``ZARR_ATOMIC_WRITES`` or newer."""
    release = re.match(r"(\d+)\.(\d+)\.(\d+)", zarr.__version__)
    minimum = tuple(map(int, ZARR_ATOMIC_WRITES.split(".")))
    return release is not None and tuple(map(int, release.groups())) >= minimum


# Measured in benchmarks/ingest.py: lz4 + byte shuffle writes fastest here, and
# zstd-1 gave no better ratio on float observations.
DEFAULT_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    dtype: str
    shape: tuple[int, ...] = ()  # trailing shape of one row
    fill: float | int | bool = 0


class AppendTable:
    """Columns of one Zarr group sharing a row count; one writer appends at the end.

    ``length`` is the number of flushed rows; ``end`` counts staged rows too. ``late``: columns added
    after rows were written (a store's ``LATER_COLUMNS``): missing (read-only) or shorter than the
    rows, they read as their fill value there; a writable table needs them present (and grows them).
    """

    def __init__(self, group: zarr.Group, specs: dict[str, ColumnSpec], chunk_rows: int, length: int, writable: bool,
                 mutable: tuple[str, ...] = (), late: tuple[str, ...] = ()):  # fmt: skip
        self.group = group
        self.specs = specs
        self.chunk_rows = chunk_rows
        self.length = length
        self.end = length
        self.writable = writable
        self.late = late
        self.arrays: dict[str, zarr.Array] = {
            name: group[name] for name in specs if writable or name not in late or name in group
        }
        # In-memory rows [base, end): the flushed rows of the last partial chunk, then staged rows.
        self.base = (length // chunk_rows) * chunk_rows
        self._buf: dict[str, np.ndarray] = {}
        self._patches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._patched_in_memory = False  # flushed rows held in memory were patched
        self.mutable = mutable  # columns that ``patch`` may change
        self._pending: TableWrite | None = None  # the snapshot being written
        self.encoders: dict[str, Callable | None] = {}  # each column's chunk_encoder, made once
        self._late: list[tuple[str, np.ndarray, np.ndarray]] = []  # in-memory patches while it is
        if writable:
            self._buf = {name: self._alloc(name, 2 * chunk_rows) for name in specs}
            if length > self.base:
                for name in self.arrays:
                    self._buf[name][: length - self.base] = self._column(name, self.base, length)

    @classmethod
    def create(
        cls,
        group: zarr.Group,
        specs: dict[str, ColumnSpec],
        chunk_rows: int,
        compressor=DEFAULT_COMPRESSOR,
        mutable: tuple[str, ...] = (),
    ) -> "AppendTable":
        for name, spec in specs.items():
            group.create_array(
                name,
                shape=(0, *spec.shape),
                chunks=(chunk_rows, *spec.shape),
                dtype=spec.dtype,
                fill_value=spec.fill,
                compressors=[compressor] if compressor is not None else None,
            )
        return cls(group, specs, chunk_rows, length=0, writable=True, mutable=mutable)

    def _alloc(self, name: str, rows: int) -> np.ndarray:
        spec = self.specs[name]
        return np.full((rows, *spec.shape), spec.fill, dtype=spec.dtype)

    @property
    def staged(self) -> int:
        return self.end - self.length

    @property
    def full_chunks(self) -> int:
        """Whole chunks held in memory: a flush now writes them once and for all."""
        return (self.end - self.base) // self.chunk_rows

    # ------------------------------------------------------------ writing

    def stage(self, values: dict[str, np.ndarray | float | int | bool], n: int) -> int:
        """Stage ``n`` rows (arrays of n rows or scalars broadcast); returns the first row index."""
        start = self.end
        lo, hi = start - self.base, start - self.base + n
        if hi > len(next(iter(self._buf.values()))):
            self._grow(hi)
        for name, buf in self._buf.items():
            buf[lo:hi] = values[name]
        self.end += n
        return start

    def _grow(self, rows: int) -> None:
        # New arrays, not resized ones: a pending TableWrite may still read views of the old.
        capacity = max(rows, 2 * len(next(iter(self._buf.values()))))
        for name, buf in self._buf.items():
            new = self._alloc(name, capacity)
            new[: len(buf)] = buf
            self._buf[name] = new

    def patch(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite ``name`` at (unique, ascending) ``rows`` < end; written by the next flush.

        Only the ``mutable`` columns may be patched: their images are copied by ``snapshot``,
        so a patch while a write is pending cannot change what that write reads."""
        if len(rows) == 0:
            return
        if name not in self.mutable:
            raise ValueError(f"column {name!r} is not mutable (mutable: {self.mutable})")
        split = int(np.searchsorted(rows, self.base))
        if split < len(rows):
            self._buf[name][rows[split:] - self.base] = values[split:]
            self._patched_in_memory = True
            if self._pending is not None:  # the pending write may not hold it: see flushed()
                self._late.append((name, rows[split:], values[split:]))
        if split > 0:
            self._patches.setdefault(name, []).append((rows[:split], values[:split]))

    def staged_sum(self, name: str) -> int:
        """The sum of a one-value column over the staged rows [length, end) (held in memory)."""
        return int(self._buf[name][self.length - self.base : self.end - self.base].sum(dtype=np.int64))

    def rows_in_memory(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Copies of rows [start, stop) from memory (start >= base)."""
        return {name: buf[start - self.base : stop - self.base].copy() for name, buf in self._buf.items()}

    def snapshot(self) -> "TableWrite":
        """What a flush of everything staged writes, taken now: the returned ``TableWrite`` can run
        in another thread while more rows are staged here; call ``flushed(write)`` after it ran,
        or ``abandoned(write)`` after it failed (then a later snapshot writes it all again).

        No copy of the full chunks: rows below ``end`` never change in memory (only ``mutable``
        columns are patched, and those are copied); the last, partly filled chunk is copied,
        since rows staged later land in it."""
        if self._pending is not None:
            raise RuntimeError("a TableWrite is pending: flushed() or abandoned() it first")
        end, base, chunk = self.end, self.base, self.chunk_rows
        write = TableWrite(self, end, self._patches, self._patched_in_memory)
        self._patches, self._patched_in_memory = {}, False
        self._pending, self._late = write, []
        if end == self.length and not write.patches and not write.patched_in_memory:
            return write
        stop = -(-end // chunk) * chunk
        full = end // chunk * chunk
        write.capacity = stop
        if end > base:
            for name, buf in self._buf.items():
                fill = self.specs[name].fill
                if name in self.mutable:
                    image = buf[: stop - base].copy()
                    image[end - base :] = fill
                    write.images.append((name, base, image))
                    continue
                if full > base:
                    write.images.append((name, base, buf[: full - base]))
                if stop > full:
                    tail = buf[full - base : stop - base].copy()
                    tail[end - full :] = fill  # rows past the end hold the fill value in the chunk we write
                    write.images.append((name, full, tail))
        return write

    def reserve(self) -> None:
        """Grow the arrays to hold every staged row (rare: rewrites each column's zarr.json)."""
        self._ensure_capacity(-(-self.end // self.chunk_rows) * self.chunk_rows, set())

    def flushed(self, write: "TableWrite | None" = None) -> None:
        """``write`` (default: the pending one) is on disk: its rows count as flushed, and only
        the last partial chunk's rows (and rows staged since) stay in memory."""
        write = write or self._pending
        self._pending = None
        self.length = write.end
        new_base = (write.end // self.chunk_rows) * self.chunk_rows
        if new_base > self.base:
            keep = self.end - new_base
            for buf in self._buf.values():
                buf[:keep] = buf[new_base - self.base : self.end - self.base]
            self.base = new_base
        # Patches made while the write ran: those of rows now out of memory are written as
        # patches of older chunks; the others are in memory and written with the next flush.
        for name, rows, values in self._late:
            split = int(np.searchsorted(rows, self.base))
            if split > 0:
                self._patches.setdefault(name, []).append((rows[:split], values[:split]))
        self._late = []

    def abandoned(self, write: "TableWrite | None" = None) -> None:
        """``write`` failed: nothing counts as flushed; the next snapshot writes it all again."""
        write = write or self._pending
        self._pending, self._late = None, []
        for name, patches in write.patches.items():
            self._patches[name] = patches + self._patches.get(name, [])
        self._patched_in_memory |= write.patched_in_memory

    def flush(self) -> None:
        """Write everything staged, in this thread (``snapshot`` + ``TableWrite.run`` + ``flushed``)."""
        write = self.snapshot()
        try:
            write.run()
        except BaseException:
            self.abandoned(write)
            raise
        self.flushed(write)

    def _ensure_capacity(self, rows: int, touched: set) -> None:
        # Every array is checked: a crash in the middle of a resize leaves them of different lengths.
        capacity = max(arr.shape[0] for arr in self.arrays.values())
        if rows > capacity:
            # Grow by >= 50% and >= 8 chunks so resizes (a zarr.json rewrite per column) stay rare.
            capacity = max(rows, capacity + capacity // 2, capacity + 8 * self.chunk_rows)
            capacity = -(-capacity // self.chunk_rows) * self.chunk_rows
        for name, arr in self.arrays.items():
            if arr.shape[0] < capacity:
                touched.add((name, None))
                arr.resize((capacity, *self.specs[name].shape))

    # ------------------------------------------------------------ reading

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) from disk (the caller bounds stop by the trusted length)."""
        names = list(self.specs) if columns is None else columns
        unknown = set(names) - set(self.specs)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}; known: {list(self.specs)}")
        if stop <= start:
            return {name: self._alloc(name, 0) for name in names}
        return {name: self._column(name, start, stop) for name in names}

    def _column(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self.late:
            return self._array(name, stop)[start:stop]
        if name not in self.arrays and name in self.group:  # a writer added it since we opened
            self.arrays[name] = self.group[name]
        values = self._alloc(name, stop - start)  # the fill value where the column is missing or short
        if name in self.arrays:
            held = max(0, min(stop, self._array(name, stop).shape[0]) - start)
            values[:held] = self.arrays[name][start : start + held]
        return values

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted indices ``rows`` of one column from disk (each chunk read once)."""
        if len(rows) == 0:
            return self._alloc(name, 0)
        if name in self.late:
            return self._column(name, int(rows[0]), int(rows[-1]) + 1)[np.asarray(rows, np.int64) - int(rows[0])]
        return self._array(name, int(rows[-1]) + 1).oindex[np.asarray(rows, np.int64)]

    def _array(self, name: str, stop: int) -> zarr.Array:
        arr = self.arrays[name]
        if arr.shape[0] < stop:
            # Another process grew the array since we opened it: re-read its metadata.
            mode = "r+" if self.writable else "r"  # a writer's own late column (store_format.LATER_COLUMNS) grows
            arr = self.arrays[name] = zarr.open_array(self.group.store, path=arr.path, mode=mode)
        return arr


class TableWrite:
    """One flush of an ``AppendTable``, taken by ``snapshot``: chunk images and patches that
    ``run`` writes (in any thread) without touching the table's memory."""

    def __init__(self, table: AppendTable, end: int, patches: dict, patched_in_memory: bool):
        self.table = table
        self.end = end
        self.patches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = patches
        self.patched_in_memory = patched_in_memory
        self.capacity = 0  # rows the arrays must hold
        self.images: list[tuple[str, int, np.ndarray]] = []  # (column, first row (chunk-aligned), rows)
        # (column, chunk index) written; chunk None: the column's zarr.json (a resize).
        self.touched: set[tuple[str, int | None]] = set()

    def reserve(self) -> None:
        """Grow the arrays first, so that a failed resize leaves no write coroutine never awaited."""
        if self.capacity:
            self.table._ensure_capacity(self.capacity, self.touched)

    def ops(self) -> list:
        """Coroutines writing every touched chunk whole (after ``reserve``)."""
        table, chunk = self.table, self.table.chunk_rows
        ops = []
        for name, start, image in self.images:
            self.touched.update((name, i) for i in range(start // chunk, (start + len(image)) // chunk))
            arr = table.arrays[name]
            if name not in table.encoders:
                table.encoders[name] = chunk_encoder(arr)
            encode = table.encoders[name]
            if encode is None or start % chunk or len(image) % chunk:
                ops.append(arr._async_array.setitem(slice(start, start + len(image)), image))
                continue
            for first in range(0, len(image), chunk):  # whole chunks: encoded and written directly
                ops.append(_write_chunk(arr, (start + first) // chunk, image[first : first + chunk], encode))
        for name, patches in self.patches.items():
            rows = np.concatenate([r for r, _ in patches])
            values = np.concatenate([v for _, v in patches])
            order = np.argsort(rows, kind="stable")  # one op per chunk: concurrent ops must not share one
            rows, values = rows[order], values[order]
            chunk_of = rows // chunk
            bounds = np.flatnonzero(np.diff(chunk_of)) + 1
            self.touched.update((name, int(i)) for i in np.unique(chunk_of))
            for part_rows, part_values in zip(np.split(rows, bounds), np.split(values, bounds)):
                ops.append(self._patch_chunk(table.arrays[name], part_rows, part_values))
        return ops

    async def _patch_chunk(self, arr: zarr.Array, rows: np.ndarray, values: np.ndarray) -> None:
        # Read-modify-write of one whole older chunk (rows sorted, all in that chunk).
        chunk = self.table.chunk_rows
        start = int(rows[0]) // chunk * chunk
        region = slice(start, start + chunk)
        data = await arr._async_array.getitem(region)
        data[rows - start] = values
        await arr._async_array.setitem(region, data)

    def run(self) -> None:
        self.reserve()
        run_concurrently(self.ops())

    def written_files(self) -> list[Path]:
        """Files written (or deleted: zarr removes a chunk that holds only fill values) by
        ``run``; a superset after a failed and retried write."""
        table = self.table
        root = Path(table.group.store.root)
        files = []
        for name, chunk in self.touched:
            arr = table.arrays[name]
            coords = (chunk,) + (0,) * len(table.specs[name].shape)  # the trailing axes are one chunk
            files.append(root / arr.path / ("zarr.json" if chunk is None else arr.metadata.encode_chunk_key(coords)))
        return files


def chunk_encoder(arr: zarr.Array) -> Callable[[np.ndarray], bytes | None] | None:
    """The bytes zarr stores for one whole chunk of ``arr`` (None: only fill values, which zarr
    stores as no file), made by the array's own codecs without zarr's per-write indexing and
    merging (measured: the store alone 1.2-1.4x faster). None if the array is not in a local folder
    or a codec has no synchronous encoder: then zarr's ``setitem`` writes it."""
    aa = arr._async_array
    if not isinstance(aa.store_path.store, LocalStore):
        return None
    pipeline = aa.codec_pipeline
    codecs = [*getattr(pipeline, "array_array_codecs", ()), getattr(pipeline, "array_bytes_codec", None),
              *getattr(pipeline, "bytes_bytes_codecs", ())]  # fmt: skip
    if not all(hasattr(codec, "_encode_sync") for codec in codecs):
        return None
    spec = aa.metadata.get_chunk_spec((0,) * aa.ndim, aa.config, default_buffer_prototype())

    def encode(block: np.ndarray) -> bytes | None:
        data, chunk_spec = spec.prototype.nd_buffer.from_ndarray_like(np.ascontiguousarray(block)), spec
        # As zarr's codec pipeline: write_empty_chunks=False stores a chunk of fill values as no file.
        if not chunk_spec.config.write_empty_chunks and data.all_equal(chunk_spec.fill_value):
            return None
        for codec in codecs:
            data = codec._encode_sync(data, chunk_spec)
            chunk_spec = codec.resolve_metadata(chunk_spec)
        return data.to_bytes()

    return encode


async def _write_chunk(arr: zarr.Array, index: int, block: np.ndarray, encode) -> None:
    """Write chunk ``index`` of ``arr`` whole, as zarr's LocalStore does: to a temporary file renamed
    into place (or delete it if it holds only fill values); encoded and written in the I/O pool."""
    key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))  # the trailing axes are one chunk
    path = Path(arr._async_array.store_path.store.root) / arr.path / key

    def write() -> None:
        data = encode(block)
        if data is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:
            f.write(data)

    await asyncio.get_running_loop().run_in_executor(_io_pool(), write)


def run_concurrently(ops: list) -> None:
    """Run zarr write coroutines together (codecs run in zarr's thread pool, off the GIL)."""
    if ops:

        async def gather():
            # Wait for every write even when one fails: a write still running after the
            # error was raised could overwrite a chunk that a retried flush writes.
            results = await asyncio.gather(*ops, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

        sync(gather())


def fsync_files(files: list[Path], root: Path, durable: set[Path] | None = None) -> None:
    """fsync each of ``files`` that exists, its folder, and the folders above it up to ``root``:
    a rename (zarr writes every chunk to a temporary file and renames it), a deletion or a new
    folder survives a power loss only once its folder is synced.

    ``durable``: folders whose own entry in their parent is already synced (a writer's set, kept
    across its commits). The climb stops at one of them, so a commit that only rewrites chunks in
    existing folders syncs the files and their folders, not every folder up to ``root`` again; the
    folders synced here are added to it once every fsync succeeded.

    Runs the fsyncs in threads: the file system batches concurrent ones into fewer journal
    commits. Raises the first ``OSError`` (after every fsync finished)."""
    durable = set() if durable is None else durable
    folders: set[Path] = set()
    newly_durable: set[Path] = set()
    for file in files:
        folders.add(file.parent)  # the file's rename or deletion
        for folder in file.parents:
            if folder == root or folder in durable:
                break
            if not folder.is_dir():  # zarr made no folder (only fill values were written): no entry
                continue
            folders.add(folder.parent)  # the folder's own entry (it may be new)
            newly_durable.add(folder)
    targets = [*dict.fromkeys(files), *sorted(folders)]
    for _ in _io_pool().map(fsync_path, targets):
        pass
    durable |= newly_durable


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads: it starts its own pool


os.register_at_fork(after_in_child=_forget_pool)


def _io_pool() -> ThreadPoolExecutor:
    """One pool for the chunk writes and fsyncs of every commit: starting threads per commit costs as
    much as the fsyncs."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="o2o-io")
    return _POOL
