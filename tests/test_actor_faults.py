"""Actor faults: a stale acked mark, a full disk, a fresh learner run, refusals by the learner.

Real parts: spool files (on a real, small tmpfs for the full disk), ZeroMQ sockets on
loopback, onnxruntime, MuJoCo, an ``o2o-actor`` process. The learner is a small ROUTER
peer speaking the wire protocol (``Peer``), so a test can make it refuse, forget or never ack.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import zmq
from test_actor import PUSHER_ACT, PUSHER_OBS, as_bytes, config, export, frames_of, free_endpoint, wait_for

from o2o.actor.config import LinkConfig
from o2o.transport.link import Link
from o2o.actor.loop import Actor
from o2o.actor.main import EXIT_STOPPED, assemble, wait_for_learner
from o2o.actor.seams import PolicyBuilder
from o2o.transport.spool import ACKED_FILE, Spool
from o2o.transport import wire
from o2o.datasets.replay_store import ReplayStore
from o2o.transport.ingest import IngestServer

TESTS = Path(__file__).parent


# ---------------------------------------------------------------- a learner stand-in


class Peer:
    """A learner stand-in on ``endpoint``: a ROUTER in a thread, speaking the wire protocol.

    It welcomes each hello (declaring skipped seqs lost, like the learner), sends ``policy`` when
    the actor does not hold it, and acks chunks in seq order if ``ack``. ``refuse`` (a reject
    reason) refuses every hello instead; ``forget`` answers chunks with NOT_WELCOMED until the
    next hello (a learner restarted under queued chunks). It records what it got.
    """

    def __init__(self, endpoint: str, run_id: str = "", policy: wire.Policy | None = None, ack: bool = True):
        self.run_id, self.policy, self.ack = run_id, policy, ack
        self.refuse: str | None = None
        self.forget = False
        self.committed = -1
        self.hellos: list[wire.Hello] = []
        self.chunks: list[tuple[int, int]] = []  # (seq, policy_version) of chunks taken, in arrival order
        self.not_welcomed = 0
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _send(self, identity: bytes, msg) -> None:
        self._sock.send_multipart([identity, *wire.encode(msg)])

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            identity, *body = self._sock.recv_multipart()
            header = wire.decode_header(body[0])
            actor_id = header["actor_id"]
            if header["type"] == "status":  # the actor's state for o2o-status: this stand-in has no fleet view
                continue
            if header["type"] == "hello":
                hello = wire.decode_hello(body, header)
                self.hellos.append(hello)
                if self.refuse is not None:
                    self._send(identity, wire.Reject(actor_id, -1, self.refuse, f"refused ({self.refuse})"))
                    continue
                self.forget = False
                self.committed = max(self.committed, hello.next_seq - 1)  # the seqs below next_seq are lost
                version = self.policy.version if self.policy else -1
                welcome = wire.Welcome(actor_id, self.committed, version, self.committed, False, self.run_id)
                self._send(identity, welcome)
                held = (hello.policy_run, hello.policy_version)
                if self.policy is not None and wire.is_newer_policy(self.run_id, version, *held):
                    self._send(identity, self.policy)
            elif self.forget:
                self.not_welcomed += 1
                self._send(identity, wire.Reject(actor_id, -1, wire.NOT_WELCOMED, "say hello first"))
            else:
                seq = header["seq"]
                self.chunks.append((seq, header["policy_version"]))
                if self.ack and seq <= self.committed + 1:
                    self.committed = max(self.committed, seq)
                    version = self.policy.version if self.policy else -1
                    self._send(identity, wire.Ack(actor_id, self.committed, version, False, self.run_id))

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._sock.close()
            self._context.term()


def make_chunk(seq: int, rows: int = 4, obs_dim: int = 3, action_dim: int = 2) -> wire.TransitionChunk:
    rng = np.random.default_rng(seq)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    flags = np.zeros(rows, np.uint8)
    return wire.TransitionChunk("f1", seq, 0, 0, 0, f32(rows, obs_dim), f32(rows, action_dim), f32(rows),
                                f32(rows, obs_dim), flags, flags, flags)  # fmt: skip


def bare_link(endpoint: str, spool: Spool, dims: tuple[int, int] = (3, 2), **link) -> Link:
    """A Link of actor f1 (3-d observations, 2-d actions unless ``dims``) without env or policy."""
    cfg = LinkConfig(heartbeat_s=0.1, timeout_s=0.5, drain_s=0.0, **link)
    return Link(endpoint, "f1", "pusher", *dims, spool, PolicyBuilder(None), cfg=cfg).start()


@pytest.fixture(scope="module")
def onnx(tmp_path_factory) -> bytes:
    return export(tmp_path_factory.mktemp("policy"), "pusher", PUSHER_OBS, PUSHER_ACT, 2.0, 0, seed=0)


# ---------------------------------------------------------------- (3) a stale acked mark


def acked_then_fresh_learner(folder: Path) -> None:
    """Run 1 acks seqs 0-99 and closes cleanly; run 2 (a fresh learner: seqs from 0 again) spools 10."""
    run1 = Spool(memory_chunks=4, folder=folder)
    for seq in range(100):
        run1.put(seq, frames_of(seq, 100))
    run1.ack(99)
    run1.close()
    assert (folder / ACKED_FILE).exists()


@pytest.mark.parametrize("run2_exit", ["clean", "killed"])
def test_a_stale_acked_mark_does_not_drop_the_chunks_of_a_new_numbering(tmp_path, run2_exit):
    acked_then_fresh_learner(tmp_path)
    if run2_exit == "clean":
        run2 = Spool(memory_chunks=4, folder=tmp_path)
        for seq in range(10):
            run2.put(seq, frames_of(seq, 100))
        run2.close(spill=True)
    else:  # killed once its chunks are on disk: no close, no atexit
        script = textwrap.dedent(f"""
            import os, signal
            from o2o.transport.spool import Spool
            spool = Spool(memory_chunks=1, folder={str(tmp_path)!r})
            for seq in range(11):
                spool.put(seq, [bytes([seq]) * 100])
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    run3 = Spool(memory_chunks=4, folder=tmp_path)
    try:
        held = list(range(10)) if run2_exit == "clean" else list(range(11))  # killed: seq 0 (cached) is on disk too
        assert [s for s in range(11) if run3.get(s) is not None] == held
    finally:
        run3.close()


