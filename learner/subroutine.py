"""Offline RL as a subroutine of online RL (Su, Luo, Zhang, arXiv 2512.00383; OOO's retraining).

The online learner retrains a fresh agent on its own history every ``retrain_every`` online
updates (and/or at the end) by running ``o2o-retrain`` beside itself on the store's committed
prefix, and uses the result one of two ways (``retrain_mode``; ``Subroutine`` is what the online
loop calls, for both):

* ``recommend`` (final policy recommendation; OOO): the retrained policy is evaluated and
  exported as the recommended policy (``<run>/recommended.onnx`` + ``recommended.json``,
  the latest accepted retrain); the online agent keeps exploring (and updating) untouched.
* ``fine_tune`` (online fine-tuning): the online agent is replaced by the retrained one
  (networks, target networks, temperatures and their optimiser state; its exploration
  bonuses stay) and fine-tuning continues from it. The online agent makes no update while
  a retrain runs (the learner pauses: ``Retrainer.pauses_updates``), so the switch throws
  no update away; ingest goes on and the actors keep acting with the last published policy.

Validation before use (``validate``): a retrain is used only if its score on the learner's
fixed evaluation episodes (``eval.seed`` / ``eval.episodes``, which the retrain evaluates on
and writes in its ``retrain.json``) is at least the current one's: in ``fine_tune`` the online
agent's, evaluated on the same episodes at the same update; in ``recommend`` the recommended
policy's (the last accepted retrain), or the online agent's while none is. Each decision is
logged (a log line and ``retrain/accepted``, ``retrain/normalized_score``,
``retrain/incumbent_score`` in the metrics). This is OUR reading of the paper: its body was
not available to us, so its own validation recipe (held-out episodes? a margin? which
statistic?) is unverified. On a robot, the actors' evaluation episodes would be the evaluation;
the learner's simulated evaluation is what is implemented here.

Each retrain gets its own seed (``retrain_seed``: from the run's seed and the online updates
at its start, so a resumed run gives the same retrain the same seed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig

from o2o.datasets.atomic_file import replacing, write_atomic

from . import stopping
from .bonus import bonus_names
from .checkpoint import load_checkpoint
from .commands import retrain_command, start_logged
from .config import CalQLConfig, NetworkConfig
from .metric_keys import ACCEPTED, RETRAIN, STARTED_AT_UPDATES

log = logging.getLogger("o2o.subroutine")

MODES = ("recommend", "fine_tune")
RECOMMENDED_POLICY = "recommended.onnx"
RECOMMENDED_FILE = "recommended.json"
NET_FIELDS = tuple(f.name for f in dataclasses.fields(NetworkConfig)
                   if not f.name.startswith(tuple(f"{bonus}_" for bonus in bonus_names(CalQLConfig))))  # fmt: skip
"""The online agent's network settings a retrain must share (``fine_tune`` copies its weights): all
but its bonuses' networks (``net.rnd_*``), as a retrain trains without bonuses."""


def retrain_seed(seed: int, updates: int) -> int:
    """The seed of the retrain started at ``updates`` online updates of a run seeded ``seed``: a
    different one for each retrain (the same one again on resume), none of them the run's own."""
    return int(np.random.SeedSequence([seed % 2**32, updates]).generate_state(1)[0])


@dataclasses.dataclass
class RetrainJob:
    updates: int  # online updates when it started
    store_rows: int  # the store's committed rows it trains on
    run_dir: Path
    process: subprocess.Popen
    seed: int = 0


