"""``RobotEnv``: a gymnasium env over any LeRobot-interface robot (robot/seams.py ``Robot``).

The robot gives joint readings and camera frames and takes joint goals; what a simulator would add comes
from the parts composed here: a ``Judge`` (reward and episode end), a ``Resetter`` (home script, operator),
a ``SafetyFilter`` (robot/safety.py) between the policy and ``send_action``, and an ``Operator`` (e-stop,
takeover) with a ``Teleoperator`` whose action replaces the policy's during a takeover (HIL-SERL).

Spaces. ``limits`` = {action feature: (low, high)} for every action feature (LeRobot's features carry no
bounds) is the action space, a float32 Box in ``action_features`` order. The observation's float features
(in ``observation_features`` order) are the state vector; its tuple features (H, W, 3) are cameras. No
cameras: a flat float32 Box; cameras: a Dict {"state": Box, "<camera>": uint8 Box} (envs/obs_spec.py).

One ``step(action)``:
  1. e-stop (``operator.estopped``): the arm is held once, then ``EStopped`` is raised at every step;
  2. takeover (``operator.takeover``): the teleoperator's action replaces the policy's (``intervention``);
  3. ``safety.filter(action, last_sent)`` (without a filter: non-finite entries hold the last value,
     then a clip to ``limits``);
  4. ``robot.send_action`` then ``robot.get_observation``; any robot error -> ``RobotDisconnected``;
  5. camera checks: a missing camera -> ``ObservationError``; a frame identical to the last step's is
     counted (``counters["stale_frames"]``) and ``max_stale_frames`` in a row raise ``ObservationError``;
  6. ``judge.judge(state, images)`` -> reward, terminated, truncated.
``info = {"success", "action": float32 action actually sent (what ``send_action`` returned), "intervention"}``.

    arm = SimArm()                                       # or a LeRobot robot (robot/make_robot.py)
    limits = {"shoulder_pan.pos": (-90, 90), "shoulder_lift.pos": (-90, 30), "elbow_flex.pos": (0, 140)}
    safety = SafetyFilter([-90, -90, 0], [90, 30, 140], max_step=10)   # degrees, degrees per step
    env = RobotEnv(arm, limits, judge=ReachJudge(arm, tolerance=0.03), safety=safety)
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    env.close()                                          # holds, then disconnects; safe to call twice
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from o2o.envs.obs_spec import STATE_KEY, ObservationError

from .seams import EStopped, Judge, Resetter, Robot, RobotDisconnected

log = logging.getLogger("o2o.robot")

ESTOP_WAIT = "the operator to release the e-stop"


class RobotEnv(gym.Env):
    """A LeRobot-interface robot as a gymnasium env (see the module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, robot: Robot, limits: Mapping[str, tuple[float, float]], *, judge: Judge,
                 resetter: Resetter | None = None, safety: Any = None, operator: Any = None, teleop: Any = None,
                 max_stale_frames: int = 30, image_size: tuple[int, int] | None = None):  # fmt: skip
        self.robot, self.judge, self.resetter = robot, judge, resetter
        self.safety, self.operator, self.teleop = safety, operator, teleop
        if max_stale_frames < 1:
            raise ValueError(f"max_stale_frames must be >= 1, got {max_stale_frames}")
        self.max_stale_frames = int(max_stale_frames)
        self.action_names = list(robot.action_features)
        self.low, self.high = _bounds(self.action_names, limits)
        self.action_space = gym.spaces.Box(self.low, self.high, dtype=np.float32)
        features = robot.observation_features
        self.state_names = [k for k, v in features.items() if not isinstance(v, tuple)]
        self.cameras = {k: tuple(int(n) for n in v) for k, v in features.items() if isinstance(v, tuple)}
        for name, shape in self.cameras.items():
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"camera feature {name!r} has shape {shape}: expected (H, W, 3)")
        missing = [n for n in self.action_names if n not in self.state_names]
        if missing:  # hold() and move_to() read each joint's measured position by the action's name
            raise ValueError(f"action features {missing} have no observation feature of the same name: "
                             "cannot measure where to hold them")  # fmt: skip
        state = gym.spaces.Box(-np.inf, np.inf, (len(self.state_names),), np.float32)
        # A camera's frames as the policy sees them: resized to image_size (a 640x480 webcam -> 84x84, DrQ's size).
        self.resizers = {name: Resizer(shape[:2], image_size) for name, shape in self.cameras.items()} if image_size else {}
        self.image_shapes = {name: (*self.resizers[name].size, 3) if image_size else shape
                             for name, shape in self.cameras.items()}  # fmt: skip
        if self.cameras:
            parts = {name: gym.spaces.Box(0, 255, shape, np.uint8) for name, shape in self.image_shapes.items()}
            self.observation_space = gym.spaces.Dict({STATE_KEY: state, **parts})
        else:
            self.observation_space = state
        self.last_sent = np.zeros(len(self.action_names), np.float32)
        self.counters = {"stale_frames": 0, "non_finite": 0}
        self._last_frames: dict[str, np.ndarray] = {}
        self._same_frames = dict.fromkeys(self.cameras, 0)  # consecutive steps with an identical frame
        self._estop_held = False
        self._closed = False

    # ------------------------------------------------------------------ gymnasium

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._closed = False
        if not self.robot.is_connected:
            self.robot.connect()
        self.last_sent = self.joint_positions()
        if self.resetter is not None:
            self.resetter.reset(self)
        self.judge.begin_episode()
        raw = self._observe()
        self.last_sent = self._joints_of(raw)
        state, images = self._split(raw)
        self._last_frames = {name: image.copy() for name, image in images.items()}  # the first step compares to these
        self._same_frames = dict.fromkeys(self.cameras, 0)
        return self._obs(state, images), {}

    def step(self, action):
        if self.operator is not None and self.operator.estopped:
            if not self._estop_held:  # hold once; then nothing more is sent until the e-stop is released
                self.hold()
                self._estop_held = True
            raise EStopped(f"e-stopped: the arm is held; waiting for {ESTOP_WAIT}")
        self._estop_held = False
        intervention = self.operator is not None and bool(self.operator.takeover)
        if intervention:
            action = self._teleop_action()
        action = np.asarray(action, np.float32).reshape(-1)
        if action.shape != (len(self.action_names),):
            raise ValueError(f"action has {action.size} values; the robot takes {len(self.action_names)} "
                             f"({', '.join(self.action_names)})")  # fmt: skip
        sent = self._safe(action)
        sent = self._send(sent)
        raw = self._observe()
        state, images = self._split(raw)
        self._check_frames(images)
        verdict = self.judge.judge(state, images)
        info = {"success": bool(verdict.success), "action": sent, "intervention": intervention}
        obs = self._obs(state, images)
        return obs, float(verdict.reward), bool(verdict.terminated), bool(verdict.truncated), info

    def close(self) -> None:
        """Hold, then disconnect; idempotent; errors of a robot already gone are logged, not raised. The operator's
        terminal gets its mode back."""
        if self._closed:
            return
        self._closed = True
        if self.operator is not None and callable(getattr(self.operator, "close", None)):
            self.operator.close()
        try:
            if self.robot.is_connected:
                self.hold()
        except Exception as err:
            log.warning("could not hold the arm while closing (%s); disconnecting anyway", err)
        try:
            if self.robot.is_connected:
                self.robot.disconnect()
        except Exception as err:
            log.warning("disconnecting the robot failed: %s", err)
        try:
            if getattr(self.teleop, "is_connected", False):  # a LeRobot leader arm (the keyboard has no device)
                self.teleop.disconnect()
        except Exception as err:
            log.warning("disconnecting the teleoperator failed: %s", err)

    # ------------------------------------------------------------------ for resetters and the actor

    @property
    def waiting_for(self) -> str | None:
        """What the env waits for now (the e-stop's release, the resetter's key), for logs and o2o-status."""
        if self.operator is not None and self.operator.estopped:
            return ESTOP_WAIT
        return getattr(self.resetter, "waiting_for", None)

    def request_stop(self) -> None:
        """End a wait of the resetter (for the operator's key, the e-stop's release) at once: the actor is stopping."""
        stop = getattr(self.resetter, "request_stop", None)
        if callable(stop):
            stop()

    def joint_positions(self) -> np.ndarray:
        """The measured joint positions, float32 in action order."""
        return self._joints_of(self._observe())

    def hold(self) -> None:
        """Keep the arm still: send the measured joint positions once (as the goal of each joint)."""
        held = self.joint_positions()
        self.last_sent = self._send(held)

    def move_to(self, pose, max_step: float) -> np.ndarray:
        """Step the arm to ``pose`` ({feature: value} or a vector in action order), changing each joint's
        goal by at most ``max_step`` a step from the measured start; no judge. Returns the measured positions."""
        if not max_step > 0 or not math.isfinite(max_step):
            raise ValueError(f"max_step must be a finite number > 0, got {max_step}")
        target = self._pose_vector(pose)
        outside = [n for n, x, lo, hi in zip(self.action_names, target, self.low, self.high) if not lo <= x <= hi]
        if outside:
            raise ValueError(f"pose puts {outside} outside the limits {self._limits_text()}")
        command = self.joint_positions().astype(np.float64)
        n_steps = int(np.ceil(np.max(np.abs(target - command)) / max_step)) if len(command) else 0
        for _ in range(n_steps):
            if self.operator is not None and self.operator.estopped:  # the e-stop stops the home script too
                self.hold()
                raise EStopped(f"e-stopped while moving to {dict(zip(self.action_names, target.round(1).tolist()))}: the arm is held")
            command = command + np.clip(target - command, -max_step, max_step)
            self.last_sent = self._send(command.astype(np.float32))
            self._observe()
        return self.joint_positions()

    # ------------------------------------------------------------------ internals

    def _teleop_action(self) -> np.ndarray:
        if self.teleop is None:
            raise ValueError("the operator took over, but this env has no teleoperator (teleop=) to take the "
                             "action from")
        given = self.teleop.get_action()
        missing = [n for n in self.action_names if n not in given]
        if missing:
            raise ValueError(f"the teleoperator's action lacks {missing}; it gave {sorted(given)}")
        return np.array([given[n] for n in self.action_names], np.float32)

    def _safe(self, action: np.ndarray) -> np.ndarray:
        if self.safety is not None:
            return np.asarray(self.safety.filter(action, self.last_sent), np.float32)
        bad = ~np.isfinite(action)
        if bad.any():  # a NaN sent to a servo is undefined: hold that joint instead
            self.counters["non_finite"] += 1
            action = np.where(bad, self.last_sent, action)
        return np.clip(action, self.low, self.high).astype(np.float32)

    def _send(self, action: np.ndarray) -> np.ndarray:
        """Send ``action`` (a vector in action order); the float32 vector the robot reports it sent."""
        command = {name: float(x) for name, x in zip(self.action_names, action)}
        try:
            done = self.robot.send_action(command)
        except Exception as err:
            raise RobotDisconnected(f"send_action failed: {err}") from err
        if isinstance(done, Mapping) and all(n in done for n in self.action_names):
            sent = np.array([float(done[n]) for n in self.action_names], np.float32)
        else:
            sent = np.asarray(action, np.float32).copy()
        self.last_sent = sent
        return sent

    def _observe(self) -> dict:
        try:
            return self.robot.get_observation()
        except Exception as err:
            raise RobotDisconnected(f"get_observation failed: {err}") from err

    def _joints_of(self, raw: Mapping) -> np.ndarray:
        missing = [n for n in self.action_names if n not in raw]
        if missing:
            raise ObservationError(f"the robot's observation lacks joints {missing}; it has {sorted(raw)}")
        return np.array([float(raw[n]) for n in self.action_names], np.float32)

    def _split(self, raw: Mapping) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        missing = [n for n in self.state_names if n not in raw]
        if missing:
            raise ObservationError(f"the robot's observation lacks {missing}; it has {sorted(raw)}")
        state = np.array([float(raw[n]) for n in self.state_names], np.float32)
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"the robot's joint readings are not finite: {dict(zip(self.state_names, state))}")
        images = {}
        for name, shape in self.cameras.items():
            if name not in raw or raw[name] is None:
                raise ObservationError(f"camera {name!r} returned no frame (is it connected? check its cable "
                                       "and its index or serial in robot.cameras)")  # fmt: skip
            image = np.asarray(raw[name])
            if image.dtype != np.uint8 or image.shape != shape:
                raise ObservationError(f"camera {name!r}: got {image.dtype} {image.shape}, expected uint8 {shape}")
            images[name] = self.resizers[name](image) if self.resizers else image
        return state, images

    def _check_frames(self, images: dict[str, np.ndarray]) -> None:
        """Count frames identical to the camera's last one; too many in a row: the camera is stuck."""
        for name, image in images.items():
            last = self._last_frames.get(name)
            if last is not None and np.array_equal(last, image):
                self.counters["stale_frames"] += 1
                self._same_frames[name] += 1
                if self._same_frames[name] >= self.max_stale_frames:
                    raise ObservationError(f"camera {name!r} returned the same frame for {self._same_frames[name]} "
                                           "steps: it is stuck or disconnected")  # fmt: skip
            else:
                self._same_frames[name] = 0
            self._last_frames[name] = image.copy()

    def _obs(self, state: np.ndarray, images: dict[str, np.ndarray]):
        return {STATE_KEY: state, **images} if self.cameras else state

    def _pose_vector(self, pose) -> np.ndarray:
        if isinstance(pose, Mapping):
            unknown = sorted(set(pose) - set(self.action_names))
            missing = [n for n in self.action_names if n not in pose]
            if unknown or missing:
                raise ValueError(f"pose: unknown joints {unknown}, missing {missing}; joints are {self.action_names}")
            pose = [pose[n] for n in self.action_names]
        vector = np.asarray(pose, np.float64).reshape(-1)
        if vector.shape != (len(self.action_names),) or not np.all(np.isfinite(vector)):
            raise ValueError(f"pose must be {len(self.action_names)} finite values ({', '.join(self.action_names)}), "
                             f"got {pose}")  # fmt: skip
        return vector

    def _limits_text(self) -> str:
        return ", ".join(f"{n}: [{lo:g}, {hi:g}]" for n, lo, hi in zip(self.action_names, self.low, self.high))


