"""``<run>/status.json``: the learner and each actor now, written about once a second for ``o2o-status``.

The online loop calls ``StatusFile.maybe_write`` between update bursts; a write is one ``server.stats()``
snapshot and a small JSON document replaced atomically (datasets/atomic_file.py), so a reader never
sees half a file. The learner's block: its state, updates and updates/s, the online buffer's and the
store's rows, the last checkpoint, the last retrain (offline RL as a subroutine), the published policy
version and whether the fleet is held. The actors' block: each actor's last ``status`` message
(transport/status_msg.py) with what the learner sees of it: rows committed, policy lag (published
version minus the actor's), seconds since its last message, rejections; its state becomes "gone"
after ``gone_after_s`` of silence (the ingest server's ``actor_live_s``: past it another process may
take the actor_id) and "refused" for an actor_id whose hello was refused and never admitted.
No torch here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from o2o.datasets.atomic_file import write_atomic

log = logging.getLogger("o2o.learner")

STATUS_FILE = "status.json"
FORMAT = 1  # bumped if a reader must change
WRITE_EVERY_S = 1.0
LEARNER_STATES = ("pretraining", "online", "retraining", "finishing", "stopped")
"""pretraining: the offline phase before the online one; retraining: online updates paused while a
``fine_tune`` retrain runs; finishing: the retrains at the end (the fleet held)."""


def actor_rows(stats: dict, published: int, gone_after_s: float, now: float) -> dict[str, dict]:
    """Per actor id: its reported status and the learner's view of it (``stats``: ``IngestServer.stats()``)."""
    rows = {}
    for actor_id, s in stats["actors"].items():
        status = s.get("status") or {}
        version = status.get("policy_version", s["policy_version"])  # the chunks' version before any status
        since = now - s["last_contact"]
        state = status.get("state")
        rows[actor_id] = {
            **status,
            "state": "gone" if since > gone_after_s else state,
            "last_state": state,  # what it reported last (before "gone")
            "rows": s["rows"],
            "policy_version": version,
            "policy_lag": published - version if version >= 0 and published >= 0 else None,
            "since_contact_s": round(since, 2),
            "status_age_s": round(now - s["status_time"], 2) if s.get("status") else None,
            "rejected": sum(s["rejected"].values()),
            "refused": stats.get("refused_hellos", {}).get(actor_id),  # e.g. a 2nd process with its actor_id
        }
    for actor_id, refusal in stats.get("refused_hellos", {}).items():
        if actor_id not in rows:  # never admitted: all we know is why
            rows[actor_id] = {"state": "refused", "waiting_for": f"{refusal['reason']}: {refusal['message']}",
                              "since_contact_s": round(now - refusal["time"], 2), "refused": refusal}  # fmt: skip
    return rows


class StatusFile:
    """Writes ``<run_dir>/status.json`` every ``every_s`` (``maybe_write``) and on demand (``write``).

    ``server``: the ``IngestServer``; ``publisher``: the ``PolicyPublisher``; ``buffer``: the online
    ``TransitionBuffer``; ``run``: the ``FineTuning`` (its ``last_checkpoint`` and ``switches``);
    ``retrainer``: the ``Retrainer`` (its running job)."""

    def __init__(self, run_dir: Path, server, publisher, buffer, run=None, retrainer=None,
                 every_s: float = WRITE_EVERY_S, updates: int = 0):  # fmt: skip
        self.path = Path(run_dir) / STATUS_FILE
        self.server, self.publisher, self.buffer, self.run, self.retrainer = server, publisher, buffer, run, retrainer
        self.every_s = every_s
        self.gone_after_s = server.config.actor_live_s
        self._last = (time.monotonic(), updates)  # (when, updates) of the last write: updates/s
        self._next = 0.0
        self._job = None  # the retrain running at the last write
        self._switches = len(run.switches) if run is not None else 0
        self.last_retrain: dict | None = None

    def maybe_write(self, updates: int, state: str = "online") -> None:
        if time.monotonic() >= self._next:
            self.write(updates, state)

    def write(self, updates: int, state: str) -> None:
        """Write the file now; a failed write (disk full) is logged and never stops the learner."""
        now_mono, now = time.monotonic(), time.time()
        self._next = now_mono + self.every_s
        last_time, last_updates = self._last
        rate = (updates - last_updates) / (now_mono - last_time) if now_mono > last_time else 0.0
        self._last = (now_mono, updates)
        stats = self.server.stats()
        published = self.publisher.version if self.publisher.version > 0 else -1
        document = {
            "format": FORMAT, "time": now, "run_dir": str(self.path.parent), "run_id": self.publisher.run_id,
            "learner": {
                "state": state, "updates": updates, "updates_per_s": round(rate, 2), "buffer_rows": len(self.buffer),
                "store_rows": stats["committed_rows"], "policy_version": self.publisher.version,
                "holding": bool(self.server.holding), "endpoint": self.server.endpoint,
                "last_checkpoint": getattr(self.run, "last_checkpoint", None), **self._retrains(updates, now),
                "rejected": sum(stats["rejected"].values()),
            },
            "actors": actor_rows(stats, published, self.gone_after_s, now),
        }  # fmt: skip
        try:
            write_atomic(self.path, json.dumps(document, separators=(",", ":")))
        except OSError as err:
            log.warning("could not write %s (o2o-status reads it): %s", self.path, err)

    def _retrains(self, updates: int, now: float) -> dict:
        """The retrain running now and the last one that finished (its start, end, whether it was taken)."""
        job = self.retrainer.job if self.retrainer is not None else None
        if self._job is not None and job is not self._job:  # it finished since the last write
            switches = len(self.run.switches) if self.run is not None else 0
            self.last_retrain = {"updates": self._job.updates, "time": now, "switched_in": switches > self._switches}
            self._switches = switches
        self._job = job
        running = {"updates": job.updates, "store_rows": job.store_rows} if job is not None else None
        return {"retraining": running, "last_retrain": self.last_retrain}


def write_learner_state(run_dir: Path, state: str) -> None:
    """A status file with the learner's state only: before the ingest server exists (``pretraining``)."""
    document = {"format": FORMAT, "time": time.time(), "run_dir": str(run_dir), "learner": {"state": state},
                "actors": {}}  # fmt: skip
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(run_dir) / STATUS_FILE, json.dumps(document))
    except OSError as err:
        log.warning("could not write %s: %s", Path(run_dir) / STATUS_FILE, err)
