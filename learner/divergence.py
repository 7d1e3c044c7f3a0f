"""A diverged agent (non-finite losses or weights) stops a run with a clear error.

Why: a NaN weight makes every later update, policy and checkpoint NaN; written over
the last good checkpoint, it leaves nothing to resume from. So losses are checked
when they are logged (they are averaged on the device between logs: one NaN update
makes the mean NaN), weights before a policy is published, and ``save_checkpoint``
refuses to write a non-finite agent.
"""

from __future__ import annotations

import math

import torch

ADVICE = (
    "lower the learning rates (algo.critic_lr, algo.policy_lr), set algo.grad_clip, or check the "
    "rewards' scale; resume from the last good checkpoint"
)


class DivergedError(RuntimeError):
    """The agent's losses or weights are NaN or infinite."""


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or inf."""
    return [
        name for name, value in module.state_dict().items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]  # fmt: skip


def check_weights(module: torch.nn.Module, step: int) -> None:
    bad = non_finite_tensors(module)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DivergedError(f"the agent diverged by update {step}: non-finite weights in {shown}; {ADVICE}")


def check_losses(metrics: dict[str, float], step: int) -> None:
    """``metrics`` as logged (floats, ``prefix/name`` keys): every loss must be finite."""
    bad = {k: v for k, v in metrics.items() if "loss" in k and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergedError(f"the agent diverged by update {step}: {shown}; {ADVICE}")
