"""The online learner and the launcher under faults, with real processes: a diverging agent, a
store folder that turns read-only, a resume from an older checkpoint, eval episodes that used
to deadlock the fleet hold, and signals that used to orphan the actors."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from o2o.datasets.builders.common import record_episode
from o2o.datasets.minari_io import write_dataset
from o2o.datasets.replay_store import ReplayStore
from o2o.envs import make_env
from o2o.learner.checkpoint import AgentSpec, load_checkpoint, save_checkpoint
from o2o.learner.config import CalQLConfig, NetworkConfig
from o2o.learner.divergence import DivergedError, non_finite_tensors
from o2o.transport.ingest import IngestServer
from user_files_guard import minari_datasets_at
from o2o.learner.fleet import PolicyPublisher

TASK = "pointmaze-umaze"
# One torch thread: the learner shares 2 cores with actors (more threads thrash); one evaluation
# episode at the start and the end (no test here looks at the learner's own evaluations).
TINY = ["batch_size=32", "log_every=10", "checkpoint_every=20", "progress=false", "threads=1", "eval.episodes=1",
        "eval_every_steps=0"]  # fmt: skip


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def tiny_checkpoint(folder: Path) -> Path:
    net = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32])
    spec = AgentSpec(TASK, 8, 2, [-1.0, -1.0], [1.0, 1.0], dataclasses.asdict(CalQLConfig()), dataclasses.asdict(net))
    return save_checkpoint(folder / "checkpoint.pt", spec.build_agent(), spec, step=0)


def learner_cmd(run_dir: Path, endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "o2o.learner.online", f"task={TASK}", "build_episodes=6", f"endpoint={endpoint}",
            f"hydra.run.dir={run_dir}", *TINY, *args]  # fmt: skip


def start_actor(tmp: Path, endpoint: str, actor_id: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={endpoint}", f"actor_id={actor_id}",
           f"spool.dir={tmp / 'spool'}", "chunk_rows=50", "link.timeout_s=2",
           "link.drain_s=0",  # stopped after the learner: no acks can come, do not wait for them
           *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(tmp / f"{actor_id}.log", "w"), stderr=subprocess.STDOUT)


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_non_finite_agent_is_never_written_over_a_good_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path)
    agent, spec, _ = load_checkpoint(path)
    with torch.no_grad():
        next(agent.critic.parameters())[0, 0] = float("nan")
    assert non_finite_tensors(agent)
    with pytest.raises(DivergedError, match="previous checkpoint"):
        save_checkpoint(path, agent, spec, step=1)
    kept, _, payload = load_checkpoint(path)  # the good one is still there
    assert payload["step"] == 0 and not non_finite_tensors(kept)


def poisoned_dataset(root: Path) -> str:
    """A real Minari dataset whose rewards overflow float32 arithmetic: Q-learning on it diverges."""
    env = make_env(TASK, flatten=False)
    episodes = [record_episode(env, lambda obs, env, rng: env.action_space.sample(), seed) for seed in range(3)]
    env.close()
    for episode in episodes:
        episode["rewards"] = [3e38] * len(episode["rewards"])
    with minari_datasets_at(root):
        write_dataset("test/overflow-v0", make_env(TASK, flatten=False), episodes, algorithm_name="random",
                      description="rewards of 3e38")  # fmt: skip
    return "test/overflow-v0"


def test_a_diverging_learner_stops_with_a_clear_error_and_keeps_its_good_checkpoint(tmp_path):
    """Before: NaN weights made the policy export raise, and the exit path then saved NaN weights
    over checkpoint.pt, so resume= had nothing to go back to."""
    dataset = poisoned_dataset(tmp_path / "minari")
    run_dir, endpoint = tmp_path / "run", free_endpoint()
    cmd = learner_cmd(run_dir, endpoint, f"pretrained={tiny_checkpoint(tmp_path / 'pre')}", f"dataset={dataset}",
                      "build_missing_dataset=false", "warmup_rows=50", "publish_every=5", "online_updates=2000")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    learner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    actor = start_actor(tmp_path, endpoint, "a0")
    try:
        out, _ = learner.communicate(timeout=300)
    finally:
        stop(learner, actor)
    assert learner.returncode == 2, out[-3000:]
    assert "o2o-learner: error: the agent diverged by update" in out
    assert "resume from the last good checkpoint" in out
    agent, _, payload = load_checkpoint(run_dir)
    assert not non_finite_tensors(agent)  # the run's checkpoint still holds good weights


def committed(path: Path) -> int:
    try:
        return len(ReplayStore.open(path, "r"))
    except Exception:  # not created yet
        return 0


def test_a_learner_whose_store_turns_read_only_exits_with_a_clear_error(tmp_path, tmpfs, mounts):
    """Before: the failed commit ended the ingest thread silently; the learner waited for data
    forever while the actors filled their spools."""
    run_dir, endpoint, store = tmp_path / "run", free_endpoint(), tmpfs / "replay"
    cmd = learner_cmd(run_dir, endpoint, f"pretrained={tiny_checkpoint(tmp_path / 'pre')}", f"store={store}",
                      "warmup_rows=100000", "online_updates=0", "ingest.commit_retry_s=1")  # fmt: skip
    learner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    actor = start_actor(tmp_path, endpoint, "a0", "control_hz=500")
    try:
        deadline = time.monotonic() + 240
        while committed(store) < 200:
            assert time.monotonic() < deadline and learner.poll() is None, "no rows were committed"
            time.sleep(0.2)
        mounts.remount(tmpfs, "ro")
        out, _ = learner.communicate(timeout=120)
    finally:
        mounts.remount(tmpfs, "rw")
        stop(learner, actor)
    assert learner.returncode == 2, out[-3000:]
    assert "could not be written for" in out and "Read-only file system" in out and "resume" in out
    assert committed(store) >= 200  # every committed row is intact
    assert (run_dir / "checkpoint.pt").is_file()


def test_a_resumed_run_never_publishes_a_version_number_twice(tmp_path):
    """Before: a run resumed from a checkpoint older than its last publish counted from the
    checkpoint again, so the store labelled two different policies with one version."""
    path = tiny_checkpoint(tmp_path)
    agent, spec, _ = load_checkpoint(path)
    store = ReplayStore.create(tmp_path / "replay", 8, 2)
    with IngestServer(store, "tcp://127.0.0.1:*") as server:
        first = PolicyPublisher(agent, spec, tmp_path, checkpoint_version=0)
        first.server = server
        assert [first.publish(step) for step in range(3)] == [1, 2, 3]
    store.close()
    # The learner was killed; its checkpoint says version 1. The resumed run continues above 3.
    store = ReplayStore.open(tmp_path / "replay", "a")
    with IngestServer(store, "tcp://127.0.0.1:*") as server:
        resumed = PolicyPublisher(agent, spec, tmp_path, checkpoint_version=1, run_id=first.run_id)
        resumed.server = server
        assert resumed.publish(10) == 4 and resumed.run_id == first.run_id
    store.close()
    # A fresh run (another folder) is another learner run: its versions start again, under a new id.
    fresh = PolicyPublisher(agent, spec, tmp_path / "other", checkpoint_version=0)
    assert fresh.version == 0 and fresh.run_id != first.run_id


# ---------------------------------------------------------------- o2o-launch


def launch_cmd(tmp_path: Path, run_dir: Path, *args: str) -> list[str]:
    learner = ["batch_size=32", "log_every=10", "checkpoint_every=20", "build_episodes=6", "warmup_rows=50",
               "publish_every=50", "threads=1", "eval.episodes=1", "eval_every_steps=0",
               f"pretrained={tiny_checkpoint(tmp_path / 'pre')}"]  # fmt: skip
    return [sys.executable, "-m", "o2o.launch.launch", *(f"learner.{arg}" for arg in learner), "refresh_s=0.5",
            "actor.link.drain_s=0", f"hydra.run.dir={run_dir}", *args]  # fmt: skip


def test_launch_with_eval_episodes_runs_past_the_old_flow_control_deadlock(tmp_path, private_minari):
    """Before: eval rows counted towards the fleet hold but never became trainable; with an eval
    episode after every training episode, the fleet was held for good after the first one and
    the learner waited for data forever (o2o-launch's defaults: near 15,100 updates; here, with
    50-step episodes, near 260: the fleet hold of the old code, on committed rows, stopped there)."""
    run_dir = tmp_path / "run"
    cmd = launch_cmd(tmp_path, run_dir, "learner.online_updates=500", "actors=2", "actor.eval_every=1",
                     "learner.max_rows_ahead=60", "actor.control_hz=200", "learner.max_updates_ahead=10",
                     "actor.max_episode_steps=50")  # fmt: skip
    env = {**os.environ, "MINARI_DATASETS_PATH": str(private_minari)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 500 online updates" in done.stdout  # the old code stopped for good near 260
    store = ReplayStore.open(run_dir / "replay", "r")
    episodes = store.episodes(["eval", "ended", "length"])
    eval_rows = episodes["length"][episodes["eval"]].sum()
    assert eval_rows > 60 + 10  # more never-trainable rows than the old hold could ever release


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def test_a_second_signal_while_the_launcher_stops_leaves_no_actor_behind(tmp_path, private_minari):
    """Before: a second Ctrl-C or a SIGTERM during the learner's wait skipped stopping the actors,
    which ran on forever (link.on_learner_lost=continue). Ctrl-C then SIGTERM here; which signal
    comes second changes nothing in the launcher (test_graceful_stop.py checks its StopSignals)."""
    second = signal.SIGTERM
    run_dir = tmp_path / "run"
    # Chunks of 25 rows: the first commit (everyone up and talking) half a second after the actors start.
    cmd = launch_cmd(tmp_path, run_dir, "learner.online_updates=0", "actors=2", "actor.control_hz=50",
                     "actor.chunk_rows=25")  # fmt: skip
    env = {**os.environ, "MINARI_DATASETS_PATH": str(private_minari)}
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    actors_of_this_run = f"spool.dir={run_dir / 'spool'}"
    try:
        deadline = time.monotonic() + 240
        while committed(run_dir / "replay") == 0:  # learner and actors are up and talking
            assert time.monotonic() < deadline and launcher.poll() is None, "the launch never got going"
            time.sleep(0.2)
        assert len(processes_mentioning(actors_of_this_run)) == 2
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.3)  # it is now waiting for the learner to checkpoint and stop
        launcher.send_signal(second)
        launcher.communicate(timeout=120)
        deadline = time.monotonic() + 30
        while processes_mentioning(actors_of_this_run):
            assert time.monotonic() < deadline, "actor processes were left running"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_mentioning(actors_of_this_run) + processes_mentioning(f"hydra.run.dir={run_dir}"):
            os.kill(pid, signal.SIGKILL)
