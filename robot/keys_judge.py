"""``KeysJudge``: reward and episode end from the operator's keys (robot/operator.py), a ``Judge`` of robot/seams.py.

    s (success)     -> reward_success, success, terminated
    f (failure)     -> reward_failure, terminated
    n (end episode) -> reward_step, truncated (cut without an outcome: the learner bootstraps past it)
    nothing         -> reward_step

Success and failure are terminal: the sparse-reward convention o2o's tasks use (envs/tasks.py
``terminate_on_success``, Cal-QL's binary Adroit setup) and HIL-SERL's: its success classifier ends the
episode on success (hil-serl serl_robot_infra/franka_env/envs/wrappers.py,
``MultiCameraBinaryRewardClassifierWrapper.step``: ``done = done or rew``), and LeRobot's HIL-SERL keys
do the same (lerobot src/lerobot/processor/hil_processor.py, ``InterventionActionProcessorStep``:
``done = terminate_episode or (terminate_on_success and success)``, ``reward = float(success)``). The
operator's verdict is the outcome of the episode, so nothing follows it to bootstrap from; "end episode"
(the time is up, the scene is disturbed) says nothing about the outcome, so it truncates instead.
"""

from __future__ import annotations

import math

import numpy as np

from .operator import Operator
from .seams import END_EPISODE, FAILURE, SUCCESS, Verdict


class KeysJudge:
    """The operator's verdict keys as reward and episode end; at most one verdict an episode (the operator
    counts and drops a second key, and keys pressed between episodes)."""

    def __init__(self, operator: Operator, reward_success: float = 1.0, reward_failure: float = 0.0,
                 reward_step: float = 0.0):  # fmt: skip
        for name, value in (("reward_success", reward_success), ("reward_failure", reward_failure),
                            ("reward_step", reward_step)):  # fmt: skip
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        self.operator = operator
        self.reward_success, self.reward_failure, self.reward_step = reward_success, reward_failure, reward_step

    def begin_episode(self) -> None:
        """Verdict keys count from now; those pressed between episodes are dropped (counted ``ignored``)."""
        self.operator.begin_episode()

    def judge(self, state: np.ndarray, images: dict[str, np.ndarray]) -> Verdict:
        events = self.operator.events()
        if not events:
            return Verdict(reward=self.reward_step)
        event = events[0]  # the operator accepts one verdict an episode
        if event == SUCCESS:
            return Verdict(reward=self.reward_success, success=True, terminated=True)
        if event == FAILURE:
            return Verdict(reward=self.reward_failure, terminated=True)
        if event == END_EPISODE:
            return Verdict(reward=self.reward_step, truncated=True)
        raise ValueError(f"the operator gave {event!r}, not a verdict")
