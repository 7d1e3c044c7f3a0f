"""Cal-QL fidelity of the MC return-to-go: the Kitchen infinite-horizon tail, the
all-failure rule with non-exact reward scales, Adroit-binary demos without success
dropped, and the online store agreeing with the offline loader.

Expected values are computed by hand or by ``official_calc_return_to_go`` below, a
direct transcription of the official code, never by o2o's own functions.
"""

import numpy as np
import pytest
import zarr

from o2o.datasets.data_settings import DataSettings
from o2o.transport import wire
from o2o.datasets.mc_return import mc_returns, scaled_failure_reward, trajectory_ends, trajectory_return_to_go
from o2o.datasets.minari_io import DatasetError, load_transitions, write_dataset
from o2o.datasets.replay_export import export_minari
from o2o.datasets.replay_store import ReplayStore
from o2o.envs import get_task, make_env

GAMMA = 0.99


def official_calc_return_to_go(rewards, terminals, gamma, reward_neg, is_sparse_reward, infinite_horizon):
    """nakamotoo/Cal-QL, JaxCQL/replay_buffer.py, ``calc_return_to_go`` on branch
    dev/add-kitchen (commit c510025), transcribed line by line; ``reward_neg`` is passed
    in already scaled instead of being looked up from the env name."""
    if len(rewards) == 0:
        return np.array([])
    if is_sparse_reward and np.all(np.array(rewards) == reward_neg):
        return_to_go = [float(reward_neg / (1 - gamma))] * len(rewards)
    else:
        return_to_go = [0] * len(rewards)
        prev_return = 0 if not infinite_horizon else float(rewards[-1] / (1 - gamma))
        for i in range(len(rewards)):
            return_to_go[-i - 1] = rewards[-i - 1] + gamma * prev_return * (1 - terminals[-i - 1])
            prev_return = return_to_go[-i - 1]
    return np.array(return_to_go, dtype=np.float32)


# ------------------------------------------------------------------ infinite horizon


def test_infinite_horizon_truncated_tail_starts_from_last_reward_over_one_minus_gamma():
    got = trajectory_return_to_go([1.0, 2.0, 3.0], [0, 0, 0], gamma=0.5, infinite_horizon=True)
    # Tail 3 / (1 - 0.5) = 6; G2 = 3 + 0.5 * 6 = 6, G1 = 2 + 0.5 * 6 = 5, G0 = 1 + 0.5 * 5 = 3.5.
    np.testing.assert_allclose(got, [3.5, 5.0, 6.0], rtol=1e-6)


def test_infinite_horizon_terminal_last_step_gets_no_tail():
    got = trajectory_return_to_go([1.0, 2.0, 3.0], [0, 0, 1], gamma=0.5, infinite_horizon=True)
    # (1 - terminal) zeroes the tail: G2 = 3, G1 = 2 + 1.5, G0 = 1 + 0.5 * 3.5.
    np.testing.assert_allclose(got, [2.75, 3.5, 3.0], rtol=1e-6)


