"""``Batcher``: concurrent /predict requests coalesced into one parse and one forward.

Parsing a request's columns and running the model both cost a fixed few
milliseconds whatever the row count, so the server does not pay them per
request: one worker thread takes every request waiting (up to
``max_batch_rows`` rows), parses their rows together and scores them in one
forward, then hands each request its slice of the scores. Under load the
batches grow by themselves; a lone request goes out at once, alone. The
whole group is scored under the model's lock in one forward: every request
in it sees the same version.

A row that does not parse fails its own request only: the group is then
served request by request.

May import ``monolith_torch.train`` (``RowError``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable

from monolith_torch.train.readers import RowError

__all__ = ["Batcher", "Unavailable"]

logger = logging.getLogger("monolith_torch.serve")

Score = Callable[[list[dict]], tuple[list[float], dict]]


class Unavailable(RuntimeError):
    """The batcher takes no more requests now: too many rows wait already, or it is closing."""


class _Request:
    __slots__ = ("records", "future")

    def __init__(self, records: list[dict]):
        self.records = records
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Batcher:
    """Scores lists of rows on one worker thread, coalescing the requests that wait.

    Args:
        score: ``records -> (scores, version)``, raising ``RowError`` for a bad
            row (``ServedModel.score_records``).
        max_batch_rows: the most rows scored in one forward (a larger request
            still goes alone).
        max_queued_rows: ``submit`` raises ``Unavailable`` beyond this many waiting rows.
    """

    def __init__(self, score: Score, max_batch_rows: int = 4096, max_queued_rows: int = 65536):
        for name, value in (("max_batch_rows", max_batch_rows), ("max_queued_rows", max_queued_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
        self._score = score
        self.max_batch_rows = max_batch_rows
        self.max_queued_rows = max_queued_rows
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monolith-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, records: list[dict]) -> concurrent.futures.Future:
        """Queues ``records``; the future gives ``(scores, version)`` or raises ``RowError``.

        Raises:
            Unavailable: too many rows waiting already, or the batcher is closed.
        """
        request = _Request(records)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._queued_rows and self._queued_rows + len(records) > self.max_queued_rows:
                raise Unavailable(f"overloaded: {self._queued_rows} rows are waiting to be scored")
            self._queue.append(request)
            self._queued_rows += len(records)
            self._cond.notify()
        return request.future

    def close(self, timeout: float = 10.0) -> None:
        """Scores what is queued, then stops the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _take(self) -> list[_Request]:
        """The requests of the next group (called holding the condition): FIFO, up to ``max_batch_rows``."""
        group, rows = [], 0
        while self._queue and (not group or rows + len(self._queue[0].records) <= self.max_batch_rows):
            request = self._queue.popleft()
            self._queued_rows -= len(request.records)
            if request.future.set_running_or_notify_cancel():  # False: the client went away
                group.append(request)
                rows += len(request.records)
        return group

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group = self._take()
            if group:
                self._serve(group)

    def _serve(self, group: list[_Request]) -> None:
        if len(group) > 1:
            try:
                scores, version = self._score([r for request in group for r in request.records])
            except RowError:
                for request in group:  # find whose row it is: each request alone
                    self._serve([request])
                return
            except Exception as e:  # any failure goes to the requests; the worker lives on
                self._fail(group, e)
                return
            start = 0
            for request in group:
                end = start + len(request.records)
                request.future.set_result((scores[start:end], version))
                start = end
            return
        request = group[0]
        try:
            request.future.set_result(self._score(request.records))
        except Exception as e:  # RowError and the unexpected alike go to the request
            self._fail(group, e)

    @staticmethod
    def _fail(group: list[_Request], error: Exception) -> None:
        if not isinstance(error, RowError):
            logger.error("scoring failed: %s: %s", type(error).__name__, error)
        for request in group:
            request.future.set_exception(error)
