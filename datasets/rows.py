"""The transition row schema shared by the wire, the replay store and the learner's buffer.

A transition is ``(obs, action, reward, next_obs, terminated, truncated, success)``:
``reward`` is the raw env reward (scaling happens once, in ``mc_return.scale_rewards``),
``terminated`` a true terminal (no bootstrap), ``truncated`` a time limit. The wire sends
these arrays in this order (``ARRAY_NAMES``); the store keeps one column each, plus
bookkeeping columns; the learner's buffer takes obs, action, scaled reward, next_obs,
terminated (as ``done``) and the store's MC return.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_INT32 = 2**31 - 1  # policy_version and episode step are int32 columns in the replay store

ARRAY_NAMES = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "success")
FLOAT_ARRAYS = ("obs", "action", "reward", "next_obs")
FLAG_ARRAYS = ("terminated", "truncated", "success")


@dataclasses.dataclass(frozen=True, eq=False)
class TransitionChunk:
    """``n`` consecutive transitions of one actor (the header fields: ``o2o.transport.wire``).

    Decoded chunks hold read-only arrays that view the received frames (no copy).
    """

    actor_id: str
    seq: int
    policy_version: int
    episode_id: int
    step: int
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    eval: bool = False

    @property
    def n(self) -> int:
        return len(self.reward)
