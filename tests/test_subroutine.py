"""Offline RL as a subroutine of online RL, end to end: an `o2o-learner` from scratch (SAC) with a
real `o2o-actor`, retraining on its own store with `o2o-retrain` every N updates and at the end.

recommend: an accepted retrained policy becomes <run>/recommended.onnx and the online agent is untouched;
fine_tune: the online agent continues from an accepted retrained one (checked on the weights) and
makes no update while a retrain runs.

And, unit by unit with tiny real agents and real retrain results (retrain.json + checkpoint +
policy.onnx, as `o2o-retrain` writes them): validation before use, the decision logged, the
switch copying the target critics too, a seed per retrain, the pause in fine_tune.
"""

import copy
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from o2o.envs import get_task
from o2o.learner.checkpoint import action_bounds, save_checkpoint
from o2o.learner.config import NetworkConfig, OnlineConfig, PretrainConfig
from o2o.learner.evaluation import evaluate
from o2o.learner.export_onnx import export_policy
from o2o.learner.metrics import MetricsLogger
from o2o.learner.setup import make_agent
from o2o.learner.subroutine import RetrainJob, Retrainer, retrain_seed, switch_in, use_retrained
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
    # fine_tune retrains at the end: its actor runs until stopped, to show it is held (not lost) meanwhile
    max_steps = 1_000_000 if mode == "fine_tune" else 4000
    actor_cmd = [
        sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={endpoint}", "actor_id=a0",
        f"spool.dir={run_dir.parent / 'spool'}", "policy.act_before_policy=true", f"max_steps={max_steps}", "max_episode_steps=50",
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
    return {k: v for k, v in agent.items() if k.startswith(("policy.", "critic.", "target_critic.", "log_alpha"))}


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

    # Each retrain is validated on the learner's evaluation episodes before use, and has its own seed.
    records = retrains(run_dir)
    assert all(r["retrain/accepted"] in (0.0, 1.0) and "retrain/incumbent_score" in r for r in records)
    assert len({r["retrain/seed"] for r in records}) == len(records) and "retrain/seed" in records[0]
    accepted = [s for s, r in zip(summaries, records) if r["retrain/accepted"] == 1.0]
    assert log.count("on the same evaluation episodes: ") == len(jobs)
    final = weights(run_dir / "checkpoint.pt")
    extra = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["extra"]
    if mode == "recommend":
        if accepted:
            recommended = json.loads((run_dir / "recommended.json").read_text())
            assert recommended["store_rows"] == accepted[-1]["store_rows"] and "normalized_score" in recommended["eval"]
            assert (run_dir / "recommended.onnx").read_bytes() == Path(accepted[-1]["policy"]).read_bytes()
            assert "recommended policy (retrained on" in log
        else:
            assert not (run_dir / "recommended.onnx").exists()
        assert extra["retrain_switches"] == []
        # The online agent kept its own networks.
        assert any(not torch.equal(final[k], weights(summaries[-1]["checkpoint"])[k]) for k in final)
    else:
        assert not (run_dir / "recommended.onnx").exists()
        assert jobs[-1].name == "00000200" and len(jobs) >= 2  # and the retrain at the end
        assert len(extra["retrain_switches"]) == len(accepted)  # every switch is checkpointed
        assert log.count("the online agent continues from the retrained one") == len(accepted)
        # The pause: no online update while a retrain ran, so each is used at the update it started at.
        assert [r["step"] for r in records] == [r["retrain/started_at_updates"] for r in records]
        # While the last retrain trains, the learner still serves its actors and holds them: the actor stops
        # at its next episode boundary (max_episode_steps=50) instead of acting on with the learner lost
        # (every step it took is committed, since the server stayed up).
        from o2o.datasets.replay_store import ReplayStore

        stored = len(ReplayStore.open(run_dir / "replay", "r"))
        # (an actor held from its first second on prints no progress line: it took no steps worth one)
        steps = max((int(m) for m in re.findall(r"steps (\d+)", (run_dir.parent / "actor.log").read_text())), default=0)
        assert steps <= stored + 50, (steps, stored)
        if records[-1]["retrain/accepted"] == 1.0:
            # The switch at the end: the run's final agent IS the last retrained one, weight for weight,
            # and the run's last evaluation (its closing line) is of that agent, after the switch.
            assert_same(final, weights(summaries[-1]["checkpoint"]))
            order = [("eval" if "eval/online_steps" in r else "retrain") for r in rows if "eval/online_steps" in r
                     or any(k.startswith("retrain/") for k in r)]  # fmt: skip
            assert order[-1] == "eval" and order[-2] == "retrain"


# Unit level: tiny real agents, real retrain results, no subprocess of o2o-retrain.

NET = NetworkConfig(policy_hidden=[16, 16], critic_hidden=[16, 16])
EVAL_SEED = 10_000


def tiny_agent(seed: int):
    torch.manual_seed(seed)
    return make_agent(PretrainConfig(task=TASK, net=NET), get_task(TASK), None, "cpu")


def fake_retrain(out: Path, score: float, seed: int, updates: int, store_rows: int) -> dict:
    """What a finished `o2o-retrain` leaves (checkpoint.pt, policy.onnx, retrain.json) from a tiny
    real agent, its target critics moved off its critics (as training does), read back by the
    Retrainer like a real one (``poll``); ``score`` stands for its evaluation."""
    agent, spec = tiny_agent(seed)
    with torch.no_grad():
        for p in agent.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
        agent.log_alpha.fill_(-1.0 - seed)
    out.mkdir(parents=True)
    save_checkpoint(out / "checkpoint.pt", agent, spec, 10)
    export_policy(agent, spec, out / "policy.onnx", exporter="torchscript")
    (out / "retrain.json").write_text(json.dumps({
        "status": "done", "store_rows": store_rows, "online_rows": store_rows, "offline_rows": 0,
        "eval": {"return": 0.0, "success": 0.0, "length": 300.0, "normalized_score": score},
        "checkpoint": str(out / "checkpoint.pt"), "policy": str(out / "policy.onnx")}))  # fmt: skip
    retrainer = Retrainer(OnlineConfig(task=TASK), out.parent, out.parent / "replay", {}, True)
    done = subprocess.Popen([sys.executable, "-c", ""])
    retrainer.job = RetrainJob(updates, store_rows, out, done, retrain_seed(0, updates))
    return retrainer.poll(wait=True)


def state(agent) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in agent.training_state()["agent"].items()}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def online_agent():
    """The online agent, and its evaluation on the learner's episodes (counted)."""
    torch.set_num_threads(1)
    agent, spec = tiny_agent(0)
    low, high = action_bounds(spec)
    calls = []

    def evaluate_online() -> dict:
        calls.append(1)
        return evaluate(agent, get_task(TASK), 1, EVAL_SEED, low, high)

    return agent, evaluate_online, calls


