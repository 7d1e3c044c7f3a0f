"""Typed settings of the transport: the actor's link to the learner and its spool (part of
``ActorConfig``), and the learner's ingest server (part of ``OnlineConfig``)."""

from __future__ import annotations

import dataclasses

from o2o.datasets.store_format import DEFAULT_ABANDON_IDLE_S


@dataclasses.dataclass
class SpoolConfig:
    dir: str | None = ".o2o-spool"
    """Folder of the spool, one subfolder per actor_id: every chunk is written there as it is
    made (to the OS page cache, no fsync), so unacked chunks survive the actor process being
    killed or crashing (not a power loss); a restarted actor resends what was never acked.
    null = memory only, by the user's explicit choice: an actor crash then loses every unacked chunk."""
    memory_chunks: int = 256
    """Unacked chunks whose frames are also cached in memory (the oldest), so sends and resends
    need no disk read; with dir=null, the spool's whole capacity."""
    max_disk_mb: float = 1024.0
    """Disk cap of the spool, in MiB: it bounds all unacked chunks (each one is on disk)."""
    segment_mb: float = 16.0
    """Size of one spool file, in MiB (a file is deleted once all its chunks are acked; the one
    being written is reused)."""
    on_full: str = "pause"
    """When the spool is full (max_disk_mb, or memory_chunks with dir=null: the learner has acked
    nothing for long): "pause" (stop stepping the env, the robot holds, resume when acks arrive)
    or "stop" (end safely)."""


@dataclasses.dataclass
class LinkConfig:
    heartbeat_s: float = 1.0
    """Say hello to the learner after this long without hearing from it."""
    timeout_s: float = 5.0
    """The learner counts as lost after this long without a message; the link reconnects."""
    on_learner_lost: str = "continue"
    """While the learner is lost: "continue" (act with the last policy; chunks wait in the
    spool) or "stop" (end safely)."""
    connect_timeout_s: float = 0.0
    """At start-up, give up if the learner has not answered within this many seconds (0 = wait forever)."""
    max_in_flight: int = 64
    """Chunks sent but not yet acked, at most (flow control; the rest wait in the spool)."""
    drain_s: float = 5.0
    """At exit, wait up to this long for the learner to ack what is spooled, reconnecting if it
    is lost (a learner restart); what is left stays in the spool on disk for the next run."""
    id_in_use_timeout_s: float = 30.0
    """If the learner keeps refusing this actor's hello for this long (another live actor process
    holds the same actor_id, or the learner serves its maximum number of actors), stop with an
    error (exit status 3). The hello is retried every heartbeat_s until then; 0 = retry forever."""
    status_s: float = 1.0
    """Send the actor's status (state, steps/s, episodes, ...: what o2o-status shows) to the learner this
    often while welcomed; 0 = never."""


@dataclasses.dataclass
class IngestConfig:
    """The learner's ingest server (``IngestServer``) and how it writes the replay store
    (part of ``OnlineConfig`` as ``ingest``)."""

    commit_interval_s: float = 0.05
    """Group commit: commit (then ack) staged rows at most this long after the previous commit, or at
    each full Zarr chunk; at most 1 s. Longer means fewer commits but later acks: with one fast actor
    0.2 and 0.5 measured slower than 0.05 (BENCHMARKS.md, "Reliability cost")."""
    commit_rows: int | None = None
    """Also commit once this many rows are staged (None: at each full Zarr chunk and each interval only)."""
    fsync: bool = True
    """fsync each commit's files before its commit record (survives power loss; BENCHMARKS.md has the
    cost). false = survive process crashes only."""
    commit_retry_s: float = 60.0
    """When the replay store cannot be written (disk full, read-only), retry with back-off for this
    long (the actors keep their chunks spooled), then stop with an error."""
    abandon_idle_s: float | None = DEFAULT_ABANDON_IDLE_S
    """Close as abandoned (no MC return, not trained on) the open episode of an actor silent this long
    (also when the store is reopened). None = never."""
    max_rows_per_s: float | None = 50_000.0
    """Per-actor ingest rate limit; chunks past it wait in the actor's spool. None = no limit."""
    rate_burst_s: float = 2.0
    """The rate limit allows bursts of this many seconds' worth of rows."""
    actor_live_s: float = 10.0
    """A second process with a live actor's actor_id is refused until the first has been silent this long."""
    max_actors: int = 4096
    """Actors served at most (the longest-silent, not live, are forgotten to make room)."""
    max_queued_messages: int = 10000
    """Unread messages queued at most; past it ZeroMQ stops reading from the actors (TCP backpressure)."""


def check_commit_interval(seconds: float) -> None:
    """Refuse a group-commit interval outside (0, 1] s: acks later than ~1 s crowd the actors' 5 s link timeout."""
    if not 0 < seconds <= 1.0:
        raise ValueError(f"commit_interval_s must be in (0, 1] seconds, not {seconds}")
