"""The ingest server under faults, over real ZeroMQ sockets and a real store: connections that
were never welcomed, one actor_id on two hosts, made-up ids, out-of-range values, policies of
another learner run, and a store folder that turns read-only mid-run."""

import json
import logging
import re
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from o2o.transport import wire
from o2o.datasets.replay_store import PendingCommit, ReplayStore
from o2o.transport import ingest
from o2o.transport.ingest import IngestServer
from replay_peers import ACT_DIM, OBS_DIM, SpoolSender, make_chunk


def new_store(path) -> ReplayStore:
    return ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=256, task="test-task")


def hello(actor_id: str, next_seq: int = 0, instance: str = "", policy_run: str = "", version: int = -1) -> list:
    return wire.encode(wire.Hello(actor_id, "test-task", OBS_DIM, ACT_DIM, next_seq, version, policy_run, instance))


class Peer:
    """A raw DEALER: sends what a test says, returns what the learner answers."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames: list, want: type, timeout_ms: int = 10_000):
        """Send ``frames`` (if any), then return the first answer of type ``want``."""
        if frames:
            self.sock.send_multipart(frames)
        while True:
            assert self.sock.poll(timeout_ms), f"no {want.__name__} from the learner"
            msg = wire.decode(self.sock.recv_multipart())
            if isinstance(msg, want):
                return msg

    def close(self) -> None:
        self.sock.close()


def wait_acked(peer: Peer, seq: int) -> wire.Ack:
    while True:
        ack = peer.ask([], wire.Ack)
        if ack.seq >= seq:
            return ack


def test_chunks_from_a_connection_never_welcomed_are_refused_and_not_stored(tmp_path):
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005) as server:
        stranger = Peer(server.endpoint)
        reject = stranger.ask(wire.encode(make_chunk("arm", 0)), wire.Reject)
        assert (reject.reason, reject.seq) == (wire.NOT_WELCOMED, -1)  # seq -1: the actor keeps the chunk
        # Welcomed as another actor, it still cannot write as "arm".
        stranger.ask(hello("other"), wire.Welcome)
        reject = stranger.ask(wire.encode(make_chunk("arm", 0)), wire.Reject)
        assert reject.reason == wire.NOT_WELCOMED
        # After its own hello, the same chunk is taken.
        stranger.ask(hello("arm"), wire.Welcome)
        stranger.sock.send_multipart(wire.encode(make_chunk("arm", 0)))
        assert wait_acked(stranger, 0).seq == 0
        stranger.close()
        stats = server.stats()
    store.close()
    assert stats["rejected"] == {wire.NOT_WELCOMED: 2}
    assert len(ReplayStore.open(tmp_path / "replay", "r")) == 40


def test_one_actor_id_on_two_hosts_is_refused_and_the_real_one_keeps_writing(tmp_path):
    """Before: the second host's chunks made the real actor's look like duplicates (acked, dropped)."""
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005, actor_live_s=30.0) as server:
        real, impostor = Peer(server.endpoint), Peer(server.endpoint)
        real.ask(hello("arm", instance="host-a"), wire.Welcome)
        real.sock.send_multipart(wire.encode(make_chunk("arm", 0)))
        wait_acked(real, 0)
        refused = impostor.ask(hello("arm", instance="host-b"), wire.Reject)
        assert refused.reason == wire.ACTOR_ID_IN_USE and "unique actor_id" in refused.message
        assert impostor.ask(wire.encode(make_chunk("arm", 1)), wire.Reject).reason == wire.NOT_WELCOMED
        for seq in (1, 2):  # the real actor goes on, none of its chunks taken for duplicates
            real.sock.send_multipart(wire.encode(make_chunk("arm", seq)))
        wait_acked(real, 2)
        # The same process on a new socket (a reconnect) is taken over at once.
        again = Peer(server.endpoint)
        again.ask(hello("arm", next_seq=3, instance="host-a"), wire.Welcome)
        again.sock.send_multipart(wire.encode(make_chunk("arm", 3)))
        wait_acked(again, 3)
        stats = server.stats()
        for peer in (real, impostor, again):
            peer.close()
    store.close()
    assert stats["actors"]["arm"]["duplicates"] == 0 and stats["actors"]["arm"]["chunks"] == 4
    reopened = ReplayStore.open(tmp_path / "replay", "r")
    np.testing.assert_array_equal(reopened.read()["obs"], np.concatenate([make_chunk("arm", s).obs for s in range(4)]))


def test_a_silent_old_connection_lets_a_restarted_actor_in(tmp_path):
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", actor_live_s=0.5) as server:
        old = Peer(server.endpoint)
        old.ask(hello("arm", instance="run-1"), wire.Welcome)
        time.sleep(0.6)  # the old process died: its connection went silent
        new = Peer(server.endpoint)
        assert new.ask(hello("arm", instance="run-2"), wire.Welcome).actor_id == "arm"
        old.close()
        new.close()
    store.close()


def test_made_up_ids_leave_no_trace_in_the_store_and_are_capped(tmp_path):
    """Before: a hello with next_seq > 0 or one bad chunk made a permanent store actor, and
    commit.json (rewritten at every commit) grew with every id anyone ever sent."""
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005, max_actors=4, actor_live_s=0.5) as server:
        peer = Peer(server.endpoint)
        bad = [bytes(f) for f in wire.encode_chunk(make_chunk("x", 0))]
        bad[1] = bad[1][:-4]  # a truncated obs frame
        for i in range(4):
            peer.ask(hello(f"ghost-{i}", next_seq=1000), wire.Welcome)
        refused = Peer(server.endpoint).ask(hello("one-too-many"), wire.Reject)
        assert refused.reason == wire.TOO_MANY_ACTORS
        time.sleep(0.6)  # the ghosts went silent: new actors get their places
        real = Peer(server.endpoint)
        real.ask(hello("real", next_seq=5), wire.Welcome)  # seqs 0..4 declared lost
        header = wire.decode_header(bad[0])
        header["actor_id"], header["seq"] = "real", 5
        bad[0] = msgpack.packb(header)
        assert real.ask(bad, wire.Reject).reason == wire.BAD_LENGTH  # consumes seq 5
        real.sock.send_multipart(wire.encode(make_chunk("real", 6)))
        wait_acked(real, 6)
        stats = server.stats()
        peer.close()
        real.close()
    store.close()
    reopened = ReplayStore.open(tmp_path / "replay", "r")
    assert reopened.actor_ids == ["real"] and reopened.committed_seq("real") == 6
    assert stats["forgotten_actors"] >= 1 and len(stats["actors"]) <= 4
    record = json.loads((tmp_path / "replay" / "commit.json").read_text())
    assert [a["id"] for a in record["actors"]] == ["real"]


def test_values_out_of_the_stores_int32_columns_are_rejected_not_retried_forever(tmp_path):
    """Before: policy_version >= 2**31 passed the decoder and raised inside the store's append: the
    chunk was neither acked nor rejected and the actor resent it forever."""
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005) as server:
        actor = Peer(server.endpoint)
        actor.ask(hello("arm"), wire.Welcome)
        for seq, fields in ((0, {"policy_version": 2**31}), (1, {"step": 2**31 - 10})):
            frames = [bytes(f) for f in wire.encode_chunk(make_chunk("arm", seq))]
            header = msgpack.unpackb(frames[0])
            header.update(fields)
            frames[0] = msgpack.packb(header)
            reject = actor.ask(frames, wire.Reject)
            assert (reject.seq, reject.reason) == (seq, wire.BAD_HEADER)
        actor.sock.send_multipart(wire.encode(make_chunk("arm", 2)))
        assert wait_acked(actor, 2).seq == 2
        actor.close()
        assert server.stats()["internal_errors"] == 0
    store.close()


def test_an_actor_holding_another_runs_policy_is_sent_this_runs(tmp_path):
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", run_id="run-b") as server:
        server.publish_policy(1, b"onnx of run b")
        actor = Peer(server.endpoint)
        # It holds version 5 of an earlier learner run: a higher number, but not this run's.
        welcome = actor.ask(hello("arm", policy_run="run-a", version=5), wire.Welcome)
        assert (welcome.run_id, welcome.policy_version) == ("run-b", 1)
        policy = actor.ask([], wire.Policy)
        assert (policy.run_id, policy.version, bytes(policy.onnx)) == ("run-b", 1, b"onnx of run b")
        # Holding this run's newest, it is not sent again.
        actor.ask(hello("arm", policy_run="run-b", version=1), wire.Welcome)
        assert not actor.sock.poll(300)
        actor.close()
    store.close()


# ---------------------------------------------------------------- a store folder that turns read-only


def test_a_read_only_store_is_retried_and_ingest_resumes_when_it_is_writable_again(tmpfs, mounts):
    store = new_store(tmpfs / "replay")
    server = IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005, commit_retry_s=120).start()
    actor = SpoolSender(server.endpoint, "arm")
    actor.hello()
    actor.send(make_chunk("arm", 0))
    while actor.acked < 0:
        assert actor.receive(timeout_ms=10_000) is not None
    mounts.remount(tmpfs, "ro")
    try:
        for seq in (1, 2):
            actor.send(make_chunk("arm", seq))
        deadline = time.monotonic() + 30
        while server.stats()["commit_failures"] < 2:
            assert time.monotonic() < deadline, "the server never tried to commit"
            time.sleep(0.05)
        assert actor.acked == 0 and server.error is None  # nothing acked that is not durable; still serving
    finally:
        mounts.remount(tmpfs, "rw")
    while actor.acked < 2:
        assert actor.receive(timeout_ms=30_000) is not None, "ingest did not resume after the remount"
    actor.close()
    server.stop()
    store.close()
    reopened = ReplayStore.open(tmpfs / "replay", "r")
    np.testing.assert_array_equal(reopened.read()["obs"], np.concatenate([make_chunk("arm", s).obs for s in range(3)]))


def test_a_store_that_stays_read_only_stops_the_server_with_a_clear_error(tmpfs, mounts):
    store = new_store(tmpfs / "replay")
    server = IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005, commit_retry_s=1.0).start()
    actor = SpoolSender(server.endpoint, "arm")
    actor.hello()
    mounts.remount(tmpfs, "ro")
    try:
        actor.send(make_chunk("arm", 0))
        deadline = time.monotonic() + 60
        while server.error is None:
            assert time.monotonic() < deadline, "the server kept failing without giving up"
            time.sleep(0.05)
        assert "could not be written" in str(server.error) and "Read-only file system" in str(server.error)
        with pytest.raises(RuntimeError, match="ingest server failed"):
            server.stop()
    finally:
        mounts.remount(tmpfs, "rw")
        actor.close()
        store.close(commit=False)
    assert len(ReplayStore.open(tmpfs / "replay", "r")) == 0  # the store still opens, intact


# ---------------------------------------------------------------- log flooding


def test_a_flood_of_bad_frames_logs_a_few_short_lines_and_counts_every_rejection(tmp_path, caplog, monkeypatch):
    """Before: one line per message, quoting a 60 KB field whole, and a line per made-up id."""
    caplog.set_level(logging.INFO, logger="o2o.ingest")
    monkeypatch.setattr(ingest, "LOG_INTERVAL_S", 3600.0)  # the whole flood falls in one interval
    store = new_store(tmp_path / "replay")
    server = IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005).start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"\xab" * 255)  # the longest routing id ZeroMQ allows
    sock.connect(server.endpoint)
    chunk = [bytes(f) for f in wire.encode_chunk(make_chunk("x", 0))]
    n = 400
    for i in range(n):
        sock.send_multipart([b"\xc1 not msgpack %d" % i])  # bad_header, from an unknown socket
        header = wire.decode_header(chunk[0])
        header["actor_id"] = f"{i:04d}" + "g" * 124  # a new made-up 128-char id each time: not_welcomed
        sock.send_multipart([msgpack.packb(header), *chunk[1:]])
        # bad_header whose message quotes the 60 KB field it refuses.
        sock.send_multipart([msgpack.packb({"v": 1, "type": "hello", "actor_id": "a", "task": "t" * 60_000})])
    deadline = time.monotonic() + 60
    while sum(server.stats()["rejected"].values()) < 3 * n:
        assert time.monotonic() < deadline, f"only {server.stats()['rejected']} of {3 * n} rejections counted"
        time.sleep(0.05)
    server.stop()
    sock.close()
    store.close()
    assert server.stats()["rejected"] == {wire.BAD_HEADER: 2 * n, wire.NOT_WELCOMED: n}
    lines = [r.getMessage() for r in caplog.records if r.name == "o2o.ingest"]
    # One line per reason, and at stop one with the count of those held back.
    assert len(lines) == 4, lines
    assert max(map(len, lines)) < 500
    assert any(("socket " + "ab" * 8 + "...(255 bytes)") in line for line in lines)
    assert any("actor 0000gggg" in line and "...(128 chars) (not welcomed" in line for line in lines)
    held = {}
    for line in lines:
        if m := re.match(r"(\d+) more lines like the last 'rejected (\w+)' line", line):
            held[m.group(2)] = int(m.group(1))
    assert held == {wire.BAD_HEADER: 2 * n - 1, wire.NOT_WELCOMED: n - 1}  # logged + held back = counted


def test_an_ack_comes_only_once_its_commit_is_durable_and_receiving_goes_on_meanwhile(tmp_path, monkeypatch):
    """Group commit runs in its own thread: while a commit is being written (held at a gate here),
    the server keeps receiving (another actor is welcomed, its chunk staged) but acks nothing; the
    ack comes once the commit record is on disk, and names no seq a reader does not find committed."""
    gate, writing = threading.Event(), threading.Event()
    real_run = PendingCommit.run

    def held_run(commit):
        writing.set()
        assert gate.wait(60)
        real_run(commit)

    monkeypatch.setattr(PendingCommit, "run", held_run)
    path = tmp_path / "replay"
    store = new_store(path)
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005) as server:
        arm, other = Peer(server.endpoint), Peer(server.endpoint)
        arm.ask(hello("arm"), wire.Welcome)
        arm.sock.send_multipart(wire.encode(make_chunk("arm", 0)))
        assert writing.wait(60)  # arm's chunk is being committed
        other.ask(hello("other"), wire.Welcome)  # the server goes on receiving meanwhile
        other.sock.send_multipart(wire.encode(make_chunk("other", 0)))
        try:
            assert not arm.sock.poll(500), "an ack before its commit was durable"
            assert ReplayStore.open(path, "r").committed_seq("arm") == -1
        finally:
            gate.set()
        ack = wait_acked(arm, 0)
        assert ReplayStore.open(path, "r").committed_seq("arm") >= ack.seq == 0
        ack = wait_acked(other, 0)  # staged during arm's commit: acked after the next one
        assert ReplayStore.open(path, "r").committed_seq("other") >= ack.seq == 0
        arm.close()
        other.close()
        stats = server.stats()
    store.close()
    assert stats["commits"] >= 2 and stats["committed_rows"] == 80
