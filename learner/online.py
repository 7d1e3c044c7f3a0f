"""`o2o-learner`: online Cal-QL fine-tuning fed by decoupled actors (Hydra entry point).

    o2o-learner pretrained=runs/pretrain/pusher/<time> task=pusher endpoint=tcp://0.0.0.0:5555
    o2o-learner resume=runs/online/pusher/<time>        # after a crash: the store is the source of truth

The learner binds ``endpoint``; actors (``o2o-actor``) connect, send transitions
and receive each policy it publishes. Committed rows land in the Zarr store
(``<run>/replay``); finished episodes (with their MC returns, so calibration stays
on online) feed the sampling buffer, mixed with the offline data at
``algo.offline_ratio``. Updates follow ``utd`` with a samples-per-insert limiter. The
algorithm settings are the checkpoint's, with what the command changes explicitly
(``fine_tuning``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import uuid
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
from .checkpoint import CHECKPOINT_NAME, AgentSpec, action_bounds, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import OnlineConfig, PretrainConfig
from .divergence import DivergedError, check_losses, check_weights
from .evaluation import evaluate
from .export_onnx import export_policy
from .fine_tuning import explicit_keys, fine_tuning_algo
from .metrics import MetricsLogger, RunningMean
from .online_data import OnlineData, QBound, UpdateLimiter, mixed_batch
from .pretrain import load_offline_data, make_agent, pretrain, resolve_device
from .subroutine import Retrainer, use_retrained

log = logging.getLogger("o2o.learner")

ConfigStore.instance().store(name="online_schema", node=OnlineConfig)

UPDATE_BURST = 10


PUBLISHED_FILE = "published.json"


class PolicyPublisher:
    """Exports the current policy to ONNX and hands it to the ingest server under a new version.

    Versions count up within a learner run (``run_id``) across restarts: the last version
    published is written to ``published.json`` before it is sent, so a run resumed from an
    older checkpoint never publishes a version number twice (the store labels every row
    with the version that acted it). A fresh run gets a new run id: its actors take its
    policy although its versions start again at 1.
    """

    def __init__(self, agent, spec, run_dir: Path, checkpoint_version: int = 0, run_id: str | None = None):
        self.agent, self.spec, self.run_dir = agent, spec, run_dir
        self.server: IngestServer | None = None
        record = self._read()
        self.run_id = run_id or record.get("run_id") or uuid.uuid4().hex[:16]
        self.version = max(checkpoint_version, int(record.get("version", 0)))

    def _read(self) -> dict:
        path = self.run_dir / PUBLISHED_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def publish(self, step: int) -> int:
        check_weights(self.agent, step)  # never hand the fleet a NaN policy
        self.version += 1
        tmp = self.run_dir / f".{PUBLISHED_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "version": self.version}))
        os.replace(tmp, self.run_dir / PUBLISHED_FILE)
        # The TorchScript exporter takes ~0.2 s instead of ~1-2 s: the learner waits for it.
        path = export_policy(self.agent, self.spec, self.run_dir / "policy.onnx", version=self.version, step=step,
                             exporter="torchscript")
        self.server.publish_policy(self.version, path.read_bytes())
        return self.version


def starting_checkpoint(cfg: OnlineConfig, run_dir: Path) -> Path:
    """The checkpoint to fine-tune: resume > pretrained > a fresh offline pretraining run."""
    if cfg.resume:
        return resolve_checkpoint(cfg.resume)
    if cfg.pretrained:
        return resolve_checkpoint(cfg.pretrained)
    log.info("no pretrained checkpoint given: pretraining for %d updates first", cfg.steps)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    offline_cfg = PretrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields and k != "resume"})
    offline_cfg.algo, offline_cfg.net, offline_cfg.eval = cfg.algo, cfg.net, cfg.eval
    pretrain(offline_cfg, run_dir / "pretrain")
    return run_dir / "pretrain" / CHECKPOINT_NAME


def open_store(cfg: OnlineConfig, run_dir: Path, task_name: str, algo) -> ReplayStore:
    """The run's store (or ``cfg.store``), whose MC returns follow the agent's data settings."""
    path = Path(cfg.store) if cfg.store else run_dir / "replay"
    wanted = {"gamma": algo.discount, "reward_scale": algo.reward_scale, "reward_bias": algo.reward_bias,
              "infinite_horizon": algo.mc_infinite_horizon}  # fmt: skip
    if not path.exists():
        return ReplayStore.create_for_task(path, task_name, fsync=cfg.fsync, **wanted)
    store = ReplayStore.open(path, "a", abandon_idle_s=cfg.abandon_idle_s, fsync=cfg.fsync)
    wrong = {k: (getattr(store.config, k), v) for k, v in wanted.items() if getattr(store.config, k) != v}
    if wrong:
        store.close(commit=False)
        shown = ", ".join(f"{k} {have!r} (the agent: {want!r})" for k, (have, want) in wrong.items())
        raise StoreError(f"the replay store {path} computes MC returns with {shown}: give a store made for this "
                         "checkpoint's data settings, or another store= folder")  # fmt: skip
    log.info("opened replay store %s: %d committed rows", path, len(store))
    return store


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


def prepare(cfg: OnlineConfig, run_dir: Path, explicit: Iterable[str] = ()) -> FineTuning:
    """The agent, the offline and online data and the store of an online run.

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
    if algo.sera:
        check_sera_batch(cfg.batch_size, 0.0 if scratch else algo.offline_ratio, algo.sera_k, algo.sera_rows)
        if agent.sera is None:
            agent.freeze_sera_critic()
            log.info("SERA: values from frozen copies of the %s critic and policy", "random (from scratch)" if scratch
                     else "pretrained")  # fmt: skip
    low, high = action_bounds(spec)
    offline_data = None if scratch else load_offline_data(cfg, task, algo)
    offline = None if scratch else TransitionBuffer.from_transitions(offline_data, low, high, device)
    # OOO's exploring agent on maze2d, Kitchen, hammer: Q' clipped to bounds that widen with online rewards.
    q_bound = QBound(agent, algo.discount, None if scratch else offline_data.reward) if algo.q_target_clip else None
    online_buffer = TransitionBuffer(spec.obs_dim, spec.action_dim, cfg.buffer_capacity, device, online=True)
    online = OnlineData(online_buffer, low, high, algo.reward_scale, algo.reward_bias, cfg.train_on_eval,
                        on_rewards=q_bound.widen if q_bound else None)  # fmt: skip
    store = open_store(cfg, run_dir, task.name, algo)
    if len(store):
        log.info("reloaded %d trainable rows from the store", online.load_store(store))
    return FineTuning(run_dir, agent, spec, payload, offline, online, online_buffer, store)


