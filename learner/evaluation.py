"""Deterministic evaluation episodes of the current policy in the task's env (a real-world task has none)."""

from __future__ import annotations

import numpy as np
import torch

from o2o.envs import TaskSpec, make_env

from .calql import CalQLAgent
from .metric_keys import ACTOR_EVAL, ONLINE


def not_evaluated(task: TaskSpec) -> str | None:
    """Why the learner runs no evaluation episodes of ``task`` (None: it runs them): a real-world task has no
    simulator, and its success rate is what the actors' episodes log."""
    if not task.real_world:
        return None
    return (f"task {task.name} is a real-world task: the learner runs no evaluation episodes (no simulator); its "
            f"success rate is the actors' episodes' ({ONLINE}/ and {ACTOR_EVAL}/ records in metrics.jsonl)")


@torch.no_grad()
def evaluate(agent: CalQLAgent, task: TaskSpec, episodes: int, seed: int, low: np.ndarray, high: np.ndarray) -> dict:
    """Mean return, success rate, episode length and normalised score over ``episodes`` runs (a real-world task:
    ``make_env`` says there is no simulator; ask ``not_evaluated`` first)."""
    env = make_env(task)
    returns, successes, lengths = [], [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, steps, done, info = 0.0, 0, False, {}
        while not done:
            # A camera task's Dict observation: the state, and each camera's uint8 image (never augmented here).
            state, images = agent.obs_spec.split(obs)
            state_t = torch.as_tensor(state, device=agent.device).unsqueeze(0)
            images_t = {name: torch.as_tensor(im, device=agent.device).unsqueeze(0) for name, im in images.items()}
            action = agent.policy.deterministic(agent.encode(state_t, images_t))[0].cpu().numpy()
            action = low + (action + 1.0) * 0.5 * (high - low)
            obs, reward, terminated, truncated, info = env.step(action)
            total, steps, done = total + reward, steps + 1, terminated or truncated
        returns.append(total)
        successes.append(bool(info.get("success", False)))
        lengths.append(steps)
    env.close()
    mean_return, success_rate = float(np.mean(returns)), float(np.mean(successes))
    return {
        "return": mean_return,
        "success": success_rate,
        "length": float(np.mean(lengths)),
        "normalized_score": task.normalized_score(mean_return, success_rate),
    }