def test_fine_tune_switches_in_only_a_retrain_at_least_as_good(tmp_path, online_agent, caplog):
    agent, evaluate_online, calls = online_agent
    current = evaluate_online()["normalized_score"]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    before = state(agent)
    worse = fake_retrain(tmp_path / "retrain" / "00000100", current - 1.0, seed=1, updates=100, store_rows=500)
    caplog.set_level(logging.INFO, logger="o2o.subroutine")
    decision = use_retrained(worse, "fine_tune", tmp_path, agent, evaluate_online, logger, updates=100)
    assert not decision.accepted and decision.incumbent_score == current and len(calls) == 2
    assert_same(state(agent), before)  # not switched in
    assert "rejected (not used)" in caplog.text and f"vs the online agent's {current:.1f}" in caplog.text

    tie = fake_retrain(tmp_path / "retrain" / "00000200", current, seed=2, updates=200, store_rows=900)
    caplog.clear()
    decision = use_retrained(tie, "fine_tune", tmp_path, agent, evaluate_online, logger, updates=200)
    logger.close()
    assert decision.accepted and ": accepted" in caplog.text and "continues from the retrained one" in caplog.text
    assert_same(state(agent), weights(tie["checkpoint"]) | {k: v for k, v in state(agent).items()
                                                            if k not in weights(tie["checkpoint"])})  # fmt: skip
    records = [r for r in metrics(tmp_path) if "retrain/accepted" in r]
    assert [(r["step"], r["retrain/accepted"]) for r in records] == [(100, 0.0), (200, 1.0)]
    assert [r["retrain/normalized_score"] for r in records] == [current - 1.0, current]
    assert [r["retrain/incumbent_score"] for r in records] == [current, current]
    assert [r["retrain/seed"] for r in records] == [retrain_seed(0, 100), retrain_seed(0, 200)]


def test_recommend_only_a_retrain_at_least_as_good_as_the_recommended_one(tmp_path, online_agent, caplog):
    agent, evaluate_online, calls = online_agent
    current = evaluate_online()["normalized_score"]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    before = state(agent)
    jobs = tmp_path / "retrain"
    worse = fake_retrain(jobs / "00000100", current - 1.0, seed=1, updates=100, store_rows=500)
    caplog.set_level(logging.INFO, logger="o2o.subroutine")
    assert not use_retrained(worse, "recommend", tmp_path, agent, evaluate_online, logger, 100).accepted
    assert not (tmp_path / "recommended.onnx").exists() and not (tmp_path / "recommended.json").exists()
    assert "rejected (not used)" in caplog.text and len(calls) == 2  # none recommended yet: the online agent

    better = fake_retrain(jobs / "00000200", current + 5.0, seed=2, updates=200, store_rows=900)
    assert use_retrained(better, "recommend", tmp_path, agent, evaluate_online, logger, 200).accepted
    assert (tmp_path / "recommended.onnx").read_bytes() == Path(better["policy"]).read_bytes()
    # Better than the online agent, worse than the recommended policy: the recommended one stays.
    middling = fake_retrain(jobs / "00000300", current + 1.0, seed=3, updates=300, store_rows=1300)
    decision = use_retrained(middling, "recommend", tmp_path, agent, evaluate_online, logger, 300)
    logger.close()
    assert not decision.accepted and decision.incumbent_score == current + 5.0 and len(calls) == 3
    assert "vs the recommended policy's" in caplog.text
    assert (tmp_path / "recommended.onnx").read_bytes() == Path(better["policy"]).read_bytes()
    assert json.loads((tmp_path / "recommended.json").read_text())["store_rows"] == 900
    assert [r["retrain/accepted"] for r in metrics(tmp_path) if "retrain/accepted" in r] == [0.0, 1.0, 0.0]
    assert_same(state(agent), before)  # recommend never touches the online agent


