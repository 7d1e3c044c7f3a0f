"""Process bodies for the replay store and ingest tests (run in child processes).

Chunks are deterministic functions of (actor_id, seq), so a test can regenerate
exactly what was sent and compare it with what the store holds.
"""

from __future__ import annotations

import os
import signal
import time
import zlib

import numpy as np
import zmq

from o2o.transport import wire
from o2o.datasets.replay_store import ReplayStore

OBS_DIM, ACT_DIM = 5, 3


def make_chunk(actor_id: str, seq: int, rows: int = 40, episode_len: int = 25, policy_version: int = 0,
               obs_dim: int = OBS_DIM, act_dim: int = ACT_DIM) -> wire.TransitionChunk:  # fmt: skip
    """Chunk ``seq`` of an actor whose episodes last ``episode_len`` steps (even episodes
    terminate, odd ones are truncated), ``rows`` rows per chunk."""
    key = zlib.crc32(actor_id.encode())
    rng = np.random.default_rng([key, seq])
    g = seq * rows + np.arange(rows + 1)
    episode, step = g[:-1] // episode_len, g[:-1] % episode_len
    last = step == episode_len - 1
    # Observations depend on the global row only, so next_obs[t] == obs[t + 1] across chunks too.
    obs = np.sin(0.37 * g[:, None] * np.arange(1, obs_dim + 1) + key % 1000).astype(np.float32)
    return wire.TransitionChunk(
        actor_id=actor_id,
        seq=seq,
        policy_version=policy_version,
        episode_id=int(episode[0]),
        step=int(step[0]),
        obs=obs[:-1],
        action=rng.uniform(-1, 1, (rows, act_dim)).astype(np.float32),
        reward=rng.choice([0.0, 1.0], rows).astype(np.float32),
        next_obs=obs[1:],
        terminated=(last & (episode % 2 == 0)).astype(np.uint8),
        truncated=(last & (episode % 2 == 1)).astype(np.uint8),
        success=rng.integers(0, 2, rows).astype(np.uint8),
    )


def expected_rows(actor_id: str, n_chunks: int, **kwargs) -> dict[str, np.ndarray]:
    chunks = [make_chunk(actor_id, seq, **kwargs) for seq in range(n_chunks)]
    return {name: np.concatenate([getattr(c, name) for c in chunks]) for name in wire.ARRAY_NAMES}


# ---------------------------------------------------------------- store writer (crash test)


def write_forever(path: str, actors: list[str], seed: int, obs_dim: int = OBS_DIM, act_dim: int = ACT_DIM) -> None:
    """Reopen the store and append + commit chunks round-robin until killed."""
    store = ReplayStore.open(path, "a")
    rng = np.random.default_rng(seed)
    while True:
        for actor_id in actors:
            store.append(make_chunk(actor_id, store.expected_seq(actor_id), obs_dim=obs_dim, act_dim=act_dim))
        if rng.random() < 0.5:
            store.commit()