def test_an_actor_restarted_against_a_fresh_learner_keeps_its_unacked_chunks(tmp_path):
    acked_then_fresh_learner(tmp_path)
    peer = Peer(free_endpoint(), ack=False)  # fresh: it knows no seq of this actor
    try:
        link = bare_link(peer.endpoint, Spool(memory_chunks=4, folder=tmp_path))
        assert link.wait_welcome(30) and link.status().next_seq == 0
        for seq in range(10):
            link.add(make_chunk(seq))
        wait_for(lambda: len(peer.chunks) == 10, "the 10 chunks to reach the learner")
        link.close()  # unacked: kept on disk for the next run
    finally:
        peer.close()
    run3 = Spool(memory_chunks=4, folder=tmp_path)
    try:
        assert len(run3) == 10 and (run3.first_seq, run3.last_seq) == (0, 9)
    finally:
        run3.close()


# ---------------------------------------------------------------- (9) a full disk


@pytest.fixture
def small_disk(mounts, tmp_path):
    """A real 256 KiB file system (tmpfs), to fill up."""
    disk = tmp_path / "disk"
    mounts.tmpfs(disk, "256k")
    return disk


def test_spool_put_on_a_full_disk_keeps_the_chunk_and_reports_no_room(small_disk):
    spool = Spool(memory_chunks=1, folder=small_disk / "a1", segment_bytes=64 << 10)
    seq = 0
    while spool.has_room():  # 10 kB chunks until the disk is full
        spool.put(seq, frames_of(seq, 10_000), force=True)
        seq += 1
        assert seq < 100, "the 256 KiB disk never filled up"
    assert spool.disk_error is not None and spool.disk_error.errno == errno.ENOSPC
    spool.put(seq, frames_of(seq, 10_000), force=True)  # a chunk already taken is still kept, in memory
    assert not spool.has_room()
    assert [as_bytes(spool.get(s)) for s in range(seq + 1)] == [frames_of(s, 10_000) for s in range(seq + 1)]
    assert spool.first_seq == 0 and spool.next_held(1) == 1 and spool.next_held(seq) == seq
    assert spool.stats().memory_only_chunks == 2  # the chunk the disk refused, and the next one
    spool.ack(seq - 1)
    assert len(spool) == 1 and spool.first_seq == seq and spool.stats().memory_only_chunks == 1
    # The acks freed the disk: close tries once more and saves the chunk held in memory only.
    assert spool.close(spill=True) == 1
    reopened = Spool(memory_chunks=1, folder=small_disk / "a1")
    try:  # whole records only on disk: what did not fit was cut away, nothing torn is left
        assert [s for s in range(seq + 1) if reopened.get(s) is not None] == [seq]
        assert as_bytes(reopened.get(seq)) == frames_of(seq, 10_000)
    finally:
        reopened.close()


