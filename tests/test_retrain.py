"""OOO retraining (`o2o-retrain`): a fresh agent learns from the offline data plus the replay store.

The store is a real Zarr store written through ``ReplayStore.append``, the offline data a real
Minari dataset written through Minari's API; rows are synthetic so that what the retrained
policy must learn is known exactly.
"""

import dataclasses
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from o2o.datasets.minari_io import write_dataset
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import TransitionChunk
from o2o.envs import make_env
from o2o.learner.checkpoint import load_checkpoint
from o2o.learner.config import CalQLConfig, EvalConfig, NetworkConfig
from o2o.learner.retrain import RetrainConfig, retrain, select_store_rows, td_target_bounds

from replay_peers import make_chunk, write_forever

TASK, OBS, ACT = "pusher", 23, 7
DATASET = "o2o-test/pusher-no-reward-v0"
SPAWN = multiprocessing.get_context("spawn")


def no_reward_dataset(n_episodes: int = 20, length: int = 10) -> str:
    """An offline dataset whose rewards are all 0: only the store can teach the reward."""
    rng = np.random.default_rng(0)
    episodes = [{
        "observations": rng.normal(size=(length + 1, OBS)).astype(np.float32),
        "actions": rng.uniform(-2, 2, (length, ACT)).astype(np.float32),
        "rewards": np.zeros(length),
        "terminations": np.zeros(length, bool),
        "truncations": np.r_[np.zeros(length - 1, bool), True],
    } for _ in range(n_episodes)]  # fmt: skip
    write_dataset(DATASET, make_env(TASK, flatten=False), episodes, algorithm_name="test", description="no reward")
    return DATASET


def one_step_chunk(actor: str, seq: int, rng, sign: float, rows: int = 1, eval_: bool = False,
                   policy_version: int = 1) -> TransitionChunk:  # fmt: skip
    """A one-step episode that pays 1 when the first action component has the given sign."""
    action = rng.uniform(-2, 2, (rows, ACT)).astype(np.float32)
    return TransitionChunk(
        actor_id=actor, seq=seq, policy_version=policy_version, episode_id=seq, step=0,
        obs=rng.normal(size=(rows, OBS)).astype(np.float32), action=action,
        reward=(np.sign(action[:, 0]) == sign).astype(np.float32), next_obs=rng.normal(size=(rows, OBS)).astype(np.float32),
        terminated=np.ones(rows, np.uint8), truncated=np.zeros(rows, np.uint8), success=np.zeros(rows, np.uint8),
        eval=eval_,
    )  # fmt: skip


def reward_store(path: Path, sign: float, episodes: int = 600) -> Path:
    rng = np.random.default_rng(1)
    store = ReplayStore.create_for_task(path, TASK)
    for seq in range(episodes):
        store.append(one_step_chunk("robot-1", seq, rng, sign))
    store.commit()
    store.close()
    return path


