"""The learner's ingest service: actors' chunks over ZeroMQ -> the Zarr replay store.

One ZeroMQ ROUTER socket, bound by the learner, serves every actor (each a
DEALER that connects to it), in a background thread:

* ``hello`` -> ``welcome`` with the actor's committed seq (a restarted actor
  resends what it spooled above it), plus the current ``policy`` if the actor
  holds an older one or one of another learner run. A ``next_seq`` above what
  the store expects declares the seqs in between lost (the actor no longer has
  them). The hello binds the actor_id to that connection: a second live
  connection of another actor process with the same id is refused
  (``actor_id_in_use``) until the first has been silent for ``actor_live_s``.
  Only actors that had a chunk accepted get an entry in the store; the others'
  state lives here, capped at ``max_actors`` (stale ones are forgotten first).
* ``chunk`` -> accepted only from a welcomed connection (else ``reject`` with
  ``not_welcomed``, seq -1: the actor says hello and resends), decoded and
  validated against the ``ChunkSpec``, appended to the
  store, group-committed (when ``commit_rows`` rows are staged, or
  ``commit_interval_s`` after the previous commit), then one cumulative ``ack``
  per actor with newly committed chunks. Duplicates (seq already accepted) are
  skipped and acked; a chunk arriving before its predecessors is dropped and
  answered with ``resend``; a malformed chunk gets a ``reject`` (its seq is
  consumed so later chunks go on) and is counted by reason, exactly.
* ``publish_policy(version, onnx)`` sends a ``policy`` message to every actor
  the server has heard from, over the same socket.

Why one ROUTER for the policy too (not PUB/SUB): the learner knows each actor's
address and what it reported, so a late or reconnecting actor gets the current
policy at ``hello`` instead of missing a PUB message sent before it
subscribed; there is one endpoint to configure and secure, and an actor that
missed a policy (a full queue drops it) can ask again with another ``hello``
(every ``ack`` and ``welcome`` names the newest version). The cost is one copy
of the policy per actor per publish, small next to the transitions.

A failed commit (disk full, read-only remount, I/O error) is retried with
back-off for ``commit_retry_s`` while nothing new is read (the actors keep their
chunks spooled); past that the server stops with ``error`` set, which the
learner turns into a clear error and a non-zero exit. Episodes of actors silent
for ``abandon_idle_s`` are closed as abandoned, so the store does not keep them
open (and re-read them at every reopen) forever.

With ``keys`` (transport/security.py) the socket is a CURVE server: only allowed keys complete
the handshake, and each message's ZAP User-Id (the actor_id its key belongs to) must match the
actor_id it names and still be allowed, else ``key_refused``. ``max_rows_per_s`` is a per-actor
token bucket: a chunk past it is not stored, acked or consumed (``rate_limited``), and the actor
is asked to resend from it once its bucket holds the rows: backpressure, never loss.

Log lines stay bounded whatever actors send: ids, socket identities and messages are
clipped (``clip``, ``short_identity``), and rejections are logged at most once per reason
per ``LOG_INTERVAL_S`` (likewise lost seqs, reconnects, internal errors), the lines held
back counted in the next one: a fleet (or an attacker) flooding bad frames costs a few
lines a second, while ``stats()`` counts every rejection.

No torch here: each commit event hands the learner (``on_commit``) the rows of the
episodes it closed, with their MC returns, for its sampling buffer.
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

from o2o.datasets.replay_store import CommitEvent, ReplayStore, SeqGapError, StoreError
from o2o.transport.wakeup import Waker
from o2o.transport.wire import (
    ACTOR_ID_IN_USE,
    BAD_FRAMES,
    BAD_SPEC,
    BAD_TYPE,
    BAD_VALUE,
    KEY_REFUSED,
    NOT_WELCOMED,
    RATE_LIMITED,
    TOO_MANY_ACTORS,
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
    is_newer_policy,
    make_policy,
)

from .security import LearnerKeys

log = logging.getLogger("o2o.ingest")

UNKNOWN_ACTOR = "unknown"
LOG_INTERVAL_S = 1.0  # at most one line per kind (e.g. rejection reason) per interval
RESEND_INTERVAL_S = 0.5  # repeat a resend request for the same seq at most this often
MAX_ID_CHARS = 32  # actor ids as logged (the wire allows 128)
MAX_MESSAGE_CHARS = 200  # rejection messages as logged (they quote what was received)
ABANDON_CHECK_S = 10.0  # how often idle actors' open episodes are looked for


def clip(text: str, limit: int) -> str:
    """``text`` for a log line: control characters escaped, at most ~``limit`` characters."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else f"{shown[:limit]}...({len(text)} chars)"


