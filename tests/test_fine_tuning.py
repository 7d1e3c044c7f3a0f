"""One algorithm config from pretraining to fine-tuning: the checkpoint's data settings scale
offline and online rows alike; explicit overrides of tunable fields reach the loss and the
checkpoint; conflicting data settings are refused."""

import dataclasses
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from o2o.transport import wire
from o2o.datasets.mc_return import trajectory_return_to_go
from o2o.datasets.minari_io import load_transitions
from o2o.envs import get_task
from o2o.learner.checkpoint import AgentSpec, load_checkpoint, save_checkpoint
from o2o.learner.config import CalQLConfig, NetworkConfig, OnlineConfig
from o2o.learner.fine_tuning import explicit_keys, fine_tuning_algo, moved_key_error
from o2o.learner.online import prepare, read_spec

TASK = "pointmaze-umaze"
PRETRAINED = CalQLConfig(reward_scale=10.0, reward_bias=-5.0, cql_alpha=5.0)
NET = NetworkConfig(policy_hidden=[16, 16], critic_hidden=[16, 16])


@pytest.fixture
def checkpoint(tmp_path):
    spec = AgentSpec(TASK, 8, 2, [-1.0, -1.0], [1.0, 1.0], dataclasses.asdict(PRETRAINED), dataclasses.asdict(NET))
    return save_checkpoint(tmp_path / "pretrained" / "checkpoint.pt", spec.build_agent(), spec, step=100)


def online_cfg(checkpoint, **algo) -> OnlineConfig:
    # The online command's own defaults: rewards x1 + 0, as `o2o-learner` without a preset.
    return OnlineConfig(task=TASK, pretrained=str(checkpoint), build_episodes=6, progress=False,
                        algo=CalQLConfig(**algo), net=NetworkConfig())  # fmt: skip


def test_explicit_keys_are_read_from_hydra_overrides():
    assert explicit_keys(["algo.cql_alpha=1.0", "+algo.x=2", "task=pusher", "~net.y"]) == {
        "algo.cql_alpha", "algo.x", "task", "net.y"}  # fmt: skip


def test_only_explicit_tunable_fields_change_and_data_fields_are_refused():
    ckpt = dataclasses.asdict(PRETRAINED)
    net = dataclasses.asdict(NET)
    # The online defaults differ (reward_scale 1, cql_alpha 5) but nothing was set: the checkpoint's.
    merged, changes = fine_tuning_algo(ckpt, net, CalQLConfig(), NetworkConfig(), set())
    assert merged == ckpt and changes == []
    merged, changes = fine_tuning_algo(ckpt, net, CalQLConfig(cql_alpha=1.0, critic_lr=1e-4), NetworkConfig(),
                                       {"algo.cql_alpha", "algo.critic_lr"})  # fmt: skip
    assert (merged["cql_alpha"], merged["critic_lr"], merged["reward_scale"]) == (1.0, 1e-4, 10.0)
    assert changes == ["changed for fine-tuning: algo.cql_alpha 5.0 -> 1.0",
                       "changed for fine-tuning: algo.critic_lr 0.0003 -> 0.0001"]
    # Setting a data field to the checkpoint's own value is fine; to another value, refused.
    assert fine_tuning_algo(ckpt, net, CalQLConfig(reward_scale=10.0), NetworkConfig(), {"algo.reward_scale"})[1] == []
    for field, value in (("reward_scale", 1.0), ("reward_bias", 0.0), ("discount", 0.9), ("mc_infinite_horizon", True)):
        with pytest.raises(ValueError, match=f"algo.{field}={value!r} differs from the checkpoint's") as err:
            fine_tuning_algo(ckpt, net, CalQLConfig(**{field: value}), NetworkConfig(), {f"algo.{field}"})
        assert "pretrain anew" in str(err.value)
    with pytest.raises(ValueError, match=r"net.critic_hidden=\[64, 64\] differs from the checkpoint's \[16, 16\]"):
        fine_tuning_algo(ckpt, net, CalQLConfig(), NetworkConfig(critic_hidden=[64, 64]), {"net.critic_hidden"})


