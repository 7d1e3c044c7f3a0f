"""The ingest server over real ZeroMQ sockets: exactly-once delivery, restarts, rejections, policies."""

import logging
import multiprocessing as mp
import signal
import socket

import msgpack
import numpy as np
import pytest

from o2o.transport import wire
from o2o.datasets.replay_store import ReplayStore
from o2o.transport.ingest import IngestServer
from replay_peers import (
    ACT_DIM,
    OBS_DIM,
    SpoolSender,
    expected_rows,
    make_chunk,
    run_actor,
    serve_until_killed,
)

SPAWN = mp.get_context("spawn")
N_CHUNKS = 60  # per actor, 40 rows each


def new_store(path) -> ReplayStore:
    return ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=256, task="test-task")


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def reap_children():
    """A failed test must not leave actor processes behind (they would wait for acks forever)."""
    yield
    for child in mp.active_children():
        child.kill()
        child.join()


def run_actors(endpoint: str, actor_ids: list[str], n_chunks: int = N_CHUNKS, window: int = 8) -> tuple[list, dict]:
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=run_actor, args=(endpoint, a, n_chunks, window, out), daemon=True) for a in actor_ids
    ]
    for p in procs:
        p.start()
    return procs, out


def collect(procs, out) -> dict:
    results = {r["actor_id"]: r for r in (out.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


def assert_exactly_once(path, actor_ids, n_chunks=N_CHUNKS) -> None:
    store = ReplayStore.open(path, "r")
    rows = store.read()
    assert len(store) == len(actor_ids) * n_chunks * 40
    for actor_id in actor_ids:
        mine = rows["actor"] == store.actor_ids.index(actor_id)
        want = expected_rows(actor_id, n_chunks)
        for name in wire.ARRAY_NAMES:  # no duplicate, no gap, in order
            np.testing.assert_array_equal(rows[name][mine], want[name].astype(rows[name].dtype))
        assert store.committed_seq(actor_id) == n_chunks - 1


def test_two_actor_processes_every_chunk_exactly_once(tmp_path):
    events = []
    store = new_store(tmp_path / "replay")
    server = IngestServer(store, "tcp://127.0.0.1:*", on_commit=events.append, commit_interval_s=0.005).start()
    results = collect(*run_actors(server.endpoint, ["arm-0", "arm-1"]))
    server.stop()
    store.close()

    assert {a: r["acked"] for a, r in results.items()} == {"arm-0": N_CHUNKS - 1, "arm-1": N_CHUNKS - 1}
    assert all(r["acks"] > 0 for r in results.values())
    assert_exactly_once(tmp_path / "replay", ["arm-0", "arm-1"])
    stats = server.stats()
    for actor_id in ("arm-0", "arm-1"):
        s = stats["actors"][actor_id]
        assert (s["chunks"], s["rows"], s["committed_seq"], s["rejected"]) == (N_CHUNKS, N_CHUNKS * 40, N_CHUNKS - 1, {})
    # on_commit saw every committed row once, in order, and each row that got an MC return once,
    # in the commit that closed its episode (committed then or earlier).
    stored = ReplayStore.open(tmp_path / "replay", "r").read()
    assert [(e.start, e.stop) for e in events if e.stop > e.start] == list(
        zip([0] + [e.stop for e in events if e.stop > e.start][:-1], [e.stop for e in events if e.stop > e.start]))
    assert events[-1].stop == len(stored["obs"])
    closed_obs = np.concatenate([e.closed["obs"] for e in events])
    closed_mc = np.concatenate([e.closed["mc_return"] for e in events])
    finite = np.isfinite(stored["mc_return"])
    assert len(closed_obs) == finite.sum()
    order_events, order_store = np.lexsort(closed_obs.T), np.lexsort(stored["obs"][finite].T)
    np.testing.assert_array_equal(closed_obs[order_events], stored["obs"][finite][order_store])
    np.testing.assert_array_equal(closed_mc[order_events], stored["mc_return"][finite][order_store])


def test_resend_after_server_crash_gives_no_duplicates_and_no_gaps(tmp_path):
    path, endpoint = tmp_path / "replay", free_endpoint()
    new_store(path).close()
    first = SPAWN.Process(target=serve_until_killed, args=(str(path), endpoint, 1600), daemon=True)
    first.start()
    procs, out = run_actors(endpoint, ["arm-0", "arm-1"])
    first.join(120)
    assert first.exitcode == -signal.SIGKILL  # it crashed mid-stream, with chunks in flight
    crashed_at = len(ReplayStore.open(path, "r"))
    assert 1600 <= crashed_at < 2 * N_CHUNKS * 40

    store = ReplayStore.open(path, "a")
    server = IngestServer(store, endpoint, commit_interval_s=0.005).start()
    collect(procs, out)
    server.stop()
    store.close()
    assert_exactly_once(path, ["arm-0", "arm-1"])


def test_chunk_ahead_of_a_missing_one_is_dropped_and_a_resend_requested(tmp_path):
    # E.g. messages queued in an actor's socket while the learner restarted arrive before its resends.
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005) as server:
        actor = SpoolSender(server.endpoint, "arm")
        actor.hello()
        actor.sock.send_multipart(wire.encode_chunk(make_chunk("arm", 0)))
        actor.sock.send_multipart(wire.encode_chunk(make_chunk("arm", 2)))  # chunk 1 went missing
        actor.spool = {seq: wire.encode_chunk(make_chunk("arm", seq)) for seq in range(3)}
        msg = actor.receive(timeout_ms=10_000)
        while not isinstance(msg, wire.Resend):  # receive() resends the spool from msg.seq
            assert msg is not None, "the server accepted chunk 2 although chunk 1 is missing"
            msg = actor.receive(timeout_ms=10_000)
        assert msg.seq == 1
        while actor.acked < 2:
            assert actor.receive(timeout_ms=30_000) is not None
        actor.close()
        assert server.stats()["actors"]["arm"]["out_of_order"] == 1
    store.close()
    assert_exactly_once(tmp_path / "replay", ["arm"], n_chunks=3)


def test_malformed_messages_are_rejected_and_counted_while_a_good_actor_is_served(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="o2o.ingest")
    store = new_store(tmp_path / "replay")
    server = IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=0.005).start()
    procs, out = run_actors(server.endpoint, ["good"])

    bad = SpoolSender(server.endpoint, "bad")
    assert isinstance(bad.hello(), wire.Welcome)
    frames = [bytes(f) for f in wire.encode_chunk(make_chunk("bad", 0))]
    header = msgpack.unpackb(frames[0])
    header["arrays"][0][2] = [40, OBS_DIM + 1]  # wrong shape for obs
    nan_obs = make_chunk("bad", 1).obs.copy()
    nan_obs[3, 1] = np.nan
    nan_frames = [bytes(f) for f in wire.encode_chunk(make_chunk("bad", 1))]
    nan_frames[1] = nan_obs.tobytes()
    short_frames = [bytes(f) for f in wire.encode_chunk(make_chunk("bad", 2))]
    short_frames[3] = short_frames[3][:-1]
    sent = [
        [b"\xc1 not msgpack"],
        [msgpack.packb(header), *frames[1:]],
        nan_frames,
        short_frames,
        wire.encode(wire.Ack("bad", 0)),  # actors do not send acks
    ]
    for message in sent:
        bad.sock.send_multipart(message)
    replies = []
    while len(replies) < len(sent):  # acks for the consumed seqs may come in between
        reply = bad.receive(timeout_ms=30_000)
        assert reply is not None
        if not isinstance(reply, wire.Ack):
            replies.append(reply)
    assert [(r.seq, r.reason) for r in replies] == [
        (-1, wire.BAD_HEADER), (0, wire.BAD_SHAPE), (1, wire.NON_FINITE), (2, wire.BAD_LENGTH), (-1, wire.BAD_TYPE),
    ]  # fmt: skip
    # Rejected seqs are consumed: the bad actor's next good chunk is accepted.
    bad.send(make_chunk("bad", 3))
    while bad.acked < 3:
        assert bad.receive(timeout_ms=30_000) is not None
    mismatched = SpoolSender(server.endpoint, "other-task")
    reply = mismatched.hello(obs_dim=OBS_DIM + 2)
    assert isinstance(reply, wire.Reject) and reply.reason == wire.BAD_SPEC

    collect(procs, out)
    server.stop()
    bad.close()
    mismatched.close()
    stats = server.stats()
    assert stats["rejected"] == {
        wire.BAD_HEADER: 1, wire.BAD_SHAPE: 1, wire.NON_FINITE: 1, wire.BAD_LENGTH: 1, wire.BAD_TYPE: 1,
        wire.BAD_SPEC: 1,
    }  # fmt: skip
    assert stats["actors"]["bad"]["rejected"] == {
        wire.BAD_HEADER: 1, wire.BAD_SHAPE: 1, wire.NON_FINITE: 1, wire.BAD_LENGTH: 1, wire.BAD_TYPE: 1,
    }  # fmt: skip
    assert stats["actors"]["bad"]["rows"] == 40 and stats["actors"]["good"]["rows"] == N_CHUNKS * 40
    assert "rejected a message from actor bad (seq 1): non_finite" in caplog.text
    rows = ReplayStore.open(tmp_path / "replay", "r").read()
    np.testing.assert_array_equal(rows["obs"][rows["actor"] == store.actor_ids.index("bad")], make_chunk("bad", 3).obs)


