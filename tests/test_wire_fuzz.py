"""Fuzzing the wire decoder: whatever arrives, it accepts a valid message or rejects with a reason.

``O2O_FUZZ_EXAMPLES`` inputs (default 10,000) drawn from four kinds, in one property:
random frames; valid messages of every type with bytes flipped, frames cut, dropped,
repeated or added; valid msgpack headers whose fields hold values of any type or shape;
and valid chunks with NaN, inf or out-of-range flags in their arrays. The property: no
exception but ``WireError`` leaves ``wire.decode``, its reason is one of ``wire.REASONS``,
and what is accepted is a well-formed message (chunks: the spec's shapes, finite values).
``benchmarks/wire_fuzz.py`` runs it with 100,000 inputs and counts the outcomes.

Each example is one hypothesis draw, a 64-bit seed, from which ``fuzz_input`` builds the input
(kind = seed % 4) with seeded generators whose values lean to the edges as hypothesis's do
(range ends, 2**31/2**62/2**63/2**64 neighbours, NaN, inf, -0.0, subnormals, empty and
non-ASCII text, nested lists and maps). Composite hypothesis strategies made the same inputs at
~4 ms an input, four times the engine's own cost per example; a failure names its seed, and
``fuzz_input(seed)`` rebuilds that input. The round-trip test below keeps hypothesis's own
strategies for the valid messages.
"""

import collections
import math
import os
import random
import struct

import msgpack
import numpy as np
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from o2o.transport import wire

EXAMPLES = int(os.environ.get("O2O_FUZZ_EXAMPLES", "10000"))
SPEC = wire.ChunkSpec(obs_dim=3, action_dim=2, max_rows=16)
OUTCOMES: collections.Counter = collections.Counter()  # read by benchmarks/wire_fuzz.py
ACCEPTED = (wire.TransitionChunk, wire.Ack, wire.Reject, wire.Resend, wire.Hello, wire.Welcome, wire.Policy)

# ---------------------------------------------------------------- hypothesis strategies (valid messages)

small_text = st.text(min_size=1, max_size=12)
ids = st.integers(0, 2**62)
versions = st.integers(-1, wire.MAX_INT32)


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

# ---------------------------------------------------------------- seeded inputs (the fuzz property)

EDGE_INTS = (0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, 2**53, 2**62 - 1, 2**62, 2**62 + 1,
             2**63 - 1, -(2**63), 2**64 - 1)  # fmt: skip
EDGE_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324, 1e-45, 1.1754943508222875e-38,
               3.4028234663852886e38, 3.5e38, 1.7976931348623157e308, -1.7976931348623157e308, 1.0, -1.0, 0.5,
               2.0**53, 1.0 + 2.0**-52)  # fmt: skip
ODD_CHARS = ("\x00\x01\t\n\r \x7f\x80\xa0\xe9\xdf\u0130\u0301\u200b\u202e\ufeff\ufffd\uffff\u4e2d\U0001f600"
             "\U0010ffff/\\\"'{}[]:,=")
ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:"
HEADER_WORDS = ("v", "type", "actor_id", "seq", "policy_version", "episode_id", "step", "n", "eval", "arrays", "hold",
                "run_id", "reason", "message", "task", "obs_dim", "action_dim", "next_seq", "policy_run", "instance",
                "accepted_seq", "version", "sha256", "size", "chunk", "ack", "reject", "resend", "hello", "welcome",
                "policy", "obs", "action", "reward", "next_obs", "terminated", "truncated", "success", "<f4",
                "|u1")  # fmt: skip
REASONS = sorted(wire.REASONS)


