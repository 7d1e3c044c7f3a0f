"""The ingest server's sessions: which connection speaks for which actor_id, and admission.

A ``hello`` binds the actor_id to that connection: a second live connection of another actor
process with the same id is refused (``actor_id_in_use``) until the first has been silent for
``actor_live_s``. At most ``max_actors`` actors are served; to make room, the one silent the
longest is forgotten if it is not live (its store entry stays: only the session and counters go).
Each actor's latest ``status`` message is kept with its stats; the last refusal of a hello is kept per
actor_id (the most recent ``MAX_REFUSED_IDS`` ids) until that id is admitted: o2o-status shows both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from .rate_log import RateLimitedLog
from .wire import ACTOR_ID_IN_USE, BAD_SPEC, KEY_REFUSED, TOO_MANY_ACTORS, ChunkSpec, Hello, Status, WireError

MAX_ID_CHARS = 32  # actor ids as logged (the wire allows 128)
MAX_REFUSED_IDS = 256  # refused hellos remembered (made-up ids cannot grow it)
MAX_REFUSAL_CHARS = 300  # of a refusal's message, as kept


def clip(text: str, limit: int) -> str:
    """``text`` for a log line: control characters escaped, at most ~``limit`` characters."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else f"{shown[:limit]}...({len(text)} chars)"


def short_identity(identity: bytes) -> str:
    """A ZeroMQ routing id (up to 255 bytes) as 16 hex chars at most, plus its length."""
    return identity.hex() if len(identity) <= 8 else f"{identity[:8].hex()}...({len(identity)} bytes)"


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
    status: dict | None = None  # its latest status message (transport/status_msg.py), None before the first
    status_time: float = 0.0  # time.time() it arrived


class Sessions:
    """Actor ids <-> ZeroMQ routing ids, and each actor's ``ActorStats``.

    ``on_forget(actor_id)`` runs when an actor is forgotten to make room (the server drops
    its own per-actor state then)."""

    def __init__(self, actor_live_s: float, max_actors: int, limited: RateLimitedLog,
                 on_forget: Callable[[str], None]):  # fmt: skip
        self.actor_live_s = actor_live_s
        self.max_actors = max_actors
        self.limited = limited
        self.on_forget = on_forget
        self.actors: dict[str, ActorStats] = {}
        self.identity: dict[str, bytes] = {}  # actor_id -> latest ZeroMQ routing id
        self.actor_of: dict[bytes, str] = {}
        self.forgotten = 0
        self.refused: dict[str, dict] = {}  # actor_id -> its last refused hello: reason, message, time

    def snapshot(self) -> dict:
        """The sessions' part of the server's ``stats()``, copied."""
        return {"forgotten_actors": self.forgotten, "refused_hellos": {a: dict(r) for a, r in self.refused.items()},
                "actors": {actor_id: dataclasses.asdict(s) for actor_id, s in self.actors.items()}}

    def set_status(self, stats: ActorStats, status: Status) -> None:
        stats.status, stats.status_time = status.report(), time.time()

    def refuse(self, actor_id: str, err: WireError) -> None:
        """Remember why ``actor_id``'s hello was refused (until it is admitted)."""
        self.refused.pop(actor_id, None)  # re-inserted: the dict stays in order of the last refusal
        if len(self.refused) >= MAX_REFUSED_IDS:
            del self.refused[next(iter(self.refused))]
        message = err.message[:MAX_REFUSAL_CHARS]
        self.refused[actor_id] = {"reason": err.reason, "message": message, "time": time.time()}

    def welcomed(self, identity: bytes, actor_id: str | None) -> ActorStats | None:
        """The stats of ``actor_id`` if this connection was welcomed as it (its last contact is now)."""
        if actor_id is not None and self.actor_of.get(identity) == actor_id:
            stats = self.actors[actor_id]
            stats.last_contact = time.time()
            return stats
        return None

    def admit(self, identity: bytes, actor_id: str, instance: str, committed_seq: int) -> ActorStats:
        """Bind ``actor_id`` to this connection, or raise WireError saying why not."""
        now = time.time()
        stats = self.actors.get(actor_id)
        if stats is None:
            if len(self.actors) >= self.max_actors and not self._forget_stalest(now):
                raise WireError(TOO_MANY_ACTORS, f"the learner serves its maximum of {self.max_actors} actors "
                                "(ingest max_actors), all of them live", actor_id)  # fmt: skip
            stats = self.actors[actor_id] = ActorStats(committed_seq=committed_seq)
        old = self.identity.get(actor_id)
        if old is not None and old != identity:
            silent_s = now - stats.last_contact
            same_process = instance != "" and instance == stats.instance
            if not same_process and silent_s < self.actor_live_s:
                raise WireError(ACTOR_ID_IN_USE, f"actor_id {actor_id!r} is held by another live actor process (its "
                                f"last message {silent_s:.1f} s ago): give each actor a unique actor_id. A restarted "
                                f"actor is accepted once the old connection has been silent for {self.actor_live_s:.0f} s",
                                actor_id)  # fmt: skip
            self.limited.log("reconnect", logging.INFO, "actor %s reconnected from a new socket%s",
                             clip(actor_id, MAX_ID_CHARS), "" if same_process else " (a new process)")  # fmt: skip
            self.actor_of.pop(old, None)
        self.identity[actor_id] = identity
        self.actor_of[identity] = actor_id
        self.refused.pop(actor_id, None)
        stats.instance = instance
        stats.last_contact = now
        return stats

    def _forget_stalest(self, now: float) -> bool:
        """Make room for a new actor by forgetting the one silent the longest, if it is not live."""
        actor_id = min(self.actors, key=lambda a: self.actors[a].last_contact)
        if now - self.actors[actor_id].last_contact < self.actor_live_s:
            return False
        del self.actors[actor_id]
        identity = self.identity.pop(actor_id, None)
        self.actor_of.pop(identity, None)
        self.forgotten += 1
        self.on_forget(actor_id)
        return True


def check_hello(hello: Hello, owner: str | None, task: str | None, spec: ChunkSpec) -> None:
    """WireError unless the actor's CURVE key belongs to it (``owner``: the actor_id of the key, with
    keys) and it runs the learner's task with its dimensions and cameras (each camera's H x W x C)."""
    if owner is not None and hello.actor_id != owner:
        raise WireError(KEY_REFUSED, f"this key belongs to actor {clip(owner, MAX_ID_CHARS)!r}, not "
                        f"{clip(hello.actor_id, MAX_ID_CHARS)!r}: each actor has its own key", hello.actor_id)  # fmt: skip
    wrong = []
    if task is not None and hello.task != task:
        wrong.append(f"task {hello.task!r} (learner: {task!r})")
    if (hello.obs_dim, hello.action_dim) != (spec.obs_dim, spec.action_dim):
        wrong.append(f"obs_dim={hello.obs_dim}, action_dim={hello.action_dim} "
                     f"(learner: {spec.obs_dim}, {spec.action_dim})")  # fmt: skip
    learner_cameras = spec.camera_shapes
    for name in sorted(hello.cameras.keys() | learner_cameras.keys()):
        actor_shape, learner_shape = hello.cameras.get(name), learner_cameras.get(name)
        if actor_shape != learner_shape:
            wrong.append(f"camera {clip(name, MAX_ID_CHARS)!r} {_image_shape(actor_shape)} "
                         f"(learner: {_image_shape(learner_shape)})")  # fmt: skip
    if wrong:
        raise WireError(BAD_SPEC, "actor does not match the learner: " + "; ".join(wrong), hello.actor_id)


def _image_shape(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "absent"
