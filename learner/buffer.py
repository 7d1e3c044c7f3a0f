"""Device-resident transition buffer and the named mini-batch the agent trains on."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from o2o.datasets.minari_io import Transitions

# Dataset actions are clipped inside (-1, 1) so the tanh policy's log-prob stays finite
# (the official code clips to +-0.99999 as well).
ACTION_CLIP = 1.0 - 1e-5


@dataclasses.dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (B, obs_dim)
    action: torch.Tensor  # (B, act_dim), in [-1, 1]
    reward: torch.Tensor  # (B,), scaled
    next_obs: torch.Tensor  # (B, obs_dim)
    terminated: torch.Tensor  # (B,), 1 = terminal (no bootstrap); the row schema's name
    mc_return: torch.Tensor  # (B,)
    online_rows: int = 0  # the last ``online_rows`` rows come from online data (``mixed_batch`` puts them last)


FIELDS = [f.name for f in dataclasses.fields(Batch) if f.name != "online_rows"]
"""The stored columns (``online_rows`` describes the batch, not a row)."""


def concat_batches(first: Batch, last: Batch) -> Batch:
    """Rows of ``first`` then ``last``; online rows must stay at the end (``Batch.online_rows``)."""
    if first.online_rows and last.online_rows != len(last.reward):
        raise ValueError("concat_batches: online rows must come last")
    joined = {name: torch.cat([getattr(first, name), getattr(last, name)]) for name in FIELDS}
    return Batch(**joined, online_rows=first.online_rows + last.online_rows)


def offline_batch_rows(batch_size: int, offline_ratio: float) -> int:
    """Rows of a mixed batch drawn from the offline data (the rest are online rows): the one split
    formula of fine-tuning's batches (``mixed_batch``) and of the checks on them (SERA's)."""
    return int(round(batch_size * offline_ratio))


def normalize_actions(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Env actions -> [-1, 1] (the policy's tanh range)."""
    scaled = 2.0 * (action - low) / (high - low) - 1.0
    return np.clip(scaled, -ACTION_CLIP, ACTION_CLIP).astype(np.float32)


class TransitionBuffer:
    """Columns held as tensors on the training device; uniform sampling with no host sync.

    ``capacity`` rows are allocated up front; ``add`` appends (online data) and
    wraps around FIFO-style once full.
    """

    def __init__(self, obs_dim: int, action_dim: int, capacity: int, device: torch.device, online: bool = False):
        self.device = torch.device(device)
        self.capacity = capacity
        self.online = online  # rows acted online (their batches say so: SERA's bonus applies to them)
        shapes = {"obs": (obs_dim,), "action": (action_dim,), "next_obs": (obs_dim,)}
        self.columns = {
            name: torch.zeros((capacity, *shapes.get(name, ())), dtype=torch.float32, device=self.device)
            for name in FIELDS
        }
        self.size = 0
        self._next = 0

    @classmethod
    def from_transitions(
        cls, data: Transitions, low: np.ndarray, high: np.ndarray, device: torch.device, capacity: int | None = None
    ) -> "TransitionBuffer":
        buffer = cls(data.obs_dim, data.action_dim, capacity or len(data), device)
        buffer.add(
            obs=data.obs,
            action=normalize_actions(data.action, low, high),
            reward=data.reward,
            next_obs=data.next_obs,
            terminated=data.terminated,
            mc_return=data.mc_return,
        )
        return buffer

    def __len__(self) -> int:
        return self.size

    def add(self, **rows: np.ndarray) -> None:
        """Append rows given as arrays by field name (actions already in [-1, 1])."""
        n = len(rows["reward"])
        if n > self.capacity:
            rows = {k: v[-self.capacity :] for k, v in rows.items()}
            n = self.capacity
        idx = (self._next + torch.arange(n)) % self.capacity
        idx = idx.to(self.device)
        for name in FIELDS:
            self.columns[name][idx] = torch.as_tensor(rows[name], dtype=torch.float32).to(self.device, non_blocking=True)
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(**{name: col[idx] for name, col in self.columns.items()}, online_rows=batch_size if self.online else 0)

    def sample_rows(self, rows: torch.Tensor, batch_size: int) -> Batch:
        """A batch drawn uniformly from the given row indices (e.g. OOO's high-reward rows)."""
        idx = rows[torch.randint(0, len(rows), (batch_size,), device=self.device)]
        return Batch(**{name: col[idx] for name, col in self.columns.items()}, online_rows=batch_size if self.online else 0)

    def state_dict(self) -> dict:
        return {"size": self.size, "next": self._next}