def short_identity(identity: bytes) -> str:
    """A ZeroMQ routing id (up to 255 bytes) as 16 hex chars at most, plus its length."""
    return identity.hex() if len(identity) <= 8 else f"{identity[:8].hex()}...({len(identity)} bytes)"


class RateLimitedLog:
    """At most one line per key per ``interval_s``; the lines held back are counted and the
    count logged with the key's next line, or by ``flush`` once the interval has passed."""

    def __init__(self, logger: logging.Logger, interval_s: float):
        self.logger = logger
        self.interval_s = interval_s
        self._state: dict[str, tuple[float, int]] = {}  # key -> (time of its last line, held back since)

    def log(self, key: str, level: int, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, held = self._state.get(key, (-math.inf, 0))
        if now - last < self.interval_s:
            self._state[key] = (last, held + 1)
            return
        self._state[key] = (now, 0)
        if held:
            fmt += f" (+{held} more like it in the last {now - last:.1f} s)"
        self.logger.log(level, fmt, *args, exc_info=exc_info)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        for key, (last, held) in self._state.items():
            if held and (force or now - last >= self.interval_s):
                self.logger.warning("%d more lines like the last '%s' line in the last %.1f s (one line per %g s)",
                                    held, key, now - last, self.interval_s)  # fmt: skip
                self._state[key] = (now, 0)


@dataclasses.dataclass
class ActorStats:
    """Counters of one actor, as seen by the ingest server."""

    rows: int = 0  # rows accepted
    chunks: int = 0  # chunks accepted
    duplicates: int = 0
    out_of_order: int = 0
    lost_seqs: int = 0  # seqs declared lost by the actor's hello
    rate_limited: int = 0  # chunks refused for now (over max_rows_per_s), resent later
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    last_contact: float = 0.0  # time.time() of the last message
    policy_version: int = -1  # policy version of the last chunk
    committed_seq: int = -1
    instance: str = ""  # the actor process that holds this actor_id (from its hello)


def check_commit_interval(seconds: float) -> None:
    """Refuse a group-commit interval outside (0, 1] s: acks later than ~1 s crowd the actors' 5 s link timeout."""
    if not 0 < seconds <= 1.0:
        raise ValueError(f"commit_interval_s must be in (0, 1] seconds, not {seconds}")


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
        run_id: str = "",
        actor_live_s: float = 10.0,
        max_actors: int = 4096,
        commit_retry_s: float = 60.0,
        abandon_idle_s: float | None = 600.0,
        keys: LearnerKeys | None = None,
        max_rows_per_s: float | None = None,
        rate_burst_s: float = 2.0,
        max_queued_messages: int = 10000,
        context: zmq.Context | None = None,
    ):
        check_commit_interval(commit_interval_s)
        self.store = store
        self.spec = spec or ChunkSpec(store.config.obs_dim, store.config.action_dim)
        self.task = task or store.config.task
        self.on_commit = on_commit
        self.commit_rows = commit_rows
        self.commit_interval_s = commit_interval_s
        self.run_id = run_id
        self.actor_live_s = actor_live_s
        self.max_actors = max_actors
        self.commit_retry_s = commit_retry_s
        self.abandon_idle_s = abandon_idle_s
        self.keys = keys
        self.max_rows_per_s = max_rows_per_s
        self.rate_burst_s = rate_burst_s
        self.max_queued_messages = max_queued_messages
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
        self._limited = RateLimitedLog(log, LOG_INTERVAL_S)
        self._last_commit = 0.0
        self._last_abandon_check = time.monotonic()
        self._skip_to: dict[str, int] = {}  # seqs consumed by actors the store does not know yet
        self._buckets: dict[str, tuple[float, float]] = {}  # actor_id -> (rows it may send now, at time)
        self._throttled: dict[str, tuple[int, int]] = {}  # actor_id -> (seq to ask for, rows) once it may send
        self._failing_since: float | None = None  # first failed commit of the current streak
        self._streak = 0  # failed commits in the current streak
        self._retry_at = 0.0
        # Stats (read by other threads through stats()).
        self._actors: dict[str, ActorStats] = {}
        self._rejected: dict[str, int] = {}
        self._counters = {"commits": 0, "commit_failures": 0, "send_failures": 0, "callback_errors": 0,
                          "internal_errors": 0, "forgotten_actors": 0, "abandoned_episodes": 0,
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
            # Bounded: past this many unread messages ZeroMQ stops reading from the actors' sockets
            # (TCP backpressure; they keep their chunks spooled), never an unbounded queue here.
            sock.setsockopt(zmq.RCVHWM, self.max_queued_messages)
            if self.keys is not None:
                self.keys.serve(self._context, sock)  # CURVE server + ZAP allow-list, before binding
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
            if self.store.uncommitted and self._failing_since is not None:
                log.error("stopped with %d rows not committed (the store could not be written): the actors keep "
                          "them in their spools and resend them to the next run", self.store.staged_rows)  # fmt: skip
        except BaseException as err:
            self.error = err
            log.exception("ingest server stopped by an error")
        finally:
            self._limited.flush(force=True)  # what was held back is counted in the log too
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
        while not self._stop.is_set():
            if reading != (self._failing_since is None):
                # While commits fail, read nothing new: the actors keep their chunks spooled.
                reading = self._failing_since is None
                (poller.register if reading else poller.unregister)(*((sock, zmq.POLLIN) if reading else (sock,)))
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
            self._resume_throttled(sock)
            self._abandon_idle_episodes()
            self._limited.flush()
            if self._commit_due():
                self._commit(sock)

    def _abandon_idle_episodes(self) -> None:
        now = time.monotonic()
        if self.abandon_idle_s is None or now - self._last_abandon_check < ABANDON_CHECK_S:
            return
        self._last_abandon_check = now
        with self._lock:
            gone = self.store.abandon_idle_episodes(self.abandon_idle_s)
        if gone:
            self._counters["abandoned_episodes"] += len(gone)
            log.info("closed the open episodes of %d actors silent for over %.0f s as abandoned: %s",
                     len(gone), self.abandon_idle_s,
                     ", ".join(clip(a, MAX_ID_CHARS) for a in gone[:10]) + (" ..." if len(gone) > 10 else ""))  # fmt: skip

    def _commit_due(self) -> bool:
        store = self.store
        if not store.uncommitted:
            return False
        if self._failing_since is not None:
            return time.monotonic() >= self._retry_at
        if store.staged_full_chunk or (self.commit_rows is not None and store.staged_rows >= self.commit_rows):
            return True
        return time.monotonic() - self._last_commit >= self.commit_interval_s

    def _poll_timeout_ms(self) -> int:
        if not self.store.uncommitted:
            return 50
        due = self._retry_at if self._failing_since is not None else self._last_commit + self.commit_interval_s
        left = due - time.monotonic()
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
                    self._send(sock, identity, encode(self._ack(actor_id)))

    def _ack(self, actor_id: str) -> Ack:
        return Ack(actor_id, self.store.committed_seq(actor_id), self.policy_version, self._hold, self.run_id)

    def _commit(self, sock: zmq.Socket) -> None:
        if not self.store.uncommitted:
            return
        with self._lock:
            try:
                self.store.commit(collect=self.on_commit is not None)
            except OSError as err:  # the store stays as before the call: retrying is safe
                self._commit_failed(err)
                return
            if self._failing_since is not None:
                log.warning("replay store %s is writable again: committed after %.1f s of failures",
                            self.store.path, time.monotonic() - self._failing_since)  # fmt: skip
                self._failing_since = None
            self._last_commit = time.monotonic()
            self._counters["commits"] += 1
            for actor_id in self._to_ack:
                seq = self.store.committed_seq(actor_id)
                if actor_id in self._actors:
                    self._actors[actor_id].committed_seq = seq
                identity = self._identity.get(actor_id)
                if identity is not None:
                    self._send(sock, identity, encode(self._ack(actor_id)))
            self._to_ack.clear()
        if self.on_commit is not None:
            try:
                self.on_commit(self.store.last_commit)
            except Exception:
                self._counters["callback_errors"] += 1
                log.exception("on_commit callback failed (the commit itself is durable)")

    def _commit_failed(self, err: OSError) -> None:
        """Back off and retry (a full disk may be freed, a remount undone); give up after
        ``commit_retry_s`` with a StoreError that stops the server (and the learner)."""
        now = time.monotonic()
        self._counters["commit_failures"] += 1
        first = self._failing_since is None
        if first:
            self._failing_since, self._streak = now, 0
        self._streak += 1
        failing_for = now - self._failing_since
        staged = self.store.staged_rows
        if failing_for >= self.commit_retry_s:
            raise StoreError(
                f"the replay store {self.store.path} could not be written for {failing_for:.0f} s ({err}); "
                f"{staged} staged rows were not committed (the actors keep them in their spools and resend them). "
                "Every committed row is intact: free space or make the folder writable, then resume the run "
                "(o2o-learner resume=<run folder>)"
            ) from err
        self._retry_at = now + min(0.1 * 2 ** (self._streak - 1), 5.0)  # 0.1, 0.2, 0.4 ... 5 s
        if first or self._streak % 10 == 0:
            log.error("commit to the replay store %s failed (%s); retrying for up to %.0f s, not reading new "
                      "chunks meanwhile (%d rows staged)", self.store.path, err, self.commit_retry_s, staged)  # fmt: skip

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as err:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN)
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
        else:
            err = WireError(BAD_TYPE, f"actors send 'chunk' or 'hello' messages, not {kind!r}")
            self._reject(sock, identity, self._actor_of.get(identity), -1, err)

    def _welcomed(self, sock: zmq.Socket, identity: bytes, actor_id: str | None) -> ActorStats | None:
        """The stats of ``actor_id`` if this connection was welcomed as it; else refuse the message."""
        if actor_id is not None and self._actor_of.get(identity) == actor_id:
            stats = self._actors[actor_id]
            stats.last_contact = time.time()
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
            if chunk.actor_id in self._throttled:  # the rest of a window sent past the limit: asked again later
                stats.out_of_order += 1
            else:
                self._out_of_order(sock, chunk.actor_id, expected)
            return
        if not self._within_rate(chunk.actor_id, chunk.n):
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

    def _tokens(self, actor_id: str) -> float:
        """Token bucket: ``max_rows_per_s`` per actor, bursts of ``rate_burst_s`` seconds' worth."""
        now = time.monotonic()
        capacity = self.max_rows_per_s * self.rate_burst_s
        tokens, last = self._buckets.get(actor_id, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * self.max_rows_per_s)
        self._buckets[actor_id] = (tokens, now)
        return tokens

    def _within_rate(self, actor_id: str, rows: int) -> bool:
        if self.max_rows_per_s is None:
            return True
        tokens = self._tokens(actor_id)
        # A chunk larger than a whole burst passes on a full bucket.
        if tokens < min(rows, self.max_rows_per_s * self.rate_burst_s):
            return False
        self._buckets[actor_id] = (tokens - rows, self._buckets[actor_id][1])
        return True

    def _rate_limited(self, sock: zmq.Socket, actor_id: str, expected: int, rows: int) -> None:
        """Backpressure, not loss: the chunk is not stored, not acked and not consumed; the actor keeps
        it spooled, and is asked to resend from it once its bucket holds the chunk's rows."""
        self._counters["rate_limited"] += 1
        self._actors[actor_id].rate_limited += 1
        self._throttled[actor_id] = (expected, rows)
        self._limited.log(RATE_LIMITED, logging.WARNING, "actor %s sends more than %g rows/s (ingest "
                          "max_rows_per_s): its chunks wait in its spool", clip(actor_id, MAX_ID_CHARS),
                          self.max_rows_per_s)  # fmt: skip

    def _resume_throttled(self, sock: zmq.Socket) -> None:
        for actor_id, (seq, rows) in list(self._throttled.items()):
            if self._tokens(actor_id) >= min(rows, self.max_rows_per_s * self.rate_burst_s):
                del self._throttled[actor_id]
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
            if owner is not None and hello.actor_id != owner:
                raise WireError(KEY_REFUSED, f"this key belongs to actor {clip(owner, MAX_ID_CHARS)!r}, not "
                                f"{clip(hello.actor_id, MAX_ID_CHARS)!r}: each actor has its own key", hello.actor_id)  # fmt: skip
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
            self._admit(identity, hello.actor_id, hello.instance)
        except WireError as err:
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

    def _admit(self, identity: bytes, actor_id: str, instance: str) -> None:
        """Bind ``actor_id`` to this connection, or raise WireError saying why not."""
        now = time.time()
        stats = self._actors.get(actor_id)
        if stats is None:
            if len(self._actors) >= self.max_actors and not self._forget_stalest(now):
                raise WireError(TOO_MANY_ACTORS, f"the learner serves its maximum of {self.max_actors} actors "
                                "(ingest max_actors), all of them live", actor_id)  # fmt: skip
            stats = self._actors[actor_id] = ActorStats(committed_seq=self.store.committed_seq(actor_id))
        old = self._identity.get(actor_id)
        if old is not None and old != identity:
            silent_s = now - stats.last_contact
            same_process = instance != "" and instance == stats.instance
            if not same_process and silent_s < self.actor_live_s:
                raise WireError(ACTOR_ID_IN_USE, f"actor_id {actor_id!r} is held by another live actor process (its "
                                f"last message {silent_s:.1f} s ago): give each actor a unique actor_id. A restarted "
                                f"actor is accepted once the old connection has been silent for {self.actor_live_s:.0f} s",
                                actor_id)  # fmt: skip
            self._limited.log("reconnect", logging.INFO, "actor %s reconnected from a new socket%s",
                              clip(actor_id, MAX_ID_CHARS), "" if same_process else " (a new process)")  # fmt: skip
            self._actor_of.pop(old, None)
        self._identity[actor_id] = identity
        self._actor_of[identity] = actor_id
        stats.instance = instance
        stats.last_contact = now

    def _forget_stalest(self, now: float) -> bool:
        """Make room for a new actor by forgetting the one silent the longest, if it is not live.
        (Its store entry, if any, stays: only this server's session and counters go.)"""
        actor_id = min(self._actors, key=lambda a: self._actors[a].last_contact)
        if now - self._actors[actor_id].last_contact < self.actor_live_s:
            return False
        del self._actors[actor_id]
        identity = self._identity.pop(actor_id, None)
        self._actor_of.pop(identity, None)
        self._skip_to.pop(actor_id, None)
        self._resend_sent.pop(actor_id, None)
        self._to_ack.discard(actor_id)
        self._buckets.pop(actor_id, None)
        self._throttled.pop(actor_id, None)
        self._counters["forgotten_actors"] += 1
        return True

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
