"""Camera frames in the replay store: one uint8 column per camera, each frame kept once.

A store made for an observation with cameras (envs/obs_spec.py) holds, next to its row columns,
``frames/<camera>``: uint8 (F, H, W, C), chunked along F and compressed, and two int64 row columns,
``obs_frame`` and ``next_frame``: the global index (into every camera's column alike) of each row's
observation and next observation. Rows of different actors interleave, so a row's next frame is not
simply the next row's frame: that is why it has its own column.

Each frame once: a chunk arrives in the wire's segment layout (``rows.frame_layout``: a segment of
``k`` rows carries ``k + 1`` frames). When its first row continues the episode of that actor that
is still open in the store, its first frame is the previous chunk's last one, which is stored
already: the row points at the stored frame instead (after comparing the bytes, to be safe: if they
differ the frame is stored again). So within an episode a row's next frame is the next row's frame,
and only an episode's final next frame is extra (the issue's rule, part 3).

Rows handed out (``ReplayStore.read``, ``CommitEvent.closed``, trainable rows) are flat dicts whose
``obs_frame`` / ``next_frame`` are RELATIVE to the ``frames/<camera>`` arrays in the same dict, which
hold the frames those rows use, each once, in store order (``gather``). A dict of a store without
cameras has none of these keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from zarr.codecs import ZstdCodec

from o2o.envs.obs_spec import ObsSpec

from .rows import FRAMES_PREFIX, TransitionChunk, frame_key, frame_layout
from .zarr_table import AppendTable, ColumnSpec

if TYPE_CHECKING:
    from .store_episodes import Episode

FRAMES_GROUP = "frames"  # the Zarr group of the frames columns: frames/<camera>, as the rows' keys
INDEX_COLUMNS = ("obs_frame", "next_frame")
# Zarr chunks of ~1 MiB of raw frames (64 frames of 84x84x3): a commit rewrites the last, partly
# filled chunk of each camera, so chunks much larger than a commit's frames cost rewrites.
TARGET_FRAME_CHUNK_BYTES = 1 << 20
# Rows per chunk of a camera store's row columns: its commits hold few rows (its bytes are frames), and
# each commit rewrites every row column's last chunk, so a state store's ~2 MiB chunks (262,144 rows of a
# 2-float state) cost it far more CPU per frame (BENCHMARKS.md, "Image codec").
CAMERA_CHUNK_ROWS = 4096
# Chosen by benchmarks/image_codec.py (BENCHMARKS.md, "Image codec"): zstd level 1 on a whole chunk sees
# across its frames, so the maze's flat frames shrink ~8x more than with blosc (which compresses blocks
# apart; byte shuffle is a no-op on uint8); level 3 stores no less; noisy camera-like frames keep ~90% of
# their bytes with any codec; the commit rates of all candidates were alike within the machine's noise.
DEFAULT_FRAME_COMPRESSOR = ZstdCodec(level=1)
READ_FRAME_BYTES = 256 << 20  # raw frame bytes per block when trainable rows are read in blocks
CAMERA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a Zarr array name


def camera_keys(spec: ObsSpec) -> tuple[str, ...]:
    """The keys a flat row dict of a camera store adds: the two indices, then one per camera."""
    if not spec.has_images:
        return ()
    return (*INDEX_COLUMNS, *(frame_key(name) for name in spec.camera_names))


def index_columns(spec: ObsSpec) -> dict[str, ColumnSpec]:
    """The row columns a camera store adds (global frame indices; -1 in rows never written)."""
    return {name: ColumnSpec("int64", (), -1) for name in INDEX_COLUMNS} if spec.has_images else {}


def frame_columns(spec: ObsSpec) -> dict[str, ColumnSpec]:
    """The frames group's columns: one uint8 (H, W, C) column per camera."""
    return {camera.name: ColumnSpec("uint8", camera.shape, 0) for camera in spec.cameras}