class Retrainer:
    """Starts ``o2o-retrain`` subprocesses on the store and reports the ones that finished."""

    def __init__(self, cfg, run_dir: Path, store_path: Path, net: dict, from_scratch: bool, offline_steps: int = 0):
        """``offline_steps``: the online agent's updates before the online phase (its pretraining)."""
        if cfg.retrain_mode not in MODES:
            raise ValueError(f"retrain_mode={cfg.retrain_mode!r}: choose one of {', '.join(MODES)}")
        if any(str(arg).lstrip("+~").startswith(("eval.", "seed=")) for arg in cfg.retrain_args):
            raise ValueError("retrain_args may not set eval.* or seed: a retrain is validated on the learner's own "
                             "evaluation episodes, and each retrain gets its own seed")  # fmt: skip
        self.cfg, self.run_dir, self.store_path = cfg, run_dir, store_path
        self.net, self.from_scratch, self.offline_steps = net, from_scratch, offline_steps
        self.job: RetrainJob | None = None
        self.next_at = cfg.retrain_every if cfg.retrain_every > 0 else None

    @property
    def enabled(self) -> bool:
        return self.next_at is not None or self.cfg.retrain_at_end

    @property
    def pauses_updates(self) -> bool:
        """No online update now: in ``fine_tune`` the online agent waits while a retrain runs (the
        switch replaces it: updates made meanwhile would be thrown away). The learner keeps
        ingesting (the fleet is held only by ``max_rows_ahead``, as always) and publishes nothing
        new, so the actors act with the last published policy. ``recommend`` never pauses."""
        return self.cfg.retrain_mode == "fine_tune" and self.job is not None

    def steps(self, updates: int) -> int:
        """A retrain's updates: ``retrain_steps``, or (0) as many as the agent it is compared with has had."""
        return self.cfg.retrain_steps or max(1, self.offline_steps + updates)

    def command(self, store_rows: int, out: Path, seed: int | None = None, steps: int | None = None) -> list[str]:
        cfg = self.cfg
        steps = steps or self.steps(0)
        # The learner's preset, so a retrain under preset=paper gets its domain's CQL settings and data mix.
        preset = HydraConfig.get().runtime.choices.get("preset") if HydraConfig.initialized() else None
        given = any(str(arg).startswith("preset=") for arg in cfg.retrain_args)
        return retrain_command(
            task=cfg.task, preset=None if given else preset, store=self.store_path, until_row=store_rows,
            dataset=cfg.dataset, offline=not self.from_scratch, steps=steps,
            seed=cfg.seed if seed is None else seed, device=cfg.device, threads=cfg.threads,
            eval_episodes=cfg.eval.episodes, eval_seed=cfg.eval.seed, out=out,
            net={k: self.net[k] for k in NET_FIELDS if k in self.net}, extra=cfg.retrain_args)  # fmt: skip

    def maybe_start(self, updates: int, store_rows: int) -> None:
        """Start a retrain when ``retrain_every`` updates have passed (one at a time: a due retrain
        waits for the running one)."""
        if self.next_at is None or updates < self.next_at or self.job is not None:
            return
        self.next_at = updates + self.cfg.retrain_every
        self.start(updates, store_rows)

    def start(self, updates: int, store_rows: int) -> None:
        out = self.run_dir / "retrain" / f"{updates:08d}"
        out.mkdir(parents=True, exist_ok=True)
        seed = retrain_seed(self.cfg.seed, updates)
        cmd = self.command(store_rows, out, seed, self.steps(updates))
        process = start_logged(cmd, out / "retrain.log", stdin=subprocess.DEVNULL)
        self.job = RetrainJob(updates, store_rows, out, process, seed)
        log.info("retraining on the store's first %d rows (at %d updates, seed %d): %s", store_rows, updates, seed, out)

    def poll(self, wait: bool = False) -> dict | None:
        """The summary of the retrain that just finished (None: none finished, or it failed: logged)."""
        job = self.job
        if job is None or (job.process.poll() is None and not wait):
            return None
        code = job.process.wait()
        self.job = None
        summary_path = job.run_dir / "retrain.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if code != 0 or summary.get("status") != "done":
            log.error("the retrain at %d updates failed (exit %d): see %s", job.updates, code, job.run_dir / "retrain.log")
            return None
        summary["updates"], summary["seed"] = job.updates, job.seed
        return summary

    def stop(self) -> None:
        """Stop a running retrain (the learner is stopping early)."""
        if self.job is not None and self.job.process.poll() is None:
            self.job.process.terminate()
            try:
                self.job.process.wait(10)
            except subprocess.TimeoutExpired:
                self.job.process.kill()
        self.job = None


