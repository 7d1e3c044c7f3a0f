"""Flattening of (goal-conditioned) dict observations into one float vector.

The order is fixed and documented: dict keys in **alphabetical order**, nested
dicts recursively, each leaf flattened in C order. For the gymnasium-robotics
goal envs that is ``achieved_goal, desired_goal, observation``, the same order
``gymnasium.spaces.flatten`` uses, so data flattened here and by gymnasium agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import gymnasium as gym
import numpy as np


def flat_keys(space: gym.Space, prefix: str = "") -> list[str]:
    """Leaf key paths of a (possibly nested) Dict space, in flattening order."""
    if isinstance(space, gym.spaces.Dict):
        keys: list[str] = []
        for key in sorted(space.spaces):
            keys += flat_keys(space.spaces[key], f"{prefix}{key}/")
        return keys
    return [prefix.rstrip("/")]


def flat_dim(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Dict):
        return sum(flat_dim(sub) for sub in space.spaces.values())
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    raise TypeError(f"cannot flatten observation space {space}: only Box and Dict of Box are supported")


def flatten_obs(obs, dtype=np.float32) -> np.ndarray:
    """Flatten one observation, or a batch of them (leading axes are kept).

    Works for a single step (leaves of shape ``(d,)``) and for Minari episode
    arrays (leaves of shape ``(T, d)``): the last axis is concatenated.
    """
    if isinstance(obs, Mapping):
        parts = [flatten_obs(obs[key], dtype) for key in sorted(obs)]
        return np.concatenate(parts, axis=-1)
    return np.asarray(obs, dtype=dtype)


class FlattenDictObservation(gym.ObservationWrapper):
    """Turns a Dict observation into a float32 vector in alphabetical key order."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.obs_keys = flat_keys(env.observation_space)
        dim = flat_dim(env.observation_space)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    def observation(self, observation):
        return flatten_obs(observation)