def camera_chunks(spec: ObsSpec, chunk_rows: int, frame_chunk: int) -> tuple[int, int]:
    """A new camera store's rows per chunk (0: ``CAMERA_CHUNK_ROWS``) and frames per chunk (0: a power
    of two near ``TARGET_FRAME_CHUNK_BYTES`` of its largest camera's frames); checks the camera names."""
    bad = [name for name in spec.camera_names if not CAMERA_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"camera names {bad} cannot name Zarr arrays: use letters, digits, '_', '.', '-'")
    if frame_chunk <= 0:
        largest = max(camera.frame_bytes for camera in spec.cameras)
        frame_chunk = min(max(2 ** round(math.log2(TARGET_FRAME_CHUNK_BYTES / largest)), 4), 1024)
    return chunk_rows if chunk_rows > 0 else CAMERA_CHUNK_ROWS, frame_chunk


def expand_columns(columns: list[str], spec: ObsSpec) -> list[str]:
    """``columns`` with every camera key once any is asked for: relative indices are meaningless
    without the frames of the same dict, and the frames without the indices."""
    keys = camera_keys(spec)
    if not any(name in keys for name in columns):
        return list(columns)
    return list(dict.fromkeys([*columns, *keys]))


def frame_problems(chunk: TransitionChunk, spec: ObsSpec) -> list[str]:
    """What is wrong with a chunk's frames for a store of ``spec`` (wrong cameras, dtype, shape, count)."""
    frames = dict(chunk.frames or {})
    if not spec.has_images:
        return [f"the chunk carries frames of cameras {sorted(frames)}, this store has no cameras"] if frames else []
    wrong = []
    if sorted(frames) != sorted(spec.camera_names):
        wrong.append(f"the chunk carries frames of cameras {sorted(frames)}, the store's cameras are "
                     f"{list(spec.camera_names)}")  # fmt: skip
    try:
        n_frames = frame_layout(chunk.terminated, chunk.truncated)[1]
    except (TypeError, ValueError):
        return wrong  # the row checks report the flags
    for camera in spec.cameras:
        if camera.name not in frames:
            continue
        images = frames[camera.name]
        want = (n_frames, *camera.shape)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != want:
            got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            wrong.append(f"camera {camera.name!r} frames are {got}, expected uint8 {want} (the chunk's {chunk.n} "
                         f"rows in {n_frames - chunk.n} segments: one frame per row plus one per segment)")  # fmt: skip
    return wrong


@dataclasses.dataclass
class StagedFrames:
    """Where one appended chunk's frames went: ``ids[j]`` is the global index of its local frame
    ``j``; frames ``j >= first_new`` were stored by this chunk (``first_new`` 1: its first frame
    was the stored last frame of the actor's open episode)."""

    ids: np.ndarray
    first_new: int
    obs_local: np.ndarray  # each row's local observation frame (``frame_layout``)
    frames: dict[str, np.ndarray]  # the chunk's frames by camera (views of the chunk)

    @property
    def obs_frame(self) -> np.ndarray:
        return self.ids[self.obs_local]

    @property
    def next_frame(self) -> np.ndarray:
        return self.ids[self.obs_local + 1]

    def part(self, a: int, b: int) -> dict[str, np.ndarray]:
        """The camera part of an open episode's rows [a, b) of the chunk (one segment): their global
        indices and copies of the frames they stored (``frame_ids``; a copy: the chunk views the
        received message)."""
        lo = max(int(self.obs_local[a]), self.first_new)
        hi = int(self.obs_local[b - 1]) + 2
        part = {"obs_frame": self.obs_frame[a:b], "next_frame": self.next_frame[a:b], "frame_ids": self.ids[lo:hi]}
        part.update({frame_key(name): np.array(images[lo:hi]) for name, images in self.frames.items()})
        return part


