"""The learner's ingest service: actors' chunks over ZeroMQ -> the Zarr replay store.

One ZeroMQ ROUTER socket, bound by the learner, serves every actor (each a
DEALER that connects to it), in a background thread:

* ``hello`` -> ``welcome`` with the actor's committed seq (a restarted actor
  resends what it spooled above it), plus the current ``policy`` if the actor
  holds an older one or one of another learner run. A ``next_seq`` above what
  the store expects declares the seqs in between lost (the actor no longer has
  them). The hello binds the actor_id to that connection (``sessions.py``).
* ``chunk`` -> accepted only from a welcomed connection (else ``reject`` with
  ``not_welcomed``, seq -1: the actor says hello and resends), decoded and
  validated against the ``ChunkSpec`` (camera frames too), appended to the
  store, group-committed in a commit thread while the server keeps receiving
  (``group_commit.py``), then one cumulative ``ack`` per actor with newly
  committed chunks, sent only once that commit is durable. Duplicates (seq already accepted) are
  skipped and acked; a chunk arriving before its predecessors is dropped and
  answered with ``resend``; a malformed chunk gets a ``reject`` (its seq is
  consumed so later chunks go on) and is counted by reason, exactly.
* ``publish_policy(version, onnx)`` sends a ``policy`` message to every actor
  the server has heard from, over the same socket.
* ``status`` (from a welcomed connection) is kept as the actor's latest, with its arrival time, in
  ``stats()["actors"][id]``; a malformed one is rejected and counted like any message. A refused hello's
  reason is kept per actor_id in ``stats()["refused_hellos"]`` (``sessions.py``).

Why one ROUTER for the policy too (not PUB/SUB): a late or reconnecting actor gets the
current policy at ``hello`` instead of missing a PUB message sent before it subscribed, and
there is one endpoint to configure and secure; the cost is one copy of the policy per actor.

A failed commit is retried with back-off while nothing new is read, then stops the server
(``group_commit.py``). Episodes of actors silent for ``abandon_idle_s`` are closed as
abandoned. With ``keys`` (``security.py``) the socket is a CURVE server and each message's
ZAP User-Id must match the actor_id it names (else ``key_refused``). ``max_rows_per_s`` is a
per-actor token bucket (``token_bucket.py``): backpressure (``rate_limited``), never loss.

Log lines stay bounded whatever actors send: ids and messages are clipped, and each kind of
line (a rejection reason, lost seqs, reconnects, ...) comes at most once per ``LOG_INTERVAL_S``
(``rate_log.py``), while ``stats()`` counts every rejection.

No torch here. Split by concern: ``sessions.py`` (connections, admission), ``token_bucket.py``,
``group_commit.py`` (when and where commits run, retry), ``router.py`` (the socket),
``rate_log.py``; this module dispatches messages and runs the server thread.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import zmq

from o2o.datasets.replay_store import CommitEvent, ReplayStore, SeqGapError
from o2o.transport.wakeup import Waker
from o2o.transport.wire import (
    BAD_FRAMES, BAD_TYPE, BAD_VALUE, KEY_REFUSED, NOT_WELCOMED, RATE_LIMITED, Ack, ChunkSpec, Policy, Reject, Resend,
    Welcome, WireError, decode_chunk, decode_header, decode_hello, decode_status, encode, is_newer_policy, make_policy,
)  # fmt: skip

from .config import IngestConfig, check_commit_interval
from .group_commit import GroupCommit
from .rate_log import RateLimitedLog
from .router import bind_router, send
from .security import LearnerKeys
from .sessions import MAX_ID_CHARS, ActorStats, Sessions, check_hello, clip, short_identity
from .token_bucket import TokenBuckets

__all__ = ["ActorStats", "IngestConfig", "IngestServer", "RateLimitedLog", "check_commit_interval"]

log = logging.getLogger("o2o.ingest")

UNKNOWN_ACTOR = "unknown"
LOG_INTERVAL_S = 1.0  # at most one line per kind (e.g. rejection reason) per interval
RESEND_INTERVAL_S = 0.5  # repeat a resend request for the same seq at most this often
MAX_MESSAGE_CHARS = 200  # rejection messages as logged (they quote what was received)
ABANDON_CHECK_S = 10.0  # how often idle actors' open episodes are looked for


class IngestServer:
    """Receives actors' chunks into a ``ReplayStore`` and publishes policies.

    ``endpoint`` may use a wildcard port (``tcp://127.0.0.1:*``); ``server.endpoint``
    is the bound address after ``start()``. ``on_commit(event)`` runs in the server
    thread after each commit (keep it short: hand the event to another thread);
    exceptions it raises are logged and counted.

    Settings come whole as ``config`` (an ``IngestConfig``); keyword ``settings`` override
    single fields of it (``commit_interval_s=0.005``), for tests and benchmarks. Group commit:
    see ``group_commit.py``; the interval bounds the ack latency at low rates.
    """

    def __init__(
        self,
        store: ReplayStore,
        endpoint: str = "tcp://127.0.0.1:*",
        *,
        config: IngestConfig | None = None,
        spec: ChunkSpec | None = None,
        task: str | None = None,
        on_commit: Callable[[CommitEvent], None] | None = None,
        run_id: str = "",
        keys: LearnerKeys | None = None,
        context: zmq.Context | None = None,
        **settings,
    ):
        config = dataclasses.replace(config or IngestConfig(), **settings)  # unknown names: TypeError
        check_commit_interval(config.commit_interval_s)
        self.config = config
        self.store = store
        self.spec = spec or ChunkSpec.for_obs(store.config.obs_spec, store.config.action_dim)  # cameras too
        self.task = task or store.config.task
        self.on_commit = on_commit
        self.run_id = run_id
        self.keys = keys
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
        self._limited = RateLimitedLog(log, LOG_INTERVAL_S)
        self._sessions = Sessions(config.actor_live_s, config.max_actors, self._limited, self._forget)
        self._actors = self._sessions.actors  # actor_id -> ActorStats (read by stats())
        self._identity = self._sessions.identity
        self._actor_of = self._sessions.actor_of
        self._buckets = TokenBuckets(config.max_rows_per_s, config.rate_burst_s)
        self._commit: GroupCommit | None = None  # made by the server thread
        self._to_ack: set[str] = set()  # acked after the next commit that finishes
        self._acking: set[str] = set()  # acked when the commit in flight finishes
        self._resend_sent: dict[str, tuple[int, float]] = {}
        self._last_abandon_check = time.monotonic()
        self._skip_to: dict[str, int] = {}  # seqs consumed by actors the store does not know yet
        # Stats (read by other threads through stats()).
        self._rejected: dict[str, int] = {}
        self._counters = {"commits": 0, "commit_failures": 0, "send_failures": 0, "callback_errors": 0,
                          "internal_errors": 0, "abandoned_episodes": 0,
                          "rate_limited": 0}  # fmt: skip

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
        policy = make_policy(version, bytes(onnx_bytes), self.run_id)
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
                "refused_keys": dict(self.keys.allow.refused) if self.keys is not None else {},
                **self._sessions.snapshot(),  # forgotten_actors, refused_hellos, actors
            }

    # ------------------------------------------------------------ server thread

    def _run(self) -> None:
        cfg = self.config
        try:
            sock, self.endpoint = bind_router(self._context, self.endpoint, max_frame_bytes=self.spec.max_frame_bytes,
                                              max_queued_messages=cfg.max_queued_messages, keys=self.keys)  # fmt: skip
            self._waker = Waker(self._context, "ingest")
            self._commit = GroupCommit(self.store, interval_s=cfg.commit_interval_s, commit_rows=cfg.commit_rows,
                                       retry_s=cfg.commit_retry_s, wake=self._waker.wake)  # fmt: skip
        except Exception as err:  # reported by start()
            self.error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(sock)
            self._finish_commit(sock, block=True)  # the one in flight
            self._begin_commit()  # what is staged: tried once more, also after failures
            self._finish_commit(sock, block=True)
            if self.store.uncommitted and self._commit.failing_since is not None:
                log.error("stopped with %d rows not committed (the store could not be written): the actors keep "
                          "them in their spools and resend them to the next run", self.store.staged_rows)  # fmt: skip
        except BaseException as err:
            self.error = err
            log.exception("ingest server stopped by an error")
        finally:
            self._limited.flush(force=True)  # what was held back is counted in the log too
            if self._commit.in_flight is not None:  # stopped by an error: let its write end first
                self._commit.finished(block=True)
            self._commit.close()
            sock.close()
            if self.keys is not None:
                self.keys.close()
            waker, self._waker = self._waker, None
            if waker is not None:
                waker.close()

    def _serve(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        reading = True
        commit = self._commit
        while not self._stop.is_set():
            if reading != (commit.failing_since is None):
                # While commits fail, read nothing new: the actors keep their chunks spooled.
                reading = commit.failing_since is None
                (poller.register if reading else poller.unregister)(*((sock, zmq.POLLIN) if reading else (sock,)))
            events = dict(poller.poll(commit.poll_timeout_ms()))
            if self._waker.socket in events:
                self._waker.drain()
            self._finish_commit(sock)
            if sock in events:
                for _ in range(1024):  # drain a burst, but come back to commits and commands
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    with self._lock:
                        self._handle_safely(sock, frames)
                    if not self._commands.empty():  # a new policy goes out before the rest of a burst
                        self._run_commands(sock)
                    if commit.in_flight is not None:
                        self._finish_commit(sock)
                    if commit.due():
                        self._begin_commit()
            self._run_commands(sock)
            self._resume_throttled(sock)
            self._abandon_idle_episodes()
            self._limited.flush()
            if commit.due():
                self._begin_commit()

    def _abandon_idle_episodes(self) -> None:
        now = time.monotonic()
        idle_s = self.config.abandon_idle_s
        if idle_s is None or now - self._last_abandon_check < ABANDON_CHECK_S:
            return
        self._last_abandon_check = now
        with self._lock:
            gone = self.store.abandon_idle_episodes(idle_s)
        if gone:
            self._counters["abandoned_episodes"] += len(gone)
            log.info("closed the open episodes of %d actors silent for over %.0f s as abandoned: %s",
                     len(gone), idle_s,
                     ", ".join(clip(a, MAX_ID_CHARS) for a in gone[:10]) + (" ..." if len(gone) > 10 else ""))  # fmt: skip

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
                    self._send(sock, identity, encode(self._ack(actor_id)))

    def _ack(self, actor_id: str) -> Ack:
        return Ack(actor_id, self.store.committed_seq(actor_id), self.policy_version, self._hold, self.run_id)

    def _begin_commit(self) -> None:
        """Hand what is staged to the commit thread; the actors that had chunks (or skips) in it
        are acked once it is durable (``_finish_commit``)."""
        with self._lock:
            if self._commit.begin(collect=self.on_commit is not None):
                self._acking, self._to_ack = self._to_ack, set()

    def _finish_commit(self, sock: zmq.Socket, block: bool = False) -> None:
        """Apply the outcome of the commit in flight, if it finished: ack, or retry later."""
        with self._lock:
            outcome = self._commit.finished(block=block)
            if outcome is None:
                return
            _, error = outcome
            if error is not None:
                self._counters["commit_failures"] += 1
                self._to_ack |= self._acking  # acked once a retry commits their chunks
                self._acking = set()
                self._commit.failed(error)  # raises once it has failed for commit_retry_s
                return
            self._counters["commits"] += 1
            acking, self._acking = self._acking, set()
            if not self.store.uncommitted:  # e.g. duplicates of chunks this commit held
                acking |= self._to_ack
                self._to_ack = set()
            for actor_id in acking:
                seq = self.store.committed_seq(actor_id)
                if actor_id in self._actors:
                    self._actors[actor_id].committed_seq = seq
                identity = self._identity.get(actor_id)
                if identity is not None:
                    self._send(sock, identity, encode(self._ack(actor_id)))
        if self.on_commit is not None:
            try:
                self.on_commit(self.store.last_commit)
            except Exception:
                self._counters["callback_errors"] += 1
                log.exception("on_commit callback failed (the commit itself is durable)")

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list) -> None:
        if (err := send(sock, identity, frames)) is not None:
            self._counters["send_failures"] += 1
            log.debug("send to socket %s failed: %s", short_identity(identity), err)

    # ------------------------------------------------------------ message handling

    def _handle_safely(self, sock: zmq.Socket, frames: list) -> None:
        try:
            self._handle(sock, frames)
        except Exception:  # a bug must not take the service down; it is loud in the log
            self._counters["internal_errors"] += 1
            self._limited.log("internal error", logging.ERROR, "unexpected error while handling a message", exc_info=True)

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
        owner = None
        if self.keys is not None:
            # CURVE: the ZAP handler named the actor_id the sender's key belongs to; a key removed
            # from the allow-list since the handshake is refused from its next message on.
            owner = body[0].get("User-Id") if hasattr(body[0], "get") else ""
            if not owner or not self.keys.allow.allows(owner):
                err = WireError(KEY_REFUSED, "this actor's key is no longer in the learner's allow-list")
                self._reject(sock, identity, self._actor_of.get(identity), -1, err, claimed=owner or None)
                return
        kind = header["type"]
        if kind == "chunk":
            self._on_chunk(sock, identity, body, header)
        elif kind == "hello":
            self._on_hello(sock, identity, body, header, owner)
        elif kind == "status":
            self._on_status(sock, identity, body, header)
        else:
            err = WireError(BAD_TYPE, f"actors send 'chunk', 'hello' or 'status' messages, not {kind!r}")
            self._reject(sock, identity, self._actor_of.get(identity), -1, err)

    def _on_status(self, sock: zmq.Socket, identity: bytes, body: list, header: dict) -> None:
        try:
            status = decode_status(body, header)
        except WireError as err:
            return self._reject(sock, identity, self._actor_of.get(identity), -1, err)
        if (stats := self._welcomed(sock, identity, status.actor_id)) is not None:
            self._sessions.set_status(stats, status)

    def _welcomed(self, sock: zmq.Socket, identity: bytes, actor_id: str | None) -> ActorStats | None:
        """The stats of ``actor_id`` if this connection was welcomed as it; else refuse the message."""
        stats = self._sessions.welcomed(identity, actor_id)
        if stats is not None:
            return stats
        message = "say hello first: this connection has not been welcomed" + (
            f" as actor {actor_id!r}" if actor_id is not None else "")  # fmt: skip
        self._reject(sock, identity, None, -1, WireError(NOT_WELCOMED, message), claimed=actor_id)
        return None

    def _expected_seq(self, actor_id: str) -> int:
        """The seq this actor must send next (seqs consumed before the store knew it count too)."""
        return max(self.store.expected_seq(actor_id), self._skip_to.get(actor_id, -1) + 1)

    def _consume(self, actor_id: str, seq: int) -> None:
        """Consume seqs up to ``seq`` without rows (a rejected or lost chunk). An actor gets a
        store entry only with its first accepted chunk: until then the skip is kept here."""
        if self.store.expected_seq(actor_id) > 0:
            self.store.skip(actor_id, seq)
            self._to_ack.add(actor_id)
        else:
            self._skip_to[actor_id] = max(seq, self._skip_to.get(actor_id, -1))

    def _on_chunk(self, sock: zmq.Socket, identity: bytes, body: list, header: dict) -> None:
        try:
            chunk = decode_chunk(body, self.spec, header)
        except WireError as err:
            if err.actor_id is None:
                self._reject(sock, identity, self._actor_of.get(identity), -1, err)
                return
            if self._welcomed(sock, identity, err.actor_id) is None:
                return
            expected = self._expected_seq(err.actor_id)
            if err.seq < expected:
                self._duplicate(sock, err.actor_id)
            elif err.seq > expected:
                self._out_of_order(sock, err.actor_id, expected)
            else:
                self._consume(err.actor_id, err.seq)  # so the actor's next chunks are accepted
                self._reject(sock, identity, err.actor_id, err.seq, err)
            return
        stats = self._welcomed(sock, identity, chunk.actor_id)
        if stats is None:
            return
        stats.policy_version = chunk.policy_version
        expected = self._expected_seq(chunk.actor_id)
        if chunk.seq < expected:
            self._duplicate(sock, chunk.actor_id)
            return
        if chunk.seq > expected:
            if chunk.actor_id in self._buckets.throttled:  # the rest of a window sent past the limit: asked again later
                stats.out_of_order += 1
            else:
                self._out_of_order(sock, chunk.actor_id, expected)
            return
        if not self._buckets.take(chunk.actor_id, chunk.n):
            self._rate_limited(sock, chunk.actor_id, expected, chunk.n)
            return
        if chunk.actor_id in self._skip_to:  # its first accepted chunk: now the store learns the skip
            self.store.skip(chunk.actor_id, self._skip_to.pop(chunk.actor_id))
        try:
            accepted = self.store.append(chunk)
        except SeqGapError as gap:
            self._out_of_order(sock, chunk.actor_id, gap.expected)
            return
        except ValueError as err:  # the store refused its values (e.g. out of an int32 column's range)
            self._consume(chunk.actor_id, chunk.seq)
            self._reject(sock, identity, chunk.actor_id, chunk.seq, WireError(BAD_VALUE, str(err)))
            return
        if accepted:
            stats.rows += chunk.n
            stats.chunks += 1
            self._to_ack.add(chunk.actor_id)
        else:
            self._duplicate(sock, chunk.actor_id)

    def _rate_limited(self, sock: zmq.Socket, actor_id: str, expected: int, rows: int) -> None:
        """Backpressure, not loss: the chunk is not stored, not acked and not consumed; the actor keeps
        it spooled, and is asked to resend from it once its bucket holds the chunk's rows."""
        self._counters["rate_limited"] += 1
        self._actors[actor_id].rate_limited += 1
        self._buckets.throttle(actor_id, expected, rows)
        self._limited.log(RATE_LIMITED, logging.WARNING, "actor %s sends more than %g rows/s (ingest "
                          "max_rows_per_s): its chunks wait in its spool", clip(actor_id, MAX_ID_CHARS),
                          self.config.max_rows_per_s)  # fmt: skip

    def _resume_throttled(self, sock: zmq.Socket) -> None:
        for actor_id, seq in self._buckets.ready():
            identity = self._identity.get(actor_id)
            if identity is not None:
                self._send(sock, identity, encode(Resend(actor_id, seq)))

    def _duplicate(self, sock: zmq.Socket, actor_id: str) -> None:
        self._actors[actor_id].duplicates += 1
        if self.store.uncommitted:
            self._to_ack.add(actor_id)  # acked after the next commit
        else:
            self._send(sock, self._identity[actor_id], encode(self._ack(actor_id)))

    def _out_of_order(self, sock: zmq.Socket, actor_id: str, expected: int) -> None:
        self._actors[actor_id].out_of_order += 1
        now = time.monotonic()
        last = self._resend_sent.get(actor_id)
        if last is None or last[0] != expected or now - last[1] >= RESEND_INTERVAL_S:
            self._resend_sent[actor_id] = (expected, now)
            self._send(sock, self._identity[actor_id], encode(Resend(actor_id, expected)))

    def _on_hello(self, sock: zmq.Socket, identity: bytes, body: list, header: dict, owner: str | None) -> None:
        try:
            hello = decode_hello(body, header)
            check_hello(hello, owner, self.task, self.spec)
            self._sessions.admit(identity, hello.actor_id, hello.instance, self.store.committed_seq(hello.actor_id))
        except WireError as err:
            if err.actor_id is not None:  # its hello named it (an unreadable hello names nobody)
                self._sessions.refuse(err.actor_id, err)
            welcomed_as = self._actor_of.get(identity)
            self._reject(sock, identity, welcomed_as if welcomed_as == err.actor_id else None, -1, err,
                         claimed=err.actor_id)  # fmt: skip
            return
        actor_id = hello.actor_id
        stats = self._actors[actor_id]
        expected = self._expected_seq(actor_id)
        if hello.next_seq > expected:
            stats.lost_seqs += hello.next_seq - expected
            self._limited.log(
                "lost seqs", logging.WARNING, "actor %s resumes at seq %d; seqs %d..%d never arrived and are counted as lost",
                clip(actor_id, MAX_ID_CHARS), hello.next_seq, expected, hello.next_seq - 1,
            )  # fmt: skip
            self._consume(actor_id, hello.next_seq - 1)
        welcome = Welcome(
            actor_id, self.store.committed_seq(actor_id), self.policy_version,
            self._expected_seq(actor_id) - 1, self._hold, self.run_id,
        )  # fmt: skip
        self._send(sock, identity, encode(welcome))
        policy = self._policy
        if policy is not None and is_newer_policy(policy.run_id, policy.version, hello.policy_run, hello.policy_version):
            self._send(sock, identity, encode(policy))

    def _forget(self, actor_id: str) -> None:
        """``actor_id`` was forgotten to make room for another: drop its state here too."""
        self._skip_to.pop(actor_id, None)
        self._resend_sent.pop(actor_id, None)
        self._to_ack.discard(actor_id)
        self._acking.discard(actor_id)
        self._buckets.forget(actor_id)

    def _reject(self, sock: zmq.Socket, identity: bytes, actor_id: str | None, seq: int, err: WireError,
                claimed: str | None = None) -> None:  # fmt: skip
        """Refuse a message; ``actor_id`` is the sender as welcomed (its counters get the rejection),
        ``claimed`` an id the message named without being welcomed as it (logged, not trusted)."""
        self._rejected[err.reason] = self._rejected.get(err.reason, 0) + 1
        if actor_id is not None and actor_id in self._actors:
            rejected = self._actors[actor_id].rejected
            rejected[err.reason] = rejected.get(err.reason, 0) + 1
        name = actor_id or claimed
        if actor_id is not None:
            who = f"actor {clip(actor_id, MAX_ID_CHARS)}"
        elif claimed is not None:
            who = f"actor {clip(claimed, MAX_ID_CHARS)} (not welcomed, socket {short_identity(identity)})"
        else:
            who = f"socket {short_identity(identity)}"
        # One line per reason per interval, whoever sent it: made-up ids cannot multiply the lines.
        self._limited.log(f"rejected {err.reason}", logging.WARNING, "rejected a message from %s (seq %d): %s: %s",
                          who, seq, err.reason, clip(err.message, MAX_MESSAGE_CHARS))  # fmt: skip
        self._send(sock, identity, encode(Reject(name or UNKNOWN_ACTOR, seq, err.reason, err.message[:1000])))