def test_fine_tune_switch_copies_the_target_critics(tmp_path, online_agent):
    agent, _, _ = online_agent
    summary = fake_retrain(tmp_path / "retrain" / "00000100", 0.0, seed=1, updates=100, store_rows=500)
    saved = weights(summary["checkpoint"])
    target = {k: v for k, v in saved.items() if k.startswith("target_critic.")}
    critic = {k.removeprefix("target_"): v for k, v in target.items()}
    assert target and any(not torch.equal(v, saved[k]) for k, v in critic.items())  # targets differ from critics
    assert any(not torch.equal(agent.state_dict()[k], v) for k, v in target.items())  # and from the online agent's
    switch_in(agent, summary)
    now = agent.state_dict()
    assert_same({k: now[k] for k in target}, target)
    assert_same({k: now[k] for k in saved}, saved)  # policy, critics, temperatures too


def test_each_retrain_gets_its_own_seed(tmp_path):
    cfg = OnlineConfig(task=TASK, seed=3, retrain_every=100, retrain_mode="fine_tune")
    retrainer = Retrainer(cfg, tmp_path, tmp_path / "replay", {}, True)
    seeds = []
    for updates in (100, 200, 300):
        retrainer.maybe_start(updates, 10 * updates)  # a real o2o-retrain process, stopped at once
        retrainer.stop()
        command = (tmp_path / "retrain" / f"{updates:08d}" / "retrain.log").read_text().split("\n")[0].split()
        seeds += [int(arg.removeprefix("seed=")) for arg in command if arg.startswith("seed=")]
    assert len(seeds) == 3 and len(set(seeds)) == 3 and cfg.seed not in seeds
    assert seeds == [retrain_seed(3, u) for u in (100, 200, 300)]  # the same again on resume
    assert retrain_seed(4, 100) != seeds[0]  # and another run seed, other ones
    with pytest.raises(ValueError, match="seed"):
        Retrainer(OnlineConfig(task=TASK, retrain_args=["seed=1"]), tmp_path, tmp_path / "replay", {}, True)


@pytest.mark.parametrize("mode", ["fine_tune", "recommend"])
def test_fine_tune_pauses_online_updates_while_a_retrain_runs(tmp_path, mode):
    retrainer = Retrainer(OnlineConfig(task=TASK, retrain_mode=mode), tmp_path, tmp_path / "replay", {}, True)
    assert not retrainer.pauses_updates
    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    retrainer.job = RetrainJob(100, 500, tmp_path, running, 1)
    try:
        assert retrainer.pauses_updates == (mode == "fine_tune") and retrainer.poll() is None
    finally:
        running.communicate(b"")
    assert retrainer.poll() is None  # it "failed" (no retrain.json): logged, and the pause is over
    assert not retrainer.pauses_updates


def test_a_retrain_trains_as_many_updates_as_the_agent_it_is_compared_with(tmp_path):
    """Issue 18: a fair comparison. The online agent at update 1,500 of a run pretrained for 3,000 has had
    4,500 updates: so has its retrain, unless retrain_steps says otherwise."""
    matched = Retrainer(OnlineConfig(task=TASK), tmp_path, tmp_path / "replay", {}, False, offline_steps=3000)
    command = matched.command(100, tmp_path / "r", seed=1, steps=matched.steps(1500))
    assert "steps=4500" in command and "checkpoint_every=4500" in command
    assert Retrainer(OnlineConfig(task=TASK), tmp_path, tmp_path / "replay", {}, True).steps(700) == 700  # from scratch
    fixed = Retrainer(OnlineConfig(task=TASK, retrain_steps=50), tmp_path, tmp_path / "replay", {}, False, 3000)
    assert fixed.steps(1500) == 50


def test_a_retrain_shares_every_network_setting_but_the_bonus_networks(tmp_path):
    """NET_FIELDS comes from NetworkConfig: a new network field reaches the retrain's command by itself."""
    import dataclasses

    from o2o.learner.subroutine import NET_FIELDS

    names = [f.name for f in dataclasses.fields(NetworkConfig)]
    assert list(NET_FIELDS) == [n for n in names if not n.startswith("rnd_")]
    net = dataclasses.asdict(NetworkConfig(num_critics=5, critic_feature_norm=True))
    command = Retrainer(OnlineConfig(task=TASK), tmp_path, tmp_path / "replay", net, False).command(10, tmp_path / "r")
    assert "net.num_critics=5" in command and "net.critic_feature_norm=true" in command
    assert not any(arg.startswith("net.rnd_") for arg in command)
