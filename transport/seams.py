"""The actor's seams, in one place (as small as Acme's): a sink for transitions and a source of policies.

The control loop (actor/loop.py) never sees a socket. ``transport.link.Link`` implements both seams
over ZeroMQ and hands received policies to a ``PolicyTaker``; a dry run uses actor/seams.py's
``MemorySink`` and ``FixedPolicySource``, and the actor's ``PolicyBuilder`` is its ``PolicyTaker``.
The contracts live here, not in actor/, because transport may not import the actor (the
dependency direction: actor -> transport).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Protocol

from .wire import TransitionChunk


class SinkStatus(NamedTuple):
    """What an actor's transition sink tells its control loop."""

    next_seq: int
    """The seq the next chunk must carry."""
    room: bool
    """One more chunk can be taken without dropping anything (the spool is not full)."""
    held: bool
    """Flow control: the learner is ahead of its updates, begin no new episode."""
    stop: str | None
    """Why the loop must stop now (the learner refused this actor, the spool's disk failed...), else None."""


class TransitionSink(Protocol):
    """Where the loop's chunks go: the learner's ``Link``, or ``MemorySink`` in a dry run."""

    changed: threading.Condition
    """Notified whenever ``status()``, or the policy source paired with this sink, may have
    changed: the loop waits on it instead of polling. Any thread may notify it, and so may a
    signal handler on the waiting thread: ``threading.Condition()``'s lock is reentrant."""

    def status(self) -> SinkStatus:
        """What the loop may do now: the next chunk's seq, room for it, a hold, or why to stop."""

    def add(self, chunk: TransitionChunk) -> None:
        """Take a chunk (``chunk.seq == status().next_seq``); never blocks on the network."""

    def summary(self) -> dict:
        """Counters for progress lines (e.g. ``spool_depth``, ``learner_lost``)."""


class PolicySource(Protocol):
    def latest(self) -> Any:
        """The newest policy ready to act (an ``actor.onnx_policy.OnnxPolicy``, with ``.version``),
        None before the first; never blocks."""


class PolicyTaker(PolicySource, Protocol):
    """Where a ``Link`` puts received policies (the actor's ``PolicyBuilder``): built off the link thread."""

    built: int
    refused: int

    def submit(self, version: int, onnx: bytes, run_id: str = "") -> None:
        """A received policy; only the newest pending one is built."""

    def close(self) -> None: ...