def test_infinite_horizon_matches_the_official_function_on_random_dense_trajectories():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        for terminal in (0, 1):
            rewards = (rng.normal(size=n) * 3).astype(np.float32)
            terminals = np.zeros(n, np.float32)
            terminals[-1] = terminal
            want = official_calc_return_to_go(rewards, terminals, GAMMA, None, False, True)
            got = trajectory_return_to_go(rewards, terminals, GAMMA, None, infinite_horizon=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_flat_mc_returns_apply_the_tail_per_trajectory():
    # Trajectory A: truncated [1, 1]; B: terminal [2, 4]; C: last row of the array (truncated) [5].
    rewards = np.array([1.0, 1.0, 2.0, 4.0, 5.0], np.float32)
    terminals = np.array([0, 0, 0, 1, 0], np.float32)
    truncations = np.array([0, 1, 0, 0, 0], np.float32)
    obs = np.arange(5, dtype=np.float32)[:, None]
    ends = trajectory_ends(obs, obs + 1, terminals, truncations)
    got = mc_returns(rewards, terminals, ends, 0.5, None, infinite_horizon=True)
    # A: tail 2 -> G1 = 1 + 1 = 2, G0 = 1 + 1 = 2. B: G3 = 4, G2 = 2 + 2 = 4. C: 5 + 0.5 * 10 = 10.
    np.testing.assert_allclose(got, [2.0, 2.0, 4.0, 4.0, 10.0], rtol=1e-6)


def test_all_failure_rule_is_checked_before_the_infinite_horizon_tail():
    # A sparse all-failure trajectory ending in a terminal: the official code returns
    # r_neg / (1 - gamma) everywhere; the backward sum would give r_neg on the last step.
    got = trajectory_return_to_go([-1.0, -1.0, -1.0], [0, 0, 1], GAMMA, -1.0, infinite_horizon=True)
    np.testing.assert_allclose(got, [-100.0] * 3, rtol=1e-5)


# ------------------------------------------------------------------ all-failure rule dtypes

# (raw failure reward, reward_scale, reward_bias): scalings that are not exact in float32.
NON_EXACT = [
    (-1.0, 0.1, 0.0),
    (-1.0, 0.1, 0.3),  # even float32(-0.1f + 0.3f) != float32(0.2): one unit apart
    (-1.0, 0.1, 0.7),
    (-1.0, 0.3, 0.2),
    (-1.0, 1.1, 1.0),
    (-1.0, 0.7, -0.9),
    (0.0, 0.1, 0.3),
    (0.0, 10.0, 0.1),
]


@pytest.mark.parametrize("neg, scale, bias", NON_EXACT)
def test_all_failure_rule_fires_with_non_exact_reward_scales(neg, scale, bias):
    # Rewards scaled in float32, as load_transitions and the store do.
    rewards = np.full(6, neg, np.float32) * scale + bias
    assert rewards.dtype == np.float32
    want = (neg * scale + bias) / (1 - GAMMA)
    for failure in (scaled_failure_reward("sparse", neg, scale, bias), neg * scale + bias):
        got = trajectory_return_to_go(rewards, np.zeros(6), GAMMA, failure)
        np.testing.assert_allclose(got, np.full(6, want), rtol=1e-5)
        got = trajectory_return_to_go(rewards, np.zeros(6), GAMMA, failure, infinite_horizon=True)
        np.testing.assert_allclose(got, np.full(6, want), rtol=1e-5)
        # ... also with a terminal last step, where the backward sum would differ.
        terminal = np.array([0, 0, 0, 0, 0, 1])
        np.testing.assert_allclose(trajectory_return_to_go(rewards, terminal, GAMMA, failure), want, rtol=1e-5)
        # A trajectory that reaches a success (raw reward 1 above the failure) is summed normally.
        success = rewards.copy()
        success[-1] = np.float32(neg + 1.0) * np.float32(scale) + np.float32(bias)
        g = [float(success[-1])]
        for r in rewards[:-1][::-1]:
            g.insert(0, float(r) + GAMMA * g[0])
        np.testing.assert_allclose(trajectory_return_to_go(success, terminal, GAMMA, failure), g, rtol=1e-5)


def _write(dataset_id, task, episodes):
    return write_dataset(dataset_id, make_env(task, flatten=False), episodes, algorithm_name="test", description="t")


def test_load_transitions_all_failure_rule_with_scale_point_one_and_a_bias():
    env = make_env("pointmaze-umaze", flatten=False)
    obs, _ = env.reset(seed=0)
    failure = {"observations": [obs] * 4, "actions": [np.zeros(2, np.float32)] * 3, "rewards": [0.0] * 3,
               "terminations": [False] * 3, "truncations": [False, False, True]}  # fmt: skip
    success = {"observations": [obs] * 3, "actions": [np.zeros(2, np.float32)] * 2, "rewards": [0.0, 1.0],
               "terminations": [False, True], "truncations": [False, False]}  # fmt: skip
    _write("test/mcofficial/scaled-v0", "pointmaze-umaze", [failure, success])
    data = load_transitions("test/mcofficial/scaled-v0", get_task("pointmaze-umaze"), DataSettings(GAMMA, 0.1, 0.3))
    # Failure: 0 * 0.1 + 0.3 = 0.3 each -> 0.3 / 0.01 = 30. Success: [0.3, 0.4], terminal.
    np.testing.assert_allclose(data.mc_return, [30.0, 30.0, 30.0, 0.3 + GAMMA * 0.4, 0.4], rtol=1e-5)


# ------------------------------------------------------------------ Adroit-binary demos


def _door_demo(env, seed, success_steps, steps):
    """A demo of ``steps`` steps whose info['success'] is True at ``success_steps``;
    raw rewards are dense-looking numbers (the binary task replaces them)."""
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    success = [False] + [t in success_steps for t in range(steps)]  # T+1 infos: reset first
    return {
        "observations": [obs + 0.01 * t for t in range(steps + 1)],
        "actions": rng.uniform(-1, 1, (steps, env.action_space.shape[0])).astype(np.float32),
        "rewards": rng.normal(size=steps) * 5,
        "terminations": [False] * steps,
        "truncations": [False] * (steps - 1) + [True],
        "infos": {"success": success},
    }


def test_adroit_binary_demo_without_success_is_dropped():
    task = get_task("adroit-door-binary")
    env = make_env(task, flatten=False)
    failed = _door_demo(env, 0, success_steps=(), steps=3)
    good = _door_demo(env, 1, success_steps=(2, 3), steps=5)
    _write("test/mcofficial/door-v0", task, [failed, good])
    data = load_transitions("test/mcofficial/door-v0", task, DataSettings(GAMMA, 10.0, 5.0))
    # Only the good demo, cut after its last success (step 3); success steps are terminal.
    assert len(data) == 4
    np.testing.assert_allclose(data.obs, np.asarray(good["observations"][:4], np.float32))
    np.testing.assert_allclose(data.reward, [-5.0, -5.0, 5.0, 5.0])
    assert data.terminated.tolist() == [0, 0, 1, 1]
    g1 = -5.0 + GAMMA * 5.0
    np.testing.assert_allclose(data.mc_return, [-5.0 + GAMMA * g1, g1, 5.0, 5.0], rtol=1e-5)


def test_adroit_binary_dataset_without_any_success_is_a_clear_error():
    task = get_task("adroit-door-binary")
    env = make_env(task, flatten=False)
    _write("test/mcofficial/door-fail-v0", task, [_door_demo(env, 0, (), 3), _door_demo(env, 1, (), 4)])
    with pytest.raises(DatasetError, match="all 2 episodes were dropped"):
        load_transitions("test/mcofficial/door-fail-v0", task, DataSettings(GAMMA))


# ------------------------------------------------------------------ online store


def _episode_chunk(seq, episode, obs_dim, act_dim, rewards, terminated):
    n = len(rewards)
    obs = np.sin(np.arange(n + 1)[:, None] * 0.3 + episode + np.arange(obs_dim)).astype(np.float32)
    last = np.zeros(n, np.uint8)
    last[-1] = 1
    return wire.TransitionChunk(
        actor_id="a", seq=seq, policy_version=0, episode_id=episode, step=0, obs=obs[:-1],
        action=np.zeros((n, act_dim), np.float32), reward=np.asarray(rewards, np.float32), next_obs=obs[1:],
        terminated=last if terminated else 0 * last, truncated=0 * last if terminated else last,
        success=0 * last,
    )  # fmt: skip


def test_store_mc_returns_match_load_transitions_with_infinite_horizon(tmp_path):
    task = get_task("pointmaze-umaze")
    settings = DataSettings(discount=0.9, reward_scale=0.1, reward_bias=0.3, mc_infinite_horizon=True)
    store = ReplayStore.create_for_task(tmp_path / "replay", task.name, data=settings)
    assert store.config.data.mc_infinite_horizon
    dims = store.config.obs_dim, store.config.action_dim
    episodes = [([0.0, 1.0, 0.0], False), ([0.0, 0.0, 1.0], True), ([1.0, 0.0], False), ([0.0, 0.0], False)]
    for i, (rewards, terminated) in enumerate(episodes):
        store.append(_episode_chunk(i, i, *dims, rewards, terminated))
    store.commit()
    store.close()
    store = ReplayStore.open(tmp_path / "replay")
    assert store.config.data == settings  # saved in the attrs
    rows = store.read()

    export_minari(store, "o2o/test/mcofficial-ih-v0")
    data = load_transitions("o2o/test/mcofficial-ih-v0", task, settings)
    order = np.lexsort(data.obs.T)
    np.testing.assert_array_equal(data.obs[order], rows["obs"][np.lexsort(rows["obs"].T)])
    np.testing.assert_array_equal(data.mc_return[order], rows["mc_return"][np.lexsort(rows["obs"].T)])

    # And both are the official values (the last, all-failure episode gets r_neg / (1 - gamma)).
    start = 0
    for rewards, terminated in episodes:
        n = len(rewards)
        scaled = np.asarray(rewards, np.float32) * np.float32(0.1) + np.float32(0.3)
        terminals = np.zeros(n)
        terminals[-1] = float(terminated)
        want = official_calc_return_to_go(scaled, terminals, 0.9, np.float32(0.3), True, True)
        np.testing.assert_allclose(rows["mc_return"][start : start + n], want, rtol=1e-5)
        start += n
    # Hand check of the first episode: scaled [0.3, 0.4, 0.3], truncated -> tail 0.3 / 0.1 = 3.
    g2 = 0.3 + 0.9 * 3.0
    g1 = 0.4 + 0.9 * g2
    np.testing.assert_allclose(rows["mc_return"][:3], [0.3 + 0.9 * g1, g1, g2], rtol=1e-5)
    np.testing.assert_allclose(rows["mc_return"][-2:], [3.0, 3.0], rtol=1e-5)


def _write_old_attrs(path, old: dict) -> None:
    """Rewrite a store's metadata as code before ``DataSettings`` wrote it: the data settings
    under the old names (gamma, infinite_horizon) instead of the new ones."""
    group = zarr.open_group(str(path), mode="a")
    attrs = dict(group.attrs["o2o_replay"])
    for new in DataSettings.names():
        del attrs[new]
    group.attrs["o2o_replay"] = {**attrs, **old}


def test_store_made_before_infinite_horizon_existed_reads_it_as_false(tmp_path):
    store = ReplayStore.create(tmp_path / "replay", 3, 2, failure_reward=-1.0)
    store.close()
    _write_old_attrs(tmp_path / "replay", {"gamma": 0.99, "reward_scale": 1.0, "reward_bias": 0.0})
    for mode in ("r", "a"):
        store = ReplayStore.open(tmp_path / "replay", mode)
        assert store.config.data.mc_infinite_horizon is False
        store.close()


def test_store_written_with_the_old_names_opens_with_its_settings_and_keeps_them(tmp_path):
    """A store whose metadata says gamma / infinite_horizon (before ``DataSettings``) opens with
    those values as discount / mc_infinite_horizon, and its MC returns keep following them."""
    settings = DataSettings(discount=0.9, reward_scale=0.1, reward_bias=0.3, mc_infinite_horizon=True)
    store = ReplayStore.create(tmp_path / "replay", 3, 2, failure_reward=-1.0)
    store.close()
    _write_old_attrs(tmp_path / "replay", {"gamma": 0.9, "reward_scale": 0.1, "reward_bias": 0.3,
                                           "infinite_horizon": True})  # fmt: skip
    assert ReplayStore.open(tmp_path / "replay", "r").config.data == settings
    with ReplayStore.open(tmp_path / "replay", "a") as store:
        assert store.config.data == settings
        store.append(_episode_chunk(0, 0, 3, 2, [0.0, 1.0, 0.0], False))
    rows = ReplayStore.open(tmp_path / "replay", "r").read()
    scaled = np.asarray([0.0, 1.0, 0.0], np.float32) * np.float32(0.1) + np.float32(0.3)
    want = official_calc_return_to_go(scaled, np.zeros(3), 0.9, np.float32(-1.0) * np.float32(0.1) + np.float32(0.3),
                                      True, True)  # fmt: skip
    np.testing.assert_allclose(rows["mc_return"], want, rtol=1e-5)
