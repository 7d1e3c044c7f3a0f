"""PointMaze builder: planner, controllers, and datasets round-tripped through Minari."""

import minari
import numpy as np
import pytest

from o2o.datasets.builders import pointmaze
from o2o.datasets.builders.common import episode_succeeded, record_episode
from o2o.datasets.minari_io import load_transitions, write_dataset
from o2o.envs import get_task, make_env

OBS_KEYS = ("achieved_goal", "desired_goal", "observation")
STATE_TASKS = [t for t in pointmaze.TASKS if get_task(t).camera is None]  # pixel mazes: test_camera_observations.py


@pytest.fixture(scope="module", params=STATE_TASKS)
def built(request):
    """A small mixed dataset per maze, written and read back through Minari."""
    task = request.param
    dataset_id = f"o2o-test/{task}/mixed-v0"  # not an o2o builder id: no build record
    episodes = pointmaze.build_episodes(task, "mixed", 4, seed=0)
    env = make_env(task, flatten=False)
    write_dataset(dataset_id, env, episodes, algorithm_name="test", description="test")
    env.close()
    return task, dataset_id, episodes


def test_dataset_holds_dict_observations(built):
    task, dataset_id, episodes = built
    ds = minari.load_dataset(dataset_id)
    assert ds.total_episodes == len(episodes)
    assert ds.total_steps == sum(len(ep["actions"]) for ep in episodes)
    for ep, raw in zip(ds.iterate_episodes(), episodes):
        assert set(ep.observations) == set(OBS_KEYS)
        assert ep.observations["observation"].shape == (len(raw["actions"]) + 1, 4)
        # The goal is fixed within an episode (continuing_task=False).
        assert np.ptp(ep.observations["desired_goal"], axis=0).max() == 0.0
        assert np.abs(ep.actions).max() <= 1.0


def test_flat_observations_are_achieved_desired_observation(built):
    task, dataset_id, episodes = built
    data = load_transitions(dataset_id, get_task(task))
    expected = np.concatenate(
        [
            np.concatenate([np.stack([o[key] for o in ep["observations"][:-1]]) for key in OBS_KEYS], axis=1)
            for ep in episodes
        ]
    )
    assert data.obs.shape == (sum(len(ep["actions"]) for ep in episodes), 8)
    np.testing.assert_allclose(data.obs, expected, rtol=1e-6)
    # The ball's xy is both the achieved goal and the first two state entries.
    np.testing.assert_array_equal(data.obs[:, 0:2], data.obs[:, 4:6])


def test_sparse_success_rows_are_terminal(built):
    task, dataset_id, episodes = built
    data = load_transitions(dataset_id, get_task(task))
    # Success ends the episode: reward 1 exactly on the terminal rows, 0 elsewhere.
    np.testing.assert_array_equal(data.reward == 1.0, data.terminated == 1.0)
    assert set(np.unique(data.reward)) <= {0.0, 1.0}
    returns = data.episode_returns()
    assert len(returns) == len(episodes)
    np.testing.assert_array_equal(returns, [float(episode_succeeded(ep)) for ep in episodes])
    # Failed episodes run to the time limit and are truncated, not terminated.
    env = make_env(task, flatten=False)
    limit = env.spec.max_episode_steps
    env.close()
    for ep in episodes:
        if not episode_succeeded(ep):
            assert len(ep["actions"]) == limit and ep["truncations"][-1]


def test_expert_beats_random_on_umaze():
    env = make_env("pointmaze-umaze", flatten=False)
    seeds = range(10)
    expert = sum(episode_succeeded(record_episode(env, pointmaze.episode_controller("expert"), s)) for s in seeds)
    random = sum(episode_succeeded(record_episode(env, pointmaze.random_action, s)) for s in seeds)
    env.close()
    assert expert >= 9
    assert random <= 6 and random < expert


def test_medium_is_slower_than_expert():
    expert = pointmaze.build_episodes("pointmaze-umaze", "expert", 8, seed=3)
    medium = pointmaze.build_episodes("pointmaze-umaze", "medium", 8, seed=3)
    assert _mean_length(medium) > 1.5 * _mean_length(expert)


def _mean_length(episodes: list[dict]) -> float:
    return float(np.mean([len(ep["actions"]) for ep in episodes]))


@pytest.mark.parametrize("task", STATE_TASKS)
def test_waypoints_lead_every_free_cell_to_the_goal(task):
    """Following next_waypoint cell by cell reaches the goal in the BFS distance, never via a wall."""
    env = make_env(task, flatten=False)
    maze = env.unwrapped.maze
    free = pointmaze._free_cells(env)
    for goal in free:
        goal_xy = maze.cell_rowcol_to_xy(np.array(goal))
        dist = pointmaze._distance_to(pointmaze._maze_key(env), goal)
        for start in free:
            cell, hops = start, 0
            while cell != goal:
                nxt = pointmaze._cell(env, pointmaze.next_waypoint(env, maze.cell_rowcol_to_xy(np.array(cell)), goal_xy))
                assert abs(nxt[0] - cell[0]) + abs(nxt[1] - cell[1]) == 1 and nxt in free
                cell, hops = nxt, hops + 1
            assert hops == dist[start]
    env.close()


def test_build_is_reproducible_and_seeded():
    a = pointmaze.build_episodes("pointmaze-umaze", "medium", 2, seed=7)
    b = pointmaze.build_episodes("pointmaze-umaze", "medium", 2, seed=7)
    c = pointmaze.build_episodes("pointmaze-umaze", "medium", 2, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["actions"], y["actions"])
        np.testing.assert_array_equal(x["rewards"], y["rewards"])
    assert not np.array_equal(a[0]["observations"][0]["observation"], c[0]["observations"][0]["observation"])


def test_mixed_is_half_expert():
    kinds = [pointmaze.episode_plan("mixed", i, seed=0)[0] for i in range(200)]
    assert kinds.count("expert") == 100
    assert {"medium", "random"} <= set(kinds[1::2]) <= {"medium", "random"}


def test_unknown_task_or_quality_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'pusher'"):
        pointmaze.build_episodes("pusher", "expert", 1)
    with pytest.raises(ValueError, match="unknown quality 'replay'.*expert, medium, mixed"):
        pointmaze.build_episodes("pointmaze-umaze", "replay", 1)
