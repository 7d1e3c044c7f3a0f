"""What stands between the policy and the arm: the per-step action filter and the link watchdog.

``SafetyFilter.filter`` runs on every action after the policy (or the operator's teleop) and before
``robot.send_action``: a non-finite entry is replaced by the last sent value (the joint stays), the change
from the last sent action is limited to ``max_step`` a step, and the result is clipped to the joint bounds.
The bounds come last, so what is sent is always inside them, even when ``last_sent`` is not (a measured
position a hair past a limit): there the bounds win over the rate limit. Where the rate window and the
bounds overlap, the result lies in both. The rate limit is LeRobot's ``max_relative_target``
(lerobot/robots/utils.py ``ensure_safe_goal_position``: the change capped per motor, there from the present
position, here from ``last_sent``, which ``RobotEnv`` chooses); bounds and the NaN hold are ours.

``LinkWatchdog.reason`` says why the arm should hold while the learner is gone or the policy is stale.

Both are pure (no clock, no I/O): the caller passes the times and versions it observed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


class SafetyFilter:
    """Per-joint bounds and a maximum change per step, applied to every action before it is sent.

    ``low``, ``high``: the bounds, one per joint (stored as float32, the action's dtype, so the float32
    result is inside them exactly). ``max_step``: the largest change per step from the last sent action
    (to float32 rounding: half an ulp of the position), a scalar or one per joint; ``None`` or ``inf``
    (for all or some joints) means no rate limit there. The work is done in float64.
    ``names``: the joints' names, used in error messages.

    Counters, each the number of calls (steps) where that stage changed at least one joint:
    ``non_finite`` (a NaN or inf replaced by the last sent value), ``rate_limited``, ``clipped``.
    """

    def __init__(self, low, high, max_step=None, *, names: Sequence[str] | None = None):
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        if low.ndim != 1 or low.shape != high.shape or low.size == 0:
            raise ValueError(f"low and high must be 1-D of one length, got shapes {low.shape} and {high.shape}")
        self.size = low.size
        if names is not None and len(names) != self.size:
            raise ValueError(f"{len(names)} names for {self.size} joints")
        self.names = list(names) if names is not None else None
        for j in range(self.size):
            if not (math.isfinite(low[j]) and math.isfinite(high[j])):
                raise ValueError(f"{self._joint(j)}: bounds must be finite, got [{low[j]}, {high[j]}]")
            if not low[j] < high[j]:
                raise ValueError(f"{self._joint(j)}: low must be below high, got [{low[j]}, {high[j]}]")
        self.low, self.high = low.astype(np.float32), high.astype(np.float32)
        if np.any(self.low >= self.high):  # distinct float64 bounds that round to one float32
            j = int(np.argmax(self.low >= self.high))
            raise ValueError(f"{self._joint(j)}: low and high are equal as float32: [{low[j]}, {high[j]}]")
        if np.ndim(max_step) > 1 or (np.ndim(max_step) == 1 and np.size(max_step) != self.size):
            raise ValueError(f"max_step must be a scalar or one per joint ({self.size}), got shape {np.shape(max_step)}")
        step = np.broadcast_to(np.asarray(math.inf if max_step is None else max_step, np.float64), self.size)
        for j in range(self.size):
            if not step[j] > 0:  # also rejects NaN
                raise ValueError(f"{self._joint(j)}: max_step must be > 0 (or None / inf for no limit), got {step[j]}")
        self.max_step = step.copy()
        # Python floats: for 3-14 joints, a loop of float compares costs less than numpy's per-call overhead
        # (benchmarks/safety_filter.py measures both).
        self._bounds = list(zip(self.low.tolist(), self.high.tolist(), self.max_step.tolist()))
        self.non_finite = self.rate_limited = self.clipped = 0

    def _joint(self, j: int) -> str:
        return f"joint {j} ({self.names[j]})" if self.names else f"joint {j}"

    def filter(self, action, last_sent) -> np.ndarray:
        """The action to send: a new float32 array (``action`` and ``last_sent`` are left untouched).

        Raises ``ValueError`` if either has the wrong length, or ``last_sent`` is not finite (then
        nothing safe is known to hold the joint at).
        """
        a = action.tolist() if isinstance(action, np.ndarray) and action.ndim == 1 else _floats(action)
        last = last_sent.tolist() if isinstance(last_sent, np.ndarray) and last_sent.ndim == 1 else _floats(last_sent)
        if len(a) != self.size or len(last) != self.size:
            raise ValueError(f"action and last_sent must have {self.size} values, got shapes "
                             f"{np.shape(action)} and {np.shape(last_sent)}")  # fmt: skip
        total = sum(last)
        if total - total != 0.0:  # NaN or inf somewhere (or a finite sum that overflowed): look closer
            for j, x in enumerate(last):
                if not math.isfinite(x):
                    raise ValueError(f"{self._joint(j)}: last_sent is {x}, nothing safe to hold the joint at")
        total = sum(a)
        if total - total != 0.0:
            held = [j for j, x in enumerate(a) if not math.isfinite(x)]
            if held:
                self.non_finite += 1
                for j in held:
                    a[j] = last[j]
        out = []
        rate_limited = clipped = False
        for x, p, (lo, hi, step) in zip(a, last, self._bounds):
            if x > p + step:
                x, rate_limited = p + step, True
            elif x < p - step:
                x, rate_limited = p - step, True
            if x > hi:
                x, clipped = hi, True
            elif x < lo:
                x, clipped = lo, True
            out.append(x)
        self.rate_limited += rate_limited
        self.clipped += clipped
        return np.array(out, np.float32)

    def counts(self) -> dict[str, int]:
        return {"non_finite": self.non_finite, "rate_limited": self.rate_limited, "clipped": self.clipped}


def _floats(values) -> list[float]:
    if isinstance(values, np.ndarray) and values.ndim != 1:
        return []
    try:
        return [float(x) for x in values]
    except TypeError:  # not a sequence of numbers (a scalar, a 2-D array): the caller's length check explains
        return []


class LinkWatchdog:
    """When the arm should hold: the learner silent longer than ``learner_gone_s`` seconds, or the
    policy more than ``max_policy_lag`` versions behind the learner's. 0 switches a check off."""

    def __init__(self, learner_gone_s: float, max_policy_lag: int):
        if not (learner_gone_s >= 0 and math.isfinite(learner_gone_s)):
            raise ValueError(f"learner_gone_s must be >= 0 seconds (0: never hold for it), got {learner_gone_s}")
        if isinstance(max_policy_lag, bool) or not isinstance(max_policy_lag, (int, np.integer)) or max_policy_lag < 0:
            raise ValueError(f"max_policy_lag must be a whole number >= 0 (0: never hold for it), got {max_policy_lag}")
        self.learner_gone_s, self.max_policy_lag = float(learner_gone_s), int(max_policy_lag)

    def reason(self, learner_silent_s: float | None, policy_lag: int | None) -> str | None:
        """Why the arm should hold now, in words, or None. ``None`` arguments: not known (that check passes)."""
        reasons = []
        if self.learner_gone_s and learner_silent_s is not None and learner_silent_s > self.learner_gone_s:
            reasons.append(f"the learner has been silent for {learner_silent_s:.1f} s (> {self.learner_gone_s:g} s)")
        if self.max_policy_lag and policy_lag is not None and policy_lag > self.max_policy_lag:
            reasons.append(f"the policy is {policy_lag} versions behind the learner (> {self.max_policy_lag})")
        return "; ".join(reasons) or None
