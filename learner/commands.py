"""Command lines of the o2o commands that o2o starts itself, each value written for Hydra (no torch here).

`settings_args` is the one way a setting becomes a command-line override (``key=value``, the value in
Hydra's grammar: `hydra_value`); `retrain_command` is o2o-retrain's command line, the one the online
learner starts (subroutine.py). The launchers' own builders (o2o-pretrain, o2o-learner, o2o-actor,
o2o-launch) are in launch/commands.py: the learner may not import the launchers, they may import this.
`start_logged` / `run_logged` start one of them with its output in a log whose first line is the
command (the learner's retrains, the launcher's processes, the experiment's steps).
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

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


@contextlib.contextmanager
def _command_log(cmd: list[str], log_path: Path) -> Iterator[IO[str]]:
    """``log_path`` opened anew (its folder made), the command its first line: what ran, settings included."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()  # before the child's output
        yield log


def start_logged(cmd: list[str], log_path: Path, **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr in ``log_path`` (first line: the command); ``popen``: more
    ``subprocess.Popen`` arguments (``stdin``, ``start_new_session``). The log stays open in the child only."""
    with _command_log(cmd, log_path) as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)


def run_logged(cmd: list[str], log_path: Path, **run: Any) -> int:
    """Run ``cmd`` to its end like ``start_logged``; its exit code."""
    with _command_log(cmd, log_path) as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **run).returncode