def check_sera_batch(batch_size: int, offline_ratio: float, k: int, rows: str = "batch") -> None:
    """SERA's kNN runs over a batch (or its online rows): there must be more than k of them."""
    if rows not in ("batch", "online"):
        raise ValueError(f"algo.sera_rows={rows!r}: use batch (VCSE: every row) or online (the online rows only)")
    online = batch_size - int(round(batch_size * offline_ratio)) if rows == "online" else batch_size
    if online <= k:
        raise ValueError(f"algo.sera needs more than algo.sera_k={k} online rows per batch, and batch_size={batch_size} "
                         f"with algo.offline_ratio={offline_ratio} has {online}")  # fmt: skip


def run_online(cfg: OnlineConfig, run_dir: Path, explicit: Iterable[str] = ()) -> dict:
    """Fine-tune online; ``explicit``: the dotted config keys the user set (see ``fine_tuning``)."""
    require_keys_off_loopback(cfg.endpoint, cfg.keys, cfg.insecure, "the learner")
    check_commit_interval(cfg.commit_interval_s)  # before any pretraining
    keys = LearnerKeys(cfg.keys) if cfg.keys else None  # bad keys fail before any pretraining
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = prepare(cfg, run_dir, explicit)
    run_dir, agent, spec, payload, store = run.run_dir, run.agent, run.spec, run.payload, run.store
    offline, online, online_buffer, algo = run.offline, run.online, run.online_buffer, run.agent.cfg
    extra = payload.get("extra", {})
    task = get_task(spec.task)

    updates = int(extra.get("online_updates", 0))
    limiter = UpdateLimiter(cfg.utd, cfg.warmup_rows, cfg.max_updates_ahead, cfg.max_rows_ahead)
    done = {"updates": updates}  # written by this loop, read by the ingest thread

    def on_commit(event) -> None:
        # Runs in the ingest thread: a fast fleet is held at once, even while this loop
        # is busy (or starved of the GIL by ingest itself). Releasing happens below.
        online.on_commit(event)
        if limiter.hold(done["updates"], online.trainable_committed, server.holding) and not server.holding:
            server.set_hold(True)

    publisher = PolicyPublisher(agent, spec, run_dir, int(extra.get("policy_version", 0)), extra.get("run_id"))
    server = IngestServer(store, cfg.endpoint, task=task.name, on_commit=on_commit, run_id=publisher.run_id,
                          commit_interval_s=cfg.commit_interval_s,
                          commit_retry_s=cfg.commit_retry_s, abandon_idle_s=cfg.abandon_idle_s,
                          keys=keys, max_rows_per_s=cfg.max_rows_per_s).start()  # fmt: skip
    publisher.server = server
    logger = MetricsLogger(run_dir)
    running = RunningMean()
    monitor = FleetMonitor(server, cfg.stats_every_s)

    low, high = action_bounds(spec)
    evaluations: list[dict] = []
    evaluated_at = {"updates": None}  # the online update count of the last evaluation (None: the agent changed since)

    def evaluate_policy() -> dict:
        """The policy as it is now, over the same deterministic episodes every time (logged as eval/...)."""
        result = {**evaluate(agent, task, cfg.eval.episodes, cfg.eval.seed, low, high),
                  "online_steps": online.committed_rows, "episodes": cfg.eval.episodes}  # fmt: skip
        logger.log(updates, "eval", result)
        evaluations.append(result)
        evaluated_at["updates"] = updates
        return result

    scratch = bool(extra.get("from_scratch"))
    retrainer = Retrainer(cfg, run_dir, Path(store.path), spec.net, scratch, offline_steps=int(payload["step"]) - updates)
    switches = list(extra.get("retrain_switches", []))

    def checkpoint() -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, agent, spec, int(payload["step"]) + updates, extra={
            "online_updates": updates, "policy_version": publisher.version, "run_id": publisher.run_id,
            "from_scratch": scratch, "retrain_switches": switches})

    def online_evaluation() -> dict:
        """The online agent now, on the evaluation episodes: the evaluation at this update if there is one."""
        if evaluated_at["updates"] == updates and evaluations:
            return evaluations[-1]
        return evaluate_policy()

    def use_retrain(summary: dict | None, at_end: bool = False) -> bool:
        """A finished retrain: validated against the current one on the same evaluation episodes,
        logged, then (if accepted) recommended or taken over (``retrain_mode``; see
        ``subroutine.validate``); True if taken over."""
        if summary is None:
            return False
        decision = use_retrained(summary, cfg.retrain_mode, run_dir, agent, online_evaluation, logger, updates)
        if not decision.accepted or cfg.retrain_mode != "fine_tune":
            return False
        evaluated_at["updates"] = None  # the online agent changed at this update
        switches.append({"updates": updates, "checkpoint": summary["checkpoint"], "store_rows": summary["store_rows"],
                         "score": decision.score, "incumbent_score": decision.incumbent_score})  # fmt: skip
        if at_end:  # the server is gone: the run's policy file is all there is to update
            export_policy(agent, spec, run_dir / "policy.onnx", version=publisher.version, step=updates,
                          exporter="torchscript")
        else:
            publisher.publish(updates)
        checkpoint()
        return True

    total = cfg.online_updates or None
    bar = tqdm(initial=updates, total=total, desc="online", disable=not cfg.progress)
    failed = interrupted = False
    try:
        if not (scratch and publisher.version == 0):  # from scratch: the actors act at random until warm-up
            publisher.publish(updates)
        log.info("learner listening on %s (task %s, run %s, policy version %d)", server.endpoint, task.name,
                 publisher.run_id, publisher.version)  # fmt: skip
        checkpoint()  # from now on `resume=<run folder>` finds this run's own checkpoint
        evaluate_policy()  # the starting (offline) policy, on the episodes every later evaluation uses
        next_eval = online.committed_rows + cfg.eval_every_steps
        while total is None or updates < total:
            if server.error is not None:
                raise StoreError(f"the ingest server stopped: {server.error}") from server.error
            online.drain()
            for episode in online.pop_episodes():
                logger.log(updates, "actor_eval" if episode["eval"] else "online", episode)
            monitor.maybe_log(logger, updates, publisher.version)
            if cfg.eval_every_steps and online.committed_rows >= next_eval:
                evaluate_policy()
                next_eval = online.committed_rows + cfg.eval_every_steps
            hold = limiter.hold(updates, online.trainable_committed, server.holding)
            if hold != server.holding:
                server.set_hold(hold)
            retrainer.maybe_start(updates, online.committed_rows)
            use_retrain(retrainer.poll())
            if retrainer.pauses_updates:
                # fine_tune: no online update (and no new policy) while a retrain runs, as the switch
                # would throw them away; ingest goes on and the actors act with the last published policy.
                time.sleep(0.01)
                continue
            allowed = limiter.allowed(updates, online.trainable_rows)
            if allowed and publisher.version == 0:
                publisher.publish(updates)  # from scratch: warm-up done, the first policy
            if allowed == 0:
                time.sleep(0.01)  # waiting for data: a slow fleet must not make us overfit
                continue
            # Short bursts: new data, the fleet's hold and its stats are looked at between them.
            for _ in range(min(allowed, UPDATE_BURST, cfg.log_every - updates % cfg.log_every)):
                with stopping.deferred():  # a stop lands between updates: weights and count agree
                    running.add(agent.update(mixed_batch(offline, online_buffer, cfg.batch_size, algo.offline_ratio)))
                    updates += 1
                    done["updates"] = updates
                bar.update(1)
                if updates % cfg.publish_every == 0:
                    publisher.publish(updates)
                if updates % cfg.checkpoint_every == 0:
                    checkpoint()
            if updates % cfg.log_every == 0:
                shown = logger.log(updates, "train", {
                    **running.pop(),
                    "online_rows": online.trainable_rows,
                    "committed_rows": online.committed_rows,
                    "updates_behind": limiter.behind(updates, online.trainable_rows),
                    "fleet_held": float(server.holding),
                })
                check_losses(shown, updates)
                bar.set_postfix(rows=online.committed_rows, version=publisher.version,
                                q=f"{shown['train/q_data']:.2f}", bound=f"{shown['train/bound_rate']:.2f}")
        evaluate_policy()  # the fine-tuned policy, on the same episodes as the first evaluation
    except KeyboardInterrupt:  # SIGINT or SIGTERM (stopping.py): commit, checkpoint, exit 0
        interrupted = True
        log.info("%s at %d updates: checkpointing", stopping.requested() or "interrupted", updates)
    except BaseException:
        failed = True
        raise
    finally:
        bar.close()
        ending = not (interrupted or failed) and retrainer.enabled  # the metrics log stays open for them
        shutdown([
            ("stop a running retrain", lambda: (interrupted or failed) and retrainer.stop()),
            ("log the last updates", lambda: running.count and logger.log(updates, "train", running.pop())),
            ("write the final checkpoint", checkpoint),
            ("stop the ingest server", server.stop),
            ("close the replay store", store.close),
            ("close the metrics log", lambda: ending or logger.close()),
        ], raise_first=not failed)
    if ending:
        try:
            if stopping.requested():  # a signal while closing (noted by `shutdown`): no retrain at the end
                raise KeyboardInterrupt
            switched = use_retrain(retrainer.poll(wait=True))  # the last periodic one
            if cfg.retrain_at_end:
                log.info("retraining on the whole store (%d rows)", online.committed_rows)
                retrainer.start(updates, online.committed_rows)
                switched = use_retrain(retrainer.poll(wait=True), at_end=True) or switched
            if switched:  # the run now ends with the retrained agent: the final evaluation must be of it
                evaluate_policy()
        except KeyboardInterrupt:  # the final checkpoint is written: only the retrain is cut short
            interrupted = True
            retrainer.stop()
            log.info("interrupted: the retrain at the end is skipped")
        finally:
            logger.close()
    return {"updates": updates, "policy_version": publisher.version, "rows": online.committed_rows,
            "evaluations": evaluations, "interrupted": interrupted or stopping.requested() is not None,
            "checkpoint": run_dir / CHECKPOINT_NAME}


