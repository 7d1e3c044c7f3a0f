"""`o2o-learner`: online Cal-QL fine-tuning fed by decoupled actors (Hydra entry point).

    o2o-learner pretrained=runs/pretrain/pusher/<time> task=pusher endpoint=tcp://0.0.0.0:5555
    o2o-learner resume=runs/online/pusher/<time>        # after a crash: the store is the source of truth

The learner binds ``endpoint``; actors (``o2o-actor``) connect, send transitions
and receive each policy it publishes. Committed rows land in the Zarr store
(``<run>/replay``); finished episodes (with their MC returns, so calibration stays
on online) feed the sampling buffer, mixed with the offline data at
``offline_ratio``. Updates follow ``utd`` with a samples-per-insert limiter. The
algorithm settings are the checkpoint's, with what the command changes explicitly
(``fine_tuning``).

Where the parts live: start-up shared with the other commands in setup.py, the fleet side (store,
publisher, hold, statistics) in fleet.py, the log / evaluate / checkpoint cadence in cadence.py,
offline RL as a subroutine (both modes) in subroutine.py.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from o2o.datasets.minari_io import DatasetError
from o2o.datasets.replay_store import ReplayStore, StoreError
from o2o.envs import get_task
from o2o.transport.ingest import IngestServer, check_commit_interval
from o2o.transport.security import LearnerKeys, require_keys_off_loopback

from . import stopping
from .buffer import TransitionBuffer
from .cadence import Cadence, Evaluations, log_train
from .checkpoint import CHECKPOINT_NAME, AgentSpec, action_bounds, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import OnlineConfig, PretrainConfig
from .divergence import DivergedError
from .fine_tuning import explicit_keys, fine_tuning_algo, moved_key_error
from .fleet import FleetHold, FleetMonitor, PolicyPublisher, open_store
from .metric_keys import ACTOR_EVAL, COMMITTED_ROWS, INTERVENTION_RATE, ONLINE, TRAIN, evaluation_line
from .metrics import MetricsLogger, RunningMean
from .offline import pretrain
from .online_data import OnlineData, UpdateLimiter, mixed_batch
from .q_bound import QBound
from .status_file import StatusFile, write_learner_state
from .setup import init_torch, load_offline_data, make_agent, resolve_device
from .subroutine import Retrainer, Subroutine

log = logging.getLogger("o2o.learner")

ConfigStore.instance().store(name="online_schema", node=OnlineConfig)

UPDATE_BURST = 10


def starting_checkpoint(cfg: OnlineConfig, run_dir: Path) -> Path:
    """The checkpoint to fine-tune: resume > pretrained > a fresh offline pretraining run."""
    if cfg.resume:
        return resolve_checkpoint(cfg.resume)
    if cfg.pretrained:
        return resolve_checkpoint(cfg.pretrained)
    log.info("no pretrained checkpoint given: pretraining for %d updates first", cfg.steps)
    write_learner_state(run_dir, "pretraining")  # o2o-status: the fleet comes after it
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    offline_cfg = PretrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields and k != "resume"})
    offline_cfg.algo, offline_cfg.net, offline_cfg.eval = cfg.algo, cfg.net, cfg.eval
    pretrain(offline_cfg, run_dir / "pretrain")
    return run_dir / "pretrain" / CHECKPOINT_NAME


def read_spec(path: Path) -> AgentSpec:
    return AgentSpec(**torch.load(path, map_location="cpu", weights_only=True)["spec"])


@dataclasses.dataclass
class FineTuning:
    """What an online run trains with (see ``prepare``)."""

    run_dir: Path
    agent: object  # CalQLAgent, with the checkpoint's algo plus the changes for fine-tuning
    spec: AgentSpec
    payload: dict  # the checkpoint's step and extra (online_updates, policy_version, run_id)
    offline: TransitionBuffer | None  # None: an online run from scratch
    online: OnlineData
    online_buffer: TransitionBuffer
    store: ReplayStore
    publisher: PolicyPublisher

    @property
    def extra(self) -> dict:
        return self.payload.get("extra", {})

    @property
    def scratch(self) -> bool:
        return bool(self.extra.get("from_scratch"))

    @property
    def updates(self) -> int:
        """The online updates the run starts from (a resumed run's)."""
        return int(self.extra.get("online_updates", 0))

    @property
    def offline_steps(self) -> int:
        """The agent's updates before the online phase: a resumed run's checkpoint step includes its online ones."""
        return int(self.payload["step"]) - self.updates

    def __post_init__(self):
        self.switches: list[dict] = list(self.extra.get("retrain_switches", []))  # retrains switched in (fine_tune)
        self.last_checkpoint: dict | None = None  # {"updates", "time"} of this process's last one (o2o-status)

    def checkpoint(self, updates: int) -> None:
        """The run's checkpoint at ``updates`` online updates (``resume=<run folder>`` continues from it)."""
        step = self.offline_steps + updates  # (was payload step + updates: a resume counted its online updates twice)
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.agent, self.spec, step, extra={
            "online_updates": updates, "policy_version": self.publisher.version, "run_id": self.publisher.run_id,
            "from_scratch": self.scratch, "retrain_switches": self.switches})  # fmt: skip
        self.last_checkpoint = {"updates": updates, "time": time.time()}


