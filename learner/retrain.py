"""`o2o-retrain`: OOO offline retraining (Mark et al. 2023) on the offline data plus the replay store.

    o2o-retrain task=pusher store=runs/online/pusher/<time>/replay       # all committed rows
    o2o-retrain task=pusher store=... until_row=50000                     # the first 50k rows of the store
    o2o-retrain task=pusher store=... until_version=12                    # rows acted by versions <= 12
    o2o-retrain task=pusher store=... offline=false                       # the store alone (from scratch)

A NEW agent, trained from scratch without exploration bonuses, on the offline dataset and the
store's committed rows (read in place, also while an online learner keeps writing: only its
last commit counts), then evaluated and exported: the deployable ``policy.onnx``, with
``retrain.json`` saying what data it saw and how it scored. OOO explores with an optimistic
agent and deploys only this pessimistic one.

Defaults follow OOO's released retraining (OOO_for_calql/conservative_sac_exploitation.py, run as
in its ooo_for_calql_scripts.md; configs/retrain.yaml): plain CQL (``algo.calibrated=false``), the
target critic's Q' clipped to [min r, max r] / (1 - gamma) over all training rows (after reward
scale and bias), batches drawn from the offline data and the store's rows in proportion to their
sizes. Per OOO domain (preset=paper, configs/ooo_retrain/): a fixed offline share of each batch
(``offline_share``: Kitchen 0.25, Adroit 0.5) and 32 extra samples from the online rows at the
online maximum reward (``high_reward_extra``: maze2d only among o2o's domains).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from o2o.datasets.minari_io import CAMERA_FIELDS, DatasetError, Transitions
from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import ReplayStore, StoreError
from o2o.datasets.store_frames import concat_rows
from o2o.datasets.trainable_rows import trainable_rows
from o2o.envs import TaskSpec, get_task

from .buffer import Batch, TransitionBuffer, concat_batches
from .calql import CalQLAgent
from .checkpoint import CHECKPOINT_NAME, AgentSpec, load_checkpoint, resolve_checkpoint
from .config import PretrainConfig
from .divergence import DivergedError
from .fine_tuning import explicit_keys
from .frame_ring import frames_of
from .offline import train
from .q_bound import QBound
from .setup import init_torch, load_offline_data, make_agent, resolve_device
from .stopping import Stopped, graceful_stop, requested

log = logging.getLogger("o2o.retrain")

SUMMARY_FILE = "retrain.json"


@dataclasses.dataclass
class RetrainConfig(PretrainConfig):
    """OOO retraining: every pretraining field (task, dataset, steps, algo, net, eval...) plus these."""

    store: str | None = None
    """The Zarr replay store to retrain on (an online run's <run>/replay)."""
    until_row: int = 0
    """Use the store's first N rows only (0 = every committed row)."""
    until_version: int = 0
    """Use the rows before the first one acted by a policy version above this (0 = no limit)."""
    offline: bool = True
    """Also train on the offline dataset (`dataset`); false = the store alone (an online run from scratch)."""
    offline_share: float | None = None
    """Fraction of each batch drawn from the offline data, the rest from the store (OOO's --mixing_ratio:
    0.25 Kitchen, 0.5 Adroit); None = in proportion to the offline and online row counts (OOO's default
    -1, used on maze2d and hammer). Set per domain by preset=paper (configs/ooo_retrain/)."""
    high_reward_extra: int = 0
    """Extra samples appended to each batch, drawn from the ONLINE rows at the online maximum reward
    (OOO's --upsample_batch_size: 32 on maze2d and hammer, off elsewhere; 0 = off, OOO's default).
    preset=paper turns it on for the domains OOO does (configs/ooo_retrain/)."""
    train_on_eval: bool = False
    """Also train on the actors' deterministic evaluation episodes."""
    out_dir: str = "runs/retrain"
    """Run folders go to <out_dir>/<task>/<time>."""


ConfigStore.instance().store(name="retrain_schema", node=RetrainConfig)

@dataclasses.dataclass
class StoreSelection:
    """The store rows a retrain uses, and where they came from."""

    transitions: Transitions
    store_rows: int  # rows of the store looked at: [0, store_rows)
    episodes: int  # finished episodes whose rows are used
    policy_versions: list[int]  # lowest and highest policy version among the rows used ([] if none)


def select_store_rows(store: ReplayStore, until_row: int = 0, until_version: int = 0,
                      train_on_eval: bool = False) -> StoreSelection:  # fmt: skip
    """The trainable rows of the store's committed prefix (``trainable_rows``: rows of episodes that
    ENDED within the prefix, with an MC return, not evaluation rows unless ``train_on_eval``).

    Rewards come out scaled with the store's settings, actions in env units (as a dataset's); a camera
    store's rows come with their frames (``Transitions.frames``, each frame once)."""
    rows = trainable_rows(store, until_row, until_version, include_eval=train_on_eval)
    parts = list(rows.chunks())  # chunk 0: reads sized by their frames (read_chunk_rows), not 262k rows
    columns = concat_rows(parts) if parts else None
    if columns is None or len(columns["reward"]) == 0:
        empty = np.zeros(0, np.float32)
        dims = (store.config.obs_dim, store.config.action_dim)
        data = Transitions(np.zeros((0, dims[0]), np.float32), np.zeros((0, dims[1]), np.float32), empty,
                           np.zeros((0, dims[0]), np.float32), empty, np.zeros(0, bool), empty)  # fmt: skip
        return StoreSelection(data, rows.stop, 0, [])
    data = Transitions(
        obs=columns["obs"],
        action=columns["action"],
        reward=store.config.data.scale(columns["reward"]),  # as the offline rows and the online learner
        next_obs=columns["next_obs"],
        terminated=columns["terminated"].astype(np.float32),
        episode_end=columns["terminated"] | columns["truncated"],
        mc_return=columns["mc_return"],
        frames=frames_of(columns),
        obs_frame=columns.get("obs_frame"),
        next_frame=columns.get("next_frame"),
    )
    versions = columns["policy_version"]
    return StoreSelection(data, rows.stop, rows.episodes, [int(versions.min()), int(versions.max())])


def concat_transitions(parts: list[Transitions]) -> Transitions:
    """The parts' rows as one, without their frames: what the agent's observation statistics and the Q
    bounds read (the buffers take each part with its frames). ``frames`` holds each camera as an empty
    (0, H, W, C) array: its shape is what ``make_agent`` checks against the task's cameras."""
    rows = [f.name for f in dataclasses.fields(Transitions) if f.name not in CAMERA_FIELDS]
    shapes = {name: frames[:0] for name, frames in parts[0].frames.items()}
    return Transitions(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in rows}, frames=shapes)