def recommend(run_dir: Path, summary: dict) -> Path:
    """The retrained policy becomes the run's recommended policy (written atomically)."""
    target = run_dir / RECOMMENDED_POLICY
    with replacing(target) as tmp:
        shutil.copyfile(summary["policy"], tmp)
    record = {k: summary.get(k) for k in ("updates", "store_rows", "online_rows", "policy_versions", "eval", "policy",
                                          "checkpoint")}  # fmt: skip
    write_atomic(run_dir / RECOMMENDED_FILE, json.dumps(record, indent=2))
    return target


def recommended_score(run_dir: Path) -> float | None:
    """The recommended policy's score (the last accepted retrain's; None: none yet)."""
    path = run_dir / RECOMMENDED_FILE
    if not path.exists():
        return None
    score = (json.loads(path.read_text()).get("eval") or {}).get("normalized_score")
    return None if score is None else float(score)


@dataclasses.dataclass
class Decision:
    """Whether a finished retrain is used, and the two scores (same evaluation episodes) it rests on."""

    accepted: bool
    score: float  # the retrain's normalised score
    incumbent_score: float  # the current one's
    incumbent: str  # what the current one is: "the online agent" or "the recommended policy"

    def record(self) -> dict:
        return {ACCEPTED: float(self.accepted), "incumbent_score": self.incumbent_score}


def validate(summary: dict, mode: str, run_dir: Path, evaluate_online: Callable[[], dict]) -> Decision:
    """Validation before use: the retrain is accepted only if its score is at least the current one's.

    Both scores are normalised scores over the learner's fixed evaluation episodes (the retrain
    evaluates on the same ``eval.seed`` / ``eval.episodes``: ``Retrainer.command``). The current
    one: in ``recommend`` the recommended policy (the last accepted retrain), or, while there is
    none, the online agent; in ``fine_tune`` the online agent. ``evaluate_online`` evaluates the
    online agent as it is now (an ``evaluate`` result), called only when needed.

    Our reading of the paper (Su, Luo, Zhang, arXiv 2512.00383), whose body was not available to
    us: its validation recipe is unverified. Ties are accepted ("at least as good"). On a robot,
    the actors' evaluation episodes would be this evaluation.
    """
    score = float(summary["eval"]["normalized_score"])
    current = recommended_score(run_dir) if mode == "recommend" else None
    incumbent = "the recommended policy"
    if current is None:
        current, incumbent = float(evaluate_online()["normalized_score"]), "the online agent"
    return Decision(bool(score >= current), score, current, incumbent)  # NaN scores are never accepted


def switch_in(agent, summary: dict) -> None:
    """``fine_tune``: the online agent continues from the retrained checkpoint (its policy, critics
    AND target critics, temperatures, observation statistics and optimiser state)."""
    retrained, _, _ = load_checkpoint(summary["checkpoint"], agent.device)
    agent.load_networks(retrained)


def use_retrained(summary: dict, mode: str, run_dir: Path, agent, evaluate_online: Callable[[], dict], logger,
                  updates: int) -> Decision:  # fmt: skip
    """Validate a finished retrain (``validate``), log the decision (``retrain/...`` metrics at
    ``updates`` and a log line) and, if accepted, use it: recommend it (``recommend``) or switch
    the online agent to it (``switch_in``). Publishing and checkpointing are the caller's."""
    decision = validate(summary, mode, run_dir, evaluate_online)
    logger.log(updates, RETRAIN, {**summary["eval"], **decision.record(), "store_rows": summary["store_rows"],
                                    "online_rows": summary["online_rows"], STARTED_AT_UPDATES: summary["updates"],
                                    "seed": summary.get("seed", -1)})  # fmt: skip
    verdict = "accepted" if decision.accepted else "rejected (not used)"
    log.info("retrain on %d store rows (started at %d updates): score %.1f vs %s's %.1f on the same evaluation "
             "episodes: %s", summary["store_rows"], summary["updates"], decision.score, decision.incumbent,
             decision.incumbent_score, verdict)  # fmt: skip
    if not decision.accepted:
        return decision
    if mode == "recommend":
        path = recommend(run_dir, summary)
        log.info("recommended policy (retrained on %d store rows, score %.1f): %s", summary["store_rows"],
                 decision.score, path)  # fmt: skip
    else:
        switch_in(agent, summary)
        log.info("the online agent continues from the retrained one (%s, score %.1f) at %d updates",
                 summary["checkpoint"], decision.score, updates)  # fmt: skip
    return decision


