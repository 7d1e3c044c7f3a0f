"""Labelled observations for the success classifier, from a replay store or a Minari dataset, and
their split by episode into training and held-out sets.

Which observation a success flag describes: a transition row ``(obs, action, reward, next_obs, success)``
records ``info["success"]`` as the env returned it from ``step(action)``, i.e. about the state the step
LED TO. So each row gives one example: its NEXT observation (``next_obs`` and, with cameras, the frame
``next_frame``), labelled with the row's ``success``. (Pairing the flag with ``obs`` would teach the
classifier to fire one step early: on a robot, a false success ends the episode with reward 1.)

A store's flags are whatever judged the steps that filled it: the operator's keys (robot/keys_judge.py)
or the simulator's ``info["success"]``. A store filled under a ``ClassifierJudge`` would train the
classifier on its own verdicts: label such data by hand first.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from o2o.datasets.minari_io import _episode_success, load_transitions, open_dataset, task_obs_spec
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.trainable_rows import episode_keys, read_chunk_rows
from o2o.envs import TaskSpec
from o2o.envs.obs_spec import ObsSpec


class LabelError(ValueError):
    """Data the classifier cannot be trained or scored on (no success label, one episode, another task...)."""


@dataclasses.dataclass(frozen=True)
class LabelledObservations:
    """One example per transition: the observation a step led to and whether it shows the task done."""

    state: np.ndarray  # (N, state_dim) float32
    images: dict[str, np.ndarray]  # camera -> (N, H, W, C) uint8; {} for a state task
    label: np.ndarray  # (N,) bool
    episode: np.ndarray  # (N,) int64: a key per episode, stable as the source grows (store: actor, episode id)
    spec: ObsSpec
    task: str
    source: str
    """``store:<absolute path>`` or ``dataset:<absolute path of its data folder>``: written as ``trained_from``.
    Rows come in the source's order (a store's append order), so the first ``n`` of a grown store are the
    ``n`` a classifier was trained and scored on."""

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> LabelledObservations:
        return dataclasses.replace(self, state=self.state[rows], images={k: v[rows] for k, v in self.images.items()},
                                   label=self.label[rows], episode=self.episode[rows])  # fmt: skip

    @property
    def episodes(self) -> int:
        return len(np.unique(self.episode))


def store_source(path: str | os.PathLike) -> str:
    return f"store:{Path(path).resolve()}"


def dataset_source(ds) -> str:
    """A dataset by its folder (an id names different data under another MINARI_DATASETS_PATH)."""
    return f"dataset:{Path(ds.spec.data_path).resolve()}"


def from_store(path: str | os.PathLike, task: str) -> LabelledObservations:
    """Every committed row of a replay store (evaluation and unfinished episodes too: their flags are labels
    all the same), read a block at a time; the store must have been made for ``task``."""
    store = ReplayStore.open(path, "r")
    if store.config.task != task:
        raise LabelError(f"store {path} holds task {store.config.task!r}, not {task!r}: "
                         "train the classifier of a task on that task's store")  # fmt: skip
    spec = store.obs_spec
    columns = ["next_obs", "success", "actor", "episode_id", *(["next_frame"] if spec.has_images else [])]
    parts = []
    block = read_chunk_rows(store)
    for start in range(0, len(store), block):
        rows = store.read(start, start + block, columns)
        images = {c: rows[f"frames/{c}"][rows["next_frame"]] for c in spec.camera_names}
        parts.append((rows["next_obs"], images, rows["success"], episode_keys(rows["actor"], rows["episode_id"])))
    if not parts:
        raise LabelError(f"store {path} holds no committed rows")
    return LabelledObservations(
        state=np.concatenate([p[0] for p in parts]),
        images={c: np.concatenate([p[1][c] for p in parts]) for c in spec.camera_names},
        label=np.concatenate([p[2] for p in parts]).astype(bool),
        episode=np.concatenate([p[3] for p in parts]),
        spec=spec, task=task, source=store_source(path),
    )  # fmt: skip


def from_dataset(dataset: str | os.PathLike, task: TaskSpec) -> LabelledObservations:
    """A Minari dataset (id or folder), read as the learner reads it (``load_transitions``: the task's
    checks, its rule for dropping and cutting episodes); labels from each step's success flag, the one
    ``load_transitions`` reads. Episode keys: the kept episodes' order in the dataset."""
    ds = open_dataset(dataset)
    data = load_transitions(ds, task)
    labels = list(_step_success(ds, task))
    label = np.concatenate(labels) if labels else np.zeros(0, bool)
    if len(label) != len(data):  # the same rule on both sides; a guard against the two drifting apart
        raise LabelError(f"dataset {dataset}: {len(label)} success flags for {len(data)} transitions")
    return LabelledObservations(
        state=data.next_obs, images={c: frames[data.next_frame] for c, frames in data.frames.items()}, label=label,
        episode=np.repeat(np.arange(len(labels), dtype=np.int64), [len(x) for x in labels]),
        spec=task_obs_spec(task), task=task.name, source=dataset_source(ds),
    )  # fmt: skip


def _step_success(ds, task: TaskSpec):
    """Each kept episode's per-step success flags (T of them: about the T next observations), with
    ``load_transitions``'s rule: tasks with ``binary_reward`` or ``terminate_on_success`` drop episodes
    without a success and the latter cuts each at its last success."""
    for episode in ds.iterate_episodes():
        rewards = np.asarray(episode.rewards, np.float32).reshape(-1)
        success = np.asarray(_episode_success(episode, task, rewards), bool)
        if task.binary_reward or task.terminate_on_success:
            if not success.any():
                continue
            if task.terminate_on_success:
                success = success[: int(np.flatnonzero(success)[-1]) + 1]
        yield success


def split_by_episode(data: LabelledObservations, heldout: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys of the (training, held-out) episodes: a seeded ``heldout`` share of the episodes with a
    success and of those without (at least one of each kind that has two or more), so that both sides see
    successes when the data allow it. Raises ``LabelError`` when a classifier cannot be trained on ``data``."""
    if not data.label.any():
        raise LabelError(f"{data.source} holds no success label among its {len(data)} observations: "
                         "record (or label) some successful episodes first")  # fmt: skip
    if data.label.all():
        raise LabelError(f"{data.source}: all {len(data)} observations are labelled successes; "
                         "a classifier needs failures too")  # fmt: skip
    keys = np.unique(data.episode)
    if len(keys) < 2:
        raise LabelError(f"{data.source} holds {len(keys)} episode: the classifier is scored on held-out "
                         "EPISODES, so it needs at least 2")  # fmt: skip
    rng = np.random.default_rng(seed)
    with_success = np.isin(keys, np.unique(data.episode[data.label]))
    held = []
    for group in (keys[with_success], keys[~with_success]):
        n = int(round(heldout * len(group)))
        n = min(max(n, 1 if len(group) >= 2 else 0), len(group) - 1) if len(group) else 0
        held.append(rng.choice(group, n, replace=False))
    held = np.sort(np.concatenate(held))
    if len(held) == 0:  # two episodes, one of each kind: hold out the one without a success
        held = keys[~with_success][:1]
    return np.setdiff1d(keys, held), held
