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
from o2o.learner.retrain import RetrainConfig, batch_split, prepare_retrain, retrain, select_store_rows

from replay_peers import make_chunk, write_forever

TASK, OBS, ACT = "pusher", 23, 7
DATASET = "o2o-test/pusher-no-reward-v0"
SPAWN = multiprocessing.get_context("spawn")


def no_reward_dataset(n_episodes: int = 20, length: int = 10, reward: float = 0.0, name: str = DATASET) -> str:
    """An offline dataset whose rewards are all 0 (only the store can teach the reward), or, with
    ``reward``, whose every episode's last row pays it. No row terminates (truncated episodes): its
    rows are told from the store's one-step episodes (terminated) by ``terminated``."""
    rng = np.random.default_rng(0)
    episodes = [{
        "observations": rng.normal(size=(length + 1, OBS)).astype(np.float32),
        "actions": rng.uniform(-2, 2, (length, ACT)).astype(np.float32),
        "rewards": np.r_[np.zeros(length - 1), reward],
        "terminations": np.zeros(length, bool),
        "truncations": np.r_[np.zeros(length - 1, bool), True],
    } for _ in range(n_episodes)]  # fmt: skip
    write_dataset(name, make_env(TASK, flatten=False), episodes, algorithm_name="test", description="no reward")
    return name


HIGH_DATASET = "o2o-test/pusher-high-offline-reward-v0"
"""Offline rows paying 5 (above any online reward): OOO upsamples from the online rows only."""


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
        task=TASK, dataset=kw.pop("dataset", DATASET), store=str(store), steps=kw.pop("steps", 200), batch_size=64, log_every=100,
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
    np.testing.assert_array_equal(everything.transitions.reward, reader.config.data.scale(raw["reward"]))
    np.testing.assert_array_equal(everything.transitions.action, raw["action"])
    store.close(commit=False)


def rows_of(batch, start: int, stop: int | None = None) -> dict:
    return {k: getattr(batch, k)[start:stop] for k in ("reward", "terminated")}


def test_retrain_update_clips_q_prime_to_the_bounds_of_all_training_rows(tmp_path):
    """y = r + gamma (1 - d) clip(Q', [min r, max r] / (1 - gamma)), the bounds over offline and online
    rows: checked by hand with the target critic made to answer far beyond them."""
    no_reward_dataset(reward=5.0, name=HIGH_DATASET)
    store = reward_store(tmp_path / "replay", 1.0, episodes=100)  # online rewards 0 / 1, one-step episodes
    setup = prepare_retrain(tiny_retrain_config(store, dataset=HIGH_DATASET), tmp_path / "run")
    agent, gamma = setup.agent, 0.99
    low, high = 0.0 / (1 - gamma), 5.0 / (1 - gamma)  # min r 0 (both), max r 5 (offline rows)
    assert agent.td_target_bounds.tolist() == pytest.approx([low, high])
    assert setup.summary["q_target_clip"] == pytest.approx([low, high])
    assert setup.summary["reward_range"] == [0.0, 5.0]

    torch.manual_seed(0)
    batch = setup.sample()
    assert 0 < batch.terminated.sum() < len(batch.reward)  # bootstrapped (offline) and terminal (online) rows
    with torch.no_grad():
        q_data = agent.critic(agent.normalizer(batch.obs), batch.action)  # (critics, B)
    for q_prime, clipped in ((1e4, high), (-1e4, low), (300.0, 300.0)):
        agent.target_critic.forward_per_state = lambda obs, actions, *_, v=q_prime: torch.full(
            (agent.net_cfg.num_critics, obs.shape[0], actions.shape[1]), v)  # fmt: skip
        _, metrics = agent.losses(batch)
        y = batch.reward + gamma * (1 - batch.terminated) * clipped
        expected = (q_data - y).square().mean()
        assert float(metrics["td_loss"]) == pytest.approx(float(expected), rel=1e-5), q_prime


