"""`o2o-learner` with real `o2o-actor` processes: kill -9 the learner mid-ingest, resume it.

The store opens with every committed row; the actors' spooled chunks are resent after
the restart; no duplicates and no gaps; training and policy publishing go on.
"""

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from o2o.datasets.replay_store import ReplayStore
from o2o.learner.checkpoint import AgentSpec, save_checkpoint
from o2o.learner.config import CalQLConfig, NetworkConfig

TASK = "pointmaze-umaze"
STEPS_PER_ACTOR = 1500
CONTROL_HZ = 400  # slow enough that the learner is killed while the actors are still sending


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def tiny_checkpoint(path: Path) -> Path:
    net = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32])
    spec = AgentSpec(TASK, 8, 2, [-1.0, -1.0], [1.0, 1.0], dataclasses.asdict(CalQLConfig()), dataclasses.asdict(net))
    return save_checkpoint(path / "checkpoint.pt", spec.build_agent(), spec, step=0)


def start_learner(run_dir: Path, endpoint: str, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "o2o.learner.online", f"task={TASK}", "build_episodes=6", f"endpoint={endpoint}",
        "online_updates=0", "warmup_rows=300", "publish_every=25", "checkpoint_every=25", "log_every=25",
        "batch_size=32", "max_rows_ahead=0", "progress=false", f"hydra.run.dir={run_dir}",
        # One torch thread (it shares 2 cores with the actors); one evaluation episode at start and end.
        "threads=1", "eval.episodes=1", "eval_every_steps=0", *args,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(run_dir.parent / f"{run_dir.name}.log", "a"), stderr=subprocess.STDOUT)


def start_actor(tmp: Path, endpoint: str, actor_id: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={endpoint}", f"actor_id={actor_id}",
        f"spool.dir={tmp / 'spool'}", f"max_steps={STEPS_PER_ACTOR}", f"control_hz={CONTROL_HZ}", "chunk_rows=50", "link.timeout_s=2",
        "link.drain_s=300",  # the actors may finish before the learner is back: they wait for it
        f"stats_file={tmp / (actor_id + '.json')}", "log_every_s=1",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(tmp / f"{actor_id}.log", "w"), stderr=subprocess.STDOUT)


def committed_rows(path: Path) -> int:
    try:
        return len(ReplayStore.open(path, "r"))
    except Exception:  # not created yet
        return 0


def trained_after(metrics: Path, offset: int) -> bool:
    """Whether metrics.jsonl holds a training line past byte ``offset``."""
    with open(metrics, "rb") as f:
        f.seek(offset)
        return b'"train/critic_loss"' in f.read()


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_kill_9_learner_mid_ingest_then_resume(tmp_path):
    run_dir, endpoint = tmp_path / "run", free_endpoint()
    run_dir.mkdir()
    checkpoint = tiny_checkpoint(tmp_path / "pretrained")
    learner = start_learner(run_dir, endpoint, f"pretrained={checkpoint}")
    actors = {a: start_actor(tmp_path, endpoint, a) for a in ("a0", "a1")}
    try:
        wait_for(lambda: committed_rows(run_dir / "replay") >= 1000, "rows before the crash")
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        at_crash = ReplayStore.open(run_dir / "replay", "r")  # opens: the commit record is intact
        rows_at_crash = at_crash.read(columns=["actor", "episode_id", "step"])
        seq_at_crash = {a: at_crash.committed_seq(a) for a in actors}
        assert 1000 <= len(at_crash) < 2 * STEPS_PER_ACTOR  # killed mid-ingest

        logged = (run_dir / "metrics.jsonl").stat().st_size
        learner = start_learner(run_dir, endpoint, f"resume={run_dir}")
        for actor_id, proc in actors.items():
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{actor_id}.log").read_text()[-3000:]
        wait_for(lambda: committed_rows(run_dir / "replay") >= 2 * STEPS_PER_ACTOR, "every row committed")
        # Some updates after the restart (it checkpoints them as it stops).
        wait_for(lambda: trained_after(run_dir / "metrics.jsonl", logged), "updates after the restart")
    finally:
        for proc in [learner, *actors.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in [learner, *actors.values()]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    store = ReplayStore.open(run_dir / "replay", "r")
    data = store.read(columns=["actor", "episode_id", "step", "policy_version", "mc_return", "eval"])
    # Committed rows before the crash are still there, unchanged.
    for name, column in rows_at_crash.items():
        np.testing.assert_array_equal(data[name][: len(column)], column)
    for actor_id in ("a0", "a1"):
        stats = json.loads((tmp_path / f"{actor_id}.json").read_text())
        mine = data["actor"] == store.actor_ids.index(actor_id)
        # Every step the actor took is in the store exactly once: no loss, no duplicate.
        assert stats["actor"]["steps"] == STEPS_PER_ACTOR == mine.sum()
        keys = np.stack([data["episode_id"][mine], data["step"][mine]], axis=1)
        assert len(np.unique(keys, axis=0)) == len(keys)
        # No gap: within each episode the steps run 0, 1, 2, ...
        for episode in np.unique(keys[:, 0]):
            steps = np.sort(keys[keys[:, 0] == episode, 1])
            np.testing.assert_array_equal(steps, np.arange(len(steps)))
        assert store.committed_seq(actor_id) == stats["link"]["acked_seq"]
        # The actor noticed the crash and reconnected to the new learner. (Whether a chunk was in
        # flight at the kill is timing; the exactly-once checks above hold either way.)
        assert stats["link"]["reconnects"] >= 2
    # What the actors spooled while the learner was down reached the restarted learner.
    assert sum(store.committed_seq(a) for a in actors) > sum(seq_at_crash.values())
    # Finished episodes carry their MC returns; the policy kept being updated and published.
    assert np.isfinite(data["mc_return"]).sum() > 0
    assert data["policy_version"].min() >= 1  # every row was acted by a published policy
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["extra"]["online_updates"] > 0 and resumed["extra"]["policy_version"] >= 2
