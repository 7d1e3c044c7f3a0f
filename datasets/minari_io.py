"""Minari datasets in and out: any Minari dataset -> flat transitions + MC returns.

Loading goes through ``minari.load_dataset`` (ids resolved under
``MINARI_DATASETS_PATH``, as for a user with downloaded D4RL/Minari data) or
``minari.MinariDataset(path)`` for a dataset folder given as a path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

from o2o.envs import TaskSpec, flatten_obs
from o2o.envs.obs_spec import STATE_KEY, ObsSpec

from .data_settings import DataSettings
from .mc_return import mc_returns, scaled_failure_reward, trajectory_ends

log = logging.getLogger("o2o.datasets")


CAMERA_FIELDS = ("frames", "obs_frame", "next_frame")
"""Transitions' fields of camera datasets (not per-row arrays of state tasks)."""


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: missing, wrong shape, non-finite..."""


@dataclasses.dataclass
class Transitions:
    """Flat transition arrays, rewards already scaled, MC return-to-go per row."""

    obs: np.ndarray  # (N, obs_dim) float32
    action: np.ndarray  # (N, act_dim) float32
    reward: np.ndarray  # (N,) float32, after reward scale and bias
    next_obs: np.ndarray  # (N, obs_dim) float32
    terminated: np.ndarray  # (N,) float32: 1 = no bootstrap from next_obs
    episode_end: np.ndarray  # (N,) bool: last row of a trajectory (terminal, truncation or split)
    mc_return: np.ndarray  # (N,) float32
    # Camera datasets (envs/obs_spec.py): obs / next_obs hold the state vector, the images are kept once
    # per frame (an episode of T steps has T + 1 frames) and rows point at them.
    frames: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # camera -> (F, H, W, C) uint8
    obs_frame: np.ndarray | None = None  # (N,) int64: the frame of each row's observation
    next_frame: np.ndarray | None = None  # (N,) int64: the frame of each row's next observation

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    def episode_returns(self) -> np.ndarray:
        """Sum of (scaled) rewards of each trajectory."""
        bounds = np.concatenate([[0], np.flatnonzero(self.episode_end) + 1])
        return np.add.reduceat(self.reward, bounds[:-1]) if len(self) else np.zeros(0)


def datasets_root() -> Path:
    """Where Minari keeps datasets: $MINARI_DATASETS_PATH or ~/.minari/datasets."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def open_dataset(dataset: str | os.PathLike) -> minari.MinariDataset:
    """A Minari dataset by id (under MINARI_DATASETS_PATH) or by folder path."""
    path = Path(dataset)
    if path.is_dir():
        data_dir = path / "data" if (path / "data").is_dir() else path
        return minari.MinariDataset(data_dir)
    try:
        return minari.load_dataset(str(dataset))
    except Exception as err:  # minari raises FileNotFoundError or ValueError depending on the id
        local = ", ".join(minari.list_local_datasets()) or "none"
        raise DatasetError(
            f"Minari dataset {str(dataset)!r} not found (looked in {datasets_root()}, "
            f"set MINARI_DATASETS_PATH to change it; a path to a dataset folder also works). "
            f"Local datasets: {local}. Build o2o's own with `o2o-dataset build --task TASK`. ({err})"
        ) from err


def _episode_arrays(episode, task: TaskSpec, spec: ObsSpec) -> dict[str, np.ndarray] | None:
    """One episode as flat arrays (and its T + 1 frames per camera under "frames"); None for an
    Adroit-binary demo with no success (dropped)."""
    frames = _episode_frames(episode, spec)
    obs = np.asarray(episode.observations[STATE_KEY], np.float32) if spec.has_images else flatten_obs(episode.observations)
    actions = np.asarray(episode.actions, np.float32).reshape(len(episode.actions), -1)
    rewards = np.asarray(episode.rewards, np.float32).reshape(-1)
    terminations = np.asarray(episode.terminations, bool).reshape(-1)
    truncations = np.asarray(episode.truncations, bool).reshape(-1)
    steps = len(actions)
    if obs.ndim != 2 or len(obs) != steps + 1 or len(rewards) != steps or len(terminations) != steps:
        raise DatasetError(
            f"episode {episode.id}: expected observations of length T+1 and actions, rewards, "
            f"terminations of length T; got {len(obs)}, {steps}, {len(rewards)}, {len(terminations)}"
        )
    if task.binary_reward or task.terminate_on_success:
        success = _episode_success(episode, task, rewards)
        if not success.any():
            # Cal-QL drops Adroit-binary demos that never succeed: get_hand_dataset_with_mc_calculation
            # (JaxCQL/replay_buffer.py, lines 184-185 and 202-203 at ac6eafe) does
            # `if not (0 in dataset[i]["rewards"]): continue` for expert and BC demos alike,
            # 0 being reward_pos, i.e. a demo is kept iff some step is a success.
            return None
        if task.binary_reward:
            rewards = np.where(success, task.reward_pos, task.reward_neg).astype(np.float32)
        if task.terminate_on_success:
            # Cal-QL's Adroit-binary processing: cut at the last success; success steps are terminal.
            last = int(np.flatnonzero(success)[-1]) + 1
            obs, actions, rewards = obs[: last + 1], actions[:last], rewards[:last]
            frames = {name: images[: last + 1] for name, images in frames.items()}
            terminations = terminations[:last] | success[:last]
            truncations = truncations[:last]
    return {
        "obs": obs[:-1],
        "next_obs": obs[1:],
        "action": actions,
        "reward": rewards,
        "terminated": terminations,
        "truncated": truncations,
        "frames": frames,
    }


