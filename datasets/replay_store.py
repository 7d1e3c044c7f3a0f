"""The online replay store: actors' transitions in Zarr, exactly once, crash-safe.

Layout of a store folder::

    zarr.json        root group; attrs["o2o_replay"] = static metadata (dims, gamma, ...)
    data/<column>    one row per transition, append-only (see ROW_COLUMNS)
    episodes/<col>   one row per closed episode (see EPISODE_COLUMNS)
    commit.json      the commit record: trusted row / episode counts, actor table,
                     per-actor last committed seq and open episode
    writer.lock      flock held by the one writer

Commit protocol (crash safety). ``commit()`` first writes the data: whole Zarr
chunks, each renamed into place by zarr's LocalStore, and rows already
committed keep their values in every rewritten chunk. Only then does it write
``commit.json`` to a temporary file and ``os.replace`` it over the old one.
Readers (and a reopening writer) trust nothing but ``commit.json``: rows and
episodes at or past its counts are ignored and later overwritten. A process
killed at any instant therefore leaves the previous or the new commit, both
complete (and temporary files, which the next writer to open the store removes).
It needs zarr >= 3.1.3, the first whose LocalStore renames each file into place:
writers refuse older ones.

Durability (``fsync``, on by default): before the record is replaced, the commit
fsyncs every file it wrote (the chunks it rewrote, resized arrays' ``zarr.json``) and
their folders; it fsyncs the new record before the rename and the store folder after
it. So an OS crash or power loss also leaves the last commit that returned, complete.
``ReplayStore.create/open(..., fsync=False)`` (or setting ``store.fsync``) skips that
for speed (benchmarks/store_fsync.py measures it): then only a process crash is
survived, and an OS crash may lose recent commits or tear them.

A commit that fails (``OSError``: disk full, read-only file system, I/O error, a
failed fsync) changes nothing in memory and leaves the previous commit on disk:
everything staged stays staged, and ``commit()`` can simply be called again. (Only an
fsync of the folder after the rename can fail with the new record in place; the commit
still fails, and its retry writes the same rows and a record that includes them.)

Exactly-once: chunks carry ``(actor_id, seq)``; ``append`` skips a chunk whose
seq is not above the actor's last accepted one (a duplicate: it must still be
acked) and refuses a chunk that leaves a gap (``SeqGapError``: the sender must
resend the missing ones first). The committed seq of each actor is saved in the
same atomic record as the row count.

Rewards and MC returns: the ``reward`` column holds the RAW env reward, as the
actor observed it, so the store does not depend on training choices. The
``mc_return`` column is the Cal-QL Monte-Carlo return-to-go computed exactly
like ``minari_io.load_transitions``: rewards scaled to
``float32(reward * reward_scale + reward_bias)``, then
``mc_return.trajectory_return_to_go`` with the store's ``gamma``, the scaled
failure reward (sparse tasks) and ``infinite_horizon`` (Cal-QL's Kitchen tail;
stores made before that setting existed read it as False). It is filled when
an episode's terminated or truncated row arrives, for every row of that episode
(rows of different actors interleave). Rows of episodes still open, abandoned (the actor moved on to
another episode without ending this one) or with missing steps (a rejected or
lost chunk) keep ``mc_return = NaN``: filter them with ``np.isfinite``. Note
that rewards used for training must be scaled the same way: the store gives
raw rewards.

Rows for the learner: a commit event (``commit(collect=True)``, ``last_commit``) carries
``closed``, the rows of every episode that this commit closed with an MC return, with the
columns the learner trains on (``LEARNER_COLUMNS`` + ``mc_return``). The open episodes keep
those columns in memory until they close (bounded by the open episodes: one per actor, and
idle ones are abandoned, see below), so the learner needs no copy of rows still waiting for
their episode's end; a reopening writer reads the open episodes' rows back.

Idle actors: an actor that stopped in the middle of an episode would keep it open
forever, and a reopening writer reads every row from the oldest open episode on.
``abandon_idle_episodes`` closes (as abandoned) the episodes of actors that staged
no row for a while, and ``open(path, "a")`` does so for actors that were idle for
``abandon_idle_s`` at the last commit. The commit record keeps each actor's
``last_row_time`` and the commit's ``time`` (wall clock, ``ReplayStore.clock``);
time while no writer had the store open does not count as idle (row times are
moved forward by that downtime at reopen), because actors that were live when the
learner stopped continue their episodes from their spools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from .mc_return import scale_rewards, trajectory_return_to_go
from .rows import ARRAY_NAMES, MAX_INT32, TransitionChunk
from .zarr_table import (
    DEFAULT_COMPRESSOR,
    ZARR_ATOMIC_WRITES,
    AppendTable,
    ColumnSpec,
    fsync_files,
    fsync_path,
    run_concurrently,
    zarr_writes_atomically,
)

FORMAT = "o2o-replay"
FORMAT_VERSION = 1
COMMIT_FILE = "commit.json"
LOCK_FILE = "writer.lock"
EPISODE_CHUNK_ROWS = 4096
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_ABANDON_IDLE_S = 3600.0
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
    """Static metadata of a store (saved in the root group's attributes)."""

    obs_dim: int
    action_dim: int
    gamma: float = 0.99
    reward_scale: float = 1.0
    reward_bias: float = 0.0
    failure_reward: float | None = None
    """RAW failure reward of a sparse task (its ``reward_neg``), or None for dense tasks."""
    task: str | None = None
    chunk_rows: int = 0
    """Rows per Zarr chunk; 0 picks ~2 MiB obs chunks."""
    infinite_horizon: bool = False
    """MC returns of truncated episodes start from r_last / (1 - gamma) (Cal-QL's Kitchen rule)."""

    @property
    def scaled_failure_reward(self) -> float | None:
        if self.failure_reward is None:
            return None
        # Scaled like the rewards (float32), so the all-failure rule compares equal numbers.
        return float(self.scale_rewards(np.array([self.failure_reward]))[0])

    def scale_rewards(self, raw: np.ndarray) -> np.ndarray:
        # The same float32 arithmetic as minari_io.load_transitions, so MC returns match bit for bit.
        return scale_rewards(raw, self.reward_scale, self.reward_bias)


# Attributes added after FORMAT_VERSION was fixed: a store made before lacks them and reads these.
_LATER_ATTRS = {"infinite_horizon": False}


@dataclasses.dataclass(frozen=True)
class CommitEvent:
    """What one commit made durable (given to ``IngestServer``'s ``on_commit``)."""

    start: int
    stop: int
    """New rows [start, stop)."""
    rows: dict[str, np.ndarray]
    """Columns of rows [start, stop), as in ``read``."""
    mc_rows: np.ndarray
    """Rows (maybe < start) whose ``mc_return`` this commit filled in ..."""
    mc_return: np.ndarray
    """... and those values (already included in ``rows`` for rows >= start)."""
    episodes: dict[str, np.ndarray]
    """Episodes closed in this commit (``EPISODE_COLUMNS``)."""
    closed: dict[str, np.ndarray]
    """The rows of the episodes this commit closed with an MC return, episode after episode in
    the order they closed: ``LEARNER_COLUMNS`` (raw rewards) and ``mc_return``; row ``i`` is store
    row ``mc_rows[i]``. Everything the learner needs to train on them, without looking back."""


@dataclasses.dataclass
class _Episode:
    """An open episode of one actor: where its rows are and their ``LEARNER_COLUMNS``."""

    episode_id: int
    start_row: int
    next_step: int
    policy_version_start: int
    policy_version_end: int
    eval: bool
    contiguous: bool
    success: bool = False
    # Kept up to date (and in the commit record) so that an episode can be closed
    # without reading its rows back (see ``ReplayStore._resume``).
    length: int = 0
    end_row: int = -1
    reward_sum: float = 0.0
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # The episode's rows (``LEARNER_COLUMNS``), one dict per staged segment: the MC return
    # needs its rewards, and a commit that closes it hands these rows to the learner.
    parts: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        fields = ("episode_id", "start_row", "next_step", "policy_version_start", "policy_version_end",
                  "eval", "contiguous", "success", "length", "end_row", "reward_sum")  # fmt: skip
        return {k: getattr(self, k) for k in fields}

    @classmethod
    def from_json(cls, state: dict) -> "_Episode":
        return cls(**state)

    def rows(self) -> np.ndarray:
        return np.concatenate([np.arange(a, b) for a, b in self.ranges]) if self.ranges else np.zeros(0, np.int64)

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([part[name] for part in self.parts])


@dataclasses.dataclass
class _Actor:
    code: int
    committed_seq: int = -1
    seq: int = -1  # highest accepted or skipped seq (staged)
    episode: _Episode | None = None
    last_row_time: float | None = None  # clock() when its last row was staged; None: unknown


class ReplayStore:
    """Append-only Zarr replay store shared by a writer (the learner) and readers.

    Create with ``ReplayStore.create``, open with ``ReplayStore.open(path, "r" | "a")``.
    Writer API: ``append`` (stage a chunk) and ``commit`` (make staged rows durable).
    Reader API: ``len``, ``read``, ``episodes``, ``committed_seq``, ``refresh``.
    ``clock`` (default ``time.time``) gives the wall times of staged rows and commits;
    ``fsync`` (default True) whether a commit is made durable against OS crashes too.
    """

    def __init__(self, path: Path, config: StoreConfig, mode: Literal["r", "a"], lock_fd: int | None,
                 abandon_idle_s: float | None = None, fsync: bool = True):  # fmt: skip
        self.path = path
        self.clock = time.time  # wall clock of row and commit times; tests set their own
        self.fsync = fsync
        self.config = config
        self.mode = mode
        self._lock_fd = lock_fd
        self._group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        self._actors: dict[str, _Actor] = {}
        self._actor_ids: list[str] = []
        self.commits = 0
        self.duplicates = 0
        self.last_commit: CommitEvent | None = None
        record = self._read_record()
        self._rows = AppendTable(
            self._group["data"], row_columns(config.obs_dim, config.action_dim), config.chunk_rows,
            record["rows"], writable=mode == "a",
        )  # fmt: skip
        self._episodes = AppendTable(
            self._group["episodes"], EPISODE_COLUMNS, EPISODE_CHUNK_ROWS, record["episodes"], writable=mode == "a"
        )
        self._load_record(record)
        # Episodes closed with an MC return since the last commit: (rows, mc_return, parts).
        self._mc_filled: list[tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]] = []
        self._dirty = False
        if mode == "a":
            self._resume(record.get("time"), abandon_idle_s)

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        obs_dim: int,
        action_dim: int,
        *,
        gamma: float = 0.99,
        reward_scale: float = 1.0,
        reward_bias: float = 0.0,
        failure_reward: float | None = None,
        task: str | None = None,
        chunk_rows: int = 0,
        compressor=DEFAULT_COMPRESSOR,
        overwrite: bool = False,
        infinite_horizon: bool = False,
        fsync: bool = True,
    ) -> "ReplayStore":
        """A new, empty store opened for appending.

        ``failure_reward`` is the RAW failure reward of a sparse task (``TaskSpec.reward_neg``),
        None for dense tasks; see the module docstring for the reward convention.
        ``infinite_horizon``: MC returns as with ``load_transitions(..., infinite_horizon=True)``.
        ``fsync``: make each commit durable against OS crashes and power loss (see the module
        docstring); it is a setting of this writer, not of the store.
        """
        _check_zarr_for_writing()
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise StoreError(f"{path} exists; open it with ReplayStore.open(path, 'a') or pass overwrite=True")
            if (path / LOCK_FILE).exists():
                os.close(_lock(path))  # refuses to delete a store that a writer has open
            shutil.rmtree(path)
        if chunk_rows <= 0:
            chunk_rows = 2 ** round(math.log2(TARGET_CHUNK_BYTES / (4 * obs_dim)))
            chunk_rows = min(max(chunk_rows, 1024), 262144)
        config = StoreConfig(
            obs_dim, action_dim, float(gamma), float(reward_scale), float(reward_bias),
            None if failure_reward is None else float(failure_reward), task, chunk_rows,
            infinite_horizon=bool(infinite_horizon),
        )  # fmt: skip
        path.mkdir(parents=True)
        lock_fd = _lock(path)
        group = zarr.open_group(str(path), mode="a")  # "w" would wipe the lock file
        group.attrs["o2o_replay"] = {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(config)}
        AppendTable.create(group.create_group("data"), row_columns(obs_dim, action_dim), chunk_rows, compressor)
        AppendTable.create(group.create_group("episodes"), EPISODE_COLUMNS, EPISODE_CHUNK_ROWS, compressor)
        if fsync:  # the metadata files and folders, before the record that makes the store valid
            fsync_files([p for p in path.rglob("*") if p.is_file()], path)
            fsync_path(path.parent)
        # The commit record comes last: a store without one never opens.
        _write_json(path / COMMIT_FILE, {"format": FORMAT, "commit": 0, "rows": 0, "episodes": 0, "actors": []}, fsync)
        return _construct(cls, path, config, "a", lock_fd, None, fsync)

    @classmethod
    def create_for_task(cls, path: str | os.PathLike, task: str, **kwargs) -> "ReplayStore":
        """A store with the dimensions and failure reward of an o2o task (makes the env once);
        ``kwargs`` go to ``create`` (``gamma``, ``reward_scale``, ``infinite_horizon``, ...)."""
        from o2o.envs import get_task, make_env

        spec = get_task(task)
        env = make_env(spec)
        obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
        env.close()
        failure = spec.reward_neg if spec.reward == "sparse" else None
        return cls.create(path, obs_dim, action_dim, failure_reward=failure, task=spec.name, **kwargs)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: Literal["r", "a"] = "r",
        *,
        abandon_idle_s: float | None = DEFAULT_ABANDON_IDLE_S,
        fsync: bool = True,
    ) -> "ReplayStore":
        """Open a store: ``"r"`` to read (any number of processes, also while it is written),
        ``"a"`` to keep appending (one writer; open episodes are rebuilt from the rows).

        ``abandon_idle_s`` (mode ``"a"``): first abandon the open episodes of actors that had
        staged no row for longer than this when the last commit was made (None: keep them all).
        ``fsync`` (mode ``"a"``): make each commit durable against OS crashes (module docstring)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if mode == "a":
            _check_zarr_for_writing()
        if not (path / COMMIT_FILE).exists():
            raise StoreError(f"{path} is not an o2o replay store (no {COMMIT_FILE}; was its creation interrupted?)")
        attrs = zarr.open_group(str(path), mode="r").attrs.get("o2o_replay")
        if not attrs or attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not an o2o replay store (no o2o_replay attributes)")
        if attrs["version"] != FORMAT_VERSION:
            raise StoreError(f"{path} has store format version {attrs['version']}; this code reads {FORMAT_VERSION}")
        known = {**_LATER_ATTRS, **attrs}  # a store made by older code lacks the later attributes
        config = StoreConfig(**{f.name: known[f.name] for f in dataclasses.fields(StoreConfig)})
        lock_fd = _lock(path) if mode == "a" else None
        return _construct(cls, path, config, mode, lock_fd, abandon_idle_s, fsync)

    def close(self, commit: bool = True) -> None:
        """Commit what is staged (unless ``commit=False``) and release the writer lock,
        also when that commit fails (what it could not commit is then lost)."""
        try:
            if self.mode == "a" and commit and self._lock_fd is not None:
                self.commit()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "ReplayStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close(commit=exc[0] is None)

    # ------------------------------------------------------------ commit record

    def _read_record(self) -> dict:
        with open(self.path / COMMIT_FILE) as f:
            return json.load(f)

    def _load_record(self, record: dict) -> None:
        self.commits = record["commit"]
        self._actor_ids = [a["id"] for a in record["actors"]]
        self._actors = {}
        for code, state in enumerate(record["actors"]):
            episode = _Episode.from_json(state["episode"]) if state["episode"] else None
            # Records written before idle tracking lack "last_row_time": unknown.
            self._actors[state["id"]] = _Actor(code, state["seq"], state["seq"], episode, state.get("last_row_time"))

    def refresh(self) -> int:
        """Readers: pick up the writer's latest commit; returns the committed row count."""
        if self.mode != "r":
            return len(self)
        record = self._read_record()
        self._rows.length = self._rows.end = record["rows"]
        self._episodes.length = self._episodes.end = record["episodes"]
        self._load_record(record)
        return len(self)

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Committed rows (the only rows anyone may trust)."""
        return self._rows.length

    @property
    def num_episodes(self) -> int:
        return self._episodes.length

    @property
    def staged_rows(self) -> int:
        return self._rows.staged

    @property
    def staged_full_chunk(self) -> bool:
        """True when a whole Zarr chunk of rows is staged: the cheapest moment to commit
        (a commit rewrites the last, partly filled chunk of every column)."""
        return self._rows.full_chunks > 0

    @property
    def uncommitted(self) -> bool:
        """True when ``commit`` has something to write (rows, skipped seqs, repairs)."""
        return self._dirty

    @property
    def actor_ids(self) -> list[str]:
        """Actor id of each code of the ``actor`` columns (includes staged actors)."""
        return list(self._actor_ids)

    def committed_seq(self, actor_id: str) -> int:
        """Highest committed seq of an actor, -1 if none."""
        actor = self._actors.get(actor_id)
        return actor.committed_seq if actor else -1

    def expected_seq(self, actor_id: str) -> int:
        """The seq ``append`` accepts next from this actor."""
        actor = self._actors.get(actor_id)
        return actor.seq + 1 if actor else 0

    def read(self, start: int = 0, stop: int | None = None, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """Committed rows [start, stop) as a dict of arrays (``ROW_COLUMNS`` names)."""
        n = len(self)
        stop = n if stop is None else min(stop, n)
        return self._rows.read(max(0, start), stop, columns)

    def episodes(self, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """The committed episodes table (``EPISODE_COLUMNS``)."""
        return self._episodes.read(0, self._episodes.length, columns)

    # ------------------------------------------------------------ writing

    def _actor(self, actor_id: str) -> _Actor:
        actor = self._actors.get(actor_id)
        if actor is None:
            actor = self._actors[actor_id] = _Actor(code=len(self._actor_ids))
            self._actor_ids.append(actor_id)
        return actor

    def _check_writable(self) -> None:
        if self.mode != "a" or self._lock_fd is None:
            raise StoreError(f"{self.path} is open read-only (or closed); open it with mode='a' to write")

    def append(self, chunk: TransitionChunk) -> bool:
        """Stage a validated chunk. False: a duplicate (seq already accepted), skipped.

        Raises ``SeqGapError`` if earlier seqs of this actor are missing, and ``ValueError``
        if the chunk does not fit the store (shapes, int32 columns); then nothing was staged
        and the same seq can be skipped (``skip``) or appended again, corrected.
        """
        self._check_writable()
        known = self._actors.get(chunk.actor_id)
        last_seq = known.seq if known else -1
        if chunk.seq <= last_seq:
            self.duplicates += 1
            return False
        if chunk.seq != last_seq + 1:
            raise SeqGapError(chunk.actor_id, last_seq + 1, chunk.seq)
        self._check_chunk(chunk)  # everything before staging anything: a refused chunk leaves no trace
        actor = self._actor(chunk.actor_id)
        n = chunk.n
        done = (np.asarray(chunk.terminated) != 0) | (np.asarray(chunk.truncated) != 0)
        # Rows after a terminated/truncated row start the next episode at step 0.
        segment = np.zeros(n, np.int64)
        segment[1:] = np.cumsum(done[:-1])
        seg_starts = np.concatenate([[0], np.flatnonzero(done[:-1]) + 1])
        step = np.arange(n) - seg_starts[segment] + np.where(segment == 0, chunk.step, 0)
        start = self._rows.stage(
            {
                "obs": chunk.obs,
                "action": chunk.action,
                "reward": chunk.reward,
                "next_obs": chunk.next_obs,
                "terminated": chunk.terminated,
                "truncated": chunk.truncated,
                "success": chunk.success,
                "mc_return": math.nan,
                "actor": actor.code,
                "policy_version": chunk.policy_version,
                "episode_id": chunk.episode_id + segment,
                "step": step,
                "eval": chunk.eval,
            },
            n,
        )
        seg_ends = np.concatenate([seg_starts[1:], [n]])
        for k, (a, b) in enumerate(zip(seg_starts.tolist(), seg_ends.tolist())):
            last = b - 1
            # Copies in the columns' dtypes: a decoded chunk views the received frames.
            part = {
                "obs": np.array(chunk.obs[a:b], np.float32),
                "action": np.array(chunk.action[a:b], np.float32),
                "reward": np.array(chunk.reward[a:b], np.float32),
                "next_obs": np.array(chunk.next_obs[a:b], np.float32),
                "terminated": np.array(chunk.terminated[a:b], bool),
                "eval": np.full(b - a, bool(chunk.eval)),
            }
            self._track(
                actor,
                chunk,
                episode_id=chunk.episode_id + k,
                step=int(step[a]),
                rows=(start + a, start + b),
                part=part,
                ended=bool(done[last]),
                terminated=bool(chunk.terminated[last]),
                success=bool(chunk.success[last]),
            )
        actor.seq = chunk.seq
        actor.last_row_time = self.clock()
        self._dirty = True
        return True

    def _check_chunk(self, chunk: TransitionChunk) -> None:
        """ValueError unless every value of the chunk fits its column (int32 ones included)."""
        n = chunk.n
        obs_dim, action_dim = self.config.obs_dim, self.config.action_dim
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

    def skip(self, actor_id: str, seq: int) -> None:
        """Consume an actor's seqs up to ``seq`` without rows (a rejected or lost chunk),
        so that its later chunks are accepted; committed with the next commit."""
        self._check_writable()
        actor = self._actor(actor_id)
        if seq > actor.seq:
            actor.seq = seq
            self._dirty = True

    def _track(self, actor: _Actor, chunk: TransitionChunk, *, episode_id: int, step: int,
               rows: tuple[int, int], part: dict[str, np.ndarray], ended: bool, terminated: bool, success: bool) -> None:  # fmt: skip
        episode = actor.episode
        restarted = step == 0 and episode is not None and episode.next_step > 0  # e.g. an actor restart
        if episode is not None and (episode.episode_id != episode_id or restarted):
            self._close_episode(actor, ended=False, terminated=False)
            episode = None
        if episode is None:
            episode = actor.episode = _Episode(
                episode_id=episode_id,
                start_row=rows[0],
                next_step=step,
                policy_version_start=chunk.policy_version,
                policy_version_end=chunk.policy_version,
                eval=chunk.eval,
                contiguous=step == 0,
            )
        elif step != episode.next_step:
            episode.contiguous = False  # steps are missing: no MC return for this episode
        episode.ranges.append(rows)
        episode.parts.append(part)
        episode.length += rows[1] - rows[0]
        episode.end_row = rows[1] - 1
        episode.reward_sum += float(part["reward"].astype(np.float64).sum())
        episode.next_step = step + rows[1] - rows[0]
        episode.policy_version_end = chunk.policy_version
        episode.success = success
        if ended:
            self._close_episode(actor, ended=True, terminated=terminated)

    def _close_episode(self, actor: _Actor, ended: bool, terminated: bool) -> None:
        episode = actor.episode
        actor.episode = None
        if ended and episode.contiguous:
            rows = episode.rows()
            raw = episode.column("reward")
            terminals = np.zeros(len(raw), np.float32)
            terminals[-1] = float(terminated)
            cfg = self.config
            # Cal-QL's MC return-to-go (official calc_return_to_go, see mc_return.py): scaled
            # rewards, G_t = r_t + gamma * G_{t+1} * (1 - terminal_t), the all-failure rule of
            # sparse tasks and, for Kitchen, the infinite-horizon tail of truncated episodes.
            mc = trajectory_return_to_go(
                cfg.scale_rewards(raw), terminals, cfg.gamma, cfg.scaled_failure_reward, cfg.infinite_horizon
            )
            self._rows.patch("mc_return", rows, mc)
            # Kept until the commit, whose event hands these rows to the learner (``closed``).
            self._mc_filled.append((rows, mc, episode.parts))
        self._episodes.stage(
            {
                "actor": actor.code,
                "episode_id": episode.episode_id,
                "policy_version_start": episode.policy_version_start,
                "policy_version_end": episode.policy_version_end,
                "start_row": episode.start_row,
                "end_row": episode.end_row if episode.length else episode.start_row,
                "length": episode.length,
                "return": episode.reward_sum,
                "success": episode.success,
                "eval": episode.eval,
                "ended": ended,
                "terminated": terminated,
                "contiguous": episode.contiguous,
            },
            1,
        )

    def abandon_idle_episodes(self, idle_s: float, now: float | None = None) -> list[str]:
        """Close as abandoned (``ended=False``, no MC return) the open episodes of actors whose
        last row was staged more than ``idle_s`` seconds before ``now`` (default ``clock()``);
        committed with the next commit. Returns those actors' ids.

        Time while no writer had the store open does not count. An actor that comes back
        later continues in a new episode record, not contiguous (no MC return).
        """
        self._check_writable()
        now = self.clock() if now is None else now
        idle = [
            actor_id
            for actor_id, actor in self._actors.items()
            if actor.episode is not None and actor.last_row_time is not None and now - actor.last_row_time > idle_s
        ]
        for actor_id in idle:
            self._close_episode(self._actors[actor_id], ended=False, terminated=False)
        if idle:
            self._dirty = True
        return idle

    def commit(self, collect: bool = False) -> int:
        """Make everything staged durable; returns the committed row count.

        With ``collect=True``, ``last_commit`` describes what this commit added.

        If it raises (``OSError``: disk full, read-only file system, I/O error), nothing
        changed: rows, episodes and seqs staged stay staged, ``len``, ``committed_seq``,
        ``commits`` and ``last_commit`` keep their values, ``uncommitted`` stays True, and
        the previous commit stays the trusted one on disk. Call ``commit()`` again (any
        number of times, appending more in between if you like) once the disk is writable.
        """
        self._check_writable()
        if not self._dirty:
            if collect:
                self.last_commit = self._event(len(self), len(self), self._episodes.length)
            return len(self)
        old_rows, old_episodes = len(self), self._episodes.length
        event = self._event(old_rows, self._rows.end, old_episodes) if collect else None
        # Resize first, so that a failed resize leaves no write coroutine never awaited.
        self._rows.reserve()
        self._episodes.reserve()
        run_concurrently(self._rows.write_ops() + self._episodes.write_ops())
        if self.fsync:  # the data must be on disk before a record that trusts it can be
            fsync_files(self._rows.written_files() + self._episodes.written_files(), self.path)
        # The data is in place: now the record that makes it trusted. Memory changes only
        # once the record is written, so a commit that failed anywhere can be retried as is.
        now = self.clock()
        _write_json(self.path / COMMIT_FILE, self._record(self.commits + 1, now), self.fsync)
        self._rows.flushed()
        self._episodes.flushed()
        self.commits += 1
        for actor in self._actors.values():
            actor.committed_seq = actor.seq
        self._mc_filled.clear()
        self._dirty = False
        self.last_commit = event
        return len(self)

    def _event(self, start: int, stop: int, old_episodes: int) -> CommitEvent:
        if self._mc_filled:
            mc_rows = np.concatenate([r for r, _, _ in self._mc_filled])
            mc_values = np.concatenate([v for _, v, _ in self._mc_filled])
            parts = [part for _, _, episode_parts in self._mc_filled for part in episode_parts]
            closed = {name: np.concatenate([part[name] for part in parts]) for name in LEARNER_COLUMNS}
        else:
            mc_rows, mc_values = np.zeros(0, np.int64), np.zeros(0, np.float32)
            closed = {name: values[:0] for name, values in self._rows.read(0, 0, list(LEARNER_COLUMNS)).items()}
        closed["mc_return"] = mc_values
        return CommitEvent(
            start=start,
            stop=stop,
            rows=self._rows.rows_in_memory(start, stop),
            mc_rows=mc_rows,
            mc_return=mc_values,
            episodes=self._episodes.rows_in_memory(old_episodes, self._episodes.end),
            closed=closed,
        )

    def _record(self, commit: int, now: float) -> dict:
        """The commit record of everything staged (written before memory marks it committed)."""
        actors = []
        for actor_id in self._actor_ids:
            actor = self._actors[actor_id]
            episode = actor.episode.to_json() if actor.episode else None
            actors.append({"id": actor_id, "seq": actor.seq, "episode": episode, "last_row_time": actor.last_row_time})
        return {
            "format": FORMAT,
            "commit": commit,
            "time": now,
            "rows": self._rows.end,
            "episodes": self._episodes.end,
            "actors": actors,
        }

    def _resume(self, commit_time: float | None, abandon_idle_s: float | None) -> None:
        """A writer reopening: abandon the episodes of actors gone before the last commit,
        then rebuild the open ones (this reads every row from the oldest open episode on)."""
        for temp in temp_files(self.path):  # the lock is ours: no other writer is writing them
            temp.unlink(missing_ok=True)
        now = self.clock()
        if commit_time is not None:
            # Idle time counts only while a writer runs: the actors that were live when it
            # stopped continue their episodes from their spools, however long it was down.
            downtime = max(0.0, now - commit_time)
            for actor in self._actors.values():
                if actor.last_row_time is not None:
                    actor.last_row_time += downtime
            if abandon_idle_s is not None:
                self.abandon_idle_episodes(abandon_idle_s, now)
        for actor in self._actors.values():
            if actor.episode is not None and actor.last_row_time is None:
                actor.last_row_time = now  # a record without times (older o2o): count from now
        self._rebuild_open_episodes()
        if self._dirty:
            self.commit()

    def _rebuild_open_episodes(self) -> None:
        """After a reopen: find the committed rows of each open episode (their ``LEARNER_COLUMNS``
        back into memory), and clear any MC return an interrupted commit wrote for them (their
        end was never committed)."""
        open_actors = [a for a in self._actors.values() if a.episode is not None]
        if not open_actors:
            return
        first = min(a.episode.start_row for a in open_actors)
        cols = self.read(first, len(self), ["actor", "episode_id", "mc_return", *LEARNER_COLUMNS])
        for actor in open_actors:
            episode = actor.episode
            mask = (cols["actor"] == actor.code) & (cols["episode_id"] == episode.episode_id)
            mask[: episode.start_row - first] = False
            rows = np.flatnonzero(mask) + first
            bounds = np.flatnonzero(np.diff(rows) != 1) + 1
            episode.ranges = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, bounds) if len(r)]
            episode.parts = [{name: cols[name][mask] for name in LEARNER_COLUMNS}]
            rewards = episode.parts[0]["reward"]
            # From the rows themselves (records of older versions lack these).
            episode.length = len(rows)
            episode.end_row = int(rows[-1]) if len(rows) else episode.start_row
            episode.reward_sum = float(rewards.astype(np.float64).sum())
            if np.isfinite(cols["mc_return"][mask]).any():
                self._rows.patch("mc_return", rows, np.full(len(rows), np.nan, np.float32))
                self._dirty = True


def temp_files(path: Path) -> list[Path]:
    """Temporary files of interrupted writes in a store: zarr's ``*.partial`` and the commit
    record's ``.commit.json.<pid>.tmp`` (a writer killed mid-write). Nobody reads them; a writer
    reopening the store removes them, ``o2o-store check`` reports them."""
    return sorted([*path.rglob("*.partial"), *path.glob(f".{COMMIT_FILE}.*.tmp")])


def _check_zarr_for_writing() -> None:
    if not zarr_writes_atomically():
        raise StoreError(
            f"zarr {zarr.__version__} is installed, but writing a replay store needs zarr >= {ZARR_ATOMIC_WRITES}: "
            "older versions write chunks in place, so a crash during a commit can tear committed rows. "
            f"Upgrade it (pip install 'zarr>={ZARR_ATOMIC_WRITES}'); reading (mode 'r') works as is."
        )


def _construct(cls, path: Path, config: StoreConfig, mode: str, lock_fd: int | None, *args) -> "ReplayStore":
    try:
        return cls(path, config, mode, lock_fd, *args)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)  # a failed open (e.g. its repair commit) must not keep the store locked
        raise


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi


def _lock(path: Path) -> int:
    # Read-only: flock needs no write access, and an fd open for writing would keep the
    # file system from being remounted read-only (EBUSY).
    fd = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path} is open for writing by another process (one writer at a time)") from None
    return fd


def _write_json(path: Path, record: dict, fsync: bool) -> None:
    # Temp file + rename: readers see the old or the new record, never a torn one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, separators=(",", ":"))
            if fsync:  # else a power loss could leave the renamed record empty
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. disk full: leave no partial record behind
            os.unlink(tmp)
        raise
    if fsync:
        fsync_path(path.parent)  # the rename itself
