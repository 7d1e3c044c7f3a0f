"""PointMaze datasets made the way D4RL's maze2d data was: a waypoint controller.

The controller plans a shortest path through the maze cells (BFS from the goal
cell) and steers the ball with a PD law toward the centre of the next cell on
that path, or toward the exact goal once the ball is in the goal cell. It
re-plans every step, so noise and perturbations never leave it lost.

Qualities:

* ``expert``: the controller plus small Gaussian action noise (succeeds ~always).
* ``medium``: a much noisier controller: large Gaussian noise and frequent
  multi-step *bursts*, each either a held uniform-random action or a detour
  toward a random free cell (the D4RL "navigate to a random goal" motion).
* ``mixed``: replay-like: every other episode expert, the rest half medium and
  half uniform-random actions.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import gymnasium as gym
import numpy as np


from o2o.envs import get_task

from .common import Controller, check_choice, from_state, record_plan

QUALITIES = ("expert", "medium", "mixed")
TASKS = ("pointmaze-umaze", "pointmaze-medium", "pointmaze-umaze-pixels", "pointmaze-medium-pixels")

# D4RL maze2d's waypoint controller gains: action = KP * (waypoint - pos) - KD * vel.
KP = 10.0
KD = 1.0
_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))

Cell = tuple[int, int]
MazeKey = tuple[tuple[int | str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """How a noisy waypoint controller departs from the plan."""

    action_noise: float
    """Std of the Gaussian noise added to every action."""
    burst_prob: float = 0.0
    """Per-step chance to start a burst (when not already in one)."""
    burst_len: int = 0
    """Mean burst length in steps (drawn uniformly from [len/2, 3 len/2])."""


EXPERT = Perturbation(action_noise=0.1)
# Tuned (300 episodes, seeds 0 and 1) to land in the 40-70 % success band on both mazes:
# ~67 % on umaze (starts next to the goal keep it high), ~46 % on medium.
MEDIUM = Perturbation(action_noise=0.5, burst_prob=0.15, burst_len=60)


# --- maze planning ---------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _distance_to(maze: MazeKey, goal: Cell) -> np.ndarray:
    """BFS distance (in cells) from every cell to ``goal``; walls and unreachable cells are inf."""
    dist = np.full((len(maze), len(maze[0])), np.inf)
    dist[goal] = 0.0
    queue = collections.deque([goal])
    while queue:
        row, col = queue.popleft()
        for dr, dc in _NEIGHBOURS:
            nxt = (row + dr, col + dc)
            inside = 0 <= nxt[0] < dist.shape[0] and 0 <= nxt[1] < dist.shape[1]
            if inside and maze[nxt[0]][nxt[1]] != 1 and dist[nxt] == np.inf:
                dist[nxt] = dist[row, col] + 1
                queue.append(nxt)
    return dist


def _maze_key(env: gym.Env) -> MazeKey:
    # Hashable copy of the map, so the BFS result can be cached per (maze, goal cell).
    return tuple(tuple(row) for row in env.unwrapped.maze.maze_map)


def _cell(env: gym.Env, xy: np.ndarray) -> Cell:
    row, col = env.unwrapped.maze.cell_xy_to_rowcol(xy)
    return int(row), int(col)


def next_waypoint(env: gym.Env, pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where to steer from ``pos`` on a shortest cell path to ``target``: the next cell's
    centre, or ``target`` itself once the ball is in the target's cell.

    The straight line from anywhere in a cell to an adjacent cell's centre stays inside
    the two cells (their union is a rectangle), so the ball never aims through a wall.
    """
    here, goal = _cell(env, pos), _cell(env, target)
    if here == goal:
        return np.asarray(target, np.float64)
    dist = _distance_to(_maze_key(env), goal)
    rows, cols = dist.shape
    steps = [(here[0] + dr, here[1] + dc) for dr, dc in _NEIGHBOURS]
    best = min((c for c in steps if 0 <= c[0] < rows and 0 <= c[1] < cols), key=lambda c: dist[c])
    return env.unwrapped.maze.cell_rowcol_to_xy(np.array(best))


def _free_cells(env: gym.Env) -> list[Cell]:
    maze = env.unwrapped.maze.maze_map
    return [(r, c) for r, row in enumerate(maze) for c, v in enumerate(row) if v != 1]


