"""Per-actor ingest rate limit: a token bucket of rows, and the actors waiting for theirs to refill.

Backpressure, never loss: a chunk past the limit is not stored, acked or consumed; the actor
keeps it spooled and is asked to resend from it once its bucket holds the chunk's rows.
"""

from __future__ import annotations

import time


class TokenBuckets:
    """``rows_per_s`` per actor, bursts of ``burst_s`` seconds' worth (None: no limit)."""

    def __init__(self, rows_per_s: float | None, burst_s: float):
        self.rows_per_s = rows_per_s
        self.burst_s = burst_s
        self._buckets: dict[str, tuple[float, float]] = {}  # actor_id -> (rows it may send now, at time)
        self.throttled: dict[str, tuple[int, int]] = {}  # actor_id -> (seq to ask for, rows) once it may send

    @property
    def capacity(self) -> float:
        return self.rows_per_s * self.burst_s

    def _tokens(self, actor_id: str) -> float:
        now = time.monotonic()
        tokens, last = self._buckets.get(actor_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rows_per_s)
        self._buckets[actor_id] = (tokens, now)
        return tokens

    def take(self, actor_id: str, rows: int) -> bool:
        """Whether ``rows`` may be stored now (then they are taken from the actor's bucket)."""
        if self.rows_per_s is None:
            return True
        tokens = self._tokens(actor_id)
        # A chunk larger than a whole burst passes on a full bucket.
        if tokens < min(rows, self.capacity):
            return False
        self._buckets[actor_id] = (tokens - rows, self._buckets[actor_id][1])
        return True

    def throttle(self, actor_id: str, seq: int, rows: int) -> None:
        """``actor_id``'s chunk ``seq`` of ``rows`` rows was refused: ask for it again in ``ready``."""
        self.throttled[actor_id] = (seq, rows)

    def ready(self) -> list[tuple[str, int]]:
        """(actor_id, seq) of the throttled actors whose buckets now hold their chunks' rows."""
        out = []
        for actor_id, (seq, rows) in list(self.throttled.items()):
            if self._tokens(actor_id) >= min(rows, self.capacity):
                del self.throttled[actor_id]
                out.append((actor_id, seq))
        return out

    def forget(self, actor_id: str) -> None:
        self._buckets.pop(actor_id, None)
        self.throttled.pop(actor_id, None)
