"""Fuzzing the wire decoder: whatever arrives, it accepts a valid message or rejects with a reason.

``O2O_FUZZ_EXAMPLES`` inputs (default 10,000) drawn from four kinds, in one property:
random frames; valid messages of every type with bytes flipped, frames cut, dropped,
repeated or added; valid msgpack headers whose fields hold values of any type or shape;
and valid chunks with NaN, inf or out-of-range flags in their arrays. The property: no
exception but ``WireError`` leaves ``wire.decode``, its reason is one of ``wire.REASONS``,
and what is accepted is a well-formed message (chunks: the spec's shapes, finite values).
``benchmarks/wire_fuzz.py`` runs it with 100,000 inputs and counts the outcomes.
"""

import collections
import math
import os

import msgpack
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from o2o.transport import wire

EXAMPLES = int(os.environ.get("O2O_FUZZ_EXAMPLES", "10000"))
SPEC = wire.ChunkSpec(obs_dim=3, action_dim=2, max_rows=16)
OUTCOMES: collections.Counter = collections.Counter()  # read by benchmarks/wire_fuzz.py
ACCEPTED = (wire.TransitionChunk, wire.Ack, wire.Reject, wire.Resend, wire.Hello, wire.Welcome, wire.Policy)

# ---------------------------------------------------------------- strategies

small_text = st.text(min_size=1, max_size=12)
ids = st.integers(0, 2**62)
versions = st.integers(-1, wire.MAX_INT32)
# Any msgpack value: what a confused or hostile peer can put in a header field.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@st.composite
def chunks(draw) -> wire.TransitionChunk:
    n = draw(st.integers(1, SPEC.max_rows))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    obs = rng.normal(size=(n + 1, SPEC.obs_dim)).astype(np.float32)
    flags = [rng.integers(0, 2, n).astype(np.uint8) for _ in range(3)]
    return wire.TransitionChunk(
        draw(small_text), draw(ids), draw(versions), draw(ids), draw(st.integers(0, wire.MAX_INT32 - n)),
        obs[:-1], rng.uniform(-1, 1, (n, SPEC.action_dim)).astype(np.float32), rng.normal(size=n).astype(np.float32),
        obs[1:], *flags, draw(st.booleans()),
    )  # fmt: skip


control_messages = st.one_of(
    st.builds(wire.Ack, small_text, st.integers(-1, 2**62), versions, st.booleans(), st.text(max_size=8)),
    st.builds(wire.Reject, small_text, st.integers(-1, 2**62), st.sampled_from(sorted(wire.REASONS)), small_text),
    st.builds(wire.Resend, small_text, ids),
    st.builds(wire.Hello, small_text, small_text, st.integers(1, 64), st.integers(1, 64), ids, versions,
              st.text(max_size=8), st.text(max_size=8)),  # fmt: skip
    st.builds(wire.Welcome, small_text, st.integers(-1, 2**62), versions, st.integers(-1, 2**62), st.booleans()),
    st.builds(wire.make_policy, st.integers(0, wire.MAX_INT32), st.binary(min_size=1, max_size=64), st.text(max_size=8)),
)
valid_frames = st.one_of(chunks(), control_messages).map(lambda msg: [bytes(f) for f in wire.encode(msg)])
random_frames = st.lists(st.binary(max_size=96), max_size=9)


@st.composite
def mutated_frames(draw) -> list[bytes]:
    """A valid message with 1-3 byte-level or frame-level mutations (drawn from a seeded
    generator: one draw instead of a dozen keeps 10,000 examples within a minute)."""
    frames = draw(valid_frames)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(rng.integers(1, 4)):
        kind = rng.choice(["flip", "cut", "grow", "drop", "repeat", "add", "swap"])
        if not frames:
            frames = [b""]
        i = int(rng.integers(len(frames)))
        frame = bytearray(frames[i])
        if kind == "flip" and frame:
            frame[rng.integers(len(frame))] = rng.integers(256)
        elif kind == "cut":
            del frame[rng.integers(len(frame) + 1):]
        elif kind == "grow":
            frame += rng.bytes(int(rng.integers(1, 9)))
        if kind in ("flip", "cut", "grow"):
            frames[i] = bytes(frame)
        elif kind == "drop":
            del frames[i]
        elif kind == "repeat":
            frames.insert(i, frames[i])
        elif kind == "add":
            frames.insert(i, rng.bytes(int(rng.integers(33))))
        elif kind == "swap":
            j = int(rng.integers(len(frames)))
            frames[i], frames[j] = frames[j], frames[i]
    return frames


