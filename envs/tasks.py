"""Task registry: which gymnasium env a task is, and how o2o reads it.

A task fixes everything the learner and the actors must agree on: the env id
and its kwargs, the flat observation (dict observations flattened in
alphabetical key order, see ``envs.observation``), the success signal (always
``info["success"]`` after ``make_env``), the reward convention and the score
normalisation.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Literal

import gymnasium as gym
import numpy as np

from .observation import FlattenDictObservation

_robotics_registered = False


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    """Short o2o name, e.g. ``pointmaze-umaze``."""
    env_id: str
    """gymnasium id passed to ``gym.make``."""
    env_kwargs: dict = dataclasses.field(default_factory=dict)
    max_episode_steps: int | None = None
    """Time limit; ``None`` keeps the env's registered one."""
    reward: Literal["dense", "sparse"] = "dense"
    reward_pos: float = 1.0
    """Sparse tasks: the raw reward of a success step."""
    reward_neg: float = 0.0
    """Sparse tasks: the raw reward of every other step (the failure reward that
    the MC return-to-go's all-failure rule looks for)."""
    success_key: str = "success"
    """Key of the env's info dict that holds the success flag."""
    binary_reward: bool = False
    """Replace the env's reward with reward_pos on success, reward_neg otherwise
    (Cal-QL's Adroit "binary" setup)."""
    terminate_on_success: bool = False
    score: Literal["success", "return"] = "return"
    """Normalised score: 100 * success rate, or 100 * (return - min) / (max - min)."""
    ref_min_return: float = 0.0
    ref_max_return: float = 1.0
    datasets: tuple[str, ...] = ()
    """Minari ids that o2o's builders make for this task (``o2o-dataset build``)."""
    description: str = ""
    camera: str | None = None
    """Camera observations: "maze_top" (envs/maze_camera.py, numpy-drawn) gives the Dict
    {"state": float32, "top": uint8 image} (envs/obs_spec.py); "fetch_front" (envs/mujoco_camera.py,
    MuJoCo offscreen rendering) {"state": gripper state, "front": uint8 image}; None: a flat state vector."""

    def normalized_score(self, mean_return: float, success_rate: float) -> float:
        if self.score == "success":
            return 100.0 * success_rate
        span = self.ref_max_return - self.ref_min_return
        return 100.0 * (mean_return - self.ref_min_return) / span


def _datasets(task: str, *qualities: str) -> tuple[str, ...]:
    return tuple(f"o2o/{task}/{quality}-v0" for quality in qualities)


# Reference returns for "return"-scored tasks: min = uniform-random policy,
# max = o2o's scripted expert (both measured by `o2o-dataset build`, see README).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            name="pointmaze-umaze",
            env_id="PointMaze_UMaze-v3",
            # The episode ends when the ball reaches the goal (reward 1 on that step).
            env_kwargs={"continuing_task": False, "reward_type": "sparse"},
            reward="sparse",
            reward_pos=1.0,
            reward_neg=0.0,
            score="success",
            datasets=_datasets("pointmaze-umaze", "expert", "medium", "mixed"),
            description="2-D point mass in the U maze, sparse goal reward (D4RL maze2d analogue).",
        ),
        TaskSpec(
            name="pointmaze-medium",
            env_id="PointMaze_Medium-v3",
            env_kwargs={"continuing_task": False, "reward_type": "sparse"},
            reward="sparse",
            reward_pos=1.0,
            reward_neg=0.0,
            score="success",
            datasets=_datasets("pointmaze-medium", "expert", "medium", "mixed"),
            description="2-D point mass in the medium maze, sparse goal reward.",
        ),
        *[
            TaskSpec(
                name=f"pointmaze-{maze}-pixels",
                env_id=f"PointMaze_{env_maze}-v3",
                env_kwargs={"continuing_task": False, "reward_type": "sparse"},
                reward="sparse",
                score="success",
                camera="maze_top",
                datasets=_datasets(f"pointmaze-{maze}-pixels", "expert", "medium", "mixed"),
                description=f"pointmaze-{maze} seen from above: a 48x48 RGB image (walls, ball, goal) plus the "
                "ball's velocity; no OpenGL needed.",
            )
            for maze, env_maze in (("umaze", "UMaze"), ("medium", "Medium"))
        ],
        TaskSpec(
            name="pusher",
            env_id="Pusher-v5",
            reward="dense",
            success_key="success",
            score="return",
            ref_min_return=-150.0,
            ref_max_return=-40.0,
            datasets=_datasets("pusher", "expert", "medium", "mixed"),
            description="7-DoF arm pushes a puck to a goal, dense reward; success = puck within 5 cm of goal.",
        ),
        TaskSpec(
            name="fetch-push",
            env_id="FetchPush-v4",
            reward="sparse",
            reward_pos=0.0,
            reward_neg=-1.0,
            success_key="is_success",
            score="success",
            datasets=_datasets("fetch-push", "expert", "medium", "mixed"),
            description="Fetch arm pushes a block to a goal, sparse -1/0 reward.",
        ),
        TaskSpec(
            name="fetch-push-pixels",
            env_id="FetchPush-v4",
            reward="sparse",
            reward_pos=0.0,
            reward_neg=-1.0,
            success_key="is_success",
            score="success",
            camera="fetch_front",
            datasets=_datasets("fetch-push-pixels", "expert", "medium", "mixed"),
            description="fetch-push seen by a MuJoCo camera: an 84x84 RGB image (table, puck, goal) plus the "
            "gripper's state; needs offscreen OpenGL (EGL or OSMesa).",
        ),
        TaskSpec(
            name="fetch-pick",
            env_id="FetchPickAndPlace-v4",
            reward="sparse",
            reward_pos=0.0,
            reward_neg=-1.0,
            success_key="is_success",
            score="success",
            datasets=_datasets("fetch-pick", "expert", "medium", "mixed"),
            description="Fetch arm picks a block and places it at a goal (maybe in the air), sparse -1/0 reward.",
        ),
        TaskSpec(
            name="arm-reach",
            # robot/sim_arm.py registers the id when gym.make imports it ("module:id"): envs/ never imports robot/.
            env_id="o2o.robot.sim_arm:o2o/ArmReach-v0",
            max_episode_steps=60,
            reward="sparse",
            reward_pos=1.0,
            reward_neg=0.0,
            score="success",
            datasets=_datasets("arm-reach", "expert", "medium", "mixed"),
            description="3-joint MuJoCo arm (robot/sim_arm.py SimArm, the stand-in for an SO-101 through "
            "LeRobot's Robot interface, driven by robot/robot_env.py RobotEnv): joint goals in degrees, "
            "fingertip to a fixed target within 2 cm from a random start; sparse reward 1 on success, which ends "
            "the episode.",
        ),
        TaskSpec(
            name="adroit-door-binary",
            env_id="AdroitHandDoor-v1",
            max_episode_steps=200,
            reward="sparse",
            reward_pos=0.0,
            reward_neg=-1.0,
            binary_reward=True,
            terminate_on_success=True,
            score="success",
            description=(
                "24-DoF hand opens a door; binary -1/0 reward and success is terminal, as in "
                "Cal-QL's Adroit setup. No builder: bring the D4RL/Minari door data."
            ),
        ),
    ]
}


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a clear error with suggestions otherwise."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(task_names())}.")