def test_spool_close_on_a_disk_still_full_logs_the_chunks_it_cannot_save(small_disk, caplog):
    filler = small_disk / "filler"
    spool = Spool(memory_chunks=1, folder=small_disk / "a1", segment_bytes=64 << 10)
    spool.put(0, frames_of(0, 10_000))
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):  # something else fills the disk
        while True:
            f.write(b"x" * 4096)
    spool.put(1, frames_of(1, 10_000), force=True)
    assert spool.disk_error is not None and not spool.has_room()
    assert [as_bytes(spool.get(s)) for s in range(2)] == [frames_of(s, 10_000) for s in range(2)]
    assert spool.close(spill=True) == 0  # logged, never raised
    assert "1 of 1 unacked chunks in memory could not be saved" in caplog.text
    filler.unlink()
    reopened = Spool(memory_chunks=1, folder=small_disk / "a1")
    try:  # seq 0 was written through before the disk filled up; nothing torn is left of seq 1
        assert len(reopened) == 1 and as_bytes(reopened.get(0)) == frames_of(0, 10_000)
    finally:
        reopened.close()


class ClosingPusher(gym.Env):
    """The task's Pusher; ``close()`` writes ``marker`` (the env was closed, as a robot's must be)."""

    def __init__(self, marker: str):
        from o2o.envs import make_env

        self.inner = make_env("pusher")
        self.observation_space, self.action_space = self.inner.observation_space, self.inner.action_space
        self.marker = marker

    def reset(self, *, seed=None, options=None):
        return self.inner.reset(seed=seed, options=options)

    def step(self, action):
        return self.inner.step(action)

    def close(self):
        self.inner.close()
        Path(self.marker).write_text("closed")


