"""Graceful stops for o2o-learner, o2o-pretrain and o2o-retrain (SIGTERM and SIGINT alike).

    with graceful_stop("o2o-pretrain"):
        train(...)  # a first signal raises KeyboardInterrupt: the interrupt path checkpoints

Why: systemd, Kubernetes, SLURM and `timeout` stop a process with SIGTERM, whose default
action kills it at once (exit 143, no final checkpoint); Ctrl-C sends SIGINT. Both take the
KeyboardInterrupt path the commands already have. A second signal means "now": the process
exits at once (128 + signal) without waiting for the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """A stop after the work so far was saved: the checkpoint at ``checkpoint`` holds ``step``."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class _State:
    command = ""
    first: int | None = None  # the first stop signal received
    deferring = 0  # depth of `deferred` blocks: a first signal waits for their end
    pending = False


_state = _State()


def _handle(signum: int, _frame) -> None:
    if _state.first is not None:
        # os.write, not print: the main thread may be inside a write to sys.stderr right now.
        os.write(2, f"{_state.command}: second signal ({signal.Signals(signum).name}): exiting now, without "
                    "waiting for the checkpoint\n".encode())  # fmt: skip
        os._exit(128 + signum)
    _state.first = signum
    if _state.deferring:
        _state.pending = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_stop(command: str) -> Iterator[None]:
    """While active, a first SIGTERM/SIGINT raises KeyboardInterrupt in the main thread and a
    second one exits at once; the previous handlers come back at the end."""
    _state.command, _state.first, _state.pending = command, None, False
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred(reraise: bool = True) -> Iterator[None]:
    """A first signal inside the block is raised at its end (``reraise``) or only noted: an
    update is applied whole (weights, optimiser and counters agree in the checkpoint), a final
    checkpoint and commit are not cut short. Outside ``graceful_stop`` it changes nothing."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if _state.pending and not _state.deferring:
        _state.pending = False
        if reraise:
            raise KeyboardInterrupt


def requested() -> str | None:
    """The name of the first stop signal since ``graceful_stop`` began (e.g. "SIGTERM"), or None."""
    return signal.Signals(_state.first).name if _state.first is not None else None
