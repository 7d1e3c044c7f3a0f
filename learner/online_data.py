"""Online data on the learner side: committed store rows -> trainable rows -> mixed batches.

Rows become trainable when their episode ends (the store then fills their
Cal-QL MC return-to-go); evaluation rows are never trained on by default. A host
mirror keeps committed rows until then, because a commit that closes an
episode names rows that earlier commits delivered.
"""

from __future__ import annotations

import queue

import numpy as np
import torch

from o2o.datasets.mc_return import scale_rewards
from o2o.datasets.replay_store import CommitEvent, ReplayStore

from .buffer import FIELDS, Batch, TransitionBuffer, normalize_actions

_MIRRORED = ("obs", "action", "reward", "next_obs", "terminated", "eval")


class HostMirror:
    """Committed rows not yet trainable, by store row index (grows by doubling)."""

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 65536):
        shapes = {"obs": (obs_dim,), "next_obs": (obs_dim,), "action": (action_dim,)}
        dtypes = {"terminated": bool, "eval": bool}
        self.columns = {
            name: np.zeros((capacity, *shapes.get(name, ())), dtypes.get(name, np.float32)) for name in _MIRRORED
        }
        self.stop = 0

    def append(self, start: int, rows: dict[str, np.ndarray]) -> None:
        stop = start + len(rows["reward"])
        if stop > len(self.columns["reward"]):
            capacity = max(stop, 2 * len(self.columns["reward"]))
            for name, col in self.columns.items():
                grown = np.zeros((capacity, *col.shape[1:]), col.dtype)
                grown[: len(col)] = col
                self.columns[name] = grown
        for name in _MIRRORED:
            self.columns[name][start:stop] = rows[name]
        self.stop = stop

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: col[rows] for name, col in self.columns.items()}


class OnlineData:
    """Turns commit events (from the ingest thread) into trainable rows on the training device."""

    def __init__(
        self,
        buffer: TransitionBuffer,
        low: np.ndarray,
        high: np.ndarray,
        reward_scale: float,
        reward_bias: float,
        train_on_eval: bool = False,
    ):
        self.buffer = buffer
        self.low, self.high = low, high
        self.reward_scale, self.reward_bias = reward_scale, reward_bias
        self.train_on_eval = train_on_eval
        self.mirror = HostMirror(buffer.columns["obs"].shape[1], buffer.columns["action"].shape[1])
        self.events: queue.SimpleQueue[CommitEvent] = queue.SimpleQueue()
        self.committed_rows = 0
        self.trainable_rows = 0
        self.trainable_committed = 0
        """Rows committed trainable (counted in the ingest thread, ahead of ``drain``): what the
        fleet hold is decided on, like the updates, so rows that never train (eval, abandoned
        or open episodes) can never hold the fleet while the learner waits for data."""
        self.episodes: list[dict] = []  # closed episodes not yet logged

    def on_commit(self, event: CommitEvent) -> None:
        """Runs in the ingest thread: count what became trainable, hand the event over."""
        self.trainable_committed += self.trainable_in(event.episodes)
        self.events.put(event)

    def trainable_in(self, episodes: dict[str, np.ndarray]) -> int:
        """Rows of the closed episodes that get MC returns and are trained on (as ``_make_trainable``)."""
        if not episodes or len(episodes.get("length", ())) == 0:
            return 0
        keep = episodes["ended"] & episodes["contiguous"] & (self.train_on_eval | ~episodes["eval"])
        return int(episodes["length"][keep].sum())

    def drain(self) -> int:
        """Apply the commit events queued so far; returns how many rows became trainable.

        Only those present at the call: a fast fleet must not keep the learner in here.
        """
        added = 0
        for _ in range(self.events.qsize()):
            event = self.events.get_nowait()
            if event.stop > event.start:
                self.mirror.append(event.start, event.rows)
                self.committed_rows = event.stop
            if len(event.mc_rows):
                added += self._make_trainable(np.asarray(event.mc_rows), np.asarray(event.mc_return))
            self._collect_episodes(event.episodes)
        return added

    def _make_trainable(self, rows: np.ndarray, mc_return: np.ndarray) -> int:
        data = self.mirror.take(rows)
        keep = np.isfinite(mc_return) & (self.train_on_eval | ~data["eval"])
        if not keep.any():
            return 0
        self.add_rows(
            obs=data["obs"][keep],
            action=data["action"][keep],
            raw_reward=data["reward"][keep],
            next_obs=data["next_obs"][keep],
            terminated=data["terminated"][keep],
            mc_return=mc_return[keep],
        )
        return int(keep.sum())

    def add_rows(self, obs, action, raw_reward, next_obs, terminated, mc_return) -> None:
        """Trainable rows in store units (env actions, raw rewards) into the device buffer."""
        reward = scale_rewards(raw_reward, self.reward_scale, self.reward_bias)  # as offline rows and the store
        self.buffer.add(
            obs=obs,
            action=normalize_actions(action, self.low, self.high),
            reward=reward,
            next_obs=next_obs,
            done=np.asarray(terminated, np.float32),
            mc_return=mc_return,
        )
        self.trainable_rows += len(reward)

    def load_store(self, store: ReplayStore, chunk: int = 262_144) -> int:
        """After a restart: every committed, finished, non-eval row of the store (the source of truth)."""
        for start in range(0, len(store), chunk):
            rows = store.read(start, min(start + chunk, len(store)))
            keep = np.isfinite(rows["mc_return"]) & (self.train_on_eval | ~rows["eval"])
            if keep.any():
                self.add_rows(
                    rows["obs"][keep], rows["action"][keep], rows["reward"][keep], rows["next_obs"][keep],
                    rows["terminated"][keep], rows["mc_return"][keep],
                )
            # Rows of still-open episodes must be found again when their episode closes.
            self.mirror.append(start, rows)
        self.committed_rows = len(store)
        self.trainable_committed = self.trainable_rows
        return self.trainable_rows

    def _collect_episodes(self, episodes: dict[str, np.ndarray]) -> None:
        if not episodes or len(episodes.get("episode_id", ())) == 0:
            return
        for i in range(len(episodes["episode_id"])):
            if episodes["ended"][i]:
                self.episodes.append({k: episodes[k][i].item() for k in ("return", "success", "eval", "length", "policy_version_end")})

    def pop_episodes(self) -> list[dict]:
        done, self.episodes = self.episodes, []
        return done


