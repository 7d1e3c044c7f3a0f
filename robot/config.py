"""What o2o adds around a robot (``arm.*`` of ``o2o-actor``): bounds, reward, resets, takeover, watchdog.

The robot's own settings (``robot.type``, ``robot.port``, ``robot.cameras``: LeRobot's config keys, or
``robot.type=o2o_sim_arm`` for the MuJoCo stand-in) stay in ``robot.*`` and go to ``make_robot`` as given.

    o2o-actor task=arm-reach actor_id=arm-1 robot.type=o2o_sim_arm \\
        'arm.limits={shoulder_pan:[-90,90],shoulder_lift:[-60,60],elbow_flex:[-90,90]}' \\
        arm.max_step=5 arm.reward=keys arm.reset=operator

Keys of ``arm.limits`` and ``arm.home`` name an action feature by its joint: ``shoulder_pan`` stands for
LeRobot's ``shoulder_pan.pos`` (a dot in a key would nest it on Hydra's command line). Each is given whole: ``arm.limits={...}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any

REWARDS = ("keys", "classifier")
RESETS = ("home", "operator", "home+operator")


@dataclasses.dataclass
class RobotSettings:
    """The robot itself (``robot.*``), handed to ``make_robot``: LeRobot's config keys for a LeRobot robot."""

    type: str | None = None
    """A LeRobot robot type (so101_follower, koch_follower, ...: needs lerobot on this machine),
    ``o2o_sim_arm`` (o2o's MuJoCo stand-in) or ``package.module:ClassName`` (any class with LeRobot's
    Robot interface). None = no robot (the task's env)."""
    port: str | None = None
    """The robot's serial port (LeRobot's ``port``), e.g. /dev/ttyACM0."""
    id: str | None = None
    """The robot's calibration id (LeRobot's ``id``)."""
    cameras: Any = None  # a mapping; typed Any so that ``robot.cameras={...}`` replaces None (an empty dict would refuse new keys)
    """LeRobot camera configs by name, e.g. ``robot.cameras={front:{type:opencv,index_or_path:0,width:640,
    height:480,fps:30}}``; for o2o_sim_arm ``{front:[84,84]}`` (height, width)."""
    options: Any = None  # a mapping, as cameras
    """Any other keyword of the robot's config or class, e.g. ``robot.options={use_degrees:true}``."""

    def as_kwargs(self) -> dict[str, Any]:
        """The settings ``make_robot`` takes: type, then every key given (None and empty ones left out)."""
        for key, value in (("robot.cameras", self.cameras), ("robot.options", self.options)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{key}={value!r}: expected a mapping, e.g. {key}={{name:value}}")
        given = {"port": self.port, "id": self.id, "cameras": dict(self.cameras or {})}
        return {"type": self.type, **{k: v for k, v in given.items() if v}, **dict(self.options or {})}


@dataclasses.dataclass
class ArmConfig:
    limits: Any = None  # {joint: [low, high]}; Any, as robot.cameras, so that arm.limits={...} sets it whole
    """[low, high] of every action feature, by joint (``shoulder_pan: [-90, 90]`` for ``shoulder_pan.pos``): the
    action space, and where the safety filter clips. Required for a LeRobot robot (its features carry no bounds);
    a robot class with an ``action_limits`` attribute (o2o_sim_arm) gives its own when this is None."""
    max_step: float = 0.0
    """Largest change of any action value from one step to the next (the safety filter's rate limit;
    0 = none). In the action's units (degrees for LeRobot's ``.pos`` features)."""
    reward: str = "keys"
    """Reward and episode end: "keys" (the operator's keys: s success, f failure, n end episode) or
    "classifier" (a success classifier made by ``o2o-classifier train``: arm.classifier=FILE.onnx)."""
    classifier: str | None = None
    """The success classifier's ONNX file (arm.reward=classifier)."""
    classifier_threshold: float | None = None
    """Success when the classifier's probability reaches this (None = the threshold stored in the file)."""
    reset: str = "operator"
    """How an episode starts: "home" (drive to arm.home), "operator" (hold until the operator's reset key),
    or "home+operator" (drive home, then wait for the key)."""
    home: Any = None  # {joint: value}
    """The home pose per action feature (arm.reset=home or home+operator)."""
    home_tolerance: float = 2.0
    """How close (action units) every joint must get to arm.home for the reset to be done."""
    teleop: str = "keyboard"
    """Who acts while the operator has taken over (key h): "keyboard" (keys 1..0 / q..p move joint 1..10 up /
    down), a LeRobot teleoperator type (so101_leader, koch_leader, gamepad...: a leader arm's goals become the
    follower's; needs lerobot), or "none" (no takeover). Those steps are stored as interventions (HIL-SERL)."""
    teleop_options: Any = None  # a mapping
    """The LeRobot teleoperator's config keys, e.g. ``arm.teleop_options={port:/dev/ttyACM1,id:my_leader}``."""
    learner_silent_s: float = 10.0
    """Hold the arm while the learner has been silent this long (0 = never)."""
    max_policy_lag: int = 0
    """Hold the arm while its policy is more than this many versions behind the learner's newest (0 = never)."""
    image_size: Any = None  # [height, width]
    """Resize every camera's frames to [height, width] before the policy sees them (e.g. [84,84] for a 640x480
    webcam; None = as the camera gives them). Nearest pixel: set the camera's resolution near it if you can."""
    max_stale_frames: int = 30
    """A camera that returns the same image this many steps in a row stops the actor (a frozen camera)."""

    def validate(self) -> None:
        """ValueError saying what to change (types are Hydra's; these are the values)."""
        for key, value, allowed in (("arm.reward", self.reward, REWARDS), ("arm.reset", self.reset, RESETS)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
        if self.reward == "classifier" and not self.classifier:
            raise ValueError("arm.reward=classifier needs arm.classifier=FILE.onnx (made by o2o-classifier train)")
        if "home" in self.reset and not self.home:
            raise ValueError(f"arm.reset={self.reset} needs arm.home: the home pose of every action feature")
        for key, value in (("arm.max_step", self.max_step), ("arm.learner_silent_s", self.learner_silent_s),
                           ("arm.max_policy_lag", self.max_policy_lag)):  # fmt: skip
            if value < 0:
                raise ValueError(f"{key}={value}: must be >= 0 (0 = off)")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"arm.image_size={self.image_size}: expected [height, width], e.g. [84,84]")
        if self.home_tolerance <= 0 or self.max_stale_frames < 1:
            raise ValueError("arm.home_tolerance must be > 0 and arm.max_stale_frames >= 1")
