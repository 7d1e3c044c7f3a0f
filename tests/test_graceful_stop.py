"""SIGTERM and SIGINT stop o2o-learner, o2o-actor, o2o-pretrain, o2o-retrain and o2o-launch
gracefully (commit, checkpoint, exit 0); a second signal exits at once. Real processes.

Before: a learner stopped with SIGTERM (systemd, Kubernetes, SLURM, `timeout`) died at once
with exit 143 and no final checkpoint; an actor whose learner had gone waited out its whole
link.drain_s however often it was signalled.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from o2o.datasets.replay_store import ReplayStore
from o2o.learner.checkpoint import AgentSpec, save_checkpoint
from o2o.learner.config import CalQLConfig, EvalConfig, NetworkConfig, PretrainConfig
from o2o.learner.offline import pretrain

TASK = "pointmaze-umaze"
TINY_NET = ["net.policy_hidden=[32,32]", "net.critic_hidden=[32,32]"]
OFFLINE = [f"task={TASK}", "build_episodes=6", "batch_size=32", "threads=1", "progress=false"]
HANG_S = 60  # generous guard against a hang; no test asserts a duration


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def tiny_checkpoint(folder: Path) -> Path:
    net = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32])
    spec = AgentSpec(TASK, 8, 2, [-1.0, -1.0], [1.0, 1.0], dataclasses.asdict(CalQLConfig()), dataclasses.asdict(net))
    return save_checkpoint(folder / "checkpoint.pt", spec.build_agent(), spec, step=0)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start_actor(tmp: Path, endpoint: str, actor_id: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={endpoint}", f"actor_id={actor_id}",
           f"spool.dir={tmp / 'spool'}", "chunk_rows=50", "control_hz=300", "link.timeout_s=2",
           f"stats_file={tmp / (actor_id + '.json')}", *args]  # fmt: skip
    return start(cmd, tmp / f"{actor_id}.log")


def wait_for(condition, what: str, *procs: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        time.sleep(0.2)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if "train/critic_loss" in line]


def committed(path: Path) -> int:
    try:
        return len(ReplayStore.open(path, "r"))
    except Exception:  # not created yet
        return 0


def stop(proc: subprocess.Popen, sig: int, log: Path) -> str:
    """Signal ``proc``, wait for it (never past HANG_S) and return its output."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {HANG_S} s after {signal.Signals(sig).name}:\n{log.read_text()[-3000:]}")
    return log.read_text()


