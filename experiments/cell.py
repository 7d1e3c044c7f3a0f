"""What a cell of the results matrix is: its method, its budget, its cell.json (written by o2o-experiment,
launch/experiment.py; read by o2o-report, report.py).

Methods (configs/method/) and budgets (configs/budget/) are typed: the runner turns their fields into
the commands' settings (launch/commands.py) and the report reads the same fields back from cell.json,
never by parsing override strings.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CELL_FILE = "cell.json"
RETRAIN_MODES = ("recommend", "fine_tune")


@dataclasses.dataclass
class MethodConfig:
    name: str = "calql"
    """The method's name in the report."""
    pretrain: str | None = "calql"
    """Name of the pretraining it starts from (cells with the same name, task and seed share it);
    None = online from scratch, no offline data."""
    pretrain_algo: dict[str, Any] = field(default_factory=dict)
    """The algo settings (learner/config.py CalQLConfig) that define that pretraining, e.g. {calibrated: false}."""
    online_algo: dict[str, Any] = field(default_factory=dict)
    """The algo settings of the online phase, e.g. {sera: true}; a method from a checkpoint keeps the
    checkpoint's others (learner/fine_tuning.py)."""
    retrain_mode: str | None = None
    """How the learner uses its retrains (OnlineConfig.retrain_mode: recommend, fine_tune); None: no retrains."""
    retrain_every: int = 0
    """Online updates between retrains (0 = none); the methods that retrain use ${budget.retrain_every}."""
    retrain_at_end: bool = False
    """Retrain once more on the whole store at the end."""

    def __post_init__(self):
        if self.retrain_mode is not None and self.retrain_mode not in RETRAIN_MODES:
            raise ValueError(f"method.retrain_mode={self.retrain_mode!r}: choose one of {', '.join(RETRAIN_MODES)} "
                             "or null (no retrains)")  # fmt: skip
        if self.retrain_mode is None and (self.retrain_every or self.retrain_at_end):
            raise ValueError(f"method {self.name} retrains (retrain_every / retrain_at_end) without a retrain_mode: "
                             f"set method.retrain_mode to one of {', '.join(RETRAIN_MODES)}")  # fmt: skip


@dataclasses.dataclass
class BudgetConfig:
    name: str = "small"
    """The budget's name in the report."""
    preset: str = "small"
    """The o2o preset both phases start from (preset=paper: the official per-domain settings)."""
    dataset_quality: str = "medium"
    """The offline dataset: o2o/<task>/<quality>-v0 (built on first use)."""
    dataset_episodes: int = 0
    """Episodes recorded when that dataset has to be built (0 = the task builder's default)."""
    actors: int = 1
    """Simulated actor processes per cell."""
    pretrain_steps: int = 3000
    """o2o-pretrain's gradient steps (its `steps`)."""
    online_updates: int = 3000
    """o2o-learner's online updates."""
    eval_every_steps: int = 1000
    """Online env steps between the learner's evaluations."""
    eval_episodes: int = 10
    """Deterministic episodes per learner evaluation (its `eval.episodes`)."""
    retrain_every: int = 1000
    """Online updates between the retrains of the methods that retrain (their retrain_every uses it)."""
    retrain_steps: int | None = None
    """A retrain's updates (OnlineConfig.retrain_steps); None: the preset's (0: as many as the agent it is
    compared with has had)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """Other o2o-pretrain settings (batch_size, net: {policy_hidden: [...]}, eval: {every: 0}...)."""
    learner: dict[str, Any] = field(default_factory=dict)
    """Other o2o-learner settings (batch_size, warmup_rows, net, checkpoint_every...)."""
    actor: dict[str, Any] = field(default_factory=dict)
    """o2o-actor settings (control_hz...)."""


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


def dataset_id(cfg: ExperimentConfig) -> str:
    return f"o2o/{cfg.task}/{cfg.budget.dataset_quality}-v0"


def cell_config(meta: dict) -> ExperimentConfig:
    """The experiment config a cell.json records (its "config"; a field it lacks: the schema's default)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), meta.get("config") or {})
    except Exception as err:  # a key the schema lacks: a cell.json from an older o2o-experiment
        raise ValueError(f"cell.json of {meta.get('task')} / {meta.get('method')} / seed {meta.get('seed')} does not "
                         f"match this o2o-experiment's config ({err}); rerun the cell") from err  # fmt: skip
    return OmegaConf.to_object(merged)


def machine() -> str:
    """This machine in one line (CPU, cores, Python): recorded with every result and benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
