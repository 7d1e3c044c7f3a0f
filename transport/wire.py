"""The actor <-> learner wire format (version 1): msgpack header + raw array frames.

No pickle: a message is a ZeroMQ multipart message whose frame 0 is a msgpack
map ``{"v": 1, "type": ..., ...}`` and whose other frames are raw bytes
(C-contiguous little-endian arrays for ``chunk``, the ONNX file for ``policy``).

Messages (-> is the direction):

``chunk``   actor -> learner. Transitions of one actor. Header: ``actor_id`` (str),
            ``seq`` (int, per actor, starts at 0, +1 per chunk), ``policy_version``
            (int, -1 = no learner policy yet, e.g. scripted/random warm-up),
            ``episode_id`` (int), ``step`` (episode step of row 0), ``n`` (rows),
            ``eval`` (bool) and ``arrays``: ``[[name, dtype, shape], ...]`` describing
            the 7 frames that follow, in this order: obs (n, obs_dim) <f4,
            action (n, action_dim) <f4, reward (n,) <f4 (the raw env reward),
            next_obs (n, obs_dim) <f4, terminated (n,) |u1, truncated (n,) |u1,
            success (n,) |u1; then intervention (n,) |u1 only when a row's executed action was
            the operator's (HIL-SERL; absent = all 0, so older actors' chunks still decode).
            A chunk may span episodes: the rows after a terminated/truncated row belong to
            episode ``episode_id + 1``, from step 0.
            A task with cameras adds one frame per camera, in the order of their names:
            ``frames/<camera>`` (F, H, W, C) |u1, its images in the segment layout of
            ``datasets/rows.py`` (F = ``frame_layout(terminated, truncated)``'s count; obs
            and next_obs then hold the state vector, obs_dim its size, maybe 0).
``ack``     learner -> actor. ``actor_id``, ``seq``: cumulative, every chunk of this
            actor with a seq <= ``seq`` is committed to the replay store (or was
            rejected); drop them from the spool. ``policy_version``: the newest published.
            ``hold`` (optional, default false): the learner's samples-per-insert limiter
            asks the actor to stop collecting at its next episode boundary until an
            ack with ``hold`` false arrives (the fleet is ahead of the learner).
            ``run_id`` (optional, default ""): the learner run that published that version.
``reject``  learner -> actor. ``actor_id``, ``seq`` (-1 if the header was unreadable),
            ``reason`` (a stable code, see ``REASONS``), ``message``. The chunk will
            never be accepted: drop it from the spool and count it.
``resend``  learner -> actor. ``actor_id``, ``seq``: the learner dropped a chunk that
            arrived before the chunks preceding it (e.g. queued messages delivered
            after a learner restart); resend every spooled chunk from ``seq`` on.
``hello``   actor -> learner, at connect (and to ask for the current policy again).
            ``actor_id``, ``task``, ``obs_dim``, ``action_dim``, ``next_seq`` (the
            oldest seq the actor still holds or will send next: seqs below it that
            the learner lacks are declared lost), ``policy_version`` (held, -1 = none),
            ``policy_run`` (optional: the learner run id of the held policy, "" = none or
            a file), ``instance`` (optional: a random id of this actor process; a second
            live connection with the same ``actor_id`` and another instance is refused),
            ``cameras`` (optional, absent = none: ``{name: [H, W, C]}`` of the actor's images).
``welcome`` learner -> actor, answer to ``hello``. ``actor_id``, ``seq`` (the actor's
            highest committed seq, -1 = none: continue after it, resend what is
            spooled above it), ``policy_version`` (newest published, -1 = none),
            ``accepted_seq``, ``hold`` and ``run_id`` (optional).
``policy``  learner -> actors. ``version``, ``sha256`` (hex), ``size`` + one frame
            holding the ONNX bytes; ``run_id`` (optional, default "").
``status``  actor -> learner, about once a second once welcomed (``link.status_s``): what the actor
            does now, for ``o2o-status``. ``actor_id``, ``state`` (``status_msg.STATES``),
            ``waiting_for`` (str of <= 200 chars, or nil), ``steps``, ``steps_per_s``, ``episodes``,
            ``successes``, ``interventions``, ``policy_version``, ``spool_depth``: see ``status_msg.py``.

Policy versions count up within one learner run (a resumed run continues its count);
``run_id`` names the run. An actor takes a policy whose ``run_id`` differs from the one
it holds whatever its version (a fresh learner starts again at 1), and otherwise only a
higher version: see ``is_newer_policy``.

Header ints are checked against the columns that store them: ``seq`` and
``episode_id`` are int64 (up to 2**62 here), ``policy_version`` and ``step`` int32.

Every decoder checks every field and raises ``WireError(reason, message)`` with a
stable reason code, so receivers can count rejections by reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any, Union

import msgpack
import numpy as np

# The row schema (names, order, TransitionChunk) is datasets/rows.py: one for wire, store and buffer.
from o2o.datasets.rows import (
    ARRAY_NAMES, FLAG_ARRAYS, FLOAT_ARRAYS, INTERVENTION, MAX_INT32, TransitionChunk, frame_key, frame_layout,
)  # fmt: skip

# The size limits and ChunkSpec (what a receiver accepts of a task) are transport/limits.py.
from .limits import (  # noqa: F401 (re-exported: wire.ChunkSpec, wire.MAX_POLICY_BYTES, ...)
    MAX_ACTOR_ID_LEN, MAX_CAMERAS, MAX_CHUNK_FRAME_BYTES, MAX_HEADER_BYTES, MAX_IMAGE_SIDE, MAX_POLICY_BYTES,
    MAX_ROWS, MAX_RUN_ID_LEN, ChunkSpec, lists_intervention,
)  # fmt: skip
from .status_msg import Status, check_status

WIRE_VERSION = 1

# The rejection reason codes and WireError are transport/wire_errors.py (re-exported: wire.BAD_HEADER, ...).
from .wire_errors import (  # noqa: F401
    ACTOR_ID_IN_USE, BAD_CHECKSUM, BAD_DTYPE, BAD_FRAMES, BAD_HEADER, BAD_LENGTH, BAD_SHAPE, BAD_SPEC, BAD_TYPE,
    BAD_VALUE, BAD_VERSION, KEY_REFUSED, NON_FINITE, NOT_WELCOMED, RATE_LIMITED, REASONS, TOO_LARGE,
    TOO_MANY_ACTORS, WireError,
)  # fmt: skip

# A frame as sent or received: bytes, a memoryview (zero-copy send) or a zmq.Frame.
Frame = Any


@dataclasses.dataclass(frozen=True)
class Ack:
    actor_id: str
    seq: int
    policy_version: int = -1
    hold: bool = False
    run_id: str = ""


@dataclasses.dataclass(frozen=True)
class Reject:
    actor_id: str
    seq: int
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Resend:
    actor_id: str
    seq: int


@dataclasses.dataclass(frozen=True)
class Hello:
    actor_id: str
    task: str
    obs_dim: int
    action_dim: int
    next_seq: int
    policy_version: int = -1
    policy_run: str = ""
    """Learner run id of the held policy ("" = none, or a policy file)."""
    instance: str = ""
    """Random id of this actor process (a reconnect of the same process keeps it)."""
    cameras: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """{camera: [H, W, C]} of the actor's observation ({} = state only)."""


