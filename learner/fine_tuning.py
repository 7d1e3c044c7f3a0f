"""One algorithm config from pretraining to fine-tuning.

``o2o-learner pretrained=RUN`` (or ``resume=RUN``) fine-tunes the checkpoint's agent
with the checkpoint's ``algo`` and ``net``: the online command's own defaults (its
preset) never replace them, so offline and online rows are scaled alike. Only what
the command sets explicitly (``algo.cql_alpha=1.0``) is considered:

* fields of ``DATA_FIELDS`` (discount, reward scale/bias, MC-return rule) define the
  data: an override that differs from the checkpoint is refused;
* ``net.*`` is the checkpoint's network: an override that differs is refused;
* every other ``algo.*`` field may change when fine-tuning starts (the official code's
  ``cql_min_q_weight_online``, ``online_use_cql``; learning rates): applied, logged as
  "changed for fine-tuning: X a -> b", and stored in the run's checkpoint, so ``resume``
  keeps it.

The offline/online batch mix (the official ``mixing_ratio``) is no ``algo`` field but the
learner's own ``offline_ratio``, as ``utd`` is; an older checkpoint's ``algo.offline_ratio``
is dropped when read (``checkpoint.RETIRED_ALGO_FIELDS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .config import DATA_FIELDS, CalQLConfig, NetworkConfig


def explicit_keys(overrides: Iterable[str]) -> set[str]:
    """Dotted keys set on the command line (Hydra override strings such as ``algo.cql_alpha=1``,
    ``+x=1``, ``~y``): what the user asked for, as opposed to the preset's defaults."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


MOVED_KEYS = {"algo.offline_ratio": "offline_ratio"}
"""Keys that left ``algo`` (old spelling -> the learner's key). Hydra refuses the old spelling itself
(``Key 'offline_ratio' not in 'CalQLConfig'``, suggesting ``+algo.offline_ratio``, which fails as well);
o2o-learner names the new key instead."""


def moved_key_error(overrides: Iterable[str]) -> str | None:
    """What to write instead, if the command line sets a key of ``MOVED_KEYS``."""
    moved = sorted(explicit_keys(overrides) & MOVED_KEYS.keys())
    if not moved:
        return None
    return "; ".join(f"{old} is no longer an algo field: the fine-tuning batch mix is the learner's own setting, "
                     f"{MOVED_KEYS[old]}=X" for old in moved)  # fmt: skip


def fine_tuning_algo(checkpoint_algo: dict, checkpoint_net: dict, algo: CalQLConfig, net: NetworkConfig,
                     explicit: set[str]) -> tuple[dict, list[str]]:  # fmt: skip
    """The algo settings to fine-tune with, and one line per field changed for fine-tuning.

    ``algo`` / ``net`` are the online command's (only their ``explicit`` fields count).
    Raises ValueError naming the field, both values and what to do.
    """
    fields = {f.name: f for f in dataclasses.fields(CalQLConfig)}
    # Missing fields (older checkpoints) take the default; keys CalQLConfig no longer has are left out.
    merged = {name: checkpoint_algo.get(name, f.default) for name, f in fields.items()}
    changes = []
    for name in sorted(k.removeprefix("algo.") for k in explicit if k.startswith("algo.")):
        if name not in fields:
            continue
        before, after = merged[name], getattr(algo, name)
        if after == before:
            continue
        if name in DATA_FIELDS:
            raise ValueError(
                f"algo.{name}={after!r} differs from the checkpoint's {before!r}: it defines the data (rewards, "
                f"MC returns, TD targets), which fine-tuning keeps as pretrained for offline and online rows alike. "
                f"Drop the override, or pretrain anew with algo.{name}={after!r}"
            )
        merged[name] = after
        changes.append(f"changed for fine-tuning: algo.{name} {before!r} -> {after!r}")
    for name in sorted(k.removeprefix("net.") for k in explicit if k.startswith("net.")):
        before, after = checkpoint_net.get(name), getattr(net, name, None)
        if before is not None and after != before:
            raise ValueError(
                f"net.{name}={after!r} differs from the checkpoint's {before!r}: fine-tuning continues the "
                "checkpoint's networks. Drop the override, or pretrain anew with it"
            )
    return merged, changes
