"""Export the Cal-QL policy to ONNX for the actors (which run it with onnxruntime, without torch).

The graph
---------
Inputs (dynamic batch axis ``batch``), ``policy_format.input_names(cameras)`` in order:

- ``obs``   float32 ``[batch, obs_dim]``: raw environment observations (a camera
  task's state vector). The observation normaliser ``(obs - mean) / std`` is baked in.
- ``<camera>`` uint8 ``[batch, H, W, C]``, one per camera of a camera task, in the
  spec's (alphabetical) order: the raw image. Its scaling (``/ 255 - 0.5``) and the
  agent's encoder (learner/pixel_encoder.py) are in the graph; the encoder's
  features, then the normalised state, feed the policy.
- ``noise`` float32 ``[batch, action_dim]``: exploration noise in the policy's
  pre-tanh space, drawn by the actor.

Output (float32):

- ``action`` ``[batch, action_dim]``, in environment units::

      action = low + (tanh(mean(obs) + std(obs) * noise) + 1) / 2 * (high - low)

  always inside ``[action_low, action_high]``.

Exploration convention: the graph holds no random op, so onnxruntime stays
deterministic. The actor draws ``noise = temperature * N(0, I)`` from its own
seeded generator (``numpy.random.default_rng(seed).standard_normal(...)``):
``temperature = 1`` samples exactly the training policy pi(a|s); ``0`` (noise of
zeros) gives the deterministic action ``tanh(mean)``, used for evaluation.

Metadata
--------
Every value is a string in the model's ``metadata_props``; an actor reads them
without torch as ``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map``
and checks them against its task before acting:

=========================  ==============================================================
``o2o_format_version``     ``"1"``: this input/output/noise convention
``task``                   task name, e.g. ``"pointmaze-umaze"``
``obs_dim``                decimal integer
``action_dim``             decimal integer
``action_low``             JSON list of floats (length ``action_dim``)
``action_high``            JSON list of floats (length ``action_dim``)
``policy_version``         decimal integer, the learner's policy version (0 = pretrained)
``training_step``          decimal integer, gradient steps behind these weights
``input_names``            JSON list: ``["obs", "noise"]`` (``["obs", <cameras>..., "noise"]``)
``output_names``           JSON list: ``["action"]``
``noise``                  ``"standard_normal"``: noise ~ N(0, I), times a temperature
``cameras``                JSON ``{name: [H, W, C]}``; ``"{}"`` for a state task
=========================  ==============================================================

Exporter: the torch.export-based ("dynamo") exporter, torch's default and
supported path: it gives an 18-node graph (Sub, Div, 3 x Gemm/Relu, Split,
Clip, Exp, Tanh, affine rescale; the log-prob is pruned) with a named dynamic
batch axis (a camera task's adds Transpose, Cast, the scaling, 4 x Conv/Relu, Gemm, LayerNormalization,
Tanh and Concat per camera). On a 2-core CPU it takes 1-2 s per export (the first one in a
process ~10 s, importing its machinery). ``exporter="torchscript"`` (the
deprecated TorchScript exporter plus the onnxscript optimiser: an equivalent
19-node graph, Slice x 2 in place of Split) takes ~0.2 s, for callers that
export often; it may disappear in a later torch.

CLI: ``o2o-export CHECKPOINT [--out PATH]`` writes ``policy.onnx`` beside the
checkpoint (a file, or a run folder holding ``checkpoint.pt``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from o2o.datasets.atomic_file import replacing
from o2o.datasets.policy_format import FORMAT_VERSION, NOISE, OUTPUT_NAMES, POLICY_FILENAME, input_names
from o2o.envs.obs_spec import ObsSpec

from .calql import CalQLAgent
from .checkpoint import AgentSpec, action_bounds, load_checkpoint, resolve_checkpoint
from .networks import ObservationNormalizer, TanhGaussianPolicy
from .pixel_encoder import ObsEncoder

OPSET = 18
PARITY_TOLERANCE = 1e-5
"""Largest |onnxruntime - torch| accepted, in units of each action's half range (the policy's [-1, 1] before
rescaling): a joint goal in degrees (arm-reach: up to 150) carries float32 rounding of ~1e-5 per unit."""

Exporter = Literal["dynamo", "torchscript"]
log = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """The exported graph does not load in onnxruntime or does not match torch."""


def _raw_module(module: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (exporters need the eager one)."""
    return getattr(module, "_orig_mod", module)