def prepare(cfg: OnlineConfig, run_dir: Path, explicit: Iterable[str] = ()) -> FineTuning:
    """The agent, the offline and online data, the store and the publisher of an online run.

    ``explicit``: the dotted config keys the user set (see ``fine_tuning``). Offline rows,
    online rows and the store's MC returns all follow the agent's data settings."""
    device = resolve_device(cfg.device)
    run_dir = resolve_checkpoint(cfg.resume).parent if cfg.resume else run_dir
    if cfg.from_scratch and not cfg.resume:
        if cfg.pretrained:
            raise ValueError("from_scratch=true starts without offline data: drop pretrained=")
        task = get_task(cfg.task)
        agent, spec = make_agent(cfg, task, None, device)
        payload = {"step": 0, "extra": {"from_scratch": True}}
        log.info("online from scratch: a fresh agent, no offline data, random actions until %d rows", cfg.warmup_rows)
    else:
        checkpoint_path = starting_checkpoint(cfg, run_dir)
        saved = read_spec(checkpoint_path)
        if saved.task != cfg.task:
            raise ValueError(f"the checkpoint {checkpoint_path} was trained on task {saved.task}, not task={cfg.task}")
        # The checkpoint's algorithm settings (calibration stays as pretrained), with what the user changed.
        merged, changes = fine_tuning_algo(saved.algo, saved.net, cfg.algo, cfg.net, set(explicit))
        for line in changes:
            log.info("%s", line)
        agent, spec, payload = load_checkpoint(checkpoint_path, device, restore_rng=bool(cfg.resume), algo=merged)
        task = get_task(spec.task)
    algo = agent.cfg
    scratch = bool(payload.get("extra", {}).get("from_scratch"))
    for line in agent.start_fine_tuning(cfg.batch_size, cfg.offline_ratio, scratch):  # SERA freezes its value here
        log.info("%s", line)
    low, high = action_bounds(spec)
    offline_data = None if scratch else load_offline_data(cfg, task, algo)
    offline = None if scratch else TransitionBuffer.from_transitions(offline_data, low, high, device)
    # OOO's exploring agent on maze2d, Kitchen, hammer: Q' clipped to bounds that widen with online rewards.
    q_bound = QBound(agent, algo.discount, None if scratch else offline_data.reward) if algo.q_target_clip else None
    capacity = cfg.buffer_capacity or (100_000 if spec.obs_spec.has_images else 1_000_000)
    online_buffer = TransitionBuffer(spec.obs_spec, spec.action_dim, capacity, device, online=True)
    for name, buffer in (("offline", offline), ("online", online_buffer)):
        if buffer is not None:
            log.info("%s buffer: %s", name, buffer.memory.line())
    online = OnlineData(online_buffer, low, high, algo, cfg.train_on_eval,
                        on_rewards=q_bound.widen if q_bound else None)  # fmt: skip
    store = open_store(Path(cfg.store) if cfg.store else run_dir / "replay", task.name, algo, cfg.ingest.fsync,
                       cfg.ingest.abandon_idle_s, obs_spec=spec.obs_spec)
    if len(store):
        log.info("reloaded %d trainable rows from the store", online.load_store(store))
    extra = payload.get("extra", {})
    publisher = PolicyPublisher(agent, spec, run_dir, int(extra.get("policy_version", 0)), extra.get("run_id"))
    return FineTuning(run_dir, agent, spec, payload, offline, online, online_buffer, store, publisher)


def preflight(cfg: OnlineConfig) -> LearnerKeys | None:
    """What must fail before any pretraining (keys off loopback, the commit interval, the keys themselves), then
    torch's seed and threads; the learner's keys, if any."""
    require_keys_off_loopback(cfg.endpoint, cfg.keys, cfg.insecure, "the learner")
    check_commit_interval(cfg.ingest.commit_interval_s)
    if (cfg.retrain_every or cfg.retrain_at_end) and get_task(cfg.task).real_world:
        raise ValueError(f"task {cfg.task} has no simulator: OOO retraining (retrain_every / retrain_at_end) judges "
                         "the retrained policy by the learner's evaluation episodes, which it cannot run")  # fmt: skip
    keys = LearnerKeys(cfg.keys) if cfg.keys else None
    init_torch(cfg.seed, cfg.threads)
    return keys


