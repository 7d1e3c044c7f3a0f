"""``SimArm``: a MuJoCo arm behind LeRobot's ``Robot`` interface, the stand-in for hardware in every test.

Three joints like the first three of an SO-101 (``shoulder_pan`` about the vertical, ``shoulder_lift`` and
``elbow_flex`` in the arm's plane; upper arm 11.6 cm, forearm 13.5 cm), each driven by a position servo:
``send_action({"<joint>.pos": degrees})`` sets the goals, as LeRobot's SO-101 (``use_degrees=True``) does,
then the simulation advances one control period (``PERIOD_S``): time passes only when an action is sent.
The servos are critically damped at ``SERVO_FREQ`` (a step goal is 95 % reached in ~0.1 s) and the links are
gravity-compensated, so a held goal holds without droop. Observation: ``"<joint>.pos"`` in degrees, plus
one RGB image per camera of ``cameras={"front": (H, W)}`` (offscreen MuJoCo rendering, envs/mujoco_camera.py),
with a little sensor noise so that, as with a real camera, two frames are never byte-identical.

Like LeRobot (lerobot/errors.py): ``get_observation`` / ``send_action`` before ``connect`` or after
``disconnect`` raise ``DeviceNotConnectedError``; ``connect`` twice raises ``DeviceAlreadyConnectedError``;
both are ``ConnectionError``s. Faults for tests: ``disconnect_after_steps`` (a pulled cable: after that many
``send_action`` calls every read and write raises ``ConnectionError``), ``camera_fault`` ("missing": no
camera keys in the observation; "stale": the first frame forever).

The model holds a fixed reach target (site ``target``); ``ReachJudge`` rewards the fingertip within
``tolerance`` of it. That judge reads the simulator: it exists for the ``arm-reach`` task's datasets and
the learner's evaluation only (a real arm has no such judge: robot/keys_judge.py, robot/classifier_judge.py).
"""

from __future__ import annotations

import math

import gymnasium as gym
import mujoco
import numpy as np

from .robot_env import RobotEnv
from .seams import Verdict

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex")
JOINT_RANGES = {"shoulder_pan": (-110.0, 110.0), "shoulder_lift": (-100.0, 60.0), "elbow_flex": (-20.0, 150.0)}
"""Degrees. shoulder_lift > 0 lowers the upper arm, elbow_flex > 0 bends the forearm down (axes: +y)."""
UPPER_ARM, FOREARM = 0.116, 0.135  # metres, about an SO-101's
SHOULDER_HEIGHT = 0.09  # the lift axis above the floor
TARGET_POSE = (30.0, -30.0, 90.0)
"""Degrees: the target site is where this pose puts the fingertip (in front of the base, 3 cm above the floor)."""
PERIOD_S = 0.05  # one control period: 20 Hz, about what LeRobot's SO-101 loops run at
TIMESTEP = 0.002
SERVO_FREQ = 47.0  # rad/s, critically damped: 95 % of a step in 4.7 / 47 = 0.1 s
ARMATURE = 0.01  # kg m^2: the servo's reflected rotor inertia dominates the light links
SENSOR_NOISE = 2  # +- grey levels of uniform noise on every camera pixel
CAMERA_VIEW = {"lookat": (0.1, 0.0, 0.1), "distance": 0.65, "azimuth": 200.0, "elevation": -30.0}


class DeviceNotConnectedError(ConnectionError):
    """As lerobot.errors.DeviceNotConnectedError: the device is not connected (call ``connect()`` first)."""


class DeviceAlreadyConnectedError(ConnectionError):
    """As lerobot.errors.DeviceAlreadyConnectedError."""


def fingertip_position(pose_deg) -> np.ndarray:
    """Forward kinematics: the fingertip's world position (m) for joint angles in degrees."""
    pan, lift, elbow = np.radians(np.asarray(pose_deg, np.float64))
    # In the arm's plane: r outwards, z up; a positive angle about +y turns the link downwards.
    r = UPPER_ARM * math.cos(lift) + FOREARM * math.cos(lift + elbow)
    z = SHOULDER_HEIGHT - UPPER_ARM * math.sin(lift) - FOREARM * math.sin(lift + elbow)
    return np.array([r * math.cos(pan), r * math.sin(pan), z])


