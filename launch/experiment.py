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
`o2o-report <root>` turns the folders into docs/RESULTS.md. Methods and budgets are typed
(experiments/cell.py); the commands they become are built in launch/commands.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from o2o.datasets.atomic_file import write_atomic
from o2o.datasets.builders import ensure_dataset as build_offline_dataset
from o2o.datasets.file_lock import FileLock
from o2o.experiments.cell import CELL_FILE, ExperimentConfig, dataset_id, machine
from o2o.learner.commands import run_logged

from .commands import launch_command, pretrain_command

ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


def run_checked(cmd: list[str], log_path: Path) -> None:
    """Run a command with its output in ``log_path`` (first line: the command); raise if it fails."""
    code = run_logged(cmd, log_path, stdin=subprocess.DEVNULL)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed (exit {code}); see {log_path}:\n{tail}")


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
            cmd = pretrain_command(cfg, folder)
            started = time.time()
            run_checked(cmd, folder / "pretrain.log")
            done.write_text(json.dumps({"seconds": time.time() - started, "command": shlex.join(cmd)}))
    return folder / "checkpoint.pt"


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
    run_checked(launch_command(cfg, checkpoint, run_dir), run_dir.parent / f"seed{cfg.seed}.launch.log")
    cell = {
        "task": cfg.task, "method": cfg.method.name, "seed": cfg.seed, "budget": cfg.budget.name,
        "dataset": dataset_id(cfg) if checkpoint else None, "pretrained": str(checkpoint) if checkpoint else None,
        "seconds": time.time() - started, "machine": machine(), "command": command_line,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }  # fmt: skip
    write_atomic(cell_file, json.dumps(cell, indent=2))  # last: its presence means the cell is complete
    return cell


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
