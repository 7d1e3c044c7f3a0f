"""Checkpoints that resume exactly: networks (encoders included), optimiser, temperatures, RNG, counters, config.

Written atomically (temp file + rename), read with ``torch.load(weights_only=True)``:
a checkpoint holds tensors, numbers, strings and lists only, never pickled objects.
A non-finite agent is never written: the last good checkpoint stays in place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch

from o2o.datasets.atomic_file import replacing
from o2o.envs.obs_spec import ObsSpec

from .calql import CalQLAgent
from .config import CalQLConfig, NetworkConfig, OnlineConfig
from .divergence import ADVICE, DivergedError, non_finite_tensors

CHECKPOINT_NAME = "checkpoint.pt"

log = logging.getLogger("o2o.checkpoint")

RETIRED_ALGO_FIELDS = ("offline_ratio",)
"""`algo` keys of older checkpoints that CalQLConfig no longer declares: offline_ratio, the fine-tuning
batch mix, is now the learner's own setting (OnlineConfig.offline_ratio), not the agent's."""


@dataclasses.dataclass
class AgentSpec:
    """What an agent was built for: enough to rebuild it (and its ONNX export) from a checkpoint."""

    task: str
    obs_dim: int
    action_dim: int
    action_low: list[float]
    action_high: list[float]
    algo: dict
    net: dict
    cameras: dict = dataclasses.field(default_factory=dict)
    """{camera: [H, W, C]} of a camera task (``obs_dim`` is then its state's); {} for a state task and in
    checkpoints written before cameras."""

    @property
    def obs_spec(self) -> ObsSpec:
        return ObsSpec.from_dict({"state_dim": self.obs_dim, "cameras": self.cameras})

    def __post_init__(self):
        # An older checkpoint's stale `algo` keys are dropped (CalQLConfig(**algo) would refuse them), so it
        # still loads, fine-tunes and exports; a mix other than the default is no longer applied: say so.
        retired = {k: v for k, v in self.algo.items() if k in RETIRED_ALGO_FIELDS}
        self.algo = {k: v for k, v in self.algo.items() if k not in retired}
        ratio = retired.get("offline_ratio", OnlineConfig.offline_ratio)
        if ratio != OnlineConfig.offline_ratio:
            log.warning("the checkpoint's algo.offline_ratio=%r is no longer read: the fine-tuning mix is the "
                        "learner's own offline_ratio (default %r; offline_ratio=%r keeps this one)", ratio,
                        OnlineConfig.offline_ratio, ratio)  # fmt: skip

    def build_agent(self, device="cpu") -> CalQLAgent:
        algo = CalQLConfig(**{**self.algo, "compile": False})
        return CalQLAgent(self.obs_spec, self.action_dim, algo, NetworkConfig(**self.net), device)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, agent: CalQLAgent, spec: AgentSpec, step: int, extra: dict | None = None) -> Path:
    path = Path(path)
    bad = non_finite_tensors(agent)
    if bad:
        raise DivergedError(f"not writing {path} at step {step}: the agent holds non-finite values in "
                            f"{', '.join(bad[:5])}; the previous checkpoint (if any) is kept. {ADVICE}")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "step": step,
        "spec": dataclasses.asdict(spec),
        "rng": _rng_state(),
        **agent.training_state(),
        "extra": extra or {},
    }
    with replacing(path) as tmp:
        torch.save(payload, tmp)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a checkpoint file or a run folder holding {CHECKPOINT_NAME})")
    return path


def load_checkpoint(path: str | os.PathLike, device="cpu", restore_rng: bool = False,
                    algo: dict | None = None) -> tuple[CalQLAgent, AgentSpec, dict]:  # fmt: skip
    """Agent (weights, targets, optimiser) + its spec + the raw payload (step, extra).

    ``algo`` replaces the checkpoint's algorithm settings (fine-tuning: see ``fine_tuning``)."""
    payload = torch.load(resolve_checkpoint(path), map_location=device, weights_only=True)
    spec = AgentSpec(**{**payload["spec"], **({} if algo is None else {"algo": dict(algo)})})
    agent = spec.build_agent(device)
    for note in agent.load_training_state(payload):
        log.info("%s: %s", path, note)
    if restore_rng:
        _set_rng_state(payload["rng"])
    return agent, spec, payload


def action_bounds(spec: AgentSpec) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
