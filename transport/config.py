"""Typed settings of the actor's link to the learner and of its spool (part of ``ActorConfig``)."""

from __future__ import annotations

import dataclasses


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
