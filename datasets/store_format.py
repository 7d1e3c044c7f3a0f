"""The replay store's format: its files, columns, static settings, errors and commit events.

See ``replay_store.py`` for the commit protocol and the reward convention.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import zarr

from .data_settings import OLD_STORE_NAMES, DataSettings
from .rows import ARRAY_NAMES, MAX_INT32, TransitionChunk
from .zarr_table import ZARR_ATOMIC_WRITES, ColumnSpec, zarr_writes_atomically

FORMAT = "o2o-replay"
FORMAT_VERSION = 1
COMMIT_FILE = "commit.json"
LOCK_FILE = "writer.lock"
EPISODE_CHUNK_ROWS = 4096
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_ABANDON_IDLE_S = 600.0  # the one default: IngestConfig.abandon_idle_s reads it too
MAX_INT64 = 2**63 - 1
# Columns an open episode keeps in memory and a commit event hands the learner in ``closed``
# (with ``mc_return``): what a trainable row needs, nothing the learner must join back later.
LEARNER_COLUMNS = ("obs", "action", "reward", "next_obs", "terminated", "eval")


def row_columns(obs_dim: int, action_dim: int) -> dict[str, ColumnSpec]:
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
    """Rows per Zarr chunk; 0 picks ~2 MiB obs chunks."""

    @property
    def scaled_failure_reward(self) -> float | None:
        if self.failure_reward is None:
            return None
        # Scaled like the rewards (float32), so the all-failure rule compares equal numbers.
        return float(self.data.scale(np.array([self.failure_reward]))[0])

    def to_attrs(self) -> dict:
        """The metadata saved in the root group: the data settings flat, under their names."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "data"}
        return {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self.data.normalized()), **fields}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StoreConfig":
        """Read ``to_attrs``'s metadata, also a store's made by older code: the data settings under
        their old names (gamma, infinite_horizon) or without ``infinite_horizon`` (then False)."""
        known = {**LATER_ATTRS, **{OLD_STORE_NAMES.get(k, k): v for k, v in attrs.items()}}
        fields = {f.name: known[f.name] for f in dataclasses.fields(cls) if f.name != "data"}
        return cls(data=DataSettings.of(known), **fields)


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
    the order they closed: ``LEARNER_COLUMNS`` (raw rewards) and ``mc_return``. Everything the
    learner needs to train on them, without looking back."""


def temp_files(path: Path) -> list[Path]:
    """Temporary files of interrupted writes in a store: zarr's ``*.partial`` and the commit
    record's ``.commit.json.<pid>.tmp`` (a writer killed mid-write). Nobody reads them; a writer
    reopening the store removes them, ``o2o-store check`` reports them."""
    return sorted([*path.rglob("*.partial"), *path.glob(f".{COMMIT_FILE}.*.tmp")])


def check_chunk(chunk: TransitionChunk, config: StoreConfig) -> None:
    """ValueError unless every value of the chunk fits its column (int32 ones included)."""
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
    if n < 1:
        wrong.append("the chunk has no rows")
    if not _int_in(chunk.policy_version, -1, MAX_INT32):
        wrong.append(f"policy_version={chunk.policy_version!r} is outside [-1, {MAX_INT32}] (an int32 column)")
    if not _int_in(chunk.step, 0, MAX_INT32 - max(n - 1, 0)):
        wrong.append(f"step={chunk.step!r} with {n} rows: the steps must lie in [0, {MAX_INT32}] (an int32 column)")
    if not _int_in(chunk.episode_id, 0, MAX_INT64 - n):
        wrong.append(f"episode_id={chunk.episode_id!r} is outside [0, 2**63 - 1 - n] (an int64 column)")
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
