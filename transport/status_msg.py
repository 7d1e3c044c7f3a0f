"""The ``status`` message's fields (actor -> learner, about once a second): what an actor does now.

An actor's ``Actor.status()`` dict (actor/loop.py) goes out as a ``status`` message (transport/wire.py
encodes it, ``check_status`` validates it for the decoder) and lands in the learner's per-actor stats,
which ``o2o-status`` shows. Apart from wire.py, which stays under 600 lines (wire.py imports this).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

from o2o.datasets.rows import MAX_INT32

from .limits import MAX_ACTOR_ID_LEN
from .wire_errors import BAD_HEADER, BAD_VALUE, TOO_LARGE, WireError

STATES = ("acting", "held", "paused", "waiting_for_reset", "e_stopped", "waiting_for_policy", "stopped")
"""What an actor may report (the learner adds "refused" and "gone" from its own side)."""
COUNTS = ("steps", "episodes", "successes", "interventions", "spool_depth")
MAX_WAITING_FOR_LEN = 200  # characters of ``waiting_for`` (text for the operator)
MAX_COUNT = 2**62  # as the wire's other int fields


@dataclasses.dataclass(frozen=True)
class Status:
    """One actor's status; the fields of ``Actor.status()`` plus who sent it."""

    actor_id: str
    state: str
    waiting_for: str | None
    steps: int
    steps_per_s: float
    episodes: int
    successes: int
    interventions: int  # steps the operator's teleop action was executed
    policy_version: int  # -1: none yet
    spool_depth: int  # chunks not yet acked

    def report(self) -> dict:
        """The fields without ``actor_id`` (as the learner keeps them)."""
        fields = dataclasses.asdict(self)
        del fields["actor_id"]
        return fields

    @classmethod
    def from_report(cls, actor_id: str, report: Mapping) -> "Status":
        """A status from ``Actor.status()``'s dict: numpy numbers made plain, a long ``waiting_for``
        clipped, then checked as the learner will check it (``WireError``). Unknown keys are ignored."""
        fields = {"actor_id": actor_id}
        for f in dataclasses.fields(cls)[1:]:
            if f.name not in report:
                raise WireError(BAD_HEADER, f"the status has no {f.name!r}")
            value = report[f.name]
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
            elif isinstance(value, numbers.Real) and f.name == "steps_per_s":
                value = float(value)
            elif f.name == "waiting_for" and isinstance(value, str) and len(value) > MAX_WAITING_FOR_LEN:
                value = value[: MAX_WAITING_FOR_LEN - 3] + "..."
            fields[f.name] = value
        return check_status(fields)


def check_status(header: Mapping) -> Status:
    """The ``Status`` a status header (or report) describes; ``WireError`` naming the first bad field."""
    actor_id = header.get("actor_id")
    if not isinstance(actor_id, str) or not 0 < len(actor_id) <= MAX_ACTOR_ID_LEN:
        raise WireError(BAD_HEADER, f"'actor_id' must be a non-empty str of <= {MAX_ACTOR_ID_LEN} chars")
    state = header.get("state")
    if not isinstance(state, str):
        raise WireError(BAD_HEADER, f"'state' must be a str, got {type(state).__name__}")
    if state not in STATES:
        raise WireError(BAD_VALUE, f"unknown state {state[:40]!r}; known: {', '.join(STATES)}")
    waiting_for = header.get("waiting_for")
    if waiting_for is not None and not isinstance(waiting_for, str):
        raise WireError(BAD_HEADER, f"'waiting_for' must be a str or nil, got {type(waiting_for).__name__}")
    if waiting_for is not None and len(waiting_for) > MAX_WAITING_FOR_LEN:
        raise WireError(TOO_LARGE, f"'waiting_for' of {len(waiting_for)} chars exceeds {MAX_WAITING_FOR_LEN}")
    rate = header.get("steps_per_s")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise WireError(BAD_HEADER, f"'steps_per_s' must be a number, got {type(rate).__name__}")
    if not (math.isfinite(rate) and rate >= 0):
        raise WireError(BAD_VALUE, f"'steps_per_s' must be finite and >= 0, got {rate}")
    ints = {name: (0, MAX_COUNT) for name in COUNTS} | {"policy_version": (-1, MAX_INT32)}
    for name, (lo, hi) in ints.items():
        value = header.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError(BAD_HEADER, f"{name!r} must be an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise WireError(BAD_VALUE, f"{name!r}={value} is outside [{lo}, {hi}]")
    counts = {name: header[name] for name in ints}
    return Status(actor_id, state, waiting_for, steps_per_s=float(rate), **counts)