class TaskWrapper(gym.Wrapper):
    """Applies a task's conventions: ``info["success"]``, binary reward, success-terminal."""

    def __init__(self, env: gym.Env, spec: TaskSpec):
        super().__init__(env)
        self.task = spec

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        info["success"] = bool(info.get(self.task.success_key, False))
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        success = self._success(info)
        info["success"] = success
        if self.task.binary_reward:
            reward = self.task.reward_pos if success else self.task.reward_neg
        if self.task.terminate_on_success and success:
            terminated = True
        return obs, float(reward), bool(terminated), bool(truncated), info

    def _success(self, info: dict) -> bool:
        if self.task.success_key in info:
            return bool(info[self.task.success_key])
        if self.task.name == "pusher":
            return pusher_success(self.env)
        return False


PUSHER_SUCCESS_DISTANCE = 0.05


def pusher_success(env: gym.Env) -> bool:
    """Pusher-v5 reports no success: the puck within 5 cm of the goal (x, y)."""
    data = env.unwrapped.data
    obj = data.body("object").xpos[:2]
    goal = data.body("goal").xpos[:2]
    return bool(np.linalg.norm(obj - goal) < PUSHER_SUCCESS_DISTANCE)


def register_robotics_envs() -> None:
    """gymnasium-robotics registers its envs only when told to; do it once."""
    global _robotics_registered
    if not _robotics_registered:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        _robotics_registered = True


def make_env(task: str | TaskSpec, flatten: bool = True, **make_kwargs) -> gym.Env:
    """A gymnasium env for ``task`` with ``info["success"]`` and the task's reward.

    ``flatten=True`` (what agents use) gives a flat float32 observation;
    ``flatten=False`` keeps the env's own observation (what datasets record). A camera task
    (``spec.camera``) gives its ``{"state", <camera>...}`` Dict either way (envs/obs_spec.py).
    """
    spec = get_task(task) if isinstance(task, str) else task
    register_robotics_envs()
    kwargs = {**spec.env_kwargs, **make_kwargs}
    if spec.max_episode_steps is not None:
        kwargs.setdefault("max_episode_steps", spec.max_episode_steps)
    env = gym.make(spec.env_id, **kwargs)
    env = TaskWrapper(env, spec)
    if spec.camera == "maze_top":
        from .maze_camera import MazeTopCamera

        env = MazeTopCamera(env)
    elif spec.camera == "fetch_front":
        from .mujoco_camera import FetchCamera

        env = FetchCamera(env)
    if not flatten or spec.camera is not None:  # a camera task's Dict is already {"state": float32, images}
        return env
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = FlattenDictObservation(env)
    else:
        env = gym.wrappers.TransformObservation(
            env,
            lambda obs: np.asarray(obs, np.float32),
            gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32),
        )
    return env
