"""Offline RL as a subroutine of online RL (Su, Luo, Zhang, arXiv 2512.00383; OOO's retraining).

The online learner retrains a fresh agent on its own history every ``retrain_every`` online
updates (and/or at the end) by running ``o2o-retrain`` beside itself on the store's committed
prefix, and uses the result one of two ways (``retrain_mode``):

* ``recommend`` (final policy recommendation; OOO): the retrained policy is evaluated and
  exported as the recommended policy (``<run>/recommended.onnx`` + ``recommended.json``,
  the latest retrain); the online agent keeps exploring untouched.
* ``fine_tune`` (online fine-tuning): the online agent is replaced by the retrained one
  (networks, temperatures and their optimiser state; its exploration bonuses stay) and
  fine-tuning continues from it.

The paper's own recipe for validating a retrained policy before use was not available to us:
here every finished retrain is used as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .overrides import hydra_value

log = logging.getLogger("o2o.subroutine")

MODES = ("recommend", "fine_tune")
RECOMMENDED_POLICY = "recommended.onnx"
RECOMMENDED_FILE = "recommended.json"
NET_FIELDS = ("policy_hidden", "critic_hidden", "num_critics", "orthogonal_init", "log_std_multiplier",
              "log_std_offset", "normalize_observations", "critic_feature_norm")  # fmt: skip
"""The online agent's network settings a retrain must share (``fine_tune`` copies its weights)."""


@dataclasses.dataclass
class RetrainJob:
    updates: int  # online updates when it started
    store_rows: int  # the store's committed rows it trains on
    run_dir: Path
    process: subprocess.Popen


class Retrainer:
    """Starts ``o2o-retrain`` subprocesses on the store and reports the ones that finished."""

    def __init__(self, cfg, run_dir: Path, store_path: Path, net: dict, from_scratch: bool):
        if cfg.retrain_mode not in MODES:
            raise ValueError(f"retrain_mode={cfg.retrain_mode!r}: choose one of {', '.join(MODES)}")
        self.cfg, self.run_dir, self.store_path = cfg, run_dir, store_path
        self.net, self.from_scratch = net, from_scratch
        self.job: RetrainJob | None = None
        self.next_at = cfg.retrain_every if cfg.retrain_every > 0 else None

    @property
    def enabled(self) -> bool:
        return self.next_at is not None or self.cfg.retrain_at_end

    def command(self, store_rows: int, out: Path) -> list[str]:
        cfg = self.cfg
        net = [f"net.{k}={hydra_value(self.net[k])}" for k in NET_FIELDS if k in self.net]
        return [
            sys.executable, "-m", "o2o.learner.retrain", f"task={cfg.task}", f"store={hydra_value(str(self.store_path))}",
            f"until_row={store_rows}", f"dataset={hydra_value(cfg.dataset)}", f"offline={str(not self.from_scratch).lower()}",
            "build_missing_dataset=false",  # the learner checked (or built) the dataset before it started
            f"steps={cfg.retrain_steps}", f"seed={cfg.seed}", f"device={cfg.device}", f"threads={cfg.threads}",
            f"eval.episodes={cfg.eval.episodes}", f"eval.seed={cfg.eval.seed}", "eval.every=0", "progress=false",
            f"checkpoint_every={cfg.retrain_steps}", f"hydra.run.dir={hydra_value(str(out))}", *net, *cfg.retrain_args,
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
        cmd = self.command(store_rows, out)
        with open(out / "retrain.log", "w") as log_file:
            log_file.write(" ".join(cmd) + "\n")
            log_file.flush()
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.job = RetrainJob(updates, store_rows, out, process)
        log.info("retraining on the store's first %d rows (at %d updates): %s", store_rows, updates, out)

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
        summary["updates"] = job.updates
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
