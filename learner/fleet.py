"""The learner's side of the fleet: its replay store, the policies it publishes, holding it back, its statistics.

The ingest server (``o2o.transport``) does the talking; what the online loop asks of the fleet is here:
``open_store`` (the store the server appends to), ``PolicyPublisher`` (a new policy version),
``FleetHold`` (pause the actors while they are too far ahead of the updates) and ``FleetMonitor``
(per-actor statistics in the metrics).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import ReplayStore, StoreError
from o2o.envs.obs_spec import ObsSpec

from .checkpoint import AgentSpec
from .divergence import check_weights
from .export_onnx import export_policy
from .metric_keys import ACTOR, COMMITTED_ROWS, INGEST
from .metrics import MetricsLogger
from .online_data import OnlineData, UpdateLimiter

log = logging.getLogger("o2o.learner")

PUBLISHED_FILE = "published.json"


def open_store(path: Path, task_name: str, algo, fsync: bool, abandon_idle_s: float | None,
               obs_spec: ObsSpec | None = None) -> ReplayStore:  # fmt: skip
    """The replay store at ``path`` (created for the task if missing: its state size and cameras), whose
    MC returns follow the agent's data settings; ``obs_spec`` (the agent's observations): an existing
    store made for other observations (other cameras, say) is refused (``StoreError``)."""
    wanted = DataSettings.of(algo)
    if not path.exists():
        return ReplayStore.create_for_task(path, task_name, data=wanted, fsync=fsync)
    store = ReplayStore.open(path, "a", abandon_idle_s=abandon_idle_s, fsync=fsync, obs_spec=obs_spec)
    wrong = store.config.data.differences(wanted)
    if wrong:
        store.close(commit=False)
        shown = ", ".join(f"{k} {have!r} (the agent: {want!r})" for k, (have, want) in wrong.items())
        raise StoreError(f"the replay store {path} computes MC returns with {shown}: give a store made for this "
                         "checkpoint's data settings, or another store= folder")  # fmt: skip
    log.info("opened replay store %s: %d committed rows", path, len(store))
    return store


class PolicyPublisher:
    """Exports the current policy to ONNX and hands it to the ingest server under a new version.

    Versions count up within a learner run (``run_id``) across restarts: the last version
    published is written to ``published.json`` before it is sent, so a run resumed from an
    older checkpoint never publishes a version number twice (the store labels every row
    with the version that acted it). A fresh run gets a new run id: its actors take its
    policy although its versions start again at 1.
    """

    def __init__(self, agent, spec: AgentSpec, run_dir: Path, checkpoint_version: int = 0, run_id: str | None = None):
        self.agent, self.spec, self.run_dir = agent, spec, run_dir
        self.server = None  # the IngestServer, once started
        record = self._read()
        self.run_id = run_id or record.get("run_id") or uuid.uuid4().hex[:16]
        self.version = max(checkpoint_version, int(record.get("version", 0)))

    def _read(self) -> dict:
        path = self.run_dir / PUBLISHED_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def publish(self, step: int) -> int:
        check_weights(self.agent, step)  # never hand the fleet a NaN policy
        self.version += 1
        tmp = self.run_dir / f".{PUBLISHED_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "version": self.version}))
        os.replace(tmp, self.run_dir / PUBLISHED_FILE)
        path = self.export(step)
        self.server.publish_policy(self.version, path.read_bytes())
        return self.version

    def export(self, step: int) -> Path:
        """The run's ``policy.onnx`` under the current version (what ``publish`` sends; alone once the server is gone)."""
        # The TorchScript exporter takes ~0.2 s instead of ~1-2 s: the learner waits for it.
        return export_policy(self.agent, self.spec, self.run_dir / "policy.onnx", version=self.version, step=step,
                             exporter="torchscript")  # fmt: skip


class FleetHold:
    """Holds the actors (at their next episode end) while they are too far ahead of the updates
    (``UpdateLimiter.hold``), and releases them.

    ``on_commit`` runs in the ingest thread: a fast fleet is held at once, even while the loop is
    busy (or starved of the GIL by ingest itself); releasing happens in the loop (``check``)."""

    def __init__(self, limiter: UpdateLimiter, online: OnlineData, updates: int):
        self.limiter, self.online = limiter, online
        self.updates = updates  # written by the loop after each update, read by the ingest thread
        self.server = None  # the IngestServer, once started

    def on_commit(self, event) -> None:
        self.online.on_commit(event)
        server = self.server
        if server is not None and not server.holding and self.limiter.hold(self.updates,
                                                                            self.online.trainable_committed, False):
            server.set_hold(True)

    def check(self) -> None:
        hold = self.limiter.hold(self.updates, self.online.trainable_committed, self.server.holding)
        if hold != self.server.holding:
            self.server.set_hold(hold)


class FleetMonitor:
    """Per-actor steps/s, policy lag and last contact, logged every few seconds."""

    def __init__(self, server, every_s: float):
        self.server, self.every_s = server, every_s
        self.last_time, self.last_rows = time.monotonic(), {}

    def maybe_log(self, logger: MetricsLogger, step: int, version: int) -> None:
        now = time.monotonic()
        if now - self.last_time < self.every_s:
            return
        stats, elapsed = self.server.stats(), now - self.last_time
        for actor_id, s in stats["actors"].items():
            logger.log(step, f"{ACTOR}/{actor_id}", {
                "steps_per_s": (s["rows"] - self.last_rows.get(actor_id, s["rows"])) / elapsed,
                "policy_lag": version - s["policy_version"] if s["policy_version"] >= 0 else -1,
                "since_contact_s": time.time() - s["last_contact"],
                "duplicates": s["duplicates"],
                "rejected": sum(s["rejected"].values()),
            })
            self.last_rows[actor_id] = s["rows"]
        logger.log(step, INGEST, {COMMITTED_ROWS: stats["committed_rows"], "rejected": sum(stats["rejected"].values())})
        self.last_time = now
