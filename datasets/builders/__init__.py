"""Local dataset builders: scripted controllers + noise, written as real Minari datasets.

Each builder module exposes ``TASKS``, ``QUALITIES`` and
``build_episodes(task, quality, n_episodes, seed, progress)``. Dataset ids are
``o2o/<task>/<quality>-v0``. Each dataset records how it was built (``BuildRecord``) in its
Minari metadata, so a run that wants other parameters refuses it instead of training on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import re
import tempfile
from pathlib import Path

import minari

from o2o.envs import get_task, make_env

from ..file_lock import FileLock
from ..minari_io import DatasetError, datasets_root, open_dataset, write_dataset
from .common import quality_summary

log = logging.getLogger("o2o.datasets")

BUILDER_MODULES = {
    "pointmaze-umaze": "pointmaze",
    "pointmaze-medium": "pointmaze",
    "pointmaze-umaze-pixels": "pointmaze",
    "pointmaze-medium-pixels": "pointmaze",
    "pusher": "pusher",
    "fetch-push": "fetch",
    "fetch-pick": "fetch",
    "fetch-push-pixels": "fetch",
    "arm-reach": "arm_reach",
}
QUALITIES = ("expert", "medium", "mixed")
DEFAULT_EPISODES = {"pointmaze-umaze": 300, "pointmaze-medium": 300, "pointmaze-umaze-pixels": 300,
                    "pointmaze-medium-pixels": 300, "pusher": 300, "fetch-push": 500, "fetch-pick": 500,
                    "fetch-push-pixels": 100,  # rendering: ~6-26 ms a step, a few minutes for the three qualities
                    "arm-reach": 200}  # a few seconds each

BUILDER_VERSION = 1
"""Bump when a builder records other episodes for the same parameters: older datasets are then refused."""
BUILD_METADATA_KEY = "o2o_build"
"""The Minari metadata key holding a dataset's ``BuildRecord``."""

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


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """How an o2o dataset was built: what its Minari metadata records and what a run asks for."""

    task: str
    quality: str
    episodes: int
    seed: int
    builder_version: int = BUILDER_VERSION

    @classmethod
    def wanted(cls, dataset: str, episodes: int | None = None, seed: int = 0) -> "BuildRecord | None":
        """The record an o2o id built with these parameters has; None for any other id (not ours)."""
        parsed = parse_dataset_id(dataset)
        if parsed is None:
            return None
        task, quality = parsed
        return cls(task, quality, episodes or DEFAULT_EPISODES[task], seed)

    def rebuild_command(self) -> str:
        return (f"o2o-dataset build --task {self.task} --quality {self.quality} --episodes {self.episodes} "
                f"--seed {self.seed}")  # fmt: skip

    def describe(self) -> str:
        return (f"{self.episodes} episodes, seed {self.seed}, builder version {self.builder_version} "
                f"(task {self.task}, quality {self.quality})")  # fmt: skip


def recorded_build(dataset: minari.MinariDataset) -> BuildRecord | None:
    """The ``BuildRecord`` in a dataset's metadata; None if it has none (built by an older o2o, or not by o2o)."""
    record = dataset.storage.metadata.get(BUILD_METADATA_KEY)
    try:
        return BuildRecord(**record) if isinstance(record, dict) else None
    except TypeError:  # fields of another o2o version
        return None


def ensure_dataset(dataset: str, episodes: int | None = None, seed: int = 0, *, build_missing: bool = True,
                   rebuild: bool = False, progress: bool = True) -> None:  # fmt: skip
    """Make sure an o2o dataset id holds what these parameters build; any other id or path is left as it is.

    Missing: built (``build_missing``). There, but recorded with other parameters (or with no record):
    rebuilt if ``rebuild``, else a ``DatasetError`` that says what was found, what was wanted and the
    command that rebuilds it. Why: a run that silently trains on a leftover 6-episode dataset reports
    numbers that are not the task's.
    """
    wanted = BuildRecord.wanted(dataset, episodes, seed)
    if wanted is None:
        return
    # One process checks and builds at a time (two runs started together must not both build it).
    digest = hashlib.sha256(str(datasets_root() / dataset).encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"o2o-dataset-{digest}.lock"):
        _ensure(dataset, wanted, build_missing, rebuild, progress)


def _ensure(dataset: str, wanted: BuildRecord, build_missing: bool, rebuild: bool, progress: bool) -> None:
    try:
        found = recorded_build(open_dataset(dataset))
    except DatasetError:
        if not build_missing:
            raise
        log.info("dataset %s not found: building it (%s)", dataset, wanted.describe())
    else:
        if found == wanted:
            return
        what = found.describe() if found else "no build record (built by an older o2o, or by hand)"
        if not rebuild:
            raise DatasetError(
                f"dataset {dataset} holds {what}, but this run wants {wanted.describe()}. Rebuild it with "
                f"`{wanted.rebuild_command()}` or rebuild_dataset=true, or ask for what it holds "
                f"(build_episodes=, build_seed=)"
            )
        log.info("dataset %s holds %s: rebuilding it (%s)", dataset, what, wanted.describe())
    _, summary = build_dataset(wanted.task, wanted.quality, wanted.episodes, wanted.seed, progress=progress)
    log.info("built %s: %s", dataset, summary)


def build_dataset(
    task: str, quality: str, n_episodes: int | None = None, seed: int = 0, progress: bool = True
) -> tuple[minari.MinariDataset, dict]:
    """Build, write and return the dataset ``o2o/<task>/<quality>-v0`` and its quality summary; the
    dataset's metadata records its ``BuildRecord``."""
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
    dataset.storage.update_metadata({BUILD_METADATA_KEY: dataclasses.asdict(BuildRecord(task, quality, n_episodes, seed))})
    return dataset, summary
