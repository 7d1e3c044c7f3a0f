"""Task registry: flat observations in the documented order, success signal, reward conventions."""

import numpy as np
import pytest

from o2o.envs import flatten_obs, get_task, make_env, task_names

REQUIRED = {"pointmaze-umaze", "pointmaze-medium", "pusher", "fetch-push", "fetch-pick", "adroit-door-binary"}


def test_registry_has_the_required_tasks():
    assert REQUIRED <= set(task_names())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_task_gives_flat_float32_observations_and_a_success_flag(name):
    env = make_env(name)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert isinstance(info["success"], bool)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and np.isfinite(obs).all()
    assert isinstance(info["success"], bool) and isinstance(reward, float)
    env.close()


def test_dict_observations_flatten_in_alphabetical_key_order():
    raw = make_env("fetch-push", flatten=False)
    flat = make_env("fetch-push")
    raw_obs, _ = raw.reset(seed=3)
    flat_obs, _ = flat.reset(seed=3)
    expected = np.concatenate([raw_obs["achieved_goal"], raw_obs["desired_goal"], raw_obs["observation"]])
    np.testing.assert_allclose(flat_obs, expected.astype(np.float32))
    np.testing.assert_allclose(flatten_obs(raw_obs), flat_obs)
    assert flat.obs_keys == ["achieved_goal", "desired_goal", "observation"]


def test_sparse_reward_conventions():
    env = make_env("fetch-push")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(4, np.float32))
    spec = get_task("fetch-push")
    assert reward in (spec.reward_pos, spec.reward_neg)
    assert (reward == spec.reward_pos) == info["success"]


def test_adroit_door_binary_reward_is_minus_one_until_success():
    env = make_env("adroit-door-binary")
    env.reset(seed=0)
    for _ in range(5):
        _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
        assert reward == -1.0 and not info["success"] and not terminated
    assert env.spec.max_episode_steps == 200


def test_pusher_success_is_the_puck_near_the_goal():
    env = make_env("pusher")
    env.reset(seed=0)
    data = env.unwrapped.data
    _, _, _, _, info = env.step(np.zeros(7, np.float32))
    far = np.linalg.norm(data.body("object").xpos[:2] - data.body("goal").xpos[:2])
    assert info["success"] == (far < 0.05)


def test_normalised_scores():
    assert get_task("pointmaze-umaze").normalized_score(mean_return=0.3, success_rate=0.5) == 50.0
    pusher = get_task("pusher")
    assert pusher.normalized_score(pusher.ref_max_return, 0.0) == pytest.approx(100.0)
    assert pusher.normalized_score(pusher.ref_min_return, 0.0) == pytest.approx(0.0)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(KeyError, match="Did you mean pusher"):
        get_task("pushr")
