"""A robot actor's env: the robot (``robot.*``) with what o2o puts around it (``arm.*``), as one ``RobotEnv``.

    env = make_arm_env("arm-reach", RobotSettings(type="o2o_sim_arm"), ArmConfig(reset="operator"))

Builds, in order: the robot (``make_robot``: nothing connects yet), the operator's keys (always: the e-stop
must work whatever the reward), the judge (keys or classifier), the resetter, the safety filter from the
limits, the keyboard teleoperator; then wraps the env in the episode time limit and checks it as any actor
env (``envs.check_actor_env``). A refused configuration closes what it opened.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import gymnasium as gym

from o2o.envs import check_actor_env, get_task
from o2o.envs.obs_spec import ObsSpec

from .config import ArmConfig, RobotSettings
from .classifier_judge import ClassifierJudge
from .keys_judge import KeysJudge
from .make_robot import make_robot, make_teleoperator
from .operator import KeyboardTeleop, Operator
from .reset import HomeReset, HomeThenOperator, OperatorReset
from .robot_env import RobotEnv
from .safety import SafetyFilter
from .seams import Verdict

log = logging.getLogger("o2o.robot")

DEFAULT_EPISODE_STEPS = 200  # a robot task without a time limit of its own


def by_feature(values: Mapping[str, Any], features: list[str], what: str) -> dict[str, Any]:
    """``values`` keyed by action feature: a key names a feature, or its joint (``shoulder_pan`` for
    ``shoulder_pan.pos``); ValueError for a key that names neither."""
    joints = {name.split(".")[0]: name for name in features}
    keyed, unknown = {}, []
    for key, value in values.items():
        name = key if key in features else joints.get(key)
        if name is None:
            unknown.append(key)
        else:
            keyed[name] = value
    if unknown:
        raise ValueError(f"{what} names {unknown}, which are not action features of this robot: {features}")
    return keyed


def make_arm_env(task: str, robot: RobotSettings, arm: ArmConfig, max_episode_steps: int = 0,
                 operator_fd: int | None = None) -> gym.Env:  # fmt: skip
    """The checked env of a robot actor for ``task`` (see the module docstring); the operator's keys come from
    ``operator_fd`` (default: this process's terminal)."""
    spec = get_task(task)
    arm.validate()
    made = make_robot(robot.as_kwargs())
    operator = env = None
    try:
        features = list(made.action_features)
        if arm.limits is not None:
            limits = by_feature(arm.limits, features, "arm.limits")
        elif getattr(made, "action_limits", None) is not None:
            limits = dict(made.action_limits)
        else:
            raise ValueError(f"arm.limits is required for robot.type={robot.type}: [low, high] of each of {features}, "
                             "e.g. 'arm.limits={shoulder_pan:[-90,90],...}' (LeRobot's features carry no bounds)")  # fmt: skip
        missing = [name for name in features if name not in limits]
        if missing:
            raise ValueError(f"arm.limits gives no [low, high] for {missing}")
        low = [float(limits[name][0]) for name in features]
        high = [float(limits[name][1]) for name in features]
        safety = SafetyFilter(low, high, arm.max_step or None, names=features)
        operator = Operator(fd=operator_fd)
        judge = KeysJudge(operator, reward_success=spec.reward_pos, reward_failure=spec.reward_neg,
                          reward_step=spec.reward_neg)  # fmt: skip
        home = by_feature(arm.home, features, "arm.home") if arm.home else None
        max_step = arm.max_step or float("inf")
        resetter = {"home": lambda: HomeReset(home, max_step, arm.home_tolerance),
                    "operator": lambda: OperatorReset(operator),
                    "home+operator": lambda: HomeThenOperator(home, max_step, arm.home_tolerance, operator)}[arm.reset]()  # fmt: skip
        env = RobotEnv(made, limits, judge=judge, resetter=resetter, safety=safety, operator=operator,
                       max_stale_frames=arm.max_stale_frames, image_size=arm.image_size)  # fmt: skip
        if arm.reward == "classifier":  # its inputs are checked against the env's observation (ClassifierMismatch)
            classifier = ClassifierJudge(arm.classifier, ObsSpec.from_space(env.observation_space), task,
                                         arm.classifier_threshold)  # fmt: skip
            env.judge = KeysOverClassifier(judge, classifier)
        if arm.teleop == "keyboard":
            env.teleop = KeyboardTeleop(features, env.joint_positions, step=arm.max_step or 5.0, operator=operator)
        elif arm.teleop != "none":  # a leader arm, a gamepad...: connected now, disconnected by env.close()
            env.teleop = make_teleoperator({"type": arm.teleop, **dict(arm.teleop_options or {})})
            env.teleop.connect()
        steps = max_episode_steps or spec.max_episode_steps or DEFAULT_EPISODE_STEPS
        checked = check_actor_env(gym.wrappers.TimeLimit(env, steps))
    except BaseException:  # a refused configuration leaves nothing connected and the terminal as it was
        if env is not None:
            env.close()  # the operator, the robot and a connected teleoperator
        else:
            if operator is not None:
                operator.close()
            if getattr(made, "is_connected", False):
                made.disconnect()
        raise
    log.info("robot %s for task %s: %d joints, cameras %s, reward by %s, reset by %s, episodes of at most %d steps",
             robot.type, task, len(features), list(ObsSpec.from_space(checked.observation_space).to_dict()["cameras"]),
             arm.reward, arm.reset, steps)  # fmt: skip
    return checked


class KeysOverClassifier:
    """A success classifier's reward and episode end, under the operator's keys: a key's verdict (success,
    failure, end episode) comes first, so the operator can always end an episode the classifier misjudges."""

    def __init__(self, keys: KeysJudge, classifier: ClassifierJudge):
        self.keys, self.classifier = keys, classifier

    def begin_episode(self) -> None:
        self.keys.begin_episode()
        self.classifier.begin_episode()

    def judge(self, state, images) -> Verdict:
        verdict = self.keys.judge(state, images)
        if verdict.terminated or verdict.truncated:
            return verdict
        return self.classifier.judge(state, images)
