"""The learner's ROUTER socket: its options, binding, and sends that never block."""

from __future__ import annotations

import zmq

from .security import LearnerKeys


def bind_router(context: zmq.Context, endpoint: str, *, max_frame_bytes: int, max_queued_messages: int,
                keys: LearnerKeys | None) -> tuple[zmq.Socket, str]:  # fmt: skip
    """A bound ROUTER socket and the address it bound (a wildcard port resolved)."""
    sock = context.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # a huge frame drops the peer, not us
        sock.setsockopt(zmq.LINGER, 2000)
        # Bounded: past this many unread messages ZeroMQ stops reading from the actors' sockets
        # (TCP backpressure; they keep their chunks spooled), never an unbounded queue here.
        sock.setsockopt(zmq.RCVHWM, max_queued_messages)
        if keys is not None:
            keys.serve(context, sock)  # CURVE server + ZAP allow-list, before binding
        sock.bind(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def send(sock: zmq.Socket, identity: bytes, frames: list) -> zmq.ZMQError | None:
    """Send without blocking; the error if the peer is gone (EHOSTUNREACH) or its queue full (EAGAIN)."""
    try:
        sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError as err:
        return err
    return None