def _episode_frames(episode, spec: ObsSpec) -> dict[str, np.ndarray]:
    """Each camera's frames of one episode, checked against the task's cameras (a dataset whose images
    change size, or are not uint8, is refused naming the episode and camera)."""
    if not spec.has_images:
        return {}
    observations = episode.observations
    if not isinstance(observations, dict) or STATE_KEY not in observations:
        raise DatasetError(f"episode {episode.id}: the task has cameras {list(spec.camera_names)}, the dataset's "
                           f"observations are {type(observations).__name__} without a '{STATE_KEY}' part")  # fmt: skip
    frames = {}
    for camera in spec.cameras:
        if camera.name not in observations:
            raise DatasetError(f"episode {episode.id}: no camera {camera.name!r} in the dataset's observations "
                               f"(it has {sorted(observations)})")  # fmt: skip
        images = np.asarray(observations[camera.name])
        if images.dtype != np.uint8 or images.shape[1:] != camera.shape:
            raise DatasetError(f"episode {episode.id}: camera {camera.name!r} frames are {images.dtype} "
                               f"{images.shape[1:]}, the task declares uint8 {camera.shape}")  # fmt: skip
        frames[camera.name] = images
    return frames


def _episode_success(episode, task: TaskSpec, rewards: np.ndarray) -> np.ndarray:
    infos = episode.infos or {}
    for key in ("success", task.success_key, "goal_achieved"):
        if key in infos:
            # infos hold T+1 entries (reset + steps); the step flags are the last T.
            flags = np.asarray(infos[key], bool).reshape(-1)
            return flags[-len(rewards) :]
    if not task.binary_reward:
        return rewards == task.reward_pos
    raise DatasetError(
        f"episode {episode.id}: task {task.name} turns rewards into binary success rewards and "
        f"needs a per-step success flag in the episode infos ('success' or '{task.success_key}')"
    )


def load_transitions(
    dataset: str | os.PathLike | minari.MinariDataset,
    task: TaskSpec,
    data: DataSettings | None = None,
) -> Transitions:
    """Flat transitions of every episode of a Minari dataset, with MC return-to-go.

    Tasks with ``binary_reward`` or ``terminate_on_success`` (Cal-QL's Adroit-binary
    processing) drop the episodes without any success step, as the official code does.
    ``data`` (None: ``DataSettings()``'s defaults) scales the rewards and computes the MC
    returns; its ``mc_infinite_horizon`` (Cal-QL's Kitchen setting) bootstraps each truncated
    trajectory's MC return from ``r_last / (1 - gamma)``; see ``mc_return``.
    """
    data = data or DataSettings()
    ds = dataset if isinstance(dataset, minari.MinariDataset) else open_dataset(dataset)
    spec = task_obs_spec(task)
    arrays = [_episode_arrays(ep, task, spec) for ep in ds.iterate_episodes()]
    if not arrays:
        raise DatasetError(f"dataset {ds.spec.dataset_id} holds no episodes")
    episodes = [ep for ep in arrays if ep is not None]
    dropped = len(arrays) - len(episodes)
    if not episodes:
        raise DatasetError(
            f"dataset {ds.spec.dataset_id}: all {dropped} episodes were dropped because none reaches "
            f"a success (task {task.name} keeps only demos with a success step, as Cal-QL does for "
            "Adroit-binary); is this the right dataset, with per-step success flags in its infos?"
        )
    if dropped:
        log.info(
            "dataset %s: dropped %d of %d episodes without any success step (Cal-QL's Adroit-binary rule)",
            ds.spec.dataset_id, dropped, len(arrays),
        )  # fmt: skip
    cols = {key: np.concatenate([ep[key] for ep in episodes]) for key in episodes[0] if key != "frames"}
    _check_matches_task(ds, cols, task, spec)
    reward = data.scale(cols["reward"])
    terminated = cols["terminated"].astype(np.float32)
    ends = trajectory_ends(cols["obs"], cols["next_obs"], cols["terminated"], cols["truncated"])
    frames = _frame_index(episodes, spec)
    if frames:  # a state vector may repeat across an episode boundary; the frames never do
        ends[:-1] |= frames["next_frame"][:-1] != frames["obs_frame"][1:]
    failure = scaled_failure_reward(task.reward, task.reward_neg, data.reward_scale, data.reward_bias)
    return Transitions(
        obs=cols["obs"],
        action=cols["action"],
        reward=reward,
        next_obs=cols["next_obs"],
        terminated=terminated,
        episode_end=ends,
        mc_return=mc_returns(reward, terminated, ends, data.discount, failure, data.mc_infinite_horizon),
        **frames,
    )


