"""The trainable rows of a replay store: the one rule that the online learner's restart
(``OnlineData.load_store``) and the retrain (``retrain.select_store_rows``) both read by."""

from __future__ import annotations

import dataclasses

import numpy as np

from .replay_store import ReplayStore
from .store_frames import READ_FRAME_BYTES, expand_columns

READ_CHUNK_ROWS = 262_144
# The columns the rule looks at.
RULE_COLUMNS = ("mc_return", "eval", "actor", "episode_id")


@dataclasses.dataclass(frozen=True)
class TrainableRows:
    """The trainable rows of a store's committed prefix [0, ``stop``), a row being trainable when

    * its episode ENDED within the prefix (its terminated/truncated row lies before ``stop``, so
      its MC return needs no later row), as the episodes table of the commit read says;
    * its MC return is finite (NaN: an episode still open, abandoned, or with missing steps);
    * it is not an evaluation row (neither the row's ``eval`` flag nor its episode's), unless
      ``include_eval``.

    The rows are read lazily (``read``, ``count``, ``chunks``), so a caller can count first and
    read whole rows only where it needs them, or only the newest ``limit`` (``chunks``). A camera
    store's rows carry their frames (``obs_frame`` / ``next_frame`` relative to the ``frames/<camera>``
    of the same dict, store_frames.py)."""

    store: ReplayStore
    stop: int
    """Rows of the store looked at: [0, stop)."""
    episode_keys: np.ndarray
    """Sorted keys (``episode_keys``) of the episodes whose rows are kept."""
    include_eval: bool = False

    @property
    def episodes(self) -> int:
        """How many episodes the rows come from (the ended, non-eval ones unless ``include_eval``)."""
        return len(self.episode_keys)

    def mask(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Which of these rows (with at least ``RULE_COLUMNS``) are trainable."""
        keep = np.isfinite(rows["mc_return"]) & (self.include_eval | ~rows["eval"])
        return keep & np.isin(episode_keys(rows["actor"], rows["episode_id"]), self.episode_keys)

    def read(self, start: int, stop: int, columns: list[str] | None = None, skip: int = 0) -> dict[str, np.ndarray]:
        """The trainable rows among [start, stop) (within the prefix), but the first ``skip`` of them:
        ``columns`` of them (None: all; any camera key brings them all)."""
        wanted = None if columns is None else list(dict.fromkeys([*columns, *RULE_COLUMNS]))

        def keep(rows: dict[str, np.ndarray]) -> np.ndarray:  # frames are read for the kept rows only
            mask = self.mask(rows)
            return mask & (np.cumsum(mask) > skip)

        rows = self.store.read(start, min(stop, self.stop), wanted, where=keep)
        return {k: rows[k] for k in (expand_columns(columns, self.store.obs_spec) if columns else rows)}

    def count(self, start: int, stop: int) -> int:
        """How many trainable rows lie in [start, stop), reading only the rule's columns."""
        return int(self.mask(self.store.read(start, min(stop, self.stop), list(RULE_COLUMNS))).sum())

    def chunks(self, columns: list[str] | None = None, chunk: int = 0, first: int = 0, limit: int = 0):
        """``read`` of each chunk of ``chunk`` rows (0: ``read_chunk_rows``) from row ``first`` to ``stop``,
        in order. ``limit`` > 0: only the newest ``limit`` trainable rows (a learner whose buffer holds
        ``limit`` rows reads no more than that, however large the store): the rule's columns are counted
        backwards first, then rows read from the chunk where those begin."""
        chunk = chunk or read_chunk_rows(self.store)
        starts = list(range(first, self.stop, chunk))
        skip = 0
        if limit > 0:
            k, found = len(starts), 0
            while k > 0 and found < limit:
                k -= 1
                found += self.count(starts[k], starts[k] + chunk)
            starts, skip = starts[k:], max(0, found - limit)
        for i, start in enumerate(starts):
            yield self.read(start, start + chunk, columns, skip=skip if i == 0 else 0)


def trainable_rows(store: ReplayStore, until_row: int = 0, until_version: int = 0,
                   include_eval: bool = False) -> TrainableRows:  # fmt: skip
    """The trainable rows (``TrainableRows``) of the store's last commit, or of its prefix: the first
    ``until_row`` rows (0: all), cut before the first row acted by a policy version above
    ``until_version`` (0: no cut)."""
    committed = store.refresh()
    stop = min(until_row, committed) if until_row > 0 else committed
    if until_version > 0:
        versions = store.read(0, stop, ["policy_version"])["policy_version"]
        later = np.flatnonzero(versions > until_version)
        stop = int(later[0]) if len(later) else stop
    episodes = store.episodes(["actor", "episode_id", "end_row", "ended", "eval"])
    usable = episodes["ended"] & (episodes["end_row"] < stop) & (include_eval | ~episodes["eval"])
    keys = np.sort(episode_keys(episodes["actor"][usable], episodes["episode_id"][usable]))
    return TrainableRows(store, stop, keys, include_eval)


def read_chunk_rows(store: ReplayStore) -> int:
    """Rows read at a time: ``READ_CHUNK_ROWS``, fewer in a camera store (~``READ_FRAME_BYTES`` of frames)."""
    image_bytes = store.obs_spec.image_bytes
    return READ_CHUNK_ROWS if not image_bytes else max(1024, min(READ_CHUNK_ROWS, READ_FRAME_BYTES // image_bytes))


def episode_keys(actor: np.ndarray, episode_id: np.ndarray) -> np.ndarray:
    """One int64 per (actor code, episode id)."""
    return actor.astype(np.int64) << 40 | episode_id.astype(np.int64)