def _bounds(names: list[str], limits: Mapping[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 in action order from ``limits``; a ValueError naming every feature at fault."""
    missing = [n for n in names if n not in limits]
    unknown = sorted(set(limits) - set(names))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no limits for action features {missing} (every joint needs (low, high))")
        if unknown:
            parts.append(f"limits for unknown features {unknown}")
        raise ValueError(f"{'; '.join(parts)}; the robot's action features are {names}")
    low, high = [], []
    for name in names:
        try:
            lo, hi = (float(x) for x in limits[name])
        except (TypeError, ValueError):
            raise ValueError(f"limits[{name!r}] must be (low, high), got {limits[name]!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"limits[{name!r}] = ({lo}, {hi}): need finite low < high")
        low.append(lo)
        high.append(hi)
    low32, high32 = np.array(low, np.float32), np.array(high, np.float32)
    if np.any(low32 >= high32):
        equal = [n for n, a, b in zip(names, low32, high32) if a >= b]
        raise ValueError(f"limits: low and high are equal as float32 for {equal}")
    return low32, high32


class Resizer:
    """Nearest-neighbour resize of (H, W, 3) frames to ``size`` (h, w), by index arrays computed once: ~50 us for
    640x480 -> 84x84, no OpenCV needed on the robot's machine. Each output pixel takes the source pixel at its
    centre (no averaging: thin features may alias; set the camera's own resolution close to ``size`` to avoid it)."""

    def __init__(self, source: tuple[int, int], size: tuple[int, int]):
        (height, width), (h, w) = source, (int(size[0]), int(size[1]))
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be two positive sizes (height, width), got {size}")
        self.size = (h, w)
        self.rows = ((np.arange(h) + 0.5) * height / h).astype(np.intp)[:, None]
        self.cols = ((np.arange(w) + 0.5) * width / w).astype(np.intp)[None, :]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image[self.rows, self.cols]
