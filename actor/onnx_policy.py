"""The exported policy in onnxruntime: load, check against the task, act on one observation.

Convention (datasets/policy_format.py, written by learner/export_onnx.py): inputs ``obs`` [batch, obs_dim] (raw env
observation) and ``noise`` [batch, action_dim] (standard normal; zeros = the
deterministic action), output ``action`` [batch, action_dim] in env units.
A policy for a task with cameras takes one more input per camera between them (``input_names``):
the raw uint8 image [batch, H, W, C]; ``obs`` is then the state vector. Metadata strings describe
the task, the dimensions, the cameras and the bounds; a policy for another task, other dimensions
or other cameras is refused before it ever acts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from o2o.datasets.policy_format import FORMAT_VERSION, OUTPUT_NAMES, input_mismatch, input_names, session_options


class PolicyMismatch(ValueError):
    """An ONNX policy that does not fit this actor (other task, dimensions or convention)."""


@dataclasses.dataclass(frozen=True)
class PolicyExpectation:
    """What this actor accepts: its task's name and dimensions, and its env's cameras {name: (H, W, C)}
    (``obs_dim`` is then the state vector's size: envs/obs_spec.py)."""

    task: str
    obs_dim: int
    action_dim: int
    cameras: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``device``: "cpu", "cuda" (error if unavailable) or "auto"."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise ValueError(
                f"policy.device=cuda but onnxruntime offers only {available}: install onnxruntime-gpu "
                "(in place of onnxruntime) or use policy.device=cpu"
            )
        return ["CPUExecutionProvider"]
    raise ValueError(f"unknown policy device {device!r}: expected 'cpu', 'cuda' or 'auto'")


