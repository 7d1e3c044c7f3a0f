"""The actor's spool: every sent chunk is kept until the learner acks or rejects it.

Chunks are held as their encoded wire frames, in seq order. With a folder the spool is
write-through: ``put`` appends every chunk to append-only segment files on disk at once,
before it is sent. That is a plain write into the OS page cache (no fsync per chunk), so
the chunks survive the actor process being killed (SIGKILL, a crash, the OOM killer), not
a power loss or a kernel crash. Memory holds a bounded cache of the frames of the oldest
unacked chunks (``memory_chunks``), so sends and resends do not read the disk in the
common case; chunks past it are read back from disk when they are sent. ``max_disk_bytes``
caps everything unacked; a full spool refuses ``put`` (the caller checks ``has_room``
first and pauses or stops: data is never dropped silently). Acks and rejects free the
cache; a segment file is deleted once all its chunks are acked, except the one being
written: once emptied it is reused (cut back to its header when full or when its room is
needed) and deleted at ``close``.

A disk write that fails (ENOSPC or any OSError) is not raised: the chunk stays in memory
only, ``disk_error`` says why, and ``has_room()`` is False from then on (the actor stops
safely). ``close(spill=True)`` tries once more to write such chunks to disk.

A new ``Spool`` on the same folder (the restarted actor) finds every unacked chunk again,
whether the previous process closed cleanly or was killed (a torn record at the end of a
file, from a kill during a write, is cut off). ``acked.json`` keeps the highest acked seq
(written at ``close``), so a reopened spool skips acked records; after a kill it is older
and the restarted actor offers chunks the learner already has (its welcome acks them). It
is deleted as soon as seqs restart below it (a fresh learner numbers from 0).

``folder`` None keeps memory only, full at ``memory_chunks``: the user's explicit choice
(``spool.dir=null``) to lose every unacked chunk if the actor process dies. The learner
cannot tell: if nothing follows them, the restarted actor numbers its new chunks from the
learner's next seq, and those chunks are gone uncounted.

Segment file format (no pickle)::

    file    = b"O2OSPOOL" u32 version (=1) record*
    record  = b"REC1" i64 seq u32 n_frames u64 payload_len payload u32 crc32(payload)
    payload = (u64 frame_len, frame bytes) * n_frames

All integers little-endian; the frames are the chunk's wire frames as sent.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from o2o.datasets.atomic_file import write_atomic
from o2o.datasets.file_lock import try_lock

log = logging.getLogger("o2o.transport.spool")

FILE_MAGIC = b"O2OSPOOL"
FILE_VERSION = 1
FILE_HEADER = struct.Struct("<8sI")
RECORD = struct.Struct("<4sqIQ")
RECORD_MAGIC = b"REC1"
FRAME_LEN = struct.Struct("<Q")
CRC = struct.Struct("<I")
META_FILE = "spool.json"
ACKED_FILE = "acked.json"  # highest acked seq of the current numbering: older records are skipped
LOCK_FILE = "spool.lock"
SEGMENT_GLOB = "seg-*.o2ospool"

Frames = list  # list of bytes-like frames


class SpoolFull(RuntimeError):
    """``put`` with no room left (on disk, or in memory without a folder)."""


class SpoolError(RuntimeError):
    """A spool folder that cannot be used (locked by another actor, or for another task)."""


@dataclasses.dataclass
class _Segment:
    path: Path
    size: int
    live: set[int]  # seqs in this file not yet acked or dropped
    writable: bool


@dataclasses.dataclass
class SpoolStats:
    memory_chunks: int  # unacked chunks whose frames are in memory: the cache, plus the memory-only ones
    disk_chunks: int  # unacked chunks on disk (with a folder and a working disk: all of them)
    memory_only_chunks: int  # unacked chunks in memory only (no folder, or after a disk error): a crash loses them
    disk_bytes: int
    acked_chunks: int
    rejected_chunks: int
    spilled_chunks: int  # chunks put past the memory cache: their sends read them back from disk
    disk_reads: int  # ``get`` calls answered from disk
    first_seq: int | None
    last_seq: int | None

    @property
    def depth(self) -> int:
        """Unacked chunks held."""
        return self.disk_chunks + self.memory_only_chunks


def _frames_bytes(frames: Sequence) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class Spool:
    """Unacked chunks by seq: all on disk (write-through), the oldest cached in memory; thread-safe.

    ``folder`` None keeps memory only (full at ``memory_chunks``; lost if the process dies).
    ``meta`` (e.g. actor id, task, dimensions) is saved in the folder; reopening it with other
    values is refused, so a spool never replays chunks into the wrong learner.
    """

    def __init__(
        self,
        memory_chunks: int = 256,
        folder: str | os.PathLike | None = None,
        max_disk_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        meta: dict | None = None,
    ):
        if memory_chunks < 1:
            raise ValueError(f"spool.memory_chunks must be >= 1, got {memory_chunks}")
        self.memory_chunks = memory_chunks
        self.max_disk_bytes = max_disk_bytes if folder is not None else 0
        self.segment_bytes = segment_bytes
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._disk: dict[int, tuple[_Segment, int, int]] = {}  # seq -> (segment, record offset, n_frames)
        # Frames of the oldest seqs of _disk (a prefix of it, in seq order), at most memory_chunks.
        self._cache: collections.OrderedDict[int, Frames] = collections.OrderedDict()
        # Chunks in memory only, in seq order: no folder, or taken after a disk error.
        self._memory: collections.OrderedDict[int, Frames] = collections.OrderedDict()
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # open file of the current (last, writable) segment
        self._largest = 0  # largest chunk seen, in bytes: the room a next chunk needs
        self._last_seq: int | None = None
        self._acked_seq = -1  # highest seq acked (a crashed run's acks are unknown: then -1)
        self.disk_error: OSError | None = None  # a failed disk write: no more chunks go to disk
        self.acked = 0
        self.rejected = 0
        self.spilled = 0
        self.disk_reads = 0
        self._lock_fd: int | None = None
        if self.folder is not None:
            self._open_folder(meta or {})

    # ------------------------------------------------------------ folder

    def _open_folder(self, meta: dict) -> None:
        try:
            self._open_folder_files(meta)
        except OSError as err:
            self._unlock()
            raise SpoolError(f"spool folder {self.folder} cannot be used: {err}: free space there, or point "
                             "spool.dir elsewhere") from err  # fmt: skip

    def _open_folder_files(self, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.folder / LOCK_FILE)
        if fd is None:
            raise SpoolError(
                f"spool folder {self.folder} is in use by another actor process (same actor_id on this host?): "
                "give each actor its own actor_id or spool.dir"
            ) from None
        self._lock_fd = fd
        meta_path = self.folder / META_FILE
        saved = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if saved is not None and saved != meta and any(self.folder.glob(SEGMENT_GLOB)):
            self._unlock()
            raise SpoolError(
                f"spool folder {self.folder} holds unacked chunks of {saved}, not of {meta}: "
                "point spool.dir elsewhere, or delete the folder to discard those chunks"
            )
        if saved != meta:  # written only when it changes: a full disk can still be reopened
            write_atomic(meta_path, json.dumps(meta, sort_keys=True))
        acked_path = self.folder / ACKED_FILE
        self._acked_seq = json.loads(acked_path.read_text())["seq"] if acked_path.exists() else -1
        for path in sorted(self.folder.glob(SEGMENT_GLOB)):
            self._recover(path)
        self._disk = dict(sorted(self._disk.items()))  # seq order, which put() keeps from here on
        if self._disk:
            self._last_seq = max(self._disk)
            log.info("spool %s: recovered %d unacked chunks (seq %d..%d) from a previous run",
                     self.folder, len(self._disk), min(self._disk), self._last_seq)  # fmt: skip

    def _recover(self, path: Path) -> None:
        """Index the records of one segment; cut a torn or corrupt tail."""
        data = path.read_bytes()
        segment = _Segment(path, len(data), set(), writable=False)
        good = 0
        if len(data) >= FILE_HEADER.size and FILE_HEADER.unpack_from(data) == (FILE_MAGIC, FILE_VERSION):
            offset = good = FILE_HEADER.size
            while offset + RECORD.size <= len(data):
                magic, seq, n_frames, length = RECORD.unpack_from(data, offset)
                end = offset + RECORD.size + length + CRC.size
                if magic != RECORD_MAGIC or end > len(data):
                    break
                payload = memoryview(data)[offset + RECORD.size : end - CRC.size]
                if CRC.unpack_from(data, end - CRC.size)[0] != zlib.crc32(payload):
                    break
                if seq > self._acked_seq and seq not in self._disk:
                    self._disk[seq] = (segment, offset, n_frames)
                    segment.live.add(seq)
                    self._largest = max(self._largest, length)
                offset = good = end
        if good < len(data):
            log.warning("spool %s: cut %d bytes of a torn or corrupt record at its end (a crash mid-write)",
                        path, len(data) - good)  # fmt: skip
            with open(path, "r+b") as f:
                f.truncate(good)
            segment.size = good
        if segment.live:
            self._segments.append(segment)
        else:
            path.unlink()

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        with self._lock:  # consistent with a concurrent ack (its files are gone once it returns 0)
            return len(self._disk) + len(self._memory)

    @property
    def first_seq(self) -> int | None:
        """Oldest seq held (None if empty)."""
        with self._lock:
            return self._first_seq()

    def _first_seq(self) -> int | None:
        # Disk holds the oldest seqs; memory only those taken after a disk error (or all, with no folder).
        firsts = [next(iter(held)) for held in (self._disk, self._memory) if held]
        return min(firsts) if firsts else None

    @property
    def last_seq(self) -> int | None:
        """Newest seq ever put or recovered (it stays after acks)."""
        return self._last_seq

    def _disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def _held_bytes(self) -> int:
        """Disk bytes, less the acked records of the segment being written (cut when their room is needed)."""
        emptied = self._fd is not None and not self._segments[-1].live
        return self._disk_bytes() - (self._segments[-1].size - FILE_HEADER.size if emptied else 0)

    def has_room(self, extra_chunks: int = 0) -> bool:
        """Can ``extra_chunks + 1`` more chunks (of the largest size seen) be put? Never after a disk error."""
        with self._lock:
            if self.disk_error is not None:
                return False
            need = extra_chunks + 1
            if self.folder is None:
                return len(self._memory) + need <= self.memory_chunks
            chunk = self._largest + RECORD.size + CRC.size + 256
            return self._held_bytes() + FILE_HEADER.size + need * chunk <= self.max_disk_bytes

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(
                memory_chunks=len(self._cache) + len(self._memory),
                disk_chunks=len(self._disk),
                memory_only_chunks=len(self._memory),
                disk_bytes=self._disk_bytes(),
                acked_chunks=self.acked,
                rejected_chunks=self.rejected,
                spilled_chunks=self.spilled,
                disk_reads=self.disk_reads,
                first_seq=self._first_seq(),
                last_seq=self._last_seq,
            )

    # ------------------------------------------------------------ put / get

    def put(self, seq: int, frames: Sequence, force: bool = False) -> None:
        """Hold a chunk's frames (on disk at once, with a folder); seqs must increase. Raises
        ``SpoolFull`` when there is no room, unless ``force``: then the chunk is kept past the cap
        (on disk, or in memory without a folder). A disk that fails (see ``disk_error``) never
        loses the chunk: it is kept in memory."""
        with self._lock:
            if self._last_seq is not None and seq <= self._last_seq:
                raise ValueError(f"spool seqs must increase: got {seq} after {self._last_seq}")
            if seq <= self._acked_seq:
                # Seqs restarted (a fresh learner numbers this actor from 0 again): the mark belongs to
                # the old numbering and would make a reopened spool skip these chunks. Gone at once,
                # so a crash before close() cannot leave it behind either.
                self._acked_seq = -1
                if self.folder is not None:
                    self._try_disk(self._save_acked)
            size = _frames_bytes(frames)
            self._largest = max(self._largest, size)
            if self.folder is None:
                if len(self._memory) >= self.memory_chunks and not force:
                    raise SpoolFull(f"spool full: {len(self._memory)} chunks in memory and no disk spool configured")
                self._memory[seq] = list(frames)
            elif self._try_disk(self._write, seq, frames, size, force):
                # Cached while the cache has room and holds every older chunk (it stays the oldest ones).
                if len(self._cache) < self.memory_chunks and len(self._cache) == len(self._disk) - 1:
                    self._cache[seq] = list(frames)
                else:
                    self.spilled += 1
            else:
                self._memory[seq] = list(frames)
            self._last_seq = seq

    def _try_disk(self, write: Callable, *args) -> bool:
        """Run a disk write; False if the disk failed, now or before (``disk_error``)."""
        if self.disk_error is not None:
            return False
        try:
            write(*args)
            return True
        except OSError as err:
            self.disk_error = err
            log.error("spool %s: cannot write to disk: %s. No more chunks are taken (has_room() is False) and "
                      "the next ones stay in memory only: free space there, or point spool.dir at a disk with room",
                      self.folder, err)  # fmt: skip
            self._abandon_writer()
            return False

    def _abandon_writer(self) -> None:
        """After a failed write: close the segment and cut the part of a record that reached it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        segment = self._segments[-1]  # the writer's
        segment.writable = False
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            if segment.live:
                os.truncate(segment.path, segment.size)
            else:
                segment.path.unlink(missing_ok=True)
                self._segments.remove(segment)
        except OSError:  # a torn tail is also cut when the folder is reopened
            pass

    def _write(self, seq: int, frames: Sequence, size: int, force: bool = False) -> None:
        record_size = RECORD.size + len(frames) * FRAME_LEN.size + size + CRC.size
        segment = self._segments[-1] if self._fd is not None else None
        if segment is not None and not segment.live and segment.size > FILE_HEADER.size:
            # All its records are acked: cut it back to its header when it is full, or its bytes are needed.
            if (segment.size + record_size > self.segment_bytes
                    or self._disk_bytes() + FILE_HEADER.size + record_size > self.max_disk_bytes):  # fmt: skip
                os.ftruncate(self._fd, FILE_HEADER.size)
                segment.size = FILE_HEADER.size
        if self._disk_bytes() + FILE_HEADER.size + record_size > self.max_disk_bytes and not force:
            raise SpoolFull(f"spool full: {len(self._disk)} chunks held and {self.max_disk_bytes} bytes on disk "
                            f"in {self.folder}")  # fmt: skip
        if segment is None or (segment.live and segment.size + record_size > self.segment_bytes):
            segment = self._new_segment(seq)
        parts = [b""]  # the record header, once the payload's crc is known
        crc = 0
        for frame in frames:
            view = memoryview(frame).cast("B")
            length = FRAME_LEN.pack(view.nbytes)
            crc = zlib.crc32(view, zlib.crc32(length, crc))
            parts += (length, view)
        parts[0] = RECORD.pack(RECORD_MAGIC, seq, len(frames), record_size - RECORD.size - CRC.size)
        parts.append(CRC.pack(crc))
        # Into the page cache at once, no copy: it survives this process being killed (not a power loss).
        self._pwrite(parts, segment.size, record_size)
        self._disk[seq] = (segment, segment.size, len(frames))
        segment.size += record_size
        segment.live.add(seq)

    def _pwrite(self, parts: list, offset: int, total: int) -> None:
        while True:
            written = os.pwritev(self._fd, parts[:512], offset)  # under IOV_MAX
            total -= written
            if total == 0:
                return
            if written <= 0:
                raise OSError(errno.EIO, "the spool segment took no more bytes")
            offset += written  # a short write: go on with the rest
            while written >= memoryview(parts[0]).nbytes:
                written -= memoryview(parts.pop(0)).nbytes
            if written:
                parts[0] = memoryview(parts[0]).cast("B")[written:]

    def _new_segment(self, seq: int) -> _Segment:
        self._close_writer()
        path = self.folder / f"seg-{seq:020d}-{os.getpid()}.o2ospool"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        segment = _Segment(path, 0, set(), writable=True)
        self._segments.append(segment)
        self._pwrite([FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION)], 0, FILE_HEADER.size)
        segment.size = FILE_HEADER.size
        return segment

    def get(self, seq: int) -> Frames | None:
        """The frames of ``seq`` (None if not held: acked, rejected or never put); from memory if
        cached there, else read from disk (and cached if it is the next oldest and there is room)."""
        with self._lock:
            frames = self._cache.get(seq)
            if frames is None:
                frames = self._memory.get(seq)
            if frames is not None:
                return frames
            where = self._disk.get(seq)
            if where is None:
                return None
            segment, offset, n_frames = where
            with open(segment.path, "rb") as f:
                f.seek(offset)
                header = f.read(RECORD.size)
                _, _, _, length = RECORD.unpack(header)
                payload = memoryview(f.read(length))
            frames, pos = [], 0
            for _ in range(n_frames):
                (n,) = FRAME_LEN.unpack_from(payload, pos)
                pos += FRAME_LEN.size
                frames.append(payload[pos : pos + n])
                pos += n
            self.disk_reads += 1
            if len(self._cache) < self.memory_chunks and self._next_uncached(seq):
                self._cache[seq] = frames
            return frames

    def _next_uncached(self, seq: int) -> bool:
        """Is ``seq`` (on disk, not cached) the oldest chunk on disk past the cache?"""
        if not self._cache:
            return seq == next(iter(self._disk))
        last = next(reversed(self._cache))
        return seq - last <= self.memory_chunks and not any(s in self._disk for s in range(last + 1, seq))

    def next_held(self, seq: int) -> int | None:
        """The smallest held seq >= ``seq`` (None if none)."""
        with self._lock:
            if seq in self._disk or seq in self._memory:
                return seq
            if self._last_seq is None or seq > self._last_seq:
                return None
            # Each is in seq order; after a disk error memory holds seqs above the disk's.
            found = [next((s for s in held if s >= seq), None) for held in (self._disk, self._memory)]
            return min((s for s in found if s is not None), default=None)

    # ------------------------------------------------------------ ack / drop

    def ack(self, seq: int) -> int:
        """Cumulative ack: drop every chunk with a seq <= ``seq``; returns how many were dropped."""
        with self._lock:
            dropped = 0
            self._acked_seq = max(self._acked_seq, seq)
            while self._cache and next(iter(self._cache)) <= seq:
                self._cache.popitem(last=False)
            while self._disk and next(iter(self._disk)) <= seq:
                self._forget_disk(next(iter(self._disk)))
                dropped += 1
            while self._memory and next(iter(self._memory)) <= seq:
                self._memory.popitem(last=False)
                dropped += 1
            self.acked += dropped
            return dropped

    def drop(self, seq: int) -> bool:
        """Drop one rejected chunk (the learner will never accept it)."""
        with self._lock:
            if self._memory.pop(seq, None) is None:
                if seq not in self._disk:
                    return False
                self._cache.pop(seq, None)
                self._forget_disk(seq)
            self.rejected += 1
            return True

    def _forget_disk(self, seq: int) -> None:
        segment, _, _ = self._disk.pop(seq)
        segment.live.discard(seq)
        if not segment.live and not segment.writable:  # the one being written goes on (see _write)
            segment.path.unlink(missing_ok=True)
            self._segments.remove(segment)

    # ------------------------------------------------------------ shutdown

    def close(self, spill: bool = True) -> int:
        """Release the folder. Every chunk is on disk already, except those taken after a disk
        error: ``spill`` tries once more to write them there. Returns the chunks spilled. Disk
        errors are logged (with what could not be saved), never raised. Without a folder, the
        unacked chunks are discarded (logged)."""
        spilled = 0
        with self._lock:
            if self._memory and self.folder is None:
                log.warning("spool: %d unacked chunks discarded at close (spool.dir is null: memory only)",
                            len(self._memory))  # fmt: skip
            elif self._memory and spill:
                spilled = self._spill()
            self._close_writer()
            if self.folder is not None and self._lock_fd is not None:
                try:
                    self._save_acked()
                except OSError as err:  # an older mark of this numbering stays: acked chunks are resent, no harm
                    log.warning("spool %s: could not save the acked seq (%s): the next run resends chunks "
                                "the learner already has (it skips them)", self.folder, err)  # fmt: skip
            self._unlock()
        return spilled

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _spill(self) -> int:
        """Write the memory-only chunks (taken after a disk error) to disk, past the cap if need be:
        keeping data beats honouring the cap here."""
        held, error = len(self._memory), self.disk_error
        self.disk_error = None  # one more try: acks may have freed room since
        spilled = 0
        for seq, frames in self._memory.items():
            if not self._try_disk(self._write, seq, frames, _frames_bytes(frames), True):
                break
            spilled += 1
        self.disk_error = self.disk_error or error
        self._memory.clear()
        if spilled < held:
            log.error("spool %s: %d of %d unacked chunks in memory could not be saved to disk (%s): they are lost; "
                      "the learner counts their seqs as lost when this actor says hello again",
                      self.folder, held - spilled, held, self.disk_error)  # fmt: skip
        else:
            log.info("spool %s: kept %d unacked chunks on disk for the next run", self.folder, len(self._disk))
        return spilled

    def _close_writer(self) -> None:
        """Close the segment being written; delete it if it holds no unacked chunk."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        segment = self._segments[-1]
        segment.writable = False
        try:
            os.close(fd)
            if not segment.live:
                self._segments.remove(segment)
                segment.path.unlink(missing_ok=True)
        except OSError:  # an empty segment left behind is removed when the folder is reopened
            pass

    def _save_acked(self) -> None:
        path = self.folder / ACKED_FILE
        if self._acked_seq < 0:
            path.unlink(missing_ok=True)  # nothing acked (yet) in this numbering; needs no disk space
            return
        write_atomic(path, json.dumps({"seq": self._acked_seq}))  # a crash leaves the old mark or the new one
