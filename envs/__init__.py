"""Task registry and env wrappers (no torch here: robots import this)."""

from .observation import FlattenDictObservation, flat_keys, flatten_obs
from .tasks import TASKS, TaskSpec, get_task, make_env, task_names

__all__ = ["TASKS", "TaskSpec", "FlattenDictObservation", "flat_keys", "flatten_obs", "get_task", "make_env", "task_names"]
