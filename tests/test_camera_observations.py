"""Camera observations, first part (issue 20): the observation spec, the numpy-drawn PointMaze camera,
pixel datasets written through Minari's API and loaded by the loader a user's data goes through, and a
clear refusal where the camera path does not reach yet (learner, actors, replay store)."""

import gymnasium as gym
import minari
import numpy as np
import pytest

from o2o.datasets.builders import build_dataset
from o2o.datasets.minari_io import DatasetError, load_transitions, write_dataset
from o2o.envs import get_task, make_actor_env, make_env
from o2o.envs.maze_camera import BALL, FLOOR, GOAL, WALL, MazeTopCamera
from o2o.envs.obs_spec import CameraSpec, ObservationError, ObsSpec
from user_files_guard import minari_datasets_at

PIXELS = "pointmaze-umaze-pixels"


@pytest.fixture
def minari_root(tmp_path):
    with minari_datasets_at(tmp_path / "minari") as root:
        yield root


def image_box(h, w, c=3, dtype=np.uint8):
    return gym.spaces.Box(0, 255, (h, w, c), dtype)


def test_the_spec_reads_state_and_cameras_from_the_declared_space():
    flat = ObsSpec.from_space(gym.spaces.Box(-1, 1, (7,), np.float32))
    assert flat == ObsSpec(7) and not flat.has_images
    space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (3,), np.float32), "wrist": image_box(64, 48),
                             "front": image_box(84, 84, 1)})  # fmt: skip
    spec = ObsSpec.from_space(space)
    # cameras in name order (the order of ONNX inputs and store columns), sizes as declared
    assert spec == ObsSpec(3, (CameraSpec("front", 84, 84, 1), CameraSpec("wrist", 64, 48, 3)))
    assert spec.image_bytes == 84 * 84 + 64 * 48 * 3
    assert ObsSpec.from_dict(spec.to_dict()) == spec
    assert ObsSpec.from_space(spec.space()) == spec


@pytest.mark.parametrize("space, names", [
    (gym.spaces.Dict({"front": image_box(8, 8)}), "'state'"),  # no state part
    (gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (2,)), "front": image_box(8, 8, dtype=np.float32)}), "'front'"),
    (gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (2,)), "front": gym.spaces.Box(0, 255, (8, 8), np.uint8)}),
     "'front'"),  # no channel axis
    (gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (2,)), "front": image_box(8, 8, 2)}), "'front'"),
    (gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), "Dict"),  # a bare image: say how to declare it
])  # fmt: skip
def test_a_space_the_spec_cannot_use_is_refused_naming_the_part(space, names):
    with pytest.raises(ObservationError, match=names):
        ObsSpec.from_space(space)


def test_an_observation_of_the_wrong_shape_or_dtype_is_refused_naming_the_camera():
    spec = ObsSpec(2, (CameraSpec("front", 4, 4, 3),))
    good = {"state": np.zeros(2, np.float64), "front": np.zeros((4, 4, 3), np.uint8)}
    state, images = spec.split(good)
    assert state.dtype == np.float32 and images["front"] is good["front"]  # uint8 as given, no copy
    for bad, says in [
        ({**good, "front": np.zeros((4, 4, 3), np.float32)}, "camera 'front'"),
        ({**good, "front": np.zeros((5, 4, 3), np.uint8)}, "camera 'front'"),
        ({"state": good["state"]}, "lacks"),
        ({**good, "state": np.array([0.0, np.nan])}, "not finite"),
        ({**good, "state": np.zeros(3)}, r"\(2,\)"),
    ]:
        with pytest.raises(ObservationError, match=says):
            spec.split(bad)


def pixel_of(env: MazeTopCamera, xy) -> tuple[int, int]:
    """Image (row, col) of world point xy, computed independently of the renderer: the maze's longer side
    spans the image, the world's y axis points up the image."""
    maze = env.unwrapped.maze
    span = max(maze.map_width, maze.map_length) * maze.maze_size_scaling
    col = int((xy[0] + span / 2) * env.size / span)
    row = int((span / 2 - xy[1]) * env.size / span)
    return row, col


