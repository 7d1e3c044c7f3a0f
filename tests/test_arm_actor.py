"""A robot actor as a user runs it: ``o2o-actor task=arm-reach robot.type=...`` in its own process, acting on
the MuJoCo arm that stands in for hardware (tests/arm_journal.py writes every call that reaches the "servos").

Guards issue 21's safety part: a policy that outputs garbage (NaN, out of bounds, oscillating) never reaches
the arm as such; every exit path (done, SIGTERM, a robot fault, the learner lost) leaves the arm held and
disconnected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from o2o.datasets.policy_format import FORMAT_VERSION
from o2o.robot.sim_arm import JOINT_RANGES, JOINTS

TESTS = Path(__file__).parent
LOW = np.array([JOINT_RANGES[j][0] for j in JOINTS])
HIGH = np.array([JOINT_RANGES[j][1] for j in JOINTS])
MAX_STEP = 5.0
HOME = "{shoulder_pan:10,shoulder_lift:-20,elbow_flex:90}"
HOME_POSE = [10.0, -20.0, 90.0]
TARGET_POSE = [30.0, -30.0, 90.0]  # SimArm().target_pose(): the fingertip on arm-reach's target


def garbage_policy(kind: str, task: str = "arm-reach") -> bytes:
    """An arm-reach policy (3 joint readings in, 3 joint goals out) that outputs garbage:
    "nan" NaN goals; "out" goals far outside every joint's range; "oscillate" -1000 x the reading
    (bang-bang around 0: the goal flips from far above to far below the range as a joint crosses 0)."""
    inputs = [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 3]),
              helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 3])]  # fmt: skip
    value = {"nan": [float("nan")] * 3, "out": [1000.0, -1000.0, 1000.0], "oscillate": [0.0] * 3,
             "reach": TARGET_POSE, "stay": HOME_POSE}[kind]  # the last two are good policies: to the target, at home
    gain = -1000.0 if kind == "oscillate" else 0.0
    nodes = [helper.make_node("Mul", ["obs", "gain"], ["scaled"]),
             helper.make_node("Mul", ["noise", "zero"], ["noise0"]),
             helper.make_node("Add", ["scaled", "noise0"], ["moved"]),
             helper.make_node("Add", ["moved", "value"], ["action"])]  # fmt: skip
    constants = [helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
                 helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                 helper.make_tensor("value", TensorProto.FLOAT, [3], value)]  # fmt: skip
    graph = helper.make_graph(nodes, f"{kind}_policy", inputs,
                              [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", 3])],
                              initializer=constants)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {
        "o2o_format_version": FORMAT_VERSION, "task": task, "obs_dim": "3", "action_dim": "3",
        "action_low": json.dumps(LOW.tolist()), "action_high": json.dumps(HIGH.tolist()), "policy_version": "0",
        "training_step": "0", "input_names": json.dumps(["obs", "noise"]), "output_names": json.dumps(["action"]),
        "noise": "standard_normal", "cameras": "{}"})  # fmt: skip
    onnx.checker.check_model(model)
    return model.SerializeToString()


def actor_command(tmp_path: Path, policy: str, *args: str, robot_options: str = "", learner: str = "null") -> list[str]:
    (tmp_path / "policy.onnx").write_bytes(garbage_policy(policy))
    return [sys.executable, "-m", "o2o.actor.main", "task=arm-reach", "actor_id=arm-1", f"learner={learner}",
            f"policy.path={tmp_path / 'policy.onnx'}", "robot.type=arm_journal:JournalArm",
            f"robot.options={{journal:{tmp_path / 'journal.jsonl'}{robot_options}}}", "arm.reset=home", f"arm.home={HOME}",
            f"arm.max_step={MAX_STEP}", "arm.teleop=none", f"stats_file={tmp_path / 'stats.json'}", *args]  # fmt: skip


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run_actor(tmp_path: Path, policy: str, *args: str, robot_options: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(actor_command(tmp_path, policy, *args, robot_options=robot_options), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL)  # fmt: skip


def journal(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]


def is_hold(entry: dict) -> bool:
    """A send whose goals are where the arm is: keeping it still."""
    return entry["op"] == "send" and np.allclose(entry["action"], entry["measured"], atol=1e-3)


def assert_left_held_and_disconnected(entries: list[dict]) -> None:
    assert entries[-1]["op"] == "disconnect", entries[-3:]
    assert is_hold(entries[-2]), f"the last thing sent before disconnecting must hold the arm: {entries[-3:]}"


def assert_every_goal_safe(entries: list[dict]) -> list[np.ndarray]:
    """Every goal sent lies within the joints' ranges, is finite, and (apart from holds, which go to where the arm
    already is) moves at most MAX_STEP from the goal before it or from where the arm is. Returns the goals."""
    goals, previous = [], None
    for entry in entries:
        if entry["op"] != "send":
            previous = None if entry["op"] == "connect" else previous
            continue
        goal = np.array(entry["action"])
        assert np.isfinite(goal).all(), entry
        assert (goal >= LOW - 1e-4).all() and (goal <= HIGH + 1e-4).all(), entry
        if previous is not None and not is_hold(entry):
            # From the last goal, or (the first step after a reset, as LeRobot's max_relative_target) from where
            # the arm is.
            from_goal = np.abs(goal - previous).max()
            from_arm = np.abs(goal - np.array(entry["measured"])).max()
            assert min(from_goal, from_arm) <= MAX_STEP + 1e-3, (previous, entry)
        goals.append(goal)
        previous = goal
    return goals


def test_a_policy_outside_every_bound_is_clipped_and_rate_limited_and_the_arm_left_held(tmp_path):
    done = run_actor(tmp_path, "out", "max_steps=30")
    assert done.returncode == 0, done.stderr
    entries = journal(tmp_path)
    assert_every_goal_safe(entries)
    sends = [e for e in entries if e["op"] == "send"]
    acted = np.array([e["action"] for e in sends[-31:-1]])  # the 30 steps (before: the home move; after: the hold)
    # From home (10, -20, 90, within 2 degrees) the policy's +1000/-1000/+1000 drive each joint to that end of its
    # range 5 degrees a step: 20, 16 and 12 steps, so by step 30 the goals sit on the ends, and never beyond.
    start = np.array(sends[-31]["measured"])
    assert np.allclose(acted[0], start + [MAX_STEP, -MAX_STEP, MAX_STEP], atol=1e-3)
    assert np.allclose(acted[-1], [HIGH[0], LOW[1], HIGH[2]])
    assert np.allclose(np.diff(acted[:20, 0]), MAX_STEP, atol=0.5)  # climbing at the rate limit, not jumping
    assert_left_held_and_disconnected(entries)
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["steps"] == 30


def test_an_oscillating_policy_moves_the_arm_at_most_max_step_a_step(tmp_path):
    done = run_actor(tmp_path, "oscillate", "max_steps=40")
    assert done.returncode == 0, done.stderr
    entries = journal(tmp_path)
    goals = np.array(assert_every_goal_safe(entries))
    steps = np.diff(goals, axis=0)
    assert (np.sign(steps[:, 0]) > 0).any() and (np.sign(steps[:, 0]) < 0).any(), "the policy did not oscillate"
    assert_left_held_and_disconnected(entries)


def test_a_nan_policy_stops_the_actor_safely_without_sending_it(tmp_path):
    done = run_actor(tmp_path, "nan", "max_steps=30")
    assert done.returncode == 3, done.stderr
    assert "non-finite action" in done.stdout + done.stderr
    entries = journal(tmp_path)
    assert_every_goal_safe(entries)
    assert_left_held_and_disconnected(entries)


def test_sigterm_while_acting_leaves_the_arm_held_and_disconnected(tmp_path):
    process = subprocess.Popen(actor_command(tmp_path, "oscillate", "control_hz=20"), cwd=tmp_path, env=child_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            path = tmp_path / "journal.jsonl"
            if path.exists() and path.read_text().count('"send"') > 40:  # past the home move, acting
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    entries = journal(tmp_path)
    assert_every_goal_safe(entries)
    assert_left_held_and_disconnected(entries)


def test_a_robot_that_stops_answering_mid_episode_stops_the_actor_with_a_clear_message(tmp_path):
    done = run_actor(tmp_path, "oscillate", robot_options=",disconnect_after_steps:60")
    assert done.returncode == 3, done.stderr
    said = done.stdout + done.stderr
    assert "robot disconnected mid-episode" in said and "check its cable" in said
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["abandoned_episodes"] == 1
    assert journal(tmp_path)[-1]["op"] == "disconnect"  # released although it no longer answers


def test_the_rows_carry_what_the_arm_did_and_the_operators_takeover_is_flagged(tmp_path):
    """In process (a real RobotEnv on the sim arm, the operator's keys through a real pipe): the stored action is
    the one sent after the safety filter, never the policy's; the steps the operator acted are interventions."""
    from o2o.actor.config import ActorConfig
    from o2o.actor.loop import Actor
    from o2o.actor.onnx_policy import OnnxPolicy, PolicyExpectation
    from o2o.actor.seams import FixedPolicySource, MemorySink
    from o2o.robot.config import ArmConfig, RobotSettings
    from o2o.robot.assemble import make_arm_env

    read, write = os.pipe()  # the operator's "terminal"
    arm = ArmConfig(reset="home", home={"shoulder_pan": 10, "shoulder_lift": -20, "elbow_flex": 90}, max_step=MAX_STEP,
                    teleop="keyboard")  # fmt: skip
    env = make_arm_env("arm-reach", RobotSettings(type="arm_journal:JournalArm",
                                                  options={"journal": str(tmp_path / "journal.jsonl")}), arm,
                       max_episode_steps=1000, operator_fd=read)  # fmt: skip
    policy = OnnxPolicy(garbage_policy("out"), PolicyExpectation("arm-reach", 3, 3))
    sink = MemorySink(keep=True)
    cfg = ActorConfig(task="arm-reach", actor_id="arm-1", chunk_rows=1000)
    actor = Actor(env, sink, FixedPolicySource(policy), cfg)
    try:
        actor.run(max_steps=5)
        os.write(write, b"h")  # takeover: the keyboard's joint keys now act
        time.sleep(0.3)
        os.write(write, b"1")  # shoulder_pan's goal +MAX_STEP (the keyboard teleop's step)
        time.sleep(0.3)
        actor.run(max_steps=5)
    finally:
        env.close()
        os.close(write)
    chunk_actions = np.concatenate([c.action for c in sink.chunks])
    sent = [e for e in journal(tmp_path) if e["op"] == "send"]
    policy_steps = chunk_actions[:5]
    assert (np.abs(policy_steps) < 1000).all()  # never the policy's +-1000
    assert np.allclose(policy_steps, [e["action"] for e in sent[-11:-6]], atol=1e-4)  # exactly what reached the arm
    flags = np.concatenate([c.intervention if c.intervention is not None else np.zeros(c.n, np.uint8)
                            for c in sink.chunks])  # fmt: skip
    assert flags.tolist() == [0] * 5 + [1] * 5
    assert actor.stats.interventions == 5


def count_sends(tmp_path: Path) -> int:
    path = tmp_path / "journal.jsonl"
    return path.read_text().count('"send"') if path.exists() else 0


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_arm_holds_while_the_learner_is_silent_and_acts_again_when_it_comes_back(tmp_path):
    """A real ingest server on loopback, the actor in its own process with arm.learner_silent_s=1: the learner
    stops, the arm holds (nothing more is sent after the hold) mid-episode; a learner on the same endpoint
    answers again, the arm acts again; SIGTERM leaves it held and disconnected."""
    from o2o.datasets.replay_store import ReplayStore
    from o2o.transport.ingest import IngestServer

    server = IngestServer(ReplayStore.create_for_task(tmp_path / "store-a", "arm-reach")).start()
    command = actor_command(tmp_path, "oscillate", "control_hz=20", "chunk_rows=5", "arm.learner_silent_s=1",
                            "link.on_learner_lost=continue", "max_episode_steps=100000", learner=server.endpoint)  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    back = None
    try:
        wait_until(lambda: count_sends(tmp_path) > 60, "the arm to act")
        server.stop()
        time.sleep(2.5)  # 1 s of silence, then the hold
        held_at = count_sends(tmp_path)
        time.sleep(1.5)
        assert count_sends(tmp_path) == held_at, "the arm kept moving with the learner gone"
        assert is_hold(journal(tmp_path)[-1]), journal(tmp_path)[-3:]
        back = IngestServer(ReplayStore.create_for_task(tmp_path / "store-b", "arm-reach"), server.endpoint).start()
        wait_until(lambda: count_sends(tmp_path) > held_at + 20, "the arm to act again")
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        if back is not None:
            back.stop()
    assert process.returncode == 0, out
    assert "holding the arm: the learner has been silent" in out and "acting again" in out
    assert_left_held_and_disconnected(journal(tmp_path))


@pytest.fixture(scope="module")
def reach_classifier(tmp_path_factory) -> Path:
    """A success classifier trained by `o2o-classifier train` on arm-reach's scripted dataset (real Minari data,
    real torch training, ONNX export)."""
    from o2o.datasets.builders import build_dataset

    build_dataset("arm-reach", "mixed", progress=False)
    out = tmp_path_factory.mktemp("classifier") / "classifier.onnx"
    done = subprocess.run([sys.executable, "-m", "o2o.learner.classifier_cli", "train", "task=arm-reach",
                           "dataset=o2o/arm-reach/mixed-v0", "steps=3000", "target_precision=0.95", "threads=1",
                           f"out={out}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "precision" in done.stdout and "recall" in done.stdout
    return out


def test_a_success_classifier_ends_the_episodes_its_policy_reaches_and_no_other(tmp_path, reach_classifier):
    reach = run_actor(tmp_path, "reach", "arm.reward=classifier", f"arm.classifier={reach_classifier}",
                      "max_episodes=3", "max_episode_steps=80")  # fmt: skip
    assert reach.returncode == 0, reach.stdout + reach.stderr
    assert "held-out" in reach.stdout + reach.stderr  # its precision and recall, said before it is used
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["episodes"] == 3 and stats["successes_total"] == 3, stats
    assert stats["steps"] < 3 * 80  # ended by the classifier, not by the time limit
    stay = run_actor(tmp_path, "stay", "arm.reward=classifier", f"arm.classifier={reach_classifier}",
                     "max_episodes=2", "max_episode_steps=40")  # fmt: skip
    assert stay.returncode == 0, stay.stdout + stay.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["episodes"] == 2 and stats["successes_total"] == 0 and stats["steps"] == 80, stats


def test_a_classifier_made_for_another_task_is_refused_at_start_naming_both(tmp_path, reach_classifier):
    model = onnx.load(str(reach_classifier))
    for prop in model.metadata_props:
        if prop.key == "task":
            prop.value = "pointmaze-umaze"
    onnx.save(model, str(tmp_path / "other.onnx"))
    done = run_actor(tmp_path, "reach", "arm.reward=classifier", f"arm.classifier={tmp_path / 'other.onnx'}",
                     "max_episodes=1")  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pointmaze-umaze" in done.stderr and "arm-reach" in done.stderr
    assert journal(tmp_path) == []  # refused before the robot was ever connected


@pytest.mark.parametrize("fault", ["learner lost", "spool full"])
def test_the_learner_lost_or_a_full_spool_stop_the_actor_with_the_arm_held_and_disconnected(tmp_path, fault):
    """With link.on_learner_lost=stop the actor stops once the learner has been silent link.timeout_s; with
    spool.on_full=stop once its spool cannot take another chunk (a learner that never acks): exit 3 either way,
    and the last thing the arm got was a hold, then the disconnect."""
    from test_actor_faults import Peer
    from test_online_learner import free_endpoint

    peer = Peer(free_endpoint(), ack=fault == "learner lost")
    args = ["control_hz=50", "chunk_rows=5", "max_episode_steps=100000", "arm.learner_silent_s=0"]
    if fault == "learner lost":
        args += ["link.on_learner_lost=stop", "link.timeout_s=1", "link.heartbeat_s=0.2"]
    else:
        args += ["spool.on_full=stop", "spool.dir=null", "spool.memory_chunks=4"]
    process = subprocess.Popen(actor_command(tmp_path, "oscillate", *args, learner=peer.endpoint), cwd=tmp_path,
                               env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        if fault == "learner lost":
            wait_until(lambda: count_sends(tmp_path) > 60, "the arm to act")
            peer.close()  # the learner is gone
        out, _ = process.communicate(timeout=90)
    finally:
        process.kill()
        peer.close()
    assert process.returncode == 3, out
    assert ("learner" in out and "lost" in out) if fault == "learner lost" else "spool full" in out, out[-2000:]
    entries = journal(tmp_path)
    assert_every_goal_safe(entries)
    assert_left_held_and_disconnected(entries)


def test_the_arm_holds_while_its_policy_is_too_many_versions_behind_the_learners(tmp_path):
    """The learner publishes versions this actor refuses (made for another task): once the newest is more than
    arm.max_policy_lag=2 versions ahead of the one it acts with, the arm holds; a version it can take ends it."""
    from o2o.datasets.replay_store import ReplayStore
    from o2o.transport.ingest import IngestServer

    server = IngestServer(ReplayStore.create_for_task(tmp_path / "store", "arm-reach")).start()
    try:
        server.publish_policy(1, garbage_policy("oscillate"))
        command = actor_command(tmp_path, "oscillate", "control_hz=20", "chunk_rows=5", "arm.max_policy_lag=2",
                                "arm.learner_silent_s=0", "max_episode_steps=100000", learner=server.endpoint)  # fmt: skip
        command.remove(next(arg for arg in command if arg.startswith("policy.path=")))  # the learner's policies only
        process = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            wait_until(lambda: count_sends(tmp_path) > 60, "the arm to act with version 1")
            for version in (2, 3, 4):  # refused: policies of another task
                server.publish_policy(version, garbage_policy("oscillate", task="pointmaze-umaze"))
            time.sleep(3.0)  # acks carry version 4: 3 versions behind
            held_at = count_sends(tmp_path)
            time.sleep(1.5)
            assert count_sends(tmp_path) == held_at, "the arm kept moving with its policy 3 versions behind"
            server.publish_policy(5, garbage_policy("oscillate"))
            wait_until(lambda: count_sends(tmp_path) > held_at + 20, "the arm to act with version 5")
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=60)
        finally:
            process.kill()
    finally:
        server.stop()
    assert process.returncode == 0, out
    assert "the policy is 3 versions behind the learner (> 2)" in out, out[-3000:]
    assert "refused policy version 4" in out
    assert_left_held_and_disconnected(journal(tmp_path))


def test_an_operator_reset_with_no_terminal_to_press_its_key_stops_the_actor_saying_why(tmp_path):
    done = run_actor(tmp_path, "stay", "arm.reset=operator", "max_episodes=1")  # stdin is /dev/null: no keys
    assert done.returncode == 3, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "no operator keys" in said and "reset key" in said, said[-2000:]
    assert_left_held_and_disconnected(journal(tmp_path))
