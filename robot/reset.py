"""Resets without a simulator (``Resetter`` of robot/seams.py): a home-pose script, the operator's key, or both.

``env`` is robot/robot_env.py's ``RobotEnv``: ``hold()`` (keep the arm still), ``move_to(pose, max_step)``
(step the arm to a pose), ``joint_positions()`` (measured, in ``action_names`` order) and ``operator``.
Every reset first closes the episode for the operator's keys (a verdict key pressed during a reset is
dropped, never given to the next episode) and, while the operator's e-stop is latched, holds the arm until
it is released: a reset never moves an e-stopped arm. ``waiting_for`` says what the reset waits for right
now (the actor's log and o2o-status show it); each wait is logged once.

A stop request (``request_stop()``, from the actor's SIGTERM through the env) ends a wait with
``ResetInterrupted`` (robot/seams.py): a stop request ended a wait; the actor's loop then sees its stop.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from .operator import RESET_KEY, Operator
from .seams import RESUME, ResetInterrupted

log = logging.getLogger("o2o.robot")

HOME_WAIT = "the arm to reach its home pose"
RESET_WAIT = f"the operator's reset key ({RESET_KEY})"
RELEASE_WAIT = f"the operator to release the e-stop ({RESET_KEY})"


class ResetFailed(RuntimeError):
    """The arm did not reach its home pose within the tolerance."""


class _Waits:
    """What the resets share: ``waiting_for``, a stop request, and waiting (holding) for the operator's g."""

    def __init__(self):
        self.waiting_for: str | None = None
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """End any wait now (safe from a signal handler); later waits end at once too."""
        self._stop.set()

    def _begin(self, env: Any, operator: Operator | None) -> None:
        """No episode runs any more; an e-stopped arm is held until the release."""
        if operator is None:
            return
        operator.close_episode()
        if operator.estopped:
            self._await(env, operator, RELEASE_WAIT)

    def _await(self, env: Any, operator: Operator, what: str) -> None:
        self.waiting_for = what
        log.info("reset: waiting for %s", what)
        try:
            if not operator.wait_for(RESUME, env.hold, self._stop.is_set):
                raise ResetInterrupted(f"stop requested while waiting for {what}")
        finally:
            self.waiting_for = None


class HomeReset(_Waits):
    """Drive the arm to ``pose`` ({action feature: value}, or a vector in action order) with ``env.move_to``,
    changing each joint by at most ``max_step`` a step; done when every joint is within ``tolerance`` of it.
    A joint still off after ``tries`` moves (something in the way, a pose outside what the arm can reach)
    raises ``ResetFailed`` naming each joint and its distance."""

    def __init__(self, pose: Mapping[str, float] | Any, max_step: float, tolerance: float, tries: int = 3):
        super().__init__()
        if not (max_step > 0 and math.isfinite(max_step)):
            raise ValueError(f"max_step must be a finite number > 0, got {max_step}")
        if not (tolerance > 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}")
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        if not len(pose):
            raise ValueError("the home pose is empty: give a value for every joint (arm.home)")
        self.pose, self.max_step, self.tolerance, self.tries = pose, float(max_step), float(tolerance), int(tries)

    def reset(self, env: Any) -> None:
        self._begin(env, getattr(env, "operator", None))
        self.waiting_for = HOME_WAIT
        log.info("reset: waiting for %s", HOME_WAIT)
        try:
            for _ in range(self.tries):
                if self._stop.is_set():
                    raise ResetInterrupted(f"stop requested while waiting for {HOME_WAIT}")
                env.move_to(self.pose, self.max_step)
                off = self._off(env)
                if not off:
                    return
            where = ", ".join(f"{name} at {at:g} is {abs(at - home):g} from {home:g}" for name, at, home in off)
            raise ResetFailed(f"the arm did not reach its home pose within {self.tolerance:g} after {self.tries} "
                              f"tries: {where}. Is something in its way? Is arm.home inside arm.limits "
                              "and reachable?")  # fmt: skip
        finally:
            self.waiting_for = None

    def _off(self, env: Any) -> list[tuple[str, float, float]]:
        """(joint, measured, home) of each joint farther than the tolerance from home."""
        names = list(env.action_names)
        home = [self.pose[n] for n in names] if isinstance(self.pose, Mapping) else list(self.pose)
        at = np.asarray(env.joint_positions(), np.float64)
        return [(n, float(a), float(h)) for n, a, h in zip(names, at, home) if not abs(a - h) <= self.tolerance]


class OperatorReset(_Waits):
    """Hold the arm (``env.hold()``) until the operator presses the reset key: the operator puts the scene back."""

    def __init__(self, operator: Operator):
        super().__init__()
        self.operator = operator

    def reset(self, env: Any) -> None:
        self._begin(env, self.operator)
        self._await(env, self.operator, RESET_WAIT)


class HomeThenOperator:
    """The home script, then the operator confirms with the reset key (the scene may need a hand)."""

    def __init__(self, pose: Mapping[str, float] | Any, max_step: float, tolerance: float, operator: Operator,
                 tries: int = 3):  # fmt: skip
        self.home = HomeReset(pose, max_step, tolerance, tries)
        self.confirm = OperatorReset(operator)

    @property
    def waiting_for(self) -> str | None:
        return self.home.waiting_for or self.confirm.waiting_for

    def request_stop(self) -> None:
        self.home.request_stop()
        self.confirm.request_stop()

    def reset(self, env: Any) -> None:
        self.home.reset(env)
        self.confirm.reset(env)