def commit_online_episode(run) -> np.ndarray:
    """One finished 5-step online episode (raw rewards 0, 0, 0, 0, 1) through the store."""
    rng = np.random.default_rng(0)
    raw = np.array([0, 0, 0, 0, 1], np.float32)
    done = np.array([0, 0, 0, 0, 1], np.uint8)
    chunk = wire.TransitionChunk(
        actor_id="a", seq=0, policy_version=1, episode_id=0, step=0,
        obs=rng.normal(size=(5, 8)).astype(np.float32), action=rng.uniform(-1, 1, (5, 2)).astype(np.float32),
        reward=raw, next_obs=rng.normal(size=(5, 8)).astype(np.float32), terminated=done,
        truncated=np.zeros(5, np.uint8), success=done,
    )  # fmt: skip
    run.store.append(chunk)
    run.store.commit(collect=True)
    run.online.on_commit(run.store.last_commit)
    assert run.online.drain() == 5
    return raw


@pytest.mark.parametrize("override", [False, True])
def test_offline_and_online_rows_carry_the_checkpoints_scaling(tmp_path, checkpoint, override):
    """Before: the offline data was scaled with the online command's algo (x1 + 0) while the
    agent and the online rows used the checkpoint's (x10 - 5), in one batch."""
    cfg = online_cfg(checkpoint, cql_alpha=1.0 if override else 5.0)
    run = prepare(cfg, tmp_path / "online", {"algo.cql_alpha"} if override else set())
    raw_offline = load_transitions(cfg.dataset, get_task(TASK)).reward  # unscaled
    np.testing.assert_allclose(run.offline.columns["reward"][: len(raw_offline)].numpy(), raw_offline * 10 - 5)
    raw_online = commit_online_episode(run)
    scaled = raw_online * 10 - 5
    np.testing.assert_allclose(run.online_buffer.columns["reward"][:5].numpy(), scaled)
    terminal = np.array([0, 0, 0, 0, 1], np.float32)
    np.testing.assert_allclose(run.online_buffer.columns["mc_return"][:5].numpy(),
                               trajectory_return_to_go(scaled, terminal, 0.99, failure_reward=-5.0), rtol=1e-6)  # fmt: skip
    assert run.store.config.data.reward_scale == 10.0 and run.store.config.data.reward_bias == -5.0

    # The CQL weight of the loss: the override's, else the checkpoint's.
    weight = 1.0 if override else 5.0
    assert run.agent.cfg.cql_alpha == weight and run.spec.algo["cql_alpha"] == weight
    batch = run.offline.sample(64)
    _, metrics = run.agent.losses(batch)
    assert metrics["alpha_prime"].item() == weight
    num_critics = NET.num_critics
    expected = num_critics * (metrics["td_loss"] + weight * metrics["cql_gap"])
    torch.testing.assert_close(metrics["critic_loss"], expected, rtol=1e-5, atol=1e-5)
    run.store.close()

    # The run's checkpoint keeps the change, so `resume` fine-tunes with it too.
    saved = save_checkpoint(tmp_path / "online" / "checkpoint.pt", run.agent, run.spec, step=1)
    assert read_spec(saved).algo["cql_alpha"] == weight and read_spec(saved).algo["reward_scale"] == 10.0


def test_changed_learning_rates_reach_the_optimiser(tmp_path, checkpoint):
    cfg = online_cfg(checkpoint, critic_lr=1e-5, policy_lr=2e-5)
    run = prepare(cfg, tmp_path / "online", {"algo.critic_lr", "algo.policy_lr"})
    lrs = [group["lr"] for group in run.agent.optimizer.param_groups]
    assert lrs == [2e-5, 1e-5, PRETRAINED.alpha_lr, PRETRAINED.alpha_prime_lr]
    run.store.close()


