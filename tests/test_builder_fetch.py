"""Fetch builders: real Minari round trip, flat layout, controller quality, sparse MC returns.

Fetch steps slowly (~700 steps/s, 50 steps an episode), so every test uses a
handful of episodes.
"""

import minari
import numpy as np
import pytest

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.builders.common import episode_succeeded, record_episode
from o2o.datasets.builders.fetch import QUALITIES, TASKS, build_episodes, episode_plan, random_controller
from o2o.datasets.minari_io import load_transitions, write_dataset
from o2o.envs import get_task, make_env

GAMMA = 0.99
STEPS = 50  # Fetch's time limit; no termination
GOAL_KEYS = {"achieved_goal", "desired_goal", "observation"}


@pytest.fixture(scope="module", params=TASKS)
def built(request):
    """(task, episodes, dataset id) of a small mixed dataset written as a real Minari dataset."""
    task = request.param
    dataset_id = f"o2o-test/{task}/mixed-v0"  # not an o2o builder id: no build record
    episodes = build_episodes(task, "mixed", 10, seed=0)  # seed 0: successes and failures
    env = make_env(task, flatten=False)
    write_dataset(dataset_id, env, episodes, algorithm_name="test", description="fetch builder test")
    env.close()
    return task, episodes, dataset_id


def test_minari_dataset_keeps_dict_observations(built):
    task, episodes, dataset_id = built
    dataset = minari.load_dataset(dataset_id)
    assert dataset.spec.total_episodes == len(episodes)
    assert dataset.spec.total_steps == STEPS * len(episodes)
    assert set(dataset.observation_space.spaces) == GOAL_KEYS
    for recorded, episode in zip(episodes, dataset.iterate_episodes()):
        assert set(episode.observations) == GOAL_KEYS
        assert episode.observations["observation"].shape == (STEPS + 1, 25)
        assert episode.observations["achieved_goal"].shape == (STEPS + 1, 3)
        assert episode.actions.shape == (STEPS, 4)
        assert np.abs(episode.actions).max() <= 1.0
        assert set(np.unique(episode.rewards)) <= {-1.0, 0.0}
        assert not episode.terminations.any() and episode.truncations[-1]
        np.testing.assert_allclose(episode.rewards, recorded["rewards"])
        # achieved_goal is the block position, also at observation[3:6].
        np.testing.assert_allclose(episode.observations["achieved_goal"], episode.observations["observation"][:, 3:6])


def test_flat_obs_is_achieved_desired_observation_in_that_order(built):
    task, _, dataset_id = built
    data = load_transitions(dataset_id, get_task(task), DataSettings(GAMMA))
    episodes = list(minari.load_dataset(dataset_id).iterate_episodes())
    obs = episodes[0].observations
    expected = np.concatenate([obs["achieved_goal"], obs["desired_goal"], obs["observation"]], axis=1)
    assert data.obs.shape == (STEPS * len(episodes), 3 + 3 + 25)
    np.testing.assert_allclose(data.obs[:STEPS], expected[:-1], rtol=1e-6)
    np.testing.assert_allclose(data.next_obs[:STEPS], expected[1:], rtol=1e-6)
    assert data.episode_end.sum() == len(episodes)


def test_failed_episodes_get_the_sparse_failure_mc_return(built):
    task, episodes, dataset_id = built
    data = load_transitions(dataset_id, get_task(task), DataSettings(GAMMA))
    rows = np.split(np.arange(len(data)), np.flatnonzero(data.episode_end)[:-1] + 1)
    failed = [i for i, ep in enumerate(episodes) if max(ep["rewards"]) == -1.0]
    assert failed and len(failed) < len(episodes), "the mixed data should hold successes and failures"
    for i, idx in enumerate(rows):
        if i in failed:
            np.testing.assert_allclose(data.mc_return[idx], -1.0 / (1.0 - GAMMA), rtol=1e-6)
        else:  # a success step (reward 0) lifts the return above the all-failure value
            assert data.mc_return[idx].max() > -1.0 / (1.0 - GAMMA) + 1.0


@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds_where_uniform_random_actions_do_not(task):
    expert = build_episodes(task, "expert", 5, seed=1)
    env = make_env(task, flatten=False)
    random = [record_episode(env, random_controller, seed) for seed in range(5)]
    env.close()
    assert sum(map(episode_succeeded, expert)) >= 4
    assert sum(map(episode_succeeded, random)) <= 1


def test_same_seed_same_data_and_qualities_differ():
    a = build_episodes("fetch-push", "expert", 2, seed=3)
    b = build_episodes("fetch-push", "expert", 2, seed=3)
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(np.asarray(ea["actions"]), np.asarray(eb["actions"]))
        np.testing.assert_array_equal(ea["observations"][-1]["observation"], eb["observations"][-1]["observation"])
    seeds = {q: [s for _, s in episode_plan("fetch-push", q, 3, seed=3)] for q in QUALITIES}
    assert seeds["expert"] != seeds["medium"] != seeds["mixed"]


def test_mixed_is_half_expert_and_half_noisy_or_random():
    kinds = [kind for kind, _ in episode_plan("fetch-pick", "mixed", 400, seed=0)]
    assert set(kinds) == {"expert", "medium", "random"}
    assert 0.4 < kinds.count("expert") / len(kinds) < 0.6


def test_unknown_task_or_quality_is_a_clear_error():
    with pytest.raises(ValueError, match="fetch builder: unknown task 'pusher'"):
        build_episodes("pusher", "expert", 1)
    with pytest.raises(ValueError, match="unknown quality 'great'.*expert, medium, mixed"):
        build_episodes("fetch-push", "great", 1)
