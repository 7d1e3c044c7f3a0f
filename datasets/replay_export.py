"""Export a replay store's episodes as a real Minari dataset (``minari_io.write_dataset``).

Episodes are rebuilt from rows: an episode's rows are the rows between its
``start_row`` and ``end_row`` with its actor and episode id (other actors' rows
interleave). Only episodes that ended (terminated or truncated) with no missing
step are exported: abandoned or gapped episodes cannot be written as Minari
episodes (observations must chain). Rewards are the raw env rewards, so
``minari_io.load_transitions`` applies the reward scale and recomputes the same
MC returns the store holds. Observations are the flat float32 vectors the
actors sent, with the flattened env's Box observation space; a camera store's are
the task's Dict ``{"state": ..., "<camera>": uint8 (H, W, C)}``, written by Minari's
own writer as o2o's dataset builders write theirs (``minari_io.write_dataset``:
Minari's default JPEG encoding of image spaces, so the frames come back within JPEG
error, not bit-exact).

Each episode's infos carry, per step, ``success`` and ``intervention`` (HIL-SERL: True where the
operator's teleop action was executed; a store made before interventions were recorded gives False),
T + 1 entries each (the reset's entry False). ``minari_io.load_transitions`` does not read
``intervention``: a dataset made from an export trains on those rows like on any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from o2o.envs.obs_spec import STATE_KEY, ObsSpec

from .rows import frame_key
from .store_frames import camera_keys

if TYPE_CHECKING:
    import gymnasium as gym
    import minari

    from .replay_store import ReplayStore

ROW_FIELDS = ["obs", "action", "reward", "next_obs", "terminated", "truncated", "success", "intervention", "actor",
              "episode_id"]  # fmt: skip


def store_episodes(store: "ReplayStore", include_eval: bool = False) -> list[dict]:
    """The store's complete episodes in ``write_dataset``'s episode format, in end order."""
    table = store.episodes()
    keep = table["ended"] & table["contiguous"]
    if not include_eval:
        keep &= ~table["eval"]
    spec = store.obs_spec
    rows = store.read(0, len(store), [*ROW_FIELDS, *camera_keys(spec)])  # a camera store's frames too
    episodes = []
    for i in np.flatnonzero(keep):
        lo, hi = int(table["start_row"][i]), int(table["end_row"][i]) + 1
        mask = (rows["actor"][lo:hi] == table["actor"][i]) & (rows["episode_id"][lo:hi] == table["episode_id"][i])
        idx = np.flatnonzero(mask) + lo
        if len(idx) != table["length"][i]:
            raise RuntimeError(f"episode {i} of {store.path}: found {len(idx)} rows, the table says {table['length'][i]}")
        observations = np.concatenate([rows["obs"][idx], rows["next_obs"][idx[-1:]]])
        if spec.has_images:  # T + 1 frames: the rows' observations, then the last row's next one
            frames = np.concatenate([rows["obs_frame"][idx], rows["next_frame"][idx[-1:]]])
            observations = {STATE_KEY: observations, **{c: rows[frame_key(c)][frames] for c in spec.camera_names}}
        episodes.append(
            {
                "observations": observations,
                "actions": rows["action"][idx],
                "rewards": rows["reward"][idx],
                "terminations": rows["terminated"][idx],
                "truncations": rows["truncated"][idx],
                # Minari infos hold T+1 entries (reset + steps); the reset step reports no success, no intervention.
                "infos": {"success": np.concatenate([[False], rows["success"][idx]]),
                          "intervention": np.concatenate([[False], rows["intervention"][idx] == 1])},  # fmt: skip
            }
        )
    return episodes


def export_minari(
    store: "ReplayStore",
    dataset_id: str,
    task: str | None = None,
    include_eval: bool = False,
    env: "gym.Env | None" = None,
    algorithm_name: str = "o2o online fine-tuning",
    description: str | None = None,
) -> "minari.MinariDataset":
    """Write the store's complete episodes (eval episodes only if asked) as Minari ``dataset_id``."""
    from o2o.envs import get_task, make_env
    from o2o.envs.tasks import task_spaces

    from .minari_io import write_dataset

    task = task or store.config.task
    if task is None:
        raise ValueError(f"{store.path} records no task: pass the task name to export it")
    spec = get_task(task)
    if env is None and not spec.real_world:
        env = make_env(spec)
    # A real robot's task has no simulator: its declared spaces (or its first dataset's).
    spaces = (env.observation_space, env.action_space) if env is not None else task_spaces(spec)
    obs_spec, action_dim = ObsSpec.from_space(spaces[0]), spaces[1].shape[0]
    if (obs_spec, action_dim) != (store.obs_spec, store.config.action_dim):
        raise ValueError(
            f"task {task} has observations {obs_spec.to_dict()}, action_dim={action_dim}; the store at "
            f"{store.path} holds {store.obs_spec.to_dict()} and {store.config.action_dim}"
        )
    episodes = store_episodes(store, include_eval)
    if not episodes:
        raise ValueError(f"{store.path} holds no complete episode to export (include_eval={include_eval})")
    scored_by_return = spec.score == "return"
    return write_dataset(
        dataset_id,
        env,
        episodes,
        algorithm_name=algorithm_name,
        description=description
        or f"Online transitions of task {task} collected by o2o actors ({len(episodes)} complete episodes).",
        ref_min_score=spec.ref_min_return if scored_by_return else None,
        ref_max_score=spec.ref_max_return if scored_by_return else None,
        spaces=spaces,
    )
