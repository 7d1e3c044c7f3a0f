"""The exported policy in onnxruntime: load, check against the task, act on one observation.

Convention (datasets/policy_format.py, written by learner/export_onnx.py): inputs ``obs`` [batch, obs_dim] (raw env
observation) and ``noise`` [batch, action_dim] (standard normal; zeros = the
deterministic action), output ``action`` [batch, action_dim] in env units.
Metadata strings describe the task, the dimensions and the bounds; a policy
for another task or other dimensions is refused before it ever acts.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnxruntime as ort

from o2o.datasets.policy_format import FORMAT_VERSION, INPUT_NAMES, OUTPUT_NAMES


class PolicyMismatch(ValueError):
    """An ONNX policy that does not fit this actor (other task, dimensions or convention)."""


@dataclasses.dataclass(frozen=True)
class PolicyExpectation:
    """What this actor accepts: its task's name and dimensions."""

    task: str
    obs_dim: int
    action_dim: int


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # One thread, no spinning: a 256x2 MLP on one observation is ~10 us of math, and
    # thread hand-offs or spinning workers would cost more than they save (and steal
    # the core that steps the env).
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


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
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if tuple(inputs) != INPUT_NAMES or tuple(outputs) != OUTPUT_NAMES:
            raise PolicyMismatch(f"{source}: graph has inputs {inputs} / outputs {outputs}, expected {INPUT_NAMES} / {OUTPUT_NAMES}")
        self.task = meta.get("task", "")
        self.obs_dim = _meta_int(meta, "obs_dim", source)
        self.action_dim = _meta_int(meta, "action_dim", source)
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
            if wrong:
                raise PolicyMismatch(f"{source} does not fit this actor: " + "; ".join(wrong))
        self.received_at: float | None = None  # unix times, set by the PolicyBuilder of a received policy
        self.built_at: float | None = None
        # Pre-allocated inputs: act() copies into them, so no per-step allocation but the output.
        self._obs = np.zeros((1, self.obs_dim), np.float32)
        self._noise = np.zeros((1, self.action_dim), np.float32)
        self._feed = {"obs": self._obs, "noise": self._noise}
        self._action = np.zeros((1, self.action_dim), np.float32)
        self._binding = None
        if self.session.get_providers() == ["CPUExecutionProvider"]:
            # Inputs and output bound once to these buffers: run() would convert the feed dict and
            # allocate the output on every call, which costs as much as the 256x2 MLP itself.
            self._binding = self.session.io_binding()
            self._binding.bind_cpu_input("obs", self._obs)
            self._binding.bind_cpu_input("noise", self._noise)
            self._binding.bind_output("action", "cpu", 0, np.float32, list(self._action.shape), self._action.ctypes.data)

    def act(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Action (action_dim,) float32 for one observation; ``noise`` None or zeros = deterministic."""
        self._obs[0] = obs
        if noise is None:
            self._noise.fill(0.0)
        else:
            self._noise[0] = noise
        if self._binding is None:
            return self.session.run(OUTPUT_NAMES, self._feed)[0][0]
        self.session.run_with_iobinding(self._binding)
        return self._action[0].copy()

    def __repr__(self) -> str:
        return f"OnnxPolicy(task={self.task!r}, version={self.version}, obs_dim={self.obs_dim}, action_dim={self.action_dim})"


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
