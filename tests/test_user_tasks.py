"""A user's own real-world task: declared in a module named by O2O_TASKS, no simulator, its spaces its dataset's.

The dataset is a real Minari dataset written by o2o's own writer (``minari_io.write_dataset``), as a robot's
recording would be: 6 joints in degrees (an SO-101's five joints and its gripper), sparse reward 1 on the
step the operator marks a success. ``o2o-pretrain`` trains on it in a subprocess and its ``policy.onnx`` is
what ``o2o-actor`` accepts for that task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

from o2o.actor.onnx_policy import OnnxPolicy, PolicyExpectation, PolicyMismatch
from o2o.datasets.minari_io import write_dataset
from o2o.envs import tasks
from o2o.envs.tasks import NoSimulator, TaskSpec, UserTasksError, get_task, make_env, register_task, task_spaces

TASK = "so101-pick-cube"
DATASET = "so101/pick-cube-v0"
# An SO-101's joint limits in degrees (LeRobot's so101_follower: shoulder_pan ... wrist_roll, gripper 0-100).
LOW = np.array([-110, -100, -100, -95, -160, 0], np.float32)
HIGH = np.array([110, 100, 100, 95, 160, 100], np.float32)
TASKS_MODULE = f"""
from o2o.envs.tasks import TaskSpec, register_task

register_task(TaskSpec(name={TASK!r}, env_id=None, reward="sparse", reward_pos=1.0, reward_neg=0.0, score="success",
                       max_episode_steps=30, datasets=({DATASET!r},), description="SO-101 picks the cube"))