def _meta_int(meta: dict[str, str], key: str, source: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise PolicyMismatch(f"{source}: metadata {key!r} is missing or not an integer ({meta.get(key)!r})") from None


def _meta_cameras(meta: dict[str, str], source: str) -> dict[str, tuple[int, int, int]]:
    """The ``cameras`` metadata {name: (H, W, C)}, in the inputs' (alphabetical) order; a policy
    exported before cameras existed has no such key: no cameras."""
    try:
        cameras = json.loads(meta.get("cameras", "{}"))
        shapes = {str(name): tuple(int(d) for d in cameras[name]) for name in sorted(cameras)}
    except (ValueError, TypeError, AttributeError):
        shapes = None
    if shapes is None or any(len(shape) != 3 or min(shape) <= 0 for shape in shapes.values()):
        raise PolicyMismatch(f"{source}: metadata 'cameras' is {meta.get('cameras')!r}, expected JSON "
                             "{name: [H, W, C]} with positive sizes")  # fmt: skip
    return shapes


class OnnxPolicy:
    """One ONNX policy session; ``act`` runs it on one observation with reused input buffers.

    ``version`` is the learner's policy version (the publisher's number, which
    wins over the file's metadata); ``-1`` is not allowed for a real policy.
    Not thread-safe: one control loop calls ``act``.
    """

    def __init__(
        self,
        onnx: bytes | str | os.PathLike,
        expect: PolicyExpectation | None = None,
        *,
        version: int | None = None,
        threads: int = 1,
        device: str = "cpu",
    ):
        source = f"policy {onnx}" if not isinstance(onnx, bytes) else f"policy version {version}"
        model = onnx if isinstance(onnx, bytes) else os.fspath(onnx)
        try:
            self.session = ort.InferenceSession(model, session_options(threads), providers=providers_for(device))
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
            raise PolicyMismatch(f"{source}: onnxruntime cannot load it: {err}") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        meta = self.metadata
        if meta.get("o2o_format_version") != FORMAT_VERSION:
            raise PolicyMismatch(
                f"{source}: o2o_format_version is {meta.get('o2o_format_version')!r}, this actor speaks "
                f"{FORMAT_VERSION!r} (was it exported by o2o-export?)"
            )
        self.cameras = _meta_cameras(meta, source)
        names = input_names(tuple(self.cameras))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if tuple(inputs) != names or tuple(outputs) != OUTPUT_NAMES:
            raise PolicyMismatch(f"{source}: graph has inputs {inputs} / outputs {outputs}, expected {list(names)} / "
                                 f"{list(OUTPUT_NAMES)} (its metadata declares the cameras {list(self.cameras)})")  # fmt: skip
        self.task = meta.get("task", "")
        self.obs_dim = _meta_int(meta, "obs_dim", source)
        self.action_dim = _meta_int(meta, "action_dim", source)
        expected = {"obs": ("tensor(float)", (self.obs_dim,)), "noise": ("tensor(float)", (self.action_dim,)),
                    **{name: ("tensor(uint8)", shape) for name, shape in self.cameras.items()}}  # fmt: skip
        why = input_mismatch(self.session, expected)
        if why is not None:
            raise PolicyMismatch(f"{source}: {why}")
        self.version = _meta_int(meta, "policy_version", source) if version is None else int(version)
        self.training_step = int(meta.get("training_step", "0") or 0)
        self.action_low = np.asarray(json.loads(meta.get("action_low", "null")) or [-np.inf] * self.action_dim, np.float32)
        self.action_high = np.asarray(json.loads(meta.get("action_high", "null")) or [np.inf] * self.action_dim, np.float32)
        if expect is not None:
            wrong = []
            if self.task != expect.task:
                wrong.append(f"task {self.task!r} (actor: {expect.task!r})")
            if (self.obs_dim, self.action_dim) != (expect.obs_dim, expect.action_dim):
                wrong.append(
                    f"obs_dim={self.obs_dim}, action_dim={self.action_dim} "
                    f"(actor: obs_dim={expect.obs_dim}, action_dim={expect.action_dim})"
                )
            wrong += _camera_mismatch(self.cameras, dict(expect.cameras))
            if wrong:
                raise PolicyMismatch(f"{source} does not fit this actor: " + "; ".join(wrong))
        self.received_at: float | None = None  # unix times, set by the PolicyBuilder of a received policy
        self.built_at: float | None = None
        # Pre-allocated inputs: act() copies into them, so no per-step allocation but the output.
        self._obs = np.zeros((1, self.obs_dim), np.float32)
        self._noise = np.zeros((1, self.action_dim), np.float32)
        # One uint8 buffer per camera, (1, H, W, C): act() copies each image in once.
        self._images = {name: np.zeros((1, *shape), np.uint8) for name, shape in self.cameras.items()}
        self._image_items = tuple(self._images.items())
        self._feed = {"obs": self._obs, **self._images, "noise": self._noise}
        self._action = np.zeros((1, self.action_dim), np.float32)
        self._binding = None
        if self.session.get_providers() == ["CPUExecutionProvider"]:
            # Inputs and output bound once to these buffers: run() would convert the feed dict and
            # allocate the output on every call, which costs as much as the 256x2 MLP itself.
            self._binding = self.session.io_binding()
            self._binding.bind_cpu_input("obs", self._obs)
            self._binding.bind_cpu_input("noise", self._noise)
            for name, image in self._image_items:
                self._binding.bind_cpu_input(name, image)
            self._binding.bind_output("action", "cpu", 0, np.float32, list(self._action.shape), self._action.ctypes.data)

    def act(self, obs: np.ndarray, noise: np.ndarray | None = None,
            images: Mapping[str, np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
        """Action (action_dim,) float32 for one observation; ``noise`` None or zeros = deterministic.

        ``obs`` is the state vector; a policy with cameras also takes ``images`` {camera: uint8 (H, W, C)}
        (the split observation, ``ObsSpec.split``), a state-only one ignores them."""
        self._obs[0] = obs
        if self._image_items:
            if images is None:
                raise ValueError(f"this policy takes the cameras {list(self.cameras)}: pass act(obs, noise, images)")
            for name, buffer in self._image_items:
                buffer[0] = images[name]
        if noise is None:
            self._noise.fill(0.0)
        else:
            self._noise[0] = noise
        if self._binding is None:
            return self.session.run(OUTPUT_NAMES, self._feed)[0][0]
        self.session.run_with_iobinding(self._binding)
        return self._action[0].copy()

    def __repr__(self) -> str:
        cameras = f", cameras={self.cameras}" if self.cameras else ""
        return (f"OnnxPolicy(task={self.task!r}, version={self.version}, obs_dim={self.obs_dim}, "
                f"action_dim={self.action_dim}{cameras})")  # fmt: skip


def _camera_mismatch(policy: dict[str, tuple], env: dict[str, tuple]) -> list[str]:
    """What differs between the policy's cameras and the env's, each camera named with both shapes."""
    if list(policy) != sorted(env):
        return [f"cameras {list(policy)} (actor env: {sorted(env)})"]
    return [f"camera {name!r} is {list(shape)} (actor env: {list(env[name])})"
            for name, shape in policy.items() if tuple(shape) != tuple(env[name])]  # fmt: skip


class Exploration:
    """Exploration noise for the policy's ``noise`` input: ``scale * N(0, I)`` from a seeded generator.

    ``scale = 1`` samples the training policy pi(a|s), ``0`` gives the
    deterministic action (and draws nothing, so it costs nothing).
    """

    def __init__(self, action_dim: int, scale: float = 1.0, seed: int | np.random.SeedSequence | None = 0):
        if not scale >= 0.0:
            raise ValueError(f"exploration noise scale must be >= 0, got {scale}")
        self.scale = float(scale)
        self.rng = np.random.default_rng(seed)
        self._noise = np.zeros(action_dim, np.float32)
        self._zeros = np.zeros(action_dim, np.float32)

    def draw(self, scale: float | None = None) -> np.ndarray:
        """Noise for one step (a reused buffer: use it before the next draw)."""
        scale = self.scale if scale is None else scale
        if scale == 0.0:
            return self._zeros
        self.rng.standard_normal(out=self._noise, dtype=np.float32)
        if scale != 1.0:
            self._noise *= scale
        return self._noise