def inverse_kinematics(position) -> np.ndarray:
    """Joint angles (degrees) that put the fingertip at ``position``, elbow bent down (as ``TARGET_POSE``).

    The two-link planar solution (e.g. Siciliano et al., Robotics, section 2.12.1) after the pan turns the
    arm's plane through the point."""
    x, y, z = map(float, position)
    pan = math.atan2(y, x)
    a, b = math.hypot(x, y), SHOULDER_HEIGHT - z  # in the arm's plane, b downwards
    cos_elbow = (a * a + b * b - UPPER_ARM**2 - FOREARM**2) / (2 * UPPER_ARM * FOREARM)
    if abs(cos_elbow) > 1:
        raise ValueError(f"{position} is out of the arm's reach ({UPPER_ARM + FOREARM:.3f} m from the shoulder)")
    elbow = math.acos(cos_elbow)
    lift = math.atan2(b, a) - math.atan2(FOREARM * math.sin(elbow), UPPER_ARM + FOREARM * math.cos(elbow))
    return np.degrees([pan, lift, elbow])


TARGET = fingertip_position(TARGET_POSE)


def arm_xml() -> str:
    """The MJCF of the arm and its target."""
    kp = ARMATURE * SERVO_FREQ**2
    kv = 2 * ARMATURE * SERVO_FREQ
    rng = {j: " ".join(f"{math.radians(v):.6f}" for v in JOINT_RANGES[j]) for j in JOINTS}
    servos = "\n".join(
        f'    <position name="{j}" joint="{j}" kp="{kp:.4f}" kv="{kv:.4f}" ctrlrange="{rng[j]}"/>' for j in JOINTS
    )
    return f"""<mujoco model="o2o_sim_arm">
  <compiler angle="radian"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast"/>
  <visual><global offwidth="640" offheight="480"/></visual>
  <default>
    <joint armature="{ARMATURE}" damping="0.01" limited="true"/>
    <geom contype="0" conaffinity="0"/>
  </default>
  <worldbody>
    <light pos="0 0 1.5" dir="0 0 -1" directional="true"/>
    <geom name="floor" type="plane" size="0.5 0.5 0.01" rgba="0.85 0.85 0.8 1"/>
    <site name="target" pos="{TARGET[0]:.12g} {TARGET[1]:.12g} {TARGET[2]:.12g}" size="0.015" rgba="1 0 0 1"/>
    <body name="base">
      <geom type="cylinder" size="0.045 0.025" pos="0 0 0.025" rgba="0.2 0.2 0.2 1"/>
      <body name="turntable" pos="0 0 0.05" gravcomp="1">
        <joint name="shoulder_pan" axis="0 0 1" range="{rng['shoulder_pan']}"/>
        <geom type="cylinder" size="0.03 0.02" pos="0 0 0.02" mass="0.1" rgba="0.95 0.55 0.1 1"/>
        <body name="upper_arm" pos="0 0 {SHOULDER_HEIGHT - 0.05}" gravcomp="1">
          <joint name="shoulder_lift" axis="0 1 0" range="{rng['shoulder_lift']}"/>
          <geom type="capsule" fromto="0 0 0 {UPPER_ARM} 0 0" size="0.015" mass="0.1" rgba="0.95 0.55 0.1 1"/>
          <body name="forearm" pos="{UPPER_ARM} 0 0" gravcomp="1">
            <joint name="elbow_flex" axis="0 1 0" range="{rng['elbow_flex']}"/>
            <geom type="capsule" fromto="0 0 0 {FOREARM} 0 0" size="0.012" mass="0.08" rgba="0.95 0.95 0.95 1"/>
            <site name="fingertip" pos="{FOREARM} 0 0" size="0.01" rgba="0.1 0.3 1 1"/>
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <actuator>
{servos}
  </actuator>
</mujoco>"""


