"""Offline training: the whole pretraining phase, and the loop that OOO retraining reuses.

``pretrain`` is what ``o2o-pretrain`` runs (and ``o2o-learner`` without a pretrained checkpoint);
``train`` is its update loop, with logging, evaluation, checkpoints and the ONNX export, on
batches from any sampler (``o2o-retrain`` passes its offline + store mix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from o2o.envs import TaskSpec, get_task

from .buffer import Batch, TransitionBuffer
from .cadence import Cadence, Evaluations, log_train
from .calql import CalQLAgent
from .checkpoint import CHECKPOINT_NAME, AgentSpec, load_checkpoint, save_checkpoint
from .config import PretrainConfig
from .evaluation import not_evaluated
from .export_onnx import export_policy
from .metric_keys import TRAIN
from .metrics import MetricsLogger, RunningMean
from .q_bound import QBound
from .setup import init_torch, load_offline_data, make_agent, resolve_device
from .stopping import Stopped, deferred

log = logging.getLogger("o2o.pretrain")


def pretrain(cfg: PretrainConfig, run_dir: Path) -> dict:
    """The whole offline phase; returns the last evaluation ({} for a real-world task)."""
    init_torch(cfg.seed, cfg.threads)
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
    log.info("offline buffer: %s", buffer.memory.line())
    return train(cfg, run_dir, agent, spec, task, lambda: buffer.sample(cfg.batch_size), start)


def train(cfg: PretrainConfig, run_dir: Path, agent: CalQLAgent, spec: AgentSpec, task: TaskSpec,
          sample: Callable[[], Batch], start: int = 0, desc: str = "pretrain") -> dict:  # fmt: skip
    """Offline updates from ``start`` to ``cfg.steps`` on batches from ``sample``, with logging,
    evaluation, checkpoints and the ONNX export (pretraining and OOO retraining); returns the
    last evaluation ({} when there is none: a real-world task has no simulator to evaluate in)."""
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    logger = MetricsLogger(run_dir)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    evaluations = Evaluations(agent, task, cfg.eval, low, high, logger)
    logs, saves = (Cadence(every, start, last=cfg.steps) for every in (cfg.log_every, cfg.checkpoint_every))
    skipped = not_evaluated(task)
    if skipped:
        log.info("%s", skipped)
    evals = Cadence(0) if skipped else Cadence(cfg.eval.every, start, last=cfg.steps)  # Cadence(0): never due

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, agent, spec, step)
        # TorchScript: ~0.2 s instead of 4-10 s for the dynamo exporter, the same verified policy
        # (parity with torch is checked either way); `o2o-export` offers both.
        export_policy(agent, spec, run_dir / "policy.onnx", step=step, exporter="torchscript")

    running, done = RunningMean(), start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc=desc)
    try:
        for step in bar:
            with deferred():  # a stop lands between updates: the checkpoint holds whole updates
                running.add(agent.update(sample()))
                done = step + 1
            if logs.due(done):
                shown = log_train(logger, running, done)
                score = evaluations.results[-1]["normalized_score"] if evaluations.results else "-"
                bar.set_postfix(q=f"{shown['train/q_data']:.2f}", mc=f"{shown['train/mc_return']:.2f}",
                                bound=f"{shown['train/bound_rate']:.2f}", eval=score)  # fmt: skip
            if evals.due(done):
                result = evaluations.run(done)
                tqdm.write(f"step {done}: eval return {result['return']:.2f}, success {result['success']:.0%}, "
                           f"score {result['normalized_score']:.1f}")
            if saves.due(done):
                checkpoint(done)
    except KeyboardInterrupt:  # SIGTERM/SIGINT (stopping.py): save the last whole update as the end does
        bar.close()
        if running.count:
            logger.log(done, TRAIN, running.pop())
        checkpoint(done)  # ~0.2 s with its ONNX export; a second signal exits without waiting
        logger.close()
        log.info("stopped at step %d: checkpoint and policy written to %s", done, run_dir)
        raise Stopped(done, run_dir / CHECKPOINT_NAME) from None
    if start >= cfg.steps:
        log.info("checkpoint is already at step %d >= steps=%d: nothing to do", start, cfg.steps)
        checkpoint(start)
    logger.close()
    return evaluations.results[-1] if evaluations.results else {}
