"""Scripted datasets for the Fetch arm: ``fetch-push`` and ``fetch-pick``.

The controllers are stateless: every step they re-plan from the gripper, object
and goal positions in the observation, so they recover from noisy or random
steps without a phase machine that could get stuck in the wrong phase.

Observation (``obs["observation"]``): gripper position 0:3, object position
3:6, object minus gripper 6:9, finger positions 9:11, ... The action
``[dx, dy, dz, gripper]`` moves the gripper's mocap target by ``0.05 * d``
metres; gripper +1 opens, -1 closes (FetchPush locks the fingers closed).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


from .common import Controller, check_choice, episode_kinds, from_state, record_plan

QUALITIES = ("expert", "medium", "mixed")
TASKS = ("fetch-push", "fetch-pick")
PIXEL_TASKS = {"fetch-push-pixels": "fetch-push"}
"""Camera tasks (envs/mujoco_camera.py) -> the state task whose controller and episode plan drive them."""

Obs = dict[str, np.ndarray]

# Proportional gain on position errors (metres -> action units): an error of
# 5 cm asks for a full-speed step, smaller errors are approached smoothly.
GAIN = 20.0
OPEN, CLOSE = 1.0, -1.0

# Push geometry (block half-size is 2.5 cm).
PUSH_BEHIND = 0.06  # gripper stands this far behind the block centre, on the goal->block line
PUSH_HOVER = 0.06  # height above the block while moving to the behind point
PUSH_ALIGN = 0.02  # xy distance to the behind point at which the gripper may descend
PUSH_LOW = 0.015  # gripper this close to block height = at pushing height
PUSH_SPEED = 0.5  # slow pushes: a fast-hit block slides on past the goal
PUSH_DONE = 0.02  # block this close to the goal (xy) is left alone

# Pick geometry.
PICK_HOVER = 0.05  # height above the block while aligning over it
PICK_ALIGN = 0.01  # xy distance at which the open gripper descends onto the block
PICK_REACH = 0.015  # 3-D gripper-block distance at which the fingers close
HELD_WIDTH = 0.06  # finger opening (sum of both) below which a nearby block counts as held
HELD_REACH = 0.03  # block within this of the gripper (and fingers closed) counts as held


def _parts(obs: Obs) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Gripper position, object position, goal and finger opening."""
    o = obs["observation"]
    return o[0:3], o[3:6], obs["desired_goal"], float(o[9] + o[10])


def _move(grip: np.ndarray, target: np.ndarray, gripper: float, speed: float = 1.0) -> np.ndarray:
    """Proportional step towards ``target``, each axis capped at ``speed`` (<= 1)."""
    return np.append(np.clip(GAIN * (target - grip), -speed, speed), gripper).astype(np.float32)