def tiny_retrain_config(store: Path, **kw) -> RetrainConfig:
    return RetrainConfig(
        task=TASK, dataset=DATASET, store=str(store), steps=kw.pop("steps", 200), batch_size=64, log_every=100,
        checkpoint_every=10_000, progress=False, build_missing_dataset=False,
        net=NetworkConfig(policy_hidden=[64, 64], critic_hidden=[64, 64]),
        algo=CalQLConfig(calibrated=False, q_target_clip=True, cql_alpha=1.0),
        eval=EvalConfig(every=0, episodes=1), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_retrained_policy_learns_the_reward_only_the_store_holds(tmp_path, sign):
    no_reward_dataset()
    store = reward_store(tmp_path / "replay", sign)
    summary = retrain(tiny_retrain_config(store), tmp_path / "run")  # 200 updates: > 99% of states already

    assert summary["status"] == "done" and summary["online_rows"] == 600 and summary["offline_rows"] == 200
    assert summary["offline_dataset"] == DATASET and summary["policy_versions"] == [1, 1]
    assert summary["q_target_clip"] == pytest.approx([0.0, 100.0])  # [min r, max r] / (1 - 0.99)
    assert Path(summary["policy"]).is_file()
    agent, _, _ = load_checkpoint(summary["checkpoint"])
    states = torch.as_tensor(np.random.default_rng(7).normal(size=(500, OBS)), dtype=torch.float32)
    first = agent.policy.deterministic(agent.normalizer(states))[:, 0].numpy()
    # The paying sign of the first action component, learnt from the store's rewards alone.
    assert np.mean(np.sign(first) == sign) > 0.9, np.mean(np.sign(first) == sign)


def test_store_rows_are_the_ended_episodes_of_the_prefix(tmp_path):
    rng = np.random.default_rng(0)
    store = ReplayStore.create_for_task(tmp_path / "replay", TASK)
    for seq in range(10):  # 10 one-step episodes of robot-1, versions 1..10
        store.append(one_step_chunk("robot-1", seq, rng, 1.0, policy_version=seq + 1))
    store.append(one_step_chunk("robot-2", 0, rng, 1.0, eval_=True))  # an eval episode (row 10)
    open_episode = one_step_chunk("robot-2", 1, rng, 1.0)
    open_episode = dataclasses.replace(open_episode, terminated=np.zeros(1, np.uint8), episode_id=1)
    store.append(open_episode)  # row 11: its episode never ends
    store.commit()
    store.append(one_step_chunk("robot-1", 10, rng, 1.0))  # staged, never committed
    reader = ReplayStore.open(tmp_path / "replay", "r")

    everything = select_store_rows(reader)
    assert everything.store_rows == 12 and len(everything.transitions) == 10 and everything.episodes == 10
    assert everything.policy_versions == [1, 10]
    with_eval = select_store_rows(reader, train_on_eval=True)
    assert len(with_eval.transitions) == 11
    assert len(select_store_rows(reader, until_row=4).transitions) == 4
    by_version = select_store_rows(reader, until_version=6)
    assert by_version.store_rows == 6 and by_version.policy_versions == [1, 6]
    # Rewards come scaled with the store's settings, actions stay in env units.
    raw = reader.read(0, 10)
    np.testing.assert_array_equal(everything.transitions.reward, reader.config.scale_rewards(raw["reward"]))
    np.testing.assert_array_equal(everything.transitions.action, raw["action"])
    store.close(commit=False)


def test_td_target_bounds_by_hand():
    assert td_target_bounds(np.array([-1.0, 0.0, 2.0], np.float32), 0.9) == pytest.approx((-10.0, 20.0))


def test_high_reward_rows_are_upsampled(tmp_path):
    from o2o.learner.buffer import TransitionBuffer
    from o2o.learner.retrain import _sampler
    from o2o.datasets.minari_io import Transitions

    n = 1000
    reward = np.zeros(n, np.float32)
    reward[:10] = 5.0  # 1% of the rows hold the maximum reward
    data = Transitions(np.zeros((n, 2), np.float32), np.zeros((n, 1), np.float32), reward, np.zeros((n, 2), np.float32),
                       np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, np.float32))  # fmt: skip
    buffer = TransitionBuffer.from_transitions(data, np.array([-1.0]), np.array([1.0]), "cpu")
    batch = _sampler(buffer, reward, 256, 32)()
    assert len(batch.reward) == 288 and bool((batch.reward[256:] == 5.0).all())


def test_cli_retrains_on_the_committed_rows_of_a_store_being_written(tmp_path):
    """`o2o-retrain` on a store another process keeps writing: it reads the committed prefix only."""
    no_reward_dataset()
    path = tmp_path / "replay"
    ReplayStore.create_for_task(path, TASK).close()
    writer = SPAWN.Process(target=write_forever, args=(str(path), ["a", "b"], 0, OBS, ACT), daemon=True)
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while len(ReplayStore.open(path, "r")) < 2000:
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.2)
        run_dir = tmp_path / "retrain"
        cmd = [sys.executable, "-m", "o2o.learner.retrain", f"task={TASK}", f"dataset={DATASET}", f"store={path}",
               "steps=30", "batch_size=32", "log_every=10", "eval.episodes=1", "eval.every=0", "progress=false",
               "net.critic_hidden=[32,32]", "net.policy_hidden=[32,32]", f"hydra.run.dir={run_dir}",
               "threads=1"]  # the writer keeps a core busy: more torch threads would thrash  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert writer.is_alive()  # the writer kept writing all along
    finally:
        writer.kill()
        writer.join()
    summary = json.loads((run_dir / "retrain.json").read_text())
    reader = ReplayStore.open(path, "r")
    assert summary["status"] == "done" and 2000 <= summary["store_rows"] <= len(reader)
    # Exactly the rows of the prefix it saw: every episode that ended inside it (make_chunk: 25 steps).
    expected = select_store_rows(reader, until_row=summary["store_rows"])
    assert summary["online_rows"] == len(expected.transitions) > 0
    assert summary["online_rows"] % 25 == 0
    assert (run_dir / "policy.onnx").is_file() and "retrained on" in done.stdout


def test_cli_errors_are_clear(tmp_path):
    cmd = [sys.executable, "-m", "o2o.learner.retrain", f"task={TASK}", "progress=false"]
    # Side by side (each spends its seconds starting up), each in its own run folder.
    no_store = subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / 'a'}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    bad_store = subprocess.Popen([*cmd, f"store={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'b'}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        no_store_err, bad_store_err = no_store.communicate(timeout=120)[1], bad_store.communicate(timeout=120)[1]
    finally:
        for proc in (no_store, bad_store):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert no_store.returncode == 2 and "needs store=PATH" in no_store_err
    assert bad_store.returncode == 2 and "not an o2o replay store" in bad_store_err