def test_the_learner_refuses_a_conflicting_reward_scale_at_start_up(tmp_path, checkpoint):
    cmd = [sys.executable, "-m", "o2o.learner.online", f"task={TASK}", f"pretrained={checkpoint}",
           "algo.reward_scale=1.0", f"hydra.run.dir={tmp_path / 'run'}", "progress=false"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "algo.reward_scale=1.0 differs from the checkpoint's 10.0" in done.stderr


def test_a_checkpoint_with_the_old_algo_offline_ratio_still_loads(tmp_path, checkpoint, caplog):
    """Checkpoints written while the batch mix was `algo.offline_ratio` hold it in their algo; the mix is
    the learner's own `offline_ratio` now, so the stale key is dropped (with a warning when not 0.5)."""
    payload = torch.load(checkpoint, weights_only=True)
    payload["spec"]["algo"]["offline_ratio"] = 0.25  # a Kitchen (preset=paper pusher) pretraining
    torch.save(payload, checkpoint)
    with caplog.at_level(logging.WARNING, logger="o2o.checkpoint"):
        assert read_spec(checkpoint).algo == dataclasses.asdict(PRETRAINED)
    assert "algo.offline_ratio=0.25 is no longer read" in caplog.text and "offline_ratio=0.25 keeps" in caplog.text
    agent, spec, _ = load_checkpoint(checkpoint)
    assert agent.cfg == PRETRAINED and "offline_ratio" not in spec.algo
    merged, changes = fine_tuning_algo(payload["spec"]["algo"], payload["spec"]["net"], CalQLConfig(cql_alpha=1.0),
                                       NetworkConfig(), {"algo.cql_alpha"})  # fmt: skip
    assert merged == {**dataclasses.asdict(PRETRAINED), "cql_alpha": 1.0}
    assert changes == ["changed for fine-tuning: algo.cql_alpha 5.0 -> 1.0"]
    run = prepare(dataclasses.replace(online_cfg(checkpoint), offline_ratio=0.25), tmp_path / "online")
    assert "offline_ratio" not in run.spec.algo  # nor in the checkpoints the run writes
    run.store.close()


def test_the_learners_offline_ratio_sets_the_fine_tuning_batches(tmp_path, checkpoint):
    """SERA on the online rows needs more than sera_k of them: 16 rows at offline_ratio 0.5 leave 8,
    at 0.25 they leave 12, so the learner's own setting is the one its batches follow."""
    cfg = dataclasses.replace(online_cfg(checkpoint, sera=True, sera_rows="online", sera_k=10), batch_size=16)
    explicit = {"algo.sera", "algo.sera_rows", "algo.sera_k"}
    assert cfg.offline_ratio == 0.5  # the default (official mixing_ratio of AntMaze and Adroit)
    with pytest.raises(ValueError, match="batch_size=16 with offline_ratio=0.5 has 8"):
        prepare(cfg, tmp_path / "half", explicit)
    run = prepare(dataclasses.replace(cfg, offline_ratio=0.25), tmp_path / "quarter", explicit)
    assert run.agent.sera.frozen
    run.store.close()


def test_the_old_algo_offline_ratio_is_refused_with_the_new_key():
    assert moved_key_error(["task=pusher", "offline_ratio=0.25"]) is None
    assert "the learner's own setting, offline_ratio=X" in moved_key_error(["algo.offline_ratio=0.3"])
    done = subprocess.run([sys.executable, "-m", "o2o.learner.online", "algo.offline_ratio=0.3"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "o2o-learner: error: algo.offline_ratio is no longer" in done.stderr


def test_a_resumed_runs_checkpoint_step_counts_each_online_update_once(tmp_path, checkpoint):
    """Pretrained for 100 updates, resumed twice: the step is 100 + the online updates, whatever the resumes."""
    from types import SimpleNamespace

    from o2o.learner.checkpoint import load_checkpoint
    from o2o.learner.online import FineTuning

    agent, spec, _ = load_checkpoint(checkpoint)
    publisher = SimpleNamespace(version=3, run_id="r")
    step, online_updates = 100, 0
    for more in (30, 40, 50):  # the first run, then two resumes, each making `more` online updates
        run = FineTuning(tmp_path, agent, spec, {"step": step, "extra": {"online_updates": online_updates}},
                         None, None, None, None, publisher)  # fmt: skip
        assert run.offline_steps == 100
        run.checkpoint(online_updates + more)
        _, _, saved = load_checkpoint(tmp_path / "checkpoint.pt")
        step, online_updates = saved["step"], saved["extra"]["online_updates"]
        assert step == 100 + online_updates
    assert online_updates == 120
