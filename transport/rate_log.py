"""Log lines bounded whatever peers send: at most one line per kind per interval."""

from __future__ import annotations

import logging
import math
import time


class RateLimitedLog:
    """At most one line per key per ``interval_s``; the lines held back are counted and the
    count logged with the key's next line, or by ``flush`` once the interval has passed."""

    def __init__(self, logger: logging.Logger, interval_s: float):
        self.logger = logger
        self.interval_s = interval_s
        self._state: dict[str, tuple[float, int]] = {}  # key -> (time of its last line, held back since)

    def log(self, key: str, level: int, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, held = self._state.get(key, (-math.inf, 0))
        if now - last < self.interval_s:
            self._state[key] = (last, held + 1)
            return
        self._state[key] = (now, 0)
        if held:
            fmt += f" (+{held} more like it in the last {now - last:.1f} s)"
        self.logger.log(level, fmt, *args, exc_info=exc_info)

    def warning(self, key: str, fmt: str, *args) -> None:
        self.log(key, logging.WARNING, fmt, *args)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        for key, (last, held) in self._state.items():
            if held and (force or now - last >= self.interval_s):
                self.logger.warning("%d more lines like the last '%s' line in the last %.1f s (one line per %g s)",
                                    held, key, now - last, self.interval_s)  # fmt: skip
                self._state[key] = (now, 0)
