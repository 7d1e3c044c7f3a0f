"""The online replay store: actors' transitions in Zarr, exactly once, crash-safe.

Layout of a store folder::

    zarr.json        root group; attrs["o2o_replay"] = static metadata (dims, data settings, ...)
    data/<column>    one row per transition, append-only (see ROW_COLUMNS)
    episodes/<col>   one row per closed episode (see EPISODE_COLUMNS)
    frames/<camera>  stores made for an ObsSpec with cameras: each frame once, rows point at
                     them (data/obs_frame, data/next_frame; see ``store_frames``)
    commit.json      the commit record: trusted row / episode (/ frame) counts, actor table,
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
fsyncs every file it wrote (the chunks it rewrote, resized arrays' ``zarr.json``), their
folders, and the folders above that gained a folder (``fsync_files``); it fsyncs the new
record before the rename and the store folder after it. So an OS crash or power loss
also leaves the last commit that returned, complete.
``ReplayStore.create/open(..., fsync=False)`` (or setting ``store.fsync``) skips that
for speed (benchmarks/store_fsync.py measures it): then only a process crash is
survived, and an OS crash may lose recent commits or tear them.

A commit may run in another thread while more chunks are appended (the ingest server
does, so that receiving never waits for a commit's writes and fsyncs): ``begin_commit``
takes what is staged now (``PendingCommit``), its ``run`` writes it in any thread, and
``finish_commit`` (or ``abort_commit`` if it raised) applies the outcome; ``commit`` is
the three in a row. Chunks appended meanwhile go into the next commit.

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

Rewards and MC returns: the ``reward`` column holds the RAW env reward; ``mc_return``
holds the Cal-QL MC return-to-go of each ended episode (NaN until then), see
``store_episodes``.

Rows for the learner: a commit event (``commit(collect=True)``, ``last_commit``) carries
``closed``, the rows of every episode that this commit closed with an MC return, with the
columns the learner trains on (``LEARNER_COLUMNS`` + ``mc_return``), and no copy of the
other new rows (read them from the store). The open episodes keep
those columns in memory until they close (bounded by the open episodes: one per actor, and
idle ones are abandoned, see below), so the learner needs no copy of rows still waiting for
their episode's end; a reopening writer reads the open episodes' rows back.

Idle actors: ``abandon_idle_episodes`` and ``open(path, "a", abandon_idle_s=...)`` close the
open episodes of actors that staged no row for a while, as abandoned (``store_idle``).

Split by concern: ``store_format`` (files, columns, settings, events), ``store_episodes``
(episode tracking and MC returns), ``store_idle`` (idle actors), ``store_frames`` (camera
frames), ``zarr_table`` (the columns); this module holds the store itself and its commit protocol.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from o2o.envs.obs_spec import ObsSpec

from .data_settings import DataSettings
from .rows import TransitionChunk
from .store_frames import DEFAULT_FRAME_COMPRESSOR, camera_chunks, expand_columns, gather
from .store_episodes import Actor, Episode, EpisodeTracker
from .store_format import (  # noqa: F401  (re-exported: the store's public names)
    CAMERA_FORMAT_VERSION,
    COMMIT_FILE,
    DEFAULT_ABANDON_IDLE_S,
    EPISODE_CHUNK_ROWS,
    EPISODE_COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    LATER_ATTRS,
    LATER_COLUMNS,
    LEARNER_COLUMNS,
    LOCK_FILE,
    TARGET_CHUNK_BYTES,
    PendingCommit,
    add_later_columns,
    check_chunk,
    lock_store,
    make_store_folder,
    open_frames,
    check_zarr_for_writing,
    CommitEvent,
    SeqGapError,
    StoreConfig,
    StoreError,
    row_columns,
    temp_files,
)
from .store_idle import discount_downtime, idle_actors, start_unknown_clocks
from .zarr_table import DEFAULT_COMPRESSOR, AppendTable


class ReplayStore:
    """Append-only Zarr replay store shared by a writer (the learner) and readers.

    Create with ``ReplayStore.create``, open with ``ReplayStore.open(path, "r" | "a")``.
    Writer API: ``append`` (stage a chunk) and ``commit`` (make staged rows durable), or
    ``begin_commit`` / ``PendingCommit.run`` / ``finish_commit`` to commit in another thread.
    Reader API: ``len``, ``read``, ``episodes``, ``committed_seq``, ``refresh``.
    ``clock`` (default ``time.time``) gives the wall times of staged rows and commits;
    ``fsync`` (default True) whether a commit is made durable against OS crashes too.
    """

    def __init__(self, path: Path, config: StoreConfig, mode: Literal["r", "a"], lock_fd: int | None,
                 abandon_idle_s: float | None = None, fsync: bool = True):  # fmt: skip
        self.path = path
        self.clock = time.time  # wall clock of row and commit times; tests set their own
        self.fsync = fsync
        self._durable_folders: set[Path] = set()  # see fsync_files: folders whose entries commits synced
        self.config = config
        self.mode = mode
        self._lock_fd = lock_fd
        self._group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        self._actors: dict[str, Actor] = {}
        self._actor_ids: list[str] = []
        self.commits = 0
        self.duplicates = 0
        self.last_commit: CommitEvent | None = None
        record = self._read_record()
        if mode == "a":  # a store made before a column existed (interventions) gets it, reading 0 in older rows
            add_later_columns(self._group, config, fsync)
        self._rows = AppendTable(
            self._group["data"], row_columns(config.obs_dim, config.action_dim, config.obs_spec), config.chunk_rows,
            record["rows"], writable=mode == "a", mutable=("mc_return",), late=LATER_COLUMNS,
        )  # fmt: skip
        self._episodes = AppendTable(
            self._group["episodes"], EPISODE_COLUMNS, EPISODE_CHUNK_ROWS, record["episodes"], writable=mode == "a"
        )
        self._frames = open_frames(self._group, config, record, mode == "a")  # None for a state store
        self._load_record(record)
        self._tracker = EpisodeTracker(config, self._rows, self._episodes, self._frames)
        self._dirty = False
        self._pending: PendingCommit | None = None
        if mode == "a":
            self._resume(record.get("time"), abandon_idle_s)

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        obs_dim: int | ObsSpec,
        action_dim: int,
        *,
        data: DataSettings | None = None,
        failure_reward: float | None = None,
        task: str | None = None,
        chunk_rows: int = 0,
        compressor=DEFAULT_COMPRESSOR,
        frame_compressor=DEFAULT_FRAME_COMPRESSOR,
        frame_chunk: int = 0,
        overwrite: bool = False,
        fsync: bool = True,
    ) -> "ReplayStore":
        """A new, empty store opened for appending.

        ``obs_dim``: the size of the observation's state vector, or its ``ObsSpec`` (a spec with
        cameras makes a camera store: frames columns compressed with ``frame_compressor``, chunks of
        ``frame_chunk`` frames, 0: ~1 MiB; see ``store_frames``).

        ``failure_reward`` is the RAW failure reward of a sparse task (``TaskSpec.reward_neg``),
        None for dense tasks; see the module docstring for the reward convention.
        ``data``: the data settings its MC returns are computed with, as ``load_transitions(...,
        data)`` computes a dataset's (None: ``DataSettings()``'s defaults).
        ``fsync``: make each commit durable against OS crashes and power loss (see the module
        docstring); it is a setting of this writer, not of the store.
        """
        check_zarr_for_writing()
        spec = obs_dim if isinstance(obs_dim, ObsSpec) else ObsSpec(int(obs_dim))
        obs_dim = spec.state_dim
        path = Path(path)
        if spec.has_images:  # checks the camera names too
            chunk_rows, frame_chunk = camera_chunks(spec, chunk_rows, frame_chunk)
        elif chunk_rows <= 0:
            chunk_rows = 2 ** round(math.log2(TARGET_CHUNK_BYTES / (4 * obs_dim)))
            chunk_rows = min(max(chunk_rows, 1024), 262144)
        config = StoreConfig(obs_dim, action_dim, (data or DataSettings()).normalized(),
                             None if failure_reward is None else float(failure_reward), task, chunk_rows,
                             spec.cameras, frame_chunk if spec.has_images else 0)  # fmt: skip
        lock_fd = make_store_folder(path, config, compressor, frame_compressor, overwrite, fsync)
        return _construct(cls, path, config, "a", lock_fd, None, fsync)

    @classmethod
    def create_for_task(cls, path: str | os.PathLike, task: str, **kwargs) -> "ReplayStore":
        """A store with the observation spec (state size, cameras), action size and failure reward of
        an o2o task (makes the env once); ``kwargs`` go to ``create`` (``data``, ``fsync``, ...)."""
        from o2o.envs.tasks import get_task, task_spaces

        spec = get_task(task)
        obs_space, action_space = task_spaces(spec)  # its env's, or a real-world task's dataset's
        obs_spec, action_dim = ObsSpec.from_space(obs_space), action_space.shape[0]
        failure = spec.reward_neg if spec.reward == "sparse" else None
        return cls.create(path, obs_spec, action_dim, failure_reward=failure, task=spec.name, **kwargs)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: Literal["r", "a"] = "r",
        *,
        abandon_idle_s: float | None = DEFAULT_ABANDON_IDLE_S,
        fsync: bool = True,
        obs_spec: ObsSpec | None = None,
    ) -> "ReplayStore":
        """Open a store: ``"r"`` to read (any number of processes, also while it is written),
        ``"a"`` to keep appending (one writer; open episodes are rebuilt from the rows).
        ``obs_spec``: refuse (``StoreError``) a store made for other observations.

        ``abandon_idle_s`` (mode ``"a"``): first abandon the open episodes of actors that had
        staged no row for longer than this when the last commit was made (None: keep them all).
        ``fsync`` (mode ``"a"``): make each commit durable against OS crashes (module docstring)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if mode == "a":
            check_zarr_for_writing()
        if not (path / COMMIT_FILE).exists():
            raise StoreError(f"{path} is not an o2o replay store (no {COMMIT_FILE}; was its creation interrupted?)")
        attrs = zarr.open_group(str(path), mode="r").attrs.get("o2o_replay")
        if not attrs or attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not an o2o replay store (no o2o_replay attributes)")
        if attrs["version"] not in (FORMAT_VERSION, CAMERA_FORMAT_VERSION):
            raise StoreError(f"{path} has store format version {attrs['version']}; this code reads "
                             f"{FORMAT_VERSION} and {CAMERA_FORMAT_VERSION}")  # fmt: skip
        config = StoreConfig.from_attrs(attrs)  # also a store's made by older code (old names, fewer attributes)
        if obs_spec is not None and obs_spec != config.obs_spec:
            raise StoreError(f"{path} holds observations {config.obs_spec.to_dict()}, not {obs_spec.to_dict()}")
        lock_fd = lock_store(path) if mode == "a" else None
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
            episode = Episode.from_json(state["episode"]) if state["episode"] else None
            # Records written before idle tracking lack "last_row_time": unknown.
            self._actors[state["id"]] = Actor(code, state["seq"], state["seq"], episode, state.get("last_row_time"))

    def refresh(self) -> int:
        """Readers: pick up the writer's latest commit; returns the committed row count."""
        if self.mode != "r":
            return len(self)
        record = self._read_record()
        self._rows.length = self._rows.end = record["rows"]
        self._episodes.length = self._episodes.end = record["episodes"]
        if self._frames is not None:
            self._frames.table.length = self._frames.table.end = record["frames"]
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
    def obs_spec(self) -> ObsSpec:
        """The observation's state size and cameras (recorded in the store's metadata)."""
        return self.config.obs_spec

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
        """True when something staged is not committed yet (rows, skipped seqs, repairs): ``commit``
        has something to write, or a commit of it is pending."""
        return self._dirty or self._pending is not None

    @property
    def commit_pending(self) -> bool:
        """True between ``begin_commit`` and ``finish_commit`` / ``abort_commit``."""
        return self._pending is not None

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

    def read(self, start: int = 0, stop: int | None = None, columns: list[str] | None = None,
             where: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Committed rows [start, stop) as a dict of arrays (``row_columns`` names; None: all).

        A camera store's dict (all columns, or any camera key asked for) adds ``frames/<camera>``:
        the frames these rows use, each once, with ``obs_frame`` / ``next_frame`` relative to them.
        ``where(rows)``: a mask of the rows to keep (given the columns read), applied before their
        frames are read."""
        n = len(self)
        stop = n if stop is None else min(stop, n)
        names = list(self._rows.specs) if columns is None else expand_columns(columns, self.obs_spec)
        frames = self._frames is not None and "obs_frame" in names
        rows = self._rows.read(max(0, start), stop, [c for c in names if not (frames and c in self._frames.frame_keys)])
        if where is not None:
            keep = where(rows)
            rows = {name: values[keep] for name, values in rows.items()}
        return gather(rows, self._frames.take) if frames else rows

    def episodes(self, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """The committed episodes table (``EPISODE_COLUMNS``)."""
        return self._episodes.read(0, self._episodes.length, columns)

    # ------------------------------------------------------------ writing

    def _actor(self, actor_id: str) -> Actor:
        actor = self._actors.get(actor_id)
        if actor is None:
            actor = self._actors[actor_id] = Actor(code=len(self._actor_ids))
            self._actor_ids.append(actor_id)
        return actor

    def _check_writable(self) -> None:
        if self.mode != "a" or self._lock_fd is None:
            raise StoreError(f"{self.path} is open read-only (or closed); open it with mode='a' to write")

    def append(self, chunk: TransitionChunk) -> bool:
        """Stage a validated chunk. False: a duplicate (seq already accepted), skipped.

        Raises ``SeqGapError`` if earlier seqs of this actor are missing, and ``ValueError``
        if the chunk does not fit the store (shapes, int32 columns, its frames vs the store's
        cameras); then nothing was staged and the same seq can be skipped (``skip``) or appended
        again, corrected. A camera store keeps each frame once (``store_frames``).
        """
        self._check_writable()
        known = self._actors.get(chunk.actor_id)
        last_seq = known.seq if known else -1
        if chunk.seq <= last_seq:
            self.duplicates += 1
            return False
        if chunk.seq != last_seq + 1:
            raise SeqGapError(chunk.actor_id, last_seq + 1, chunk.seq)
        check_chunk(chunk, self.config)  # everything before staging anything: a refused chunk leaves no trace
        actor = self._actor(chunk.actor_id)
        n = chunk.n
        done = (np.asarray(chunk.terminated) != 0) | (np.asarray(chunk.truncated) != 0)
        # Rows after a terminated/truncated row start the next episode at step 0.
        segment = np.zeros(n, np.int64)
        segment[1:] = np.cumsum(done[:-1])
        seg_starts = np.concatenate([[0], np.flatnonzero(done[:-1]) + 1])
        step = np.arange(n) - seg_starts[segment] + np.where(segment == 0, chunk.step, 0)
        frames = indices = None
        if self._frames is not None:  # frames first: the rows point at them
            frames = self._frames.stage(actor.code, chunk, actor.episode)
            indices = {"obs_frame": frames.obs_frame, "next_frame": frames.next_frame}
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
                "intervention": 0 if chunk.intervention is None else chunk.intervention,
                **(indices or {}),
            },
            n,
        )
        self._tracker.add(actor, chunk, start, step, done, seg_starts, frames)
        actor.seq = chunk.seq
        actor.last_row_time = self.clock()
        self._dirty = True
        return True

    def skip(self, actor_id: str, seq: int) -> None:
        """Consume an actor's seqs up to ``seq`` without rows (a rejected or lost chunk),
        so that its later chunks are accepted; committed with the next commit."""
        self._check_writable()
        actor = self._actor(actor_id)
        if seq > actor.seq:
            actor.seq = seq
            self._dirty = True

    def abandon_idle_episodes(self, idle_s: float, now: float | None = None) -> list[str]:
        """Close as abandoned (``ended=False``, no MC return) the open episodes of actors whose
        last row was staged more than ``idle_s`` seconds before ``now`` (default ``clock()``);
        committed with the next commit. Returns those actors' ids.

        Time while no writer had the store open does not count. An actor that comes back
        later continues in a new episode record, not contiguous (no MC return).
        """
        self._check_writable()
        now = self.clock() if now is None else now
        idle = idle_actors(self._actors, idle_s, now)
        for actor_id in idle:
            self._tracker.close(self._actors[actor_id], ended=False, terminated=False)
        if idle:
            self._dirty = True
        return idle

    # ------------------------------------------------------------ commit protocol

    def commit(self, collect: bool = False) -> int:
        """Make everything staged durable; returns the committed row count.

        With ``collect=True``, ``last_commit`` describes what this commit added.

        If it raises (``OSError``: disk full, read-only file system, I/O error), nothing
        changed: rows, episodes and seqs staged stay staged, ``len``, ``committed_seq``,
        ``commits`` and ``last_commit`` keep their values, ``uncommitted`` stays True, and
        the previous commit stays the trusted one on disk. Call ``commit()`` again (any
        number of times, appending more in between if you like) once the disk is writable.
        """
        pending = self.begin_commit(collect)
        if pending is None:
            if collect:
                self.last_commit = CommitEvent(len(self), len(self), self._episodes.rows_in_memory(
                    self._episodes.length, self._episodes.length), self._tracker.closed_rows([]))  # fmt: skip
            return len(self)
        try:
            pending.run()
        except BaseException:
            self.abort_commit(pending)
            raise
        self.finish_commit(pending)
        return len(self)

    def begin_commit(self, collect: bool = False) -> PendingCommit | None:
        """Take everything staged as a ``PendingCommit`` (None: nothing to commit). Until
        ``finish_commit`` or ``abort_commit``, appends go on and go into the next commit."""
        self._check_writable()
        if self._pending is not None:
            raise StoreError("a commit is pending: finish_commit() or abort_commit() it first")
        if not self._dirty:
            return None
        old_episodes = self._episodes.length
        # The record describes what is staged now; memory marks it committed only once it is written.
        now = self.clock()
        pending = PendingCommit(
            path=self.path,
            fsync=self.fsync,
            rows=self._rows.snapshot(),
            episodes=self._episodes.snapshot(),
            frames=self._frames.table.snapshot() if self._frames is not None else None,
            record=self._record(self.commits + 1, now),
            seqs={actor_id: actor.seq for actor_id, actor in self._actors.items()},
            closed=self._tracker.take_closed(),
            event_episodes=self._episodes.rows_in_memory(old_episodes, self._episodes.end) if collect else None,
            start=len(self),
            interventions=self._rows.staged_sum("intervention"),
            durable_folders=self._durable_folders,
        )  # fmt: skip
        self._pending = pending
        self._dirty = False  # an append, skip or close from now on sets it again
        return pending

    def finish_commit(self, pending: PendingCommit) -> None:
        """``pending.run()`` returned: its rows, episodes and seqs are committed."""
        self._rows.flushed(pending.rows)
        self._episodes.flushed(pending.episodes)
        if pending.frames is not None:
            self._frames.table.flushed(pending.frames)
        self.commits += 1
        for actor_id, seq in pending.seqs.items():
            self._actors[actor_id].committed_seq = seq
        if pending.event_episodes is not None:
            self.last_commit = CommitEvent(pending.start, len(self), pending.event_episodes,
                                           self._tracker.closed_rows(pending.closed), pending.interventions)  # fmt: skip
        self._pending = None

    def abort_commit(self, pending: PendingCommit) -> None:
        """``pending.run()`` raised: everything it held stays staged, for the next commit."""
        self._rows.abandoned(pending.rows)
        self._episodes.abandoned(pending.episodes)
        if pending.frames is not None:
            self._frames.table.abandoned(pending.frames)
        self._tracker.put_back(pending.closed)
        self._dirty = True
        self._pending = None

    def _record(self, commit: int, now: float) -> dict:
        """The commit record of everything staged (written before memory marks it committed)."""
        actors = []
        for actor_id in self._actor_ids:
            actor = self._actors[actor_id]
            episode = actor.episode.to_json() if actor.episode else None
            actors.append({"id": actor_id, "seq": actor.seq, "episode": episode, "last_row_time": actor.last_row_time})
        record = {
            "format": FORMAT,
            "commit": commit,
            "time": now,
            "rows": self._rows.end,
            "episodes": self._episodes.end,
            "actors": actors,
        }
        if self._frames is not None:  # the frames' count is trusted like the rows'
            record["frames"] = self._frames.table.end
        return record

    def _resume(self, commit_time: float | None, abandon_idle_s: float | None) -> None:
        """A writer reopening: abandon the episodes of actors gone before the last commit,
        then rebuild the open ones (this reads every row from the oldest open episode on)."""
        for temp in temp_files(self.path):  # the lock is ours: no other writer is writing them
            temp.unlink(missing_ok=True)
        now = self.clock()
        if commit_time is not None:
            discount_downtime(self._actors, commit_time, now)
            if abandon_idle_s is not None:
                self.abandon_idle_episodes(abandon_idle_s, now)
        start_unknown_clocks(self._actors, now)
        # A camera store's raw rows (global frame indices): the tracker reads the open episodes' frames.
        read = self.read if self._frames is None else self._rows.read
        if self._tracker.rebuild(list(self._actors.values()), len(self), read):
            self._dirty = True
        if self._dirty:
            self.commit()


def _construct(cls, path: Path, config: StoreConfig, mode: str, lock_fd: int | None, *args) -> "ReplayStore":
    try:
        return cls(path, config, mode, lock_fd, *args)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)  # a failed open (e.g. its repair commit) must not keep the store locked
        raise
