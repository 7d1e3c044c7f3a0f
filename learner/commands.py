"""Command lines of the o2o commands that o2o starts itself, each value written for Hydra (no torch here).

`settings_args` is the one way a setting becomes a command-line override (``key=value``, the value in
Hydra's grammar: `hydra_value`); `retrain_command` is o2o-retrain's command line, the one the online
learner starts (subroutine.py). The launchers' own builders (o2o-pretrain, o2o-learner, o2o-actor,
o2o-launch) are in launch/commands.py: the learner may not import the launchers, they may import this.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .overrides import hydra_value

RETRAIN_MODULE = "o2o.learner.retrain"


def settings_args(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` for each setting, in order; a nested mapping gives dotted keys
    (``{"eval": {"every": 0}}`` -> ``eval.every=0``), ``prefix`` goes before each key."""
    args = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            args += settings_args(value, f"{prefix}{key}.")
        else:
            args.append(f"{prefix}{key}={hydra_value(value)}")
    return args


def module_command(module: str, settings: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """``python -m module`` with ``settings`` as overrides, then ``extra`` (overrides written already)."""
    return [sys.executable, "-m", module, *settings_args(settings), *extra]


def retrain_command(*, task: str, preset: str | None, store: Path, until_row: int, dataset: str, offline: bool,
                    steps: int, seed: int, device: str, threads: int, eval_episodes: int, eval_seed: int, out: Path,
                    net: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str]:  # fmt: skip
    """o2o-retrain on ``store``'s first ``until_row`` rows, evaluated on the learner's own episodes
    (``eval_episodes``, ``eval_seed``) and checkpointed once, at the end; ``preset`` (None: o2o-retrain's
    default) so a retrain under preset=paper gets its domain's settings; ``net``: the network settings it
    must share with the online agent; ``extra``: the user's own o2o-retrain overrides (retrain_args), last."""
    return module_command(RETRAIN_MODULE, {
        "task": task, **({"preset": preset} if preset else {}), "store": str(store), "until_row": until_row,
        "dataset": dataset, "offline": offline,
        "build_missing_dataset": False,  # the learner checked (or built) the dataset before it started
        "steps": steps, "seed": seed, "device": device, "threads": threads,
        "eval": {"episodes": eval_episodes, "seed": eval_seed, "every": 0}, "progress": False,
        "checkpoint_every": steps, "hydra.run.dir": str(out), "net": dict(net),
    }, extra)  # fmt: skip
