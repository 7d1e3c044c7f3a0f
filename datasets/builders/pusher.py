"""Scripted datasets for ``pusher`` (gymnasium Pusher-v5).

The arm ends in a fork: a crossbar (body ``tips_arm``, whose position the
observation and the reward call the fingertip) with two prongs. The expert is
an operational-space PD on the crossbar centre, built from MuJoCo's Jacobians
(``mj_jacBody``) and mass matrix:

1. travel to a point behind the puck on the goal->puck line, over the puck
   when the straight way there would sweep it;
2. descend there and push: hold the crossbar a set depth *inside* the puck,
   moving with it, with the crossbar turned horizontal and across the push;
3. on the goal, rest against the puck.

A posture term in the task's null space and a joint-limit push keep the arm
out of the straight-arm singularity it starts in, and targets beyond the arm's
reach are pulled in rather than strained for.

Why the push holds a depth: in Pusher-v5 the puck's mass is 8 mg (its inertia
comes from joint armature), and MuJoCo scales a contact's stiffness with the
bodies' masses, so the puck is a very soft body. A contact pushes with a force
proportional to how deep the crossbar sits in it (about 0.4 N/m per contact
point), and the puck's damping turns that force into a speed. Around 2.5 cm
deep the contact has three points and the puck moves at about 7 cm/s; deeper,
the collision drops to one point and the push slows, and a crossbar driven
faster simply passes through the puck. Puck starts lie 17-36 cm from the goal,
so the farthest ones cannot be brought within the 5 cm of success in 100 steps.

The controller is stateless: every step it re-plans from the simulator state
(tip, puck and goal positions, puck velocity), so it recovers from noisy or
random steps.
"""

from __future__ import annotations

import gymnasium as gym
import mujoco
import numpy as np


from .common import Controller, check_choice, controller_of_kind, episode_plan, record_plan

QUALITIES = ("expert", "medium", "mixed")
TASKS = ("pusher",)

# Geometry (metres). The puck is a cylinder of radius 5 cm, its centre at
# z = -0.275 on the table (z = -0.325); the crossbar is a capsule of radius 2 cm.
TOUCH = 0.07  # crossbar-centre to puck-centre distance at first contact
PRE_PUSH = 0.09  # the approach point lies this far behind the puck centre
Z_PUSH = -0.26  # crossbar height while pushing: within the puck's height, clear of the table
Z_TRAVEL = -0.17  # crossbar height when passing over the puck (its top is at -0.225)
CLEARANCE = 0.08  # travel low only if the way to the approach point stays this far from the puck
ALIGNED = 0.02  # xy distance to the approach point at which the crossbar descends
ON_LINE = 0.03  # lateral offset from the goal->puck line still counted as behind the puck
DEPTH = 0.027  # how deep the crossbar sits in the (soft) puck while pushing; sets the push force
SLOW_DOWN = 0.03  # within this puck-goal distance the push depth shrinks linearly to zero
SHOULDER = np.array([0.0, -0.6])  # xy of the shoulder pan axis
REACH = 0.76  # horizontal reach from it at pushing height, short of the straight arm
DONE = 0.015  # puck this close to the goal: stop pushing

# Operational-space PD: natural frequency (rad/s) and damping ratio of the tip
# position, natural frequency of the crossbar direction (critically damped).
POS_FREQ = 6.0
POS_DAMPING = 0.8  # a little under critical: reaches the approach point sooner
ROT_FREQ = 4.0
MAX_ACCEL = 5.0  # m/s^2: caps the commanded tip acceleration on long moves
# Null-space posture: a bent elbow keeps the arm away from the straight-arm
# singularity it starts in (where J^T cannot pull the tip inwards), and centred
# roll joints keep the wrist off its limits.
POSTURE = np.array([0.0, 0.8, 0.0, -1.3, 0.0, -0.4, 0.0])
POSTURE_FREQ = 2.0
LIMIT_MARGIN = 0.2  # rad: joints closer than this to a limit are pushed back ...
LIMIT_GAIN = 20.0  # ... with this stiffness (1/s^2, scaled by each joint's inertia)
MAX_TORQUE = 2.0  # the actuators' control range (gear 1)