class SimArm:
    """A MuJoCo arm with LeRobot's ``Robot`` interface (see the module docstring)."""

    name = "o2o_sim_arm"

    def __init__(self, cameras: dict[str, tuple[int, int]] | None = None, *, disconnect_after_steps: int | None = None,
                 camera_fault: str = "none", seed: int = 0):  # fmt: skip
        if camera_fault not in ("none", "missing", "stale"):
            raise ValueError(f"camera_fault={camera_fault!r}: choose none, missing or stale")
        self.camera_sizes = {name: (int(h), int(w)) for name, (h, w) in (cameras or {}).items()}
        self.disconnect_after_steps, self.camera_fault = disconnect_after_steps, camera_fault
        self.model = mujoco.MjModel.from_xml_string(arm_xml())
        self.data = mujoco.MjData(self.model)
        self.substeps = round(PERIOD_S / self.model.opt.timestep)
        self._qadr = [int(self.model.joint(j).qposadr[0]) for j in JOINTS]
        self._vadr = [int(self.model.joint(j).dofadr[0]) for j in JOINTS]
        self._fingertip = self.model.site("fingertip").id
        self._target = self.model.site("target").id
        self._rng = np.random.default_rng(seed)  # the cameras' sensor noise
        self._cameras: dict = {}
        self._first_frames: dict[str, np.ndarray] = {}
        self._connected = False
        self.steps = 0  # send_action calls since connect
        mujoco.mj_forward(self.model, self.data)

    # ------------------------------------------------------------------ LeRobot's Robot interface

    @property
    def observation_features(self) -> dict:
        return {**{f"{j}.pos": float for j in JOINTS}, **{n: (h, w, 3) for n, (h, w) in self.camera_sizes.items()}}

    @property
    def action_features(self) -> dict:
        return {f"{j}.pos": float for j in JOINTS}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def action_limits(self) -> dict[str, tuple[float, float]]:
        """The joints' ranges (degrees): the actor's action bounds when ``arm.limits`` is not given (a LeRobot
        robot has no such attribute, so its limits must be)."""
        return arm_limits()

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise DeviceAlreadyConnectedError(f"{self.name} is already connected")
        if self.camera_sizes:
            from o2o.envs.mujoco_camera import OffscreenCamera, gl_backend

            backend = gl_backend()  # a GLUnavailable saying what to install, before anything is connected
            self._cameras = {name: OffscreenCamera(self.model, w, h, CAMERA_VIEW, backend)
                             for name, (h, w) in self.camera_sizes.items()}  # fmt: skip
        self._first_frames = {}
        self.steps = 0
        self._connected = True

    def get_observation(self) -> dict:
        self._check_link()
        obs = {f"{j}.pos": float(math.degrees(self.data.qpos[a])) for j, a in zip(JOINTS, self._qadr)}
        if self.camera_fault != "missing":
            for name, camera in self._cameras.items():
                obs[name] = self._frame(name, camera)
        return obs

    def send_action(self, action: dict) -> dict:
        self._check_link()
        unknown = sorted(set(action) - set(self.action_features))
        if unknown:
            raise ValueError(f"{self.name}: unknown action features {unknown}; it takes {list(self.action_features)}")
        sent = {}
        for i, joint in enumerate(JOINTS):
            key = f"{joint}.pos"
            if key in action:  # a joint left out keeps its goal (as LeRobot's bus writes only the given motors)
                low, high = JOINT_RANGES[joint]
                goal = min(max(float(action[key]), low), high)  # the servo's own limits
                self.data.ctrl[i] = math.radians(goal)
                sent[key] = goal
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        self.steps += 1
        return sent

    def disconnect(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self.name} is not connected")
        for camera in self._cameras.values():
            camera.close()
        self._cameras = {}
        self._connected = False

    # ------------------------------------------------------------------ the simulator's side (tests, task)

    def fingertip_distance(self) -> float:
        """Metres from the fingertip to the target site."""
        return float(np.linalg.norm(self.data.site_xpos[self._fingertip] - self.data.site_xpos[self._target]))

    def target_pose(self) -> np.ndarray:
        """The joint angles (degrees, joint order) that put the fingertip on the target: what a scripted
        expert reaches for."""
        return inverse_kinematics(self.data.site_xpos[self._target])

    def place(self, pose_deg) -> None:
        """Put the arm at rest at ``pose_deg`` (degrees, joint order), its goals there: a simulator's reset."""
        pose = np.radians(np.asarray(pose_deg, np.float64))
        self.data.qpos[self._qadr] = pose
        self.data.qvel[self._vadr] = 0.0
        self.data.ctrl[:] = pose
        mujoco.mj_forward(self.model, self.data)

    def _check_link(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self.name} is not connected: call connect() first")
        if self.disconnect_after_steps is not None and self.steps >= self.disconnect_after_steps:
            raise ConnectionError(f"{self.name}: no answer from the servos (the cable was pulled after "
                                  f"{self.steps} steps)")  # fmt: skip

    def _frame(self, name: str, camera) -> np.ndarray:
        if self.camera_fault == "stale" and name in self._first_frames:
            return self._first_frames[name].copy()
        image = camera.render(self.data)
        noise = self._rng.integers(-SENSOR_NOISE, SENSOR_NOISE + 1, image.shape, dtype=np.int16)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        self._first_frames.setdefault(name, image.copy())
        return image


