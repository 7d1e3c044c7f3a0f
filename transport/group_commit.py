"""Group commit for the ingest server, off its receive path, with retry on failure.

When: a whole Zarr chunk of rows is staged (each commit rewrites the partly filled last chunk
of every column, so committing at chunk boundaries keeps the write cost near one pass),
``commit_rows`` rows are staged (if set), or ``commit_interval_s`` after the previous commit
began, whichever comes first.

Where: the server thread takes what is staged (``ReplayStore.begin_commit``) and hands it to a
commit thread, which writes and fsyncs it while the server keeps receiving and staging the
next chunks (into the next commit). One commit is in flight at a time. The server applies the
outcome when the thread reports it (``finished``): only then are the actors acked, so a chunk is
acked once it is durable, never before.

Failure (disk full, read-only remount, I/O error): the commit is undone in memory (everything
stays staged) and retried with back-off for ``commit_retry_s`` while the server reads nothing
new (the actors keep their chunks spooled); past that ``StoreError`` stops the server.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

from o2o.datasets.replay_store import PendingCommit, ReplayStore, StoreError

log = logging.getLogger("o2o.ingest")


class GroupCommit:
    """The commit schedule, the commit thread and the retry state of one ``ReplayStore``.

    ``wake()`` is called from the commit thread when a commit finished (it wakes the server's poll)."""

    def __init__(self, store: ReplayStore, *, interval_s: float, commit_rows: int | None, retry_s: float,
                 wake: Callable[[], None]):  # fmt: skip
        self.store = store
        self.interval_s = interval_s
        self.commit_rows = commit_rows
        self.retry_s = retry_s
        self.failing_since: float | None = None  # first failed commit of the current streak
        self._streak = 0  # failed commits in the current streak
        self._retry_at = 0.0
        self._last_commit = 0.0
        self.in_flight: PendingCommit | None = None
        self._wake = wake
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="o2o-commit", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ schedule (server thread)

    def due(self) -> bool:
        store = self.store
        if self.in_flight is not None or not store.uncommitted:
            return False
        if self.failing_since is not None:
            return time.monotonic() >= self._retry_at
        if store.staged_full_chunk or (self.commit_rows is not None and store.staged_rows >= self.commit_rows):
            return True
        return time.monotonic() - self._last_commit >= self.interval_s

    def poll_timeout_ms(self) -> int:
        if self.in_flight is not None or not self.store.uncommitted:
            return 50  # a finished commit wakes the poll
        due = self._retry_at if self.failing_since is not None else self._last_commit + self.interval_s
        return max(0, math.ceil((due - time.monotonic()) * 1000))

    # ------------------------------------------------------------ commits

    def begin(self, collect: bool) -> bool:
        """Hand what is staged to the commit thread; False if there was nothing to commit."""
        pending = self.store.begin_commit(collect)
        if pending is None:
            return False
        self.in_flight = pending
        # The interval runs from commit start to commit start: a commit's own writes and fsyncs
        # (in its thread, while rows keep coming) do not add to the acks' latency.
        self._last_commit = time.monotonic()
        self._jobs.put(pending)
        return True

    def finished(self, block: bool = False) -> tuple[PendingCommit, BaseException | None] | None:
        """The commit in flight and its error (None: it is durable), once its thread is done with it."""
        if self.in_flight is None:
            return None
        try:
            pending, error = self._results.get(block=block)
        except queue.Empty:
            return None
        self.in_flight = None
        if error is None:
            self.store.finish_commit(pending)
            self._succeeded()
        else:
            self.store.abort_commit(pending)
        return pending, error

    def _work(self) -> None:
        while (pending := self._jobs.get()) is not None:
            try:
                pending.run()
                error = None
            except BaseException as err:  # reported to the server thread, which retries or stops
                error = err
            self._results.put((pending, error))
            self._wake()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    # ------------------------------------------------------------ retry

    def _succeeded(self) -> None:
        if self.failing_since is not None:
            log.warning("replay store %s is writable again: committed after %.1f s of failures",
                        self.store.path, time.monotonic() - self.failing_since)  # fmt: skip
            self.failing_since = None

    def failed(self, err: BaseException) -> None:
        """Back off and retry (a full disk may be freed, a remount undone); give up after
        ``retry_s`` with a StoreError that stops the server (and the learner). Errors other than
        ``OSError`` are re-raised at once."""
        if not isinstance(err, OSError):
            raise err
        now = time.monotonic()
        first = self.failing_since is None
        if first:
            self.failing_since, self._streak = now, 0
        self._streak += 1
        failing_for = now - self.failing_since
        staged = self.store.staged_rows
        if failing_for >= self.retry_s:
            raise StoreError(
                f"the replay store {self.store.path} could not be written for {failing_for:.0f} s ({err}); "
                f"{staged} staged rows were not committed (the actors keep them in their spools and resend them). "
                "Every committed row is intact: free space or make the folder writable, then resume the run "
                "(o2o-learner resume=<run folder>)"
            ) from err
        self._retry_at = now + min(0.1 * 2 ** (self._streak - 1), 5.0)  # 0.1, 0.2, 0.4 ... 5 s
        if first or self._streak % 10 == 0:
            log.error("commit to the replay store %s failed (%s); retrying for up to %.0f s, not reading new "
                      "chunks meanwhile (%d rows staged)", self.store.path, err, self.retry_s, staged)  # fmt: skip
