"""Resets (robot/reset.py) and the keys judge in an episode, on RobotEnv(SimArm): the MuJoCo arm stands in
for the hardware; the operator's keys come through a real pipe (tests/test_operator.py's ``PipeKeys``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_operator import PipeKeys, wait_until

from o2o.robot.keys_judge import KeysJudge
from o2o.robot.operator import KeyboardTeleop
from o2o.robot.reset import (HOME_WAIT, RELEASE_WAIT, RESET_WAIT, HomeReset, HomeThenOperator, OperatorReset,
                             ResetFailed, ResetInterrupted)  # fmt: skip
from o2o.robot.robot_env import RobotEnv
from o2o.robot.sim_arm import SimArm, arm_limits

HOME = {"shoulder_pan.pos": 20.0, "shoulder_lift.pos": -30.0, "elbow_flex.pos": 60.0}


@pytest.fixture
def keys():
    k = PipeKeys()
    yield k
    k.close()


def make_env(resetter, operator=None, limits=None) -> tuple[RobotEnv, SimArm]:
    arm = SimArm()
    judge = KeysJudge(operator) if operator is not None else _NoJudge()
    env = RobotEnv(arm, limits or arm_limits(), judge=judge, resetter=resetter, operator=operator)
    return env, arm


class _NoJudge:
    def begin_episode(self) -> None:
        pass

    def judge(self, state, images):
        raise AssertionError("no step in this test")


def counting(env: RobotEnv, name: str, seen: list):
    """Wrap ``env.<name>`` to record the resetter's ``waiting_for`` at each call."""
    original = getattr(env, name)

    def call(*args):
        seen.append(env.waiting_for)
        return original(*args)

    setattr(env, name, call)


