"""Start-up shared by every command that trains: torch settings, the device, the offline data, a fresh agent."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from o2o.datasets.builders import ensure_dataset, parse_dataset_id
from o2o.datasets.data_settings import DataSettings
from o2o.datasets.minari_io import DatasetError, Transitions, load_transitions
from o2o.envs import TaskSpec
from o2o.envs.tasks import task_spaces
from o2o.envs.obs_spec import ObsSpec

from .calql import CalQLAgent
from .checkpoint import AgentSpec
from .config import CalQLConfig, PretrainConfig


def init_torch(seed: int, threads: int = 0) -> None:
    """Seed torch and set its CPU threads (0: torch's default)."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name)


def load_offline_data(cfg: PretrainConfig, task: TaskSpec, algo: CalQLConfig | None = None) -> Transitions:
    """The configured dataset as transitions (a camera task's with its frames); o2o's own ids are built on first use.

    ``algo`` (default ``cfg.algo``) gives the data settings: fine-tuning passes the checkpoint's."""
    algo = algo or cfg.algo
    built = parse_dataset_id(cfg.dataset)
    if built and built[0] != task.name:
        raise DatasetError(f"dataset {cfg.dataset} was built for task {built[0]}, not {task.name}")
    if cfg.build_missing_dataset:
        ensure_dataset(cfg.dataset, cfg.build_episodes, cfg.build_seed, rebuild=cfg.rebuild_dataset,
                       progress=cfg.progress)  # fmt: skip
    return load_transitions(cfg.dataset, task, DataSettings.of(algo))


def make_agent(cfg: PretrainConfig, task: TaskSpec, data: Transitions | None, device) -> tuple[CalQLAgent, AgentSpec]:
    """A fresh agent for ``task`` (with its cameras' encoders when it declares images); ``data`` (None:
    an online run from scratch) sets the state's statistics with ``net.normalize_observations``.

    The spaces are the task's env's, or a real-world task's dataset's (``task_spaces``)."""
    obs_space, action_space = task_spaces(task)
    obs_spec = ObsSpec.from_space(obs_space)  # a camera task: its state and images
    low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
    obs_dim, action_dim = obs_spec.state_dim, action_space.shape[0]
    source = "env" if not task.real_world else f"dataset {task.datasets[0]}" if task.datasets else "declared spaces"
    if data is not None and (data.obs_dim, data.action_dim) != (obs_dim, action_dim):
        raise DatasetError(f"the data has obs {data.obs_dim} / action {data.action_dim} dims, task {task.name}'s "
                           f"{source} {obs_dim} / {action_dim}")  # fmt: skip
    cameras = obs_spec.to_dict()["cameras"]
    if data is not None:
        frames = {name: list(f.shape[1:]) for name, f in data.frames.items()}
        if frames != cameras:
            raise DatasetError(f"the data's camera frames are {frames or 'none'}, task {task.name}'s {source} has "
                               f"{cameras or 'no camera'}")  # fmt: skip
    spec = AgentSpec(
        task=task.name,
        obs_dim=obs_dim,
        action_dim=action_dim,
        action_low=low.tolist(),
        action_high=high.tolist(),
        algo=dataclasses.asdict(cfg.algo),
        net=dataclasses.asdict(cfg.net),
        cameras=cameras,
    )
    agent = CalQLAgent(obs_spec, action_dim, cfg.algo, cfg.net, device)
    if cfg.net.normalize_observations and data is not None:
        agent.normalizer.set_statistics(data.obs.mean(0), data.obs.std(0))
    return agent, spec
