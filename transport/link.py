"""The actor's ZeroMQ link to the learner (transport/ingest.py), in a background thread.

One DEALER socket connects to the learner's ROUTER. The control loop only calls
``add(chunk)`` (a queue put), ``status()`` (a few reads) and ``latest()`` (an attribute
read), and waits on ``changed``, which this thread notifies after each turn of its loop;
this thread does the rest:

* ``hello`` at connect and as a heartbeat after ``heartbeat_s`` of silence; the
  ``welcome`` gives the actor's committed seq: the first one fixes where this
  actor's seqs continue, and after every (re)connect the spool is resent from it.
* ``ack`` (cumulative) and ``reject`` drop chunks from the spool; an ack's ``hold``
  flag is the learner's flow control (``status().held``: the loop begins no new episode).
  A reject with seq -1 refuses no chunk: ``not_welcomed`` (a restarted learner got
  chunks of an earlier connection) makes the actor say hello and resend from the
  welcome; ``actor_id_in_use`` / ``too_many_actors`` refuse the hello: retried every
  ``heartbeat_s``, fatal after ``id_in_use_timeout_s``.
* chunks go from the spool to the socket in seq order, at most ``max_in_flight``
  unacked at a time; ``resend`` rewinds.
* ``policy`` messages (sha256 checked by the wire decoder) go to a
  ``PolicyTaker`` (the actor's ``PolicyBuilder``) that makes the new session off this thread; ``latest()``
  hands it to the loop. Versions count within a learner run (``run_id``): another
  run's policy is taken whatever its version (``wire.is_newer_policy``).
* a spool that cannot write to disk (ENOSPC...) stops the actor safely
  (``status().stop``), whatever ``spool.on_full`` says.
* with ``keys`` the socket is a CURVE client of the learner's public key (transport/security.py);
  a socket monitor reports a refused handshake (unknown key, no key, another learner), handled
  as a refused hello: retried, fatal after ``id_in_use_timeout_s``. ``key_refused`` (a key for
  another actor_id, or revoked) is fatal at once.
* a ``status`` message every ``status_s`` while welcomed: what ``status_source()`` (the actor's
  ``Actor.status``, set by actor/main.py) reports; a source that raises is logged (rate-limited) and skipped.
* after ``timeout_s`` of silence the learner counts as lost (``learner_lost``;
  the loop then continues or stops, per config) and the socket is recreated
  until the learner answers again.

Sockets use LINGER 0 and IMMEDIATE (nothing is queued for a learner that is not
connected: the spool holds it), so closing never hangs.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from o2o.transport.security import ActorKeys
from o2o.transport.status_msg import Status
from o2o.transport.wakeup import Waker
from o2o.transport.wire import (
    ACTOR_ID_IN_USE,
    BAD_SPEC,
    KEY_REFUSED,
    MAX_POLICY_BYTES,
    NOT_WELCOMED,
    TOO_MANY_ACTORS,
    Hello,
    TransitionChunk,
    WireError,
    decode_ack,
    decode_header,
    decode_policy,
    decode_reject,
    decode_resend,
    decode_welcome,
    encode,
    encode_chunk,
    is_newer_policy,
)

from .config import LinkConfig
from .rate_log import RateLimitedLog
from .seams import PolicyTaker, SinkStatus
from .spool import Spool


log = logging.getLogger("o2o.transport.link")


LOG_EVERY_S = 5.0  # at most one line per kind of repeated warning per interval
# What the socket monitor reports when the learner refuses the CURVE handshake.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@dataclasses.dataclass
class LinkStats:
    sent_chunks: int = 0
    resent_chunks: int = 0
    acked_seq: int = -1
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    policies_received: int = 0
    bad_messages: int = 0
    reconnects: int = 0
    hellos: int = 0
    statuses: int = 0  # status messages sent
    status_errors: int = 0  # status_source() calls that raised or returned a bad status (not sent)


class Link:
    """``TransitionSink`` + ``PolicySource`` over ZeroMQ. Start it, ``wait_welcome``, then act."""

    def __init__(
        self,
        endpoint: str,
        actor_id: str,
        task: str,
        obs_dim: int,
        action_dim: int,
        spool: Spool,
        policies: PolicyTaker,
        cfg: LinkConfig | None = None,
        changed: threading.Condition | None = None,
        keys: ActorKeys | None = None,
        cameras: Mapping[str, Sequence[int]] | None = None,
    ):
        """``cameras``: {name: [H, W, C]} of the env's images (``ObsSpec.to_dict()["cameras"]``; None or {}
        for a state task), sent in each hello: the learner refuses an actor whose cameras differ from its
        task's. ``obs_dim`` is then the state vector's size."""
        self.endpoint = endpoint
        self.actor_id = actor_id
        self.task = task
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.cameras = {name: [int(v) for v in shape] for name, shape in (cameras or {}).items()}
        self.spool = spool
        self.cfg = cfg or LinkConfig()
        self.policies = policies
        self.keys = keys  # CURVE: the learner must hold the secret of keys.learner_public
        self.changed = changed if changed is not None else threading.Condition()  # the loop's wake-up
        held = policies.latest()
        self._received_version = held.version if held is not None else -1
        self._received_run = ""  # learner run of the held policy ("" = none, or a policy file)
        self.instance = uuid.uuid4().hex  # this process, for the learner (kept across reconnects)
        self._context = zmq.Context()
        self._waker = Waker(self._context, "link")
        self._inbox: queue.SimpleQueue[tuple[int, list]] = queue.SimpleQueue()
        self._seq_lock = threading.Lock()
        self._next_seq: int | None = None  # known once the first welcome arrived
        self._welcomed_once = threading.Event()
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self.stats = LinkStats()
        self.error: BaseException | None = None
        self.fatal: str | None = None  # the learner refused this actor (other task / dimensions)
        self.learner_lost = False
        self.learner_version = -1  # the newest policy version the learner published (acks, welcome)
        self.hold = False  # the learner's flow control (ack.hold): see status().held
        self.status_source: Callable[[], dict] | None = None  # the actor's Actor.status, sent every cfg.status_s
        # Link-thread state.
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # handshake failures of a CURVE link
        self._welcomed = False
        self._next_send = 0
        self._max_sent = -1
        self._spooled_next = 0
        self._last_recv = 0.0
        self._last_hello = 0.0
        self._hello_pending = False
        self._last_status = 0.0
        self._last_reconnect = 0.0
        self._version_behind_since: float | None = None
        self._refused_since: float | None = None  # first hello refusal (id in use / too many actors) in a row
        self._limited = RateLimitedLog(log, LOG_EVERY_S)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Link":
        self._thread = threading.Thread(target=self._run, name="o2o-link", daemon=True)
        self._thread.start()
        return self

    def wait_welcome(self, timeout: float | None = None) -> bool:
        """Block until the learner has answered once (True), or ``timeout`` s passed (False)."""
        return self._welcomed_once.wait(timeout)

    def close(self, drain_s: float | None = None) -> None:
        """Wait up to ``drain_s`` for acks of what is spooled, then stop the thread, close the
        sockets and the spool (write-through: what is unacked is on disk for the next run)."""
        drain_s = self.cfg.drain_s if drain_s is None else drain_s
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        self._waker.wake()
        if self._thread is not None:
            self._thread.join()
        self.policies.close()
        self._waker.close()
        self._context.term()
        try:
            self.spool.close(spill=True)  # disk errors are logged there, with the chunks not saved
        except Exception as err:  # never keep the caller from closing its env
            log.error("spool %s could not be closed (%s): up to %d unacked chunks were not saved",
                      self.spool.folder, err, len(self.spool))  # fmt: skip

    def stop_draining(self) -> None:
        """End a ``close`` that waits for acks now (safe from a signal handler): what is unacked
        stays in the spool, on disk, for the next run. No wake-up (its lock is not signal-safe):
        a closing link polls every 10 ms."""
        self._drain_until = 0.0

    # ------------------------------------------------------------ seams (control-loop thread)

    def status(self) -> SinkStatus:
        """The control loop's view (after ``wait_welcome``: the next seq is the learner's to fix)."""
        # A lost learner's hold is stale: with on_learner_lost=continue the actor goes on collecting.
        held = self.hold and not self.learner_lost
        return SinkStatus(self._seq(), self.spool.has_room(extra_chunks=self._inbox.qsize()), held, self._stop_reason())

    def add(self, chunk: TransitionChunk) -> None:
        with self._seq_lock:
            if chunk.seq != self._seq():
                raise ValueError(f"chunk seq {chunk.seq}, expected {self._next_seq}")
            self._next_seq += 1
        self._inbox.put((chunk.seq, encode_chunk(chunk)))
        self._waker.wake()

    def latest(self):
        return self.policies.latest()

    def _seq(self) -> int:
        if self._next_seq is None:
            raise RuntimeError("the learner has not welcomed this actor yet: call wait_welcome() first")
        return self._next_seq

    def _stop_reason(self) -> str | None:
        if self.fatal:
            return self.fatal
        if self.error is not None:
            return f"the actor link failed: {self.error!r}"
        if self.spool.disk_error is not None:
            # Stop, not pause (spool.on_full): acks do not free a disk that something else filled, and
            # every further chunk would live in memory only, lost if the actor is killed.
            return (f"spool {self.spool.folder} cannot write to disk ({self.spool.disk_error}): stopped safely; "
                    "free space there or point spool.dir at a disk with room")  # fmt: skip
        if self.learner_lost and self.cfg.on_learner_lost == "stop":
            return f"learner {self.endpoint} lost for over {self.cfg.timeout_s} s (link.on_learner_lost=stop)"
        return None

    # ------------------------------------------------------------ link thread

    def _new_socket(self) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._close_monitor()
            self._sock.close(linger=0)
        sock = self._context.socket(zmq.DEALER)
        if self.keys is not None:
            self.keys.secure(sock)
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)  # tells why a learner refuses us
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._poller.register(self._monitor, zmq.POLLIN)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a learner that is not there
        sock.setsockopt(zmq.SNDHWM, max(16, 2 * self.cfg.max_in_flight))
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_POLICY_BYTES + 4096)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self.endpoint)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)
        self._welcomed = False
        self._last_reconnect = time.monotonic()

    def _run(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._waker.socket, zmq.POLLIN)
        self._last_recv = time.monotonic()
        try:
            self._new_socket()
            self._hello()
            while not self._done():
                events = dict(self._poller.poll(self._poll_ms()))
                if self._waker.socket in events:
                    self._waker.drain()
                if self._sock in events:
                    self._receive()
                if self._monitor is not None and self._monitor in events:
                    self._on_handshake_failed()
                self._take_inbox()
                self._send_window()
                self._keepalive()
                self._send_status()
                self._notify()
        except BaseException as err:  # surfaced through status().stop
            self.error = err
            self.learner_lost = True
            log.exception("actor link stopped by an error")
        finally:
            self._take_inbox()
            self._close_monitor()
            if self._sock is not None:
                linger = 0
                if self.error is None and self._welcomed and self.status_source is not None:
                    self._last_status, linger = 0.0, 200  # a last status ("stopped") gets 200 ms to leave
                    self._send_status()
                self._sock.close(linger=linger)
            self._notify()

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _on_handshake_failed(self) -> None:
        """The learner refused our CURVE handshake; ZeroMQ retries it as it reconnects."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = (f"the learner refused this actor's key (ZAP status {event['value']}): actor {self.actor_id} "
                       "is not in its allow-list (o2o-keys add on the learner's machine) or was revoked")  # fmt: skip
            elif self.keys is None:
                why = ("the learner encrypts its link (it runs with keys=...): pass this actor its key folder, "
                       "keys=KEYS/actors/<actor_id> made by `o2o-keys add`")  # fmt: skip
            else:
                why = ("the encrypted handshake with the learner failed: does the learner run with keys=..., "
                       "and is this actor's learner.key that learner's public key?")  # fmt: skip
            self._refused("handshake", why)

    def _notify(self) -> None:
        """Wake a loop waiting on ``changed``: each turn may change ``status()`` (an ack frees room,
        the hold flips, the learner is lost or refuses us, the disk fails). Cheap with no waiter."""
        with self.changed:
            self.changed.notify_all()

    def _done(self) -> bool:
        if not self._stop.is_set():
            return False
        self._take_inbox()
        # A lost learner may come back within the drain window (a restart): keep reconnecting till then.
        return len(self.spool) == 0 or time.monotonic() >= self._drain_until

    def _poll_ms(self) -> int:
        if self._stop.is_set() or self._hello_pending:
            return 10
        return int(min(self.cfg.heartbeat_s, 0.25) * 1000)

    def _receive(self) -> None:
        for _ in range(256):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._last_recv = time.monotonic()
            if self.learner_lost:
                self.learner_lost = False
                if self._welcomed_once.is_set():
                    log.warning("learner %s answers again", self.endpoint)
            try:
                self._on_message(frames)
            except WireError as err:
                self.stats.bad_messages += 1
                self._warn("bad", "ignored a malformed message from the learner: %s", err)

    def _on_message(self, frames: list) -> None:
        header = decode_header(frames[0])
        kind = header["type"]
        if kind == "ack":
            ack = decode_ack(frames, header)
            self._acked(ack.seq)
            self.learner_version = ack.policy_version  # the newest it published: a robot holds when far behind
            if ack.hold != self.hold:
                self.hold = ack.hold
                log.info("learner %s the fleet (its samples-per-insert limiter)", "holds" if ack.hold else "releases")
            if is_newer_policy(ack.run_id, ack.policy_version, self._received_run, self._received_version):
                self._policy_behind()
        elif kind == "welcome":
            self._on_welcome(decode_welcome(frames, header))
        elif kind == "reject":
            self._on_reject(decode_reject(frames, header))
        elif kind == "resend":
            resend = decode_resend(frames, header)
            if self._welcomed:
                self._next_send = min(self._next_send, max(resend.seq, self.stats.acked_seq + 1))
        elif kind == "policy":
            self._on_policy(frames, header)
        else:
            raise WireError("bad_type", f"actors do not accept {kind!r} messages")

    def _acked(self, seq: int) -> None:
        if seq > self.stats.acked_seq:
            self.stats.acked_seq = seq
        self.spool.ack(seq)

    def _on_welcome(self, welcome) -> None:
        with self._seq_lock:
            if self._next_seq is None:
                last = self.spool.last_seq
                self._next_seq = max(welcome.seq + 1, welcome.accepted_seq + 1, last + 1 if last is not None else 0)
                self._spooled_next = self._next_seq
                log.info("learner %s welcomed actor %s: committed seq %d, continuing at seq %d, %d chunks to resend",
                         self.endpoint, self.actor_id, welcome.seq, self._next_seq, len(self.spool))  # fmt: skip
            elif welcome.seq >= self._next_seq:
                self._warn("ahead", "the learner holds seq %d of actor %s, beyond this actor's next seq %d: is "
                           "another actor running with actor_id=%s? Skipping ahead.", welcome.seq, self.actor_id,
                           self._next_seq, self.actor_id)  # fmt: skip
                self._next_seq = welcome.seq + 1
        self._acked(welcome.seq)
        self._refused_since = None
        if is_newer_policy(welcome.run_id, welcome.policy_version, self._received_run, self._received_version):
            self._policy_behind()  # it normally follows the welcome; asked for again if it does not
        elif welcome.run_id == self._received_run and 0 <= welcome.policy_version < self._received_version:
            self._warn("older", "the learner's newest policy is version %d, older than this actor's version %d "
                       "(policy.path, or a learner restarted from an older checkpoint): keeping version %d until "
                       "the learner publishes a newer one", welcome.policy_version, self._received_version,
                       self._received_version)  # fmt: skip
        self.hold = welcome.hold
        self.learner_version = welcome.policy_version
        if not self._welcomed:
            self._welcomed = True
            self._next_send = welcome.seq + 1  # resend everything the learner has not committed
        self._welcomed_once.set()

    def _on_reject(self, reject) -> None:
        self.stats.rejected[reject.reason] = self.stats.rejected.get(reject.reason, 0) + 1
        if reject.seq >= 0:
            self.spool.drop(reject.seq)
            self._warn(f"reject-{reject.reason}", "learner rejected chunk seq %d: %s: %s (dropped from the spool)",
                       reject.seq, reject.reason, reject.message)  # fmt: skip
        elif reject.reason in (BAD_SPEC, KEY_REFUSED):
            self.fatal = f"the learner refused this actor: {reject.message}"
            log.error("%s", self.fatal)
        elif reject.reason == NOT_WELCOMED:
            # A restarted learner got chunks queued for its predecessor. Nothing is dropped: the
            # welcome to this hello rewinds sending to what it committed (later rejects wait for it).
            if self._welcomed:
                self._welcomed = False
                self._warn("not-welcomed", "learner %s has not welcomed this connection (restarted?): saying "
                           "hello again, then resending from its committed seq", self.endpoint)  # fmt: skip
                self._hello()
        elif reject.reason in (ACTOR_ID_IN_USE, TOO_MANY_ACTORS):
            self._on_refused(reject)
        else:
            self._warn(f"reject-{reject.reason}", "learner rejected a message: %s: %s", reject.reason, reject.message)

    def _on_refused(self, reject) -> None:
        """The learner refused our hello; ``_keepalive`` says hello again every ``heartbeat_s``."""
        if reject.reason == ACTOR_ID_IN_USE:
            why = (f"another running actor process holds actor_id {self.actor_id} ({reject.message}): "
                   "give each actor a unique actor_id")  # fmt: skip
        else:
            why = f"it serves its maximum number of actors ({reject.message})"
        self._refused(reject.reason, why)

    def _refused(self, reason: str, why: str) -> None:
        """Refused for now (retried); fatal after ``id_in_use_timeout_s`` of refusals in a row."""
        self._welcomed = False
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        limit = self.cfg.id_in_use_timeout_s
        if limit and now - self._refused_since > limit:
            self.fatal = (f"learner {self.endpoint} refused actor {self.actor_id} for over {limit} s "
                          f"(link.id_in_use_timeout_s): {why}")  # fmt: skip
            log.error("%s", self.fatal)
        elif not self.fatal:
            self._warn(f"refused-{reason}", "learner %s refused actor %s: %s. Retrying every %.1f s%s",
                       self.endpoint, self.actor_id, why, self.cfg.heartbeat_s,
                       f", stopping after {limit} s (link.id_in_use_timeout_s)" if limit else "")  # fmt: skip

    def _on_policy(self, frames: list, header: dict) -> None:
        try:
            policy = decode_policy(frames, header)
        except WireError as err:  # e.g. a checksum mismatch: ask again at the next heartbeat
            self.stats.bad_messages += 1
            self._warn("policy", "ignored a policy message: %s", err)
            self._version_behind_since = time.monotonic()
            return
        self.stats.policies_received += 1
        if is_newer_policy(policy.run_id, policy.version, self._received_run, self._received_version):
            self._received_version, self._received_run = policy.version, policy.run_id
            self._version_behind_since = None
            self.policies.submit(policy.version, bytes(policy.onnx), policy.run_id)

    def _policy_behind(self) -> None:
        """An ack or welcome names a newer policy than we got: it may be on its way, or was dropped
        (the learner drops sends to a full queue); ``_keepalive`` asks again after ``heartbeat_s``."""
        if self._version_behind_since is None:
            self._version_behind_since = time.monotonic()

    def _take_inbox(self) -> None:
        while True:
            try:
                seq, frames = self._inbox.get_nowait()
            except queue.Empty:
                return
            # Forced: the loop checks status().room as each chunk starts, so at worst a chunk or two
            # land past the caps at the moment the spool fills; dropping them is never right.
            self.spool.put(seq, frames, force=True)
            self._spooled_next = seq + 1

    def _send_window(self) -> None:
        if not self._welcomed or self.learner_lost:
            return
        while self._next_send - (self.stats.acked_seq + 1) < self.cfg.max_in_flight:
            seq = self.spool.next_held(self._next_send)
            if seq is None:
                return
            frames = self.spool.get(seq)
            if frames is None:  # acked or rejected meanwhile
                self._next_send = seq + 1
                continue
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:  # not connected or the queue is full: the spool keeps it
                return
            if seq <= self._max_sent:
                self.stats.resent_chunks += 1
            else:
                self.stats.sent_chunks += 1
                self._max_sent = seq
            self._next_send = seq + 1

    def _keepalive(self) -> None:
        now = time.monotonic()
        silence = now - self._last_recv
        if silence > self.cfg.timeout_s:
            if not self.learner_lost:
                self.learner_lost = True
                if self._welcomed_once.is_set():  # before that, the start-up wait logs its own lines
                    log.warning("learner %s silent for %.1f s: counted as lost, reconnecting (%d chunks spooled)",
                                self.endpoint, silence, len(self.spool))  # fmt: skip
            if now - self._last_reconnect > self.cfg.timeout_s:
                self.stats.reconnects += 1
                self._new_socket()
                self._hello()
        behind = self._version_behind_since is not None and now - self._version_behind_since > self.cfg.heartbeat_s
        if behind:
            self._version_behind_since = now
        due = now - self._last_hello > self.cfg.heartbeat_s
        # Not welcomed (e.g. refused, or the welcome was lost): hello every heartbeat, answers or not.
        if self._hello_pending or behind or (due and (silence > self.cfg.heartbeat_s or not self._welcomed)):
            self._hello()  # a hello with our policy version makes the learner send its newer one

    def _hello(self) -> None:
        first = self.spool.first_seq
        hello = Hello(
            actor_id=self.actor_id,
            task=self.task,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            # Seqs below this are acked or rejected (or lost with a memory-only spool, spool.dir=null).
            next_seq=first if first is not None else (self._spooled_next if self._next_seq is not None else 0),
            policy_version=self._received_version,
            policy_run=self._received_run,
            instance=self.instance,
            cameras=self.cameras,
        )
        self._last_hello = time.monotonic()
        try:
            self._sock.send_multipart(encode(hello), zmq.NOBLOCK)
            self.stats.hellos += 1
            self._hello_pending = False
        except zmq.Again:  # not connected (yet): retried every poll until it goes out
            self._hello_pending = True

    def _send_status(self) -> None:
        """The actor's status every ``status_s`` while welcomed (skipped when it cannot go out now)."""
        source, every, now = self.status_source, self.cfg.status_s, time.monotonic()
        if source is None or every <= 0 or not self._welcomed or now - self._last_status < every:
            return
        self._last_status = now
        try:
            frames = encode(Status.from_report(self.actor_id, {"spool_depth": len(self.spool), **source()}))
            self._sock.send_multipart(frames, zmq.NOBLOCK)
            self.stats.statuses += 1
        except zmq.Again:  # not connected or the queue is full: the next one goes in status_s
            pass
        except Exception:  # a bug in the source must not stop the link: chunks and acks go on
            self.stats.status_errors += 1
            self._limited.log("status", logging.ERROR, "the actor's status could not be sent", exc_info=True)

    def _warn(self, key: str, message: str, *args) -> None:
        self._limited.warning(key, message, *args)

    def summary(self) -> dict:
        """Counters for progress lines and the stats file."""
        spool = self.spool.stats()
        return {
            **dataclasses.asdict(self.stats),
            "spool_depth": spool.depth,
            "spool_disk_chunks": spool.disk_chunks,
            "spool_disk_bytes": spool.disk_bytes,
            "spool_rejected": spool.rejected_chunks,
            "policies_built": self.policies.built,
            "policies_refused": self.policies.refused,
            "learner_lost": self.learner_lost,
            "learner_silent_s": time.monotonic() - self._last_recv if self._welcomed else None,
            "learner_policy_version": self.learner_version,
            "held": self.hold,
        }
