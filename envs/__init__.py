"""Task registry, env wrappers and the envs actors step, a task's or a robot's (no torch here: robots import this)."""

from .observation import FlattenDictObservation, flat_keys, flatten_obs
from .robot import HoldableEnv, check_actor_env, hold_env, load_env_class, make_actor_env
from .tasks import TASKS, TaskSpec, get_task, make_env, task_names

__all__ = ["TASKS", "TaskSpec", "FlattenDictObservation", "HoldableEnv", "check_actor_env", "flat_keys", "flatten_obs",
           "get_task", "hold_env", "load_env_class", "make_actor_env", "make_env", "task_names"]  # fmt: skip
