"""A robot with a task of the user's own and no data yet (HIL-SERL's start): the task is declared with its spaces in a
module named by O2O_TASKS, ``o2o-learner from_scratch=true`` learns online from nothing, and the robot actor (the
MuJoCo arm standing in for hardware) acts at random within its safety limits until the learner's first policy,
then with it; then what was collected is exported as the task's first Minari dataset and pretrained on. Real
processes, real ZeroMQ on loopback, a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from test_arm_actor import HOME, MAX_STEP, assert_every_goal_safe, assert_left_held_and_disconnected, journal
from test_online_learner import free_endpoint

from o2o.datasets.replay_store import ReplayStore

TESTS = Path(__file__).parent
TASK = "sim-arm-stack"


STATE = "gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)"  # the arm's 3 joint readings
WRIST = ('gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), '
         '"wrist": gym.spaces.Box(0, 255, (48, 48, 3), np.uint8)})')  # and a wrist camera's images


def learn_from_scratch(tmp_path: Path, task: str, observation_space: str, episode_steps: int, learner_args: list[str],
                       actor_args: list[str]) -> tuple[dict, Path, subprocess.CompletedProcess, str]:  # fmt: skip
    """Declare ``task`` (no simulator, no data: its spaces) in a module named by O2O_TASKS, run
    ``o2o-learner from_scratch=true`` and the robot actor on the journal arm against it until both end; returns
    the environment the processes ran with, the learner's run folder, the actor's result and the learner's log."""
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent(f"""
        import gymnasium as gym
        import numpy as np
        from o2o.envs.tasks import TaskSpec, register_task

        # Its goals within the joints' limits (degrees).
        register_task(TaskSpec(
            name="{task}", env_id=None, reward="sparse", score="success", max_episode_steps={episode_steps},
            observation_space={observation_space},
            action_space=gym.spaces.Box(np.array([-110, -100, -20], np.float32), np.array([110, 60, 150], np.float32)),
        ))
    """))
    env = {**os.environ, "O2O_TASKS": str(tmp_path / "my_tasks.py"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    endpoint, run_dir = free_endpoint(), tmp_path / "run"
    learner = subprocess.Popen([
        sys.executable, "-m", "o2o.learner.online", f"task={task}", "from_scratch=true", f"endpoint={endpoint}",
        "max_rows_ahead=0", "progress=false", f"hydra.run.dir={run_dir}", "threads=1", "eval_every_steps=0",
        *learner_args], env=env, cwd=tmp_path, stdout=open(tmp_path / "learner.log", "w"),
        stderr=subprocess.STDOUT)  # fmt: skip
    actor = subprocess.run([
        sys.executable, "-m", "o2o.actor.main", f"task={task}", f"learner={endpoint}", "actor_id=arm-1",
        "robot.type=arm_journal:JournalArm", f"robot.options={{journal:{tmp_path / 'journal.jsonl'}}}",
        "policy.act_before_policy=true", "arm.reset=home", f"arm.home={HOME}", f"arm.max_step={MAX_STEP}",
        "arm.teleop=none", "link.drain_s=60", f"stats_file={tmp_path / 'stats.json'}", *actor_args], env=env,
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        learner.wait(timeout=240)
    finally:
        learner.kill()
    log = (tmp_path / "learner.log").read_text()
    assert actor.returncode == 0, actor.stdout[-3000:] + actor.stderr[-3000:]
    assert learner.returncode == 0, log[-3000:]
    return env, run_dir, actor, log


def stored_rows(run_dir: Path) -> dict:
    store = ReplayStore.open(run_dir / "replay")
    try:
        return store.read()
    finally:
        store.close()


def test_a_user_task_with_no_data_learns_online_from_scratch_on_the_robot(tmp_path):
    env, run_dir, _, log = learn_from_scratch(
        tmp_path, TASK, STATE, 50,
        ["online_updates=150", "warmup_rows=100", "publish_every=50", "checkpoint_every=50", "log_every=50",
         "batch_size=32"],
        ["max_steps=600", "control_hz=50", "chunk_rows=25"])  # fmt: skip
    assert "a real-world task" in log  # it says why it runs no evaluation episodes of its own
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["steps"] == 600 and stats["policy_version"] >= 1, stats  # random first, then the learner's policy
    rows = stored_rows(run_dir)
    assert len(rows["reward"]) >= 100 and set(rows["policy_version"].tolist()) >= {-1, 1}
    entries = journal(tmp_path)
    assert_every_goal_safe(entries)
    assert_left_held_and_disconnected(entries)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["learner"]["state"] == "stopped" and "arm-1" in status["actors"]

    # What was collected becomes the task's first dataset, and o2o-pretrain trains on it (README "Your task").
    env["MINARI_DATASETS_PATH"] = str(tmp_path / "minari")
    export = subprocess.run([sys.executable, "-m", "o2o.datasets.store_check", "export", str(run_dir / "replay"),
                             "me/sim-arm-stack-v0"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    episodes = int(export.stdout.split("wrote me/sim-arm-stack-v0: ")[1].split()[0])
    assert episodes >= 2
    pretrain = subprocess.run([sys.executable, "-m", "o2o.learner.pretrain", f"task={TASK}",
                               "dataset=me/sim-arm-stack-v0", "steps=50", "threads=1", "checkpoint_every=50",
                               f"hydra.run.dir={tmp_path / 'pretrain'}"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stdout[-3000:] + pretrain.stderr[-3000:]
    assert (tmp_path / "pretrain" / "policy.onnx").exists()


def test_a_robot_with_a_camera_learns_from_scratch_its_images_stored_and_in_its_policy(tmp_path, gl):
    """The same start with a wrist camera on the arm (rendered by MuJoCo offscreen): the actor sends the frames,
    the store keeps them, the learner trains the pixel agent and the actor then acts with its camera policy."""
    _, run_dir, _, _ = learn_from_scratch(
        tmp_path, f"{TASK}-cam", WRIST, 40,
        ["online_updates=40", "warmup_rows=80", "publish_every=20", "checkpoint_every=40", "log_every=20",
         "batch_size=16", "buffer_capacity=2000"],
        ["robot.cameras={wrist:[48,48]}", "max_steps=400", "control_hz=40", "chunk_rows=20"])  # fmt: skip
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["steps"] == 400 and stats["policy_version"] >= 1, stats  # then acting with the camera policy
    rows = stored_rows(run_dir)
    frames = rows["frames/wrist"]
    assert frames.shape[1:] == (48, 48, 3) and frames.dtype == np.uint8 and len(rows["reward"]) >= 80
    assert frames.std() > 0  # rendered images, not zeros
    assert_left_held_and_disconnected(journal(tmp_path))
