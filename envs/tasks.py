"""Task registry: which gymnasium env (or which robot and dataset) a task is, and how o2o reads it.

A task fixes everything the learner and the actors must agree on: the env id
and its kwargs, the flat observation (dict observations flattened in
alphabetical key order, see ``envs.observation``), the success signal (always
``info["success"]`` after ``make_env``), the reward convention and the score
normalisation.

A real-world task (``env_id=None``) has no simulator: its actors drive a robot (``o2o-actor
robot.type=...``), its observation (state size, cameras) and action bounds are those of its
offline dataset (``datasets[0]``, a Minari dataset: ``task_spaces``), and the learner runs no
evaluation episodes of its own (the actors' episodes are the evaluation).

Your own tasks, without editing o2o: a Python module (or a ``.py`` file) that calls
``register_task``, named by the environment variable ``O2O_TASKS`` (comma-separated); it is
imported the first time a task is looked up, and Hydra's ``task=NAME`` finds its tasks too
(configs/__init__.py), for o2o-pretrain, o2o-learner, o2o-actor and o2o-launch alike:

    # my_tasks.py
    from o2o.envs.tasks import TaskSpec, register_task

    register_task(TaskSpec(
        name="so101-pick-cube", env_id=None, reward="sparse", reward_pos=1.0, reward_neg=0.0,
        score="success", max_episode_steps=300, datasets=("so101/pick-cube-v0",),
        description="SO-101 picks the red cube; operator keys give the reward."))

    O2O_TASKS=$PWD/my_tasks.py o2o-pretrain task=so101-pick-cube
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Literal

import gymnasium as gym
import numpy as np

from .obs_spec import ObsSpec
from .observation import FlattenDictObservation
from .user_tasks import dataset_spaces, import_task_modules

_robotics_registered = False


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    """Short o2o name, e.g. ``pointmaze-umaze``."""
    env_id: str | None = None
    """gymnasium id passed to ``gym.make``; None: a real-world task (no simulator: its actors drive a
    robot, its spaces are those of its dataset ``datasets[0]``)."""
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
    """Minari ids that o2o's builders make for this task (``o2o-dataset build``); a real-world task's
    offline datasets (ids under MINARI_DATASETS_PATH or folder paths), the first of which defines its
    observation and action spaces."""
    description: str = ""
    camera: str | None = None
    """Camera observations: "maze_top" (envs/maze_camera.py, numpy-drawn) gives the Dict
    {"state": float32, "top": uint8 image} (envs/obs_spec.py); "fetch_front" (envs/mujoco_camera.py,
    MuJoCo offscreen rendering) {"state": gripper state, "front": uint8 image}; None: a flat state vector."""
    observation_space: gym.Space | None = None
    """A real-world task with no dataset yet (HIL-SERL's start: online from scratch, the operator's takeovers as
    the first demonstrations): its observation space, a float32 Box of the joint readings or a Dict of "state"
    and uint8 camera images (envs/obs_spec.py). None: its dataset's."""
    action_space: gym.spaces.Box | None = None
    """With ``observation_space``: the action space, a 1-D Box whose bounds are the joints' limits."""

    @property
    def real_world(self) -> bool:
        """No simulator: actors drive a robot, the learner cannot run evaluation episodes."""
        return self.env_id is None

    def normalized_score(self, mean_return: float, success_rate: float) -> float:
        if self.score == "success":
            return 100.0 * success_rate
        span = self.ref_max_return - self.ref_min_return
        return 100.0 * (mean_return - self.ref_min_return) / span


def _datasets(task: str, *qualities: str) -> tuple[str, ...]:
    return tuple(f"o2o/{task}/{quality}-v0" for quality in qualities)