class Subroutine:
    """Offline RL as a subroutine of the online loop, both modes (``retrain_mode``): retrains on schedule
    and at the end (``Retrainer``); each finished one validated and used (``use_retrained``). In
    ``fine_tune`` the online agent continues from an accepted retrain: its policy is published,
    the run checkpointed and the switch recorded in ``switches`` (kept in the checkpoint)."""

    def __init__(self, cfg, retrainer: Retrainer, agent, publisher, evaluations, logger,
                 checkpoint: Callable[[int], None], switches: list[dict]):  # fmt: skip
        """``publisher``: a ``fleet.PolicyPublisher``; ``evaluations``: the run's ``cadence.Evaluations``;
        ``checkpoint(updates)`` writes the run's checkpoint."""
        self.cfg, self.retrainer, self.agent, self.publisher = cfg, retrainer, agent, publisher
        self.evaluations, self.logger, self.checkpoint, self.switches = evaluations, logger, checkpoint, switches

    def step(self, updates: int, rows: int) -> bool:
        """Between update bursts: start a retrain that is due, use one that finished; True while the
        online updates pause (``Retrainer.pauses_updates``). ``rows``: the store's committed rows."""
        self.retrainer.maybe_start(updates, rows)
        self.use(self.retrainer.poll(), updates, rows)
        return self.retrainer.pauses_updates

    def use(self, summary: dict | None, updates: int, rows: int, at_end: bool = False) -> bool:
        """A finished retrain (None: none): validated against the current one on the same evaluation
        episodes, logged, then (if accepted) recommended or taken over; True if taken over. ``at_end``:
        the server is gone, the run's policy file is all there is to update."""
        if summary is None:
            return False
        mode, run_dir = self.cfg.retrain_mode, self.retrainer.run_dir
        evaluate_online = lambda: self.evaluations.current(updates, rows)  # noqa: E731 (only if needed)
        decision = use_retrained(summary, mode, run_dir, self.agent, evaluate_online, self.logger, updates)
        if not decision.accepted or mode != "fine_tune":
            return False
        self.evaluations.agent_changed()  # the online agent changed at this update
        self.switches.append({"updates": updates, "checkpoint": summary["checkpoint"], "store_rows": summary["store_rows"],
                              "score": decision.score, "incumbent_score": decision.incumbent_score})  # fmt: skip
        if at_end:
            self.publisher.export(updates)
        else:
            self.publisher.publish(updates)
        self.checkpoint(updates)
        return True

    def finish(self, updates: int, rows: int) -> bool:
        """After the online updates (the final checkpoint written, the actors held): the last periodic
        retrain, then one on the whole store (``retrain_at_end``); the run ends with an evaluation of a
        retrained agent that switched in. False if a signal cut it short (the retrain is stopped)."""
        try:
            if stopping.requested():  # a signal while closing (noted by `shutdown`): no retrain at the end
                raise KeyboardInterrupt
            switched = self.use(self.retrainer.poll(wait=True), updates, rows)  # the last periodic one
            if self.cfg.retrain_at_end:
                log.info("retraining on the whole store (%d rows)", rows)
                self.retrainer.start(updates, rows)
                switched = self.use(self.retrainer.poll(wait=True), updates, rows, at_end=True) or switched
            if switched:  # the run now ends with the retrained agent: the final evaluation must be of it
                self.evaluations.run(updates, rows)
        except KeyboardInterrupt:  # the final checkpoint is written: only the retrain is cut short
            self.retrainer.stop()
            log.info("interrupted: the retrain at the end is skipped")
            return False
        return True
