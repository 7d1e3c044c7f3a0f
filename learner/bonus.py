"""The exploration-bonus interface: what the agent asks of a bonus, and how bonuses are found.

A bonus is an ``nn.Module`` the agent holds under its name (``agent.rnd``, ``agent.sera``), so its
weights sit in the agent's ``state_dict()`` as ``<name>.*``. It adds a reward to each row inside
the TD target only (the policy loss and the Cal-QL bound never see it), may train itself after
the agent's losses, and may set itself up when fine-tuning starts.

On a camera task a bonus sees observations through ``agent.bonus_input(state, images)``: the
features of one fixed, randomly initialised encoder per agent (RE3, Seo et al. 2021), then the
state. On a state task ``bonus_input`` returns the state as given.

A new bonus is one file and one config field: a ``Bonus`` subclass, and a bool field of
``CalQLConfig`` that switches it on, named as the bonus and pointing at the class
(``field(default=False, metadata={"bonus": "o2o.learner.<file>:<Class>"})``). Its other
settings are ``CalQLConfig`` / ``NetworkConfig`` fields its ``from_config`` reads.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import nn


class Bonus(nn.Module):
    """One exploration bonus. Every method but ``reward`` and ``from_config`` has a do-nothing default."""

    name: str = ""
    """The config field that switches it on, and its ``state_dict`` prefix in the agent."""

    @classmethod
    def from_config(cls, obs_dim: int, action_dim: int, cfg, net, device) -> "Bonus":
        """The bonus for an agent with these shapes and ``algo`` (``cfg``) / ``net`` settings; ``obs_dim`` is
        the width of what ``agent.bonus_input`` gives (the state dim on a state task)."""
        raise NotImplementedError

    def reward(self, agent, batch) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """Its reward per row of ``batch`` (already weighted by its coefficient; 0.0: none) and its metrics."""
        raise NotImplementedError

    def train_step(self, agent, batch) -> dict[str, torch.Tensor]:
        """Its own update, after the agent's losses (which saw the pre-update bonus); returns metrics."""
        return {}

    def start_fine_tuning(self, agent, batch_size: int, offline_ratio: float, from_scratch: bool) -> str | None:
        """Called once when online fine-tuning starts (also on resume); raises ValueError for settings it
        cannot work with; returns a line to log, if any."""
        return None

    def optimizer_state(self) -> dict:
        """Checkpoint entries beside the agent's (e.g. its optimiser's state), by top-level key."""
        return {}

    def prepare_load(self, agent, weights: dict[str, torch.Tensor], state: dict) -> list[str]:
        """Before the agent loads a checkpoint: match this bonus to the checkpoint's ``weights`` (the
        agent's whole state dict, which it may complete) and ``state``; returns notes to log."""
        return []

    def reset_learning_rate(self) -> None:
        """Back to the configured learning rate after a saved optimiser state was loaded."""


def bonus_fields(cfg) -> list[dataclasses.Field]:
    """The config fields that switch a bonus on (they carry ``metadata["bonus"]``), in declaration order."""
    return [f for f in dataclasses.fields(cfg) if "bonus" in f.metadata]


def bonus_names(cfg) -> list[str]:
    return [f.name for f in bonus_fields(cfg)]


def build_bonuses(obs_dim: int, action_dim: int, cfg, net, device) -> list[Bonus]:
    """The bonuses ``cfg`` switches on, in the order its fields are declared (their rewards add up in it)."""
    bonuses = []
    for f in bonus_fields(cfg):
        if getattr(cfg, f.name):
            module, cls_name = f.metadata["bonus"].split(":")
            cls = getattr(importlib.import_module(module), cls_name)
            bonus = cls.from_config(obs_dim, action_dim, cfg, net, device)
            bonus.name = f.name
            bonuses.append(bonus)
    return bonuses