def push_controller(obs: Obs, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Hover behind the block (seen from the goal), drop to block height, push it to the goal."""
    grip, obj, goal, _ = _parts(obs)
    to_goal = goal[:2] - obj[:2]
    dist = np.linalg.norm(to_goal)
    if dist < PUSH_DONE:
        # Close enough (success is 5 cm): back off upwards rather than nudge it again,
        # since re-pushing a block that sits on the goal mostly knocks it away.
        return _move(grip, np.append(grip[:2], obj[2] + PUSH_HOVER), CLOSE)
    direction = to_goal / dist
    behind = obj[:2] - PUSH_BEHIND * direction
    low = grip[2] - obj[2] < PUSH_LOW
    # Gripper offset from the block centre: along the block->goal direction, and off that line.
    rel = grip[:2] - obj[:2]
    along = float(rel @ direction)  # negative = behind the block
    across = abs(float(rel[0] * direction[1] - rel[1] * direction[0]))
    if low and along < -0.02 and across < PUSH_ALIGN:
        # In contact position: drive the gripper to where the block sits on the goal.
        # Steering to the line (not just along it) keeps the block from drifting sideways.
        target = np.append(goal[:2] - (PUSH_BEHIND - 0.015) * direction, obj[2])
        return _move(grip, target, CLOSE, speed=PUSH_SPEED)
    if np.linalg.norm(grip[:2] - behind) < PUSH_ALIGN:
        return _move(grip, np.append(behind, obj[2]), CLOSE)  # aligned: descend
    if low and along > -0.04:
        # Low and beside or in front of the block: rise first so as not to knock it.
        return _move(grip, np.append(grip[:2], obj[2] + PUSH_HOVER), CLOSE)
    return _move(grip, np.append(behind, obj[2] + PUSH_HOVER), CLOSE)


def pick_controller(obs: Obs, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Hover over the block with open fingers, descend, close, carry it to the goal."""
    grip, obj, goal, width = _parts(obs)
    reach = np.linalg.norm(obj - grip)
    if reach < HELD_REACH and width < HELD_WIDTH:
        # Held: move so that the block (not the gripper) lands on the goal.
        return _move(grip, goal + (grip - obj), CLOSE)
    if reach < PICK_REACH:
        return _move(grip, obj, CLOSE)  # around the block: close the fingers in place
    if np.linalg.norm(grip[:2] - obj[:2]) < PICK_ALIGN:
        return _move(grip, obj, OPEN)  # above it: descend with open fingers
    hover = np.append(obj[:2], obj[2] + PICK_HOVER)
    # Rise before sliding sideways, so the fingers never sweep the block away.
    if grip[2] < obj[2] + PICK_HOVER / 2:
        hover[:2] = grip[:2]
    return _move(grip, hover, OPEN)


CONTROLLERS: dict[str, Controller] = {"fetch-push": push_controller, "fetch-pick": pick_controller}


def noisy(controller: Controller, noise_std: float, random_prob: float) -> Controller:
    """The controller with Gaussian action noise and, with ``random_prob``, a uniform random action."""

    def act(obs: Obs, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
        if random_prob > 0 and rng.random() < random_prob:
            return rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)
        action = controller(obs, env, rng)
        return action + rng.normal(0.0, noise_std, action.shape).astype(np.float32)

    return act


def random_controller(obs: Obs, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)


# (Gaussian action noise std, per-step probability of a uniform random action).
EXPERT_NOISE = (0.1, 0.0)
MEDIUM_NOISE = {"fetch-push": (0.5, 0.15), "fetch-pick": (0.25, 0.15)}


def episode_controller(task: str, kind: str) -> Controller:
    """The controller of one episode of ``kind`` (expert, medium or random)."""
    if kind == "random":
        return random_controller
    noise_std, random_prob = EXPERT_NOISE if kind == "expert" else MEDIUM_NOISE[task]
    return noisy(CONTROLLERS[task], noise_std, random_prob)


def episode_plan(task: str, quality: str, n_episodes: int, seed: int) -> list[tuple[str, int]]:
    """(kind, reset seed) of every episode, reproducible from ``seed``.

    The task and quality are mixed into the seed so that one seed's datasets do
    not all start from the same initial states; seeds and kinds come from
    separate streams so that a longer dataset extends a shorter one.
    """
    seed_seq = np.random.SeedSequence([seed, TASKS.index(task), QUALITIES.index(quality)])
    seed_rng, kind_rng = (np.random.default_rng(s) for s in seed_seq.spawn(2))
    seeds = seed_rng.integers(0, 2**31 - 1, size=n_episodes)
    return list(zip(episode_kinds(quality, n_episodes, kind_rng), map(int, seeds)))


def build_episodes(task: str, quality: str, n_episodes: int, seed: int = 0, progress: bool = False) -> list[dict]:
    """``n_episodes`` scripted episodes of ``task`` at ``quality``, in ``write_dataset``'s format.

    A camera task runs its state task's plan and controllers on the state behind the pixels (``from_state``):
    with the same seed its dataset holds the state dataset's trajectories, seen by the camera."""
    check_choice("fetch", task, quality, (*TASKS, *PIXEL_TASKS), QUALITIES)
    state_task = PIXEL_TASKS.get(task, task)
    plan = episode_plan(state_task, quality, n_episodes, seed)
    if task in PIXEL_TASKS:
        return record_plan(task, quality, plan, lambda kind: from_state(episode_controller(state_task, kind)), progress)
    return record_plan(task, quality, plan, lambda kind: episode_controller(task, kind), progress)