class Draw:
    """Values from one seed, leaning to the edges (as hypothesis's strategies do)."""

    def __init__(self, seed: int):
        self.seed, self.r, self._np = seed, random.Random(seed), None

    @property
    def np(self) -> np.random.Generator:
        """For arrays (made only when needed: it costs more to seed than ``random.Random``)."""
        if self._np is None:
            self._np = np.random.default_rng(self.seed)
        return self._np

    def boolean(self) -> bool:
        return self.r.random() < 0.5

    def integer(self, lo: int, hi: int) -> int:
        r = self.r
        if r.random() < 0.3:
            edges = [v for v in (lo, lo + 1, hi - 1, hi, *EDGE_INTS) if lo <= v <= hi]
            return r.choice(edges)
        bits = r.randint(0, (hi - lo).bit_length())  # log-uniform: small and huge values alike
        return min(hi, lo + r.getrandbits(bits)) if bits else lo

    def real(self) -> float:
        r, u = self.r, self.r.random()
        if u < 0.4:
            return r.choice(EDGE_FLOATS)
        if u < 0.7:  # any bit pattern: NaN payloads, subnormals, huge exponents
            return struct.unpack("<d", r.randbytes(8))[0]
        return r.uniform(-1e6, 1e6)

    def text(self, min_size: int = 0, max_size: int = 12) -> str:
        r = self.r
        n = r.randint(min_size, max_size)
        u = r.random()
        if u < 0.15:
            word = r.choice(HEADER_WORDS)[:max_size]
            if len(word) >= min_size:
                return word
        if u < 0.6:
            return "".join(r.choices(ASCII, k=n))
        chars = []
        for _ in range(n):
            v = r.random()
            if v < 0.4:
                chars.append(r.choice(ASCII))
            elif v < 0.8:
                chars.append(r.choice(ODD_CHARS))
            else:
                code = r.randrange(0x110000 - 0x800)
                chars.append(chr(code + 0x800 if code >= 0xD800 else code))  # no lone surrogates
        return "".join(chars)

    def binary(self, min_size: int = 0, max_size: int = 20) -> bytes:
        return self.r.randbytes(self.r.randint(min_size, max_size))

    def value(self, depth: int = 0):
        """Any msgpack value: what a confused or hostile peer can put in a header field."""
        r = self.r
        kind = r.randrange(8 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.boolean()
        if kind == 2:
            return self.integer(-(2**63), 2**64 - 1)
        if kind == 3:
            return self.real()
        if kind == 4:
            return self.text(0, 20)
        if kind == 5:
            return self.binary(0, 20)
        if kind == 6:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text(0, 8): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    # -------------------------------------------------------- valid messages

    def chunk(self) -> wire.TransitionChunk:
        n, rng = self.integer(1, SPEC.max_rows), self.np
        obs = rng.normal(size=(n + 1, SPEC.obs_dim)).astype(np.float32)
        flags = [rng.integers(0, 2, n).astype(np.uint8) for _ in range(3)]
        return wire.TransitionChunk(
            self.text(1), self.integer(0, 2**62), self.version(), self.integer(0, 2**62),
            self.integer(0, wire.MAX_INT32 - n), obs[:-1], rng.uniform(-1, 1, (n, SPEC.action_dim)).astype(np.float32),
            rng.normal(size=n).astype(np.float32), obs[1:], *flags, self.boolean(),
        )  # fmt: skip

    def version(self) -> int:
        return self.integer(-1, wire.MAX_INT32)

    def control(self):
        kind = self.r.randrange(6)
        if kind == 0:
            return wire.Ack(self.text(1), self.integer(-1, 2**62), self.version(), self.boolean(), self.text(0, 8))
        if kind == 1:
            return wire.Reject(self.text(1), self.integer(-1, 2**62), self.r.choice(REASONS), self.text(1))
        if kind == 2:
            return wire.Resend(self.text(1), self.integer(0, 2**62))
        if kind == 3:
            return wire.Hello(self.text(1), self.text(1), self.integer(1, 64), self.integer(1, 64),
                              self.integer(0, 2**62), self.version(), self.text(0, 8), self.text(0, 8))  # fmt: skip
        if kind == 4:
            return wire.Welcome(self.text(1), self.integer(-1, 2**62), self.version(), self.integer(-1, 2**62),
                                self.boolean())  # fmt: skip
        return wire.make_policy(self.integer(0, wire.MAX_INT32), self.binary(1, 64), self.text(0, 8))

    def valid_frames(self) -> list[bytes]:
        msg = self.chunk() if self.boolean() else self.control()
        return [bytes(f) for f in wire.encode(msg)]



def random_frames(d: Draw) -> list[bytes]:
    return [d.binary(0, 96) for _ in range(d.r.randint(0, 9))]


def mutated_frames(d: Draw) -> list[bytes]:
    """A valid message with 1-3 byte-level or frame-level mutations."""
    frames = d.valid_frames()
    r = d.r
    for _ in range(r.randint(1, 3)):
        kind = r.choice(["flip", "cut", "grow", "drop", "repeat", "add", "swap"])
        if not frames:
            frames = [b""]
        i = r.randrange(len(frames))
        frame = bytearray(frames[i])
        if kind == "flip" and frame:
            frame[r.randrange(len(frame))] = r.randrange(256)
        elif kind == "cut":
            del frame[r.randrange(len(frame) + 1):]
        elif kind == "grow":
            frame += r.randbytes(r.randint(1, 8))
        if kind in ("flip", "cut", "grow"):
            frames[i] = bytes(frame)
        elif kind == "drop":
            del frames[i]
        elif kind == "repeat":
            frames.insert(i, frames[i])
        elif kind == "add":
            frames.insert(i, r.randbytes(r.randrange(33)))
        elif kind == "swap":
            j = r.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
    return frames


def mistyped_headers(d: Draw) -> list[bytes]:
    """A valid message whose header fields are replaced, deleted or added with any value,
    or a header that is valid msgpack of another type altogether."""
    r = d.r
    frames = d.valid_frames()
    if r.randrange(10) == 0:
        return [msgpack.packb(d.value()), *frames[1:]]
    header = msgpack.unpackb(frames[0])
    if header["type"] == "chunk" and d.boolean():
        # Near misses that reach the array checks: another dtype, shape or row count.
        entry = header["arrays"][r.randrange(7)]
        field = r.choice(["dtype", "shape", "n"])
        if field == "dtype":
            entry[1] = r.choice(["<f4", "<f8", ">f4", "|u1", "<u1", "f4", "|b1", "<i4"])
        elif field == "shape":
            entry[2] = [d.integer(-1, SPEC.max_rows + 1) for _ in range(r.randint(0, 3))]
        else:
            header["n"] = d.integer(-1, SPEC.max_rows + 2)
        return [msgpack.packb(header), *frames[1:]]
    keys = sorted(header)
    for _ in range(r.randint(1, 3)):
        key = r.choice(keys) if d.boolean() else d.text(0, 8)
        action = r.choice(["set", "set", "delete", "nest"])
        if action == "set":
            header[key] = d.value()
        elif action == "delete":
            header.pop(key, None)
        elif key in header and isinstance(header[key], list) and header[key]:  # e.g. one "arrays" entry
            inner = header[key]
            inner[r.randrange(len(inner))] = d.value()
    return [msgpack.packb(header), *frames[1:]]


def bad_payloads(d: Draw) -> list[bytes]:
    """A valid chunk with NaN / inf in a float array or a flag outside 0/1."""
    r = d.r
    frames = [bytes(f) for f in wire.encode(d.chunk())]
    for _ in range(r.randint(1, 3)):
        i = r.randint(1, 7)  # frames 1-4 float32 arrays, 5-7 flags
        values = np.frombuffer(frames[i], np.float32 if i <= 4 else np.uint8).copy()
        k = r.randrange(len(values))
        if i <= 4:
            values[k] = r.choice([math.nan, math.inf, -math.inf, 3.0e38, -0.0, 1e-45])
        else:
            values[k] = d.integer(0, 255)
        frames[i] = values.tobytes()
    return frames


KINDS = (random_frames, mutated_frames, mistyped_headers, bad_payloads)


def fuzz_input(seed: int) -> list[bytes]:
    """The frames of the fuzz input ``seed`` (its kind: ``KINDS[seed % 4]``)."""
    return KINDS[seed % len(KINDS)](Draw(seed))


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
@given(st.integers(0, 2**64 - 1))
def test_the_decoder_accepts_or_rejects_with_a_reason_whatever_arrives(seed):
    frames = fuzz_input(seed)
    note(frames)  # shown for a failing seed only
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
