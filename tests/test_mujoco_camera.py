"""fetch-push-pixels: FetchPush seen by an offscreen MuJoCo camera (envs/mujoco_camera.py) plus the gripper's
state; its scripted datasets through Minari; the GL backend choice and its error.

Where a pixel should be is computed here with a pinhole camera from the view's numbers (MuJoCo's free
camera: forward = (cos el cos az, cos el sin az, sin el), 45 degree vertical field of view), not by the
renderer. Tests that render need offscreen OpenGL and skip, saying what to install, where there is none.
"""

import os
import subprocess
import sys

import mujoco
import numpy as np
import pytest

from o2o.datasets.builders import build_dataset, dataset_id
from o2o.datasets.builders.fetch import build_episodes, episode_plan
from o2o.datasets.minari_io import load_transitions
from o2o.envs import get_task, make_actor_env, make_env
from o2o.envs.mujoco_camera import FETCH_VIEW, GL_BACKENDS, GLUnavailable, _probe
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from user_files_guard import minari_datasets_at

TASK = "fetch-push-pixels"
SIZE = 84
PUCK_MAX = 90  # the puck (block_mat) is dark grey: every channel under this
TABLE_MIN = 200  # the table is near white: every channel over this


@pytest.fixture
def env(gl):
    env = make_env(TASK)
    yield env
    env.close()


def pixel(point) -> tuple[int, int]:
    """(row, col) where a world point appears in the 84x84 image of FETCH_VIEW."""
    az, el = np.radians(FETCH_VIEW["azimuth"]), np.radians(FETCH_VIEW["elevation"])
    forward = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    eye = np.array(FETCH_VIEW["lookat"]) - FETCH_VIEW["distance"] * forward
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    ray = np.asarray(point) - eye
    focal = SIZE / 2 / np.tan(np.radians(45.0) / 2)
    depth = ray @ forward
    return int(SIZE / 2 - focal * (ray @ up) / depth), int(SIZE / 2 + focal * (ray @ right) / depth)


def is_red(rgb) -> bool:  # the goal: the target0 site, rgba 1 0 0
    return rgb[0] > 150 and rgb[1] < 90 and rgb[2] < 90


def test_the_observation_is_the_declared_dict_with_the_gripper_state(env):
    assert ObsSpec.from_space(env.observation_space) == ObsSpec(10, (CameraSpec("front", SIZE, SIZE, 3),))
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(np.array([1.0, -1.0, 0.5, 0.0], np.float32))
    assert set(obs) == {"state", "front"} and env.observation_space.contains(obs)
    assert obs["front"].dtype == np.uint8 and obs["front"].shape == (SIZE, SIZE, 3)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (10,)
    # The gripper's state read from the simulator itself: grip site position, finger joints (in the model's
    # order: right, left), their velocities (Fetch scales velocities by its control period, 20 substeps x 2 ms).
    model, data = env.unwrapped.model, env.unwrapped.data
    fingers = [model.joint(f"robot0:{side}_gripper_finger_joint") for side in ("r", "l")]
    dt = 20 * 0.002
    np.testing.assert_allclose(obs["state"][0:3], data.site("robot0:grip").xpos, rtol=1e-6)
    np.testing.assert_allclose(obs["state"][3:5], [data.qpos[j.qposadr[0]] for j in fingers], atol=1e-7)
    np.testing.assert_allclose(obs["state"][8:10], [data.qvel[j.dofadr[0]] * dt for j in fingers], atol=1e-7)
    # The puck and the goal are not in the state: only the image shows them.
    for hidden in (data.body("object0").xpos, env.unwrapped.goal):
        assert not np.any(np.isclose(obs["state"][:, None], hidden[None, :], atol=1e-4))


def test_the_image_shows_the_puck_where_it_is(env):
    env.reset(seed=0)
    base = env.unwrapped
    grip = base.initial_gripper_xpos
    here, there = grip + [0.12, -0.12, 0.0], grip + [0.12, 0.05, 0.0]  # in front of the gripper, seen clearly
    frames = []
    for xy in (here, there):
        qpos = base.data.joint("object0:joint").qpos
        qpos[:2], qpos[2] = xy[:2], base.height_offset
        mujoco.mj_forward(base.model, base.data)
        frames.append(env.observation(base._get_obs())["front"])
    (r1, c1), (r2, c2) = pixel(np.append(here[:2], base.height_offset)), pixel(np.append(there[:2], base.height_offset))
    assert frames[0][r1, c1].max() < PUCK_MAX and frames[0][r2, c2].min() > TABLE_MIN  # puck here, table there
    assert frames[1][r1, c1].min() > TABLE_MIN and frames[1][r2, c2].max() < PUCK_MAX  # and after it moved


def test_the_mocap_target_is_not_drawn(env):
    """Fetch's mocap body (the gripper's commanded position) draws 1 m long axes: a simulator aid that no real
    camera sees. Moving it (without stepping, so that the arm stays) leaves the image as it was."""
    env.reset(seed=0)
    base = env.unwrapped
    before = env.observation(base._get_obs())["front"]
    base.data.mocap_pos[0] += [0.1, 0.1, 0.05]
    mujoco.mj_forward(base.model, base.data)
    np.testing.assert_array_equal(env.observation(base._get_obs())["front"], before)