def test_retrain_trains_plain_cql_not_calql(tmp_path):
    """The composed o2o-retrain config says CQL, and the agent it builds does not calibrate: its CQL
    term ignores the MC returns (Cal-QL would raise the policy's Q-values to them)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("o2o.configs", version_base=None):
        for overrides in ([], ["preset=paper", "task=pusher"], ["preset=paper", "task=adroit-door-binary"]):
            composed = OmegaConf.to_object(compose("retrain", overrides=overrides))
            assert composed.algo.calibrated is False and composed.algo.q_target_clip is True, overrides

    no_reward_dataset()
    store = reward_store(tmp_path / "replay", 1.0, episodes=100)
    agent = prepare_retrain(tiny_retrain_config(store), tmp_path / "run").agent
    assert agent.cfg.calibrated is False
    torch.manual_seed(0)
    batch = prepare_retrain(tiny_retrain_config(store), tmp_path / "run").sample()
    gaps = []
    for mc in (-1e6, 1e6):  # MC returns far below / above every Q-value
        torch.manual_seed(1)
        _, metrics = agent.losses(dataclasses.replace(batch, mc_return=torch.full_like(batch.mc_return, mc)))
        gaps.append(float(metrics["cql_gap"]))
        assert float(metrics["bound_rate"]) == 0.0
    assert gaps[0] == gaps[1]


def test_retrain_reads_only_the_prefix_it_was_given(tmp_path):
    """until_row=N: no row at or past N is trained on (rows past it pay 7, a reward nothing else has)."""
    no_reward_dataset()
    rng = np.random.default_rng(3)
    path = tmp_path / "replay"
    store = ReplayStore.create_for_task(path, TASK)
    for seq in range(40):
        store.append(one_step_chunk("robot-1", seq, rng, 1.0))
    for seq in range(40, 60):  # rows 40..59
        chunk = one_step_chunk("robot-1", seq, rng, 1.0)
        store.append(dataclasses.replace(chunk, reward=np.full(1, 7.0, np.float32)))
    store.commit()
    store.close()
    cfg = tiny_retrain_config(path, until_row=40, high_reward_extra=8)
    setup = prepare_retrain(cfg, tmp_path / "run")
    assert setup.summary["store_rows"] == 40 and setup.summary["online_rows"] == 40
    assert setup.summary["reward_range"][1] == 1.0 and setup.summary["q_target_clip"][1] == pytest.approx(100.0)
    for _ in range(20):
        assert float(setup.sample().reward.max()) <= 1.0
    everything = prepare_retrain(tiny_retrain_config(path), tmp_path / "run2")  # the control: all 60 rows
    assert everything.summary["online_rows"] == 60 and everything.summary["reward_range"][1] == 7.0


@pytest.mark.parametrize("share", [0.5, None])
def test_batches_hold_the_fixed_offline_share_or_the_proportional_one(tmp_path, share):
    """OOO's batch mix: offline_share of each batch from the offline rows (Kitchen 0.25, Adroit 0.5),
    or in proportion to the row counts (None: maze2d, hammer). 200 offline + 600 online rows."""
    no_reward_dataset()
    store = reward_store(tmp_path / "replay", 1.0)
    setup = prepare_retrain(tiny_retrain_config(store, offline_share=share), tmp_path / "run")
    offline, online = (32, 32) if share == 0.5 else (16, 48)  # int(64 * 0.5) / int(64 * 200 / 800)
    assert setup.summary["batch"] == {"offline": offline, "online": online,
                                      "offline_share": "proportional" if share is None else share}  # fmt: skip
    assert batch_split(200, 600, 64, share) == (offline, online)
    for _ in range(10):
        batch = setup.sample()
        # Offline rows (truncated episodes) never terminate; every online row (a one-step episode) does.
        assert len(batch.reward) == 64 and int(batch.terminated.sum()) == online and batch.online_rows == online
        assert float(batch.terminated[:offline].sum()) == 0 and bool((batch.terminated[offline:] == 1).all())


def test_upsampling_draws_only_online_rows_at_the_online_maximum_reward(tmp_path):
    """OOO upsamples its replay buffer (the online rows) at the online maximum reward: not the offline
    rows, though they pay more (5 against 1 online)."""
    no_reward_dataset(reward=5.0, name=HIGH_DATASET)
    store = reward_store(tmp_path / "replay", 1.0, episodes=300)  # about half the online rows pay 1
    cfg = tiny_retrain_config(store, dataset=HIGH_DATASET, high_reward_extra=32)
    setup = prepare_retrain(cfg, tmp_path / "run")
    online_rewards = select_store_rows(ReplayStore.open(store, "r")).transitions.reward
    assert setup.summary["high_reward_upsampling"] == {
        "extra_per_batch": 32, "from": "online rows", "reward": 1.0, "rows": int((online_rewards == 1.0).sum())}
    for _ in range(10):
        batch = setup.sample()
        assert len(batch.reward) == 64 + 32
        extra = rows_of(batch, 64)
        assert bool((extra["reward"] == 1.0).all()) and bool((extra["terminated"] == 1).all())  # online, at its max
    off = prepare_retrain(tiny_retrain_config(store, dataset=HIGH_DATASET), tmp_path / "run2")
    assert off.summary["high_reward_upsampling"] is None and len(off.sample().reward) == 64  # the default: 0


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


def test_a_retrain_on_a_camera_task_builds_its_pixel_agent_from_the_joined_rows():
    """The retrain joins offline and online rows for the observation statistics and Q bounds without
    their frames (the buffers hold those); the agent built from the joined rows must still be the camera
    task's (found by an o2o-retrain on a pixel launch's store: "the data's camera frames are none")."""
    from o2o.datasets.minari_io import Transitions
    from o2o.envs import get_task
    from o2o.learner.config import PretrainConfig
    from o2o.learner.retrain import concat_transitions
    from o2o.learner.setup import make_agent

    def part(n: int, frames: int) -> Transitions:
        z = np.zeros
        return Transitions(obs=z((n, 2), np.float32), action=z((n, 2), np.float32), reward=np.arange(n, dtype=np.float32),
                           next_obs=z((n, 2), np.float32), terminated=z(n, np.float32), episode_end=z(n, bool),
                           mc_return=z(n, np.float32), frames={"top": z((frames, 48, 48, 3), np.uint8)},
                           obs_frame=np.arange(n), next_frame=np.arange(n) + 1)  # fmt: skip

    joined = concat_transitions([part(3, 4), part(2, 3)])
    assert joined.reward.tolist() == [0, 1, 2, 0, 1] and joined.frames["top"].shape == (0, 48, 48, 3)
    task = get_task("pointmaze-umaze-pixels")
    agent, spec = make_agent(PretrainConfig(task=task.name), task, joined, "cpu")
    assert spec.cameras == {"top": [48, 48, 3]} and agent.encoder is not None