def run_online(cfg: OnlineConfig, run_dir: Path, explicit: Iterable[str] = ()) -> dict:
    """Fine-tune online: sample (offline and online rows mixed) -> update -> log -> evaluate -> publish -> checkpoint,
    while the ingest server fills the store; ``explicit``: the dotted config keys the user set (``fine_tuning``)."""
    keys = preflight(cfg)
    run = prepare(cfg, run_dir, explicit)
    agent, online, store, publisher, task = run.agent, run.online, run.store, run.publisher, get_task(run.spec.task)
    updates, limiter = run.updates, UpdateLimiter(cfg.utd, cfg.warmup_rows, cfg.max_updates_ahead, cfg.max_rows_ahead)
    fleet = FleetHold(limiter, online, updates)
    server = IngestServer(store, cfg.endpoint, task=task.name, on_commit=fleet.on_commit, run_id=publisher.run_id,
                          config=cfg.ingest, keys=keys).start()  # fmt: skip
    publisher.server = fleet.server = server
    logger, running, monitor = MetricsLogger(run.run_dir), RunningMean(), FleetMonitor(server, cfg.stats_every_s)
    evaluations = Evaluations(agent, task, cfg.eval, *action_bounds(run.spec), logger)
    retrainer = Retrainer(cfg, run.run_dir, Path(store.path), run.spec.net, run.scratch,
                          offline_steps=run.offline_steps)  # fmt: skip
    status = StatusFile(run.run_dir, server, publisher, run.online_buffer, run, retrainer, updates=updates)
    subroutine = Subroutine(cfg, retrainer, agent, publisher, evaluations, logger, run.checkpoint, run.switches)
    logs, publishes, saves = (Cadence(every, updates) for every in (cfg.log_every, cfg.publish_every, cfg.checkpoint_every))
    total = cfg.online_updates or None
    bar = tqdm(initial=updates, total=total, desc="online", disable=not cfg.progress)
    failed = interrupted = False
    try:
        if not (run.scratch and publisher.version == 0):  # from scratch: the actors act at random until warm-up
            publisher.publish(updates)
        log.info("learner listening on %s (task %s, run %s, policy version %d)", server.endpoint, task.name,
                 publisher.run_id, publisher.version)  # fmt: skip
        run.checkpoint(updates)  # from now on `resume=<run folder>` finds this run's own checkpoint
        evaluations.run(updates, online.committed_rows)  # the starting policy, on the episodes every later one uses
        evals = Cadence(cfg.eval_every_steps, online.committed_rows, aligned=False)
        while total is None or updates < total:
            if server.error is not None:
                raise StoreError(f"the ingest server stopped: {server.error}") from server.error
            online.drain()
            for episode in online.pop_episodes():
                logger.log(updates, ACTOR_EVAL if episode["eval"] else ONLINE, episode)
            monitor.maybe_log(logger, updates, publisher.version)
            status.maybe_write(updates, "retraining" if retrainer.pauses_updates else "online")
            if evals.due(online.committed_rows):
                evaluations.run(updates, online.committed_rows)
            fleet.check()
            if subroutine.step(updates, online.committed_rows):  # fine_tune: no update while a retrain runs
                time.sleep(0.01)  # (the switch would throw it away); ingest goes on, the actors keep the last policy
                continue
            allowed = limiter.allowed(updates, online.trainable_rows)
            if allowed and publisher.version == 0:
                publisher.publish(updates)  # from scratch: warm-up done, the first policy
            if allowed == 0:
                time.sleep(0.01)  # waiting for data: a slow fleet must not make us overfit
                continue
            # Short bursts: new data, the fleet's hold and its stats are looked at between them.
            for _ in range(min(allowed, UPDATE_BURST, logs.left(updates))):
                batch = mixed_batch(run.offline, run.online_buffer, cfg.batch_size, cfg.offline_ratio)
                with stopping.deferred():  # a stop lands between updates: weights and count agree
                    running.add(agent.update(batch))
                    updates = fleet.updates = updates + 1
                bar.update(1)
                if publishes.due(updates):
                    publisher.publish(updates)
                if saves.due(updates):
                    run.checkpoint(updates)
            if logs.due(updates):
                shown = log_train(logger, running, updates, {
                    "online_rows": online.trainable_rows, COMMITTED_ROWS: online.committed_rows,
                    "updates_behind": limiter.behind(updates, online.trainable_rows),
                    "fleet_held": float(server.holding), INTERVENTION_RATE: online.pop_intervention_rate()})  # fmt: skip
                bar.set_postfix(rows=online.committed_rows, version=publisher.version,
                                q=f"{shown['train/q_data']:.2f}", bound=f"{shown['train/bound_rate']:.2f}")  # fmt: skip
        evaluations.run(updates, online.committed_rows)  # the fine-tuned policy, on the same episodes as the first
    except KeyboardInterrupt:  # SIGINT or SIGTERM (stopping.py): commit, checkpoint, exit 0
        interrupted = True
        log.info("%s at %d updates: checkpointing", stopping.requested() or "interrupted", updates)
    except BaseException:
        failed = True
        raise
    finally:
        bar.close()
        ending = not (interrupted or failed) and retrainer.enabled  # the metrics log stays open for them
        if ending:  # the last retrains take minutes: hold the actors (not lost, which would keep them acting)
            server.set_hold(True)
        fleet_steps = [("stop the ingest server", server.stop), ("close the replay store", store.close)]
        shutdown([
            ("stop a running retrain", lambda: (interrupted or failed) and retrainer.stop()),
            ("log the last updates", lambda: running.count and logger.log(updates, TRAIN, running.pop())),
            ("write the final checkpoint", lambda: run.checkpoint(updates)),
            ("write the status file", lambda: status.write(updates, "finishing" if ending else "stopped")),
            *([] if ending else fleet_steps),
            ("close the metrics log", lambda: ending or logger.close()),
        ], raise_first=not failed)
    if ending:
        try:
            interrupted = not subroutine.finish(updates, online.committed_rows) or interrupted
        finally:
            shutdown([("write the status file", lambda: status.write(updates, "stopped")), *fleet_steps,
                      ("close the metrics log", logger.close)], raise_first=True)  # fmt: skip
    return {"updates": updates, "policy_version": publisher.version, "rows": online.committed_rows,
            "evaluations": evaluations.results, "interrupted": interrupted or stopping.requested() is not None,
            "checkpoint": run.run_dir / CHECKPOINT_NAME}


