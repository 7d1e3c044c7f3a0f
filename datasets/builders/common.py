"""What every dataset builder shares: recording episodes and reporting their quality."""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from o2o.envs import make_env

# act(obs, env, rng) -> action in the env's action space (before clipping).
Controller = Callable[[object, gym.Env, np.random.Generator], np.ndarray]


def record_episode(env: gym.Env, act: Controller, seed: int) -> dict:
    """Run one episode and return it in ``write_dataset``'s episode format.

    ``env`` is an unflattened task env (``make_env(task, flatten=False)``), so the
    dataset records observations as the env gives them (dicts for goal envs).
    Actions are clipped to the action space before they are stepped and stored.
    """
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    episode = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
    success = [bool(info.get("success", False))]
    while True:
        action = np.clip(np.asarray(act(obs, env, rng), np.float32), low, high)
        obs, reward, terminated, truncated, info = env.step(action)
        episode["observations"].append(obs)
        episode["actions"].append(action)
        episode["rewards"].append(float(reward))
        episode["terminations"].append(bool(terminated))
        episode["truncations"].append(bool(truncated))
        success.append(bool(info["success"]))
        if terminated or truncated:
            break
    episode["infos"] = {"success": success}
    return episode


def episode_succeeded(episode: dict) -> bool:
    """An episode succeeds if the task reported success at its last step (or at a success-terminal step)."""
    return bool(episode["infos"]["success"][-1])


def quality_summary(episodes: list[dict]) -> dict:
    returns = np.array([sum(ep["rewards"]) for ep in episodes])
    return {
        "episodes": len(episodes),
        "steps": int(sum(len(ep["actions"]) for ep in episodes)),
        "success_rate": float(np.mean([episode_succeeded(ep) for ep in episodes])),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
    }


def check_choice(builder: str, task: str, quality: str, tasks: tuple[str, ...], qualities: tuple[str, ...]) -> None:
    if task not in tasks:
        raise ValueError(f"{builder} builder: unknown task {task!r}; choose one of {', '.join(tasks)}")
    if quality not in qualities:
        raise ValueError(f"{builder} builder: unknown quality {quality!r}; choose one of {', '.join(qualities)}")


def record_plan(
    task: str, quality: str, plan: list[tuple[str, int]], controller_for: Callable[[str], Controller], progress: bool
) -> list[dict]:
    """Record one episode per (controller kind, reset seed) of ``plan`` on an unflattened task env."""
    env = make_env(task, flatten=False)
    try:
        return [
            record_episode(env, controller_for(kind), seed)
            for kind, seed in tqdm(plan, desc=f"building dataset {task}/{quality}", unit="episode", disable=not progress)
        ]
    finally:
        env.close()


def from_state(controller: Controller) -> Controller:
    """A state task's controller driving its camera task: it reads the simulator's own observation, which
    the camera wrappers keep (``last_raw_obs``: envs/maze_camera.py, envs/mujoco_camera.py); the dataset
    records the pixels. With the same seeds a pixel dataset holds the same trajectories as the state one."""
    return lambda obs, env, rng: controller(env.last_raw_obs, env, rng)


def random_controller(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
    """A uniform random action in the env's action space."""
    space = env.action_space
    return rng.uniform(space.low, space.high).astype(np.float32)


def noisy(controller: Controller, noise_std: float, random_prob: float) -> Controller:
    """The controller with Gaussian action noise and, with ``random_prob``, a uniform random action."""

    def act(obs: np.ndarray, env: gym.Env, rng: np.random.Generator) -> np.ndarray:
        if random_prob > 0 and rng.random() < random_prob:
            return random_controller(obs, env, rng)
        action = controller(obs, env, rng)
        return action + rng.normal(0.0, noise_std, action.shape).astype(np.float32)

    return act


def controller_of_kind(kind: str, expert: Controller, expert_noise: tuple[float, float],
                       medium_noise: tuple[float, float]) -> Controller:  # fmt: skip
    """One episode's controller: ``random``, or the expert with its kind's (noise std, random-action probability)."""
    if kind == "random":
        return random_controller
    noise_std, random_prob = expert_noise if kind == "expert" else medium_noise
    return noisy(expert, noise_std, random_prob)


# mixed: a replay-like mixture of whole episodes of these kinds, with these probabilities (pusher, arm-reach, fetch).
MIXED_KINDS = ("expert", "medium", "random")
MIXED_PROBS = (0.5, 0.25, 0.25)


def episode_plan(quality: str, n_episodes: int, seed: int, qualities: tuple[str, ...]) -> list[tuple[str, int]]:
    """(kind, reset seed) of every episode, reproducible from ``seed``; the quality is mixed into the seed so
    that the datasets of one seed do not all start alike; ``mixed`` draws each episode's kind by MIXED_PROBS."""
    rng = np.random.default_rng([seed, qualities.index(quality)])
    seeds = rng.integers(0, 2**31 - 1, size=n_episodes)
    return list(zip(episode_kinds(quality, n_episodes, rng), map(int, seeds)))


def episode_kinds(quality: str, n_episodes: int, rng: np.random.Generator) -> list[str]:
    """The controller kind of each episode: ``quality`` itself, or for ``mixed`` drawn by MIXED_PROBS."""
    if quality == "mixed":
        return [str(kind) for kind in rng.choice(MIXED_KINDS, size=n_episodes, p=MIXED_PROBS)]
    return [quality] * n_episodes
