"""The ONNX policy contract between the learner's exporter and the actors (no torch here).

The learner writes it (``learner/export_onnx.py``), actors check and run it
(``actor/onnx_policy.py``): inputs ``obs`` [batch, obs_dim] (the raw env observation)
and ``noise`` [batch, action_dim] (standard normal times a temperature; zeros give the
deterministic action), output ``action`` [batch, action_dim] in env units; string
metadata ``METADATA_KEYS`` describe the task, dimensions, bounds and version.

A task with cameras (envs/obs_spec.py) adds one input per camera between them, in the spec's
(alphabetical) order: ``obs`` is then the state vector [batch, state_dim] and ``<camera>`` the raw
uint8 image [batch, H, W, C] (scaling and the encoder are in the graph); the ``cameras`` metadata
is the JSON ``{name: [H, W, C]}`` (``{}`` for a state task), ``input_names`` lists the inputs.
"""

from __future__ import annotations

FORMAT_VERSION = "1"
"""``o2o_format_version`` metadata: this input/output/noise convention."""
INPUT_NAMES = ("obs", "noise")
OUTPUT_NAMES = ("action",)


def input_names(cameras: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The graph's inputs for a task with these cameras (INPUT_NAMES without)."""
    return (INPUT_NAMES[0], *cameras, INPUT_NAMES[1])

NOISE = "standard_normal"
"""``noise`` metadata: noise ~ N(0, I), times a temperature."""
METADATA_KEYS = ("o2o_format_version", "task", "obs_dim", "action_dim", "action_low", "action_high",
                 "policy_version", "training_step", "input_names", "output_names", "noise", "cameras")  # fmt: skip
POLICY_FILENAME = "policy.onnx"


def session_options(threads: int):
    """onnxruntime's options for one observation at a time (a policy in the actor, a success classifier)."""
    import onnxruntime as ort  # lazily: the learner's side of this module needs no onnxruntime

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


def input_mismatch(session, expected: dict[str, tuple[str, tuple]]) -> str | None:
    """Why an onnxruntime session's inputs differ from ``expected`` ({name: (element type, sizes beyond the batch
    axis)}; a symbolic size takes any), said for the first that does; None when they all fit."""
    for node in session.get_inputs():
        kind, sizes = expected[node.name]
        shape = node.shape or []
        fits = len(shape) == 1 + len(sizes) and all(not isinstance(d, int) or d == s for d, s in zip(shape[1:], sizes))
        if node.type != kind or not fits:
            return (f"graph input {node.name!r} is {node.type} {shape}, the metadata declares {kind} "
                    f"[batch, {', '.join(map(str, sizes))}]")  # fmt: skip
    return None
