"""`o2o-experiment`: one (task, method, seed) cell of the results matrix, as real o2o processes.

    o2o-experiment task=pointmaze-medium method=calql seed=0                 # one cell
    o2o-experiment -m task=pointmaze-medium,fetch-push \\
        method=cql,calql,calql_sera,calql_rnd_ooo,sac,sac_recommend,sac_fine_tune seed=0,1,2 \\
        hydra/launcher=joblib hydra.launcher.n_jobs=2 threads=1             # the matrix, 2 jobs at a time
    o2o-experiment -m ... hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.timeout_min=600 budget=paper device=cuda              # on a SLURM cluster

A cell: (1) pretrains once per (task, pretraining method, seed) with `o2o-pretrain` and reuses
that checkpoint for every method that starts from it (a file lock lets parallel cells share it);
(2) fine-tunes online with `o2o-launch` (the real `o2o-learner` and `o2o-actor` processes on
loopback), evaluating every `eval_every_steps` online env steps; (3) retrains with `o2o-retrain`
where the method says so (the learner runs it). Everything lands under
``<root>/runs/<task>/<method>/seed<seed>`` with ``cell.json`` written last: a finished cell is
skipped when the matrix is run again, so an interrupted matrix resumes where it stopped.
`o2o-report <root>` turns the folders into docs/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from o2o.datasets.builders import ensure_dataset as build_offline_dataset
from o2o.datasets.file_lock import FileLock

CELL_FILE = "cell.json"


@dataclasses.dataclass
class MethodConfig:
    name: str = "calql"
    """The method's name in the report."""
    pretrain: str | None = "calql"
    """Name of the pretraining it starts from (cells with the same name, task and seed share it);
    None = online from scratch, no offline data."""
    pretrain_args: list[str] = field(default_factory=list)
    """o2o-pretrain overrides that define that pretraining (e.g. algo.calibrated=false)."""
    online_args: list[str] = field(default_factory=list)
    """o2o-learner overrides of the online phase (e.g. algo.sera=true, retrain_at_end=true)."""


@dataclasses.dataclass
class BudgetConfig:
    name: str = "small"
    """The budget's name in the report."""
    pretrain_args: list[str] = field(default_factory=list)
    """o2o-pretrain overrides (steps, networks, batch size...)."""
    learner_args: list[str] = field(default_factory=list)
    """o2o-learner overrides (online_updates, eval_every_steps, eval.episodes, retrain_steps...)."""
    actor_args: list[str] = field(default_factory=list)
    """o2o-actor overrides (control_hz...)."""
    actors: int = 1
    """Simulated actor processes per cell."""
    dataset_quality: str = "medium"
    """The offline dataset: o2o/<task>/<quality>-v0 (built on first use)."""
    dataset_episodes: int = 0
    """Episodes recorded when that dataset has to be built (0 = the task builder's default)."""
    preset: str = "small"
    """The o2o preset both phases start from (preset=paper: the official per-domain settings)."""
    retrain_every: int = 1000
    """Online updates between the retrains of the methods that retrain (their online_args use it)."""


@dataclasses.dataclass
class ExperimentConfig:
    task: str = "pointmaze-medium"
    """o2o task name."""
    seed: int = 0
    """Seed of the pretraining, the learner and the actors."""
    root: str = "runs/experiment"
    """Where the matrix lives: <root>/pretrain, <root>/runs, and what o2o-report reads."""
    threads: int = 0
    """torch threads of each learner / pretraining (0 = torch's default); split the cores between
    parallel cells: cores / n_jobs."""
    device: str = "auto"
    """The learner's device (auto, cpu, cuda)."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """What is compared (configs/method/)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """How long each phase runs (configs/budget/)."""


ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


