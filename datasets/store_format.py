"""The replay store's format: its files, columns, static settings, errors and commit events;
making a new store's folder and opening its frames columns.

See ``replay_store.py`` for the commit protocol and the reward convention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from o2o.envs.obs_spec import CameraSpec, ObsSpec

from .atomic_file import fsync_path, write_atomic
from .data_settings import OLD_STORE_NAMES, DataSettings
from .file_lock import try_lock
from .rows import ARRAY_NAMES, INTERVENTION, MAX_INT32, TransitionChunk
from .store_frames import FRAMES_GROUP, FrameColumns, frame_columns, frame_problems, index_columns
from .zarr_table import (
    ZARR_ATOMIC_WRITES,
    AppendTable,
    ColumnSpec,
    TableWrite,
    fsync_files,
    run_concurrently,
    zarr_writes_atomically,
)

if TYPE_CHECKING:
    from .store_episodes import Closed

FORMAT = "o2o-replay"
FORMAT_VERSION = 1
# Stores with cameras (frames columns, store_frames.py): code that reads version 1 only must refuse them,
# not read their rows without images.
CAMERA_FORMAT_VERSION = 2
COMMIT_FILE = "commit.json"
LOCK_FILE = "writer.lock"
EPISODE_CHUNK_ROWS = 4096
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_ABANDON_IDLE_S = 600.0  # the one default: IngestConfig.abandon_idle_s reads it too
MAX_INT64 = 2**63 - 1
# Columns an open episode keeps in memory and a commit event hands the learner in ``closed``
# (with ``mc_return``): what a trainable row needs, nothing the learner must join back later.
LEARNER_COLUMNS = ("obs", "action", "reward", "next_obs", "terminated", "eval", INTERVENTION)
# Row columns added after FORMAT_VERSION was fixed: a store made before lacks them. Such a column reads as its
# fill value where it is missing or shorter than the rows (rows appended by older code), and a writer opening
# the store adds it (``add_later_columns``): no format version of its own, since older code that reads such a
# store reads every transition right (without the flag) and, writing, leaves the column short (read as 0).
LATER_COLUMNS = (INTERVENTION,)


def row_columns(obs_dim: int, action_dim: int, spec: ObsSpec | None = None) -> dict[str, ColumnSpec]:
    """The row columns; a store with cameras (``spec``) adds ``obs_frame`` / ``next_frame`` at the end."""
    return {
        "obs": ColumnSpec("float32", (obs_dim,)),
        "action": ColumnSpec("float32", (action_dim,)),
        "reward": ColumnSpec("float32"),  # raw env reward
        "next_obs": ColumnSpec("float32", (obs_dim,)),
        "terminated": ColumnSpec("bool", (), False),
        "truncated": ColumnSpec("bool", (), False),
        "success": ColumnSpec("bool", (), False),
        "mc_return": ColumnSpec("float32", (), math.nan),  # NaN until the episode ends
        "actor": ColumnSpec("int32", (), -1),  # code into ReplayStore.actor_ids
        "policy_version": ColumnSpec("int32", (), -1),
        "episode_id": ColumnSpec("int64", (), -1),
        "step": ColumnSpec("int32", (), -1),  # step of the row within its episode
        "eval": ColumnSpec("bool", (), False),
        INTERVENTION: ColumnSpec("uint8", (), 0),  # 1: the operator's teleop action was executed (HIL-SERL)
        **index_columns(spec or ObsSpec(obs_dim)),
    }


EPISODE_COLUMNS: dict[str, ColumnSpec] = {
    "actor": ColumnSpec("int32", (), -1),
    "episode_id": ColumnSpec("int64", (), -1),
    "policy_version_start": ColumnSpec("int32", (), -1),
    "policy_version_end": ColumnSpec("int32", (), -1),
    "start_row": ColumnSpec("int64", (), -1),  # first row; rows of other actors may lie in between
    "end_row": ColumnSpec("int64", (), -1),  # last row
    "length": ColumnSpec("int32", (), 0),  # rows stored
    "return": ColumnSpec("float64", (), 0.0),  # sum of raw rewards
    "success": ColumnSpec("bool", (), False),  # success flag of the last row
    "eval": ColumnSpec("bool", (), False),
    "ended": ColumnSpec("bool", (), False),  # False: abandoned without a terminated/truncated row
    "terminated": ColumnSpec("bool", (), False),
    "contiguous": ColumnSpec("bool", (), False),  # steps 0..length-1, none missing
}


class StoreError(RuntimeError):
    """A replay store that cannot be opened or written as asked."""


class SeqGapError(ValueError):
    """A chunk arrived before earlier chunks of its actor: resend from ``expected``."""

    def __init__(self, actor_id: str, expected: int, got: int):
        super().__init__(f"actor {actor_id!r}: chunk seq {got} arrived, but seq {expected} is missing")
        self.actor_id = actor_id
        self.expected = expected
        self.got = got


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Static metadata of a store (saved in the root group's attributes, ``to_attrs``)."""

    obs_dim: int
    action_dim: int
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    """The data settings its MC returns are computed with (the agent's ``algo`` ones)."""
    failure_reward: float | None = None
    """RAW failure reward of a sparse task (its ``reward_neg``), or None for dense tasks."""
    task: str | None = None
    chunk_rows: int = 0
    """Rows per Zarr chunk; 0 picks ~2 MiB obs chunks (a camera store: ``CAMERA_CHUNK_ROWS``)."""
    cameras: tuple[CameraSpec, ...] = ()
    """The observation's cameras (``ObsSpec.cameras``): one frames column each; () for a state store."""
    frame_chunk: int = 0
    """Frames per Zarr chunk of the frames columns (camera stores)."""

    @property
    def obs_spec(self) -> ObsSpec:
        """What an observation of this store is made of (``obs_dim`` is its state vector's size)."""
        return ObsSpec(self.obs_dim, self.cameras)

    @property
    def scaled_failure_reward(self) -> float | None:
        if self.failure_reward is None:
            return None
        # Scaled like the rewards (float32), so the all-failure rule compares equal numbers.
        return float(self.data.scale(np.array([self.failure_reward]))[0])

    def to_attrs(self) -> dict:
        """The metadata saved in the root group: the data settings flat, under their names; a camera
        store adds its ``obs_spec`` (``ObsSpec.to_dict``) and ``frame_chunk`` (a state store's are as before)."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("data", *CAMERA_FIELDS)]
        fields = {name: getattr(self, name) for name in names}
        attrs = {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self.data.normalized()), **fields}
        if self.cameras:
            attrs.update(version=CAMERA_FORMAT_VERSION, obs_spec=self.obs_spec.to_dict(), frame_chunk=self.frame_chunk)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StoreConfig":
        """Read ``to_attrs``'s metadata, also a store's made by older code: the data settings under
        their old names (gamma, infinite_horizon) or without ``infinite_horizon`` (then False).
        Raises ``StoreError`` if a camera store's spec is missing or does not match its state size."""
        known = {**LATER_ATTRS, **{OLD_STORE_NAMES.get(k, k): v for k, v in attrs.items()}}
        fields = {f.name: known[f.name] for f in dataclasses.fields(cls) if f.name not in ("data", *CAMERA_FIELDS)}
        cameras, frame_chunk = (), 0
        if attrs.get("version") == CAMERA_FORMAT_VERSION:
            try:
                spec = ObsSpec.from_dict(attrs["obs_spec"])
                frame_chunk = int(attrs["frame_chunk"])
            except (KeyError, TypeError, ValueError) as err:
                raise StoreError(f"a camera store's metadata lacks a valid obs_spec / frame_chunk ({err!r})") from None
            if spec.state_dim != fields["obs_dim"] or not spec.cameras or frame_chunk < 1:
                raise StoreError(f"the store's obs_spec {spec.to_dict()} (frame_chunk {frame_chunk}) does not "
                                 f"match its obs_dim {fields['obs_dim']}")  # fmt: skip
            cameras = spec.cameras
        return cls(data=DataSettings.of(known), cameras=cameras, frame_chunk=frame_chunk, **fields)