def test_the_top_camera_draws_walls_floor_goal_and_ball_where_they_are():
    env = make_env(PIXELS)
    camera = env  # make_env's outermost wrapper is the camera
    assert isinstance(camera, MazeTopCamera)
    obs, _ = env.reset(seed=3)
    raw = camera.last_raw_obs
    image = obs["top"]
    assert image.dtype == np.uint8 and image.shape == (48, 48, 3)
    np.testing.assert_array_equal(obs["state"], raw["observation"][2:4].astype(np.float32))  # velocity only
    assert tuple(image[pixel_of(camera, raw["achieved_goal"])]) == BALL
    maze = camera.unwrapped.maze
    goal_px = pixel_of(camera, raw["desired_goal"])
    assert tuple(image[goal_px]) in (GOAL, BALL)  # the ball may sit on the goal
    # U maze: row 0 is all wall, cell (1, 1) is floor; check at those cells' centres
    wall_xy, floor_xy = maze.cell_rowcol_to_xy(np.array([0, 2])), maze.cell_rowcol_to_xy(np.array([1, 1]))
    assert tuple(image[pixel_of(camera, wall_xy)]) == WALL
    far_from_ball_and_goal = all(np.linalg.norm(floor_xy - p) > 0.5 for p in (raw["achieved_goal"], raw["desired_goal"]))
    if far_from_ball_and_goal:
        assert tuple(image[pixel_of(camera, floor_xy)]) == FLOOR
    # the ball moves in the image as it moves in the maze
    for _ in range(20):
        obs, *_ = env.step(np.array([1.0, 0.0], np.float32))
    assert tuple(obs["top"][pixel_of(camera, camera.last_raw_obs["achieved_goal"])]) == BALL
    env.close()


def test_a_pixel_dataset_round_trips_through_minari_and_the_loader(minari_root):
    build_dataset(PIXELS, "mixed", 4, seed=2, progress=False)
    build_dataset("pointmaze-umaze", "mixed", 4, seed=2, progress=False)
    data = load_transitions(f"o2o/{PIXELS}/mixed-v0", get_task(PIXELS))
    episodes = list(minari.load_dataset(f"o2o/{PIXELS}/mixed-v0").iterate_episodes())
    steps = [len(ep.actions) for ep in episodes]
    assert len(data) == sum(steps) and data.obs.shape == (sum(steps), 2)
    frames = data.frames["top"]
    assert frames.dtype == np.uint8 and frames.shape == (sum(steps) + len(steps), 48, 48, 3)  # T + 1 frames each
    row = 0
    for ep, n in zip(episodes, steps):
        np.testing.assert_array_equal(frames[data.obs_frame[row : row + n]], ep.observations["top"][:-1])
        np.testing.assert_array_equal(frames[data.next_frame[row : row + n]], ep.observations["top"][1:])
        assert data.episode_end[row : row + n].tolist() == [False] * (n - 1) + [True]
        row += n
    # the same seeds drive the same trajectories as the state dataset: its velocities (flattened in key order:
    # achieved_goal, desired_goal, observation = x, y, vx, vy) are our state
    state = load_transitions("o2o/pointmaze-umaze/mixed-v0", get_task("pointmaze-umaze"))
    np.testing.assert_allclose(data.obs, state.obs[:, 6:8], atol=1e-6)
    np.testing.assert_array_equal(data.mc_return, state.mc_return)


def test_a_dataset_whose_images_differ_from_the_task_is_refused(minari_root):
    env = MazeTopCamera(make_env("pointmaze-umaze", flatten=False), size=64)  # a 64x64 camera, the task says 48
    obs, _ = env.reset(seed=0)
    episode = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
    for _ in range(3):
        action = np.zeros(2, np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(("observations", "actions", "rewards", "terminations", "truncations"),
                              (obs, action, reward, terminated, truncated)):  # fmt: skip
            episode[key].append(value)
    write_dataset("user/small-camera-v0", env, [episode], algorithm_name="test", description="64x64 frames")
    with pytest.raises(DatasetError, match=r"camera 'top' frames are uint8 \(64, 64, 3\).*\(48, 48, 3\)"):
        load_transitions("user/small-camera-v0", get_task(PIXELS))


def test_an_actor_env_with_cameras_stays_a_dict_and_its_images_stay_uint8():
    """The actor splits a camera observation by its spec; flattening would turn images into floats."""
    env = make_actor_env(PIXELS)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    obs, _ = env.reset(seed=0)
    assert obs["top"].dtype == np.uint8 and obs["state"].dtype == np.float32
    env.close()


def test_episode_boundaries_come_from_the_frames_when_the_state_repeats(minari_root):
    """A user's dataset may end an episode with neither flag set; o2o splits trajectories where the next
    observation jumps. With a still ball the state (its velocity) is 0 on both sides of the boundary: the
    frames still tell the episodes apart, so MC returns do not run into the next episode."""
    env = make_env(PIXELS)
    episodes = []
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        episode = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        for _ in range(3):
            action = np.zeros(2, np.float32)
            obs, *_ = env.step(action)
            for key, value in zip(("observations", "actions", "rewards", "terminations", "truncations"),
                                  (obs, action, 0.0, False, False)):  # fmt: skip
                episode[key].append(value)
        episodes.append(episode)
    write_dataset("user/still-ball-v0", env, episodes, algorithm_name="test", description="no end flags")
    data = load_transitions("user/still-ball-v0", get_task(PIXELS))
    assert np.all(data.obs == 0.0)  # nothing in the state marks the boundary
    assert data.episode_end.tolist() == [False, False, True, False, False, True]
