"""The wire's size limits, and ``ChunkSpec``: what a receiver accepts of a task's chunks.

Limits bound what one message may make a receiver hold; a task's limits come from its spec
(the state and action sizes, the cameras' image sizes: envs/obs_spec.py).
"""

from __future__ import annotations

import dataclasses

from o2o.datasets.rows import ARRAY_NAMES, INTERVENTION, frame_key
from o2o.envs.obs_spec import CameraSpec, ObsSpec

MAX_HEADER_BYTES = 64 * 1024
MAX_ACTOR_ID_LEN = 128
MAX_POLICY_BYTES = 512 * 1024 * 1024
MAX_RUN_ID_LEN = 64
MAX_ROWS = 16384  # rows of a chunk, at most
# Camera frames of one chunk, at most: with cameras, max_rows is what fits (a chunk of n rows holds at
# most 2n frames per camera, each segment one more frame than rows), so the ingest server never holds
# more than this per received chunk.
MAX_CHUNK_FRAME_BYTES = 64 * 2**20
MAX_CAMERAS = 16  # in a hello
MAX_IMAGE_SIDE = 2**16 - 1  # H, W or C of a camera in a hello


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """What a receiver accepts: the task's dimensions and size limits.

    ``obs_dim`` is the state vector's size (0 allowed for a camera task without state);
    ``cameras`` the images each observation carries, sorted by name (``ObsSpec.cameras``).
    ``max_rows`` 0 is ``MAX_ROWS``, or with cameras the most rows whose frames fit
    ``MAX_CHUNK_FRAME_BYTES`` (a larger max_rows is refused then; a state task may set any).
    """

    obs_dim: int
    action_dim: int
    max_rows: int = 0
    cameras: tuple[CameraSpec, ...] = ()

    def __post_init__(self) -> None:
        for name, lo in (("obs_dim", 0 if self.cameras else 1), ("action_dim", 1), ("max_rows", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"ChunkSpec.{name} must be an int >= {lo}, got {value!r}")
        cameras = tuple(self.cameras)
        if not all(isinstance(c, CameraSpec) for c in cameras):
            raise ValueError(f"ChunkSpec.cameras must hold CameraSpec, got {cameras!r}")
        names = [c.name for c in cameras]
        if names != sorted(set(names)):
            raise ValueError(f"ChunkSpec.cameras must be sorted by name without repeats, got {names}")
        fits = MAX_ROWS
        if cameras:
            image_bytes = sum(c.frame_bytes for c in cameras)
            fits = min(MAX_ROWS, MAX_CHUNK_FRAME_BYTES // (2 * image_bytes))
            if fits < 1:
                raise ValueError(f"one observation's images take {image_bytes} bytes: a chunk of one row (2 "
                                 f"frames per camera) exceeds the {MAX_CHUNK_FRAME_BYTES} bytes a chunk's frames may "
                                 "take")  # fmt: skip
            if self.max_rows > fits:
                raise ValueError(f"ChunkSpec.max_rows={self.max_rows} exceeds the {fits} rows whose frames fit "
                                 f"{MAX_CHUNK_FRAME_BYTES} bytes; use max_rows=0 for the most allowed")  # fmt: skip
        object.__setattr__(self, "cameras", cameras)
        object.__setattr__(self, "max_rows", self.max_rows or fits)  # frozen: resolved once, here

    @classmethod
    def for_obs(cls, obs_spec: ObsSpec, action_dim: int, max_rows: int = 0) -> "ChunkSpec":
        """The spec of a task whose observation is ``obs_spec`` (envs/obs_spec.py)."""
        return cls(obs_spec.state_dim, action_dim, max_rows, tuple(obs_spec.cameras))

    @property
    def camera_shapes(self) -> dict[str, list[int]]:
        """{camera: [H, W, C]}, as a hello carries it."""
        return {c.name: list(c.shape) for c in self.cameras}

    def array_specs(self, n: int, intervention: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the row arrays of an n-row chunk, in frame order (camera frames follow);
        ``intervention``: with the optional 8th array (a chunk with an operator's row, datasets/rows.py)."""
        return [
            ("obs", "<f4", (n, self.obs_dim)),
            ("action", "<f4", (n, self.action_dim)),
            ("reward", "<f4", (n,)),
            ("next_obs", "<f4", (n, self.obs_dim)),
            ("terminated", "|u1", (n,)),
            ("truncated", "|u1", (n,)),
            ("success", "|u1", (n,)),
            *([(INTERVENTION, "|u1", (n,))] if intervention else []),
        ]

    def frame_specs(self, n_frames: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the camera frames of a chunk holding ``n_frames`` frames, in frame order."""
        return [(frame_key(c.name), "|u1", (n_frames, *c.shape)) for c in self.cameras]

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame a valid chunk holds (for ZeroMQ's MAXMSGSIZE guard)."""
        image = max((c.frame_bytes for c in self.cameras), default=0)
        return max(MAX_HEADER_BYTES, self.max_rows * max(self.obs_dim, self.action_dim) * 4, 2 * self.max_rows * image)


def lists_intervention(descr) -> bool:
    """Whether a chunk header's ``arrays`` lists the optional intervention array after the row arrays."""
    entry = descr[len(ARRAY_NAMES)] if isinstance(descr, list) and len(descr) > len(ARRAY_NAMES) else None
    return isinstance(entry, list) and entry[:1] == [INTERVENTION]