def mixed_batch(offline: TransitionBuffer, online: TransitionBuffer, batch_size: int, offline_ratio: float) -> Batch:
    """A batch with ``offline_ratio`` of its rows from the offline data, the rest from online data."""
    if len(online) == 0:
        return offline.sample(batch_size)
    n_offline = int(round(batch_size * offline_ratio))
    if n_offline == 0:
        return online.sample(batch_size)
    if n_offline == batch_size:
        return offline.sample(batch_size)
    a, b = offline.sample(n_offline), online.sample(batch_size - n_offline)
    return Batch(**{name: torch.cat([getattr(a, name), getattr(b, name)]) for name in FIELDS})


class UpdateLimiter:
    """Samples-per-insert limiter: keeps updates near ``utd`` x trainable online rows.

    The learner waits (does not update) when it is ``max_ahead`` updates ahead of
    what the data allows (a slow fleet: no overfitting to a few rows), and reports
    how far behind it is when the fleet is faster than it can train.
    """

    def __init__(self, utd: float, warmup_rows: int, max_ahead: int, max_rows_ahead: int = 0):
        self.utd, self.warmup_rows, self.max_ahead = utd, warmup_rows, max_ahead
        self.max_rows_ahead = max_rows_ahead

    def allowed(self, updates: int, rows: int) -> int:
        """How many more updates the data allows now (0 = wait for data)."""
        if rows < self.warmup_rows:
            return 0
        return max(0, int(self.utd * (rows - self.warmup_rows)) + self.max_ahead - updates)

    def hold(self, updates: int, trainable_rows: int, holding: bool) -> bool:
        """Should the fleet pause? Past ``max_rows_ahead`` trainable rows beyond what the updates
        consumed; released below half of it (hysteresis). 0 disables holding.

        Counted in trainable rows, as ``allowed`` is: counted in committed rows, rows that never
        become trainable (eval episodes, abandoned ones) would hold the fleet while ``allowed``
        waits for data, forever."""
        if self.max_rows_ahead <= 0:
            return False
        ahead = trainable_rows - self.warmup_rows - updates / self.utd
        return ahead > self.max_rows_ahead / 2 if holding else ahead > self.max_rows_ahead

    def behind(self, updates: int, rows: int) -> int:
        """Updates the learner owes the data (> 0 when the fleet outpaces it)."""
        return max(0, int(self.utd * (rows - self.warmup_rows)) - updates)