def test_actor_on_a_full_disk_stops_safely_and_closes_its_env(tmp_path, small_disk, onnx):
    peer = Peer(free_endpoint(), policy=wire.make_policy(0, onnx), ack=False)  # the spool only grows
    marker = tmp_path / "env-closed"
    cmd = [sys.executable, "-m", "o2o.actor.main", "task=pusher", f"env={__name__}:ClosingPusher",
           f"+env_kwargs.marker={marker}", f"learner={peer.endpoint}", "actor_id=full-1", f"spool.dir={small_disk}",
           "spool.memory_chunks=2", "chunk_rows=20", "link.heartbeat_s=0.2", "link.timeout_s=3",
           "link.drain_s=0.5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    finally:
        peer.close()
    log = done.stdout + done.stderr
    assert done.returncode == EXIT_STOPPED, log[-4000:]
    assert str(small_disk / "full-1") in log and "No space left on device" in log, log[-4000:]
    assert "Traceback" not in log and "link stopped by an error" not in log, log[-4000:]
    assert marker.read_text() == "closed"
    assert len(peer.chunks) > 0


# ---------------------------------------------------------------- (6) a fresh learner run


def test_policy_of_a_fresh_learner_run_replaces_a_higher_version_of_the_old_run(tmp_path, onnx):
    endpoint = free_endpoint()
    run_a = Peer(endpoint, run_id="A", policy=wire.make_policy(5, onnx, run_id="A"))
    cfg = config(tmp_path, endpoint)
    env, _, _, link = assemble(cfg)
    run_b = None
    try:
        wait_for_learner(link, cfg)
        wait_for(lambda: link.latest() is not None, "version 5 of run A")
        actor = Actor(env, link, link, cfg)
        assert actor.run(max_steps=20) == "done" and actor.version == 5
        wait_for(lambda: run_a.committed == 0, "the ack of run A")
        run_a.close()
        run_b = Peer(endpoint, run_id="B", policy=wire.make_policy(1, onnx, run_id="B"))  # a fresh learner
        wait_for(lambda: link.latest().version == 1, "version 1 of run B", state=lambda: link.summary())
        assert actor.run(max_steps=20) == "done" and actor.version == 1
        wait_for(lambda: (1, 1) in run_b.chunks, "a chunk acted by run B's version 1")
    finally:
        link.close()
        env.close()
        for peer in (run_a, run_b):
            if peer is not None:
                peer.close()
    first = run_b.hellos[0]
    assert (first.policy_run, first.policy_version) == ("A", 5)
    instances = {h.instance for h in run_a.hellos + run_b.hellos}
    assert len(instances) == 1 and len(instances.pop()) == 32  # one process: one instance across reconnects


def test_real_learner_of_a_new_run_gets_its_policy_used(tmp_path, onnx):
    old = IngestServer(ReplayStore.create_for_task(tmp_path / "store-a", "pusher"), run_id="A").start()
    old.publish_policy(5, onnx)
    cfg = config(tmp_path, old.endpoint)
    env, _, _, link = assemble(cfg)
    new = None
    try:
        wait_for_learner(link, cfg)
        wait_for(lambda: link.latest() is not None, "version 5 of run A")
        actor = Actor(env, link, link, cfg)
        assert actor.run(max_steps=20) == "done" and actor.version == 5
        wait_for(lambda: link.stats.acked_seq == 0, "the ack of run A")
        old.stop()
        store = ReplayStore.create_for_task(tmp_path / "store-b", "pusher")
        new = IngestServer(store, old.endpoint, run_id="B", commit_interval_s=0.005).start()  # a fresh learner
        new.publish_policy(1, onnx)
        wait_for(lambda: link.latest().version == 1, "version 1 of run B", state=lambda: link.summary())
        assert actor.run(max_steps=20) == "done" and actor.version == 1
        wait_for(lambda: link.stats.acked_seq == 1, "the ack of run B")
    finally:
        link.close()
        env.close()
        if new is not None:
            new.stop()
    assert store.read()["policy_version"].tolist() == [1] * 20


# ---------------------------------------------------------------- (7) refusals by the learner


def test_not_welcomed_makes_the_actor_say_hello_and_resend_without_dropping(tmp_path):
    peer = Peer(free_endpoint(), ack=False)
    link = bare_link(peer.endpoint, Spool(memory_chunks=2, folder=tmp_path))
    try:
        assert link.wait_welcome(30)
        peer.forget = True  # the learner restarted: it knows nothing of this connection
        for seq in range(5):
            link.add(make_chunk(seq))
        wait_for(lambda: len(peer.hellos) >= 2, "a new hello after the NOT_WELCOMED reject")
        wait_for(lambda: [s for s, _ in peer.chunks] == list(range(5)), "the 5 chunks resent from seq 0",
                 state=lambda: (peer.chunks, link.summary()))  # fmt: skip
        assert peer.not_welcomed >= 1 and link.stats.rejected == {wire.NOT_WELCOMED: peer.not_welcomed}
        assert len(link.spool) == 5 and link.spool.stats().rejected_chunks == 0  # nothing dropped
    finally:
        link.close()
        peer.close()


@pytest.mark.parametrize("reason", [wire.ACTOR_ID_IN_USE, wire.TOO_MANY_ACTORS])
def test_a_refused_hello_is_retried_then_stops_the_actor(tmp_path, caplog, reason):
    peer = Peer(free_endpoint())
    peer.refuse = reason
    cfg = config(tmp_path, peer.endpoint, actor_id="f1", link={"id_in_use_timeout_s": 1.0, "connect_timeout_s": 20.0})
    link = bare_link(peer.endpoint, Spool(), id_in_use_timeout_s=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="o2o.transport.link"):
            with pytest.raises(ConnectionError, match="f1") as refused:
                wait_for_learner(link, cfg)
        assert len(peer.hellos) >= 3  # retried every heartbeat
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings and len(warnings) < len(peer.hellos)  # rate-limited
        if reason == wire.ACTOR_ID_IN_USE:
            assert "unique actor_id" in warnings[0] and "unique actor_id" in str(refused.value)
        else:
            assert "maximum number of actors" in warnings[0]
        assert str(refused.value) == link.fatal and "link.id_in_use_timeout_s" in link.fatal
    finally:
        link.close()
        peer.close()


def test_a_refusal_ends_with_a_welcome(tmp_path):
    peer = Peer(free_endpoint())
    peer.refuse = wire.ACTOR_ID_IN_USE  # the actor's previous process is still connected ...
    link = bare_link(peer.endpoint, Spool(), id_in_use_timeout_s=30.0)
    try:
        wait_for(lambda: len(peer.hellos) >= 2, "hellos retried")
        peer.refuse = None  # ... and is gone now
        assert link.wait_welcome(30) and link.fatal is None
    finally:
        link.close()
        peer.close()


def test_a_second_process_with_a_live_actor_id_stops_on_a_real_learner(tmp_path):
    server = IngestServer(ReplayStore.create_for_task(tmp_path / "store", "pusher")).start()
    first = bare_link(server.endpoint, Spool(), dims=(PUSHER_OBS, PUSHER_ACT))
    second = None
    try:
        assert first.wait_welcome(30)
        second = bare_link(server.endpoint, Spool(), dims=(PUSHER_OBS, PUSHER_ACT), id_in_use_timeout_s=1.0)
        wait_for(lambda: second.fatal is not None, "the second actor f1 to give up")
        assert "unique actor_id" in second.fatal and not second.wait_welcome(0)
        assert first.status().stop is None  # the first one goes on
    finally:
        for link in (first, second):
            if link is not None:
                link.close()
        server.stop()
