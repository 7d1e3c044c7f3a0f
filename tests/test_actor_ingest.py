"""Two o2o-actor processes on MuJoCo against a real IngestServer + ReplayStore: exactly once, policies, kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from o2o.datasets.replay_store import ReplayStore
from o2o.transport.ingest import IngestServer

TASK = "pointmaze-umaze"


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> bytes:
    from o2o.learner.checkpoint import AgentSpec
    from o2o.learner.export_onnx import export_policy

    spec = AgentSpec(task=TASK, obs_dim=8, action_dim=2, action_low=[-1.0, -1.0], action_high=[1.0, 1.0], algo={},
                     net={"policy_hidden": [64, 64], "critic_hidden": [8]})  # fmt: skip
    path = tmp_path_factory.mktemp("policy") / "policy.onnx"
    return export_policy(spec.build_agent(), spec, path, exporter="torchscript").read_bytes()


class Actors:
    """o2o-actor subprocesses; any left running at the end of a test are killed."""

    def __init__(self, root: Path, endpoint: str):
        self.root, self.endpoint = root, endpoint
        self.procs: list[subprocess.Popen] = []

    def start(self, actor_id: str, run: int) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={self.endpoint}", f"actor_id={actor_id}",
            f"spool.dir={self.root / 'spool'}", f"stats_file={self.stats_path(actor_id, run)}", f"seed={run}",
            "chunk_rows=50", "control_hz=1000", "link.heartbeat_s=0.2", "link.timeout_s=3", "log_every_s=2",
        ]  # fmt: skip
        log = open(self.root / f"{actor_id}-{run}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stats_path(self, actor_id: str, run: int) -> Path:
        return self.root / f"{actor_id}-{run}.json"

    def stats(self, actor_id: str, run: int) -> dict:
        return json.loads(self.stats_path(actor_id, run).read_text())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(condition, what: str, actors: Actors, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{actors.logs()}")
        time.sleep(0.02)


def test_two_actors_exactly_once_policies_and_a_kill_9_restart(tmp_path, policy):
    store = ReplayStore.create_for_task(tmp_path / "store", TASK)
    server = IngestServer(store, commit_interval_s=0.01).start()
    actors = Actors(tmp_path, server.endpoint)
    seen = lambda actor_id: server.stats()["actors"].get(actor_id, {})  # noqa: E731
    rows = lambda actor_id: seen(actor_id).get("rows", 0)  # noqa: E731
    try:
        server.publish_policy(0, policy)
        a1, b = actors.start("A", 1), actors.start("B", 1)
        wait_for(lambda: rows("A") > 0 and rows("B") > 0, "both actors' first rows", actors)
        for version in (1, 2):
            server.publish_policy(version, policy)
            wait_for(lambda: all(seen(a).get("policy_version") == version for a in "AB"),
                     f"policy version {version} on both actors' transitions", actors)  # fmt: skip

        a1.send_signal(signal.SIGKILL)  # mid-episode: 300-step episodes, a chunk every 50 steps
        a1.wait()
        b_rows = rows("B")
        wait_for(lambda: rows("B") > b_rows + 300, "the server to keep serving B", actors)

        a2 = actors.start("A", 2)  # same actor_id and spool folder
        a_rows = rows("A")
        wait_for(lambda: rows("A") > a_rows + 300, "rows from the restarted A", actors)
        server.publish_policy(3, policy)
        wait_for(lambda: all(seen(a).get("policy_version") == 3 for a in "AB"), "policy version 3", actors)

        for proc in (a2, b):
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc in (a2, b)] == [0, 0], actors.logs()
    finally:
        actors.kill_all()
        server.stop()

    stats = server.stats()["actors"]
    data = store.read(columns=["actor", "episode_id", "step", "policy_version"])
    for actor_id in "AB":
        # Seq accounting: every seq from 0 to the last committed one holds an accepted chunk (no gap, none lost).
        assert stats[actor_id]["lost_seqs"] == 0 and stats[actor_id]["rejected"] == {}
        assert stats[actor_id]["chunks"] == store.committed_seq(actor_id) + 1
        mine = data["actor"] == store.actor_ids.index(actor_id)
        keys = np.stack([data["episode_id"][mine], data["step"][mine]], axis=1)
        assert len(np.unique(keys, axis=0)) == len(keys)  # each transition once
        assert set(data["policy_version"][mine].tolist()) == {0, 1, 2, 3}

    b_stats = actors.stats("B", 1)
    assert b_stats["actor"]["first_seq"] == 0 and b_stats["link"]["acked_seq"] == store.committed_seq("B")
    assert b_stats["actor"]["chunks"] == stats["B"]["chunks"] and b_stats["actor"]["rows"] == stats["B"]["rows"]

    # The restarted A went on right after the last seq the store had from the killed one, and
    # acted with the current policy (version 2) from its first step, not with nothing.
    a2_stats = actors.stats("A", 2)
    first = a2_stats["actor"]["first_seq"]
    assert first > 0 and a2_stats["link"]["acked_seq"] == store.committed_seq("A")
    assert a2_stats["actor"]["chunks"] == store.committed_seq("A") + 1 - first
    mine = data["actor"] == store.actor_ids.index("A")
    from_a2 = mine & (data["episode_id"] >= first)  # episode ids are the seq of their first chunk
    assert from_a2.sum() == a2_stats["actor"]["rows"]
    assert data["policy_version"][from_a2][0] == 2
    assert a2_stats["actor"]["swaps"][0][0] == 2
