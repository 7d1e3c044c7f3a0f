"""robot/robot_env.py: RobotEnv drives a LeRobot-interface robot (here the MuJoCo SimArm) as a gymnasium env.

What the arm did is read back from the simulator (its servo goals ``data.ctrl``, its joint angles), never
from RobotEnv's own bookkeeping.
"""

from __future__ import annotations

import types

import gymnasium as gym
import numpy as np
import pytest

from o2o.envs.obs_spec import ObservationError
from o2o.robot.robot_env import RobotEnv
from o2o.robot.safety import SafetyFilter
from o2o.robot.seams import EStopped, RobotDisconnected, Verdict
from o2o.robot.sim_arm import TARGET_POSE, ReachJudge, SimArm

JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos"]
LIMITS = {"shoulder_pan.pos": (-90.0, 90.0), "shoulder_lift.pos": (-60.0, 40.0), "elbow_flex.pos": (0.0, 140.0)}


class NoJudge:
    def begin_episode(self) -> None:
        pass

    def judge(self, state, images) -> Verdict:
        return Verdict()


class RecordingArm(SimArm):
    """A SimArm that keeps every action it was sent."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sent: list[dict] = []

    def send_action(self, action: dict) -> dict:
        self.sent.append(dict(action))
        return super().send_action(action)


class Start:
    """A resetter that puts the arm at rest at a fixed pose."""

    waiting_for = None

    def __init__(self, arm: SimArm, pose):
        self.arm, self.pose = arm, pose

    def reset(self, env) -> None:
        self.arm.place(self.pose)


def servo_goals(arm: SimArm) -> np.ndarray:
    return np.degrees(arm.data.ctrl).astype(np.float32)


def joints(arm: SimArm) -> np.ndarray:
    return np.degrees(arm.data.qpos).astype(np.float32)


def make(arm=None, limits=LIMITS, start=(0.0, 0.0, 60.0), **kwargs) -> RobotEnv:
    arm = arm or SimArm()
    return RobotEnv(arm, limits, judge=kwargs.pop("judge", NoJudge()), resetter=Start(arm, start), **kwargs)


def test_spaces_come_from_the_features_and_the_limits():
    env = make()
    assert env.action_space == gym.spaces.Box(np.array([-90, -60, 0], np.float32), np.array([90, 40, 140], np.float32))
    assert env.observation_space == gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    cam = make(SimArm(cameras={"front": (24, 32)}))
    assert set(cam.observation_space.spaces) == {"state", "front"}
    assert cam.observation_space["front"] == gym.spaces.Box(0, 255, (24, 32, 3), np.uint8)
    assert cam.observation_space["state"].shape == (3,)


@pytest.mark.parametrize("limits, message", [
    ({k: v for k, v in LIMITS.items() if k != "elbow_flex.pos"}, r"no limits for action features \['elbow_flex.pos'\]"),
    ({**LIMITS, "gripper.pos": (0, 1)}, r"limits for unknown features \['gripper.pos'\]"),
    ({**LIMITS, "shoulder_lift.pos": (10.0, 10.0)}, r"limits\['shoulder_lift.pos'\] = \(10.0, 10.0\): need finite low <"),
    ({**LIMITS, "shoulder_pan.pos": (5.0, -5.0)}, r"limits\['shoulder_pan.pos'\]"),
    ({**LIMITS, "shoulder_pan.pos": 5.0}, r"limits\['shoulder_pan.pos'\] must be \(low, high\)"),
])  # fmt: skip
def test_bad_limits_are_refused_naming_the_feature(limits, message):
    with pytest.raises(ValueError, match=message):
        make(limits=limits)


def test_reset_connects_runs_the_resetter_and_returns_the_measured_joints():
    arm = SimArm()
    env = make(arm, start=(10.0, -20.0, 30.0))
    obs, info = env.reset(seed=0)
    assert arm.is_connected and info == {}
    np.testing.assert_allclose(obs, [10.0, -20.0, 30.0], atol=1e-4)
    np.testing.assert_allclose(env.last_sent, obs)
    env.reset()  # connected already: no second connect (that would raise)
    env.close()


def test_the_action_reported_is_the_one_the_servos_got():
    arm = SimArm()
    env = make(arm)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([20.0, -10.0, 90.0], np.float32))
    np.testing.assert_array_equal(info["action"], servo_goals(arm))
    np.testing.assert_array_equal(info["action"], [20.0, -10.0, 90.0])
    assert info["action"].dtype == np.float32 and info["intervention"] is False and info["success"] is False
    # Out of the limits: clipped to them (no safety filter: the limits alone).
    obs, *_, info = env.step(np.array([500.0, -500.0, 139.0], np.float32))
    np.testing.assert_array_equal(info["action"], [90.0, -60.0, 139.0])
    np.testing.assert_array_equal(servo_goals(arm), info["action"])
    # A NaN holds that joint at its last goal.
    obs, *_, info = env.step(np.array([0.0, np.nan, 100.0], np.float32))
    np.testing.assert_array_equal(info["action"], [0.0, -60.0, 100.0])
    assert env.counters["non_finite"] == 1
    env.close()


def test_the_robot_s_own_clipping_is_what_is_reported():
    # Limits wider than the servo's range (elbow_flex stops at 150 degrees): send_action says what it sent.
    arm = SimArm()
    env = make(arm, limits={**LIMITS, "elbow_flex.pos": (0.0, 170.0)})
    env.reset()
    *_, info = env.step(np.array([0.0, 0.0, 165.0], np.float32))
    np.testing.assert_array_equal(info["action"], [0.0, 0.0, 150.0])
    np.testing.assert_array_equal(servo_goals(arm), info["action"])
    env.close()


def test_the_safety_filter_runs_before_send_action():
    arm = SimArm()
    safety = SafetyFilter([-90, -60, 0], [90, 40, 140], max_step=5.0)
    env = make(arm, safety=safety)
    env.reset()  # at rest at (0, 0, 60)
    *_, info = env.step(np.array([50.0, -50.0, 60.0], np.float32))
    np.testing.assert_allclose(info["action"], [5.0, -5.0, 60.0], atol=1e-4)
    np.testing.assert_array_equal(servo_goals(arm), info["action"])
    assert safety.rate_limited == 1
    env.close()


def test_hold_stops_the_arm_where_it_is():
    arm = SimArm()
    env = make(arm)
    env.reset()
    env.step(np.array([0.0, 0.0, 140.0], np.float32))  # a big move: the elbow is on its way, 80 degrees to go
    moving = joints(arm)[2]
    assert 60.0 + 10 < moving < 120.0
    env.hold()
    held = env.last_sent.copy()
    assert held[2] == pytest.approx(moving, abs=1e-3)  # the goal is where the elbow was measured
    for _ in range(4):  # four more periods with the held goal
        arm.send_action(dict(zip(JOINTS, map(float, held))))
    np.testing.assert_allclose(joints(arm), held, atol=0.1)  # still there, not at 140
    np.testing.assert_allclose(servo_goals(arm), held, atol=1e-4)
    env.close()


def test_move_to_changes_each_goal_by_at_most_max_step():
    arm = RecordingArm()
    env = make(arm)
    env.reset()  # at rest at (0, 0, 60)
    arm.sent.clear()
    reached = env.move_to({"shoulder_pan.pos": 25.0, "shoulder_lift.pos": -12.0, "elbow_flex.pos": 60.0}, max_step=4.0)
    goals = np.array([[a[k] for k in JOINTS] for a in arm.sent])
    assert len(goals) == 7  # 25 degrees in steps of 4
    steps = np.abs(np.diff(np.vstack([[0.0, 0.0, 60.0], goals]), axis=0))
    assert steps.max() <= 4.0 + 1e-4
    np.testing.assert_allclose(goals[-1], [25.0, -12.0, 60.0], atol=1e-4)
    np.testing.assert_allclose(reached, [25.0, -12.0, 60.0], atol=2.0)  # one period after the last goal
    with pytest.raises(ValueError, match="outside the limits"):
        env.move_to([0.0, 0.0, 145.0], max_step=4.0)
    with pytest.raises(ValueError, match="missing"):
        env.move_to({"shoulder_pan.pos": 0.0}, max_step=4.0)
    env.close()


def test_a_robot_that_stops_answering_is_a_robot_disconnected_and_close_still_disconnects():
    arm = SimArm(disconnect_after_steps=2)
    env = make(arm)
    env.reset()
    env.step(np.array([0.0, 0.0, 70.0], np.float32))
    with pytest.raises(RobotDisconnected, match="cable was pulled"):
        env.step(np.array([0.0, 0.0, 80.0], np.float32))
    env.close()  # the hold fails (logged), the disconnect happens
    assert not arm.is_connected
    env.close()  # twice: nothing


def test_close_holds_then_disconnects():
    arm = RecordingArm()
    env = make(arm)
    env.reset()
    env.step(np.array([0.0, 0.0, 140.0], np.float32))
    measured = joints(arm)
    env.close()
    assert not arm.is_connected
    np.testing.assert_allclose([arm.sent[-1][k] for k in JOINTS], measured, atol=1e-4)


def test_estop_holds_once_and_sends_nothing_more():
    arm = RecordingArm()
    operator = types.SimpleNamespace(estopped=False, takeover=False)
    env = make(arm, operator=operator)
    env.reset()
    env.step(np.array([0.0, 0.0, 140.0], np.float32))
    operator.estopped = True
    assert env.waiting_for == "the operator to release the e-stop"
    sends = len(arm.sent)
    for _ in range(3):
        with pytest.raises(EStopped):
            env.step(np.array([0.0, 0.0, 140.0], np.float32))
    assert len(arm.sent) == sends + 1  # the one hold
    assert arm.sent[-1]["elbow_flex.pos"] < 130.0
    operator.estopped = False
    assert env.waiting_for is None
    *_, info = env.step(np.array([0.0, 0.0, 100.0], np.float32))
    np.testing.assert_array_equal(info["action"], [0.0, 0.0, 100.0])
    env.close()


def test_takeover_sends_the_teleoperators_action_and_flags_it():
    arm = SimArm()
    operator = types.SimpleNamespace(estopped=False, takeover=True)
    teleop = types.SimpleNamespace(get_action=lambda: {"shoulder_pan.pos": 10.0, "shoulder_lift.pos": -5.0,
                                                       "elbow_flex.pos": 70.0})  # fmt: skip
    env = make(arm, operator=operator, teleop=teleop)
    env.reset()
    *_, info = env.step(np.array([80.0, 30.0, 130.0], np.float32))
    assert info["intervention"] is True
    np.testing.assert_array_equal(info["action"], [10.0, -5.0, 70.0])
    np.testing.assert_array_equal(servo_goals(arm), info["action"])
    operator.takeover = False
    *_, info = env.step(np.array([80.0, 30.0, 130.0], np.float32))
    assert info["intervention"] is False
    teleop.get_action = lambda: {"shoulder_pan.pos": 10.0}
    operator.takeover = True
    with pytest.raises(ValueError, match=r"teleoperator's action lacks \['shoulder_lift.pos', 'elbow_flex.pos'\]"):
        env.step(np.zeros(3, np.float32))
    env.close()


def test_reach_judge_through_the_env():
    arm = SimArm()
    env = make(arm, judge=ReachJudge(arm, 0.02))
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.0, 60.0], np.float32))
    assert (reward, terminated, info["success"]) == (0.0, False, False)
    env.move_to(TARGET_POSE, max_step=100.0)  # lands on the target: the next step's verdict
    obs, reward, terminated, truncated, info = env.step(np.array(TARGET_POSE, np.float32))
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    env.close()


def test_a_missing_camera_is_an_observation_error_naming_it(gl):
    env = make(SimArm(cameras={"front": (24, 32)}, camera_fault="missing"))
    with pytest.raises(ObservationError, match="camera 'front' returned no frame"):
        env.reset()
    env.close()


def test_stale_frames_are_counted_and_too_many_in_a_row_raise(gl):
    good = make(SimArm(cameras={"front": (24, 32)}), max_stale_frames=3)
    obs, _ = good.reset()
    assert obs["front"].shape == (24, 32, 3)
    for _ in range(5):
        good.step(np.array([0.0, 0.0, 60.0], np.float32))  # the arm at rest: only the sensor noise changes
    assert good.counters["stale_frames"] == 0
    good.close()
    env = make(SimArm(cameras={"front": (24, 32)}, camera_fault="stale"), max_stale_frames=3)
    env.reset()
    for n in (1, 2):
        env.step(np.array([0.0, 0.0, 60.0 + 10 * n], np.float32))
        assert env.counters["stale_frames"] == n
    with pytest.raises(ObservationError, match="camera 'front' returned the same frame for 3 steps"):
        env.step(np.array([0.0, 0.0, 90.0], np.float32))
    env.close()


def test_a_camera_resized_to_image_size_takes_the_source_pixel_at_each_output_pixels_centre():
    from o2o.robot.robot_env import Resizer

    source = np.arange(6 * 8 * 3, dtype=np.int64).reshape(6, 8, 3).astype(np.uint8)
    out = Resizer((6, 8), (3, 2))(source)
    # Output row i covers source rows [2i, 2i+2): its centre 2i+1; column j covers [4j, 4j+4): centre 4j+2.
    expected = source[[1, 3, 5]][:, [2, 6]]
    assert out.shape == (3, 2, 3) and np.array_equal(out, expected)
    with pytest.raises(ValueError, match="image_size"):
        Resizer((6, 8), (0, 2))
