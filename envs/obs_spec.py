"""What an observation is made of: one float32 state vector and zero or more uint8 camera images.

A task or a user's env declares its observation as a gymnasium Dict, ``{"state": Box(float32, (d,)),
"<camera>": Box(uint8, (H, W, C)), ...}``, or as a flat float Box (a state-only env: no cameras).
``ObsSpec.from_space`` reads that declaration once; every later layer (the actor's inputs, the wire's
size limits, the store's columns, the learner's encoder) asks the spec, so an image's shape is
declared in one place. Images stay uint8 until the network (DESIGN.md, "Observations").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gymnasium as gym
import numpy as np

STATE_KEY = "state"
IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA / RGB-D packed in uint8


class ObservationError(ValueError):
    """An observation (or its declared space) that does not match the spec; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int
    width: int
    channels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.channels


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    state_dim: int
    cameras: tuple[CameraSpec, ...] = ()
    """In alphabetical order of their names: the order of the ONNX inputs and the store's columns."""

    @property
    def has_images(self) -> bool:
        return bool(self.cameras)

    @property
    def image_bytes(self) -> int:
        """Bytes of one observation's images (all cameras)."""
        return sum(camera.frame_bytes for camera in self.cameras)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(camera.name for camera in self.cameras)

    @classmethod
    def from_space(cls, space: gym.Space) -> ObsSpec:
        """The spec a gymnasium observation space declares; an ObservationError says what is wrong with it."""
        if isinstance(space, gym.spaces.Box):
            if len(space.shape) != 1 or not np.issubdtype(space.dtype, np.floating):
                raise ObservationError(
                    f"a Box observation must be a flat float vector, got shape {space.shape} dtype {space.dtype}; "
                    f"declare images as a Dict: {{'{STATE_KEY}': Box(float32, (d,)), 'front': Box(uint8, (H, W, 3))}}")  # fmt: skip
            return cls(int(space.shape[0]))
        if not isinstance(space, gym.spaces.Dict):
            raise ObservationError(f"unsupported observation space {space}: use a float Box or a Dict of "
                                   f"'{STATE_KEY}' (float) and camera images (uint8)")  # fmt: skip
        if STATE_KEY not in space.spaces:
            raise ObservationError(f"a Dict observation needs a '{STATE_KEY}' part (a float vector; shape (0,) if the "
                                   f"robot has no state), got keys {sorted(space.spaces)}")  # fmt: skip
        state = space.spaces[STATE_KEY]
        if not (isinstance(state, gym.spaces.Box) and len(state.shape) == 1 and np.issubdtype(state.dtype, np.floating)):
            raise ObservationError(f"observation part '{STATE_KEY}' must be a flat float Box, got {state}")
        cameras = []
        for name in sorted(set(space.spaces) - {STATE_KEY}):
            part = space.spaces[name]
            if not (isinstance(part, gym.spaces.Box) and part.dtype == np.uint8 and len(part.shape) == 3
                    and part.shape[2] in IMAGE_CHANNELS and min(part.shape) > 0):  # fmt: skip
                raise ObservationError(f"observation part {name!r} must be a uint8 image Box (H, W, C) with C in "
                                       f"{IMAGE_CHANNELS}, got {part}; a float part belongs in '{STATE_KEY}'")  # fmt: skip
            cameras.append(CameraSpec(name, *map(int, part.shape)))
        return cls(int(state.shape[0]), tuple(cameras))

    def space(self) -> gym.Space:
        """The gymnasium space of this spec (a flat Box when there are no cameras)."""
        state = gym.spaces.Box(-np.inf, np.inf, (self.state_dim,), np.float32)
        if not self.cameras:
            return state
        return gym.spaces.Dict({STATE_KEY: state, **{c.name: gym.spaces.Box(0, 255, c.shape, np.uint8) for c in self.cameras}})

    def split(self, obs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(state float32, {camera: uint8 image}) of one observation, checked against the spec: a part that is
        missing, of the wrong shape or dtype, or a non-finite state raises ObservationError naming it."""
        if not self.cameras:
            state = np.asarray(obs)
            if isinstance(obs, Mapping) or state.shape != (self.state_dim,):
                raise ObservationError(f"observation: expected a float vector of shape ({self.state_dim},), "
                                       f"got {type(obs).__name__} {getattr(state, 'shape', '')}")  # fmt: skip
            images = {}
        else:
            if not isinstance(obs, Mapping):
                raise ObservationError(f"observation: expected a dict with '{STATE_KEY}' and cameras "
                                       f"{list(self.camera_names)}, got {type(obs).__name__}")  # fmt: skip
            missing = [k for k in (STATE_KEY, *self.camera_names) if k not in obs]
            if missing:
                raise ObservationError(f"observation lacks {missing}; it has {sorted(obs)}")
            state = np.asarray(obs[STATE_KEY])
            if state.shape != (self.state_dim,):
                raise ObservationError(f"observation '{STATE_KEY}': shape {state.shape}, expected ({self.state_dim},)")
            images = {}
            for camera in self.cameras:
                image = obs[camera.name]
                if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != camera.shape:
                    got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                    raise ObservationError(f"camera {camera.name!r}: got {got}, expected uint8 {camera.shape} "
                                           "(resize the frame to the declared size; keep it uint8)")  # fmt: skip
                images[camera.name] = image
        state = state.astype(np.float32, copy=False)
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"observation '{STATE_KEY}' is not finite: {state}")
        return state, images

    def to_dict(self) -> dict:
        """For metadata (ONNX, the store, Minari): {"state_dim": d, "cameras": {name: [H, W, C]}}."""
        return {"state_dim": self.state_dim, "cameras": {c.name: list(c.shape) for c in self.cameras}}

    @classmethod
    def from_dict(cls, data: Mapping) -> ObsSpec:
        cameras = data.get("cameras") or {}
        return cls(int(data["state_dim"]), tuple(CameraSpec(name, *map(int, cameras[name])) for name in sorted(cameras)))


def camera_parts(space: gym.Space) -> list[str]:
    """Names of a Dict space's uint8 image parts (H, W, C); [] for any other space."""
    if not isinstance(space, gym.spaces.Dict):
        return []
    return sorted(k for k, s in space.spaces.items()
                  if isinstance(s, gym.spaces.Box) and s.dtype == np.uint8 and len(s.shape) == 3)  # fmt: skip
