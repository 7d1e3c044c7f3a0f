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

from .common import Controller, check_choice, record_plan

QUALITIES = ("expert", "medium", "mixed")
TASKS = ("arm-reach",)

STEP = 15.0  # degrees: the largest change of a joint's goal from its measured position per step


def expert_controller(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Joint goals one ``STEP`` from the measured joints (``obs``, degrees) towards the target's pose."""
    joints = np.asarray(obs, np.float32)
    goal = env.unwrapped.robot.target_pose().astype(np.float32)
    return joints + np.clip(goal - joints, -STEP, STEP)


def random_controller(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    space = env.action_space
    return rng.uniform(space.low, space.high).astype(np.float32)


def noisy(controller: Controller, noise_std: float, random_prob: float) -> Controller:
    """The controller with Gaussian noise (degrees) and, with ``random_prob``, a uniform random action."""

    def act(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
        if random_prob > 0 and rng.random() < random_prob:
            return random_controller(obs, env, rng)
        action = controller(obs, env, rng)
        return action + rng.normal(0.0, noise_std, action.shape).astype(np.float32)

    return act


# (Gaussian action noise std in degrees, per-step probability of a uniform random action).
EXPERT_NOISE = (1.0, 0.0)
MEDIUM_NOISE = (6.0, 0.4)
# mixed: a replay-like mixture of whole episodes of these kinds, with these probabilities (as pusher's).
MIXED_KINDS = ("expert", "medium", "random")
MIXED_PROBS = (0.5, 0.25, 0.25)


def episode_controller(kind: str) -> Controller:
    if kind == "random":
        return random_controller
    noise_std, random_prob = EXPERT_NOISE if kind == "expert" else MEDIUM_NOISE
    return noisy(expert_controller, noise_std, random_prob)


def episode_plan(quality: str, n_episodes: int, seed: int) -> list[tuple[str, int]]:
    """(kind, reset seed) of every episode, reproducible from ``seed`` (the quality mixed in, as pusher's)."""
    rng = np.random.default_rng([seed, QUALITIES.index(quality)])
    seeds = rng.integers(0, 2**31 - 1, size=n_episodes)
    if quality == "mixed":
        kinds = rng.choice(MIXED_KINDS, size=n_episodes, p=MIXED_PROBS)
    else:
        kinds = np.full(n_episodes, quality)
    return [(str(kind), int(s)) for kind, s in zip(kinds, seeds)]


def build_episodes(task: str, quality: str, n_episodes: int, seed: int = 0, progress: bool = False) -> list[dict]:
    """``n_episodes`` scripted episodes of ``task`` at ``quality``, in ``write_dataset``'s format."""
    check_choice("arm_reach", task, quality, TASKS, QUALITIES)
    return record_plan(task, quality, episode_plan(quality, n_episodes, seed), episode_controller, progress)
