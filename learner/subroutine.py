"""Offline RL as a subroutine of online RL (Su, Luo, Zhang, arXiv 2512.00383; OOO's retraining).

The online learner retrains a fresh agent on its own history every ``retrain_every`` online
updates (and/or at the end) by running ``o2o-retrain`` beside itself on the store's committed
prefix, and uses the result one of two ways (``retrain_mode``):

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
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig

from .checkpoint import load_checkpoint
from .overrides import hydra_value

log = logging.getLogger("o2o.subroutine")

MODES = ("recommend", "fine_tune")
RECOMMENDED_POLICY = "recommended.onnx"
RECOMMENDED_FILE = "recommended.json"
NET_FIELDS = ("policy_hidden", "critic_hidden", "num_critics", "orthogonal_init", "log_std_multiplier",
              "log_std_offset", "normalize_observations", "critic_feature_norm")  # fmt: skip
"""The online agent's network settings a retrain must share (``fine_tune`` copies its weights)."""


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
        net = [f"net.{k}={hydra_value(self.net[k])}" for k in NET_FIELDS if k in self.net]
        # The learner's preset, so a retrain under preset=paper gets its domain's CQL settings and data mix.
        preset = HydraConfig.get().runtime.choices.get("preset") if HydraConfig.initialized() else None
        given = any(str(arg).startswith("preset=") for arg in cfg.retrain_args)
        return [
            sys.executable, "-m", "o2o.learner.retrain", f"task={cfg.task}",
            *([f"preset={preset}"] if preset and not given else []), f"store={hydra_value(str(self.store_path))}",
            f"until_row={store_rows}", f"dataset={hydra_value(cfg.dataset)}", f"offline={str(not self.from_scratch).lower()}",
            "build_missing_dataset=false",  # the learner checked (or built) the dataset before it started
            f"steps={steps}", f"seed={cfg.seed if seed is None else seed}", f"device={cfg.device}",
            f"threads={cfg.threads}",  # the learner's own evaluation episodes: the score `validate` compares
            f"eval.episodes={cfg.eval.episodes}", f"eval.seed={cfg.eval.seed}", "eval.every=0", "progress=false",
            f"checkpoint_every={steps}", f"hydra.run.dir={hydra_value(str(out))}", *net, *cfg.retrain_args,
        ]  # fmt: skip

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
        with open(out / "retrain.log", "w") as log_file:
            log_file.write(" ".join(cmd) + "\n")
            log_file.flush()
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
    tmp = run_dir / f".{RECOMMENDED_POLICY}.tmp"
    shutil.copyfile(summary["policy"], tmp)
    os.replace(tmp, target)
    record = {k: summary.get(k) for k in ("updates", "store_rows", "online_rows", "policy_versions", "eval", "policy",
                                          "checkpoint")}  # fmt: skip
    tmp_record = run_dir / f".{RECOMMENDED_FILE}.tmp"
    tmp_record.write_text(json.dumps(record, indent=2))
    os.replace(tmp_record, run_dir / RECOMMENDED_FILE)
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
        return {"accepted": float(self.accepted), "incumbent_score": self.incumbent_score}


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
    logger.log(updates, "retrain", {**summary["eval"], **decision.record(), "store_rows": summary["store_rows"],
                                    "online_rows": summary["online_rows"], "started_at_updates": summary["updates"],
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