class ReachJudge:
    """Success when the sim's fingertip is within ``tolerance`` m of the target: reward 1, terminated."""

    def __init__(self, arm: SimArm, tolerance: float):
        self.arm, self.tolerance = arm, float(tolerance)

    def begin_episode(self) -> None:
        pass

    def judge(self, state: np.ndarray, images: dict) -> Verdict:
        if self.arm.fingertip_distance() < self.tolerance:
            return Verdict(reward=1.0, success=True, terminated=True)
        return Verdict()


class RandomStart:
    """The arm-reach reset: the arm placed at rest at a random pose drawn from the env's seeded generator
    (``env.np_random``), at least ``2 * tolerance`` from the target, so that episodes differ."""

    waiting_for = None

    def __init__(self, arm: SimArm, tolerance: float):
        self.arm, self.tolerance = arm, tolerance

    def reset(self, env: RobotEnv) -> None:
        for _ in range(100):
            pose = env.np_random.uniform(START_LOW, START_HIGH)
            if np.linalg.norm(fingertip_position(pose) - TARGET) > 2 * self.tolerance:
                break
        self.arm.place(pose)


# arm-reach: random starts within these (degrees), inside the limits.
START_LOW, START_HIGH = np.array([-90.0, -80.0, 0.0]), np.array([90.0, 40.0, 130.0])
REACH_TOLERANCE = 0.03  # metres
REACH_STEPS = 60


def arm_limits() -> dict[str, tuple[float, float]]:
    """The action limits of the arm-reach task: the joints' ranges (degrees)."""
    return {f"{j}.pos": JOINT_RANGES[j] for j in JOINTS}


def arm_reach_env(tolerance: float = REACH_TOLERANCE, cameras: dict | None = None, **arm_kwargs) -> RobotEnv:
    """The ``arm-reach`` task's env: a ``SimArm`` reaching its fixed target from a random start."""
    arm = SimArm(cameras=cameras, **arm_kwargs)
    return RobotEnv(arm, arm_limits(), judge=ReachJudge(arm, tolerance), resetter=RandomStart(arm, tolerance))


# envs/tasks.py names it "o2o.robot.sim_arm:o2o/ArmReach-v0": gym.make imports this module, so envs/ never
# imports robot/.
if "o2o/ArmReach-v0" not in gym.registry:
    gym.register("o2o/ArmReach-v0", entry_point="o2o.robot.sim_arm:arm_reach_env", max_episode_steps=REACH_STEPS)