@dataclasses.dataclass(frozen=True)
class Welcome:
    actor_id: str
    seq: int
    policy_version: int = -1
    accepted_seq: int = -1
    """Highest seq accepted (maybe not yet committed): a restarted actor that lost its
    spool continues above it, so its new chunks are not taken for duplicates."""
    hold: bool = False
    """The learner's flow control, as on acks."""
    run_id: str = ""
    """The learner run (policy versions count within a run)."""


@dataclasses.dataclass(frozen=True)
class Policy:
    version: int
    sha256: str
    onnx: bytes | memoryview
    run_id: str = ""

    @property
    def size(self) -> int:
        return len(self.onnx)


def is_newer_policy(run_id: str, version: int, held_run: str, held_version: int) -> bool:
    """Should an actor holding ``(held_run, held_version)`` take ``(run_id, version)``?

    Another learner run's policy always (its versions count from 1 again); within a run,
    only a higher version.
    """
    if version < 0:
        return False
    return run_id != held_run or version > held_version


Message = Union[TransitionChunk, Ack, Reject, Resend, Hello, Welcome, Policy, Status]


# ---------------------------------------------------------------- header helpers


def _pack(header: dict) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, **header}, use_bin_type=True)


def _buffer(frame: Frame) -> memoryview:
    """A flat byte view of a frame without copying (zmq.Frame exposes ``.buffer``)."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")


def decode_header(frame: Frame) -> dict:
    """Frame 0 of any message: a msgpack map with a supported ``v`` and a known ``type``."""
    raw = _buffer(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(TOO_LARGE, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise WireError(BAD_HEADER, f"frame 0 is not msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise WireError(BAD_HEADER, f"frame 0 must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version is None:
        raise WireError(BAD_HEADER, "header has no 'v' (wire version)")
    if version != WIRE_VERSION or isinstance(version, bool):
        raise WireError(BAD_VERSION, f"wire version {version!r}; this side speaks version {WIRE_VERSION}")
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise WireError(BAD_TYPE, f"unknown message type {kind!r}; known: {sorted(_DECODERS)}")
    return header


def _int(header: dict, key: str, lo: int = 0, hi: int = 2**62) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(BAD_HEADER, f"header field {key!r} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise WireError(BAD_HEADER, f"header field {key!r}={value} is outside [{lo}, {hi}]")
    return value


def _str(header: dict, key: str, max_len: int = MAX_ACTOR_ID_LEN) -> str:
    value = header.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise WireError(BAD_HEADER, f"header field {key!r} must be a non-empty str of <= {max_len} chars, got {value!r}")
    return value


def _opt_str(header: dict, key: str, max_len: int = MAX_RUN_ID_LEN) -> str:
    """An optional str field ("" when absent: older peers do not send it)."""
    value = header.get(key, "")
    if not isinstance(value, str) or len(value) > max_len:
        raise WireError(BAD_HEADER, f"header field {key!r} must be a str of <= {max_len} chars, got {value!r}")
    return value


def _bool(header: dict, key: str) -> bool:
    value = header.get(key)
    if not isinstance(value, bool):
        raise WireError(BAD_HEADER, f"header field {key!r} must be a bool, got {value!r}")
    return value


def _frame_count(frames: Sequence[Frame], expected: int, kind: str) -> None:
    if len(frames) != expected:
        raise WireError(BAD_FRAMES, f"a {kind} message has {expected} frames, got {len(frames)}")


def _header_of(frames: Sequence[Frame], header: dict | None, kind: str) -> dict:
    if not frames:
        raise WireError(BAD_FRAMES, "empty message")
    header = decode_header(frames[0]) if header is None else header
    if header["type"] != kind:
        raise WireError(BAD_TYPE, f"expected a {kind!r} message, got {header['type']!r}")
    return header


# ---------------------------------------------------------------- chunk


def _wire_array(values: np.ndarray, dtype: str) -> np.ndarray:
    arr = np.asarray(values)
    if dtype == "|u1" and arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    return np.ascontiguousarray(arr, dtype=dtype)


def encode_chunk(chunk: TransitionChunk) -> list[bytes | memoryview]:
    """Frames of a chunk; array frames are views of the chunk's arrays when they are
    already C-contiguous little-endian of the wire dtype (no copy)."""
    n = chunk.n
    arrays = []
    descr = []
    names = (*ARRAY_NAMES, INTERVENTION) if chunk.intervened else ARRAY_NAMES  # without one: today's bytes
    for name, dtype in zip(names, ("<f4",) * 4 + ("|u1",) * 4):
        arr = _wire_array(getattr(chunk, name), dtype)
        if len(arr) != n:
            raise ValueError(f"chunk array {name} has {len(arr)} rows, reward has {n}")
        arrays.append(arr)
        descr.append([name, dtype, list(arr.shape)])
    if chunk.frames:
        _, n_frames = frame_layout(chunk.terminated, chunk.truncated)
        for camera in sorted(chunk.frames):
            arr = np.asarray(chunk.frames[camera])
            if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) != n_frames:
                raise ValueError(f"camera {camera!r} frames: {arr.dtype} {arr.shape}, expected uint8 ({n_frames}, H, "
                                 f"W, C) for {n} rows in the segment layout (datasets/rows.py frame_layout)")  # fmt: skip
            arrays.append(np.ascontiguousarray(arr))
            descr.append([frame_key(camera), "|u1", list(arr.shape)])
    header = _pack(
        {
            "type": "chunk",
            "actor_id": chunk.actor_id,
            "seq": chunk.seq,
            "policy_version": chunk.policy_version,
            "episode_id": chunk.episode_id,
            "step": chunk.step,
            "n": n,
            "eval": bool(chunk.eval),
            "arrays": descr,
        }
    )
    return [header, *(memoryview(arr.reshape(-1)).cast("B") for arr in arrays)]


def decode_chunk(frames: Sequence[Frame], spec: ChunkSpec, header: dict | None = None) -> TransitionChunk:
    """Validate and decode a chunk against ``spec``; arrays view the frames (no copy).

    ``header`` may be passed when frame 0 was already decoded (by ``decode_header``).
    """
    header = _header_of(frames, header, "chunk")
    actor_id = _str(header, "actor_id")
    seq = _int(header, "seq")
    try:
        return _decode_chunk_body(frames, spec, header, actor_id, seq)
    except WireError as err:
        err.actor_id, err.seq = actor_id, seq
        raise


def _decode_chunk_body(frames, spec: ChunkSpec, header: dict, actor_id: str, seq: int) -> TransitionChunk:
    policy_version = _int(header, "policy_version", lo=-1, hi=MAX_INT32)
    episode_id = _int(header, "episode_id")
    step = _int(header, "step", hi=MAX_INT32)
    is_eval = _bool(header, "eval")
    n = _int(header, "n", lo=1)
    if n > spec.max_rows:
        raise WireError(TOO_LARGE, f"chunk of {n} rows exceeds the limit of {spec.max_rows} rows")
    if step + n - 1 > MAX_INT32:
        raise WireError(BAD_HEADER, f"episode steps {step}..{step + n - 1} exceed the int32 step column ({MAX_INT32})")
    descr = header.get("arrays")
    row_specs = spec.array_specs(n, lists_intervention(descr))  # the 7 row arrays, maybe intervention
    n_arrays = len(row_specs) + len(spec.cameras)
    if len(frames) != 1 + n_arrays:
        cameras = f"one per camera of {list(spec.camera_shapes)}" if spec.cameras else "no camera frames"
        raise WireError(BAD_FRAMES, f"a chunk of this task has {1 + n_arrays} frames (header, {len(row_specs)} "
                        f"arrays, {cameras}), got {len(frames)}")  # fmt: skip
    if not isinstance(descr, list) or len(descr) != n_arrays:
        raise WireError(BAD_HEADER, f"header field 'arrays' must list {n_arrays} [name, dtype, shape] entries")
    arrays: dict[str, np.ndarray] = {}
    why = f"obs_dim={spec.obs_dim}, action_dim={spec.action_dim}, n={n}"
    for frame, entry, (name, dtype, shape) in zip(frames[1:], descr, row_specs):
        arrays[name] = _view(frame, entry, name, dtype, shape, why)
    for name in FLOAT_ARRAYS:
        finite = np.isfinite(arrays[name])
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(n, -1).all(axis=1))[0])
            raise WireError(NON_FINITE, f"{name} holds NaN or inf (first at row {row})")
    for name in (*FLAG_ARRAYS, INTERVENTION) if INTERVENTION in arrays else FLAG_ARRAYS:
        if (arrays[name] > 1).any():
            raise WireError(BAD_VALUE, f"{name} flags must be 0 or 1")
    images = {}
    if spec.cameras:  # after the flags: they say how many frames the chunk holds
        _, n_frames = frame_layout(arrays["terminated"], arrays["truncated"])
        segments = n_frames - n
        frame_arrays = zip(frames[1 + len(row_specs):], descr[len(row_specs):], spec.frame_specs(n_frames))
        for camera, (frame, entry, (name, dtype, shape)) in zip(spec.cameras, frame_arrays):
            why = (f"camera {camera.name!r} is {'x'.join(map(str, camera.shape))} in the task's spec; {n} rows in "
                   f"{segments} segments carry {n_frames} frames")  # fmt: skip
            images[camera.name] = _view(frame, entry, name, dtype, shape, why)
    return TransitionChunk(
        actor_id=actor_id,
        seq=seq,
        policy_version=policy_version,
        episode_id=episode_id,
        step=step,
        eval=is_eval,
        frames=images,
        **arrays,
    )


def _view(frame: Frame, entry: Any, name: str, dtype: str, shape: tuple[int, ...], why: str) -> np.ndarray:
    """The array a frame holds, checked against its header entry and the expected (dtype, shape); no copy."""
    if not (isinstance(entry, list) and len(entry) == 3 and entry[0] == name):
        raise WireError(BAD_HEADER, f"arrays entry {entry!r} should describe {name!r} as [name, dtype, shape]")
    if entry[1] != dtype:
        raise WireError(BAD_DTYPE, f"{name} has dtype {entry[1]!r}, expected {dtype!r}")
    if not isinstance(entry[2], list) or tuple(entry[2]) != shape:
        raise WireError(BAD_SHAPE, f"{name} has shape {entry[2]!r}, expected {list(shape)} ({why})")
    buf = _buffer(frame)
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(buf) != expected:
        raise WireError(BAD_LENGTH, f"{name} frame has {len(buf)} bytes, {dtype} x {list(shape)} needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------- control messages


def encode_ack(msg: Ack) -> list[bytes]:
    header = {"type": "ack", "actor_id": msg.actor_id, "seq": msg.seq, "policy_version": msg.policy_version}
    return [_pack({**header, "hold": msg.hold, "run_id": msg.run_id})]


def decode_ack(frames: Sequence[Frame], header: dict | None = None) -> Ack:
    header = _header_of(frames, header, "ack")
    _frame_count(frames, 1, "ack")
    hold = _bool(header, "hold") if "hold" in header else False  # absent in older learners' acks
    version = _int(header, "policy_version", lo=-1, hi=MAX_INT32)
    return Ack(_str(header, "actor_id"), _int(header, "seq", lo=-1), version, hold, _opt_str(header, "run_id"))


def encode_reject(msg: Reject) -> list[bytes]:
    header = {"type": "reject", "actor_id": msg.actor_id, "seq": msg.seq, "reason": msg.reason, "message": msg.message}
    return [_pack(header)]


def decode_reject(frames: Sequence[Frame], header: dict | None = None) -> Reject:
    header = _header_of(frames, header, "reject")
    _frame_count(frames, 1, "reject")
    return Reject(
        _str(header, "actor_id"), _int(header, "seq", lo=-1), _str(header, "reason"), _str(header, "message", 4096)
    )


def encode_resend(msg: Resend) -> list[bytes]:
    return [_pack({"type": "resend", "actor_id": msg.actor_id, "seq": msg.seq})]


def decode_resend(frames: Sequence[Frame], header: dict | None = None) -> Resend:
    header = _header_of(frames, header, "resend")
    _frame_count(frames, 1, "resend")
    return Resend(_str(header, "actor_id"), _int(header, "seq"))


def encode_hello(msg: Hello) -> list[bytes]:
    fields = dataclasses.asdict(msg)
    if not fields["cameras"]:
        del fields["cameras"]  # a state actor's hello stays as it was
    return [_pack({"type": "hello", **fields})]


def _cameras(header: dict) -> dict[str, list[int]]:
    """A hello's optional ``cameras``: {name: [H, W, C]} ({} when absent: older or state-only actors)."""
    value = header.get("cameras", {})
    if not isinstance(value, dict) or len(value) > MAX_CAMERAS:
        raise WireError(BAD_HEADER, f"header field 'cameras' must be a map of at most {MAX_CAMERAS} cameras")
    cameras = {}
    for name, shape in value.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_ACTOR_ID_LEN and isinstance(shape, list)
                and len(shape) == 3 and all(type(v) is int and 0 < v <= MAX_IMAGE_SIDE for v in shape)):  # fmt: skip
            raise WireError(BAD_HEADER, f"header field 'cameras' maps a name to [H, W, C] (ints in [1, "
                            f"{MAX_IMAGE_SIDE}]), got {name!r}: {shape!r}")  # fmt: skip
        cameras[name] = list(shape)
    return cameras