def read_while_written(path: str, rounds: int, out) -> None:
    """Read the store repeatedly and report (committed rows, prefix intact?) each round."""
    store = ReplayStore.open(path, "r")
    report = []
    for _ in range(rounds):
        n = store.refresh()
        rows = store.read(0, n, ["obs", "actor"])
        ok = True
        for code, actor_id in enumerate(store.actor_ids):
            mine = rows["obs"][rows["actor"] == code]
            want = expected_rows(actor_id, -(-len(mine) // 40))["obs"][: len(mine)]
            ok &= len(mine) % 40 == 0 and np.array_equal(mine, want)
        report.append((n, bool(ok)))
        time.sleep(0.01)
    out.put(report)


# ---------------------------------------------------------------- actors (ingest tests)


class SpoolSender:
    """A minimal actor link: DEALER, hello, a spool of unacked chunks, go-back-N resend."""

    def __init__(self, endpoint: str, actor_id: str, task: str = "test-task"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.actor_id, self.task = actor_id, task
        self.spool: dict[int, list] = {}
        self.acked = -1
        self.rejected: list[wire.Reject] = []
        self.acks = 0
        self.resends = 0
        self.policy: wire.Policy | None = None
        self.needs_hello = False  # the learner did not know this connection (e.g. it restarted)

    def hello(self, obs_dim: int = OBS_DIM) -> wire.Welcome | wire.Reject:
        """Say hello until the learner answers (a hello sent to a learner that died is lost)."""
        next_seq = min(self.spool, default=self.acked + 1)
        hello = wire.encode(wire.Hello(self.actor_id, self.task, obs_dim, ACT_DIM, next_seq))
        while True:
            self.sock.send_multipart(hello)
            msg = self.receive(timeout_ms=1000)
            while msg is not None:
                if isinstance(msg, wire.Welcome):
                    self._acked_up_to(msg.seq)
                    self.needs_hello = False  # refusals of chunks sent before this hello are answered now
                    return msg
                if isinstance(msg, wire.Reject) and msg.reason != wire.NOT_WELCOMED:
                    return msg
                msg = self.receive(timeout_ms=1000)

    def send(self, chunk: wire.TransitionChunk) -> None:
        self.spool[chunk.seq] = wire.encode_chunk(chunk)
        self.sock.send_multipart(self.spool[chunk.seq])

    def resend_from(self, seq: int) -> None:
        self.resends += 1
        for s in sorted(self.spool):
            if s >= seq:
                self.sock.send_multipart(self.spool[s])

    def _acked_up_to(self, seq: int) -> None:
        self.acked = max(self.acked, seq)
        for s in [s for s in self.spool if s <= seq]:
            del self.spool[s]

    def receive(self, timeout_ms: int) -> wire.Message | None:
        if not self.sock.poll(timeout_ms):
            return None
        msg = wire.decode(self.sock.recv_multipart())
        if isinstance(msg, wire.Ack):
            self.acks += 1
            self._acked_up_to(msg.seq)
        elif isinstance(msg, wire.Resend):
            self.resend_from(msg.seq)
        elif isinstance(msg, wire.Reject) and msg.reason == wire.NOT_WELCOMED:
            self.needs_hello = True
        elif isinstance(msg, wire.Reject):
            self.rejected.append(msg)
            self.spool.pop(msg.seq, None)
        elif isinstance(msg, wire.Policy):
            self.policy = msg
        return msg

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def run_actor(endpoint: str, actor_id: str, n_chunks: int, window: int, out) -> None:
    """Send chunks 0..n_chunks-1 with at most ``window`` unacked; resend on silence."""
    sender = SpoolSender(endpoint, actor_id)
    sender.hello()
    seq = sender.acked + 1
    quiet_since = time.monotonic()
    while sender.acked < n_chunks - 1:
        while seq < n_chunks and seq - sender.acked <= window:
            sender.send(make_chunk(actor_id, seq))
            seq += 1
        if sender.receive(timeout_ms=200) is not None:
            quiet_since = time.monotonic()
            if sender.needs_hello:  # a restarted learner: say hello, then resend what it lacks
                sender.needs_hello = False
                sender.hello()
                sender.resend_from(sender.acked + 1)
        elif sender.spool and time.monotonic() - quiet_since > 1.0:
            # No answer for a while (e.g. the learner restarted): go back to the oldest unacked.
            sender.resend_from(min(sender.spool))
            quiet_since = time.monotonic()
    out.put({"actor_id": actor_id, "acked": sender.acked, "acks": sender.acks, "resends": sender.resends})
    sender.close()


def serve_until_killed(path: str, endpoint: str, kill_after_rows: int) -> None:
    """An ingest server process that SIGKILLs itself right after a commit reaches ``kill_after_rows``."""
    from o2o.transport.ingest import IngestServer

    store = ReplayStore.open(path, "a")

    def crash(event) -> None:
        if event.stop >= kill_after_rows:
            os.kill(os.getpid(), signal.SIGKILL)

    server = IngestServer(store, endpoint, task="test-task", on_commit=crash, commit_interval_s=0.005).start()
    while True:
        time.sleep(1)
        if server.error:
            raise server.error