def evaluation_summary(what: str, record: dict) -> str:
    """One evaluation (the eval/ keys of a metrics record, prefix dropped) in words."""
    return (f"{what} (online step {int(record['online_steps'])}): score {record['normalized_score']:.1f}, "
            f"success {record['success']:.0%} over {int(record['episodes'])} deterministic episodes")


def evaluation_line(first: dict, last: dict) -> str:
    """The starting and the final policy over the same deterministic episodes, in one line."""
    return (f"evaluation over the same {int(last['episodes'])} deterministic episodes: start (online step "
            f"{int(first['online_steps'])}) score {first['normalized_score']:.1f}, success {first['success']:.0%} -> end "
            f"(online step {int(last['online_steps'])}) score {last['normalized_score']:.1f}, success {last['success']:.0%}")


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


class FleetMonitor:
    """Per-actor steps/s, policy lag and last contact, logged every few seconds."""

    def __init__(self, server: IngestServer, every_s: float):
        self.server, self.every_s = server, every_s
        self.last_time, self.last_rows = time.monotonic(), {}

    def maybe_log(self, logger: MetricsLogger, step: int, version: int) -> None:
        now = time.monotonic()
        if now - self.last_time < self.every_s:
            return
        stats, elapsed = self.server.stats(), now - self.last_time
        for actor_id, s in stats["actors"].items():
            logger.log(step, f"actor/{actor_id}", {
                "steps_per_s": (s["rows"] - self.last_rows.get(actor_id, s["rows"])) / elapsed,
                "policy_lag": version - s["policy_version"] if s["policy_version"] >= 0 else -1,
                "since_contact_s": time.time() - s["last_contact"],
                "duplicates": s["duplicates"],
                "rejected": sum(s["rejected"].values()),
            })
            self.last_rows[actor_id] = s["rows"]
        logger.log(step, "ingest", {"committed_rows": stats["committed_rows"], "rejected": sum(stats["rejected"].values())})
        self.last_time = now


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="learner")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: OnlineConfig = OmegaConf.to_object(dict_cfg)
    try:
        hydra_cfg = HydraConfig.get()
        result = run_online(cfg, Path(hydra_cfg.runtime.output_dir), explicit_keys(hydra_cfg.overrides.task))
    except (DatasetError, StoreError, DivergedError, KeyError, ValueError, FileNotFoundError, OSError,
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
    with stopping.graceful_stop("o2o-learner"):  # SIGTERM too stops gracefully; a second signal exits at once
        _hydra_main()


if __name__ == "__main__":
    main()
