"""The fleet at a glance: the actors' ``status`` message, the learner's status file, and ``o2o-status``.

Real parts: a real IngestServer and real Links on loopback, the status file on disk, and at the end a
real 2-actor ``o2o-launch`` run watched by ``o2o-status`` in a detached tmux pane (its screen captured).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from test_online_learner import free_endpoint

from o2o.actor.seams import PolicyBuilder
from o2o.datasets.replay_store import ReplayStore
from o2o.launch import status as o2o_status
from o2o.learner.status_file import STATUS_FILE, StatusFile, actor_rows
from o2o.transport import wire
from o2o.transport.config import LinkConfig
from o2o.transport.ingest import IngestServer
from o2o.transport.link import Link
from o2o.transport.spool import Spool
from o2o.transport.status_msg import STATES, Status
from replay_peers import ACT_DIM, OBS_DIM, make_chunk

REPORT = {"state": "acting", "waiting_for": None, "steps": 1200, "steps_per_s": 49.5, "episodes": 24,
          "successes": 6, "interventions": 17, "policy_version": 3, "spool_depth": 2}  # fmt: skip


def status_frames(**changes) -> list[bytes]:
    header = {"v": 1, "type": "status", "actor_id": "arm", **REPORT, **changes}
    return [msgpack.packb({k: v for k, v in header.items() if v is not ...})]


# ---------------------------------------------------------------- the wire message


def test_a_status_round_trips_and_numpy_numbers_from_the_actor_are_made_plain():
    status = Status("arm", **REPORT)
    assert wire.decode(wire.encode(status)) == status
    assert wire.decode(status_frames(waiting_for="reset key (r)")).waiting_for == "reset key (r)"
    numpy_report = {**REPORT, "steps": np.int64(1200), "steps_per_s": np.float32(49.5), "extra": "ignored"}
    assert wire.decode(wire.encode(Status.from_report("arm", numpy_report))) == status
    # The actor's own text is clipped to what the learner accepts, not refused.
    long_wait = Status.from_report("arm", {**REPORT, "state": "waiting_for_reset", "waiting_for": "x" * 500})
    assert len(long_wait.waiting_for) == 200 and long_wait.waiting_for.endswith("...")


BAD_FIELDS = [
    ({"state": "dancing"}, wire.BAD_VALUE),  # unknown state
    ({"state": "gone"}, wire.BAD_VALUE),  # the learner's own states are not the actor's to say
    ({"state": 3}, wire.BAD_HEADER),
    ({"state": ...}, wire.BAD_HEADER),  # missing
    ({"waiting_for": 5}, wire.BAD_HEADER),
    ({"waiting_for": "x" * 201}, wire.TOO_LARGE),
    ({"steps": -1}, wire.BAD_VALUE),  # negative count
    ({"episodes": -3}, wire.BAD_VALUE),
    ({"successes": "6"}, wire.BAD_HEADER),
    ({"interventions": True}, wire.BAD_HEADER),
    ({"spool_depth": 2**63}, wire.BAD_VALUE),
    ({"spool_depth": ...}, wire.BAD_HEADER),
    ({"steps_per_s": float("nan")}, wire.BAD_VALUE),
    ({"steps_per_s": -1.0}, wire.BAD_VALUE),
    ({"steps_per_s": "fast"}, wire.BAD_HEADER),
    ({"policy_version": -2}, wire.BAD_VALUE),
    ({"policy_version": 2**31}, wire.BAD_VALUE),  # an int32 column of the store
    ({"actor_id": ""}, wire.BAD_HEADER),
    ({"actor_id": "a" * 129}, wire.BAD_HEADER),
]  # fmt: skip


@pytest.mark.parametrize("changes, reason", BAD_FIELDS, ids=[f"{c}"[:40] for c, _ in BAD_FIELDS])
def test_every_bad_status_field_is_rejected_with_a_stable_reason(changes, reason):
    with pytest.raises(wire.WireError) as err:
        wire.decode(status_frames(**changes))
    assert err.value.reason == reason and reason in wire.REASONS
    with pytest.raises(wire.WireError) as err:  # one frame only
        wire.decode(status_frames() + [b"extra"])
    assert err.value.reason == wire.BAD_FRAMES


def test_the_actor_states_are_the_ones_the_contract_names():
    assert STATES == ("acting", "held", "paused", "waiting_for_reset", "e_stopped", "waiting_for_policy", "stopped")


# ---------------------------------------------------------------- a real server and real links


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def new_link(endpoint: str, tmp_path: Path, actor_id: str, obs_dim: int = OBS_DIM, **cfg) -> Link:
    spool = Spool(16, str(tmp_path / f"spool-{actor_id}"), 2**24, 2**20)
    config = LinkConfig(**{"heartbeat_s": 0.1, "timeout_s": 2.0, "drain_s": 1.0, "status_s": 0.05, **cfg})
    return Link(endpoint, actor_id, "test-task", obs_dim, ACT_DIM, spool, PolicyBuilder(None), config)


@pytest.fixture
def server(tmp_path):
    store = ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=256, task="test-task")
    # actor_live_s: past it the learner counts a silent actor as gone (and lets another process take its id).
    server = IngestServer(store, free_endpoint(), commit_interval_s=0.005, actor_live_s=1.0).start()
    yield server
    server.stop()
    store.close()


def test_a_link_sends_its_actors_status_and_a_failing_source_never_stops_it(server, tmp_path, caplog):
    report = dict(REPORT)
    link = new_link(server.endpoint, tmp_path, "arm")
    link.status_source = lambda: report
    link.start()
    try:
        assert link.wait_welcome(20)
        seen = lambda: server.stats()["actors"]["arm"].get("status")  # noqa: E731
        wait_for(lambda: seen() == REPORT, "the actor's status at the learner")
        before = time.time()
        report["state"], report["waiting_for"], report["steps"] = "waiting_for_reset", "reset key (r)", 1300
        wait_for(lambda: seen()["state"] == "waiting_for_reset", "the next status")
        assert seen()["waiting_for"] == "reset key (r)" and seen()["steps"] == 1300
        assert server.stats()["actors"]["arm"]["status_time"] >= before

        def broken() -> dict:
            raise RuntimeError("the env is gone")

        link.status_source = broken
        sent = link.stats.statuses
        wait_for(lambda: link.stats.status_errors >= 3, "the broken source to be called")
        assert link.stats.statuses == sent and "the actor's status could not be sent" in caplog.text
        lines = [r for r in caplog.records if r.getMessage() == "the actor's status could not be sent"]
        assert len(lines) == 1 and "the env is gone" in caplog.text  # with its traceback; rate-limited: one per 5 s
        # The link thread lives on: a chunk still goes out and is acked.
        link.add(make_chunk("arm", link.status().next_seq))
        wait_for(lambda: link.stats.acked_seq == 0, "the chunk's ack")
        link.status_source = lambda: {k: v for k, v in REPORT.items() if k != "episodes"}  # a field missing
        errors = link.stats.status_errors
        wait_for(lambda: link.stats.status_errors > errors, "a status with a missing field, not sent")
        link.status_source = lambda: {**REPORT, "state": "stopped"}
        wait_for(lambda: seen()["state"] == "stopped", "statuses again")
        assert link.error is None and link.fatal is None
    finally:
        link.close(0.0)
    assert server.stats()["rejected"] == {}  # the link never sent what the learner refuses


def test_a_closing_link_sends_the_actors_last_status_at_once(server, tmp_path):
    """The actor stopped: the learner hears it as it closes, not only once it has been silent long enough to
    count as gone."""
    report = dict(REPORT)
    link = new_link(server.endpoint, tmp_path, "arm", status_s=60.0)  # the periodic one would come in a minute
    link.status_source = lambda: report
    link.start()
    assert link.wait_welcome(20)
    seen = lambda: server.stats()["actors"]["arm"].get("status")  # noqa: E731
    wait_for(lambda: seen() is not None, "the first status")
    report["state"] = "stopped"
    link.close(0.0)
    wait_for(lambda: seen()["state"] == "stopped", "the last status, sent on close")


def test_a_bad_status_is_rejected_and_counted_and_the_server_serves_on(server, tmp_path):
    import zmq

    link = new_link(server.endpoint, tmp_path, "arm")
    link.status_source = lambda: REPORT
    link.start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.RCVTIMEO, 20_000)  # a missing answer fails (zmq.Again), never hangs
    rogue.connect(server.endpoint)
    try:
        assert link.wait_welcome(20)
        rogue.send_multipart(wire.encode(wire.Hello("rogue", "test-task", OBS_DIM, ACT_DIM, next_seq=0)))
        assert isinstance(wire.decode(rogue.recv_multipart()), wire.Welcome)
        for changes in ({"actor_id": "rogue", "state": "dancing"}, {"actor_id": "rogue", "steps": -5}):
            rogue.send_multipart(status_frames(**changes))
            reply = wire.decode(rogue.recv_multipart())
            assert isinstance(reply, wire.Reject) and reply.reason == wire.BAD_VALUE and reply.seq == -1
        rogue.send_multipart(status_frames(actor_id="arm"))  # a status for another, welcomed actor
        reply = wire.decode(rogue.recv_multipart())
        assert isinstance(reply, wire.Reject) and reply.reason == wire.NOT_WELCOMED
        stats = server.stats()
        assert stats["rejected"] == {wire.BAD_VALUE: 2, wire.NOT_WELCOMED: 1}
        assert stats["actors"]["rogue"]["rejected"] == {wire.BAD_VALUE: 2}
        assert stats["actors"]["rogue"]["status"] is None and stats["internal_errors"] == 0
        wait_for(lambda: server.stats()["actors"]["arm"].get("status") == REPORT, "the good actor's status")
    finally:
        rogue.close()
        ctx.term()
        link.close(0.0)


# ---------------------------------------------------------------- the status file


def test_the_status_file_holds_each_actors_status_and_the_learners_view(server, tmp_path):
    arm, ghost = new_link(server.endpoint, tmp_path, "arm"), new_link(server.endpoint, tmp_path, "ghost")
    arm.status_source = lambda: REPORT
    ghost.status_source = lambda: {**REPORT, "policy_version": 5}
    wrong = new_link(server.endpoint, tmp_path, "wrong", obs_dim=OBS_DIM + 1)  # another task's dimensions
    for link in (arm, ghost, wrong):
        link.start()
    publisher = SimpleNamespace(version=5, run_id="run-1")
    buffer = [None] * 123  # the online buffer's rows (len)
    run = SimpleNamespace(last_checkpoint={"updates": 400, "time": time.time() - 3}, switches=[])
    status = StatusFile(tmp_path, server, publisher, buffer, run, updates=400)
    try:
        assert arm.wait_welcome(20) and ghost.wait_welcome(20)
        arm.add(make_chunk("arm", arm.status().next_seq))  # 40 rows
        wait_for(lambda: server.stats()["actors"]["arm"]["rows"] == 40, "arm's rows")
        wait_for(lambda: "wrong" in server.stats()["refused_hellos"], "the refused hello")
        wait_for(lambda: server.stats()["actors"]["ghost"].get("status") is not None, "ghost's status")
        ghost.close(0.0)
        time.sleep(1.3)  # ghost silent for over actor_live_s = 1 s; arm keeps sending statuses
        status.write(450, "online")
    finally:
        for link in (arm, wrong):
            link.close(0.0)
    document = json.loads((tmp_path / STATUS_FILE).read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{STATUS_FILE}")] == []  # no temp file left
    learner = document["learner"]
    assert learner["state"] == "online" and learner["updates"] == 450
    # Every field o2o-status reads is there (its rate, updates_per_s, is measured in benchmarks, not here).
    assert set(learner) == {"state", "updates", "updates_per_s", "buffer_rows", "store_rows", "policy_version", "holding",
                            "endpoint", "last_checkpoint", "retraining", "last_retrain", "rejected"}  # fmt: skip
    assert (learner["buffer_rows"], learner["store_rows"], learner["policy_version"]) == (123, 40, 5)
    assert learner["last_checkpoint"]["updates"] == 400 and learner["last_retrain"] is None
    actors = document["actors"]
    assert set(actors) == {"arm", "ghost", "wrong"}
    arm_row = actors["arm"]
    assert {k: arm_row[k] for k in REPORT} == REPORT  # what the actor reported ...
    # ... and what the learner sees: 40 rows, published version 5 - the actor's 3 = lag 2, recent contact.
    assert (arm_row["rows"], arm_row["policy_lag"], arm_row["rejected"]) == (40, 2, 0)
    assert arm_row["since_contact_s"] < 1.0 and arm_row["status_age_s"] < 1.0
    assert actors["ghost"]["state"] == "gone" and actors["ghost"]["last_state"] == "acting"
    assert actors["ghost"]["since_contact_s"] > 1.0 and actors["ghost"]["policy_lag"] == 0
    assert actors["wrong"]["state"] == "refused" and actors["wrong"]["refused"]["reason"] == wire.BAD_SPEC
    assert "obs_dim=6" in actors["wrong"]["waiting_for"]


def test_the_status_file_is_replaced_whole_never_seen_half_written(tmp_path):
    """A reader polling while the learner rewrites the file only ever reads whole documents."""
    stats = {"committed_rows": 0, "rejected": {}, "refused_hellos": {}, "actors": {
        f"actor-{i}": {"rows": 10 * i, "policy_version": 1, "last_contact": time.time(), "rejected": {},
                       "status": {**REPORT, "waiting_for": "w" * 150}, "status_time": time.time()}
        for i in range(64)}}  # fmt: skip
    server = SimpleNamespace(config=SimpleNamespace(actor_live_s=10.0), stats=lambda: stats, holding=False,
                             endpoint="tcp://127.0.0.1:1")  # fmt: skip
    status = StatusFile(tmp_path, server, SimpleNamespace(version=1, run_id="r"), [])
    status.write(0, "online")
    done, torn = threading.Event(), []

    def read() -> None:
        while not done.is_set():
            try:
                json.loads((tmp_path / STATUS_FILE).read_text())
            except ValueError as err:
                torn.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    timings = []
    for updates in range(300):
        start = time.perf_counter()
        status.write(updates, "online")
        timings.append(time.perf_counter() - start)
    done.set()
    reader.join()
    assert torn == []
    print(f"status.json with 64 actors: median write {1e3 * float(np.median(timings)):.2f} ms")


def test_actor_rows_without_a_status_yet_use_the_chunks_version():
    stats = {"actors": {"old": {"rows": 80, "policy_version": 2, "last_contact": 100.0, "rejected": {"bad_value": 1}}}}
    row = actor_rows(stats, published=4, gone_after_s=10.0, now=101.0)["old"]
    assert (row["state"], row["policy_version"], row["policy_lag"], row["rejected"]) == (None, 2, 2, 1)


# ---------------------------------------------------------------- o2o-status


def document(now: float, **learner) -> dict:
    return {"format": 1, "time": now - 0.5, "learner": {
        "state": "online", "updates": 1500, "updates_per_s": 42.0, "buffer_rows": 3000, "store_rows": 3100,
        "policy_version": 7, "holding": False, "last_checkpoint": {"updates": 1400, "time": now - 20},
        "last_retrain": None, "retraining": None, **learner}, "actors": {
        "actor-0": {**REPORT, "policy_version": 6, "policy_lag": 1, "since_contact_s": 0.2},
        "a-very-long-actor-name-indeed": {**REPORT, "state": "waiting_for_reset", "waiting_for": "the r key " * 20,
                                          "since_contact_s": 0.4},
        "gone-one": {**REPORT, "state": "gone", "last_state": "acting", "since_contact_s": 95.0},
    }}  # fmt: skip


def test_the_frame_fits_100_columns_and_shows_every_actor():
    now = time.time()
    frame = o2o_status.render(document(now), None, Path("run/status.json"), now)
    lines = frame.splitlines()
    assert max(map(len, lines)) <= 100
    assert "learner  online" in frame and "updates 1500 (42.0/s)" in frame and "policy v7" in frame
    assert "last checkpoint update 1400 (20.0s ago)" in frame
    row = next(line for line in lines if line.startswith("actor-0 ")).split()
    assert row == ["actor-0", "acting", "49.5", "v6", "1", "2", "24", "6", "(25%)", "17", "0.2s"]
    assert any(line.startswith("a-very-long..") and "waiting_for_reset" in line for line in lines)
    assert any(line.strip().startswith("waiting for: the r key") for line in lines)
    gone = next(line for line in lines if line.startswith("gone-one")).split()
    assert gone[1] == "gone" and gone[-1] == "2m"


def test_a_stale_missing_or_half_written_file_is_said(tmp_path, capsys):
    now = time.time()
    stale = {**document(now), "time": now - 30}
    assert "STALE: written 30.0s ago" in o2o_status.render(stale, None, tmp_path, now)
    assert o2o_status.main([str(tmp_path), "--once"]) == 1
    assert f"no {STATUS_FILE} yet: waiting for the learner" in capsys.readouterr().out
    (tmp_path / STATUS_FILE).write_text('{"format": 1, "learner": {"sta')
    assert o2o_status.main([str(tmp_path), "--once"]) == 1
    assert "is unreadable" in capsys.readouterr().out
    (tmp_path / STATUS_FILE).write_text(json.dumps(document(time.time())))
    assert o2o_status.main([str(tmp_path), "--once"]) == 0
    assert "actor-0" in capsys.readouterr().out


def test_a_launch_folder_that_resumed_a_learner_elsewhere_leads_to_its_status(tmp_path):
    launch_dir, learner_dir = tmp_path / "launch", tmp_path / "learner"
    (launch_dir / ".hydra" / "launch").mkdir(parents=True)
    learner_dir.mkdir()
    (launch_dir / ".hydra" / "launch" / "config.yaml").write_text(
        f"learner:\n  resume: {learner_dir / 'checkpoint.pt'}\nactors: 2\n")
    assert o2o_status.status_path(launch_dir) == learner_dir / STATUS_FILE
    (launch_dir / ".hydra" / "launch" / "config.yaml").write_text("learner:\n  resume: null\n")
    assert o2o_status.status_path(launch_dir) == launch_dir / STATUS_FILE


# ---------------------------------------------------------------- end to end: o2o-launch seen by o2o-status in tmux


def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=check)


SOCKET = f"o2o-status-test-{os.getpid()}"  # a tmux server of our own: nobody else's sessions are touched
ROW = re.compile(r"^(actor-[01])\s+(\S+)\s+([\d.]+)\s+v(\d+)\s+(\d+)")


def test_o2o_status_shows_a_two_actor_launch_run_in_tmux(tmp_path, private_minari):
    if shutil.which("tmux") is None:
        pytest.skip("install tmux (apt-get install tmux)")
    from test_launch import tiny_checkpoint

    run_dir = tmp_path / "run"
    checkpoint = tiny_checkpoint(tmp_path / "pre")
    cmd = [sys.executable, "-m", "o2o.launch.launch", "refresh_s=0.5", "actors=2", f"learner.pretrained={checkpoint}",
           "learner.online_updates=1000000", "learner.warmup_rows=40", "learner.batch_size=32",
           "learner.eval.episodes=1", "learner.threads=1", "learner.build_episodes=6", "actor.link.drain_s=0",
           "actor.max_episode_steps=50", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "MINARI_DATASETS_PATH": str(private_minari)}
    started = time.monotonic()
    launch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    screen = ""

    def steps() -> dict[str, int]:
        """Each actor's reported step count, from the status file o2o-status reads (empty until there is one)."""
        try:
            return {a: s.get("steps", 0) for a, s in json.loads((run_dir / STATUS_FILE).read_text())["actors"].items()}
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return {}

    try:
        # The run folder as o2o-launch names it (the learner writes its status.json there); 110 x 30 terminal.
        watch = f"{sys.executable} -m o2o.launch.status {run_dir} --every 0.3"
        tmux("new-session", "-d", "-s", "fleet", "-x", "110", "-y", "30", watch)
        deadline = time.monotonic() + 90  # a hang guard: the screen is right after ~20 s on a loaded machine
        rows: dict[str, tuple] = {}
        while time.monotonic() < deadline and launch.poll() is None:
            screen = tmux("capture-pane", "-p", "-t", "fleet").stdout
            rows = {m[1]: m.groups() for m in map(ROW.match, screen.splitlines()) if m}
            if len(rows) == 2 and all(r[1] == "acting" for r in rows.values()) and all(n > 0 for n in steps().values()):
                break
            time.sleep(0.3)
        assert set(rows) == {"actor-0", "actor-1"}, f"screen:\n{screen}\nlaunch:\n{launch_output(launch)}"
        print(f"o2o-status after {time.monotonic() - started:.1f} s:\n{screen}")
        for actor_id, state, _rate, version, lag in rows.values():  # ROW matches only a rate written as a number
            assert state == "acting" and int(version) >= 1 and int(lag) >= 0, screen
            assert steps()[actor_id] > 0, screen  # it acted: the steps it reported, which the screen's rate is of
        lines = screen.splitlines()
        assert lines[0].startswith(f"o2o-status  {run_dir / STATUS_FILE}")
        learner = next(line for line in lines if line.startswith("learner"))
        assert learner.startswith("learner  online  (written") and "STALE" not in learner, screen
        assert re.search(r"updates \d+ \([\d.]+/s\)  policy v\d+  buffer \d+ rows  store \d+ rows", screen), screen
        assert re.search(r"last checkpoint update \d+ \([\d.]+s ago\)", screen), screen
        assert max(len(line.rstrip()) for line in lines) <= 100
        launch.send_signal(signal.SIGINT)  # the learner checkpoints and writes its last status
        assert launch.wait(timeout=180) == 0, launch_output(launch)
        print(f"o2o-launch stopped after {time.monotonic() - started:.1f} s")
        final = json.loads((run_dir / STATUS_FILE).read_text())
        assert final["learner"]["state"] == "stopped" and set(final["actors"]) == {"actor-0", "actor-1"}
    finally:
        tmux("kill-server", check=False)
        if launch.poll() is None:
            launch.kill()
            launch.wait()


def launch_output(launch: subprocess.Popen) -> str:
    if launch.poll() is None:
        return "(o2o-launch still running)"
    return (launch.stdout.read() or "")[-3000:]
