"""The names of the metrics the learner logs and others read back, and an evaluation in words (no torch here).

The learner writes each metric as ``<prefix>/<name>`` (``MetricsLogger.log(step, prefix, values)``)
to ``metrics.jsonl``; o2o-launch's progress bar and o2o-report read those records back. This module
is the one place those names are spelled: a renamed metric is renamed here, for writer and readers.
"""

from __future__ import annotations

# Prefixes: one per kind of record.
TRAIN = "train"
"""Training statistics, every ``log_every`` updates (pretraining and online)."""
ONLINE = "online"
"""One finished exploration episode of an actor (a training episode)."""
ACTOR_EVAL = "actor_eval"
"""One finished evaluation episode of an actor (same fields as ``online/``)."""
EVAL = "eval"
"""The learner's deterministic evaluation of the current policy (same episodes every time)."""
RETRAIN = "retrain"
"""One finished retrain (offline RL as a subroutine) and the decision on it."""
INGEST = "ingest"
"""The ingest server's totals."""
ACTOR = "actor"
"""Per-actor fleet statistics: ``actor/<actor_id>/<name>``."""


def key(prefix: str, name: str) -> str:
    """The metrics-record key of ``name`` logged under ``prefix``."""
    return f"{prefix}/{name}"


# Field names, as the learner passes them to MetricsLogger.log (the part after the prefix).
CRITIC_LOSS = "critic_loss"
COMMITTED_ROWS = "committed_rows"
RETURN = "return"
SUCCESS = "success"
POLICY_VERSION_END = "policy_version_end"
ONLINE_STEPS = "online_steps"
"""Committed transitions when an evaluation ran (0: the offline policy, before fine-tuning)."""
NORMALIZED_SCORE = "normalized_score"
EPISODES = "episodes"
STARTED_AT_UPDATES = "started_at_updates"
ACCEPTED = "accepted"
INTERVENTION_RATE = "intervention_rate"
"""Share of the rows committed since the last ``train/`` record that the operator acted (HIL-SERL
interventions; ``OnlineData.pop_intervention_rate``)."""

# Full keys, as they appear in a metrics.jsonl record.
STEP = "step"
"""Every record's step: updates (online) or gradient steps (pretraining)."""
TRAIN_CRITIC_LOSS = key(TRAIN, CRITIC_LOSS)
TRAIN_COMMITTED_ROWS = key(TRAIN, COMMITTED_ROWS)
TRAIN_INTERVENTION_RATE = key(TRAIN, INTERVENTION_RATE)
ONLINE_RETURN = key(ONLINE, RETURN)
ONLINE_SUCCESS = key(ONLINE, SUCCESS)
ONLINE_POLICY_VERSION_END = key(ONLINE, POLICY_VERSION_END)
ACTOR_EVAL_RETURN = key(ACTOR_EVAL, RETURN)
ACTOR_EVAL_SUCCESS = key(ACTOR_EVAL, SUCCESS)
EVAL_ONLINE_STEPS = key(EVAL, ONLINE_STEPS)
EVAL_NORMALIZED_SCORE = key(EVAL, NORMALIZED_SCORE)
EVAL_SUCCESS = key(EVAL, SUCCESS)
EVAL_EPISODES = key(EVAL, EPISODES)
RETRAIN_NORMALIZED_SCORE = key(RETRAIN, NORMALIZED_SCORE)
RETRAIN_STARTED_AT_UPDATES = key(RETRAIN, STARTED_AT_UPDATES)
RETRAIN_ACCEPTED = key(RETRAIN, ACCEPTED)


def fields(record: dict, prefix: str) -> dict:
    """The ``prefix/...`` entries of a metrics record, prefix dropped (``{"success": ...}``)."""
    start = f"{prefix}/"
    return {k.removeprefix(start): v for k, v in record.items() if k.startswith(start)}


def evaluation_summary(what: str, evaluation: dict) -> str:
    """One evaluation (the ``eval/`` fields of a metrics record, prefix dropped: `fields`) in words."""
    return (f"{what} (online step {int(evaluation[ONLINE_STEPS])}): score {evaluation[NORMALIZED_SCORE]:.1f}, "
            f"success {evaluation[SUCCESS]:.0%} over {int(evaluation[EPISODES])} deterministic episodes")


def evaluation_line(first: dict, last: dict) -> str:
    """The starting and the final policy over the same deterministic episodes, in one line."""
    return (f"evaluation over the same {int(last[EPISODES])} deterministic episodes: start (online step "
            f"{int(first[ONLINE_STEPS])}) score {first[NORMALIZED_SCORE]:.1f}, success {first[SUCCESS]:.0%} -> end "
            f"(online step {int(last[ONLINE_STEPS])}) score {last[NORMALIZED_SCORE]:.1f}, success {last[SUCCESS]:.0%}")