def test_each_seeds_goal_is_drawn_at_its_place(env):
    frames, goals = [], []
    for seed in (0, 3):
        obs, _ = env.reset(seed=seed)
        frames.append(obs["front"])
        goals.append(pixel(env.unwrapped.goal))
    assert goals[0] != goals[1]
    for frame, (row, col) in zip(frames, goals):
        assert is_red(frame[row, col])
    assert not is_red(frames[0][goals[1]]) and not is_red(frames[1][goals[0]])  # each goal only in its own frame


def test_two_envs_each_render_their_own_scene(gl):
    """Every env has its own GL context, made current before each render: making or freeing another's
    releases it (an evaluation env made and closed beside the actor's, say)."""
    first, second = make_env(TASK), make_env(TASK)
    try:
        alone = first.reset(seed=0)[0]["front"]
        second.reset(seed=3)
        again = first.observation(first.unwrapped._get_obs())["front"]  # same state, after the other rendered
        np.testing.assert_array_equal(again, alone)
        second.close()
        again = first.observation(first.unwrapped._get_obs())["front"]  # and after the other was closed
        np.testing.assert_array_equal(again, alone)
    finally:
        first.close()
        second.close()


def test_a_tiny_dataset_round_trips_with_its_frames(gl, tmp_path):
    with minari_datasets_at(tmp_path / "minari"):
        build_dataset(TASK, "mixed", 2, seed=0, progress=False)
        data = load_transitions(dataset_id(TASK, "mixed"), get_task(TASK))
    steps = 50  # Fetch's time limit
    frames = data.frames["front"]
    assert frames.dtype == np.uint8 and frames.shape == (2 * (steps + 1), SIZE, SIZE, 3)
    assert data.obs.shape == (2 * steps, 10) and data.action.shape == (2 * steps, 4)
    # Each episode's frames once: rows 0-49 use frames 0-50, rows 50-99 frames 51-101.
    np.testing.assert_array_equal(data.obs_frame, np.r_[0:50, 51:101])
    np.testing.assert_array_equal(data.next_frame, data.obs_frame + 1)
    # The same trajectories as the state dataset (same plan and seeds), seen by the camera: its gripper columns.
    state = build_episodes("fetch-push", "mixed", 2, seed=0)
    gripper = np.array([obs["observation"][np.r_[0:3, 9:11, 20:25]] for ep in state for obs in ep["observations"][:-1]])
    np.testing.assert_allclose(data.obs, gripper, rtol=1e-6)
    # The first frame is the env's render of the first reset (Minari stores frames JPEG-encoded: lossy).
    env = make_env(TASK)
    try:
        first = env.reset(seed=episode_plan("fetch-push", "mixed", 2, 0)[0][1])[0]["front"].astype(float)
    finally:
        env.close()
    assert np.abs(frames[0] - first).mean() < 3 < np.abs(frames[51] - first).mean()


def test_an_actor_env_keeps_the_dict(gl):
    env = make_actor_env(TASK, max_episode_steps=3)
    try:
        assert ObsSpec.from_space(env.observation_space).camera_names == ("front",)
        obs, _ = env.reset(seed=0)
        state, images = ObsSpec.from_space(env.observation_space).split(obs)
        assert state.shape == (10,) and images["front"].shape == (SIZE, SIZE, 3)
        truncated = False
        for _ in range(3):
            obs, _, _, truncated, _ = env.step(env.action_space.sample())
        assert truncated and images["front"].dtype == obs["front"].dtype == np.uint8
    finally:
        env.close()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    child = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    return subprocess.run([sys.executable, "-c", code], env={**child, **env}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_backend_is_the_users_or_the_first_that_starts_and_children_inherit_it(gl):
    code = ("import os; from o2o.envs import make_env; env = make_env('fetch-push-pixels'); env.reset(seed=0); "
            "from o2o.envs.mujoco_camera import gl_backend; print(gl_backend(), os.environ['MUJOCO_GL'])")  # fmt: skip
    starts = [name for name in GL_BACKENDS if _probe(name) is None]  # each tried alone, in a fresh process
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [starts[0], starts[0]]  # egl where it starts; left in MUJOCO_GL for children
    for name in GL_BACKENDS:
        done = run_python(code, MUJOCO_GL=name)
        if name in starts:
            assert done.returncode == 0 and done.stdout.split() == [name, name], done.stderr  # the user's, no other
        else:  # not installed here: the error names the package
            assert "GLUnavailable" in done.stderr and "apt-get install" in done.stderr


def test_a_backend_that_cannot_start_is_a_clear_error_at_env_creation(gl):
    # PyOpenGL already bound to EGL (PYOPENGL_PLATFORM=egl): OSMesa cannot start in that process.
    done = run_python("from o2o.envs import make_env; make_env('fetch-push-pixels')", MUJOCO_GL="osmesa",
                      PYOPENGL_PLATFORM="egl")  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("o2o.envs.mujoco_camera.GLUnavailable: MuJoCo's osmesa backend cannot load")
    assert "apt-get install libosmesa6" in last and "MUJOCO_GL=osmesa" in last and "apt-get install libegl1" in last


def test_an_unknown_mujoco_gl_is_refused_naming_the_backends(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "glx")  # mujoco accepts it (as glfw); offscreen needs egl or osmesa
    with pytest.raises(GLUnavailable, match=r"MUJOCO_GL=.glx.*egl or osmesa or glfw.*apt-get install libegl1"):
        make_env(TASK)
