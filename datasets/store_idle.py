"""Idle actors of a replay store: their open episodes are closed as abandoned.

An actor that stopped in the middle of an episode would keep it open forever, and a
reopening writer reads every row from the oldest open episode on. So the episodes of
actors that staged no row for ``idle_s`` are closed (abandoned: no MC return). Idle time
counts only while a writer runs: the actors that were live when it stopped continue their
episodes from their spools, however long it was down, so a reopening writer moves every
row time forward by that downtime first.
"""

from __future__ import annotations

from .store_episodes import Actor


def idle_actors(actors: dict[str, Actor], idle_s: float, now: float) -> list[str]:
    """Ids of the actors with an open episode whose last row was staged over ``idle_s`` before ``now``."""
    return [
        actor_id
        for actor_id, actor in actors.items()
        if actor.episode is not None and actor.last_row_time is not None and now - actor.last_row_time > idle_s
    ]


def discount_downtime(actors: dict[str, Actor], commit_time: float, now: float) -> None:
    """Move the row times forward by the time no writer had the store open (since its last commit)."""
    downtime = max(0.0, now - commit_time)
    for actor in actors.values():
        if actor.last_row_time is not None:
            actor.last_row_time += downtime


def start_unknown_clocks(actors: dict[str, Actor], now: float) -> None:
    """Open episodes of a record without row times (older o2o): idle from ``now`` on."""
    for actor in actors.values():
        if actor.episode is not None and actor.last_row_time is None:
            actor.last_row_time = now
