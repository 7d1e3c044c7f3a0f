"""How a user's own tasks reach o2o: the modules that register them, and a real-world task's spaces.

``O2O_TASKS`` names the modules (envs/tasks.py ``load_user_tasks``); a real-world task has no env to
ask for its observation and action spaces, so they are read from its offline Minari dataset, whose
metadata declares both (what the robot recorded; ``minari.DataCollector`` and o2o's
``datasets.minari_io.write_dataset`` store them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import gymnasium as gym


def import_task_modules(value: str, variable: str, error: type[Exception]) -> None:
    """Import each comma-separated entry of ``value`` (the variable ``variable``'s): a module name, or the
    path of a ``.py`` file; any failure raises ``error`` naming the variable and the entry."""
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        try:
            _import(entry)
        except error:
            raise  # a refused register_task: its own message
        except Exception as err:  # the user's code: whatever it raised, their tasks are not there
            raise error(f"{variable}={value!r}: cannot import {entry!r} ({type(err).__name__}: {err}); give module "
                        "names importable here (on PYTHONPATH) or paths of .py files, comma-separated") from err  # fmt: skip


def _import(entry: str) -> None:
    if not entry.endswith(".py"):
        importlib.import_module(entry)
        return
    path = Path(entry).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    name = f"o2o_user_tasks_{path.stem}"  # not importable by another name: loaded once per path
    if getattr(sys.modules.get(name), "__file__", None) == str(path):
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def dataset_spaces(dataset: str) -> tuple[gym.Space, gym.Space]:
    """(observation_space, action_space) declared by a Minari dataset: an id under MINARI_DATASETS_PATH or
    a dataset folder (as ``datasets.minari_io.open_dataset`` reads them)."""
    import minari  # only a real-world task's learner gets here; actors never do

    path = Path(dataset).expanduser()
    try:
        if path.is_dir():
            ds = minari.MinariDataset(path / "data" if (path / "data").is_dir() else path)
        else:
            ds = minari.load_dataset(str(dataset))
    except Exception as err:  # minari raises FileNotFoundError or ValueError depending on the id
        raise ValueError(f"dataset {dataset!r} cannot be opened ({err}); a real-world task's spaces are its "
                         "dataset's: record it first, and set MINARI_DATASETS_PATH (or give a folder path)") from err  # fmt: skip
    return ds.observation_space, ds.action_space
