"""Offline RL as a subroutine of online RL, end to end: an `o2o-learner` from scratch (SAC) with a
real `o2o-actor`, retraining on its own store with `o2o-retrain` every N updates and at the end.

recommend: the retrained policy becomes <run>/recommended.onnx and the online agent is untouched;
fine_tune: the online agent continues from the retrained one (checked on the weights).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_online_learner import free_endpoint

TASK = "pointmaze-umaze"


def start_learner_with_actor(run_dir: Path, mode: str, endpoint: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The learner (output in <run_dir>/../learner.out and learner.log) and its actor (actor.log)."""
    learner_cmd = [
        sys.executable, "-m", "o2o.learner.online", f"task={TASK}", f"endpoint={endpoint}", "from_scratch=true",
        "algo.cql_alpha=0.0", "algo.calibrated=false", "online_updates=200", "warmup_rows=300", "batch_size=32",
        "publish_every=100", "checkpoint_every=100", "log_every=50", "max_rows_ahead=100", "max_updates_ahead=0", "progress=false",
        "net.policy_hidden=[32,32]", "net.critic_hidden=[32,32]", "eval.episodes=1",
        "threads=1",  # the learners, their retrains and the actors share 2 cores: more torch threads thrash
        "retrain_every=100", f"retrain_at_end={str(mode == 'fine_tune').lower()}", f"retrain_mode={mode}",
        "retrain_steps=30",
        "retrain_args=['batch_size=32','log_every=10']", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    actor_cmd = [
        sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={endpoint}", "actor_id=a0",
        f"spool.dir={run_dir.parent / 'spool'}", "policy.act_before_policy=true", "max_steps=4000", "max_episode_steps=50",
        "link.timeout_s=2", "log_every_s=1",
        "link.drain_s=0",  # stopped after the learner has exited: no acks can come
    ]  # fmt: skip
    with open(run_dir.parent / "actor.log", "w") as actor_log:
        actor = subprocess.Popen(actor_cmd, stdout=actor_log, stderr=subprocess.STDOUT)
    with open(run_dir.parent / "learner.out", "w") as out, open(run_dir.parent / "learner.log", "w") as err:
        learner = subprocess.Popen(learner_cmd, stdout=out, stderr=err)
    return learner, actor


def finish(run_dir: Path, learner: subprocess.Popen, actor: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        learner.wait(timeout=600)
    finally:
        if learner.poll() is None:
            learner.kill()
            learner.wait()
        actor.terminate()
        actor.wait(30)
    out, err = (run_dir.parent / "learner.out").read_text(), (run_dir.parent / "learner.log").read_text()
    return subprocess.CompletedProcess(learner.args, learner.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Both modes' runs, side by side: each is mostly one process after another starting up (the
    learner, its retrains), so together they take little longer than one."""
    endpoints = [free_endpoint()]
    while len(endpoints) < 2:
        endpoint = free_endpoint()
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    started = {}
    try:
        for mode, endpoint in zip(("recommend", "fine_tune"), endpoints):
            run_dir = tmp_path_factory.mktemp(mode) / "run"
            run_dir.mkdir()
            started[mode] = (run_dir, *start_learner_with_actor(run_dir, mode, endpoint))
    finally:
        done = {mode: (run_dir, finish(run_dir, learner, actor)) for mode, (run_dir, learner, actor) in started.items()}
    return done


def retrains(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("retrain/") for k in r)]


def weights(path) -> dict[str, torch.Tensor]:
    agent = torch.load(path, map_location="cpu", weights_only=True)["agent"]
    return {k: v for k, v in agent.items() if k.startswith(("policy.", "critic.", "log_alpha"))}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("mode", ["recommend", "fine_tune"])
def test_offline_rl_as_a_subroutine_of_online_rl(runs, mode):
    run_dir, learner = runs[mode]
    assert learner.returncode == 0, learner.stderr[-4000:]

    jobs = sorted(p for p in (run_dir / "retrain").iterdir())
    assert jobs[0].name == "00000100"  # the first periodic retrain (one runs at a time: 200 may be skipped)
    summaries = [json.loads((job / "retrain.json").read_text()) for job in jobs]
    assert all(s["status"] == "done" and s["offline_rows"] == 0 and s["online_rows"] > 0 for s in summaries)
    assert summaries[0]["store_rows"] <= summaries[-1]["store_rows"]  # each saw the store's prefix at its time
    assert len(retrains(run_dir)) == len(jobs)  # each finished retrain is logged with its evaluation
    log = (run_dir / "online.log").read_text()
    # The learner's own evaluations: the starting policy, every eval_every_steps, and the end, same episodes.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/online_steps" in r]
    assert len(evals) >= 2 and evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert all(r["eval/episodes"] == 1 for r in evals)
    assert "evaluation over the same 1 deterministic episodes: start (online step" in learner.stdout

    final = weights(run_dir / "checkpoint.pt")
    last_retrain = weights(summaries[-1]["checkpoint"])
    extra = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["extra"]
    if mode == "recommend":
        recommended = json.loads((run_dir / "recommended.json").read_text())
        assert recommended["store_rows"] == summaries[-1]["store_rows"] and "normalized_score" in recommended["eval"]
        assert (run_dir / "recommended.onnx").read_bytes() == Path(summaries[-1]["policy"]).read_bytes()
        assert extra["retrain_switches"] == [] and "recommended policy (retrained on" in log
        # The online agent kept its own networks.
        assert any(not torch.equal(final[k], last_retrain[k]) for k in final)
    else:
        assert not (run_dir / "recommended.onnx").exists()
        assert jobs[-1].name == "00000200" and len(jobs) >= 2  # and the retrain at the end
        assert len(extra["retrain_switches"]) == len(jobs)  # every switch is checkpointed
        assert log.count("the online agent continues from the retrained one") == len(jobs)
        # The switch at the end: the run's final agent IS the last retrained one, weight for weight,
        # and the run's last evaluation (its closing line) is of that agent, after the switch.
        assert_same(final, last_retrain)
        order = [("eval" if "eval/online_steps" in r else "retrain") for r in rows if "eval/online_steps" in r
                 or any(k.startswith("retrain/") for k in r)]  # fmt: skip
        assert order[-1] == "eval" and order[-2] == "retrain"
