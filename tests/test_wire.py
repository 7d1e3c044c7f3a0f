"""The wire format: round trips, zero-copy decode, and each malformed case rejected with its reason."""

import msgpack
import numpy as np
import pytest

from o2o.transport import wire
from replay_peers import ACT_DIM, OBS_DIM, make_chunk

SPEC = wire.ChunkSpec(OBS_DIM, ACT_DIM, max_rows=100)


def frames_of(chunk: wire.TransitionChunk) -> list[bytes]:
    return [bytes(f) for f in wire.encode_chunk(chunk)]


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header), *frames[1:]]


def test_chunk_round_trip_is_exact_and_zero_copy():
    chunk = make_chunk("robot-7", seq=3, rows=40, policy_version=12)
    frames = frames_of(chunk)
    got = wire.decode(frames, SPEC)
    assert isinstance(got, wire.TransitionChunk)
    assert (got.actor_id, got.seq, got.policy_version, got.episode_id, got.step, got.eval, got.n) == (
        "robot-7", 3, 12, chunk.episode_id, chunk.step, False, 40,
    )  # fmt: skip
    for name in wire.ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(got, name), getattr(chunk, name))
    assert got.obs.dtype == np.float32 and got.terminated.dtype == np.uint8
    # The arrays view the received frame: no copy was made.
    assert np.shares_memory(got.obs, np.frombuffer(frames[1], np.uint8))


def test_bool_flags_and_float64_inputs_are_converted_on_encode():
    chunk = make_chunk("a", 0, rows=4)
    loose = wire.TransitionChunk(
        "a", 0, -1, 0, 0, chunk.obs.astype(np.float64), chunk.action, chunk.reward.astype(np.float64),
        chunk.next_obs, chunk.terminated.astype(bool), chunk.truncated.astype(bool), chunk.success.astype(bool), True,
    )  # fmt: skip
    got = wire.decode_chunk(frames_of(loose), SPEC)
    np.testing.assert_array_equal(got.obs, chunk.obs)
    assert got.eval is True and got.policy_version == -1


@pytest.mark.parametrize(
    "msg",
    [
        wire.Ack("a", 41, 3),
        wire.Reject("a", 5, wire.NON_FINITE, "obs holds NaN"),
        wire.Resend("a", 7),
        wire.Hello("a", "pusher", 23, 7, next_seq=10, policy_version=2),
        wire.Welcome("a", -1, -1),
    ],
)
def test_control_messages_round_trip(msg):
    assert wire.decode(wire.encode(msg)) == msg


def test_policy_round_trip_checks_sha256():
    policy = wire.make_policy(4, b"onnx-bytes" * 1000)
    frames = [bytes(f) for f in wire.encode(policy)]
    got = wire.decode(frames)
    assert got.version == 4 and got.onnx == policy.onnx and got.sha256 == policy.sha256
    tampered = [frames[0], frames[1][:-1] + b"X"]
    with pytest.raises(wire.WireError) as err:
        wire.decode(tampered)
    assert err.value.reason == wire.BAD_CHECKSUM


def _truncated(frames):
    return [*frames[:1], frames[1][:-4], *frames[2:]]


def _wrong_dtype(frames):
    chunk = make_chunk("a", 0, rows=10)
    header = msgpack.unpackb(frames[0])
    header["arrays"][0] = ["obs", "<f8", [10, OBS_DIM]]
    return [msgpack.packb(header), chunk.obs.astype("<f8").tobytes(), *frames[2:]]


def _wrong_shape(frames):
    header = msgpack.unpackb(frames[0])
    header["arrays"][0] = ["obs", "<f4", [10, OBS_DIM - 1]]
    return [msgpack.packb(header), frames[1][: 10 * (OBS_DIM - 1) * 4], *frames[2:]]


def _nan(frames):
    next_obs = np.frombuffer(frames[4], np.float32).copy()
    next_obs[7] = np.nan
    return [*frames[:4], next_obs.tobytes(), *frames[5:]]


def _bad_flag(frames):
    flags = bytearray(frames[5])
    flags[2] = 7
    return [*frames[:5], bytes(flags), *frames[6:]]


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncated, wire.BAD_LENGTH),
        (_wrong_dtype, wire.BAD_DTYPE),
        (_wrong_shape, wire.BAD_SHAPE),
        (_nan, wire.NON_FINITE),
        (_bad_flag, wire.BAD_VALUE),
        (lambda f: with_header(f, v=2), wire.BAD_VERSION),
        (lambda f: [b"\xc1garbage", *f[1:]], wire.BAD_HEADER),
        (lambda f: [msgpack.packb([1, 2, 3]), *f[1:]], wire.BAD_HEADER),
        (lambda f: with_header(f, seq="3"), wire.BAD_HEADER),
        (lambda f: with_header(f, eval=1), wire.BAD_HEADER),
        (lambda f: with_header(f, type="nonsense"), wire.BAD_TYPE),
        (lambda f: f[:-1], wire.BAD_FRAMES),
        (lambda f: with_header(f, n=101), wire.TOO_LARGE),
        (lambda f: [b"\x00" * (wire.MAX_HEADER_BYTES + 1), *f[1:]], wire.TOO_LARGE),
    ],
    ids=[
        "truncated-frame", "wrong-dtype", "wrong-shape", "nan", "bad-flag", "bad-version", "garbage-header",
        "header-not-a-map", "mistyped-field", "non-bool-eval", "unknown-type", "missing-frame", "too-many-rows",
        "huge-header",
    ],
)  # fmt: skip
def test_malformed_chunks_are_rejected_with_their_reason(corrupt, reason):
    frames = corrupt(frames_of(make_chunk("a", 5, rows=10)))
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames, SPEC)
    assert err.value.reason == reason, err.value


def test_error_names_the_chunk_once_its_header_is_readable():
    with pytest.raises(wire.WireError) as err:
        wire.decode(_nan(frames_of(make_chunk("arm-2", 9, rows=10))), SPEC)
    assert (err.value.actor_id, err.value.seq) == ("arm-2", 9)
    assert "next_obs" in err.value.message and "row 1" in err.value.message  # element 7: row 1 of 5 columns


def test_too_many_rows_is_refused_before_reading_frames():
    big = make_chunk("a", 0, rows=101)
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames_of(big), SPEC)
    assert err.value.reason == wire.TOO_LARGE


def test_chunks_need_a_spec():
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames_of(make_chunk("a", 0, rows=3)))
    assert err.value.reason == wire.BAD_TYPE