def batch_split(offline_rows: int, online_rows: int, batch_size: int, offline_share: float | None) -> tuple[int, int]:
    """(offline, online) rows of each batch, computed once, as OOO's retraining does
    (conservative_sac_exploitation.py: mixing_ratio = the flag if >= 0, else offline / (offline +
    online) rows; batch_size_offline = int(batch_size * mixing_ratio), the rest online). With no
    rows on one side, all come from the other."""
    if online_rows == 0:
        return batch_size, 0
    if offline_rows == 0:
        return 0, batch_size
    share = offline_rows / (offline_rows + online_rows) if offline_share is None else offline_share
    n_offline = int(batch_size * share)
    return n_offline, batch_size - n_offline


def high_reward_rows(online_reward: np.ndarray) -> np.ndarray:
    """Indices of the online rows at the online maximum reward: OOO upsamples from its replay buffer
    (the online rows) where ``rewards >= replay_buffer._rewards.max()`` (conservative_sac_exploitation.py;
    hammer uses a fixed threshold of 25 instead, a task o2o does not have)."""
    if len(online_reward) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(online_reward >= online_reward.max())


def apply_store_settings(cfg: RetrainConfig, store: ReplayStore, explicit: set[str]) -> None:
    """The data settings are the store's (its MC returns were computed with them): an explicit
    override that differs is refused; a preset default that differs is replaced, and said."""
    for field, (have, want) in DataSettings.of(cfg.algo).differences(store.config.data).items():
        if f"algo.{field}" in explicit:
            raise ValueError(f"algo.{field}={have!r} differs from the store's {field} {want!r}, with which its MC "
                             f"returns were computed: drop the override (the store's value is used)")  # fmt: skip
        log.info("algo.%s: the store's %r (not %r)", field, want, have)
        setattr(cfg.algo, field, want)


@dataclasses.dataclass
class RetrainSetup:
    """A retrain ready to train: the fresh agent, its batches and the summary of what it trains on."""

    agent: CalQLAgent
    spec: AgentSpec
    task: TaskSpec
    sample: Callable[[], Batch]
    summary: dict
    start: int  # the first update (a resumed retrain's step)
    run_dir: Path


