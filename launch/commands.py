"""The command lines the launchers start, one builder each: o2o-pretrain, o2o-learner, o2o-actor and
o2o-launch (o2o-retrain's is learner/commands.py: the learner starts it). Every value is written
for Hydra (`hydra_value`), so a path with a space or a quote reads back as itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from o2o.experiments.cell import ExperimentConfig, dataset_id
from o2o.learner.commands import module_command, settings_args
from o2o.learner.overrides import hydra_value

from .config import LaunchConfig, actor_keys, actor_name, given

PRETRAIN_MODULE = "o2o.learner.pretrain"
LEARNER_MODULE = "o2o.learner.online"
ACTOR_MODULE = "o2o.actor.main"
LAUNCH_MODULE = "o2o.launch.launch"

FINE_TUNING_SECTIONS = ("algo", "net")
"""The learner takes these from the checkpoint unless its command line sets them (fine_tuning.py),
so o2o-launch passes them only when given to it, never because a preset changed them."""

__all__ = ["hydra_value", "flatten", "command_overrides", "learner_command", "actor_command", "pretrain_command",
           "launch_command"]  # fmt: skip


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a structured config's leaves; dicts and lists stay whole values."""
    leaves = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(flatten(value, f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = value
    return leaves


def command_overrides(section: str, cfg: Any, explicit: set[str], set_after: tuple[str, ...],
                      only_if_given: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """`key=value` for each field of ``cfg`` (launch config ``section``) that differs from its schema's
    default or was given on the command line, but those in ``set_after`` (the launcher adds them) and
    those under ``only_if_given`` unless given."""
    defaults = flatten(type(cfg)())
    args = []
    for key, value in flatten(cfg).items():
        full = f"{section}.{key}"
        if key in set_after or (key.split(".")[0] in only_if_given and not given(full, explicit)):
            continue
        if given(full, explicit) or value != defaults[key]:
            force = "++" if isinstance(value, dict) else ""  # a free-form dict (env_kwargs) takes new keys only so
            args.append(f"{force}{key}={hydra_value(value)}")
    return args


def learner_command(cfg: LaunchConfig, groups: dict[str, str], explicit: set[str], run_dir: Path,
                    endpoint: str) -> list[str]:  # fmt: skip
    """o2o-learner as o2o-launch starts it: its config groups, the settings that differ from its own
    defaults, on ``endpoint``, writing into ``run_dir``."""
    return module_command(LEARNER_MODULE, groups, [
        *command_overrides("learner", cfg.learner, explicit, ("task", "endpoint", "progress"), FINE_TUNING_SECTIONS),
        *settings_args({"endpoint": endpoint, "progress": False, "hydra.run.dir": str(run_dir)}),
    ])  # fmt: skip


def actor_command(cfg: LaunchConfig, explicit: set[str], run_dir: Path, endpoint: str, index: int) -> list[str]:
    """o2o-actor number ``index`` as o2o-launch starts it: named <actor_id>-<index>, seeded
    seed * 1000 + index, spooling under <run>/spool, connecting to ``endpoint``."""
    actor, name = cfg.actor, actor_name(cfg, index)
    own = {"task": cfg.learner.task, "learner": endpoint, "actor_id": name, "seed": actor.seed * 1000 + index,
           "spool.dir": str(run_dir / "spool")}  # fmt: skip
    if cfg.learner.keys:
        own["keys"] = str(actor_keys(cfg, name))
    # A learner from scratch publishes no policy before its warm-up: the actors act at random.
    if cfg.learner.from_scratch and not given("actor.policy.act_before_policy", explicit):
        own["policy.act_before_policy"] = True
    return module_command(ACTOR_MODULE, {}, [
        *command_overrides("actor", actor, explicit, ("task", "learner", "actor_id", "seed", "spool.dir", "keys")),
        *settings_args(own),
    ])  # fmt: skip


def pretrain_command(cfg: ExperimentConfig, run_dir: Path) -> list[str]:
    """o2o-pretrain of an experiment cell's pretraining (its budget, its method's algo settings)."""
    budget = cfg.budget
    return module_command(PRETRAIN_MODULE, {
        "task": cfg.task, "preset": budget.preset, "dataset": dataset_id(cfg), "build_missing_dataset": False,
        "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device, "progress": False,
        "steps": budget.pretrain_steps, **budget.pretrain, "algo": cfg.method.pretrain_algo,
        "hydra.run.dir": str(run_dir),
    })  # fmt: skip


def launch_command(cfg: ExperimentConfig, checkpoint: Path | None, run_dir: Path) -> list[str]:
    """o2o-launch of an experiment cell's online phase, from ``checkpoint`` (None: from scratch)."""
    budget, method = cfg.budget, cfg.method
    retrains = {"retrain_mode": method.retrain_mode, "retrain_every": method.retrain_every or None,
                "retrain_at_end": method.retrain_at_end or None, "retrain_steps": budget.retrain_steps}  # fmt: skip
    learner = {
        "dataset": dataset_id(cfg), "build_missing_dataset": False,  # the runner built it
        "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device,
        **({"pretrained": str(checkpoint)} if checkpoint else {"from_scratch": True}),
        "online_updates": budget.online_updates, "eval_every_steps": budget.eval_every_steps,
        "eval": {"episodes": budget.eval_episodes}, **budget.learner, "algo": method.online_algo,
        **{key: value for key, value in retrains.items() if value is not None},
    }  # fmt: skip
    return module_command(LAUNCH_MODULE, {
        "task": cfg.task, "preset": budget.preset, "actors": budget.actors, "actor.seed": cfg.seed,
        "learner": learner, "actor": budget.actor, "hydra.run.dir": str(run_dir),
    })  # fmt: skip