@st.composite
def mistyped_headers(draw) -> list[bytes]:
    """A valid message whose header fields are replaced, deleted or added with any value,
    or a header that is valid msgpack of another type altogether."""
    frames = draw(valid_frames)
    if draw(st.integers(0, 9)) == 0:
        return [msgpack.packb(draw(msgpack_values)), *frames[1:]]
    header = msgpack.unpackb(frames[0])
    if header["type"] == "chunk" and draw(st.booleans()):
        # Near misses that reach the array checks: another dtype, shape or row count.
        entry = header["arrays"][draw(st.integers(0, 6))]
        field = draw(st.sampled_from(["dtype", "shape", "n"]))
        if field == "dtype":
            entry[1] = draw(st.sampled_from(["<f4", "<f8", ">f4", "|u1", "<u1", "f4", "|b1", "<i4"]))
        elif field == "shape":
            entry[2] = draw(st.lists(st.integers(-1, SPEC.max_rows + 1), max_size=3))
        else:
            header["n"] = draw(st.integers(-1, SPEC.max_rows + 2))
        return [msgpack.packb(header), *frames[1:]]
    keys = sorted(header)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys) | st.text(max_size=8))
        action = draw(st.sampled_from(["set", "set", "delete", "nest"]))
        if action == "set":
            header[key] = draw(msgpack_values)
        elif action == "delete":
            header.pop(key, None)
        elif key in header and isinstance(header[key], list) and header[key]:  # e.g. one "arrays" entry
            inner = header[key]
            inner[draw(st.integers(0, len(inner) - 1))] = draw(msgpack_values)
    return [msgpack.packb(header), *frames[1:]]


@st.composite
def bad_payloads(draw) -> list[bytes]:
    """A valid chunk with NaN / inf in a float array or a flag outside 0/1."""
    frames = [bytes(f) for f in wire.encode(draw(chunks()))]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(1, 7))  # frames 1-4 float32 arrays, 5-7 flags
        values = np.frombuffer(frames[i], np.float32 if i <= 4 else np.uint8).copy()
        k = draw(st.integers(0, len(values) - 1))
        if i <= 4:
            values[k] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3.0e38, -0.0, 1e-45]))
        else:
            values[k] = draw(st.integers(0, 255))
        frames[i] = values.tobytes()
    return frames


inputs = st.one_of(random_frames, mutated_frames(), mistyped_headers(), bad_payloads())

# ---------------------------------------------------------------- property


def outcome(frames: list[bytes]) -> str:
    """Decode like a receiver does; any exception but WireError fails the test."""
    try:
        msg = wire.decode(frames, SPEC)
    except wire.WireError as err:
        assert err.reason in wire.REASONS, f"unknown reason {err.reason!r}"
        assert isinstance(err.message, str) and err.message
        return f"rejected: {err.reason}"
    assert isinstance(msg, ACCEPTED), type(msg)
    if isinstance(msg, wire.TransitionChunk):
        assert 1 <= msg.n <= SPEC.max_rows
        assert msg.obs.shape == msg.next_obs.shape == (msg.n, SPEC.obs_dim)
        assert msg.action.shape == (msg.n, SPEC.action_dim)
        for name in wire.FLOAT_ARRAYS:
            assert np.isfinite(getattr(msg, name)).all()
        for name in wire.FLAG_ARRAYS:
            assert getattr(msg, name).max() <= 1
    return f"accepted: {type(msg).__name__}"


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(inputs)
def test_the_decoder_accepts_or_rejects_with_a_reason_whatever_arrives(frames):
    result = outcome(frames)
    OUTCOMES[result] += 1
    event(result)


@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(chunks(), control_messages))
def test_every_valid_message_is_accepted_as_sent(msg):
    got = wire.decode([bytes(f) for f in wire.encode(msg)], SPEC)
    assert type(got) is type(msg)
    if isinstance(msg, wire.TransitionChunk):
        for name in wire.ARRAY_NAMES:
            np.testing.assert_array_equal(getattr(got, name), getattr(msg, name))
        assert (got.actor_id, got.seq, got.episode_id, got.step, got.eval) == (
            msg.actor_id, msg.seq, msg.episode_id, msg.step, msg.eval)  # fmt: skip
    elif isinstance(msg, wire.Policy):
        assert (got.version, got.sha256, bytes(got.onnx), got.run_id) == (msg.version, msg.sha256, msg.onnx, msg.run_id)
    else:
        assert got == msg
