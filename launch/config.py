"""o2o-launch's settings (LaunchConfig, configs/launch.yaml) and the checks made before anything starts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from o2o.actor.config import ActorConfig, validate
from o2o.learner.config import OnlineConfig
from o2o.transport.security import ACTORS


@dataclasses.dataclass
class LaunchConfig:
    """o2o-launch's own settings, with the learner's and the actors' nested (never copied)."""

    learner: OnlineConfig = field(default_factory=OnlineConfig)
    """o2o-learner's settings (learner/config.py), e.g. learner.utd=0.5 learner.algo.cql_alpha=1.0."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Every o2o-actor's settings (actor/config.py), e.g. actor.policy.noise_scale=0.5; actor i is
    named <actor_id>-<i> and seeded with seed * 1000 + i."""
    actors: int = 2
    """Simulated actor processes."""
    port: int = 0
    """Learner port on 127.0.0.1 (0 = a free one)."""
    refresh_s: float = 2.0
    """Progress refresh period."""


ConfigStore.instance().store(name="launch_schema", node=LaunchConfig)

GROUPS = ("task", "preset")
"""o2o-learner's config groups; launch.yaml composes them under `learner` (Hydra: task@learner)."""

SET_BY_LAUNCHER = {
    "learner.task": "task=NAME sets the task (and its dataset) for the learner and the actors",
    "actor.task": "task=NAME sets the task (and its dataset) for the learner and the actors",
    "learner.endpoint": "the learner listens on 127.0.0.1 (port=N picks the port)",
    "actor.learner": "the actors connect to the launched learner (port=N picks the port)",
    "learner.progress": "o2o-launch shows the progress",
    "actor.spool.dir": "the actors spool under <run>/spool",
    "actor.keys": "learner.keys=KEYS gives actor i the key folder KEYS/actors/<actor_id>-<i> (o2o-keys add)",
}
"""Keys the launcher sets for each process: refused on its command line, with what to use."""


def hydra_overrides(args: list[str]) -> list[str]:
    """`task=X` / `preset=X`, as on o2o-learner's command line, for launch.yaml's `task@learner` groups."""
    return [re.sub(rf"^({'|'.join(GROUPS)})=", r"\1@learner=", arg) for arg in args]


def given(key: str, explicit: set[str]) -> bool:
    """Whether the command line set `key` or a config node above it (learner.algo=...)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def actor_name(cfg: LaunchConfig, index: int) -> str:
    return f"{cfg.actor.actor_id}-{index}"


def actor_keys(cfg: LaunchConfig, actor_id: str) -> Path:
    return (Path(cfg.learner.keys) / ACTORS / actor_id).absolute()


def check(cfg: LaunchConfig, explicit: set[str]) -> None:
    """Refuse what the launcher sets itself, and a bad actor config (else every actor exits and is restarted)."""
    for key, use in SET_BY_LAUNCHER.items():
        if given(key, explicit):
            raise ValueError(f"{key} is set by o2o-launch: {use}")
    validate(dataclasses.replace(cfg.actor, actor_id=actor_name(cfg, 0)))
    if cfg.learner.keys:
        names = [actor_name(cfg, i) for i in range(cfg.actors)]
        missing = [n for n in names if not actor_keys(cfg, n).is_dir()]
        if missing:
            raise ValueError(f"learner.keys={cfg.learner.keys} has no keys for actor {', '.join(missing)}: run "
                             f"`o2o-keys add {cfg.learner.keys} {' '.join(names)}`")  # fmt: skip
