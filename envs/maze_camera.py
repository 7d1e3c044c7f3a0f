"""A top-down camera for PointMaze, drawn with numpy from the simulator state (no OpenGL: every machine,
CI included, renders it).

The image shows the walls (grey), the goal (green disc) and the ball (red disc) on a black floor,
the whole maze scaled into a square image; the state vector is the ball's velocity. Position and goal
are in the image only, so a policy must read them from the pixels, as a robot's camera would give them.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from .obs_spec import STATE_KEY

CAMERA = "top"
IMAGE_SIZE = 48  # pixels a side: 9.6 per umaze cell, 6 per medium cell; DrQ's 84x84 costs 3x the encoder
# compute per frame (pixel Cal-QL at batch 256: ~2 updates/s at 84x84 on 2 CPU cores), so the pixel mazes
# train in minutes on a CPU, as the state mazes do. A real camera's size is its env's to declare.
WALL, FLOOR, GOAL, BALL = (120, 120, 120), (0, 0, 0), (40, 200, 60), (230, 40, 40)
BALL_RADIUS = 0.1  # PointMaze's ball (world units; a maze cell is maze_size_scaling = 1)
GOAL_RADIUS = 0.25  # larger than the ball so that the goal stays visible under it


class MazeTopCamera(gym.ObservationWrapper):
    """PointMaze with ``{"state": velocity (2,), "top": uint8 (size, size, 3)}`` observations."""

    def __init__(self, env: gym.Env, size: int = IMAGE_SIZE):
        super().__init__(env)
        maze = env.unwrapped.maze
        self.size = size
        # World coordinates of each pixel's centre: the maze's longer side fills the image, the other is centred.
        span = max(maze.map_width, maze.map_length) * maze.maze_size_scaling
        centres = (np.arange(size) + 0.5) * span / size - span / 2
        self._x, self._y = centres[None, :], -centres[:, None]  # image row 0 is the maze's top (largest y)
        self._pixel = span / size
        self.background = self._draw_walls(maze)
        self.last_raw_obs: dict | None = None  # PointMaze's own observation, for scripted controllers
        self.observation_space = gym.spaces.Dict({
            STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
            CAMERA: gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
        })  # fmt: skip

    def _draw_walls(self, maze) -> np.ndarray:
        image = np.empty((self.size, self.size, 3), np.uint8)
        image[:] = FLOOR
        scale = maze.maze_size_scaling
        col = np.floor((self._x + maze.x_map_center) / scale).astype(int)
        row = np.floor((maze.y_map_center - self._y) / scale).astype(int)
        grid = np.asarray(maze.maze_map)
        rows, cols = np.broadcast_arrays(row, col)
        inside = (rows >= 0) & (rows < grid.shape[0]) & (cols >= 0) & (cols < grid.shape[1])  # a non-square maze's margin
        wall = np.zeros(rows.shape, bool)
        wall[inside] = grid[rows[inside], cols[inside]] == 1
        image[wall] = WALL
        return image

    def _disc(self, centre: np.ndarray, radius: float) -> np.ndarray:
        # At least 2 pixels of radius: the ball stays 4-5 pixels wide in the larger mazes and survives the JPEG
        # encoding of Minari datasets (edges of a 2-3 pixel ball came back off by up to 131 of 255).
        r = max(radius, 2.0 * self._pixel)
        return (self._x - centre[0]) ** 2 + (self._y - centre[1]) ** 2 <= r * r

    def render_top(self, ball: np.ndarray, goal: np.ndarray) -> np.ndarray:
        image = self.background.copy()
        image[self._disc(goal, GOAL_RADIUS)] = GOAL
        image[self._disc(ball, BALL_RADIUS)] = BALL
        return image

    def observation(self, obs: dict) -> dict:
        self.last_raw_obs = obs
        state = np.asarray(obs["observation"][2:4], np.float32)
        return {STATE_KEY: state, CAMERA: self.render_top(obs["achieved_goal"], obs["desired_goal"])}