class ExportablePolicy(nn.Module):
    """obs, [camera images], noise -> action in env units: normaliser (+ encoder) + tanh-Gaussian policy +
    rescale to [low, high]. ``encoder`` (camera tasks): the agent's ``ObsEncoder``, which takes the raw uint8
    images, scales them and puts the normalised state after its features, all inside the graph."""

    def __init__(
        self,
        normalizer: ObservationNormalizer,
        policy: TanhGaussianPolicy,
        action_low,
        action_high,
        encoder: ObsEncoder | None = None,
    ):
        super().__init__()
        self.normalizer = _raw_module(normalizer)
        self.policy = _raw_module(policy)
        self.encoder = None if encoder is None else _raw_module(encoder)
        self.cameras: tuple[str, ...] = () if encoder is None else tuple(self.encoder.pixels.names)
        low = torch.as_tensor(np.asarray(action_low, np.float32))
        high = torch.as_tensor(np.asarray(action_high, np.float32))
        self.register_buffer("action_low", low)
        self.register_buffer("action_range", high - low)

    def forward(self, obs: torch.Tensor, *images_and_noise: torch.Tensor) -> torch.Tensor:
        """``input_names(cameras)`` in order: obs, one uint8 [B, H, W, C] tensor per camera, noise."""
        *images, noise = images_and_noise
        features = self.normalizer(obs)
        if self.encoder is not None:
            features = self.encoder(features, dict(zip(self.cameras, images, strict=True)))
        squashed, _ = self.policy.action_from_noise(features, noise)
        return self.action_low + (squashed + 1.0) * 0.5 * self.action_range

    @classmethod
    def from_agent(cls, agent: CalQLAgent, spec: AgentSpec) -> "ExportablePolicy":
        """A CPU, eval-mode copy: exporting never moves or touches the training modules."""
        low, high = action_bounds(spec)
        normalizer = copy.deepcopy(_raw_module(agent.normalizer))
        policy = copy.deepcopy(_raw_module(agent.policy))
        encoder = None if agent.encoder is None else copy.deepcopy(_raw_module(agent.encoder))
        module = cls(normalizer, policy, low, high, encoder)
        return module.to("cpu").eval().requires_grad_(False)


