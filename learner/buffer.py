"""Device-resident transition buffer and the named mini-batch the agent trains on.

Camera tasks add uint8 frames: each frame is held once, in a ring per camera (``frame_ring``), and a
row points at its obs and next frame; a batch carries them as uint8 images, not augmented (the agent
applies DrQ's random shift to obs and next images separately).

Human interventions (HIL-SERL): a buffer remembers which of its rows the operator acted (``add``'s
``intervention`` flags) and samples those alone with ``sample_interventions`` (``mixed_batch`` draws
them on the offline side of a batch too).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from o2o.datasets.minari_io import Transitions
from o2o.envs.obs_spec import CameraSpec, ObsSpec

from .frame_ring import FrameRing, camera_columns, frames_device

# Dataset actions are clipped inside (-1, 1) so the tanh policy's log-prob stays finite
# (the official code clips to +-0.99999 as well).
ACTION_CLIP = 1.0 - 1e-5


@dataclasses.dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (B, obs_dim): the state vector
    action: torch.Tensor  # (B, act_dim), in [-1, 1]
    reward: torch.Tensor  # (B,), scaled
    next_obs: torch.Tensor  # (B, obs_dim)
    terminated: torch.Tensor  # (B,), 1 = terminal (no bootstrap); the row schema's name
    mc_return: torch.Tensor  # (B,)
    online_rows: int = 0  # the last ``online_rows`` rows come from online data (``mixed_batch`` puts them last)
    images: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # camera -> uint8 (B, H, W, C)
    next_images: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # camera -> uint8 (B, H, W, C)


FIELDS = [f.name for f in dataclasses.fields(Batch) if f.name not in ("online_rows", "images", "next_images")]
"""The stored columns (``online_rows`` describes the batch, not a row; images live in the frame ring)."""


def concat_batches(first: Batch, last: Batch) -> Batch:
    """Rows of ``first`` then ``last``; online rows must stay at the end (``Batch.online_rows``)."""
    if first.online_rows and last.online_rows != len(last.reward):
        raise ValueError("concat_batches: online rows must come last")
    if first.images.keys() != last.images.keys():
        raise ValueError(f"concat_batches: cameras {sorted(first.images)} and {sorted(last.images)} differ")
    joined = {name: torch.cat([getattr(first, name), getattr(last, name)]) for name in FIELDS}
    images = {name: torch.cat([first.images[name], last.images[name]]) for name in first.images}
    next_images = {name: torch.cat([first.next_images[name], last.next_images[name]]) for name in first.next_images}
    return Batch(**joined, online_rows=first.online_rows + last.online_rows, images=images, next_images=next_images)


def offline_batch_rows(batch_size: int, offline_ratio: float) -> int:
    """Rows of a mixed batch drawn from the offline data (the rest are online rows): the one split
    formula of fine-tuning's batches (``mixed_batch``) and of the checks on them (SERA's)."""
    return int(round(batch_size * offline_ratio))


def normalize_actions(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Env actions -> [-1, 1] (the policy's tanh range)."""
    scaled = 2.0 * (action - low) / (high - low) - 1.0
    return np.clip(scaled, -ACTION_CLIP, ACTION_CLIP).astype(np.float32)


