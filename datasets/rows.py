"""The transition row schema shared by the wire, the replay store and the learner's buffer.

A transition is ``(obs, action, reward, next_obs, terminated, truncated, success)``:
``reward`` is the raw env reward (scaling happens once, in ``mc_return.scale_rewards``),
``terminated`` a true terminal (no bootstrap), ``truncated`` a time limit. The wire sends
these arrays in this order (``ARRAY_NAMES``); the store keeps one column each, plus
bookkeeping columns; the learner's buffer takes obs, action, scaled reward, next_obs,
terminated (as ``done``) and the store's MC return.

Camera images (tasks whose observation declares cameras, envs/obs_spec.py) travel as uint8 frames,
each frame once: ``frames[camera]`` holds ``(n + S, H, W, C)`` images for ``n`` rows in ``S``
segments, where a segment ends after a row that is terminated or truncated, or at the chunk's last
row. A segment of ``k`` rows carries ``k + 1`` frames: its rows' observations, then the next
observation of its last row. ``frame_layout`` says which frame is whose (row ``i``'s observation is
frame ``obs_frame[i]``, its next observation frame ``obs_frame[i] + 1``). The store and the buffer
keep frames in one column per camera and per-row ``obs_frame`` / ``next_frame`` indices into it.

Human interventions (HIL-SERL): ``intervention`` flags, uint8 ``(n,)``, the rows whose executed action
was the operator's teleop action, not the policy's. Optional: None (and, on the wire, no array) means
no intervention in the chunk, so chunks without one keep their bytes and older senders' chunks read as
zeros. The store keeps them in a column; the learner also samples them on the offline side of its
batches (learner/online_data.py ``mixed_batch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

MAX_INT32 = 2**31 - 1  # policy_version and episode step are int32 columns in the replay store

ARRAY_NAMES = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "success")
FLOAT_ARRAYS = ("obs", "action", "reward", "next_obs")
FLAG_ARRAYS = ("terminated", "truncated", "success")
INTERVENTION = "intervention"  # the optional wire array after ARRAY_NAMES, and the store column
FRAMES_PREFIX = "frames/"  # a camera's frames: "frames/<camera>" on the wire and in flat row dicts


def frame_key(camera: str) -> str:
    """The name of a camera's frames (a wire array, a flat row dict key)."""
    return FRAMES_PREFIX + camera


def frame_layout(terminated: np.ndarray, truncated: np.ndarray) -> tuple[np.ndarray, int]:
    """(obs_frame, frame count) of a chunk's rows in the segment layout above.

    Row ``i`` lies in segment ``s(i)`` = the number of episode ends among rows ``0 .. i-1``; each
    earlier segment added one extra frame, so its observation is frame ``i + s(i)`` and its next
    observation frame ``i + s(i) + 1``. The chunk holds ``n + S`` frames, ``S = s(n - 1) + 1``.
    """
    ends = (np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)).astype(np.int64)
    n = len(ends)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    segment = np.concatenate([[0], np.cumsum(ends[:-1])])
    obs_frame = np.arange(n, dtype=np.int64) + segment
    return obs_frame, int(n + segment[-1] + 1)


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
    frames: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """camera name -> uint8 (n + S, H, W, C) frames in the segment layout (``frame_layout``); {} without cameras."""
    intervention: np.ndarray | None = None
    """uint8 (n,): 1 where the operator's teleop action was executed (HIL-SERL); None: no intervention."""

    @property
    def n(self) -> int:
        return len(self.reward)

    @property
    def intervened(self) -> bool:
        """Whether any row was the operator's (the wire sends ``intervention`` only then)."""
        return self.intervention is not None and bool(np.any(self.intervention))