"""


STATE = gym.spaces.Box(-np.inf, np.inf, (6,), np.float32)
WRIST = (8, 8, 3)


class StateRecording(gym.Env):
    """What a robot's recording declares: its spaces (nothing steps it). The writer stores its spec, which
    Minari makes once (so the entry point is this importable class)."""

    observation_space = STATE
    action_space = gym.spaces.Box(LOW, HIGH, dtype=np.float32)


class CameraRecording(StateRecording):
    observation_space = gym.spaces.Dict({"state": STATE, "wrist": gym.spaces.Box(0, 255, WRIST, np.uint8)})


def write_robot_dataset(cameras: bool = False, episodes: int = 16) -> None:
    """``episodes`` recorded episodes of a 6-joint arm under MINARI_DATASETS_PATH: even ones reach the goal pose
    (reward 1, terminal), odd ones wander for 30 steps (reward 0, truncated); ``cameras``: a Dict of "state"
    and a uint8 "wrist" image."""
    rng = np.random.default_rng(0)
    goal = np.array([30, -20, 40, 10, 0, 80], np.float32)
    recorded = []
    for i in range(episodes):
        joints, states, actions, rewards = rng.uniform(LOW, HIGH).astype(np.float32), [], [], []
        states.append(joints.copy())
        success = False
        for _ in range(30):
            action = np.clip(joints + np.clip(goal - joints, -15, 15) if i % 2 == 0 else rng.uniform(LOW, HIGH),
                             LOW, HIGH).astype(np.float32)  # fmt: skip
            joints = joints + 0.8 * (action - joints)
            success = bool(np.abs(joints - goal).max() < 2.0)
            states.append(joints.astype(np.float32))
            actions.append(action)
            rewards.append(1.0 if success else 0.0)
            if success:
                break
        steps = len(actions)
        observations = [{"state": s, "wrist": np.full(WRIST, 10 * k % 256, np.uint8)} for k, s in enumerate(states)] \
            if cameras else states  # fmt: skip
        recorded.append({"observations": observations, "actions": actions, "rewards": rewards,
                         "terminations": [False] * (steps - 1) + [success],
                         "truncations": [False] * (steps - 1) + [not success]})  # fmt: skip
    env = CameraRecording() if cameras else StateRecording()
    env.spec = EnvSpec("o2o-test/so101-recording-v0", entry_point=f"{__name__}:{type(env).__name__}",
                       max_episode_steps=30)  # fmt: skip
    write_dataset(DATASET, env, recorded, algorithm_name="operator", description="test recording")


@pytest.fixture
def registry(monkeypatch):
    """The task registry as it was before the test (user tasks are process-wide once registered)."""
    saved, loaded = dict(tasks.TASKS), tasks._loaded_user_tasks
    monkeypatch.delenv(tasks.USER_TASKS_VAR, raising=False)
    yield
    tasks.TASKS.clear()
    tasks.TASKS.update(saved)
    tasks._loaded_user_tasks = loaded


def test_a_module_named_by_o2o_tasks_registers_the_task_once(registry, tmp_path, monkeypatch):
    module = tmp_path / "my_tasks.py"
    imports = tmp_path / "imports.txt"
    module.write_text(TASKS_MODULE + f"\nopen({str(imports)!r}, 'a').write('imported\\n')\n")
    with pytest.raises(KeyError, match=f"unknown task '{TASK}'.*O2O_TASKS"):  # not set: the error says how
        get_task(TASK)
    monkeypatch.setenv("O2O_TASKS", f"{module}")
    spec = get_task(TASK)
    assert (spec.real_world, spec.datasets, spec.max_episode_steps) == (True, (DATASET,), 30)
    assert TASK in tasks.task_names() and get_task("pusher").real_world is False
    assert imports.read_text() == "imported\n"  # looked up three times, imported once


def test_o2o_tasks_naming_a_module_that_cannot_be_imported_is_a_clear_error(registry, monkeypatch):
    monkeypatch.setenv("O2O_TASKS", "no_such_tasks_module")
    with pytest.raises(UserTasksError, match="O2O_TASKS='no_such_tasks_module': cannot import 'no_such_tasks_module'"):
        get_task("pusher")


def test_register_task_refuses_an_o2o_name_and_a_real_world_task_without_a_dataset(registry):
    with pytest.raises(UserTasksError, match="one of o2o's own tasks"):
        register_task(TaskSpec(name="pusher", env_id=None, datasets=(DATASET,)))
    with pytest.raises(UserTasksError, match=r"name its offline dataset, datasets=\("):
        register_task(TaskSpec(name="my-arm", env_id=None))


def test_a_real_world_task_has_no_simulator_and_takes_its_spaces_from_its_dataset(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    write_robot_dataset(cameras=True, episodes=2)
    spec = register_task(TaskSpec(name=TASK, env_id=None, reward="sparse", datasets=(DATASET,)))
    with pytest.raises(NoSimulator, match=f"task {TASK} is a real-world task: it has no simulator; its actors run a "
                                          r"robot \(o2o-actor task=so101-pick-cube robot.type="):  # fmt: skip
        make_env(TASK)
    obs_space, action_space = task_spaces(spec)
    assert set(obs_space.spaces) == {"state", "wrist"}
    assert obs_space["state"].shape == (6,) and obs_space["wrist"].shape == (8, 8, 3)
    assert obs_space["wrist"].dtype == np.uint8
    assert action_space.low.tolist() == [-110, -100, -100, -95, -160, 0]
    assert action_space.high.tolist() == [110, 100, 100, 95, 160, 100]


def run(command: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_o2o_pretrain_trains_a_user_task_from_its_dataset_and_the_actor_accepts_its_policy(registry, tmp_path,
                                                                                           monkeypatch):  # fmt: skip
    minari_root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    write_robot_dataset()
    (tmp_path / "so101_tasks.py").write_text(TASKS_MODULE)
    env = {**os.environ, "O2O_TASKS": str(tmp_path / "so101_tasks.py"), "MINARI_DATASETS_PATH": str(minari_root),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    bin_dir = Path(sys.executable).parent
    # o2o-actor composes the user's task (Hydra's task=NAME) as the learner does: the config it would run.
    actor = run([str(bin_dir / "o2o-actor"), f"task={TASK}", "--cfg", "job"], env, tmp_path)
    assert actor.returncode == 0, actor.stderr[-2000:]
    assert f"task: {TASK}" in actor.stdout

    done = run([str(bin_dir / "o2o-pretrain"), f"task={TASK}", "steps=300", "batch_size=64", "log_every=100",
                "checkpoint_every=300", "eval.every=100", "device=cpu", "threads=1", "progress=false",
                f"out_dir={tmp_path / 'runs'}", "net.policy_hidden=[32,32]", "net.critic_hidden=[32,32]"],
               env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert f"task {TASK} is a real-world task: the learner runs no evaluation episodes" in output
    [run_dir] = (tmp_path / "runs" / TASK).iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/critic_loss" in r] == [100, 200, 300]
    assert not any(key.startswith("eval/") for r in records for key in r)  # no evaluation, and no crash over it

    # What o2o-actor builds for this task on the arm: its name, 6 joint readings, 6 joint targets.
    policy = OnnxPolicy(run_dir / "policy.onnx", PolicyExpectation(TASK, 6, 6), version=1)
    assert policy.action_low.tolist() == LOW.tolist() and policy.action_high.tolist() == HIGH.tolist()
    action = policy.act(np.array([0, 0, 0, 0, 0, 50], np.float32), np.zeros(6, np.float32))
    assert action.shape == (6,) and np.all(action >= LOW) and np.all(action <= HIGH)
    with pytest.raises(PolicyMismatch, match="task"):  # another task's actor refuses it
        OnnxPolicy(run_dir / "policy.onnx", PolicyExpectation("arm-reach", 6, 6), version=1)


def test_ooo_retraining_of_a_task_without_a_simulator_is_refused_before_anything_starts(registry):
    from o2o.learner.config import OnlineConfig
    from o2o.learner.online import preflight

    register_task(TaskSpec(name="my-arm", env_id=None, datasets=(DATASET,)))
    with pytest.raises(ValueError, match="has no simulator: OOO retraining"):
        preflight(OnlineConfig(task="my-arm", retrain_every=100))
