"""Online data on the learner side: committed store rows -> trainable rows -> mixed batches.

Rows become trainable when their episode ends: the commit that closes an episode hands
its rows, with their Cal-QL MC return-to-go, in ``CommitEvent.closed`` (the store keeps
the rows of open episodes until then). So the learner holds nothing but its bounded
sampling buffer: no copy of rows still waiting for their episode's end. Evaluation
rows are never trained on by default.

Human interventions (HIL-SERL): the rows the operator acted (the store's ``intervention`` column) enter
the online buffer like every row and are also drawn on the offline side of each batch (``mixed_batch``),
as HIL-SERL trains on them; ``pop_intervention_rate`` is the share of committed rows they make.
"""

from __future__ import annotations

from collections.abc import Callable

import queue
from typing import NamedTuple

import numpy as np
import torch

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
    interventions: int  # among the committed rows


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
        self.intervention_rows = 0  # committed rows the operator acted (HIL-SERL interventions)
        self._rate_from = (0, 0)  # (committed_rows, intervention_rows) at the last pop_intervention_rate

    def on_commit(self, event: CommitEvent) -> None:
        """Runs in the ingest thread: count what became trainable, hand the event over."""
        keep = self._trainable(event.closed)
        self.trainable_committed += int(keep.sum())
        # Only the closed rows wait for ``drain``: the event's copy of the new rows is not needed.
        self.events.put(_Commit(event.stop, event.closed, event.episodes, event.interventions))

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
            self.intervention_rows += commit.interventions
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
            intervention=rows["intervention"][keep] if "intervention" in rows else None,
            **images,
        )
        return int(keep.sum())

    def add_rows(self, obs, action, raw_reward, next_obs, terminated, mc_return, frames=None, obs_frame=None,
                 next_frame=None, intervention=None) -> None:  # fmt: skip
        """Trainable rows in store units (env actions, raw rewards) into the device buffer; with cameras,
        the frames they use ({camera: uint8 (F, H, W, C)}) and their ``obs_frame`` / ``next_frame`` in them;
        ``intervention``: 1 for the rows the operator acted (None: none)."""
        reward = self.data.scale(raw_reward)  # as offline rows and the store
        images = {} if frames is None else {"frames": frames, "obs_frame": obs_frame, "next_frame": next_frame}
        self.buffer.add(
            obs=obs,
            action=normalize_actions(action, self.low, self.high),
            reward=reward,
            next_obs=next_obs,
            terminated=np.asarray(terminated, np.float32),
            mc_return=mc_return,
            intervention=intervention,
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
        self.intervention_rows = sum(int(store.read(start, min(start + chunk, rows.stop), ["intervention"])
                                         ["intervention"].sum()) for start in range(0, rows.stop, chunk))  # fmt: skip
        self._rate_from = (self.committed_rows, self.intervention_rows)
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

    def pop_intervention_rate(self) -> float:
        """The share of the rows committed since the last call that the operator acted (HIL-SERL's
        intervention rate, ``metric_keys.INTERVENTION_RATE``); 0.0 when no row was committed since."""
        rows, flagged = self.committed_rows - self._rate_from[0], self.intervention_rows - self._rate_from[1]
        self._rate_from = (self.committed_rows, self.intervention_rows)
        return flagged / rows if rows > 0 else 0.0


def mixed_batch(offline: TransitionBuffer | None, online: TransitionBuffer, batch_size: int,
                offline_ratio: float) -> Batch:  # fmt: skip
    """A batch with ``offline_ratio`` of its rows from the offline side, the rest from online data.

    The offline side is drawn uniformly from the offline data and the online buffer's intervention rows
    together (the operator's rows stay in the online data as well): HIL-SERL inserts every intervention
    transition into both its RL buffer and its demo buffer, and samples half of each batch from each
    (rail-berkeley/hil-serl examples/train_rlpd.py at 5d02aed: ``intvn_data_store.insert`` in ``actor``,
    lines 200-201; the ``actor_env_intvn`` store registered as ``demo_buffer``, line 267; the two
    ``batch_size // 2`` iterators concatenated, lines 289-300 and 320-334); LeRobot's ``process_transitions``
    (huggingface/lerobot src/lerobot/rl/learner.py) adds an ``is_intervention`` transition to its
    ``offline_replay_buffer`` too. With no offline data (a run from scratch) the offline side is the
    intervention rows alone; with neither, the batch is all online rows."""
    n_flagged = online.interventions
    if offline is None and n_flagged == 0:
        return online.sample(batch_size)
    if len(online) == 0:
        return offline.sample(batch_size)
    n_offline = offline_batch_rows(batch_size, offline_ratio)
    if n_offline == 0:
        return online.sample(batch_size)
    # Uniform over the union: the intervention rows' share of the offline side is Binomial(n_offline, p).
    n_data = 0 if offline is None else len(offline)
    n_intervention = 0 if n_flagged == 0 else n_offline if n_data == 0 else int(
        torch.binomial(torch.tensor(float(n_offline)), torch.tensor(n_flagged / (n_data + n_flagged))))  # fmt: skip
    parts = [offline.sample(n_offline - n_intervention)] if n_offline > n_intervention else []
    if n_intervention:
        parts.append(online.sample_interventions(n_intervention))
    if n_offline < batch_size:
        parts.append(online.sample(batch_size - n_offline))
    batch = parts[0]
    for part in parts[1:]:
        batch = concat_batches(batch, part)
    return batch


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