def decode_hello(frames: Sequence[Frame], header: dict | None = None) -> Hello:
    header = _header_of(frames, header, "hello")
    _frame_count(frames, 1, "hello")
    return Hello(
        actor_id=_str(header, "actor_id"),
        task=_str(header, "task"),
        obs_dim=_int(header, "obs_dim"),  # 0: a camera task without a state vector
        action_dim=_int(header, "action_dim", lo=1),
        next_seq=_int(header, "next_seq"),
        policy_version=_int(header, "policy_version", lo=-1, hi=MAX_INT32),
        policy_run=_opt_str(header, "policy_run"),
        instance=_opt_str(header, "instance"),
        cameras=_cameras(header),
    )


def encode_welcome(msg: Welcome) -> list[bytes]:
    return [_pack({"type": "welcome", **dataclasses.asdict(msg)})]


def decode_welcome(frames: Sequence[Frame], header: dict | None = None) -> Welcome:
    header = _header_of(frames, header, "welcome")
    _frame_count(frames, 1, "welcome")
    # accepted_seq and hold are absent in older learners' welcomes.
    accepted = _int(header, "accepted_seq", lo=-1) if "accepted_seq" in header else -1
    hold = _bool(header, "hold") if "hold" in header else False
    version = _int(header, "policy_version", lo=-1, hi=MAX_INT32)
    return Welcome(
        _str(header, "actor_id"), _int(header, "seq", lo=-1), version, accepted, hold, _opt_str(header, "run_id")
    )