CAMERA_FIELDS = ("cameras", "frame_chunk")  # saved as "obs_spec" and "frame_chunk", in camera stores only

# Attributes added after FORMAT_VERSION was fixed: a store made before lacks them and reads these.
LATER_ATTRS = {"mc_infinite_horizon": DataSettings.mc_infinite_horizon}


@dataclasses.dataclass(frozen=True)
class CommitEvent:
    """What one commit made durable (given to ``IngestServer``'s ``on_commit``).

    No copy of the new rows: whoever wants them reads them from the store (``read``)."""

    start: int
    stop: int
    """New rows [start, stop)."""
    episodes: dict[str, np.ndarray]
    """Episodes closed in this commit (``EPISODE_COLUMNS``)."""
    closed: dict[str, np.ndarray]
    """The rows of the episodes this commit closed with an MC return, episode after episode in
    the order they closed: ``LEARNER_COLUMNS`` (raw rewards) and ``mc_return``, and in a camera
    store ``obs_frame`` / ``next_frame`` relative to the ``frames/<camera>`` arrays of the same dict
    (store_frames.py). Everything the learner needs to train on them, without looking back."""
    interventions: int = 0
    """Rows among the new ones [start, stop) whose action was the operator's (``intervention`` 1)."""


@dataclasses.dataclass
class PendingCommit:
    """A commit taken by ``ReplayStore.begin_commit``: ``run`` writes it, in any thread (it
    touches no memory of the store), then the store's thread calls ``finish_commit`` or, if
    ``run`` raised, ``abort_commit``."""

    path: Path
    fsync: bool
    rows: TableWrite
    episodes: TableWrite
    frames: TableWrite | None  # the frames columns of a camera store
    record: dict = dataclasses.field(repr=False)
    seqs: dict[str, int] = dataclasses.field(repr=False)  # each actor's seq this commit makes committed
    closed: list[Closed] = dataclasses.field(repr=False)
    event_episodes: dict[str, np.ndarray] | None = dataclasses.field(repr=False)  # set when the event is collected
    start: int = 0
    interventions: int = 0  # intervention rows among the rows it commits
    # The writer's folders whose entries are synced (fsync_files' ``durable``): only ``run`` touches it.
    durable_folders: set[Path] = dataclasses.field(default_factory=set, repr=False)

    def run(self) -> None:
        """Data first, then (fsynced, if asked) the record that makes it trusted."""
        # Resize first, so that a failed resize leaves no write coroutine never awaited.
        tables = [t for t in (self.rows, self.episodes, self.frames) if t is not None]
        for table in tables:
            table.reserve()
        run_concurrently([op for table in tables for op in table.ops()])
        if self.fsync:  # the data must be on disk before a record that trusts it can be
            fsync_files([file for table in tables for file in table.written_files()], self.path,
                        self.durable_folders)  # fmt: skip
        write_atomic(self.path / COMMIT_FILE, json.dumps(self.record, separators=(",", ":")), fsync=self.fsync)