class FrameColumns:
    """The frames columns of a camera store and, per actor, the last frame it stored (the first
    frame of its next chunk when that chunk continues the episode)."""

    def __init__(self, table: AppendTable, spec: ObsSpec):
        self.table = table
        self.spec = spec
        self.frame_keys = tuple(frame_key(name) for name in spec.camera_names)
        self.tails: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # actor code -> (global index, frames)

    def stage(self, code: int, chunk: TransitionChunk, episode: Episode | None) -> StagedFrames:
        """Stage the chunk's frames: its first one only if it is not the stored last frame of the actor's
        open ``episode`` (None: none) that the chunk continues."""
        frames = {name: chunk.frames[name] for name in self.spec.camera_names}
        continues = episode is not None and (episode.episode_id, episode.next_step) == (chunk.episode_id, chunk.step)
        obs_local, n_frames = frame_layout(chunk.terminated, chunk.truncated)
        tail = self.tails.get(code) if continues else None
        same = tail is not None and all(np.array_equal(tail[1][name], frames[name][0]) for name in frames)
        first_new = 1 if same else 0
        start = self.table.stage({name: images[first_new:] for name, images in frames.items()}, n_frames - first_new)
        ids = np.arange(start - first_new, start + n_frames - first_new, dtype=np.int64)
        if same:
            ids[0] = tail[0]
        # The chunk's last frame is the next chunk's first if the episode goes on (a copy: see ``part``).
        self.tails[code] = (int(ids[-1]), {name: np.array(images[-1]) for name, images in frames.items()})
        return StagedFrames(ids, first_new, obs_local, frames)

    def take(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Committed frames at sorted global ``ids``, by ``frames/<camera>`` key."""
        return {key: self.table.take(name, ids) for key, name in zip(self.frame_keys, self.spec.camera_names)}

    def set_tail(self, code: int, index: int) -> None:
        """After a reopen: the actor's open episode ends at committed frame ``index``."""
        frames = self.take(np.array([index]))
        self.tails[code] = (index, {name: frames[frame_key(name)][0] for name in self.spec.camera_names})


def gather(rows: dict[str, np.ndarray], take: Callable[[np.ndarray], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``rows`` with GLOBAL ``obs_frame`` / ``next_frame`` -> the same rows with indices RELATIVE to the
    ``frames/<camera>`` arrays added: the frames they use, each once, in store order (``take(ids)``
    gives the frames at sorted global ids)."""
    used = np.unique(np.concatenate([rows["obs_frame"], rows["next_frame"]]))
    out = dict(rows)
    out["obs_frame"] = np.searchsorted(used, rows["obs_frame"]).astype(np.int64)
    out["next_frame"] = np.searchsorted(used, rows["next_frame"]).astype(np.int64)
    out.update(take(used))
    return out


def pool(ids: np.ndarray, frames: dict[str, np.ndarray]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A ``take`` for ``gather`` from frames in memory, ``frames[key][i]`` being global frame ``ids[i]``."""
    order = np.argsort(ids, kind="stable")

    def take(wanted: np.ndarray) -> dict[str, np.ndarray]:
        at = order[np.searchsorted(ids, wanted, sorter=order)]
        return {key: images[at] for key, images in frames.items()}

    return take


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate flat row dicts (e.g. ``TrainableRows.chunks``), shifting each part's relative frame
    indices past the frames of the parts before it. (A frame that two parts both use, such as the
    next frame of one part's last row, is then held twice; the indices stay right.)"""
    if not parts:
        return {}
    out = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if "obs_frame" in parts[0]:  # a camera store's rows
        key = next(k for k in parts[0] if k.startswith(FRAMES_PREFIX))
        offsets = np.cumsum([0] + [len(part[key]) for part in parts[:-1]])
        for name in INDEX_COLUMNS:
            out[name] = np.concatenate([part[name] + offset for part, offset in zip(parts, offsets)])
    return out


def empty_camera_rows(spec: ObsSpec) -> dict[str, np.ndarray]:
    """The camera keys of a dict of no rows."""
    out = {name: np.zeros(0, np.int64) for name in INDEX_COLUMNS}
    out.update({frame_key(c.name): np.zeros((0, *c.shape), np.uint8) for c in spec.cameras})
    return out