# fetch-push, also seen by a camera (fetch-push-pixels): one spec, the pixel task its variant.
FETCH_PUSH = TaskSpec(
    name="fetch-push",
    env_id="FetchPush-v4",
    reward="sparse",
    reward_pos=0.0,
    reward_neg=-1.0,
    success_key="is_success",
    score="success",
    datasets=_datasets("fetch-push", "expert", "medium", "mixed"),
    description="Fetch arm pushes a block to a goal, sparse -1/0 reward.",
)

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
        FETCH_PUSH,
        dataclasses.replace(
            FETCH_PUSH,
            name="fetch-push-pixels",
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
            "fingertip to a fixed target within 3 cm from a random start; sparse reward 1 on success, which ends "
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


BUILTIN_TASKS = frozenset(TASKS)
USER_TASKS_VAR = "O2O_TASKS"
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_loaded_user_tasks: str | None = None  # the O2O_TASKS value whose modules are imported


class UserTasksError(ValueError):
    """A module named by O2O_TASKS that cannot be imported, or a task it registers that is refused."""


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a user's task (from a module named by ``O2O_TASKS``): a new name, or the same spec again
    (a module imported twice); a real-world task (``env_id=None``) names its dataset."""
    if not _TASK_NAME.fullmatch(spec.name):
        raise UserTasksError(f"task name {spec.name!r}: use letters, digits, '-', '_' and '.' (it is also "
                             "the config name in task=NAME)")  # fmt: skip
    if spec.name in BUILTIN_TASKS:
        raise UserTasksError(f"task {spec.name!r} is one of o2o's own tasks: give yours another name")
    if spec.name in TASKS and TASKS[spec.name] != spec:
        raise UserTasksError(f"task {spec.name!r} is registered twice with different settings")
    if spec.real_world:
        if not spec.datasets and (spec.observation_space is None or spec.action_space is None):
            raise UserTasksError(f"task {spec.name!r} is a real-world task (env_id=None): name its offline dataset, "
                                 "datasets=('my/dataset-v0',) (a Minari id or folder), whose observation and action "
                                 "spaces are the task's; or, with no data yet, give observation_space= and "
                                 "action_space=")  # fmt: skip
        if (spec.observation_space is None) != (spec.action_space is None):
            raise UserTasksError(f"task {spec.name!r}: give observation_space= and action_space= together")
        if spec.camera is not None or spec.env_kwargs:
            raise UserTasksError(f"task {spec.name!r} is a real-world task (env_id=None): camera= and env_kwargs= "
                                 "belong to simulated tasks (a robot's cameras come from its config)")  # fmt: skip
    TASKS[spec.name] = spec
    return spec


def load_user_tasks() -> None:
    """Import the modules (or ``.py`` files) named in ``$O2O_TASKS``, comma-separated, once per value of it."""
    global _loaded_user_tasks
    value = os.environ.get(USER_TASKS_VAR, "")
    if value != _loaded_user_tasks:
        import_task_modules(value, USER_TASKS_VAR, UserTasksError)
        _loaded_user_tasks = value


def task_names() -> list[str]:
    load_user_tasks()
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (o2o's own, or a user's from ``$O2O_TASKS``); a clear error with suggestions otherwise."""
    load_user_tasks()
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    yours = "" if os.environ.get(USER_TASKS_VAR) else f" Your own tasks: a module that calls register_task, named by {USER_TASKS_VAR}."
    raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(task_names())}.{yours}")


def task_spaces(task: str | TaskSpec) -> tuple[gym.Space, gym.spaces.Box]:
    """The observation and action spaces an agent of ``task`` sees: its env's (``make_env``), or for a
    real-world task its dataset's (``datasets[0]``: a flat float state Box, or a Dict of "state" and uint8
    camera images, envs/obs_spec.py; a 1-D Box of actions with finite bounds)."""
    spec = get_task(task) if isinstance(task, str) else task
    if not spec.real_world:
        env = make_env(spec)
        try:
            return env.observation_space, env.action_space
        finally:
            env.close()
    if spec.observation_space is not None:
        obs_space, action_space, where = spec.observation_space, spec.action_space, f"task {spec.name}"
    else:
        obs_space, action_space = dataset_spaces(spec.datasets[0])
        where = f"task {spec.name}'s dataset {spec.datasets[0]}"
    try:
        obs_space = ObsSpec.from_space(obs_space).space()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
            and np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):  # fmt: skip
        raise ValueError(f"{where}: its action space is {action_space}; a robot task needs a 1-D Box with finite "
                         "bounds (the joints' limits: the policy's actions are scaled to them)")  # fmt: skip
    return obs_space, gym.spaces.Box(action_space.low.astype(np.float32), action_space.high.astype(np.float32))


class NoSimulator(ValueError):
    """``make_env`` of a real-world task: there is no env to make."""


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
    if spec.real_world:
        raise NoSimulator(f"task {spec.name} is a real-world task: it has no simulator; its actors run a robot "
                          f"(o2o-actor task={spec.name} robot.type=... arm.limits=...) and its spaces are its "
                          f"dataset's ({spec.datasets[0] if spec.datasets else 'none named'})")  # fmt: skip
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