def session_providers() -> list[str]:
    """onnxruntime providers: CUDA first where the installed onnxruntime(-gpu) offers it, then CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def policy_metadata(spec: AgentSpec, version: int, step: int) -> dict[str, str]:
    low, high = action_bounds(spec)
    return {
        "o2o_format_version": FORMAT_VERSION,
        "task": spec.task,
        "obs_dim": str(int(spec.obs_dim)),
        "action_dim": str(int(spec.action_dim)),
        "action_low": json.dumps([float(x) for x in low]),
        "action_high": json.dumps([float(x) for x in high]),
        "policy_version": str(int(version)),
        "training_step": str(int(step)),
        "input_names": json.dumps(list(input_names(spec.obs_spec.camera_names))),
        "output_names": json.dumps(list(OUTPUT_NAMES)),
        "noise": NOISE,
        "cameras": json.dumps(spec.obs_spec.to_dict()["cameras"]),
    }


def _check_spec(agent: CalQLAgent, spec: AgentSpec) -> None:
    low, high = action_bounds(spec)
    if (agent.obs_dim, agent.action_dim) != (spec.obs_dim, spec.action_dim):
        raise ValueError(
            f"agent is ({agent.obs_dim} obs, {agent.action_dim} action) dims but the spec of task "
            f"{spec.task!r} says ({spec.obs_dim}, {spec.action_dim}): export with the agent's own spec"
        )
    if agent.obs_spec != spec.obs_spec:
        raise ValueError(f"agent's cameras {agent.obs_spec.to_dict()['cameras']} differ from the spec of task "
                         f"{spec.task!r}, {spec.cameras}: export with the agent's own spec")  # fmt: skip
    if low.shape != (spec.action_dim,) or high.shape != (spec.action_dim,):
        raise ValueError(f"action bounds must have {spec.action_dim} entries, got low {low.shape} high {high.shape}")
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low < high)):
        raise ValueError(f"action bounds must be finite with low < high, got low={low.tolist()} high={high.tolist()}")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' warnings (deprecations, skipped torchvision ops); the parity check is the guard."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _example_inputs(spec: ObsSpec, action_dim: int, n: int, generator: torch.Generator | None = None) -> list:
    """Inputs in ``input_names`` order: standard-normal state and noise and random uint8 images, or
    zeros without ``generator``."""
    if generator is None:
        return [torch.zeros(n, spec.state_dim), *(torch.zeros(n, *c.shape, dtype=torch.uint8) for c in spec.cameras),
                torch.zeros(n, action_dim)]  # fmt: skip
    state = torch.randn(n, spec.state_dim, generator=generator)
    images = [torch.randint(0, 256, (n, *c.shape), generator=generator, dtype=torch.uint8) for c in spec.cameras]
    return [state, *images, torch.randn(n, action_dim, generator=generator)]


def _to_onnx(module: ExportablePolicy, spec: ObsSpec, action_dim: int, exporter: Exporter):
    import onnx

    names = list(input_names(spec.camera_names))
    example = tuple(_example_inputs(spec, action_dim, 2))
    with _quiet_exporter(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            # forward(obs, *images_and_noise): torch.export takes the varargs' shapes as one tuple.
            dynamic = {"obs": {0: batch}, "images_and_noise": tuple({0: batch} for _ in names[1:])}
            program = torch.onnx.export(
                module,
                example,
                None,
                dynamo=True,
                input_names=names,
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
            )
            model = program.model_proto
        elif exporter == "torchscript":
            import onnxscript.optimizer

            buffer = io.BytesIO()
            torch.onnx.export(
                module,
                example,
                buffer,
                dynamo=False,
                input_names=names,
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (*names, *OUTPUT_NAMES)},
                opset_version=OPSET,
            )
            # Folds the Shape/Gather/Slice arithmetic the TorchScript exporter emits for chunk().
            model = onnxscript.optimizer.optimize(onnx.load_from_string(buffer.getvalue()))
        else:
            raise ValueError(f"unknown exporter {exporter!r}: expected 'dynamo' or 'torchscript'")
    return model


def _parity_error(path: Path, module: ExportablePolicy, spec: ObsSpec, action_dim: int) -> float:
    """Max |onnxruntime - torch| / the action's half range on a seeded batch (half zero noise, half N(0, I);
    random uint8 images), at batch sizes 1 and 64."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxExportError(f"onnxruntime cannot load the exported policy: {exc}") from exc
    expected_names = list(input_names(spec.camera_names))
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (expected_names, list(OUTPUT_NAMES)):
        raise OnnxExportError(f"exported graph has inputs/outputs {names}, expected {expected_names} / {OUTPUT_NAMES}")

    n = 64
    inputs = _example_inputs(spec, action_dim, n, torch.Generator().manual_seed(0))
    # Observations around the normaliser's statistics, so the check covers the data's range.
    inputs[0] = module.normalizer.mean + module.normalizer.std * inputs[0]
    inputs[-1][: n // 2] = 0.0
    worst = 0.0
    for rows in (slice(0, 1), slice(0, n)):
        batch = [x[rows].contiguous() for x in inputs]
        with torch.no_grad():
            expected = module(*batch).numpy()
        (got,) = session.run(None, {name: x.numpy() for name, x in zip(expected_names, batch, strict=True)})
        if got.shape != expected.shape or got.dtype != np.float32:
            raise OnnxExportError(f"onnxruntime gave {got.dtype}{got.shape}, torch float32{expected.shape}")
        if not (np.all(np.isfinite(expected)) and np.all(np.isfinite(got))):
            raise OnnxExportError("the policy gives non-finite actions (NaN/inf weights?); refusing to export it")
        half_range = np.maximum(module.action_range.numpy() / 2.0, 1e-6)
        worst = max(worst, float(np.max(np.abs(got - expected) / half_range)))
    if not worst <= PARITY_TOLERANCE:
        raise OnnxExportError(f"onnxruntime differs from torch by {worst:.3g} > {PARITY_TOLERANCE:g}")
    return worst


def export_policy_verified(
    agent: CalQLAgent,
    spec: AgentSpec,
    path: str | os.PathLike,
    *,
    version: int = 0,
    step: int = 0,
    exporter: Exporter = "dynamo",
) -> tuple[Path, float]:
    """:func:`export_policy`, also returning the max |onnxruntime - torch| it measured."""
    import onnx

    _check_spec(agent, spec)
    path = Path(path)
    module = ExportablePolicy.from_agent(agent, spec)
    model = _to_onnx(module, spec.obs_spec, spec.action_dim, exporter)
    onnx.helper.set_model_props(model, policy_metadata(spec, version, step))
    onnx.checker.check_model(model)

    # Written to a temporary file beside the target and checked there: a reader of
    # ``path`` sees the old policy or the new, verified one, never a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, fsync=True) as tmp:
        tmp.write_bytes(model.SerializeToString())
        error = _parity_error(tmp, module, spec.obs_spec, spec.action_dim)
    log.info("exported %s (version %d, step %d); max |onnxruntime - torch| = %.3g", path, version, step, error)
    return path, error


def export_policy(
    agent: CalQLAgent,
    spec: AgentSpec,
    path: str | os.PathLike,
    *,
    version: int = 0,
    step: int = 0,
    exporter: Exporter = "dynamo",
) -> Path:
    """Write ``agent``'s policy to ``path`` as ONNX (atomically), verified against torch.

    Raises :class:`OnnxExportError` when onnxruntime cannot load the graph, or its
    actions differ from torch's by more than ``PARITY_TOLERANCE``, or are not finite;
    the file at ``path`` is then left as it was.
    """
    return export_policy_verified(agent, spec, path, version=version, step=step, exporter=exporter)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="o2o-export",
        description="Export a checkpoint's policy to ONNX (normalisation and action rescaling baked in).",
    )
    parser.add_argument("checkpoint", help="checkpoint file, or a run folder holding checkpoint.pt")
    parser.add_argument("--out", help=f"where to write the ONNX file (default: {POLICY_FILENAME} beside the checkpoint)")
    parser.add_argument("--policy-version", type=int, default=0, help="policy version stored in the metadata")
    parser.add_argument(
        "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="torch ONNX exporter to use"
    )
    args = parser.parse_args(argv)

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        print(f"o2o-export: error: {exc}", file=sys.stderr)
        return 2
    try:
        agent, spec, payload = load_checkpoint(checkpoint)
    except Exception as exc:  # torch.load / state-dict errors come in many types
        print(
            f"o2o-export: error: cannot read checkpoint {checkpoint} ({type(exc).__name__}: {exc}); "
            "is it a complete checkpoint written by o2o's save_checkpoint?",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out) if args.out else checkpoint.parent / POLICY_FILENAME
    step = int(payload.get("step", 0))
    try:
        out, error = export_policy_verified(
            agent, spec, out, version=args.policy_version, step=step, exporter=args.exporter
        )
    except (OnnxExportError, ValueError) as exc:
        print(f"o2o-export: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    print(f"task {spec.task}, step {step}, policy version {args.policy_version}; max |onnxruntime - torch| = {error:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
