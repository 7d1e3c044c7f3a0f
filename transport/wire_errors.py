"""The wire's rejection reason codes and ``WireError`` (re-exported by transport/wire.py).

Every decoder raises ``WireError(reason, message)`` with one of these stable codes, so receivers
can count rejections by reason; apart from wire.py so its message modules (status_msg.py) can raise
them without importing the codec.
"""

from __future__ import annotations

# Stable rejection reason codes.
BAD_HEADER = "bad_header"  # frame 0 is not a msgpack map, or a key is missing or mistyped
BAD_VERSION = "bad_version"
BAD_TYPE = "bad_type"  # unknown message type, or a type this receiver does not accept
BAD_FRAMES = "bad_frames"  # wrong number of frames
BAD_DTYPE = "bad_dtype"
BAD_SHAPE = "bad_shape"
BAD_LENGTH = "bad_length"  # frame byte length does not match dtype x shape
NON_FINITE = "non_finite"
BAD_VALUE = "bad_value"  # e.g. a flag that is neither 0 nor 1
TOO_LARGE = "too_large"
BAD_CHECKSUM = "bad_checksum"
BAD_SPEC = "bad_spec"  # hello for another task / other dimensions
ACTOR_ID_IN_USE = "actor_id_in_use"  # hello: another live connection holds this actor_id
NOT_WELCOMED = "not_welcomed"  # chunk from a connection that has not been welcomed: say hello first
TOO_MANY_ACTORS = "too_many_actors"  # hello: the learner serves its maximum number of actors
KEY_REFUSED = "key_refused"  # CURVE: the sender's key is not (or no longer) allowed, or belongs to another actor_id
RATE_LIMITED = "rate_limited"  # a chunk past its actor's rows/s budget: not stored, the actor resends it later
REASONS = frozenset(
    {
        BAD_HEADER,
        BAD_VERSION,
        BAD_TYPE,
        BAD_FRAMES,
        BAD_DTYPE,
        BAD_SHAPE,
        BAD_LENGTH,
        NON_FINITE,
        BAD_VALUE,
        TOO_LARGE,
        BAD_CHECKSUM,
        BAD_SPEC,
        ACTOR_ID_IN_USE,
        NOT_WELCOMED,
        TOO_MANY_ACTORS,
        KEY_REFUSED,
        RATE_LIMITED,
    }
)


class WireError(ValueError):
    """A message that does not follow the wire format.

    ``reason`` is one of ``REASONS``. For a chunk whose header named its sender
    before the failure, ``actor_id`` and ``seq`` say which chunk it was.
    """

    def __init__(self, reason: str, message: str, actor_id: str | None = None, seq: int | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.actor_id = actor_id
        self.seq = seq
