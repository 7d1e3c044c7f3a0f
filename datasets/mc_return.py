"""Monte-Carlo return-to-go, exactly as the official Cal-QL code computes it.

Reference: ``calc_return_to_go`` and ``get_d4rl_dataset_with_mc_calculation`` in
nakamotoo/Cal-QL (JaxCQL/replay_buffer.py):

* rewards are scaled and biased first (``r * scale + bias``), then returns computed;
* a trajectory ends at a terminal, at a timeout/truncation, at the last row,
  and wherever ``obs[t+1] != next_obs[t]`` (flat D4RL-style arrays);
* ``G_t = r_t + gamma * G_{t+1} * (1 - terminal_t)`` backwards from 0; a
  truncated tail is not bootstrapped;
* sparse tasks: if every (scaled) reward of a trajectory equals the failure
  reward, every step gets ``failure_reward / (1 - gamma)``.
"""

from __future__ import annotations

import numpy as np

# Tolerance of the official obs[t+1] vs next_obs[t] discontinuity test.
SPLIT_TOLERANCE = 1e-6


def trajectory_return_to_go(
    rewards: np.ndarray,
    terminals: np.ndarray,
    gamma: float,
    failure_reward: float | None = None,
) -> np.ndarray:
    """Return-to-go of one trajectory whose rewards are already scaled.

    ``failure_reward`` is the scaled failure reward of a sparse task, or None
    for dense tasks (no all-failure rule).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    terminals = np.asarray(terminals, dtype=np.float64)
    if rewards.size == 0:
        return np.zeros(0, np.float32)
    if failure_reward is not None and np.all(rewards == failure_reward):
        return np.full(rewards.shape, failure_reward / (1.0 - gamma), np.float32)
    returns = np.empty_like(rewards)
    running = 0.0
    for t in range(rewards.size - 1, -1, -1):
        running = rewards[t] + gamma * running * (1.0 - terminals[t])
        returns[t] = running
    return returns.astype(np.float32)


def trajectory_ends(
    observations: np.ndarray,
    next_observations: np.ndarray,
    terminals: np.ndarray,
    truncations: np.ndarray,
) -> np.ndarray:
    """Boolean mask of the rows that end a trajectory (see module docstring)."""
    n = len(terminals)
    ends = np.asarray(terminals, bool) | np.asarray(truncations, bool)
    if n > 1:
        jump = np.abs(observations[1:] - next_observations[:-1]).reshape(n - 1, -1)
        ends[:-1] |= np.linalg.norm(jump, axis=1) > SPLIT_TOLERANCE
    if n:
        ends[-1] = True
    return ends


def mc_returns(
    rewards: np.ndarray,
    terminals: np.ndarray,
    ends: np.ndarray,
    gamma: float,
    failure_reward: float | None = None,
) -> np.ndarray:
    """Return-to-go of every row of flat arrays split into trajectories by ``ends``."""
    out = np.empty(len(rewards), np.float32)
    start = 0
    for end in np.flatnonzero(ends):
        sl = slice(start, end + 1)
        out[sl] = trajectory_return_to_go(rewards[sl], terminals[sl], gamma, failure_reward)
        start = end + 1
    if start != len(rewards):
        raise ValueError("the last row must end a trajectory (ends[-1] must be True)")
    return out


def scaled_failure_reward(task_reward: str, reward_neg: float, scale: float, bias: float) -> float | None:
    """The failure reward after scaling, for sparse tasks; None for dense tasks."""
    if task_reward != "sparse":
        return None
    return reward_neg * scale + bias
