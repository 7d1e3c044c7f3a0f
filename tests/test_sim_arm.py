"""robot/sim_arm.py: the MuJoCo arm behind LeRobot's Robot interface (the stand-in for hardware), its reach
judge, and the arm-reach task with its scripted datasets.

Expected positions are computed by hand from the arm's geometry: shoulder_lift's axis 9 cm above the floor,
upper arm 11.6 cm, forearm 13.5 cm; a positive lift or elbow angle turns its link downwards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from o2o.datasets.builders import build_dataset
from o2o.envs import make_env
from o2o.robot.seams import Robot
from o2o.robot.sim_arm import (TARGET, TARGET_POSE, DeviceAlreadyConnectedError, DeviceNotConnectedError,
                               ReachJudge, SimArm, fingertip_position, inverse_kinematics)  # fmt: skip
from user_files_guard import minari_datasets_at

JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos"]


@pytest.fixture
def arm():
    arm = SimArm()
    arm.connect()
    yield arm
    if arm.is_connected:
        arm.disconnect()


def test_features_are_lerobots_joint_positions_and_cameras():
    arm = SimArm(cameras={"front": (48, 64)})
    assert isinstance(arm, Robot)
    assert arm.action_features == dict.fromkeys(JOINTS, float)
    assert arm.observation_features == {**dict.fromkeys(JOINTS, float), "front": (48, 64, 3)}
    assert list(SimArm().observation_features) == JOINTS


def test_reads_and_writes_before_connect_or_after_disconnect_raise_like_lerobot():
    arm = SimArm()
    assert not arm.is_connected
    for call in (arm.get_observation, lambda: arm.send_action({"elbow_flex.pos": 10.0}), arm.disconnect):
        with pytest.raises(DeviceNotConnectedError):
            call()
    arm.connect()
    with pytest.raises(DeviceAlreadyConnectedError):
        arm.connect()
    assert issubclass(DeviceAlreadyConnectedError, ConnectionError)
    arm.disconnect()
    with pytest.raises(ConnectionError, match="not connected"):
        arm.get_observation()


def test_send_action_sets_servo_goals_in_degrees_and_returns_what_it_sent(arm):
    arm.place((0.0, 0.0, 0.0))
    sent = arm.send_action({"shoulder_pan.pos": 20.0, "elbow_flex.pos": 500.0})
    # elbow_flex's servo stops at 150 degrees; shoulder_lift, not given, keeps its goal.
    assert sent == {"shoulder_pan.pos": 20.0, "elbow_flex.pos": 150.0}
    np.testing.assert_allclose(arm.data.ctrl, np.radians([20.0, 0.0, 150.0]))
    for _ in range(5):  # 0.25 s: the servos settle (95 % of a step in 0.1 s)
        arm.send_action({})
    obs = arm.get_observation()
    assert obs["shoulder_pan.pos"] == pytest.approx(20.0, abs=0.1)
    assert obs["elbow_flex.pos"] == pytest.approx(150.0, abs=0.1)
    assert obs["shoulder_lift.pos"] == pytest.approx(0.0, abs=0.5)  # the elbow's swing barely stirs it
    with pytest.raises(ValueError, match="unknown action features"):
        arm.send_action({"gripper.pos": 1.0})


def test_time_passes_one_control_period_per_action(arm):
    before = arm.data.time
    arm.send_action({})
    assert arm.data.time - before == pytest.approx(0.05)
    arm.get_observation()
    assert arm.data.time - before == pytest.approx(0.05)


def test_a_pulled_cable_fails_reads_and_writes_after_the_given_steps():
    arm = SimArm(disconnect_after_steps=2)
    arm.connect()
    arm.send_action({"elbow_flex.pos": 10.0})
    arm.get_observation()
    arm.send_action({"elbow_flex.pos": 20.0})  # the second action reaches the servos ...
    with pytest.raises(ConnectionError, match="cable"):  # ... and then the cable is out
        arm.get_observation()
    with pytest.raises(ConnectionError, match="cable"):
        arm.send_action({"elbow_flex.pos": 10.0})
    arm.disconnect()  # the port is released all the same
    assert not arm.is_connected


def test_forward_and_inverse_kinematics_match_the_model(arm):
    # Straight out: the fingertip 11.6 + 13.5 cm in front of the shoulder, at its height.
    arm.place((0.0, 0.0, 0.0))
    np.testing.assert_allclose(arm.data.site("fingertip").xpos, [0.251, 0.0, 0.09], atol=1e-6)
    # Panned 90 degrees, upper arm straight up, forearm level: x 0, y 13.5 cm, z 9 + 11.6 cm.
    arm.place((90.0, -90.0, 90.0))
    np.testing.assert_allclose(arm.data.site("fingertip").xpos, [0.0, 0.135, 0.206], atol=1e-6)
    for pose in [(0.0, 0.0, 0.0), (90.0, -90.0, 90.0), (-40.0, 10.0, 60.0)]:
        arm.place(pose)
        np.testing.assert_allclose(fingertip_position(pose), arm.data.site("fingertip").xpos, atol=1e-6)
    np.testing.assert_allclose(inverse_kinematics(TARGET), TARGET_POSE, atol=1e-6)
    np.testing.assert_allclose(arm.target_pose(), TARGET_POSE, atol=1e-6)
    np.testing.assert_allclose(inverse_kinematics(fingertip_position((-40, 10, 60))), (-40, 10, 60), atol=1e-6)
    with pytest.raises(ValueError, match="out of the arm's reach"):
        inverse_kinematics((0.5, 0.0, 0.09))


def test_reach_judge_succeeds_on_the_target_only(arm):
    judge = ReachJudge(arm, tolerance=0.02)
    state = np.zeros(3, np.float32)
    arm.place(TARGET_POSE)
    assert arm.fingertip_distance() < 1e-5
    verdict = judge.judge(state, {})
    assert (verdict.reward, verdict.success, verdict.terminated, verdict.truncated) == (1.0, True, True, False)
    # 5 degrees of pan at the target's 16.8 cm radius move the tip 1.5 cm: still within 2 cm.
    arm.place((35.0, -30.0, 90.0))
    assert arm.fingertip_distance() == pytest.approx(2 * 0.1680 * math.sin(math.radians(2.5)), abs=1e-3)
    assert judge.judge(state, {}).success
    arm.place((45.0, -30.0, 90.0))  # 4.4 cm off
    assert judge.judge(state, {}) == type(verdict)()  # reward 0, not terminated
    arm.place((0.0, 0.0, 0.0))
    assert not judge.judge(state, {}).success


def test_cameras_render_and_their_faults(gl):
    arm = SimArm(cameras={"front": (48, 64)})
    arm.connect()
    try:
        first = arm.get_observation()["front"]
        again = arm.get_observation()["front"]
        assert first.dtype == np.uint8 and first.shape == (48, 64, 3)
        assert not np.array_equal(first, again)  # sensor noise: a working camera never repeats a frame
        assert np.abs(first.astype(int) - again).max() <= 4  # ... and only the noise differs
    finally:
        arm.disconnect()
    stale = SimArm(cameras={"front": (48, 64)}, camera_fault="stale")
    stale.connect()
    frames = []
    for pose in [(0.0, 0.0, 0.0), (30.0, -30.0, 90.0)]:
        stale.place(pose)
        frames.append(stale.get_observation()["front"])
    np.testing.assert_array_equal(frames[0], frames[1])  # the arm moved, the image did not
    stale.disconnect()
    missing = SimArm(cameras={"front": (48, 64)}, camera_fault="missing")
    missing.connect()
    assert set(missing.get_observation()) == set(JOINTS)
    missing.disconnect()


def test_arm_reach_task_starts_from_seeded_random_poses_and_the_expert_reaches():
    env = make_env("arm-reach")
    try:
        assert env.observation_space.shape == (3,) and env.action_space.shape == (3,)
        starts = [env.reset(seed=s)[0] for s in (0, 1, 0)]
        np.testing.assert_array_equal(starts[0], starts[2])
        assert np.abs(starts[0] - starts[1]).max() > 1.0
        obs, steps = starts[2], 0
        goal = np.asarray(TARGET_POSE, np.float32)
        while True:  # the goal pose at once: the servos bring the tip there within a few periods
            obs, reward, terminated, truncated, info = env.step(goal)
            steps += 1
            if terminated or truncated:
                break
        assert (reward, terminated, info["success"]) == (1.0, True, True) and steps <= 6
        np.testing.assert_array_equal(info["action"], goal)
    finally:
        env.close()


def test_arm_reach_datasets_build_with_the_expected_quality(tmp_path):
    with minari_datasets_at(tmp_path):
        _, expert = build_dataset("arm-reach", "expert", 20, seed=0, progress=False)
        _, mixed = build_dataset("arm-reach", "mixed", 40, seed=0, progress=False)
    assert expert["success_rate"] == 1.0 and expert["mean_return"] == 1.0
    assert 0.4 < mixed["success_rate"] < 1.0  # the random quarter of the episodes rarely reaches