def make_store_folder(path: Path, config: StoreConfig, compressor, frame_compressor, overwrite: bool,
                      fsync: bool) -> int:  # fmt: skip
    """Make an empty store's folder (``overwrite``: replacing one no writer has open); returns the
    writer lock's fd. The commit record comes last: a store without one never opens."""
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} exists; open it with ReplayStore.open(path, 'a') or pass overwrite=True")
        if (path / LOCK_FILE).exists():
            os.close(lock_store(path))  # refuses to delete a store that a writer has open
        shutil.rmtree(path)
    spec = config.obs_spec
    path.mkdir(parents=True)
    lock_fd = lock_store(path)
    group = zarr.open_group(str(path), mode="a")  # "w" would wipe the lock file
    group.attrs["o2o_replay"] = config.to_attrs()
    rows = row_columns(config.obs_dim, config.action_dim, spec)
    AppendTable.create(group.create_group("data"), rows, config.chunk_rows, compressor)
    AppendTable.create(group.create_group("episodes"), EPISODE_COLUMNS, EPISODE_CHUNK_ROWS, compressor)
    if spec.has_images:
        AppendTable.create(group.create_group(FRAMES_GROUP), frame_columns(spec), config.frame_chunk, frame_compressor)
    if fsync:  # the metadata files and folders, before the record that makes the store valid
        fsync_files([p for p in path.rglob("*") if p.is_file()], path)
        fsync_path(path.parent)
    record = {"format": FORMAT, "commit": 0, "rows": 0, "episodes": 0, "actors": []}
    if spec.has_images:
        record["frames"] = 0
    write_atomic(path / COMMIT_FILE, json.dumps(record, separators=(",", ":")), fsync=fsync)
    return lock_fd


def add_later_columns(group: zarr.Group, config: StoreConfig, fsync: bool) -> None:
    """A writer opening a store made before a ``LATER_COLUMNS`` column existed: add it, empty (every row
    reads its fill value), as long as the other columns and chunked like them. Only a ``zarr.json`` is
    written, renamed into place: a crash leaves the column there or not, and the next writer adds it."""
    data = group["data"]
    specs = row_columns(config.obs_dim, config.action_dim, config.obs_spec)
    like = data["reward"]
    for name in LATER_COLUMNS:
        if name in data:
            continue
        spec = specs[name]
        data.create_array(name, shape=(like.shape[0], *spec.shape), chunks=(config.chunk_rows, *spec.shape),
                          dtype=spec.dtype, fill_value=spec.fill, compressors=like.compressors)  # fmt: skip
        if fsync:
            root = Path(group.store.root)
            fsync_files([root / "data" / name / "zarr.json"], root)


