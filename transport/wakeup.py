"""Wake a ZeroMQ poll loop from another thread (an inproc PAIR pair, no polling delay).

The loop registers ``waker.socket`` in its poller and calls ``drain()`` when it is
readable; any thread calls ``wake()`` after queueing work for the loop.
"""

from __future__ import annotations

import threading

import zmq


class Waker:
    def __init__(self, context: zmq.Context, name: str):
        address = f"inproc://o2o-wake-{name}-{id(self)}"
        self.socket = context.socket(zmq.PAIR)  # the loop's end: poll it, drain it
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self._out = context.socket(zmq.PAIR)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.setsockopt(zmq.SNDHWM, 1)  # one pending wake-up is enough
        self._out.connect(address)
        self._lock = threading.Lock()  # ZeroMQ sockets are not thread-safe; wake() is called from any thread

    def wake(self) -> None:
        with self._lock:
            if self._out is None:
                return
            try:
                self._out.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:  # a wake-up is already pending
                pass

    def drain(self) -> None:
        while self.socket.poll(0):
            self.socket.recv()

    def close(self) -> None:
        with self._lock:
            self._out.close(linger=0)
            self._out = None
        self.socket.close(linger=0)