def test_policies_reach_connected_and_late_actors(tmp_path):
    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*") as server:
        early = SpoolSender(server.endpoint, "early")
        assert early.hello().policy_version == -1
        onnx = bytes(range(256)) * 100
        sha = server.publish_policy(1, onnx)
        while early.policy is None:
            assert early.receive(timeout_ms=30_000) is not None
        assert (early.policy.version, early.policy.sha256, early.policy.onnx) == (1, sha, onnx)
        with pytest.raises(ValueError, match="not above"):
            server.publish_policy(1, onnx)

        late = SpoolSender(server.endpoint, "late")
        assert late.hello().policy_version == 1
        while late.policy is None:  # sent right after the welcome, since the actor holds none
            assert late.receive(timeout_ms=30_000) is not None
        assert late.policy.version == 1
        early.close()
        late.close()


def test_data_plane_imports_no_torch():
    """Robots import the wire format and the store: neither may pull in torch."""
    import subprocess
    import sys

    code = (
        "import sys, o2o.transport.wire, o2o.datasets.replay_store, o2o.datasets.replay_export, o2o.transport.ingest; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_hold_reaches_every_actor_at_once_and_rides_on_acks(tmp_path):
    """The limiter's flow control: set_hold broadcasts an ack with hold, later acks keep it."""
    import zmq

    store = new_store(tmp_path / "replay")
    with IngestServer(store, "tcp://127.0.0.1:*") as server:
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)

        def next_ack() -> wire.Ack:
            while True:
                assert dealer.poll(10_000), "no message from the server"
                frames = dealer.recv_multipart()
                if wire.decode_header(frames[0])["type"] == "ack":
                    return wire.decode_ack(frames)

        dealer.send_multipart(wire.encode(wire.Hello("a", "test-task", OBS_DIM, ACT_DIM, 0)))
        dealer.recv_multipart()  # welcome
        server.set_hold(True)
        assert next_ack().hold is True
        dealer.send_multipart(wire.encode(make_chunk("a", 0)))
        ack = next_ack()
        assert ack.seq == 0 and ack.hold is True
        server.set_hold(False)
        assert next_ack().hold is False
        dealer.close()


@pytest.mark.parametrize("seconds", [0.0, -0.05, 1.5, float("nan")])
def test_a_commit_interval_outside_0_to_1_s_is_refused_before_the_server_starts(tmp_path, seconds):
    store = new_store(tmp_path / "replay")
    try:
        with pytest.raises(ValueError, match=r"commit_interval_s must be in \(0, 1\] seconds"):
            IngestServer(store, free_endpoint(), commit_interval_s=seconds)
    finally:
        store.close()