def pd_action(obs: dict, waypoint: np.ndarray) -> np.ndarray:
    """D4RL's PD law toward ``waypoint``, clipped to the action box."""
    pos, vel = obs["observation"][:2], obs["observation"][2:4]
    return np.clip(KP * (waypoint - pos) - KD * vel, -1.0, 1.0)


# --- controllers -------------------------------------------------------------


class WaypointController:
    """Waypoint controller toward the episode's goal, with Gaussian noise and bursts.

    Stateful (the current burst), so make one per episode. Call signature is
    ``common.Controller``: ``act(obs, env, rng)``.
    """

    def __init__(self, perturbation: Perturbation):
        self.perturbation = perturbation
        self._burst_left = 0
        self._held_action: np.ndarray | None = None  # set during a random-action burst
        self._detour: np.ndarray | None = None  # set during a detour burst

    def __call__(self, obs: dict, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
        p = self.perturbation
        if self._burst_left == 0 and p.burst_prob > 0 and rng.random() < p.burst_prob:
            self._start_burst(env, rng)
        if self._burst_left > 0:
            self._burst_left -= 1
            action = self._burst_action(obs, env)
        else:
            action = pd_action(obs, next_waypoint(env, obs["observation"][:2], obs["desired_goal"]))
        return action + p.action_noise * rng.standard_normal(action.shape)

    def _start_burst(self, env: gym.Env, rng: np.random.Generator) -> None:
        length = self.perturbation.burst_len
        self._burst_left = int(rng.integers(length // 2, length * 3 // 2 + 1))
        self._held_action, self._detour = None, None
        if rng.random() < 0.5:
            self._held_action = rng.uniform(-1.0, 1.0, size=2)
        else:
            cells = _free_cells(env)
            cell = cells[rng.integers(len(cells))]
            self._detour = env.unwrapped.maze.cell_rowcol_to_xy(np.array(cell))

    def _burst_action(self, obs: dict, env: gym.Env) -> np.ndarray:
        """The noiseless action of the running burst: the held action, or toward the detour cell."""
        if self._held_action is not None:
            return self._held_action
        return pd_action(obs, next_waypoint(env, obs["observation"][:2], self._detour))


def random_action(obs: dict, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """Uniform random force: the reference 'random policy' of the maze tasks."""
    return rng.uniform(env.action_space.low, env.action_space.high)


def episode_controller(kind: str) -> Controller:
    """A fresh controller for one episode of ``kind`` (expert, medium or random)."""
    if kind == "expert":
        return WaypointController(EXPERT)
    if kind == "medium":
        return WaypointController(MEDIUM)
    if kind == "random":
        return random_action
    raise ValueError(f"unknown controller kind {kind!r}; choose expert, medium or random")


# --- datasets ----------------------------------------------------------------


def episode_plan(quality: str, index: int, seed: int) -> tuple[str, int]:
    """(controller kind, env/noise seed) of episode ``index``.

    Each episode draws from its own generator keyed on (seed, quality, index), so the
    first k episodes of a larger build are the same as a build of k episodes, and the
    qualities do not replay each other's start/goal layouts.
    """
    rng = np.random.default_rng([seed, QUALITIES.index(quality), index])
    episode_seed = int(rng.integers(2**31))
    if quality != "mixed":
        return quality, episode_seed
    if index % 2 == 0:  # exactly half expert
        return "expert", episode_seed
    return ("medium" if rng.random() < 0.5 else "random"), episode_seed


def build_episodes(task: str, quality: str, n_episodes: int, seed: int = 0, progress: bool = False) -> list[dict]:
    """Record ``n_episodes`` of the ``quality`` controller on ``task`` (``write_dataset`` format)."""
    check_choice("pointmaze", task, quality, TASKS, QUALITIES)
    plan = [episode_plan(quality, index, seed) for index in range(n_episodes)]
    controller_for = episode_controller
    if get_task(task).camera is not None:  # the same controllers, driven by the state behind the pixels
        controller_for = lambda kind: from_state(episode_controller(kind))  # noqa: E731
    return record_plan(task, quality, plan, controller_for, progress)
