"""o2o's Hydra configs (``pkg://o2o.configs``). Importing the package, as Hydra does before it composes a
command's config, also gives Hydra the tasks of the modules named by ``$O2O_TASKS`` (configs/user_tasks.py)."""

import sys

from .user_tasks import store_user_tasks

try:
    store_user_tasks()
except ValueError as err:  # envs.tasks.UserTasksError; Hydra would report any ValueError here as "no config module"
    print(f"o2o: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
