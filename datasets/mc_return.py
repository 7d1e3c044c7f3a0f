"""Monte-Carlo return-to-go, exactly as the official Cal-QL code computes it.

Reference: nakamotoo/Cal-QL, JaxCQL/replay_buffer.py. ``calc_return_to_go`` and
``get_d4rl_dataset_with_mc_calculation`` as on the ``main`` branch (commit
ac6eafe); the ``infinite_horizon`` switch exists only on the ``dev/add-kitchen``
branch (commit c510025, "add kitchen envs"), where the Kitchen tasks turn it on
(``get_d4rl_dataset_with_mc_calculation``: ``elif "kitchen" in env:
infinite_horizon = True``; JaxCQL/sampler.py passes ``infinite_horizon=True`` for
Kitchen online trajectories too).

* rewards are scaled and biased first (``r * scale + bias``), then returns computed;
* a trajectory ends at a terminal, at a timeout/truncation, at the last row,
  and wherever ``obs[t+1] != next_obs[t]`` (flat D4RL-style arrays);
* ``G_t = r_t + gamma * G_{t+1} * (1 - terminal_t)`` backwards from 0; a
  truncated tail is not bootstrapped, except with ``infinite_horizon`` (Kitchen),
  where the backward sum starts from ``r_last / (1 - gamma)``;
* sparse tasks: if every (scaled) reward of a trajectory equals the failure
  reward, every step gets ``failure_reward / (1 - gamma)``. This rule is checked
  first, before (and instead of) the backward sum, infinite horizon or not.
"""

from __future__ import annotations

import numpy as np

# Tolerance of the official obs[t+1] vs next_obs[t] discontinuity test.
SPLIT_TOLERANCE = 1e-6

# The all-failure test accepts rewards this many units of the rewards' float
# precision (relative to max(1, |failure reward|)) away from the failure reward.
FAILURE_ULPS = 16


def scale_rewards(raw: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """``float32(raw * scale + bias)``, in float32 arithmetic: o2o's one reward scaling.

    Offline (``minari_io.load_transitions``), online (``ReplayStore``) and the scaled
    failure reward all go through this, so that a failure step's scaled reward and the
    scaled failure reward are the same float32 number.
    """
    return (np.asarray(raw, np.float32) * scale + bias).astype(np.float32)


def is_all_failure(rewards: np.ndarray, failure_reward: float) -> bool:
    """Whether every reward equals the failure reward, compared in the rewards' dtype.

    The official test is ``np.all(np.array(rewards) == reward_neg)``
    (calc_return_to_go, replay_buffer.py line 279 at ac6eafe): offline, ``rewards`` is
    the float32 D4RL array scaled in float32 and ``reward_neg`` a Python float, so
    NumPy compares in float32 (online, in sampler.py, rewards are a list of Python
    floats: float64 on both sides). Comparing in float64 instead, as o2o once did,
    never matches when ``scale``/``bias`` are not exact in float32 (``-1 * 0.1`` in
    float32 is not -0.1 in float64). Even in float32, ``f32(f32(r * scale) + bias)``
    and ``f32(r * scale + bias)`` can differ by one unit (e.g. scale 0.1, bias 0.3),
    so a few units of the dtype's precision are tolerated; sparse rewards take two
    values far apart, so this cannot confuse a success step with a failure step.
    """
    rewards = np.asarray(rewards)
    if not np.issubdtype(rewards.dtype, np.floating):
        rewards = rewards.astype(np.float64)
    target = rewards.dtype.type(failure_reward)
    tol = FAILURE_ULPS * np.finfo(rewards.dtype).eps * max(1.0, abs(float(target)))
    return bool(np.all(np.abs(rewards.astype(np.float64) - np.float64(target)) <= tol))


def trajectory_return_to_go(
    rewards: np.ndarray,
    terminals: np.ndarray,
    gamma: float,
    failure_reward: float | None = None,
    infinite_horizon: bool = False,
) -> np.ndarray:
    """Return-to-go of one trajectory whose rewards are already scaled.

    ``failure_reward`` is the scaled failure reward of a sparse task, or None
    for dense tasks (no all-failure rule). ``infinite_horizon`` (Cal-QL's Kitchen
    setting) starts the backward sum from ``rewards[-1] / (1 - gamma)`` instead of 0.
    """
    rewards = np.asarray(rewards)
    if not np.issubdtype(rewards.dtype, np.floating):
        rewards = rewards.astype(np.float64)
    terminals = np.asarray(terminals, dtype=np.float64)
    if rewards.size == 0:
        return np.zeros(0, np.float32)
    # calc_return_to_go: `if is_sparse_reward and np.all(np.array(rewards) == reward_neg):
    # return_to_go = [float(reward_neg / (1-gamma))] * len(rewards)`, checked before the
    # backward sum (so also before the infinite-horizon tail).
    if failure_reward is not None and is_all_failure(rewards, failure_reward):
        return np.full(rewards.shape, failure_reward / (1.0 - gamma), np.float32)
    rewards = rewards.astype(np.float64)
    returns = np.empty_like(rewards)
    # calc_return_to_go (dev/add-kitchen, c510025, line 295):
    # `prev_return = 0 if not infinite_horizon else float(rewards[-1]/(1-gamma))`, then
    # `return_to_go[-i-1] = rewards[-i-1] + gamma * prev_return * (1 - terminals[-i-1])`.
    # So a truncated last step gets r_last / (1 - gamma) (the tail repeats r_last forever)
    # while a terminal last step gets just r_last (the tail is multiplied by 1 - 1 = 0).
    running = float(rewards[-1]) / (1.0 - gamma) if infinite_horizon else 0.0
    # Python floats, not numpy scalars: the same float64 arithmetic in the same order (identical
    # results), several times faster; the ingest server runs this for every episode that closes.
    reward_list, terminal_list = rewards.tolist(), terminals.tolist()
    for t in range(rewards.size - 1, -1, -1):
        running = reward_list[t] + gamma * running * (1.0 - terminal_list[t])
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
    infinite_horizon: bool = False,
) -> np.ndarray:
    """Return-to-go of every row of flat arrays split into trajectories by ``ends``."""
    out = np.empty(len(rewards), np.float32)
    start = 0
    for end in np.flatnonzero(ends):
        sl = slice(start, end + 1)
        out[sl] = trajectory_return_to_go(rewards[sl], terminals[sl], gamma, failure_reward, infinite_horizon)
        start = end + 1
    if start != len(rewards):
        raise ValueError("the last row must end a trajectory (ends[-1] must be True)")
    return out


def scaled_failure_reward(task_reward: str, reward_neg: float, scale: float, bias: float) -> float | None:
    """The failure reward after scaling (``scale_rewards`` arithmetic), for sparse tasks;
    None for dense tasks."""
    if task_reward != "sparse":
        return None
    return float(scale_rewards(np.array([reward_neg]), scale, bias)[0])
