"""MC return-to-go on hand-computed trajectories (the official Cal-QL rules)."""

import numpy as np
import pytest

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.mc_return import mc_returns, scaled_failure_reward, trajectory_ends, trajectory_return_to_go
from o2o.datasets.minari_io import DatasetError, load_transitions, write_dataset
from o2o.envs import get_task, make_env

GAMMA = 0.99


def flat(rewards, terminals, truncations, obs=None, next_obs=None, gamma=GAMMA, failure=None):
    n = len(rewards)
    if obs is None:  # continuous observations: only terminals and truncations split
        obs = np.arange(n, dtype=np.float32)[:, None]
        next_obs = obs + 1
    ends = trajectory_ends(obs, next_obs, np.array(terminals), np.array(truncations))
    return mc_returns(np.array(rewards, np.float32), np.array(terminals, np.float32), ends, gamma, failure)


def test_dense_trajectory_is_the_backward_discounted_sum():
    got = trajectory_return_to_go([1.0, 2.0, 3.0], [0, 0, 0], gamma=0.5)
    np.testing.assert_allclose(got, [1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3])


def test_sparse_failure_trajectory_gets_failure_over_one_minus_gamma():
    # AntMaze convention: raw reward 0 = failure, scaled by 10 and biased by -5.
    failure = scaled_failure_reward("sparse", reward_neg=0.0, scale=10.0, bias=-5.0)
    assert failure == -5.0
    got = trajectory_return_to_go([-5.0] * 4, [0, 0, 0, 0], GAMMA, failure)
    np.testing.assert_allclose(got, [-500.0] * 4, rtol=1e-6)


def test_sparse_success_trajectory_is_discounted_normally():
    failure = -5.0
    got = trajectory_return_to_go([-5.0, -5.0, 5.0], [0, 0, 1], GAMMA, failure)
    g2 = 5.0
    g1 = -5.0 + GAMMA * g2
    g0 = -5.0 + GAMMA * g1
    np.testing.assert_allclose(got, [g0, g1, g2], rtol=1e-6)


def test_dense_task_has_no_all_failure_rule():
    assert scaled_failure_reward("dense", reward_neg=0.0, scale=1.0, bias=0.0) is None
    got = trajectory_return_to_go([-1.0, -1.0], [0, 0], GAMMA, None)
    np.testing.assert_allclose(got, [-1 - GAMMA, -1])


def test_terminal_mid_dataset_resets_the_return():
    got = flat([1.0, 1.0, 2.0, 2.0], terminals=[0, 1, 0, 0], truncations=[0, 0, 0, 1])
    np.testing.assert_allclose(got, [1 + GAMMA, 1, 2 + 2 * GAMMA, 2], rtol=1e-6)


def test_timeout_is_not_bootstrapped():
    # The episode is cut by a time limit, then another begins with continuous obs.
    got = flat([1.0, 1.0, 3.0], terminals=[0, 0, 0], truncations=[0, 1, 0])
    np.testing.assert_allclose(got, [1 + GAMMA, 1, 3], rtol=1e-6)


def test_observation_discontinuity_splits_trajectories():
    obs = np.array([[0.0], [1.0], [10.0], [11.0]], np.float32)
    next_obs = np.array([[1.0], [2.0], [11.0], [12.0]], np.float32)  # obs[2] != next_obs[1]
    ends = trajectory_ends(obs, next_obs, np.zeros(4), np.zeros(4))
    assert ends.tolist() == [False, True, False, True]
    got = flat([1.0] * 4, [0] * 4, [0] * 4, obs, next_obs)
    np.testing.assert_allclose(got, [1 + GAMMA, 1, 1 + GAMMA, 1], rtol=1e-6)


def test_failure_rule_applies_per_trajectory_after_split():
    # Two trajectories in one flat array: a failure and a success.
    got = flat([-1.0, -1.0, -1.0, 0.0], [0, 0, 0, 1], [0, 1, 0, 0], failure=-1.0)
    np.testing.assert_allclose(got, [-100, -100, -1 + GAMMA * 0.0, 0.0], rtol=1e-6)


def _write(dataset_id, task, episodes):
    env = make_env(task, flatten=False)
    return write_dataset(dataset_id, env, episodes, algorithm_name="test", description="test")


def _maze_episode(env, seed, rewards, terminal):
    obs, _ = env.reset(seed=seed)
    observations = [obs] + [obs] * len(rewards)
    return {
        "observations": observations,
        "actions": [np.zeros(2, np.float32)] * len(rewards),
        "rewards": rewards,
        "terminations": [False] * (len(rewards) - 1) + [terminal],
        "truncations": [False] * (len(rewards) - 1) + [not terminal],
    }


def test_minari_dataset_loads_with_scaled_rewards_and_official_mc_returns():
    env = make_env("pointmaze-umaze", flatten=False)
    failure = _maze_episode(env, 0, [0.0, 0.0, 0.0], terminal=False)
    success = _maze_episode(env, 1, [0.0, 1.0], terminal=True)
    _write("test/mc/scaled-v0", "pointmaze-umaze", [failure, success])

    data = load_transitions("test/mc/scaled-v0", get_task("pointmaze-umaze"), DataSettings(GAMMA, 10.0, -5.0))
    np.testing.assert_allclose(data.reward, [-5, -5, -5, -5, 5])
    np.testing.assert_allclose(data.mc_return, [-500, -500, -500, -5 + GAMMA * 5, 5], rtol=1e-5)
    assert data.terminated.tolist() == [0, 0, 0, 0, 1]
    assert data.episode_end.tolist() == [False, False, True, False, True]


def test_dataset_of_another_task_is_a_clear_error():
    env = make_env("pointmaze-umaze", flatten=False)
    _write("test/mc/maze-v0", "pointmaze-umaze", [_maze_episode(env, 0, [0.0, 0.0], terminal=False)])
    with pytest.raises(DatasetError, match="expects 23 and 7"):
        load_transitions("test/mc/maze-v0", get_task("pusher"))


def test_non_finite_rewards_are_a_clear_error():
    env = make_env("pointmaze-umaze", flatten=False)
    episode = _maze_episode(env, 0, [0.0, float("nan")], terminal=False)
    _write("test/mc/nan-v0", "pointmaze-umaze", [episode])
    with pytest.raises(DatasetError, match="non-finite reward"):
        load_transitions("test/mc/nan-v0", get_task("pointmaze-umaze"))


def test_missing_dataset_names_where_it_looked():
    with pytest.raises(DatasetError, match="MINARI_DATASETS_PATH"):
        load_transitions("nobody/nothing-v0", get_task("pusher"))
