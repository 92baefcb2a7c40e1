"""Requests that arrive together are decoded together.

One thread owns the model. It takes the oldest waiting request and waits for more: until no new request has come
for ``window_s`` (at most ``5 * window_s`` after the oldest), or until ``max_batch`` rows wait; then it decodes all
those rows as one batch. Requests that arrive while a batch runs join it between two decoding steps, as long as
it has room for all of a request's rows (continuous batching; on hfbridge's fast greedy loop, see
:func:`hfbridge.generation.greedy_decode`); where decoding goes through ``model.generate`` they form the next
batch. Other work on the model (a declarative ``/predict``) is a job run by the same thread between batches, so
nothing else touches the model concurrently; while a job waits, no request joins the running batch.

The queue is bounded: past ``max_queue`` waiting requests, :meth:`Batcher.submit` refuses with a 503.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from hfbridge.serving.engine import Engine, Row
from hfbridge.serving.errors import APIError

log = logging.getLogger(__name__)

WINDOWS = 5  # a batch waits at most this many windows for requests to join it


class _Group:
    """One request's rows (its ``n`` choices, or its prompts), batched together."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.arrived = time.monotonic()


class _Job:
    def __init__(self, fn: Callable, future: Future, deadline: float):
        self.fn = fn
        self.future = future
        self.deadline = deadline
        self.arrived = time.monotonic()


class Batcher:
    def __init__(self, engine: Engine, *, max_batch: int = 16, window_s: float = 0.02, max_queue: int = 256,
                 continuous: bool = True):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1, window_s at least 0")
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.continuous = continuous  # False: requests that arrive during a batch wait for the next one
        self.batches = 0
        self.rows_done = 0
        self.rows_joined = 0  # rows that joined a batch already decoding
        self._pending: deque[_Group | _Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hfbridge-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def _admit(self, item: _Group | _Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._pending)} requests are waiting (the limit is "
                                    f"{self.max_queue}); retry later", code="server_busy", headers={"Retry-After": "1"})
            self._pending.append(item)
            self._cond.notify()

    def submit(self, rows: list[Row]) -> None:
        """Queue one request's rows (at most ``max_batch``); each row reports through its sink."""
        if not 1 <= len(rows) <= self.max_batch:
            raise ValueError(f"a request has 1 to {self.max_batch} rows, got {len(rows)}")
        self._admit(_Group(rows))

    def submit_job(self, fn: Callable, deadline: float = math.inf) -> Future:
        """Run ``fn()`` on the model's thread between batches; skipped (cancelled) if ``deadline`` passed first."""
        future: Future = Future()
        self._admit(_Job(fn, future, deadline))
        return future

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        for item in self._pending:
            if isinstance(item, _Job):
                item.future.cancel()
            else:
                for row in item.rows:
                    row.fail("the server is shutting down")
        self._pending.clear()

    # ---------------------------------------------------------------------------------------- the model's thread
    def _loop(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            if isinstance(work, _Job):
                self._run_job(work)
            elif work:
                self._run_rows(work)

    def _next(self) -> _Job | list[Row] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if isinstance(self._pending[0], _Job):
                return self._pending.popleft()
            while not self._closed and self._rows_ahead() < self.max_batch:
                left = self._due() - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            rows: list[Row] = []
            while self._pending and isinstance(self._pending[0], _Group):
                group = self._pending[0]
                if rows and len(rows) + len(group.rows) > self.max_batch:
                    break
                self._pending.popleft()
                rows.extend(group.rows)
        return _live(rows)

    def _joining(self, decoding: int) -> list[Row]:
        """Requests whose rows all fit beside the ``decoding`` rows, oldest first, unless a job waits."""
        rows: list[Row] = []
        with self._cond:
            while self._pending and isinstance(self._pending[0], _Group) and not self._closed:
                if decoding + len(rows) + len(self._pending[0].rows) > self.max_batch:
                    break
                rows.extend(self._pending.popleft().rows)
        return _live(rows)

    def _due(self) -> float:
        """When the next batch starts: ``window_s`` after the newest request (a burst is collected whole), at most
        ``WINDOWS * window_s`` after the oldest (a steady stream does not hold it back)."""
        oldest, newest = self._pending[0], self._pending[-1]
        return min(oldest.arrived + WINDOWS * self.window_s, newest.arrived + self.window_s)

    def _rows_ahead(self) -> int:
        """Rows waiting before the first job."""
        count = 0
        for item in self._pending:
            if isinstance(item, _Job):
                break
            count += len(item.rows)
        return count

    def _run_rows(self, rows: list[Row]) -> None:
        joined: list[Row] = []

        def joining(decoding: int) -> list[Row]:
            new = self._joining(decoding)
            joined.extend(new)
            self.rows_joined += len(new)
            return new

        try:
            self.engine.run(rows, joining if self.continuous else None)
        except Exception as e:
            log.exception("generation failed for a batch of %d rows", len(rows) + len(joined))
            for row in rows + joined:
                row.fail(f"generation failed: {type(e).__name__}: {e}")
        self.batches += 1
        self.rows_done += len(rows) + len(joined)

    def _run_job(self, job: _Job) -> None:
        if time.monotonic() > job.deadline or not job.future.set_running_or_notify_cancel():
            job.future.cancel()
            return
        try:
            job.future.set_result(job.fn())
        except Exception as e:
            job.future.set_exception(e)


def _live(rows: list[Row]) -> list[Row]:
    """The rows still wanted: a request that went away, or ran out of time, while it waited is ended here."""
    now = time.monotonic()
    live = []
    for row in rows:
        if row.cancelled:
            row.finish_reason = "cancelled"
        elif now > row.deadline:
            row.finish_reason = "timeout"
        else:
            live.append(row)
    return live