def retrain(cfg: RetrainConfig, run_dir: Path, explicit: set[str] = frozenset()) -> dict:
    """Train, evaluate and export the retrained agent; returns the summary (also in retrain.json)."""
    setup = prepare_retrain(cfg, run_dir, explicit)
    run_dir, summary = setup.run_dir, setup.summary
    _write_summary(run_dir, summary)
    try:
        evaluation = train(cfg, run_dir, setup.agent, setup.spec, setup.task, setup.sample, setup.start, desc="retrain")
    except Stopped as stop:  # the checkpoint is written; "stopped" (not "done") keeps the learner off it
        summary.update(status="stopped", stopped_at_step=stop.step, checkpoint=str(stop.checkpoint))
        _write_summary(run_dir, summary)
        raise
    summary.update(status="done", eval=evaluation, checkpoint=str(run_dir / CHECKPOINT_NAME),
                   policy=str(run_dir / "policy.onnx"))  # fmt: skip
    _write_summary(run_dir, summary)
    return summary


def prepare_retrain(cfg: RetrainConfig, run_dir: Path, explicit: set[str] = frozenset()) -> RetrainSetup:
    """Read the data, build the fresh agent (bounds on Q' set) and its sampler; nothing is written."""
    if cfg.offline_share is not None and not 0.0 <= cfg.offline_share <= 1.0:
        raise ValueError(f"offline_share={cfg.offline_share} is not a fraction in [0, 1] (null = proportional)")
    if not cfg.store:
        raise ValueError("o2o-retrain needs store=PATH (an online run's replay store, e.g. runs/online/<task>/<time>/replay)")
    if cfg.algo.rnd or cfg.algo.sera:
        raise ValueError("o2o-retrain trains without exploration bonuses (OOO): drop algo.rnd / algo.sera")
    init_torch(cfg.seed, cfg.threads)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task)
    store = ReplayStore.open(cfg.store, "r")
    if store.config.task and store.config.task != task.name:
        raise StoreError(f"the store {cfg.store} holds task {store.config.task}, not task={task.name}")
    apply_store_settings(cfg, store, explicit)

    run_dir = resolve_checkpoint(cfg.resume).parent if cfg.resume else run_dir
    previous = _read_summary(run_dir) if cfg.resume else {}
    # A resumed retrain keeps the data it started with (the store may have grown since).
    until_row = previous.get("store_rows", cfg.until_row)
    selection = select_store_rows(store, until_row, cfg.until_version, cfg.train_on_eval)
    online = selection.transitions
    offline = load_offline_data(cfg, task) if cfg.offline else None
    data = concat_transitions([offline, online] if offline is not None else [online])
    if len(data) == 0:
        raise DatasetError(f"nothing to train on: no finished episode in the store's first {selection.store_rows} rows"
                           + ("" if cfg.offline else " and offline=false"))  # fmt: skip
    offline_rows = len(data) - len(online)
    log.info("retraining on %d offline + %d online rows (store rows [0, %d), %d episodes, policy versions %s)",
             offline_rows, len(online), selection.store_rows, selection.episodes,
             selection.policy_versions or "-")  # fmt: skip

    agent, spec = make_agent(cfg, task, data, device)
    if cfg.algo.q_target_clip:  # over all training rows, offline and online (OOO's conservative_sac_exploitation.py:
        QBound(agent, cfg.algo.discount, data.reward)  # bound_q_functions_according_to_data, after reward rescaling)
    start = 0
    if cfg.resume:
        resumed, _, payload = load_checkpoint(cfg.resume, device, restore_rng=True)
        agent.load_training_state(resumed.training_state())
        start = payload["step"]
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    # Two buffers, as OOO samples its offline dataset and its replay buffer apart; the split is fixed.
    offline_buffer = TransitionBuffer.from_transitions(offline, low, high, device) if offline_rows else None
    online_buffer = TransitionBuffer.from_transitions(online, low, high, device) if len(online) else None
    if online_buffer is not None:
        online_buffer.online = True  # its batch rows are the online ones (Batch.online_rows)
    for name, buffer in (("offline", offline_buffer), ("online", online_buffer)):
        if buffer is not None:
            log.info("%s buffer: %s", name, buffer.memory.line())
    n_offline, n_online = batch_split(offline_rows, len(online), cfg.batch_size, cfg.offline_share)
    best = np.zeros(0, np.int64)
    if cfg.high_reward_extra > 0 and online_buffer is not None:  # the buffer's rows (a camera buffer may reorder them)
        best = high_reward_rows(online_buffer.columns["reward"].cpu().numpy())
    sample = _sampler(offline_buffer, online_buffer, n_offline, n_online, best, cfg.high_reward_extra)

    upsampled = None
    if cfg.high_reward_extra > 0:
        upsampled = {"extra_per_batch": cfg.high_reward_extra if len(best) else 0, "from": "online rows",
                     "reward": float(online.reward.max()) if len(online) else None, "rows": len(best)}  # fmt: skip
    summary = {
        "status": "training",
        "store": str(Path(cfg.store).resolve()),
        "store_rows": selection.store_rows,
        "online_rows": len(online),
        "online_episodes": selection.episodes,
        "policy_versions": selection.policy_versions,
        "offline_dataset": cfg.dataset if cfg.offline else None,
        "offline_rows": offline_rows,
        "algo": "Cal-QL" if cfg.algo.calibrated else "CQL",
        "batch": {"offline": n_offline, "online": n_online,
                  "offline_share": "proportional" if cfg.offline_share is None else cfg.offline_share},  # fmt: skip
        # [min r, max r] of all training rows (scaled) and the bounds on Q' they give (None: no clip).
        "reward_range": [float(data.reward.min()), float(data.reward.max())],
        "q_target_clip": list(agent.td_target_bounds.tolist()) if cfg.algo.q_target_clip else None,
        "critic_feature_norm": cfg.net.critic_feature_norm,
        "high_reward_extra": cfg.high_reward_extra,
        "high_reward_upsampling": upsampled,
        "steps": cfg.steps,
    }
    return RetrainSetup(agent, spec, task, sample, summary, start, run_dir)