def open_frames(group: zarr.Group, config: StoreConfig, record: dict, writable: bool) -> FrameColumns | None:
    """The frames columns of a camera store, checked against its recorded spec (None: a state store)."""
    spec = config.obs_spec
    if not spec.has_images:
        return None
    specs = frame_columns(spec)
    found = {name: (group[FRAMES_GROUP][name].dtype, group[FRAMES_GROUP][name].shape[1:])
             for name in specs if FRAMES_GROUP in group and name in group[FRAMES_GROUP]}  # fmt: skip
    want = {name: (np.dtype(s.dtype), s.shape) for name, s in specs.items()}
    if found != want or "frames" not in record:
        raise StoreError(f"{group.store.root}: the metadata declares cameras {spec.to_dict()['cameras']} (uint8), but "
                         f"its frames columns are {found} and the commit record "
                         f"{'counts' if 'frames' in record else 'lacks'} frames")  # fmt: skip
    table = AppendTable(group[FRAMES_GROUP], specs, config.frame_chunk, record["frames"], writable=writable)
    return FrameColumns(table, spec)


def lock_store(path: Path) -> int:
    # Read-only: an fd open for writing would keep the file system from being remounted read-only.
    fd = try_lock(path / LOCK_FILE, write=False)
    if fd is None:
        raise StoreError(f"{path} is open for writing by another process (one writer at a time)")
    return fd


def temp_files(path: Path) -> list[Path]:
    """Temporary files of interrupted writes in a store: zarr's ``*.partial`` and the commit
    record's ``.commit.json.<pid>.tmp`` (a writer killed mid-write). Nobody reads them; a writer
    reopening the store removes them, ``o2o-store check`` reports them."""
    return sorted([*path.rglob("*.partial"), *path.glob(f".{COMMIT_FILE}.*.tmp")])


def check_chunk(chunk: TransitionChunk, config: StoreConfig) -> None:
    """ValueError unless every value of the chunk fits its column (int32 ones included) and its
    frames fit the store's cameras."""
    n = chunk.n
    obs_dim, action_dim = config.obs_dim, config.action_dim
    shapes = {name: np.shape(getattr(chunk, name)) for name in ARRAY_NAMES}
    rows = {name: shape[0] if shape else None for name, shape in shapes.items()}
    trailing = {"obs": (obs_dim,), "action": (action_dim,), "next_obs": (obs_dim,)}
    wrong = []
    if len(set(rows.values())) > 1:
        wrong.append(f"the arrays must have the same number of rows, not {rows}")
    else:
        wrong += [
            f"{name} has shape {shape}, expected {(n, *trailing.get(name, ()))} "
            f"(the store's obs_dim={obs_dim}, action_dim={action_dim})"
            for name, shape in shapes.items()
            if shape != (n, *trailing.get(name, ()))
        ]
    flags = chunk.intervention
    if flags is not None and (np.shape(flags) != (n,) or not np.isin(flags, (0, 1)).all()):
        wrong.append(f"intervention must hold {n} flags of 0 or 1, got shape {np.shape(flags)}")
    if n < 1:
        wrong.append("the chunk has no rows")
    if not _int_in(chunk.policy_version, -1, MAX_INT32):
        wrong.append(f"policy_version={chunk.policy_version!r} is outside [-1, {MAX_INT32}] (an int32 column)")
    if not _int_in(chunk.step, 0, MAX_INT32 - max(n - 1, 0)):
        wrong.append(f"step={chunk.step!r} with {n} rows: the steps must lie in [0, {MAX_INT32}] (an int32 column)")
    if not _int_in(chunk.episode_id, 0, MAX_INT64 - n):
        wrong.append(f"episode_id={chunk.episode_id!r} is outside [0, 2**63 - 1 - n] (an int64 column)")
    if not wrong:  # the frame count needs rows of one length
        wrong += frame_problems(chunk, config.obs_spec)
    if wrong:
        raise ValueError(
            f"actor {chunk.actor_id!r}: chunk seq {chunk.seq} refused, nothing was staged: {'; '.join(wrong)}. "
            "Skip this seq (ReplayStore.skip) or append a corrected chunk with the same seq."
        )


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi


def check_zarr_for_writing() -> None:
    if not zarr_writes_atomically():
        raise StoreError(
            f"zarr {zarr.__version__} is installed, but writing a replay store needs zarr >= {ZARR_ATOMIC_WRITES}: "
            "older versions write chunks in place, so a crash during a commit can tear committed rows. "
            f"Upgrade it (pip install 'zarr>={ZARR_ATOMIC_WRITES}'); reading (mode 'r') works as is."
        )