def in_thread(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_home_reset_drives_the_arm_home_rate_limited():
    reset = HomeReset(HOME, max_step=5.0, tolerance=1.0)
    env, arm = make_env(reset)
    moves: list = []
    counting(env, "move_to", moves)
    env.reset()
    at = env.joint_positions()
    assert np.all(np.abs(at - np.array([20.0, -30.0, 60.0])) <= 1.0), at
    # From rest at 0 deg: the elbow's 60 deg at 5 deg a step is at least 12 steps; one move per try.
    assert arm.steps >= 12
    assert moves and set(moves) == {HOME_WAIT} and reset.waiting_for is None
    env.close()


def test_home_out_of_reach_names_the_joint_and_distance():
    limits = {**arm_limits(), "shoulder_lift.pos": (-100.0, 90.0)}  # wider than the servo's own 60 deg
    reset = HomeReset({**HOME, "shoulder_lift.pos": 80.0}, max_step=10.0, tolerance=1.0, tries=2)
    env, _ = make_env(reset, limits=limits)
    with pytest.raises(ResetFailed) as err:
        env.reset()
    message = str(err.value)
    assert "within 1 after 2 tries: shoulder_lift.pos at 60" in message  # the servo stops at 60: 20 away
    assert " is 20" in message and " from 80" in message
    assert "elbow_flex" not in message and "shoulder_pan" not in message  # those got home
    assert reset.waiting_for is None
    env.close()


def test_operator_reset_holds_the_arm_until_g(keys):
    reset = OperatorReset(keys.operator)
    env, arm = make_env(reset, keys.operator)
    holds: list = []
    counting(env, "hold", holds)
    thread, outcome = in_thread(env.reset)
    wait_until(lambda: len(holds) >= 3, "the reset to hold the arm")
    assert env.waiting_for == RESET_WAIT == "the operator's reset key (g)"
    start = env.joint_positions()
    keys.press("s")  # a verdict key during the reset: dropped
    time.sleep(0.2)
    assert thread.is_alive()
    np.testing.assert_allclose(env.joint_positions(), start, atol=1e-3)  # held still
    keys.press("g")
    thread.join(5)
    assert not thread.is_alive() and not isinstance(outcome[0], BaseException), outcome
    assert reset.waiting_for is None and env.waiting_for is None
    assert set(holds) == {RESET_WAIT}
    # The s pressed during the reset never reaches the episode.
    obs, reward, terminated, truncated, info = env.step(env.joint_positions())
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    assert keys.operator.counters["ignored"] == 1
    keys.press("ss")  # the episode's verdict, pressed twice
    obs, reward, terminated, truncated, info = env.step(env.joint_positions())
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert keys.operator.counters["repeated"] == 1
    # The next reset: a verdict key is "no episode is running" at once, not a repeat of the last verdict.
    thread, outcome = in_thread(env.reset)
    wait_until(lambda: env.waiting_for == RESET_WAIT, "the second reset")
    keys.press("f")
    assert keys.operator.counters["ignored"] == 2 and keys.operator.counters["repeated"] == 1
    assert keys.out.getvalue().count("'f' ignored: no episode is running") == 1
    keys.press("g")
    thread.join(5)
    obs, reward, terminated, truncated, info = env.step(env.joint_positions())
    assert (reward, terminated, truncated) == (0.0, False, False)
    env.close()


def test_a_reset_never_moves_an_estopped_arm(keys):
    reset = HomeReset(HOME, max_step=5.0, tolerance=1.0)
    env, arm = make_env(reset, keys.operator)
    keys.press(" ")
    thread, outcome = in_thread(env.reset)
    wait_until(lambda: env.waiting_for is not None, "the reset to wait")
    time.sleep(0.2)
    assert reset.waiting_for == RELEASE_WAIT
    np.testing.assert_allclose(env.joint_positions(), [0.0, 0.0, 0.0], atol=1e-3)  # held where it was
    keys.press("g")  # the release; then the home script runs
    thread.join(10)
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert np.all(np.abs(env.joint_positions() - np.array([20.0, -30.0, 60.0])) <= 1.0)
    env.close()


def test_stop_request_ends_the_wait_with_reset_interrupted(keys):
    reset = HomeThenOperator(HOME, max_step=10.0, tolerance=1.0, operator=keys.operator)
    env, _ = make_env(reset, keys.operator)
    waits: list = []
    counting(env, "move_to", waits)
    thread, outcome = in_thread(env.reset)
    wait_until(lambda: reset.waiting_for == RESET_WAIT, "the home move, then the operator's key")
    assert waits and set(waits) == {HOME_WAIT}
    reset.request_stop()  # the actor's SIGTERM, through the env
    thread.join(5)
    assert isinstance(outcome[0], ResetInterrupted)  # the actor loop then sees its stop (not an e-stop)
    assert "stop requested while waiting for the operator's reset key (g)" in str(outcome[0])
    assert reset.waiting_for is None
    env.close()


def test_keyboard_takeover_drives_the_arm_instead_of_the_policy(keys):
    arm = SimArm()
    env = RobotEnv(arm, arm_limits(), judge=KeysJudge(keys.operator), operator=keys.operator)
    env.teleop = KeyboardTeleop(env.action_names, env.joint_positions, step=5.0, operator=keys.operator)
    env.reset()
    arm.place([10.0, -20.0, 30.0])
    policy = np.array([90.0, 50.0, 140.0], np.float32)  # far away: must not be sent during the takeover
    keys.press("h33q")  # elbow +10, pan -5
    _, _, _, _, info = env.step(policy)
    assert info["intervention"] is True
    np.testing.assert_allclose(info["action"], [5.0, -20.0, 40.0], atol=1e-3)
    keys.press("h")  # the policy drives again
    _, _, _, _, info = env.step(np.array([12.0, -20.0, 40.0], np.float32))
    assert info["intervention"] is False
    np.testing.assert_allclose(info["action"], [12.0, -20.0, 40.0], atol=1e-3)
    env.close()


def test_home_reset_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_step"):
        HomeReset(HOME, max_step=0.0, tolerance=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        HomeReset(HOME, max_step=1.0, tolerance=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        HomeReset({}, max_step=1.0, tolerance=1.0)
