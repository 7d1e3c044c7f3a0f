"""The contracts between a robot's parts (what ``robot_env.RobotEnv`` composes).

A robot actor is an ordinary o2o actor whose env is ``RobotEnv``: a LeRobot-interface ``Robot``
(hardware, or ``sim_arm.SimArm`` standing in for it) plus the parts a simulator would otherwise
give: a ``Judge`` (reward and episode end: the operator's keys or a learned success classifier),
a ``Resetter`` (a home-pose script, the operator, or both), a ``SafetyFilter`` between the policy and
``send_action``, and an ``Operator`` (the terminal's keys: verdicts, e-stop, takeover).
Each part is one module of this folder; this module holds only the shapes they agree on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Robot(Protocol):
    """LeRobot's ``lerobot.robots.Robot`` interface, as far as o2o uses it (0.4.x).

    ``observation_features``: ``{"<joint>.pos": float, ..., "<camera>": (H, W, 3)}``: a float
    feature is one value of the state vector (in the dict's order), a tuple feature a camera.
    ``action_features``: ``{"<joint>.pos": float, ...}``: the action vector, in the dict's order.
    ``get_observation()`` returns one value per feature (a camera: uint8 (H, W, 3)); ``send_action``
    takes one float per action feature and returns what it actually sent (LeRobot may clip it).
    """

    @property
    def observation_features(self) -> dict[str, Any]: ...

    @property
    def action_features(self) -> dict[str, Any]: ...

    @property
    def is_connected(self) -> bool: ...

    def connect(self, calibrate: bool = True) -> None: ...

    def get_observation(self) -> dict[str, Any]: ...

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]: ...

    def disconnect(self) -> None: ...


class RobotDisconnected(ConnectionError):
    """The robot stopped answering mid-episode (a cable, a power cut): the episode is closed as abandoned."""


class EStopped(RuntimeError):
    """The operator's e-stop: the arm is held and nothing more is sent until it is released."""


class ResetInterrupted(RuntimeError):
    """A stop request ended a reset's wait (for the operator's key, the e-stop's release): the arm is held, and
    no episode starts."""


# The operator's events (robot/operator.py maps keys to them).
SUCCESS, FAILURE, END_EPISODE, ESTOP, RESUME, TAKEOVER = "success", "failure", "end_episode", "estop", "resume", "takeover"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judge's word on one step: its reward and whether the episode ends there."""

    reward: float = 0.0
    success: bool = False
    terminated: bool = False
    """A true end (success or failure): no bootstrap past it."""
    truncated: bool = False
    """Cut without an outcome (the operator's "end episode"): the learner bootstraps past it."""


class Judge(Protocol):
    """Reward and episode end without a simulator (robot/keys_judge.py, robot/classifier_judge.py)."""

    def begin_episode(self) -> None:
        """A new episode starts (forget the last one's verdicts)."""

    def judge(self, state: np.ndarray, images: dict[str, np.ndarray]) -> Verdict:
        """The verdict on the observation the last action led to (state float32, images uint8 HxWxC)."""


class Resetter(Protocol):
    """Brings the arm to where an episode may start (robot/reset.py); says what it waits for meanwhile."""

    waiting_for: str | None
    """What the reset waits for right now ("the operator's reset key (g)"), None when not waiting."""

    def reset(self, env: Any) -> None:
        """Return once the arm is ready (``env`` is the ``RobotEnv``: its ``hold()``, ``move_to(pose)``)."""


class Teleoperator(Protocol):
    """LeRobot's ``lerobot.teleoperators.Teleoperator`` interface, as far as o2o uses it: a leader arm,
    a space mouse, or the keyboard (robot/operator.py ``KeyboardTeleop``)."""

    @property
    def action_features(self) -> dict[str, Any]: ...

    def connect(self, calibrate: bool = True) -> None: ...

    def get_action(self) -> dict[str, Any]: ...

    def disconnect(self) -> None: ...
