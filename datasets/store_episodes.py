"""Episode tracking of a replay store's writer: which rows make each actor's open episode,
its closing (an episodes-table row), and the Cal-QL MC return-to-go filled in when it ends.

Rewards and MC returns: the ``reward`` column holds the RAW env reward, as the
actor observed it, so the store does not depend on training choices. The
``mc_return`` column is the Cal-QL Monte-Carlo return-to-go computed exactly
like ``minari_io.load_transitions``: rewards scaled to
``float32(reward * reward_scale + reward_bias)``, then
``mc_return.trajectory_return_to_go`` with the store's ``data.discount``, the scaled
failure reward (sparse tasks) and ``data.mc_infinite_horizon`` (Cal-QL's Kitchen tail;
stores made before that setting existed read it as False). It is filled when
an episode's terminated or truncated row arrives, for every row of that episode
(rows of different actors interleave). Rows of episodes still open, abandoned (the actor moved on to
another episode without ending this one) or with missing steps (a rejected or
lost chunk) keep ``mc_return = NaN``: filter them with ``np.isfinite``. Note
that rewards used for training must be scaled the same way: the store gives
raw rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .mc_return import trajectory_return_to_go
from .rows import TransitionChunk
from .store_format import LEARNER_COLUMNS, StoreConfig
from .store_frames import INDEX_COLUMNS, FrameColumns, StagedFrames, empty_camera_rows, gather, pool
from .zarr_table import AppendTable

# An episode closed with an MC return: (its store rows, their MC returns, its LEARNER_COLUMNS parts).
Closed = tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]


@dataclasses.dataclass
class Episode:
    """An open episode of one actor: where its rows are and their ``LEARNER_COLUMNS``."""

    episode_id: int
    start_row: int
    next_step: int
    policy_version_start: int
    policy_version_end: int
    eval: bool
    contiguous: bool
    success: bool = False
    # Kept up to date (and in the commit record) so that an episode can be closed
    # without reading its rows back (see ``EpisodeTracker.rebuild``).
    length: int = 0
    end_row: int = -1
    reward_sum: float = 0.0
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # The episode's rows (``LEARNER_COLUMNS``), one dict per staged segment: the MC return
    # needs its rewards, and a commit that closes it hands these rows to the learner. In a camera
    # store also their global frame indices and the frames they stored (``StagedFrames.part``).
    parts: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        fields = ("episode_id", "start_row", "next_step", "policy_version_start", "policy_version_end",
                  "eval", "contiguous", "success", "length", "end_row", "reward_sum")  # fmt: skip
        return {k: getattr(self, k) for k in fields}

    @classmethod
    def from_json(cls, state: dict) -> "Episode":
        return cls(**state)

    def rows(self) -> np.ndarray:
        return np.concatenate([np.arange(a, b) for a, b in self.ranges]) if self.ranges else np.zeros(0, np.int64)

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([part[name] for part in self.parts])


@dataclasses.dataclass
class Actor:
    code: int
    committed_seq: int = -1
    seq: int = -1  # highest accepted or skipped seq (staged)
    episode: Episode | None = None
    last_row_time: float | None = None  # clock() when its last row was staged; None: unknown


class EpisodeTracker:
    """Tracks the actors' open episodes over the store's ``rows`` and stages ``episodes`` rows.

    ``closed`` lists the episodes closed with an MC return since the last commit took them
    (``take_closed``): the rows that commit hands the learner. ``frames``: a camera store's frames.
    An open episode keeps its frames in memory too (one open episode per actor, idle ones abandoned)."""

    def __init__(self, config: StoreConfig, rows: AppendTable, episodes: AppendTable,
                 frames: FrameColumns | None = None):  # fmt: skip
        self.config = config
        self.rows = rows
        self.episodes = episodes
        self.frames = frames
        self.closed: list[Closed] = []

    def take_closed(self) -> list[Closed]:
        closed, self.closed = self.closed, []
        return closed

    def put_back(self, closed: list[Closed]) -> None:
        """A commit that took ``closed`` failed: the next one hands them over."""
        self.closed = closed + self.closed

    def add(self, actor: Actor, chunk: TransitionChunk, start: int, step: np.ndarray, done: np.ndarray,
            seg_starts: np.ndarray, frames: StagedFrames | None = None) -> None:  # fmt: skip
        """Track the rows [start, start + n) of ``chunk`` (its ``frames`` staged), one segment per episode."""
        seg_ends = np.concatenate([seg_starts[1:], [chunk.n]])
        for k, (a, b) in enumerate(zip(seg_starts.tolist(), seg_ends.tolist())):
            last = b - 1
            # Copies in the columns' dtypes: a decoded chunk views the received frames.
            part = {
                "obs": np.array(chunk.obs[a:b], np.float32),
                "action": np.array(chunk.action[a:b], np.float32),
                "reward": np.array(chunk.reward[a:b], np.float32),
                "next_obs": np.array(chunk.next_obs[a:b], np.float32),
                "terminated": np.array(chunk.terminated[a:b], bool),
                "eval": np.full(b - a, bool(chunk.eval)),
                "intervention": np.zeros(b - a, np.uint8) if chunk.intervention is None
                else np.array(chunk.intervention[a:b], np.uint8),  # fmt: skip
                **(frames.part(a, b) if frames is not None else {}),
            }
            self._track(
                actor,
                chunk,
                episode_id=chunk.episode_id + k,
                step=int(step[a]),
                rows=(start + a, start + b),
                part=part,
                ended=bool(done[last]),
                terminated=bool(chunk.terminated[last]),
                success=bool(chunk.success[last]),
            )

    def _track(self, actor: Actor, chunk: TransitionChunk, *, episode_id: int, step: int,
               rows: tuple[int, int], part: dict[str, np.ndarray], ended: bool, terminated: bool, success: bool) -> None:  # fmt: skip
        episode = actor.episode
        restarted = step == 0 and episode is not None and episode.next_step > 0  # e.g. an actor restart
        if episode is not None and (episode.episode_id != episode_id or restarted):
            self.close(actor, ended=False, terminated=False)
            episode = None
        if episode is None:
            episode = actor.episode = Episode(
                episode_id=episode_id,
                start_row=rows[0],
                next_step=step,
                policy_version_start=chunk.policy_version,
                policy_version_end=chunk.policy_version,
                eval=chunk.eval,
                contiguous=step == 0,
            )
        elif step != episode.next_step:
            episode.contiguous = False  # steps are missing: no MC return for this episode
        episode.ranges.append(rows)
        episode.parts.append(part)
        episode.length += rows[1] - rows[0]
        episode.end_row = rows[1] - 1
        episode.reward_sum += float(part["reward"].astype(np.float64).sum())
        episode.next_step = step + rows[1] - rows[0]
        episode.policy_version_end = chunk.policy_version
        episode.success = success
        if ended:
            self.close(actor, ended=True, terminated=terminated)

    def close(self, actor: Actor, ended: bool, terminated: bool) -> None:
        """Close the actor's open episode: ``ended`` by its terminated/truncated row (then, if no
        step is missing, with its MC return), or abandoned."""
        episode = actor.episode
        actor.episode = None
        if ended and episode.contiguous:
            rows = episode.rows()
            raw = episode.column("reward")
            terminals = np.zeros(len(raw), np.float32)
            terminals[-1] = float(terminated)
            cfg = self.config
            # Cal-QL's MC return-to-go (official calc_return_to_go, see mc_return.py): scaled
            # rewards, G_t = r_t + gamma * G_{t+1} * (1 - terminal_t), the all-failure rule of
            # sparse tasks and, for Kitchen, the infinite-horizon tail of truncated episodes.
            mc = trajectory_return_to_go(
                cfg.data.scale(raw), terminals, cfg.data.discount, cfg.scaled_failure_reward, cfg.data.mc_infinite_horizon
            )
            self.rows.patch("mc_return", rows, mc)
            self.closed.append((rows, mc, episode.parts))  # handed to the learner by the commit
        self.episodes.stage(
            {
                "actor": actor.code,
                "episode_id": episode.episode_id,
                "policy_version_start": episode.policy_version_start,
                "policy_version_end": episode.policy_version_end,
                "start_row": episode.start_row,
                "end_row": episode.end_row if episode.length else episode.start_row,
                "length": episode.length,
                "return": episode.reward_sum,
                "success": episode.success,
                "eval": episode.eval,
                "ended": ended,
                "terminated": terminated,
                "contiguous": episode.contiguous,
            },
            1,
        )

    def closed_rows(self, closed: list[Closed]) -> dict[str, np.ndarray]:
        """``CommitEvent.closed``: the rows of ``closed``, episode after episode, with ``mc_return``."""
        if closed:
            parts = [part for _, _, episode_parts in closed for part in episode_parts]
            names = LEARNER_COLUMNS if self.frames is None else (*LEARNER_COLUMNS, *INDEX_COLUMNS)
            rows = {name: np.concatenate([part[name] for part in parts]) for name in names}
            rows["mc_return"] = np.concatenate([mc for _, mc, _ in closed])
            if self.frames is None:
                return rows
            keys = ("frame_ids", *self.frames.frame_keys)  # the frames each part stored
            stored = {key: np.concatenate([part[key] for part in parts]) for key in keys}
            return gather(rows, pool(stored.pop("frame_ids"), stored))
        empty = {name: self.rows.specs[name] for name in (*LEARNER_COLUMNS, "mc_return")}
        rows = {name: np.zeros((0, *spec.shape), spec.dtype) for name, spec in empty.items()}
        return rows if self.frames is None else {**rows, **empty_camera_rows(self.frames.spec)}

    def rebuild(self, actors: list[Actor], committed: int,
                read: Callable[[int, int, list[str]], dict[str, np.ndarray]]) -> bool:  # fmt: skip
        """After a reopen: find the committed rows of each open episode (their ``LEARNER_COLUMNS``
        back into memory), and clear any MC return an interrupted commit wrote for them (their
        end was never committed). True if that left something to commit."""
        open_actors = [a for a in actors if a.episode is not None]
        if not open_actors:
            return False
        changed = False
        first = min(a.episode.start_row for a in open_actors)
        indices = list(INDEX_COLUMNS) if self.frames is not None else []
        cols = read(first, committed, ["actor", "episode_id", "mc_return", *LEARNER_COLUMNS, *indices])
        for actor in open_actors:
            episode = actor.episode
            mask = (cols["actor"] == actor.code) & (cols["episode_id"] == episode.episode_id)
            mask[: episode.start_row - first] = False
            rows = np.flatnonzero(mask) + first
            bounds = np.flatnonzero(np.diff(rows) != 1) + 1
            episode.ranges = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, bounds) if len(r)]
            episode.parts = [{name: cols[name][mask] for name in (*LEARNER_COLUMNS, *indices)}]
            if self.frames is not None:  # its frames back into memory, and where it ends
                part = episode.parts[0]
                part["frame_ids"] = np.unique(np.concatenate([part["obs_frame"], part["next_frame"]]))
                part.update(self.frames.take(part["frame_ids"]))
                if len(rows):
                    self.frames.set_tail(actor.code, int(part["next_frame"][-1]))
            rewards = episode.parts[0]["reward"]
            # From the rows themselves (records of older versions lack these).
            episode.length = len(rows)
            episode.end_row = int(rows[-1]) if len(rows) else episode.start_row
            episode.reward_sum = float(rewards.astype(np.float64).sum())
            if np.isfinite(cols["mc_return"][mask]).any():
                self.rows.patch("mc_return", rows, np.full(len(rows), np.nan, np.float32))
                changed = True
        return changed
