"""The learner's ingest service: actors' chunks over ZeroMQ -> the Zarr replay store.

One ZeroMQ ROUTER socket, bound by the learner, serves every actor (each a
DEALER that connects to it), in a background thread:

* ``hello`` -> ``welcome`` with the actor's committed seq (a restarted actor
  resends what it spooled above it), plus the current ``policy`` if the actor
  holds an older one. A ``next_seq`` above what the store expects declares the
  seqs in between lost (the actor no longer has them).
* ``chunk`` -> decoded and validated against the ``ChunkSpec``, appended to the
  store, group-committed (when ``commit_rows`` rows are staged, or
  ``commit_interval_s`` after the previous commit), then one cumulative ``ack``
  per actor with newly committed chunks. Duplicates (seq already accepted) are
  skipped and acked; a chunk arriving before its predecessors is dropped and
  answered with ``resend``; a malformed chunk gets a ``reject`` (its seq is
  consumed so later chunks go on) and is counted by reason with one log line.
* ``publish_policy(version, onnx)`` sends a ``policy`` message to every actor
  the server has heard from, over the same socket.

Why one ROUTER for the policy too (not PUB/SUB): the learner knows each actor's
address and what it reported, so a late or reconnecting actor gets the current
policy at ``hello`` instead of missing a PUB message sent before it
subscribed; there is one endpoint to configure and secure, and an actor that
missed a policy (a full queue drops it) can ask again with another ``hello``
(every ``ack`` and ``welcome`` names the newest version). The cost is one copy
of the policy per actor per publish, small next to the transitions.

No torch here: the learner mirrors committed rows into its own buffer through
``on_commit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import zmq

from o2o.datasets.replay_store import CommitEvent, ReplayStore, SeqGapError
from o2o.datasets.wakeup import Waker
from o2o.datasets.wire import (
    BAD_FRAMES,
    BAD_SPEC,
    BAD_TYPE,
    Ack,
    ChunkSpec,
    Policy,
    Reject,
    Resend,
    Welcome,
    WireError,
    decode_chunk,
    decode_header,
    decode_hello,
    encode,
    make_policy,
)

log = logging.getLogger("o2o.ingest")

UNKNOWN_ACTOR = "unknown"
LOG_INTERVAL_S = 1.0  # at most one rejection line per (sender, reason) per interval
RESEND_INTERVAL_S = 0.5  # repeat a resend request for the same seq at most this often


@dataclasses.dataclass
class ActorStats:
    """Counters of one actor, as seen by the ingest server."""

    rows: int = 0  # rows accepted
    chunks: int = 0  # chunks accepted
    duplicates: int = 0
    out_of_order: int = 0
    lost_seqs: int = 0  # seqs declared lost by the actor's hello
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    last_contact: float = 0.0  # time.time() of the last message
    policy_version: int = -1  # policy version of the last chunk
    committed_seq: int = -1


class IngestServer:
    """Receives actors' chunks into a ``ReplayStore`` and publishes policies.

    ``endpoint`` may use a wildcard port (``tcp://127.0.0.1:*``); ``server.endpoint``
    is the bound address after ``start()``. ``on_commit(event)`` runs in the server
    thread after each commit (keep it short: hand the event to another thread);
    exceptions it raises are logged and counted.

    Group commit: the server commits when a whole Zarr chunk of rows is staged
    (each commit rewrites the partly filled last chunk of every column, so
    committing at chunk boundaries keeps the write cost near one pass), when
    ``commit_rows`` rows are staged (if given), or ``commit_interval_s`` after the
    previous commit, whichever comes first. The interval bounds the ack latency
    at low rates; under load, larger intervals batch more rows per commit.
    """

    def __init__(
        self,
        store: ReplayStore,
        endpoint: str = "tcp://127.0.0.1:*",
        *,
        spec: ChunkSpec | None = None,
        task: str | None = None,
        on_commit: Callable[[CommitEvent], None] | None = None,
        commit_rows: int | None = None,
        commit_interval_s: float = 0.05,
        context: zmq.Context | None = None,
    ):
        self.store = store
        self.spec = spec or ChunkSpec(store.config.obs_dim, store.config.action_dim)
        self.task = task or store.config.task
        self.on_commit = on_commit
        self.commit_rows = commit_rows
        self.commit_interval_s = commit_interval_s
        self.endpoint = endpoint
        self._context = context
        self._own_context = context is None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._waker: Waker | None = None  # wakes the server thread's poll when a command is queued
        self.error: BaseException | None = None
        # Server-thread state.
        self._policy: Policy | None = None
        self._hold = False
        self._identity: dict[str, bytes] = {}  # actor_id -> latest ZeroMQ routing id
        self._actor_of: dict[bytes, str] = {}
        self._to_ack: set[str] = set()
        self._resend_sent: dict[str, tuple[int, float]] = {}
        self._last_log: dict[tuple[str, str], tuple[float, int]] = {}
        self._last_commit = 0.0
        # Stats (read by other threads through stats()).
        self._actors: dict[str, ActorStats] = {}
        self._rejected: dict[str, int] = {}
        self._counters = {"commits": 0, "send_failures": 0, "callback_errors": 0, "internal_errors": 0}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "IngestServer":
        """Bind and serve in a background thread; raises if the endpoint cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("IngestServer already started")
        if self._context is None:
            self._context = zmq.Context()
        self._thread = threading.Thread(target=self._run, name="o2o-ingest", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            self._thread.join()
            raise RuntimeError(f"ingest server could not bind {self.endpoint}: {self.error}") from self.error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is staged, ack it, close the socket; re-raises a server failure."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"ingest server thread did not stop within {timeout} s")
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None
        if self.error is not None:
            raise RuntimeError(f"ingest server failed: {self.error}") from self.error

    def __enter__(self) -> "IngestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ public API

    def publish_policy(self, version: int, onnx_bytes: bytes) -> str:
        """Make ``version`` the current policy and send it to every known actor; returns its sha256.

        Versions must increase. Actors that connect later get it with their ``welcome``.
        """
        policy = make_policy(version, bytes(onnx_bytes))
        with self._lock:
            if self._policy is not None and version <= self._policy.version:
                raise ValueError(f"policy version {version} is not above the published {self._policy.version}")
            self._policy = policy
        self._commands.put(("broadcast_policy", policy))
        self._wake()
        return policy.sha256

    def set_hold(self, hold: bool) -> None:
        """Flow control: ask every actor to pause at its next episode boundary (True) or go on (False).

        The learner's samples-per-insert limiter holds the fleet when it is too far ahead
        of the updates; actors learn it from every ack, and at once when it changes.
        """
        self._commands.put(("hold", bool(hold)))
        self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:  # not started or stopped: the commands wait for the next serve loop
            waker.wake()

    @property
    def holding(self) -> bool:
        return self._hold

    @property
    def policy_version(self) -> int:
        return self._policy.version if self._policy else -1

    def stats(self) -> dict:
        """A snapshot: committed rows, commit count, rejections by reason, per-actor counters."""
        with self._lock:
            return {
                "committed_rows": len(self.store),
                "rejected": dict(self._rejected),
                **self._counters,
                "actors": {
                    actor_id: {**dataclasses.asdict(s), "rejected": dict(s.rejected)}
                    for actor_id, s in self._actors.items()
                },
            }

    # ------------------------------------------------------------ server thread

    def _run(self) -> None:
        try:
            sock = self._context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
            sock.setsockopt(zmq.MAXMSGSIZE, self.spec.max_frame_bytes)  # a huge frame drops the peer, not us
            sock.setsockopt(zmq.LINGER, 2000)
            sock.bind(self.endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._waker = Waker(self._context, "ingest")
        except Exception as err:  # reported by start()
            self.error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(sock)
            self._commit(sock)
        except BaseException as err:
            self.error = err
            log.exception("ingest server stopped by an error")
        finally:
            sock.close()
            waker, self._waker = self._waker, None
            if waker is not None:
                waker.close()

    def _serve(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self._waker.socket in events:
                self._waker.drain()
            if sock in events:
                for _ in range(1024):  # drain a burst, but come back to commit and commands
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    with self._lock:
                        self._handle_safely(sock, frames)
                    if not self._commands.empty():  # a new policy goes out before the rest of a burst
                        self._run_commands(sock)
                    if self._commit_due():
                        self._commit(sock)
            self._run_commands(sock)
            if self._commit_due():
                self._commit(sock)

    def _commit_due(self) -> bool:
        store = self.store
        if not store.uncommitted:
            return False
        if store.staged_full_chunk or (self.commit_rows is not None and store.staged_rows >= self.commit_rows):
            return True
        return time.monotonic() - self._last_commit >= self.commit_interval_s

    def _poll_timeout_ms(self) -> int:
        if not self.store.uncommitted:
            return 50
        left = self._last_commit + self.commit_interval_s - time.monotonic()
        return max(0, math.ceil(left * 1000))

    def _run_commands(self, sock: zmq.Socket) -> None:
        while True:
            try:
                command, argument = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "broadcast_policy":
                for identity in list(self._identity.values()):
                    self._send(sock, identity, encode(argument))
            elif command == "hold" and argument != self._hold:
                self._hold = argument
                for actor_id, identity in list(self._identity.items()):
                    ack = Ack(actor_id, self.store.committed_seq(actor_id), self.policy_version, self._hold)
                    self._send(sock, identity, encode(ack))

    def _commit(self, sock: zmq.Socket) -> None:
        if not self.store.uncommitted:
            return
        with self._lock:
            self.store.commit(collect=self.on_commit is not None)
            self._last_commit = time.monotonic()
            self._counters["commits"] += 1
            version = self.policy_version
            for actor_id in self._to_ack:
                seq = self.store.committed_seq(actor_id)
                self._actors[actor_id].committed_seq = seq
                self._send(sock, self._identity[actor_id], encode(Ack(actor_id, seq, version, self._hold)))
            self._to_ack.clear()
        if self.on_commit is not None:
            try:
                self.on_commit(self.store.last_commit)
            except Exception:
                self._counters["callback_errors"] += 1
                log.exception("on_commit callback failed (the commit itself is durable)")

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as err:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN)
            self._counters["send_failures"] += 1
            log.debug("send to %r failed: %s", identity, err)

    # ------------------------------------------------------------ message handling

    def _handle_safely(self, sock: zmq.Socket, frames: list) -> None:
        try:
            self._handle(sock, frames)
        except Exception:  # a bug must not take the service down; it is loud in the log
            self._counters["internal_errors"] += 1
            log.exception("unexpected error while handling a message")

    def _handle(self, sock: zmq.Socket, frames: list) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        try:
            if not body:
                raise WireError(BAD_FRAMES, "message without a header frame")
            header = decode_header(body[0])
        except WireError as err:
            self._reject(sock, identity, self._actor_of.get(identity), -1, err)
            return
        kind = header["type"]
        if kind == "chunk":
            self._on_chunk(sock, identity, body, header)
        elif kind == "hello":
            self._on_hello(sock, identity, body, header)
        else:
            err = WireError(BAD_TYPE, f"actors send 'chunk' or 'hello' messages, not {kind!r}")
            self._reject(sock, identity, self._actor_of.get(identity), -1, err)

    def _touch(self, actor_id: str, identity: bytes) -> ActorStats:
        stats = self._actors.get(actor_id)
        if stats is None:
            stats = self._actors[actor_id] = ActorStats(committed_seq=self.store.committed_seq(actor_id))
        old = self._identity.get(actor_id)
        if old != identity:
            if old is not None:
                log.info("actor %s reconnected from a new socket", actor_id)
                self._actor_of.pop(old, None)
            self._identity[actor_id] = identity
            self._actor_of[identity] = actor_id
        stats.last_contact = time.time()
        return stats

    def _on_chunk(self, sock: zmq.Socket, identity: bytes, body: list, header: dict) -> None:
        try:
            chunk = decode_chunk(body, self.spec, header)
        except WireError as err:
            if err.actor_id is None:
                self._reject(sock, identity, self._actor_of.get(identity), -1, err)
                return
            self._touch(err.actor_id, identity)
            expected = self.store.expected_seq(err.actor_id)
            if err.seq < expected:
                self._duplicate(sock, err.actor_id)
            elif err.seq > expected:
                self._out_of_order(sock, err.actor_id, expected)
            else:
                self.store.skip(err.actor_id, err.seq)  # so the actor's next chunks are accepted
                self._to_ack.add(err.actor_id)
                self._reject(sock, identity, err.actor_id, err.seq, err)
            return
        stats = self._touch(chunk.actor_id, identity)
        stats.policy_version = chunk.policy_version
        try:
            accepted = self.store.append(chunk)
        except SeqGapError as gap:
            self._out_of_order(sock, chunk.actor_id, gap.expected)
            return
        if accepted:
            stats.rows += chunk.n
            stats.chunks += 1
            self._to_ack.add(chunk.actor_id)
        else:
            self._duplicate(sock, chunk.actor_id)

    def _duplicate(self, sock: zmq.Socket, actor_id: str) -> None:
        self._actors[actor_id].duplicates += 1
        if self.store.uncommitted:
            self._to_ack.add(actor_id)  # acked after the next commit
        else:
            seq = self.store.committed_seq(actor_id)
            self._send(sock, self._identity[actor_id], encode(Ack(actor_id, seq, self.policy_version, self._hold)))

    def _out_of_order(self, sock: zmq.Socket, actor_id: str, expected: int) -> None:
        self._actors[actor_id].out_of_order += 1
        now = time.monotonic()
        last = self._resend_sent.get(actor_id)
        if last is None or last[0] != expected or now - last[1] >= RESEND_INTERVAL_S:
            self._resend_sent[actor_id] = (expected, now)
            self._send(sock, self._identity[actor_id], encode(Resend(actor_id, expected)))

    def _on_hello(self, sock: zmq.Socket, identity: bytes, body: list, header: dict) -> None:
        try:
            hello = decode_hello(body, header)
            wrong = []
            if self.task is not None and hello.task != self.task:
                wrong.append(f"task {hello.task!r} (learner: {self.task!r})")
            if (hello.obs_dim, hello.action_dim) != (self.spec.obs_dim, self.spec.action_dim):
                wrong.append(
                    f"obs_dim={hello.obs_dim}, action_dim={hello.action_dim} "
                    f"(learner: {self.spec.obs_dim}, {self.spec.action_dim})"
                )
            if wrong:
                raise WireError(BAD_SPEC, "actor does not match the learner: " + "; ".join(wrong), hello.actor_id)
        except WireError as err:
            self._reject(sock, identity, err.actor_id or self._actor_of.get(identity), -1, err)
            return
        stats = self._touch(hello.actor_id, identity)
        expected = self.store.expected_seq(hello.actor_id)
        if hello.next_seq > expected:
            stats.lost_seqs += hello.next_seq - expected
            log.warning(
                "actor %s resumes at seq %d; seqs %d..%d never arrived and are counted as lost",
                hello.actor_id, hello.next_seq, expected, hello.next_seq - 1,
            )  # fmt: skip
            self.store.skip(hello.actor_id, hello.next_seq - 1)
            self._to_ack.add(hello.actor_id)
        actor_id = hello.actor_id
        welcome = Welcome(
            actor_id, self.store.committed_seq(actor_id), self.policy_version,
            self.store.expected_seq(actor_id) - 1, self._hold,
        )  # fmt: skip
        self._send(sock, identity, encode(welcome))
        if self._policy is not None and hello.policy_version < self._policy.version:
            self._send(sock, identity, encode(self._policy))

    def _reject(self, sock: zmq.Socket, identity: bytes, actor_id: str | None, seq: int, err: WireError) -> None:
        self._rejected[err.reason] = self._rejected.get(err.reason, 0) + 1
        if actor_id is not None and actor_id in self._actors:
            rejected = self._actors[actor_id].rejected
            rejected[err.reason] = rejected.get(err.reason, 0) + 1
        who = actor_id or f"socket {identity.hex()}"
        self._log_rejection(who, err, seq)
        self._send(sock, identity, encode(Reject(actor_id or UNKNOWN_ACTOR, seq, err.reason, err.message[:1000])))

    def _log_rejection(self, who: str, err: WireError, seq: int) -> None:
        key = (who, err.reason)
        now = time.monotonic()
        last, suppressed = self._last_log.get(key, (-math.inf, 0))
        if now - last < LOG_INTERVAL_S:
            self._last_log[key] = (last, suppressed + 1)
            return
        more = f" (+{suppressed} more like it)" if suppressed else ""
        log.warning("rejected a message from actor %s (seq %d): %s: %s%s", who, seq, err.reason, err.message, more)
        self._last_log[key] = (now, 0)
