"""`o2o-pretrain`: offline Cal-QL pretraining on a Minari dataset (Hydra entry point).

    o2o-pretrain                                   # pointmaze-umaze, preset small, builds its dataset
    o2o-pretrain task=pusher steps=5000            # another task
    o2o-pretrain task=fetch-push preset=paper      # the official settings of the task's domain
    o2o-pretrain resume=runs/pretrain/pusher/...   # continue a run from its checkpoint

Writes into the run folder: metrics.jsonl, tb/ (TensorBoard), checkpoint.pt,
policy.onnx, config.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from o2o.datasets.builders import ensure_dataset, parse_dataset_id
from o2o.datasets.minari_io import DatasetError, Transitions, load_transitions, open_dataset
from o2o.envs import TaskSpec, get_task, make_env

from .buffer import Batch, TransitionBuffer
from .calql import CalQLAgent
from .checkpoint import CHECKPOINT_NAME, AgentSpec, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import CalQLConfig, PretrainConfig
from .divergence import DivergedError, check_losses
from .evaluation import evaluate
from .export_onnx import export_policy
from .metrics import MetricsLogger, RunningMean
from .online_data import QBound
from .stopping import Stopped, deferred, graceful_stop, requested

log = logging.getLogger("o2o.pretrain")

ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name)


def load_offline_data(cfg: PretrainConfig, task: TaskSpec, algo: CalQLConfig | None = None) -> Transitions:
    """The configured dataset as transitions; o2o's own ids are built on first use.

    ``algo`` (default ``cfg.algo``) gives the data settings: fine-tuning passes the checkpoint's."""
    algo = algo or cfg.algo
    built = parse_dataset_id(cfg.dataset)
    if built and built[0] != task.name:
        raise DatasetError(f"dataset {cfg.dataset} was built for task {built[0]}, not {task.name}")
    if cfg.build_missing_dataset:
        ensure_dataset(cfg.dataset, cfg.build_episodes, cfg.build_seed, rebuild=cfg.rebuild_dataset,
                       progress=cfg.progress)  # fmt: skip
    return load_transitions(
        cfg.dataset, task, gamma=algo.discount, reward_scale=algo.reward_scale, reward_bias=algo.reward_bias,
        infinite_horizon=algo.mc_infinite_horizon,
    )


def make_agent(cfg: PretrainConfig, task: TaskSpec, data: Transitions | None, device) -> tuple[CalQLAgent, AgentSpec]:
    """A fresh agent for ``task``; ``data`` (None: an online run from scratch) sets the observation
    statistics with ``net.normalize_observations``."""
    env = make_env(task)
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    if data is not None and (data.obs_dim, data.action_dim) != (obs_dim, action_dim):
        raise DatasetError(f"the data has obs {data.obs_dim} / action {data.action_dim} dims, task {task.name}'s env "
                           f"{obs_dim} / {action_dim}")  # fmt: skip
    spec = AgentSpec(
        task=task.name,
        obs_dim=obs_dim,
        action_dim=action_dim,
        action_low=low.tolist(),
        action_high=high.tolist(),
        algo=dataclasses.asdict(cfg.algo),
        net=dataclasses.asdict(cfg.net),
    )
    agent = CalQLAgent(obs_dim, action_dim, cfg.algo, cfg.net, device)
    if cfg.net.normalize_observations and data is not None:
        agent.normalizer.set_statistics(data.obs.mean(0), data.obs.std(0))
    return agent, spec