def run_logged(cmd: list[str], log_path: Path) -> None:
    """Run a command with its output in ``log_path`` (first line: the command); raise if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed (exit {code}); see {log_path}:\n{tail}")


def dataset_id(cfg: ExperimentConfig) -> str:
    return f"o2o/{cfg.task}/{cfg.budget.dataset_quality}-v0"


def ensure_dataset(cfg: ExperimentConfig) -> None:
    """Build the cell's offline dataset once (under a per-task lock: parallel cells share it); one built
    with other parameters is refused (builders.ensure_dataset)."""
    with FileLock(Path(cfg.root) / "locks" / f"dataset-{cfg.task}.lock"):
        build_offline_dataset(dataset_id(cfg), cfg.budget.dataset_episodes or None, progress=False)


def pretrained_checkpoint(cfg: ExperimentConfig) -> Path | None:
    """The shared pretraining of this cell (run once, under a lock); None for methods from scratch."""
    method = cfg.method
    if method.pretrain is None:
        return None
    ensure_dataset(cfg)
    folder = Path(cfg.root) / "pretrain" / cfg.task / method.pretrain / f"seed{cfg.seed}"
    done = folder / "done.json"
    with FileLock(Path(cfg.root) / "locks" / f"pretrain-{cfg.task}-{method.pretrain}-{cfg.seed}.lock"):
        if not done.exists():
            cmd = [sys.executable, "-m", "o2o.learner.pretrain", f"task={cfg.task}", f"preset={cfg.budget.preset}",
                   f"dataset={dataset_id(cfg)}", "build_missing_dataset=false",
                   f"seed={cfg.seed}", f"threads={cfg.threads}", f"device={cfg.device}", "progress=false",
                   *cfg.budget.pretrain_args, *method.pretrain_args, f"hydra.run.dir={folder}"]  # fmt: skip
            started = time.time()
            run_logged(cmd, folder / "pretrain.log")
            done.write_text(json.dumps({"seconds": time.time() - started, "command": shlex.join(cmd)}))
    return folder / "checkpoint.pt"


def online_command(cfg: ExperimentConfig, checkpoint: Path | None, run_dir: Path) -> list[str]:
    learner = [f"learner.{arg}" for arg in (*cfg.budget.learner_args, *cfg.method.online_args)]
    start = [f"learner.pretrained={checkpoint}"] if checkpoint else ["learner.from_scratch=true"]
    return [
        sys.executable, "-m", "o2o.learner.launch", f"task={cfg.task}", f"preset={cfg.budget.preset}",
        f"learner.dataset={dataset_id(cfg)}", "learner.build_missing_dataset=false",  # ensure_dataset built it
        f"actors={cfg.budget.actors}", f"learner.seed={cfg.seed}", f"actor.seed={cfg.seed}",
        f"learner.threads={cfg.threads}", f"learner.device={cfg.device}", *start, *learner,
        *(f"actor.{arg}" for arg in cfg.budget.actor_args), f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def run_cell(cfg: ExperimentConfig, command_line: str) -> dict:
    """Pretrain (or reuse), fine-tune online, and write cell.json; a finished cell is skipped."""
    run_dir = Path(cfg.root) / "runs" / cfg.task / cfg.method.name / f"seed{cfg.seed}"
    cell_file = run_dir / CELL_FILE
    if cell_file.exists():
        print(f"o2o-experiment: {run_dir} is done: skipped")
        return json.loads(cell_file.read_text())
    started = time.time()
    checkpoint = pretrained_checkpoint(cfg)
    if run_dir.exists():  # an interrupted cell starts again: its store would mix two runs
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    run_logged(online_command(cfg, checkpoint, run_dir), run_dir.parent / f"seed{cfg.seed}.launch.log")
    cell = {
        "task": cfg.task, "method": cfg.method.name, "seed": cfg.seed, "budget": cfg.budget.name,
        "dataset": dataset_id(cfg) if checkpoint else None, "pretrained": str(checkpoint) if checkpoint else None,
        "seconds": time.time() - started, "machine": machine(), "command": command_line,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }  # fmt: skip
    tmp = run_dir / f".{CELL_FILE}.tmp"
    tmp.write_text(json.dumps(cell, indent=2))
    os.replace(tmp, cell_file)  # last: its presence means the cell is complete
    return cell


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="experiment")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: ExperimentConfig = OmegaConf.to_object(dict_cfg)
    overrides = HydraConfig.get().overrides.task
    command_line = shlex.join(["o2o-experiment", *overrides])
    try:
        cell = run_cell(cfg, command_line)
    except RuntimeError as err:
        print(f"o2o-experiment: error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return  # one failed cell must not stop the matrix; it has no cell.json, so a rerun retries it
        sys.exit(2)
    print(f"o2o-experiment: {cell['task']} / {cell['method']} / seed {cell['seed']} done in {cell['seconds']:.0f} s")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
