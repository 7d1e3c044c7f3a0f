"""o2o's Hydra configs (``pkg://o2o.configs``). Importing the package, as Hydra does before it composes a
command's config, also gives Hydra the tasks of the modules named by ``$O2O_TASKS`` (configs/user_tasks.py)."""

from .user_tasks import store_user_tasks

store_user_tasks()