def kill_all(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the shared mechanism (learner/stopping.py)

WAITER = """
import signal, sys, time
from o2o.learner.stopping import deferred, graceful_stop
with graceful_stop("demo"):
    try:
        with deferred():
            print("in the block", flush=True)
            time.sleep(1.0)  # the first signal arrives here
            print("block finished", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted after the block", flush=True)
    if sys.argv[1] == "second":
        time.sleep(60)  # the second signal must end this at once
print("handlers restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def run_waiter(signals: list[int]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", WAITER, "second" if len(signals) > 1 else "first"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "in the block\n"
    proc.send_signal(signals[0])
    if len(signals) > 1:
        assert proc.stdout.readline() == "block finished\n"
        assert proc.stdout.readline() == "interrupted after the block\n"
        proc.send_signal(signals[1])
    out, err = proc.communicate(timeout=HANG_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_first_signal_waits_for_the_deferred_block_then_interrupts(sig):
    done = run_waiter([sig])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "block finished\ninterrupted after the block\nhandlers restored: True\n"


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
                         ids=["SIGTERM-SIGINT", "SIGINT-SIGTERM"])
def test_a_second_signal_exits_at_once_with_one_line(first, second):
    done = run_waiter([first, second])
    assert done.returncode == 128 + second
    assert done.stderr == f"demo: second signal ({second.name}): exiting now, without waiting for the checkpoint\n"


def test_the_launcher_takes_any_signal_after_the_first_as_urgent_wherever_it_lands():
    """o2o-launch's signals, sent to this process: a first one in the run loop interrupts it; any
    later one (even one landing before the stop path runs) means "kill now", never a second
    graceful wait; a signal while the children start stops the run as the loop begins; once the
    learner is done, a first signal hurries the stop."""
    from o2o.launch.launch import StopSignals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN under `cmd &`
    signals = StopSignals()
    try:
        signals.enter_loop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises on the main thread at once
        assert not signals.urgent.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # straight after, before any stop path began
        assert signals.urgent.is_set()
    finally:
        signals.restore()

    signals = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # while the children start: remembered
        assert not signals.urgent.is_set()
        with pytest.raises(KeyboardInterrupt):
            signals.enter_loop()
    finally:
        signals.restore()

    signals = StopSignals()
    try:
        signals.enter_loop()
        signals.leave_loop()  # the learner finished on its own
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.urgent.is_set()
    finally:
        signals.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers given back


# ---------------------------------------------------------------- o2o-learner and o2o-actor


def test_learner_and_actors_stop_gracefully_and_a_second_signal_cuts_the_drain(tmp_path):
    run_dir, endpoint = tmp_path / "run", free_endpoint()
    learner_log = tmp_path / "learner.log"
    learner = start([
        sys.executable, "-m", "o2o.learner.online", *OFFLINE, f"endpoint={endpoint}",
        f"pretrained={tiny_checkpoint(tmp_path / 'pre')}", "online_updates=0", "warmup_rows=100", "log_every=10",
        "publish_every=50", "checkpoint_every=1000000", "eval.episodes=1", "eval_every_steps=0", "max_rows_ahead=0",
        f"hydra.run.dir={run_dir}",
    ], learner_log)  # fmt: skip
    drained = {"int": signal.SIGINT, "term": signal.SIGTERM}  # actor id -> its one signal
    actors = {a: start_actor(tmp_path, endpoint, a) for a in drained}
    actors["urgent"] = start_actor(tmp_path, endpoint, "urgent", "link.drain_s=300")  # would wait 5 min for acks
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 1, "online updates", learner, *actors.values())

        # An actor stopped while its learner runs: its spool drains (acked) before it exits 0.
        for actor_id, sig in drained.items():
            out = stop(actors[actor_id], sig, tmp_path / f"{actor_id}.log")
            assert actors[actor_id].returncode == 0, out[-3000:]
        stats = {a: json.loads((tmp_path / f"{a}.json").read_text()) for a in drained}
        for actor_id in drained:
            assert stats[actor_id]["link"]["spool_depth"] == 0 and stats[actor_id]["link"]["acked_seq"] >= 0

        # With its learner frozen, an actor's first signal waits for acks (link.drain_s); a
        # second one gives up the wait: exit 130, the unacked chunks kept in its spool on disk.
        learner.send_signal(signal.SIGSTOP)
        time.sleep(1.0)  # it keeps collecting, unacked
        actors["urgent"].send_signal(signal.SIGTERM)
        time.sleep(0.5)  # now in the drain
        out = stop(actors["urgent"], signal.SIGINT, tmp_path / "urgent.log")
        assert actors["urgent"].returncode == 128 + signal.SIGINT, out[-3000:]
        stats["urgent"] = json.loads((tmp_path / "urgent.json").read_text())
        assert stats["urgent"]["link"]["spool_depth"] > 0 and stats["urgent"]["link"]["spool_disk_chunks"] > 0
        learner.send_signal(signal.SIGCONT)

        # The learner stopped by SIGTERM: commit, final checkpoint of every update done, exit 0.
        out = stop(learner, signal.SIGTERM, learner_log)
        assert learner.returncode == 0, out[-3000:]
    finally:
        kill_all(learner, *actors.values())
    found = re.search(r"o2o-learner: stopped by SIGTERM after (\d+) updates; checkpoint written to (\S+)", out)
    assert found, out[-3000:]
    updates = int(found.group(1))
    assert Path(found.group(2)) == run_dir / "checkpoint.pt" and "Traceback" not in out
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["extra"]["online_updates"] == checkpoint["step"] == updates >= max(train_steps(run_dir))

    store = ReplayStore.open(run_dir / "replay", "r")
    column = store.read(columns=["actor"])["actor"]
    rows = {a: (column == store.actor_ids.index(a)).sum() for a in actors}
    for actor_id in drained:  # committed = acked: every step a drained actor took is in the store
        assert store.committed_seq(actor_id) == stats[actor_id]["link"]["acked_seq"]
        assert rows[actor_id] == stats[actor_id]["actor"]["steps"] > 0
    # The urgent actor's last chunks may have reached the frozen learner's socket and been committed
    # after it went on, their acks never seen: its spool keeps them, the store drops them as
    # duplicates when its next run resends them.
    assert store.committed_seq("urgent") >= stats["urgent"]["link"]["acked_seq"]
    assert 0 < rows["urgent"] <= stats["urgent"]["actor"]["steps"]


# ---------------------------------------------------------------- o2o-pretrain and o2o-retrain


def test_pretrain_stops_with_a_checkpoint_that_resume_continues(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "pretrain.log"
    proc = start([sys.executable, "-m", "o2o.learner.pretrain", *OFFLINE, *TINY_NET, "steps=1000000", "log_every=10",
                  "checkpoint_every=1000000", "eval.every=0", f"hydra.run.dir={run_dir}"], log)  # fmt: skip
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 1, "pretraining updates", proc)
        out = stop(proc, signal.SIGTERM, log)
    finally:
        kill_all(proc)
    assert proc.returncode == 0, out[-3000:]
    found = re.search(r"o2o-pretrain: stopped by SIGTERM at step (\d+) of 1000000", out)
    assert found and "Traceback" not in out, out[-3000:]
    step = int(found.group(1))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == step >= max(train_steps(run_dir))
    assert (run_dir / "policy.onnx").is_file()  # exported, as at the end

    # `resume` continues from that step (in this process: a second start would cost ~10 s).
    cfg = PretrainConfig(task=TASK, build_episodes=6, batch_size=32, threads=1, progress=False, steps=step + 5,
                         log_every=5, resume=str(run_dir), net=NetworkConfig(policy_hidden=[32, 32],
                         critic_hidden=[32, 32]), eval=EvalConfig(every=0, episodes=1))  # fmt: skip
    pretrain(cfg, run_dir)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == step + 5
    assert train_steps(run_dir)[-1] == step + 5


def test_retrain_stops_with_its_checkpoint_and_a_stopped_summary(tmp_path):
    store = ReplayStore.create_for_task(tmp_path / "replay", TASK)  # empty: the offline data alone
    store.close()
    run_dir, log = tmp_path / "run", tmp_path / "retrain.log"
    proc = start([sys.executable, "-m", "o2o.learner.retrain", *OFFLINE, *TINY_NET, f"store={tmp_path / 'replay'}",
                  "steps=1000000", "log_every=10", "checkpoint_every=1000000", "eval.every=0", "eval.episodes=1",
                  f"hydra.run.dir={run_dir}"], log)  # fmt: skip
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 1, "retraining updates", proc)
        out = stop(proc, signal.SIGINT, log)
    finally:
        kill_all(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "o2o-retrain: stopped by SIGINT at step" in out and "Traceback" not in out, out[-3000:]
    summary = json.loads((run_dir / "retrain.json").read_text())
    assert summary["status"] == "stopped" and "eval" not in summary  # an online learner never takes it
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == summary["stopped_at_step"] > 0


# ---------------------------------------------------------------- o2o-launch


def test_launch_stopped_by_sigterm_stops_the_learner_with_its_checkpoint(tmp_path):
    """SIGTERM, as `timeout` or a scheduler sends; Ctrl-C (SIGINT) takes the same path (a
    KeyboardInterrupt in the launcher), not run twice here to keep the file short."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    learner = ["batch_size=32", "log_every=10", "checkpoint_every=1000000", "build_episodes=6", "warmup_rows=50",
               "publish_every=50", "online_updates=0", "eval.episodes=1", "eval_every_steps=0", "threads=1",
               f"pretrained={tiny_checkpoint(tmp_path / 'pre')}"]  # fmt: skip
    proc = start([sys.executable, "-m", "o2o.launch.launch", *(f"learner.{arg}" for arg in learner), "actors=1",
                  "actor.control_hz=300", "actor.link.drain_s=1", "refresh_s=0.5", f"hydra.run.dir={run_dir}"],
                 log)  # fmt: skip
    try:
        wait_for(lambda: committed(run_dir / "replay") > 0, "the actor's first rows", proc)
        out = stop(proc, signal.SIGTERM, log)
    finally:
        kill_all(proc)
    learner_out = (run_dir / "learner.log").read_text()
    assert proc.returncode == 0, out[-3000:] + learner_out[-3000:]
    found = re.search(r"o2o-learner: stopped by SIGINT after (\d+) updates", learner_out)  # the launcher sends SIGINT
    assert found, learner_out[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["extra"]["online_updates"] == int(found.group(1))
    assert "actor actor-0 stopped: stop requested" in (run_dir / "actor-0.log").read_text()
    assert "done:" in out and "Traceback" not in out