def _sampler(offline: TransitionBuffer | None, online: TransitionBuffer | None, n_offline: int, n_online: int,
             best: np.ndarray, extra: int):  # fmt: skip
    """Batches of ``n_offline`` offline rows then ``n_online`` online rows, then ``extra`` rows drawn
    from the online rows ``best`` (OOO: online_batch = concatenate_batches([online_batch,
    upsample_batch]), then offline + online; conservative_sac_exploitation.py)."""
    best_rows = torch.as_tensor(best, device=online.device) if online is not None and len(best) else None

    def sample() -> Batch:
        parts = []
        if n_offline:
            parts.append(offline.sample(n_offline))
        if n_online:
            parts.append(online.sample(n_online))
        if extra > 0 and best_rows is not None:
            parts.append(online.sample_rows(best_rows, extra))
        batch = parts[0]
        for part in parts[1:]:
            batch = concat_batches(batch, part)
        return batch

    return sample


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_summary(run_dir: Path, summary: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / SUMMARY_FILE)


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="retrain")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: RetrainConfig = OmegaConf.to_object(dict_cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = retrain(cfg, run_dir, explicit_keys(hydra_cfg.overrides.task))
    except (DatasetError, StoreError, DivergedError, KeyError, ValueError, FileNotFoundError) as err:
        print(f"o2o-retrain: error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(f"o2o-retrain: stopped by {requested() or 'KeyboardInterrupt'} at step {stop.step} of {cfg.steps} (not "
              f"evaluated; {SUMMARY_FILE} says status stopped); checkpoint written to {stop.checkpoint} "
              f"(the same command with resume={stop.checkpoint.parent} continues it)")  # fmt: skip
        return
    except KeyboardInterrupt:  # while reading the store or the dataset
        print(f"o2o-retrain: stopped by {requested() or 'KeyboardInterrupt'} before the first update: no checkpoint "
              "written")  # fmt: skip
        return
    score = summary["eval"].get("normalized_score", float("nan"))
    print(f"retrained on {summary['offline_rows']} offline + {summary['online_rows']} online rows: score {score:.1f}\n"
          f"  policy:  {summary['policy']}\n  summary: {Path(summary['checkpoint']).parent / SUMMARY_FILE}")


def main() -> None:
    with graceful_stop("o2o-retrain"):  # SIGTERM too stops gracefully; a second signal exits at once
        _hydra_main()


if __name__ == "__main__":
    main()
