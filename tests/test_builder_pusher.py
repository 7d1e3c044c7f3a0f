"""Pusher builder: real Minari round trip, controller quality, dense MC returns.

Pusher-v5 episodes are 100 steps of a 23-dim observation and a 7-dim torque
action; the tests use a handful of episodes (~40 ms each).
"""

import minari
import numpy as np
import pytest

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.builders.common import episode_plan, episode_succeeded, random_controller, record_episode
from o2o.datasets.builders.pusher import QUALITIES, build_episodes
from o2o.datasets.minari_io import load_transitions, write_dataset
from o2o.envs import get_task, make_env

GAMMA = 0.99
STEPS = 100  # Pusher's time limit; it never terminates
OBS_DIM, ACT_DIM = 23, 7
DATASET_ID = "o2o-test/pusher/expert-v0"  # not an o2o builder id: no build record


@pytest.fixture(scope="module")
def built():
    """(episodes, dataset id) of a small expert dataset written as a real Minari dataset."""
    episodes = build_episodes("pusher", "expert", 4, seed=0)
    env = make_env("pusher", flatten=False)
    write_dataset(DATASET_ID, env, episodes, algorithm_name="test", description="pusher builder test")
    env.close()
    return episodes, DATASET_ID


def test_minari_dataset_round_trips_the_episodes(built):
    episodes, dataset_id = built
    dataset = minari.load_dataset(dataset_id)
    assert dataset.spec.total_episodes == len(episodes)
    assert dataset.spec.total_steps == STEPS * len(episodes)
    assert dataset.observation_space.shape == (OBS_DIM,)
    assert dataset.action_space.shape == (ACT_DIM,)
    for recorded, episode in zip(episodes, dataset.iterate_episodes()):
        assert episode.observations.shape == (STEPS + 1, OBS_DIM)
        assert episode.actions.shape == (STEPS, ACT_DIM)
        assert np.abs(episode.actions).max() <= 2.0
        assert not episode.terminations.any() and episode.truncations[-1]
        np.testing.assert_array_equal(episode.observations, np.asarray(recorded["observations"]))
        np.testing.assert_array_equal(episode.actions, np.asarray(recorded["actions"], np.float32))
        np.testing.assert_allclose(episode.rewards, recorded["rewards"])
        np.testing.assert_array_equal(episode.infos["success"], recorded["infos"]["success"])


def test_transitions_are_the_episodes_flattened(built):
    episodes, dataset_id = built
    data = load_transitions(dataset_id, get_task("pusher"), DataSettings(GAMMA))
    assert len(data) == STEPS * len(episodes)
    assert (data.obs_dim, data.action_dim) == (OBS_DIM, ACT_DIM)
    obs = np.asarray(episodes[1]["observations"], np.float32)
    rows = slice(STEPS, 2 * STEPS)
    np.testing.assert_array_equal(data.obs[rows], obs[:-1])
    np.testing.assert_array_equal(data.next_obs[rows], obs[1:])
    np.testing.assert_array_equal(data.action[rows], np.asarray(episodes[1]["actions"], np.float32))
    np.testing.assert_allclose(data.reward[rows], episodes[1]["rewards"], rtol=1e-6)
    assert not data.terminated.any()
    ends = np.arange(1, len(episodes) + 1) * STEPS - 1
    np.testing.assert_array_equal(np.flatnonzero(data.episode_end), ends)


def test_dense_mc_return_is_the_discounted_backward_sum(built):
    episodes, dataset_id = built
    data = load_transitions(dataset_id, get_task("pusher"), DataSettings(GAMMA))
    for i, episode in enumerate(episodes):
        rewards = np.asarray(episode["rewards"], np.float64)
        expected = np.zeros(STEPS)
        running = 0.0
        for t in range(STEPS - 1, -1, -1):  # truncated tail: no bootstrap
            running = rewards[t] + GAMMA * running
            expected[t] = running
        # Every Pusher reward is negative (a failure in a sparse task's eyes), yet
        # dense tasks get no all-failure rule: the return is the plain discounted sum.
        assert rewards.max() < 0
        np.testing.assert_allclose(data.mc_return[i * STEPS : (i + 1) * STEPS], expected, rtol=1e-5)


def test_expert_beats_uniform_random_actions():
    expert = build_episodes("pusher", "expert", 6, seed=1)
    env = make_env("pusher", flatten=False)
    random = [record_episode(env, random_controller, seed) for seed in range(6)]
    env.close()
    expert_return = np.mean([sum(ep["rewards"]) for ep in expert])
    random_return = np.mean([sum(ep["rewards"]) for ep in random])
    # Measured over 100 episodes: expert about -40, uniform random about -150.
    assert expert_return > random_return + 60
    assert sum(map(episode_succeeded, expert)) >= 4
    assert not any(map(episode_succeeded, random))


def test_same_seed_same_data_and_qualities_differ():
    a = build_episodes("pusher", "medium", 2, seed=3)
    b = build_episodes("pusher", "medium", 2, seed=3)
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(np.asarray(ea["actions"]), np.asarray(eb["actions"]))
        np.testing.assert_array_equal(ea["observations"][-1], eb["observations"][-1])
    seeds = {q: [s for _, s in episode_plan(q, 3, 3, QUALITIES)] for q in QUALITIES}
    assert seeds["expert"] != seeds["medium"] != seeds["mixed"]


def test_mixed_is_half_expert_and_half_noisy_or_random():
    kinds = [kind for kind, _ in episode_plan("mixed", 400, 0, QUALITIES)]
    assert set(kinds) == {"expert", "medium", "random"}
    assert 0.4 < kinds.count("expert") / len(kinds) < 0.6


def test_unknown_task_or_quality_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'fetch-push'.*pusher"):
        build_episodes("fetch-push", "expert", 1)
    with pytest.raises(ValueError, match="unknown quality 'great'.*expert, medium, mixed"):
        build_episodes("pusher", "great", 1)