def shutdown(steps: list, raise_first: bool) -> None:
    """Run every step even if one fails (a diverged agent must not keep the store open, a
    read-only disk must not skip the checkpoint); log failures, re-raise the first if asked
    (not while another error is already on its way out)."""
    first = None
    with stopping.deferred(reraise=False):  # a first signal now must not cut the checkpoint or the commit short
        for what, step in steps:
            try:
                step()
            except Exception as err:
                log.error("could not %s: %s", what, err)
                first = first or err
    if first is not None and raise_first:
        raise first



@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="learner")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: OnlineConfig = OmegaConf.to_object(dict_cfg)
    try:
        hydra_cfg = HydraConfig.get()
        result = run_online(cfg, Path(hydra_cfg.runtime.output_dir), explicit_keys(hydra_cfg.overrides.task))
    except (DatasetError, StoreError, DivergedError, KeyError, ValueError, FileNotFoundError, OSError, MemoryError,
            RuntimeError) as err:  # fmt: skip
        print(f"o2o-learner: error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:  # during start-up: data, store, an inline pretraining (which saved itself)
        pretrained = isinstance(stop, stopping.Stopped)
        saved = f"; its pretraining checkpoint (step {stop.step}): {stop.checkpoint}" if pretrained else ""
        print(f"o2o-learner: stopped by {stopping.requested() or 'KeyboardInterrupt'} during start-up, before any "
              f"online update of this run{saved}")  # fmt: skip
        return
    print(f"online: {result['updates']} updates, {result['rows']} rows, policy version {result['policy_version']}")
    if len(result["evaluations"]) >= 2:
        print(evaluation_line(result["evaluations"][0], result["evaluations"][-1]))
    if result["interrupted"]:
        print(f"o2o-learner: stopped by {stopping.requested() or 'KeyboardInterrupt'} after {result['updates']} "
              f"updates; checkpoint written to {result['checkpoint']} (resume={result['checkpoint'].parent} "
              "continues the run)")  # fmt: skip


def main() -> None:
    moved = moved_key_error(sys.argv[1:])
    if moved:
        print(f"o2o-learner: error: {moved}", file=sys.stderr)
        sys.exit(2)
    with stopping.graceful_stop("o2o-learner"):  # SIGTERM too stops gracefully; a second signal exits at once
        _hydra_main()


if __name__ == "__main__":
    main()
