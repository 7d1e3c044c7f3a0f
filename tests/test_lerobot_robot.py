"""A robot on LeRobot's own ``Robot`` base class, built by o2o's ``make_robot`` through LeRobot's
``make_robot_from_config``, driven by o2o's ``RobotEnv``.

LeRobot 0.4.4 pins torch<2.11, so it runs in its own venv (tests/lerobot_venv.py), in a child
process; the test skips, saying how to build that venv, where there is none. The robot is an
installed-style LeRobot plugin (a ``lerobot_robot_*`` distribution, as LeRobot's docs ask of a
third-party robot) whose config is registered under a new type and whose robot drives o2o's
MuJoCo ``SimArm`` underneath: what a user's own arm package looks like, with the sim for hardware.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from lerobot_venv import HOW_TO_BUILD, lerobot_python

PLUGIN = "lerobot_robot_o2o_test_arm"

PLUGIN_SOURCE = textwrap.dedent('''
    """A third-party LeRobot robot (LeRobot's Robot base class) over o2o's SimArm."""
    from dataclasses import dataclass

    from lerobot.robots import Robot, RobotConfig

    from o2o.robot.sim_arm import SimArm


    @RobotConfig.register_subclass("o2o_test_arm")
    @dataclass
    class O2oTestArmConfig(RobotConfig):
        seed: int = 0


    class O2oTestArm(Robot):
        # make_robot_from_config finds this class by the config's name less "Config", in the same module.
        config_class = O2oTestArmConfig
        name = "o2o_test_arm"

        def __init__(self, config: O2oTestArmConfig):
            super().__init__(config)
            self.config = config
            self.sim = SimArm(seed=config.seed)

        @property
        def observation_features(self) -> dict:
            return self.sim.observation_features

        @property
        def action_features(self) -> dict:
            return self.sim.action_features

        @property
        def is_connected(self) -> bool:
            return self.sim.is_connected

        @property
        def is_calibrated(self) -> bool:
            return True  # a sim has nothing to calibrate

        def connect(self, calibrate: bool = True) -> None:
            self.sim.connect(calibrate)
            self.configure()

        def calibrate(self) -> None:
            pass

        def configure(self) -> None:
            pass

        def get_observation(self) -> dict:
            return self.sim.get_observation()

        def send_action(self, action: dict) -> dict:
            return self.sim.send_action(action)

        def disconnect(self) -> None:
            self.sim.disconnect()
''')

CHILD = textwrap.dedent('''
    import json, math, sys
    from pathlib import Path

    import lerobot.robots
    import numpy as np

    from o2o.robot.make_robot import lerobot_config, make_robot, make_teleoperator
    from o2o.robot.robot_env import RobotEnv
    from o2o.robot.seams import Verdict

    calibration = Path(sys.argv[1])
    out = {}

    class CountingJudge:
        """Reward 0, never ends; keeps the states it was shown."""
        def begin_episode(self):
            self.states = []
        def judge(self, state, images):
            self.states.append(state.tolist())
            return Verdict()

    robot = make_robot({"type": "o2o_test_arm", "id": "bench1", "calibration_dir": str(calibration), "seed": 3})
    out["class"] = type(robot).__name__
    out["lerobot_robot"] = isinstance(robot, lerobot.robots.Robot)
    out["calibration_dir"] = [type(robot.calibration_dir).__name__, str(robot.calibration_dir)]
    out["seed"] = robot.config.seed

    limits = {"shoulder_pan.pos": (-90, 90), "shoulder_lift.pos": (-90, 30), "elbow_flex.pos": (0, 140)}
    judge = CountingJudge()
    env = RobotEnv(robot, limits, judge=judge)
    out["observation_space"] = [list(env.observation_space.shape), str(env.observation_space.dtype)]
    out["action_space"] = [env.action_space.low.tolist(), env.action_space.high.tolist()]
    env.reset(seed=0)
    out["connected_after_reset"] = [robot.is_connected, robot.sim.is_connected]
    for _ in range(6):  # the servos settle in ~0.1 s = 2 steps
        obs, reward, terminated, truncated, info = env.step(np.array([20.0, -10.0, 45.0], np.float32))
    out["obs"] = obs.tolist()
    out["sim_goals"] = [math.degrees(c) for c in robot.sim.data.ctrl]
    out["reward"], out["terminated"], out["truncated"] = reward, terminated, truncated
    out["judged_states"] = len(judge.states)
    _, _, _, _, info = env.step(np.array([200.0, 0.0, 0.0], np.float32))  # past the limits
    out["clipped_action"] = info["action"].tolist()
    out["sim_goals_after_clip"] = [math.degrees(c) for c in robot.sim.data.ctrl]
    out["sim_steps"] = robot.sim.steps
    env.close()
    out["connected_after_close"] = [robot.is_connected, robot.sim.is_connected]

    # LeRobot's own SO-101 with a camera, built (not connected: there is no arm on the bus here).
    front = {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480, "fps": 30}
    config = lerobot_config("so101_follower", {"port": "/dev/ttyO2O404", "id": "arm1", "cameras": {"front": front}})
    camera = config.cameras["front"]
    # (not config.type: LeRobot registers this one class as so100_follower and so101_follower, and
    # .type answers so100_follower for both; both build the same SOFollower)
    out["so101_config"] = [type(config).__name__, config.port, type(camera).__name__,
                           camera.index_or_path, camera.width, camera.height, camera.fps]
    so101 = make_robot({"type": "so101_follower", "port": "/dev/ttyO2O404", "id": "arm1", "cameras": {"front": front},
                        "calibration_dir": str(calibration)})
    so101_env = RobotEnv(so101, {name: (-100.0, 100.0) for name in so101.action_features}, judge=CountingJudge())
    space = so101_env.observation_space
    out["so101"] = [type(so101).__name__, isinstance(so101, lerobot.robots.Robot), so101.is_connected,
                    so101_env.state_names, {k: [list(v.shape), str(v.dtype)] for k, v in space.spaces.items()},
                    list(so101_env.action_space.shape)]
    try:
        so101_env.reset()
    except ConnectionError as e:
        out["so101_reset"] = str(e)

    # LeRobot's SO-101 leader arm as the operator's teleoperator (arm.teleop=so101_leader), built, not connected.
    leader = make_teleoperator({"type": "so101_leader", "port": "/dev/ttyO2O405", "id": "leader1",
                                "calibration_dir": str(calibration)})
    out["leader"] = [type(leader).__name__, sorted(leader.action_features), leader.is_connected]
    try:
        make_teleoperator({"type": "no_such_leader"})
    except ValueError as e:
        out["unknown_teleop"] = str(e)

    def error(settings):
        try:
            make_robot(settings)
        except Exception as e:
            return [type(e).__name__, str(e)]
        return None

    out["unknown_type"] = error({"type": "no_such_robot"})
    out["unknown_key"] = error({"type": "o2o_test_arm", "no_such_key": 1})
    out["camera_without_fps"] = error({"type": "so101_follower", "port": "/dev/ttyACM0", "cameras": {
        "front": {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480}}})
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    python = lerobot_python()
    if python is None:
        pytest.skip(f"no LeRobot venv: {HOW_TO_BUILD}")
    pytest.importorskip("o2o.robot.robot_env")
    root = tmp_path_factory.mktemp("lerobot")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    # A dist-info makes it an installed distribution named lerobot_robot_*: LeRobot's
    # register_third_party_plugins (which make_robot calls) finds it and imports it.
    info = plugins / f"{PLUGIN}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    env = {**os.environ, "PYTHONPATH": str(plugins), "HF_LEROBOT_HOME": str(root / "hf_lerobot"),
           "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    # cwd: not the repo's root, where o2o's top-level datasets/ folder would shadow Hugging Face's.
    done = subprocess.run([str(python), "-c", CHILD, str(root / "calibration")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]) | {"root": str(root)}


def test_run_from_the_source_folder_is_a_clear_error(result):
    # From the repo's root, o2o's datasets/ folder shadows Hugging Face's, which LeRobot imports.
    code = "from o2o.robot.make_robot import make_robot; make_robot({'type': 'so101_follower', 'port': '/dev/null'})"
    done = subprocess.run([str(lerobot_python()), "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ImportError: LeRobot needs Hugging Face's datasets, but o2o's own folder")
    assert "start the actor with o2o-actor, or from another folder" in done.stderr


def test_make_robot_builds_a_lerobot_robot_subclass_through_make_robot_from_config(result):
    assert result["class"] == "O2oTestArm"
    assert result["lerobot_robot"] is True
    # draccus turned the calibration_dir string into the config's Path, and LeRobot's Robot used it.
    assert result["calibration_dir"] == ["PosixPath", str(Path(result["root"]) / "calibration")]
    assert result["seed"] == 3


def test_robot_env_maps_its_features_to_the_spaces(result):
    assert result["observation_space"] == [[3], "float32"]  # three float joint features, no camera
    assert result["action_space"] == [[-90.0, -90.0, 0.0], [90.0, 30.0, 140.0]]  # the limits, in feature order


def test_actions_reach_the_sim_under_the_lerobot_robot(result):
    assert result["connected_after_reset"] == [True, True]
    assert result["sim_goals"] == pytest.approx([20.0, -10.0, 45.0], abs=1e-9)
    # Six 50 ms periods of a critically damped servo reaching 95 % in 0.1 s: there within a hundredth of a degree.
    assert result["obs"] == pytest.approx([20.0, -10.0, 45.0], abs=0.01)
    assert [result["reward"], result["terminated"], result["truncated"]] == [0.0, False, False]
    assert result["judged_states"] == 6
    assert result["clipped_action"] == [90.0, 0.0, 0.0]  # 200 clipped to the pan's limit, 90
    assert result["sim_goals_after_clip"] == pytest.approx([90.0, 0.0, 0.0], abs=1e-9)
    assert result["sim_steps"] == 7
    assert result["connected_after_close"] == [False, False]


def test_lerobot_config_builds_the_camera_configs_from_plain_dicts(result):
    assert result["so101_config"] == ["SOFollowerRobotConfig", "/dev/ttyO2O404",
                                      "OpenCVCameraConfig", 0, 640, 480, 30]


def test_lerobot_so101_maps_its_joints_and_camera_to_the_spaces(result):
    joints = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
              "gripper.pos"]
    assert result["so101"] == ["SOFollower", True, False, joints,
                               {"state": [[6], "float32"], "front": [[480, 640, 3], "uint8"]}, [6]]
    # No arm on that port: reset's connect fails with LeRobot's own message, nothing is sent.
    assert result["so101_reset"].strip().startswith("Could not connect on port '/dev/ttyO2O404'")


def test_a_lerobot_leader_arm_is_built_as_the_operators_teleoperator_with_the_followers_joints(result):
    joints = ["elbow_flex.pos", "gripper.pos", "shoulder_lift.pos", "shoulder_pan.pos", "wrist_flex.pos",
              "wrist_roll.pos"]
    assert result["leader"] == ["SOLeader", joints, False]  # the follower's action features: its goals map 1:1
    assert result["unknown_teleop"].startswith("arm.teleop=no_such_leader: no LeRobot teleoperator of that type")


def test_bad_lerobot_settings_are_clear_errors(result):
    kind, message = result["unknown_type"]
    assert kind == "ValueError" and message.startswith("robot.type=no_such_robot: no LeRobot robot of that type")
    known = message.split("known types: ")[1].split(".")[0].split(", ")
    assert {"so101_follower", "koch_follower", "o2o_test_arm"} <= set(known)
    kind, message = result["unknown_key"]
    assert [kind, message] == ["ValueError", "robot.type=o2o_test_arm: The fields `no_such_key` are not valid for "
                               "O2oTestArmConfig; O2oTestArmConfig takes: id, calibration_dir, seed"]
    kind, message = result["camera_without_fps"]
    assert [kind, message.split(";")[0]] == [
        "ValueError", "robot.type=so101_follower: Specifying 'fps' is required for the camera to be used in a robot"]