def make_policy(version: int, onnx: bytes, run_id: str = "") -> Policy:
    """A policy message for ONNX bytes (computes the checksum)."""
    if not 0 <= version <= MAX_INT32:
        raise ValueError(f"policy version {version} is outside [0, {MAX_INT32}] (an int32 column of the store)")
    return Policy(version=version, sha256=hashlib.sha256(onnx).hexdigest(), onnx=onnx, run_id=run_id)


def encode_policy(msg: Policy) -> list[bytes | memoryview]:
    header = {"type": "policy", "version": msg.version, "sha256": msg.sha256, "size": len(msg.onnx), "run_id": msg.run_id}
    return [_pack(header), msg.onnx]


def decode_policy(
    frames: Sequence[Frame], header: dict | None = None, max_bytes: int = MAX_POLICY_BYTES
) -> Policy:
    """Decode a policy and check its size and sha256 (the ONNX bytes are copied out)."""
    header = _header_of(frames, header, "policy")
    _frame_count(frames, 2, "policy")
    version = _int(header, "version", hi=MAX_INT32)
    run_id = _opt_str(header, "run_id")
    sha = _str(header, "sha256", 64)
    size = _int(header, "size", lo=1)
    if size > max_bytes:
        raise WireError(TOO_LARGE, f"policy of {size} bytes exceeds the limit of {max_bytes}")
    onnx = bytes(_buffer(frames[1]))
    if len(onnx) != size:
        raise WireError(BAD_LENGTH, f"policy frame has {len(onnx)} bytes, header says {size}")
    if hashlib.sha256(onnx).hexdigest() != sha:
        raise WireError(BAD_CHECKSUM, f"policy version {version}: sha256 does not match the bytes")
    return Policy(version=version, sha256=sha, onnx=onnx, run_id=run_id)


