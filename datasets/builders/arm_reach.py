"""Scripted datasets for ``arm-reach`` (robot/sim_arm.py: a 3-joint MuJoCo arm behind LeRobot's interface).

The expert knows where the target is (the task's target is fixed): the inverse kinematics of the target
gives the goal pose, and each step the arm's joint goals move from the measured joint positions towards it
by at most ``STEP`` degrees a joint, as a rate-limited arm would be driven (robot/safety.py's ``max_step``).
The pose comes from the env's arm (``SimArm.target_pose``): datasets/ does not import robot/.
It is stateless (it re-plans from the measured joints every step), so it recovers from noisy or random steps.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from .common import Controller, check_choice, controller_of_kind, episode_plan, record_plan

QUALITIES = ("expert", "medium", "mixed")
TASKS = ("arm-reach",)

STEP = 15.0  # degrees: the largest change of a joint's goal from its measured position per step


def expert_controller(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Joint goals one ``STEP`` from the measured joints (``obs``, degrees) towards the target's pose."""
    joints = np.asarray(obs, np.float32)
    goal = env.unwrapped.robot.target_pose().astype(np.float32)
    return joints + np.clip(goal - joints, -STEP, STEP)




# (Gaussian action noise std in degrees, per-step probability of a uniform random action).
EXPERT_NOISE = (1.0, 0.0)
MEDIUM_NOISE = (6.0, 0.4)


def episode_controller(kind: str) -> Controller:
    return controller_of_kind(kind, expert_controller, EXPERT_NOISE, MEDIUM_NOISE)


def build_episodes(task: str, quality: str, n_episodes: int, seed: int = 0, progress: bool = False) -> list[dict]:
    """``n_episodes`` scripted episodes of ``task`` at ``quality``, in ``write_dataset``'s format."""
    check_choice("arm_reach", task, quality, TASKS, QUALITIES)
    return record_plan(task, quality, episode_plan(quality, n_episodes, seed, QUALITIES), episode_controller, progress)