def pretrain(cfg: PretrainConfig, run_dir: Path) -> dict:
    """The whole offline phase; returns the last evaluation."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task)
    data = load_offline_data(cfg, task)
    log.info("%s: %d transitions, obs %d, action %d, device %s", cfg.dataset, len(data), data.obs_dim, data.action_dim, device)

    agent, spec = make_agent(cfg, task, data, device)
    if cfg.algo.q_target_clip:  # OOO bounds Q' from the first offline step (the online learner widens it)
        QBound(agent, cfg.algo.discount, data.reward)
    start = 0
    if cfg.resume:
        resumed, _, payload = load_checkpoint(cfg.resume, device, restore_rng=True)
        agent.load_training_state(resumed.training_state())
        start = payload["step"]
        log.info("resumed from %s at step %d", cfg.resume, start)
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    buffer = TransitionBuffer.from_transitions(data, low, high, device)
    return train(cfg, run_dir, agent, spec, task, lambda: buffer.sample(cfg.batch_size), start)


def train(cfg: PretrainConfig, run_dir: Path, agent: CalQLAgent, spec: AgentSpec, task: TaskSpec,
          sample: Callable[[], Batch], start: int = 0, desc: str = "pretrain") -> dict:  # fmt: skip
    """Offline updates from ``start`` to ``cfg.steps`` on batches from ``sample``, with logging,
    evaluation, checkpoints and the ONNX export (pretraining and OOO retraining); returns the
    last evaluation."""
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    logger = MetricsLogger(run_dir)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, agent, spec, step)
        # TorchScript: ~0.2 s instead of 4-10 s for the dynamo exporter, the same verified policy
        # (parity with torch is checked either way); `o2o-export` offers both.
        export_policy(agent, spec, run_dir / "policy.onnx", step=step, exporter="torchscript")

    running, last_eval, done = RunningMean(), {}, start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc=desc)
    try:
        for step in bar:
            with deferred():  # a stop lands between updates: the checkpoint holds whole updates
                running.add(agent.update(sample()))
                done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                shown = logger.log(done, "train", running.pop())
                check_losses(shown, done)
                bar.set_postfix(q=f"{shown['train/q_data']:.2f}", mc=f"{shown['train/mc_return']:.2f}",
                                bound=f"{shown['train/bound_rate']:.2f}", eval=last_eval.get("normalized_score", "-"))
            if (cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.steps:
                last_eval = evaluate(agent, task, cfg.eval.episodes, cfg.eval.seed, low, high)
                logger.log(done, "eval", last_eval)
                tqdm.write(f"step {done}: eval return {last_eval['return']:.2f}, success {last_eval['success']:.0%}, "
                           f"score {last_eval['normalized_score']:.1f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
    except KeyboardInterrupt:  # SIGTERM/SIGINT (stopping.py): save the last whole update as the end does
        bar.close()
        if running.count:
            logger.log(done, "train", running.pop())
        checkpoint(done)  # ~0.2 s with its ONNX export; a second signal exits without waiting
        logger.close()
        log.info("stopped at step %d: checkpoint and policy written to %s", done, run_dir)
        raise Stopped(done, run_dir / CHECKPOINT_NAME) from None
    if start >= cfg.steps:
        log.info("checkpoint is already at step %d >= steps=%d: nothing to do", start, cfg.steps)
        checkpoint(start)
    logger.close()
    return last_eval


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="pretrain")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: PretrainConfig = OmegaConf.to_object(dict_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        # resume= continues that run in its own folder (a run folder or its checkpoint file), as online.
        run_dir = resolve_checkpoint(cfg.resume).parent if cfg.resume else run_dir
        pretrain(cfg, run_dir)
    except (DatasetError, DivergedError, KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"o2o-pretrain: error: {message}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(f"o2o-pretrain: stopped by {requested() or 'KeyboardInterrupt'} at step {stop.step} of {cfg.steps}; "
              f"checkpoint and policy written to {run_dir} (the same command with resume={run_dir} continues "
              "it)")  # fmt: skip
        return
    except KeyboardInterrupt:  # while loading or building the data
        print(f"o2o-pretrain: stopped by {requested() or 'KeyboardInterrupt'} before the first update: no checkpoint "
              "written")  # fmt: skip
        return
    print(f"run folder: {run_dir}\n  checkpoint: {run_dir / CHECKPOINT_NAME}\n  policy:     {run_dir / 'policy.onnx'}")


def main() -> None:
    with graceful_stop("o2o-pretrain"):  # SIGTERM too stops gracefully; a second signal exits at once
        _hydra_main()


if __name__ == "__main__":
    main()
