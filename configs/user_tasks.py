"""Hydra's ``task=NAME`` for a user's own tasks (envs/tasks.py: ``O2O_TASKS``, ``register_task``).

``task=NAME`` picks configs/task/NAME.yaml, and the learner's commands configs/task_dataset/NAME.yaml; a
user's task has no file there, so each one its modules register is stored in Hydra's ConfigStore under
those two groups instead (the same ``_global_`` content as the files: ``task: NAME``, and
``dataset: <its first dataset>``, or "" for a task with no data yet: ``dataset=...`` or ``from_scratch=true``). Hydra reads
the ConfigStore after importing this package (``pkg://o2o.configs``), so every command finds them:
o2o-pretrain, o2o-learner, o2o-actor, o2o-launch, o2o-retrain.
"""

from __future__ import annotations

import os

USER_TASKS_VAR = "O2O_TASKS"  # envs/tasks.py's; spelled here too so that a run without it imports nothing


def store_user_tasks() -> list[str]:
    """Import the modules ``$O2O_TASKS`` names and give Hydra a ``task`` and a ``task_dataset`` option per task
    they register; returns those tasks' names (none, importing nothing, when the variable is unset)."""
    if not os.environ.get(USER_TASKS_VAR):
        return []
    from hydra.core.config_store import ConfigStore

    from o2o.envs.tasks import BUILTIN_TASKS, get_task, task_names

    store = ConfigStore.instance()
    names = [name for name in task_names() if name not in BUILTIN_TASKS]  # task_names() imports the modules
    for name in names:
        datasets = get_task(name).datasets
        store.store(group="task", name=name, node={"task": name}, package="_global_")
        # No dataset yet (a task declared with its spaces): "" until one is recorded (from_scratch=true needs none).
        store.store(group="task_dataset", name=name, node={"dataset": datasets[0] if datasets else ""},
                    package="_global_")  # fmt: skip
    return names
