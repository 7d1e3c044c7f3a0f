"""The actor's own implementations of its seams (the contracts: transport/seams.py).

``MemorySink`` and ``FixedPolicySource`` stand in for the learner's ``Link`` in a dry run;
``PolicyBuilder`` (the ``PolicyTaker`` a ``Link`` hands received policies to) turns ONNX bytes
into sessions off the control thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from o2o.transport.seams import PolicySource, PolicyTaker, SinkStatus, TransitionSink
from o2o.transport.wire import TransitionChunk, is_newer_policy

from .onnx_policy import OnnxPolicy, PolicyMismatch

log = logging.getLogger("o2o.actor")

__all__ = ["TransitionSink", "SinkStatus", "PolicySource", "PolicyTaker", "MemorySink", "FixedPolicySource",
           "PolicyBuilder"]


class MemorySink:
    """A sink without a learner (dry runs, tests): counts chunks and rows; keeps the chunks
    themselves only if ``keep`` (memory grows without bound then). Never full, held or stopped."""

    def __init__(self, first_seq: int = 0, keep: bool = False):
        self.changed = threading.Condition()
        self._next_seq = first_seq
        self.keep = keep
        self.chunks: list[TransitionChunk] = []
        self.n_chunks = 0
        self.n_rows = 0

    def status(self) -> SinkStatus:
        return SinkStatus(self._next_seq, room=True, held=False, stop=None)

    def add(self, chunk: TransitionChunk) -> None:
        if chunk.seq != self._next_seq:
            raise ValueError(f"chunk seq {chunk.seq}, expected {self._next_seq}")
        self._next_seq += 1
        self.n_chunks += 1
        self.n_rows += chunk.n
        if self.keep:
            self.chunks.append(chunk)

    def summary(self) -> dict:
        return {"spool_depth": 0, "chunks": self.n_chunks, "rows": self.n_rows}


class FixedPolicySource:
    """One policy, never replaced (a dry run, or a learner-less deployment)."""

    def __init__(self, policy: OnnxPolicy | None):
        self.policy = policy

    def latest(self) -> OnnxPolicy | None:
        return self.policy


class PolicyBuilder:
    """Builds ``OnnxPolicy`` sessions from received bytes in a background thread.

    Only the newest submitted version is built (older pending ones are skipped;
    "newer" as ``wire.is_newer_policy``: another learner run's policy always is);
    a policy that does not fit the actor is refused with an error line and
    counted, and the previous policy stays in use. A built policy carries the
    ``run_id`` of the learner run that sent it; ``changed`` (the sink's, so a loop waiting for
    a first policy wakes at once) is notified after each one.
    """

    def __init__(self, build: Callable[[bytes, int], OnnxPolicy], initial: OnnxPolicy | None = None,
                 changed: threading.Condition | None = None):  # fmt: skip
        self._build = build
        self.changed = changed
        self._latest = initial
        self._pending: tuple[str, int, bytes, float] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.built = 0
        self.refused = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="o2o-policy-builder", daemon=True)
        self._thread.start()

    def latest(self) -> OnnxPolicy | None:
        return self._latest  # one attribute read: atomic under the GIL

    def submit(self, version: int, onnx: bytes, run_id: str = "") -> None:
        received_at = time.time()
        with self._cond:
            if self._pending is None or is_newer_policy(run_id, version, self._pending[0], self._pending[1]):
                self._pending = (run_id, version, onnx, received_at)
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                run_id, version, onnx, received_at = self._pending
                self._pending = None
            current = self._latest
            if current is not None and not is_newer_policy(run_id, version, getattr(current, "run_id", ""), current.version):
                continue
            try:
                policy = self._build(onnx, version)
            except Exception as err:  # PolicyMismatch, or anything else: the actor goes on with the old one
                self.refused += 1
                self.last_error = str(err)
                log.error("refused policy version %d: %s (keeping version %s)", version, err,
                          current.version if current else "none", exc_info=not isinstance(err, PolicyMismatch))  # fmt: skip
                continue
            policy.received_at, policy.built_at = received_at, time.time()  # for hot-swap latency figures
            policy.run_id = run_id
            self._latest = policy
            self.built += 1
            if self.changed is not None:
                with self.changed:
                    self.changed.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