def _state(env: gym.Env) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tip (crossbar centre, 3-D), puck (xy), puck velocity (xy) and goal (xy)."""
    model, data = env.unwrapped.model, env.unwrapped.data
    puck_vel = np.zeros(2)
    # Each slide joint moves the puck along its own axis, whatever the joint order.
    for name in ("obj_slidex", "obj_slidey"):
        joint = model.joint(name)
        puck_vel += data.qvel[joint.dofadr[0]] * model.jnt_axis[joint.id][:2]
    return (
        data.body("tips_arm").xpos.copy(),
        data.body("object").xpos[:2].copy(),
        puck_vel,
        data.body("goal").xpos[:2].copy(),
    )


def plan(
    tip: np.ndarray, puck: np.ndarray, puck_vel: np.ndarray, goal: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target tip position, target tip velocity and push direction (unit, xy)."""
    to_goal = goal - puck
    dist = float(np.linalg.norm(to_goal))
    push = to_goal / max(dist, 1e-6)
    rel = tip[:2] - puck
    along = float(rel @ push)  # negative: behind the puck
    across = float(rel @ np.array([-push[1], push[0]]))
    if dist < DONE:
        # On the goal: rest against the puck on whichever side the tip is (the
        # push direction is ill-defined here, and pushing on would knock it off).
        away = rel / max(float(np.linalg.norm(rel)), 1e-6)
        return np.append(puck + TOUCH * away, tip[2]), np.zeros(3), push
    if -PRE_PUSH - 0.03 < along < -0.02 and abs(across) < ON_LINE and tip[2] < Z_PUSH + 0.03:
        # Behind the puck at pushing height: sit DEPTH inside it on the line
        # through its centre and move with it; the contact force does the rest.
        depth = DEPTH * min(1.0, dist / SLOW_DOWN)
        target = np.append(puck - (TOUCH - depth) * push, Z_PUSH)
        return target, np.append(puck_vel, 0.0), push
    approach = puck - PRE_PUSH * push
    if np.linalg.norm(tip[:2] - approach) < ALIGNED:
        return np.append(approach, Z_PUSH), np.zeros(3), push
    clear = _segment_distance(puck, tip[:2], approach) > CLEARANCE
    return np.append(approach, Z_PUSH if clear else Z_TRAVEL), np.zeros(3), push


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from ``point`` to the segment a-b."""
    ab = b - a
    t = np.clip((point - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(point - (a + t * ab)))


def _crossbar_task(
    data: mujoco.MjData, jac_rot: np.ndarray, qvel: np.ndarray, push: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the crossbar-direction task and their commanded angular acceleration.

    The crossbar (the body's y axis) turns horizontal and across ``push``, with
    the sign that needs the smaller turn. Only the two rotations across the bar
    are tasks: the spin about the bar (where the prongs point) does not matter
    to the push and is left to the null space, which keeps the wrist off its limits.
    """
    bar = data.body("tips_arm").xmat.reshape(3, 3)[:, 1]
    across = np.array([-push[1], push[0], 0.0])
    if bar @ across < 0:
        across = -across
    accel = ROT_FREQ**2 * np.cross(bar, across) - 2.0 * ROT_FREQ * (jac_rot @ qvel)
    e1 = np.cross(bar, [0.0, 0.0, 1.0]) if abs(bar[2]) < 0.9 else np.cross(bar, [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    basis = np.vstack([e1, np.cross(bar, e1)])
    return basis @ jac_rot, basis @ accel


def task_space_torque(
    env: gym.Env, target: np.ndarray, target_vel: np.ndarray, push: np.ndarray
) -> np.ndarray:
    """Actions of an operational-space PD: tip to ``target`` (moving at
    ``target_vel``), crossbar across ``push``, posture in the null space."""
    model, data = env.unwrapped.model, env.unwrapped.data
    arm = slice(0, model.nu)  # the 7 arm dofs come first; the puck and goal slides follow
    jac_pos, jac_rot = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    mujoco.mj_jacBody(model, data, jac_pos, jac_rot, model.body("tips_arm").id)
    jac_pos, jac_rot = jac_pos[:, arm], jac_rot[:, arm]
    qpos, qvel = data.qpos[arm], data.qvel[arm]

    tip = data.body("tips_arm").xpos
    accel = POS_FREQ**2 * (target - tip) + 2.0 * POS_DAMPING * POS_FREQ * (target_vel - jac_pos @ qvel)
    norm = np.linalg.norm(accel)
    if norm > MAX_ACCEL:
        accel *= MAX_ACCEL / norm
    rot_rows, rot_accel = _crossbar_task(data, jac_rot, qvel, push)
    jac = np.vstack([jac_pos, rot_rows])

    mass = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, data, mass)
    mass = mass[arm, arm]
    mass_inv = np.linalg.inv(mass)
    # Task-space inertia; the small damping keeps near-singular directions finite.
    lam = np.linalg.inv(jac @ mass_inv @ jac.T + 1e-3 * np.eye(len(jac)))
    tau = jac.T @ lam @ np.concatenate([accel, rot_accel])

    # Posture PD through the dynamically consistent null-space projector.
    null = np.eye(len(qpos)) - jac.T @ (mass_inv @ jac.T @ lam).T
    tau += null @ (mass @ (POSTURE_FREQ**2 * (POSTURE - qpos) - 2.0 * POSTURE_FREQ * qvel))
    # Push joints away from their limits (outside the null space: the arm starts
    # straight, elbow and wrist at their limits, where the task alone can stall).
    low, high = model.jnt_range[arm, 0] + LIMIT_MARGIN, model.jnt_range[arm, 1] - LIMIT_MARGIN
    tau += LIMIT_GAIN * np.diag(mass) * (np.clip(qpos, low, high) - qpos)
    # Cancel Coriolis forces and joint damping, so the PD sees the plain inertia.
    tau += data.qfrc_bias[arm] - data.qfrc_passive[arm]

    peak = np.abs(tau).max()
    if peak > MAX_TORQUE:
        tau *= MAX_TORQUE / peak  # scale rather than clip: keeps the direction of the command
    return tau / model.actuator_gear[arm, 0]


def within_reach(target: np.ndarray) -> np.ndarray:
    """``target`` pulled in to the arm's comfortable reach.

    Pucks far out with the goal inwards ask for an approach point beyond the
    straight arm; straining for it would burn full torque (and control cost) for
    the whole episode at the straight-arm singularity, for nothing.
    """
    offset = target[:2] - SHOULDER
    radius = float(np.linalg.norm(offset))
    if radius <= REACH:
        return target
    return np.append(SHOULDER + offset * (REACH / radius), target[2])


def expert_controller(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Reach behind the puck, then push it to the goal (see the module docstring)."""
    tip, puck, puck_vel, goal = _state(env)
    target, target_vel, push = plan(tip, puck, puck_vel, goal)
    return task_space_torque(env, within_reach(target), target_vel, push).astype(np.float32)




# (Gaussian action noise std in torque units, per-step probability of a uniform random action).
EXPERT_NOISE = (0.1, 0.0)
MEDIUM_NOISE = (0.4, 0.15)


def episode_controller(kind: str) -> Controller:
    """The controller of one episode of ``kind`` (expert, medium or random)."""
    return controller_of_kind(kind, expert_controller, EXPERT_NOISE, MEDIUM_NOISE)


def build_episodes(task: str, quality: str, n_episodes: int, seed: int = 0, progress: bool = False) -> list[dict]:
    """``n_episodes`` scripted episodes of ``task`` at ``quality``, in ``write_dataset``'s format."""
    check_choice("pusher", task, quality, TASKS, QUALITIES)
    return record_plan(task, quality, episode_plan(quality, n_episodes, seed, QUALITIES), episode_controller, progress)
