"""Local dataset builders: scripted controllers + noise, written as real Minari datasets.

Each builder module exposes ``TASKS``, ``QUALITIES`` and
``build_episodes(task, quality, n_episodes, seed, progress)``. Dataset ids are
``o2o/<task>/<quality>-v0``.
"""

from __future__ import annotations

import importlib
import re

import minari

from o2o.envs import get_task, make_env

from ..minari_io import write_dataset
from .common import quality_summary

BUILDER_MODULES = {
    "pointmaze-umaze": "pointmaze",
    "pointmaze-medium": "pointmaze",
    "pusher": "pusher",
    "fetch-push": "fetch",
    "fetch-pick": "fetch",
}
QUALITIES = ("expert", "medium", "mixed")
DEFAULT_EPISODES = {"pointmaze-umaze": 300, "pointmaze-medium": 300, "pusher": 300, "fetch-push": 500, "fetch-pick": 500}

_ID = re.compile(r"^o2o/(?P<task>[\w-]+)/(?P<quality>\w+)-v0$")


def dataset_id(task: str, quality: str) -> str:
    return f"o2o/{task}/{quality}-v0"


def parse_dataset_id(dataset: str) -> tuple[str, str] | None:
    """(task, quality) of an o2o-built dataset id, None for any other id or path."""
    match = _ID.match(str(dataset))
    if match and match["task"] in BUILDER_MODULES and match["quality"] in QUALITIES:
        return match["task"], match["quality"]
    return None


def builder_module(task: str):
    get_task(task)  # unknown task -> a clear KeyError with suggestions
    if task not in BUILDER_MODULES:
        raise ValueError(
            f"task {task!r} has no o2o dataset builder (tasks with one: {', '.join(BUILDER_MODULES)}); "
            "bring a Minari dataset for it instead"
        )
    return importlib.import_module(f"{__name__}.{BUILDER_MODULES[task]}")


def build_dataset(
    task: str, quality: str, n_episodes: int | None = None, seed: int = 0, progress: bool = True
) -> tuple[minari.MinariDataset, dict]:
    """Build, write and return the dataset ``o2o/<task>/<quality>-v0`` and its quality summary."""
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    module = builder_module(task)
    n_episodes = n_episodes or DEFAULT_EPISODES[task]
    episodes = module.build_episodes(task, quality, n_episodes, seed=seed, progress=progress)
    summary = quality_summary(episodes)
    env = make_env(task, flatten=False)
    dataset = write_dataset(
        dataset_id(task, quality),
        env,
        episodes,
        algorithm_name=f"o2o scripted {quality} controller ({module.__name__.rsplit('.', 1)[-1]})",
        description=(
            f"{task}: {n_episodes} episodes of o2o's scripted controller, quality {quality!r}, seed {seed}. "
            f"Success rate {summary['success_rate']:.2f}, mean return {summary['mean_return']:.2f}."
        ),
    )
    env.close()
    return dataset, summary