def _frame_index(episodes: list[dict], spec: ObsSpec) -> dict:
    """Transitions' frames (each once) and each row's observation and next-observation frame."""
    if not spec.has_images:
        return {}
    steps = np.array([len(ep["reward"]) for ep in episodes])
    first = np.concatenate([[0], np.cumsum(steps + 1)[:-1]])  # an episode's first frame
    obs_frame = np.concatenate([start + np.arange(n) for start, n in zip(first, steps)]).astype(np.int64)
    return {
        "frames": {c: np.concatenate([ep["frames"][c] for ep in episodes]) for c in spec.camera_names},
        "obs_frame": obs_frame,
        "next_frame": obs_frame + 1,
    }


def task_obs_spec(task: TaskSpec) -> ObsSpec:
    """The observation spec of a task (its env's, a real-world task's dataset's): what its datasets must hold."""
    from o2o.envs.tasks import task_spaces

    return ObsSpec.from_space(task_spaces(task)[0])


def _check_matches_task(ds: minari.MinariDataset, cols: dict, task: TaskSpec, spec: ObsSpec) -> None:
    from o2o.envs.tasks import task_spaces

    obs_dim, act_dim = spec.state_dim, task_spaces(task)[1].shape[0]
    name = ds.spec.dataset_id
    if cols["obs"].shape[1] != obs_dim or cols["action"].shape[1] != act_dim:
        raise DatasetError(
            f"dataset {name} has observations of dim {cols['obs'].shape[1]} and actions of dim "
            f"{cols['action'].shape[1]}, but task {task.name} ({task.env_id or task.datasets[0]}) expects {obs_dim} and "
            f"{act_dim}: is this the dataset of another task?"
        )
    for key in ("obs", "next_obs", "action", "reward"):
        bad = ~np.isfinite(cols[key]).reshape(len(cols[key]), -1).all(axis=1)
        if bad.any():
            raise DatasetError(
                f"dataset {name}: {int(bad.sum())} rows have non-finite {key} (first at row "
                f"{int(np.flatnonzero(bad)[0])}); clean the dataset before training"
            )


def write_dataset(
    dataset_id: str,
    env: gym.Env | None,
    episodes: list[dict],
    *,
    algorithm_name: str,
    description: str,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    spaces: tuple[gym.Space, gym.Space] | None = None,
) -> minari.MinariDataset:
    """Write recorded episodes as a real Minari dataset (replacing one of the same id).

    Each episode is a dict with ``observations`` (T+1 entries, arrays or dicts of
    arrays, as the env returns them), ``actions``, ``rewards``, ``terminations``,
    ``truncations`` (T entries) and optionally ``infos`` (a dict of T+1 lists).
    ``env`` None (a real robot's task: no simulator): ``spaces`` = (observation, action) spaces, and the
    dataset records no env.
    """
    # Minari refuses to overwrite, and a half-written folder from a crash blocks the id too.
    shutil.rmtree(datasets_root() / dataset_id, ignore_errors=True)
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=_stack(ep["observations"]),
            actions=np.asarray(ep["actions"], np.float32),
            rewards=list(map(float, ep["rewards"])),
            terminations=list(map(bool, ep["terminations"])),
            truncations=list(map(bool, ep["truncations"])),
            infos={k: np.asarray(v) for k, v in ep.get("infos", {}).items()},
        )
        for i, ep in enumerate(episodes)
    ]
    if env is None:
        env_spec, (observation_space, action_space) = None, spaces
    else:  # the bare env (o2o's wrappers are re-applied by task name) with its time limit
        env_spec = dataclasses.replace(env.unwrapped.spec, max_episode_steps=env.spec.max_episode_steps)
        observation_space, action_space = env.observation_space, env.action_space
    return minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=buffers,
        env=env_spec,
        eval_env=env_spec,
        algorithm_name=algorithm_name,
        author="o2o",
        author_email="o2o@localhost",
        code_permalink="https://github.com/o2o/o2o",
        ref_min_score=ref_min_score,
        ref_max_score=ref_max_score,
        description=description,
        observation_space=observation_space,
        action_space=action_space,
    )


def _stack(observations):
    """List of per-step observations (arrays or dicts) -> arrays (or dict of arrays)."""
    if isinstance(observations, dict):
        return {k: _stack(v) for k, v in observations.items()}
    first = observations[0]
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in observations]) for k in first}
    return np.asarray(observations)
