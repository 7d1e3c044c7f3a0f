"""ZeroMQ CURVE between the learner and its actors: keys, the allow-list, and socket set-up.

Why CURVE: it authenticates both ends and encrypts the link (ZeroMQ's own handshake,
no TLS terminator to run). The learner knows each actor by its public key; the actor
knows the learner by the learner's public key, so a policy arriving on an encrypted link
was sent by whoever holds ``learner.key_secret``: an actor runs only its learner's policies.

The key folder (made by ``o2o-keys``, transport/keys_cli.py)::

    KEYS/learner.key            the learner's public key (every actor needs it)
    KEYS/learner.key_secret     the learner's secret key (mode 0600; stays on the learner)
    KEYS/allowed/ROBOT-1.key    the actors the learner accepts: one public key per actor_id
    KEYS/actors/ROBOT-1/        what to copy to robot-1: learner.key, actor.key, actor.key_secret

The allow-list binds each key to one actor_id (the file's name): a hello or chunk naming
another actor_id is refused, so one actor cannot write as another. The folder is re-read at
most once a second when a key is looked up: adding or removing a file takes effect without
a restart, also for actors already connected (their next message is refused).

Key files are ZeroMQ's certificate format (``zmq.auth.load_certificate``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from o2o.datasets.atomic_file import write_atomic

log = logging.getLogger("o2o.security")

LEARNER_KEY = "learner.key"
ALLOWED = "allowed"
ACTORS = "actors"
ACTOR_KEY = "actor.key"
RELOAD_EVERY_S = 1.0  # the allow-list folder is re-read at most this often
MAX_LOGGED_KEYS = 1000  # distinct refused keys logged (each once); past that only counted


class SecurityError(ValueError):
    """Keys missing, unreadable or not matching; the message says which file and what to run."""


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (ipc, inproc, tcp on 127.x / localhost / ::1)."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(endpoint).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def require_keys_off_loopback(endpoint: str, keys: str | None, insecure: bool, who: str) -> None:
    """Encryption is on by default off loopback: refuse an open non-loopback endpoint unless asked."""
    if keys is None and not insecure and not is_loopback(endpoint):
        raise SecurityError(
            f"{endpoint} is reachable from other machines, and {who} has no keys: anyone who reaches the port "
            f"could {'write into the replay store' if who == 'the learner' else 'send this actor a policy'}. "
            "Make keys with `o2o-keys init KEYS && o2o-keys add KEYS ACTOR_ID` and pass keys=... "
            "(README, 'Securing the link'), or pass insecure=true on a trusted network"
        )


def _read(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"key file {path} not found (make it with o2o-keys)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise SecurityError(f"key file {path} is not a ZeroMQ certificate: {err}") from err
    if secret and secret_key is None:
        raise SecurityError(f"key file {path} holds no secret key")
    if secret and os.stat(path).st_mode & 0o077:
        raise SecurityError(f"secret key file {path} can be read by other users: chmod 600 {path}")
    return public, secret_key


class AllowList:
    """The actors the learner accepts: z85 public key -> actor_id, from ``KEYS/allowed/*.key``.

    ``callback`` is the ZAP check (run by the authenticator thread at each handshake);
    ``actor_of`` is asked by the ingest server for each message. Unknown keys are counted in
    ``refused`` and logged once per key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = {}
        self._loaded_at = -float("inf")
        self.refused: dict[str, int] = {}  # z85 key -> handshakes refused
        self.reload()

    def reload(self) -> None:
        keys = {}
        for path in sorted(self.folder.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as err:
                log.error("allow-list: skipped %s (%s)", path, err)
                continue
            keys[public] = path.stem
        with self._lock:
            added = set(keys.values()) - set(self._keys.values())
            removed = set(self._keys.values()) - set(keys.values())
            self._keys, self._loaded_at = keys, time.monotonic()
        if added or removed:
            log.info("allow-list %s: %d actors%s%s", self.folder, len(keys),
                     f", added {', '.join(sorted(added))}" if added else "",
                     f", removed {', '.join(sorted(removed))}" if removed else "")  # fmt: skip

    def _fresh(self) -> dict[bytes, str]:
        if time.monotonic() - self._loaded_at >= RELOAD_EVERY_S:
            self.reload()
        return self._keys

    def actor_of(self, z85_key: bytes) -> str | None:
        return self._fresh().get(z85_key)

    def allows(self, actor_id: str) -> bool:
        return actor_id in self._fresh().values()

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP: accept the handshake of an allowed key; count and log (once) the others."""
        if self.actor_of(z85_key) is not None:
            return True
        key = z85_key.decode("ascii", "replace")
        with self._lock:
            first = key not in self.refused
            if first and len(self.refused) >= MAX_LOGGED_KEYS:
                key, first = "(other keys)", "(other keys)" not in self.refused
            self.refused[key] = self.refused.get(key, 0) + 1
        if first:
            log.warning("refused an actor with a key not in the allow-list %s: %s (logged once per key)",
                        self.folder, key)  # fmt: skip
        return False


class _Authenticator(ThreadAuthenticator):
    """ZAP handler whose User-Id is the actor_id the key belongs to (ingest reads it per message)."""

    def __init__(self, context: zmq.Context, allow: AllowList):
        super().__init__(context)
        self.allow = allow

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allow.actor_of(z85.encode(client_public_key)) or ""


class LearnerKeys:
    """The learner's side: its key pair and the allow-list, from a folder made by ``o2o-keys init``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.public, self.secret = _read(self.folder / (LEARNER_KEY + "_secret"), secret=True)
        allowed = self.folder / ALLOWED
        if not allowed.is_dir():
            raise SecurityError(f"{allowed} not found: is {self.folder} a folder made by `o2o-keys init`?")
        self.allow = AllowList(allowed)
        self._auth: _Authenticator | None = None

    def serve(self, context: zmq.Context, sock: zmq.Socket) -> None:
        """Start the context's ZAP handler and make ``sock`` a CURVE server (before it binds)."""
        self._auth = _Authenticator(context, self.allow)
        self._auth.start()
        self._auth.configure_curve_callback("*", self.allow)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class ActorKeys:
    """An actor's side: its key pair and the learner's public key (``KEYS/actors/ACTOR_ID``)."""

    def __init__(self, folder: str | os.PathLike, actor_id: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SecurityError(f"actor key folder {self.folder} not found: make it on the learner's machine with "
                                f"`o2o-keys add KEYS {actor_id}` and copy KEYS/actors/{actor_id} here")  # fmt: skip
        self.learner_public, _ = _read(self.folder / LEARNER_KEY, secret=False)
        self.public, self.secret = _read(self.folder / (ACTOR_KEY + "_secret"), secret=True)
        named = (self.folder / "actor_id").read_text().strip() if (self.folder / "actor_id").is_file() else actor_id
        if named != actor_id:
            raise SecurityError(f"the keys in {self.folder} belong to actor {named!r}, not to actor_id={actor_id!r}: "
                                "the learner binds each key to one actor_id")  # fmt: skip

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the learner (before it connects)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.learner_public


# ---------------------------------------------------------------- making keys (o2o-keys)


def _write_pair(folder: Path, name: str, metadata: dict | None = None) -> None:
    public_file, secret_file = zmq.auth.create_certificates(folder, name, metadata)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)


def init_keys(folder: str | os.PathLike, force: bool = False) -> Path:
    """The learner's key pair and an empty allow-list in ``folder``."""
    folder = Path(folder)
    if (folder / LEARNER_KEY).exists() and not force:
        raise SecurityError(f"{folder} already holds learner keys (pass --force to replace them: every actor "
                            "then needs its folder again)")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    _write_pair(folder, "learner", {"role": "o2o learner"})
    (folder / ALLOWED).mkdir(exist_ok=True)
    (folder / ACTORS).mkdir(exist_ok=True)
    return folder


def add_actor(folder: str | os.PathLike, actor_id: str) -> Path:
    """A key pair for ``actor_id``: its public key into the allow-list, and a folder to copy to it."""
    folder = Path(folder)
    if not (folder / LEARNER_KEY).is_file():
        raise SecurityError(f"{folder} holds no learner keys: run `o2o-keys init {folder}` first")
    if not actor_id or "/" in actor_id or actor_id.startswith("."):
        raise SecurityError(f"actor_id {actor_id!r}: give a name without '/' that does not start with '.'")
    actor_dir = folder / ACTORS / actor_id
    if actor_dir.exists():
        raise SecurityError(f"{actor_dir} exists: `o2o-keys revoke {folder} {actor_id}` first to make new keys")
    actor_dir.mkdir(parents=True)
    os.chmod(actor_dir, 0o700)
    _write_pair(actor_dir, "actor", {"actor_id": actor_id})
    (actor_dir / "actor_id").write_text(actor_id + "\n")
    (actor_dir / LEARNER_KEY).write_bytes((folder / LEARNER_KEY).read_bytes())
    allowed = folder / ALLOWED / f"{actor_id}.key"
    write_atomic(allowed, (actor_dir / ACTOR_KEY).read_bytes())  # the learner never reads half a file
    return actor_dir


def revoke_actor(folder: str | os.PathLike, actor_id: str) -> None:
    """Remove ``actor_id`` from the allow-list (a running learner refuses it within a second) and its keys."""
    folder = Path(folder)
    allowed = folder / ALLOWED / f"{actor_id}.key"
    actor_dir = folder / ACTORS / actor_id
    if not allowed.exists() and not actor_dir.exists():
        raise SecurityError(f"{folder} knows no actor {actor_id!r}")
    allowed.unlink(missing_ok=True)
    for path in actor_dir.glob("*") if actor_dir.is_dir() else ():
        path.unlink()
    if actor_dir.is_dir():
        actor_dir.rmdir()


def list_actors(folder: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in (Path(folder) / ALLOWED).glob("*.key"))