def encode_status(msg: Status) -> list[bytes]:
    return [_pack({"type": "status", **dataclasses.asdict(msg)})]


def decode_status(frames: Sequence[Frame], header: dict | None = None) -> Status:
    header = _header_of(frames, header, "status")
    _frame_count(frames, 1, "status")
    return check_status(header)


# ---------------------------------------------------------------- generic entry points

_ENCODERS = {
    TransitionChunk: encode_chunk,
    Ack: encode_ack,
    Reject: encode_reject,
    Resend: encode_resend,
    Hello: encode_hello,
    Welcome: encode_welcome,
    Policy: encode_policy,
    Status: encode_status,
}
_DECODERS = {
    "chunk": None,  # needs a ChunkSpec, see decode()
    "ack": decode_ack,
    "reject": decode_reject,
    "resend": decode_resend,
    "hello": decode_hello,
    "welcome": decode_welcome,
    "policy": decode_policy,
    "status": decode_status,
}


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames of any message, ready for ``socket.send_multipart``."""
    try:
        encoder = _ENCODERS[type(msg)]
    except KeyError:
        raise TypeError(f"cannot encode {type(msg).__name__}: not a wire message") from None
    return encoder(msg)


def decode(frames: Sequence[Frame], spec: ChunkSpec | None = None) -> Message:
    """Decode any message (``spec`` is required to accept chunks)."""
    if not frames:
        raise WireError(BAD_FRAMES, "empty message")
    header = decode_header(frames[0])
    if header["type"] == "chunk":
        if spec is None:
            raise WireError(BAD_TYPE, "this receiver does not accept chunks")
        return decode_chunk(frames, spec, header)
    return _DECODERS[header["type"]](frames, header)