def default_frame_capacity(capacity: int) -> int:
    """Frames held for ``capacity`` transitions: an episode of T steps has T + 1 frames, so a quarter
    more covers episodes of 4 steps or more on average; shorter ones leave fewer rows sampleable."""
    return max(2, capacity + capacity // 4)


@dataclasses.dataclass(frozen=True)
class BufferMemory:
    """What a buffer holds and where (``TransitionBuffer.memory``)."""

    transitions: int
    frames: int  # per camera
    row_bytes: int  # the float columns, on ``device``
    frame_bytes: int  # the frames and the rows' frame indices, on ``frames_device``
    device: str
    frames_device: str

    @property
    def total_bytes(self) -> int:
        return self.row_bytes + self.frame_bytes

    def line(self) -> str:
        """One log line: transitions, frames, bytes, device."""
        text = f"{self.transitions:,} transitions ({_size(self.row_bytes)} on {self.device})"
        if self.frames:
            moved = "" if self.frames_device == self.device else ", sampled frames moved to the device per batch"
            text += f" + {self.frames:,} frames per camera ({_size(self.frame_bytes)} on {self.frames_device}{moved})"
        return f"{text}: {_size(self.total_bytes)} in all"


def _size(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


class TransitionBuffer:
    """Columns held as tensors on the training device; uniform sampling with no host sync.

    ``capacity`` rows (transitions) are allocated up front; ``add`` appends (online data) and
    wraps around FIFO-style once full. With cameras (an ``ObsSpec`` with cameras in place of
    ``obs_dim``, or ``cameras=``), each camera's frames are held once in a ring of
    ``frame_capacity`` uint8 frames (``frame_ring``), on the training device when they fit
    (``frames_on``), and batches carry the rows' obs and next images; a row whose frames the ring
    has overwritten leaves the sampling window (``len``) with the oldest rows.
    """

    def __init__(self, obs_dim: int | ObsSpec, action_dim: int, capacity: int, device: torch.device,
                 online: bool = False, *, cameras: Sequence[CameraSpec] = (), frame_capacity: int | None = None,
                 frames_on: str = "auto", share_frames: Mapping[str, np.ndarray] | None = None):  # fmt: skip
        """``frame_capacity``: frames held per camera (default ``default_frame_capacity``); ``frames_on``:
        "auto" (the training device if the frames fit with a quarter of its memory to spare, else the
        host), "device" or "host"; ``share_frames``: frames of exactly ``frame_capacity`` a host ring
        holds in place (``from_transitions``: a dataset's frames are not copied on the host)."""
        if isinstance(obs_dim, ObsSpec):
            obs_dim, cameras = obs_dim.state_dim, obs_dim.cameras
        self.device = torch.device(device)
        self.capacity = capacity
        self.online = online  # rows acted online (their batches say so: SERA's bonus applies to them)
        shapes = {"obs": (obs_dim,), "action": (action_dim,), "next_obs": (obs_dim,)}
        frame_capacity = (frame_capacity or default_frame_capacity(capacity)) if cameras else 0
        frame_bytes = FrameRing.nbytes(cameras, frame_capacity, capacity) if cameras else 0
        where = frames_device(self.device, frame_bytes, frames_on) if cameras else self.device
        row_bytes = capacity * 4 * sum(math.prod(shapes.get(name, ())) for name in FIELDS)
        # What it takes, all allocated here (``memory.line()`` to log at start); refused past the free memory.
        self.memory = BufferMemory(capacity, frame_capacity, row_bytes, frame_bytes, str(self.device), str(where))
        check_fits_memory(self.memory)
        self.columns = {
            name: torch.zeros((capacity, *shapes.get(name, ())), dtype=torch.float32, device=self.device)
            for name in FIELDS
        }
        self.size = 0
        self._next = 0
        self.ring: FrameRing | None = None
        if cameras:
            self.ring = FrameRing(cameras, frame_capacity, capacity, where, share_frames)
        self._added = 0  # rows added so far (absolute row numbers)
        self._first = 0  # the absolute row number where the sampling window starts (cameras only)
        # Slots holding an operator's row (host flags, 1 byte a row); those in the sampling window as indices on
        # the sampling device, refreshed by each add (none: no work at all).
        self._intervention = np.zeros(capacity, bool)
        self._flagged = False
        self.intervention_slots = torch.zeros(0, dtype=torch.int64, device=self.ring.device if self.ring else self.device)

    @classmethod
    def from_transitions(cls, data: Transitions, low: np.ndarray, high: np.ndarray, device: torch.device,
                         capacity: int | None = None, frames_on: str = "auto") -> "TransitionBuffer":  # fmt: skip
        """A buffer of ``data``'s rows (a camera dataset's frames too: ``Transitions.frames``); holding
        all of them by default (rows and frames; frames on the host are the dataset's own, not a copy)."""
        cameras = tuple(CameraSpec(name, *frames.shape[1:]) for name, frames in sorted(data.frames.items()))
        given = len(next(iter(data.frames.values()))) if cameras else 0
        frame_capacity = None if capacity or not cameras else max(2, given)  # room for every frame given
        buffer = cls(data.obs_dim, data.action_dim, capacity or len(data), device, cameras=cameras,
                     frame_capacity=frame_capacity, frames_on=frames_on,
                     share_frames=None if capacity else data.frames)  # fmt: skip
        images = {"frames": data.frames, "obs_frame": data.obs_frame, "next_frame": data.next_frame} if cameras else {}
        buffer.add(
            obs=data.obs,
            action=normalize_actions(data.action, low, high),
            reward=data.reward,
            next_obs=data.next_obs,
            terminated=data.terminated,
            mc_return=data.mc_return,
            **images,
        )
        return buffer

    def __len__(self) -> int:
        """Rows that can be sampled."""
        return self.size if self.ring is None else self._added - self._first

    @property
    def cameras(self) -> tuple[CameraSpec, ...]:
        return () if self.ring is None else self.ring.cameras

    @property
    def camera_columns(self) -> tuple[str, ...]:
        """The flat row dict keys (store reads, commit events) that carry this buffer's frames."""
        return camera_columns(self.cameras) if self.cameras else ()

    def add(self, frames: Mapping[str, np.ndarray] | None = None, obs_frame: np.ndarray | None = None,
            next_frame: np.ndarray | None = None, intervention: np.ndarray | None = None,
            **rows: np.ndarray) -> None:  # fmt: skip
        """Append rows given as arrays by field name (actions already in [-1, 1]); with cameras, the
        ``frames`` ({camera: uint8 (F, H, W, C)}) they use and each row's ``obs_frame`` / ``next_frame``
        index into them; ``intervention``: 1 for the rows the operator acted (None: none). Bad frames
        raise ValueError before anything is written."""
        n = len(rows["reward"])
        if intervention is not None:  # travels with the rows through the cuts and reorders below
            rows["intervention"] = np.asarray(intervention) != 0
        if (frames is None) != (self.ring is None):
            held = f"with cameras {list(self.ring.camera_names)}" if self.ring else "without cameras"
            raise ValueError(f"rows {'without' if frames is None else 'with'} frames for a buffer {held}")
        if self.ring is not None:
            self._add_with_frames(frames, obs_frame, next_frame, rows)
        else:
            if n > self.capacity:
                rows = {k: v[-self.capacity :] for k, v in rows.items()}
                n = self.capacity
            idx = (self._next + torch.arange(n)) % self.capacity
            self._write(idx.to(self.device), rows, n)
        if self._flagged:
            self._refresh_interventions()

    def _write(self, idx: torch.Tensor, rows: Mapping[str, np.ndarray], n: int) -> None:
        for name in FIELDS:
            self.columns[name][idx] = torch.as_tensor(rows[name], dtype=torch.float32).to(self.device, non_blocking=True)
        flags = rows.get("intervention")
        if self._flagged or (flags is not None and flags.any()):  # a run without interventions skips this
            self._flagged = True
            self._intervention[(self._next + np.arange(n)) % self.capacity] = False if flags is None else flags
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._added += n

    def _add_with_frames(self, frames, obs_frame, next_frame, rows) -> None:
        n = len(rows["reward"])
        if obs_frame is None or next_frame is None or len(obs_frame) != n or len(next_frame) != n:
            raise ValueError(f"{n} rows need an obs_frame and a next_frame each")
        count = self.ring.check(frames)
        if n > self.capacity:
            rows = {k: v[-self.capacity :] for k, v in rows.items()}
            obs_frame, next_frame = obs_frame[-self.capacity :], next_frame[-self.capacity :]
        order, first, used, obs, nxt = self.ring.fit(obs_frame, next_frame, count)  # the last rows whose frames fit
        if order is not None:
            rows = {k: np.asarray(v)[order] for k, v in rows.items()}
        rows = {k: v[first:] for k, v in rows.items()} if first else rows
        n = len(obs)
        host = (self._next + np.arange(n)) % self.capacity
        idx = torch.from_numpy(host).to(self.device)
        self.ring.put(idx.to(self.ring.device), host, frames, used, obs, nxt)
        self._write(idx, rows, n)
        # The window: rows still in the row ring whose frames are all still in the frame ring.
        held = max(self._first, self._added - self.size)
        self._first = self.ring.first_valid_row(held, self._added, self.capacity)

    def _refresh_interventions(self) -> None:
        """The intervention rows' slots inside the sampling window (absolute rows [added - len, added))."""
        slots = np.flatnonzero(self._intervention)
        slots = slots[(slots - (self._added - len(self))) % self.capacity < len(self)]
        self.intervention_slots = torch.from_numpy(slots).to(self.intervention_slots.device)

    @property
    def interventions(self) -> int:
        """Rows the operator acted that can be sampled (known on the host: no device sync)."""
        return len(self.intervention_slots)

    def sample_interventions(self, batch_size: int) -> Batch:
        """A batch drawn uniformly from the intervention rows (``interventions`` > 0), marked as offline rows
        (``online_rows`` 0): ``mixed_batch`` puts them on the offline side, as HIL-SERL's demo buffer."""
        return dataclasses.replace(self.sample_rows(self.intervention_slots, batch_size), online_rows=0)

    def sample(self, batch_size: int) -> Batch:
        if self.ring is None:
            idx = torch.randint(0, self.size, (batch_size,), device=self.device)
            return Batch(**{name: col[idx] for name, col in self.columns.items()}, online_rows=batch_size if self.online else 0)
        # The window is a contiguous run of the row ring from slot _first % capacity: no host sync.
        offset = torch.randint(0, len(self), (batch_size,), device=self.ring.device)
        return self._batch((self._first + offset) % self.capacity, batch_size)

    def sample_rows(self, rows: torch.Tensor, batch_size: int) -> Batch:
        """A batch drawn uniformly from the given row indices (e.g. OOO's high-reward rows)."""
        if self.ring is None:
            idx = rows[torch.randint(0, len(rows), (batch_size,), device=self.device)]
            return Batch(**{name: col[idx] for name, col in self.columns.items()}, online_rows=batch_size if self.online else 0)
        idx = rows[torch.randint(0, len(rows), (batch_size,), device=rows.device)]
        return self._batch(idx.to(self.ring.device), batch_size)  # frames on the host: rows come to it

    def _batch(self, idx: torch.Tensor, batch_size: int) -> Batch:
        """The rows at ``idx`` (on the frame ring's device) with their images, on the training device."""
        images, next_images = self.ring.images(idx)
        if self.ring.device != self.device:  # frames on the host: move this batch's frames only
            idx = idx.to(self.device, non_blocking=True)
            images = {k: v.to(self.device, non_blocking=True) for k, v in images.items()}
            next_images = {k: v.to(self.device, non_blocking=True) for k, v in next_images.items()}
        return Batch(**{name: col[idx] for name, col in self.columns.items()}, online_rows=batch_size if self.online else 0,
                     images=images, next_images=next_images)  # fmt: skip

    def state_dict(self) -> dict:
        return {"size": self.size, "next": self._next}


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none: then nothing is checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_memory(memory: BufferMemory) -> None:
    """Refuse a buffer the host cannot hold, before allocating it: its tensors are zero-filled lazily
    (calloc), so a buffer past the free memory would only fail hours later, when it fills."""
    host = sum(nbytes for nbytes, where in ((memory.row_bytes, memory.device), (memory.frame_bytes, memory.frames_device))
               if where == "cpu")  # fmt: skip
    free = available_host_bytes()
    if free is not None and host > free:
        raise MemoryError(f"a sampling buffer of {memory.line()} needs {_size(host)} of host memory, "
                          f"{_size(free)} is available: lower its capacity (buffer_capacity for the online "
                          "buffer)")  # fmt: skip
