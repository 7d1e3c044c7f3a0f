"""Online data on the learner side: committed store rows -> trainable rows -> mixed batches.

Rows become trainable when their episode ends: the commit that closes an episode hands
its rows, with their Cal-QL MC return-to-go, in ``CommitEvent.closed`` (the store keeps
the rows of open episodes until then). So the learner holds nothing but its bounded
sampling buffer: no copy of rows still waiting for their episode's end. Evaluation
rows are never trained on by default.
"""

from __future__ import annotations

from collections.abc import Callable

import queue
from typing import NamedTuple

import numpy as np

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import LEARNER_COLUMNS, CommitEvent, ReplayStore
from o2o.datasets.trainable_rows import READ_CHUNK_ROWS, read_chunk_rows, trainable_rows

from .buffer import Batch, TransitionBuffer, concat_batches, normalize_actions, offline_batch_rows
from .frame_ring import frames_of


class _Commit(NamedTuple):
    """What ``drain`` needs of a commit event (the event's other columns are not kept queued)."""

    stop: int
    closed: dict[str, np.ndarray]
    episodes: dict[str, np.ndarray]


class OnlineData:
    """Turns commit events (from the ingest thread) into trainable rows on the training device."""

    def __init__(
        self,
        buffer: TransitionBuffer,
        low: np.ndarray,
        high: np.ndarray,
        data: DataSettings,
        train_on_eval: bool = False,
        on_rewards: Callable[[np.ndarray], None] | None = None,
    ):
        """``data``: the agent's data settings (rewards are scaled with them, as the offline rows and
        the store's MC returns are). ``on_rewards``: called with the scaled rewards of each trainable
        chunk as it enters the buffer (``QBound.widen``)."""
        self.on_rewards = on_rewards
        self.buffer = buffer
        self.low, self.high = low, high
        self.data = DataSettings.of(data)
        self.train_on_eval = train_on_eval
        self.events: queue.SimpleQueue[_Commit] = queue.SimpleQueue()
        self.committed_rows = 0
        self.trainable_rows = 0
        self.trainable_committed = 0
        """Rows committed trainable (counted in the ingest thread, ahead of ``drain``): what the
        fleet hold is decided on, like the updates, so rows that never train (eval, abandoned
        or open episodes) can never hold the fleet while the learner waits for data."""
        self.episodes: list[dict] = []  # closed episodes not yet logged

    def on_commit(self, event: CommitEvent) -> None:
        """Runs in the ingest thread: count what became trainable, hand the event over."""
        keep = self._trainable(event.closed)
        self.trainable_committed += int(keep.sum())
        # Only the closed rows wait for ``drain``: the event's copy of the new rows is not needed.
        self.events.put(_Commit(event.stop, event.closed, event.episodes))

    def _trainable(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Mask of the rows trained on: with an MC return, and not eval rows unless ``train_on_eval``."""
        return np.isfinite(rows["mc_return"]) & (self.train_on_eval | ~rows["eval"])

    def drain(self) -> int:
        """Apply the commit events queued so far; returns how many rows became trainable.

        Only those present at the call: a fast fleet must not keep the learner in here.
        """
        added = 0
        for _ in range(self.events.qsize()):
            commit = self.events.get_nowait()
            self.committed_rows = max(self.committed_rows, commit.stop)
            added += self._add_trainable(commit.closed)
            self._collect_episodes(commit.episodes)
        return added

    def _add_trainable(self, rows: dict[str, np.ndarray]) -> int:
        """Rows in store units (``ReplayStore.read`` / ``CommitEvent.closed`` columns) into the buffer;
        a camera task's rows come with ``frames/<camera>``, ``obs_frame`` and ``next_frame`` (the flat
        row dicts' contract): the kept rows' indices still point into those frames."""
        keep = self._trainable(rows)
        if not keep.any():
            return 0
        images = {}
        if self.buffer.cameras:
            images = {"frames": frames_of(rows), "obs_frame": rows["obs_frame"][keep],
                      "next_frame": rows["next_frame"][keep]}  # fmt: skip
        self.add_rows(
            obs=rows["obs"][keep],
            action=rows["action"][keep],
            raw_reward=rows["reward"][keep],
            next_obs=rows["next_obs"][keep],
            terminated=rows["terminated"][keep],
            mc_return=rows["mc_return"][keep],
            **images,
        )
        return int(keep.sum())

    def add_rows(self, obs, action, raw_reward, next_obs, terminated, mc_return, frames=None, obs_frame=None,
                 next_frame=None) -> None:  # fmt: skip
        """Trainable rows in store units (env actions, raw rewards) into the device buffer; with cameras,
        the frames they use ({camera: uint8 (F, H, W, C)}) and their ``obs_frame`` / ``next_frame`` in them."""
        reward = self.data.scale(raw_reward)  # as offline rows and the store
        images = {} if frames is None else {"frames": frames, "obs_frame": obs_frame, "next_frame": next_frame}
        self.buffer.add(
            obs=obs,
            action=normalize_actions(action, self.low, self.high),
            reward=reward,
            next_obs=next_obs,
            terminated=np.asarray(terminated, np.float32),
            mc_return=mc_return,
            **images,
        )
        self.trainable_rows += len(reward)
        if self.on_rewards is not None and len(reward):
            self.on_rewards(reward)

    def load_store(self, store: ReplayStore, chunk: int = READ_CHUNK_ROWS) -> int:
        """After a restart: the store's trainable rows (the source of truth; ``trainable_rows``, the
        retrain's rule: rows of ended episodes, with an MC return, eval rows only with
        ``train_on_eval``); returns how many there are.

        Only the last ``buffer.capacity`` of them fit the buffer: they are counted from the rule's
        columns (``chunk`` rows at a time), and whole rows are read only for those last ones
        (``TrainableRows.chunks(limit=...)``), a camera store's with their frames in reads of a few
        hundred MiB (``read_chunk_rows``), so the read path holds no more than the buffer keeps and
        one read. Rows of episodes still open come later, in the ``closed`` rows of the commit that
        ends them.
        """
        rows = trainable_rows(store, include_eval=self.train_on_eval)
        total = sum(rows.count(start, start + chunk) for start in range(0, rows.stop, chunk))
        read = min(chunk, read_chunk_rows(store)) if self.buffer.cameras else chunk
        columns = [*LEARNER_COLUMNS, "mc_return", *self.buffer.camera_columns]
        added = 0
        for part in rows.chunks(columns, read, limit=self.buffer.capacity):
            added += self._add_trainable(part)
        self.trainable_rows += total - added  # trainable, but older than the buffer holds
        self.committed_rows = rows.stop
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


def mixed_batch(offline: TransitionBuffer | None, online: TransitionBuffer, batch_size: int,
                offline_ratio: float) -> Batch:  # fmt: skip
    """A batch with ``offline_ratio`` of its rows from the offline data, the rest from online data
    (all online with no offline data: an online run from scratch)."""
    if offline is None:
        return online.sample(batch_size)
    if len(online) == 0:
        return offline.sample(batch_size)
    n_offline = offline_batch_rows(batch_size, offline_ratio)
    if n_offline == 0:
        return online.sample(batch_size)
    if n_offline == batch_size:
        return offline.sample(batch_size)
    return concat_batches(offline.sample(n_offline), online.sample(batch_size - n_offline))


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
