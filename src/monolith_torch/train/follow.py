"""Real-time input: files that keep arriving, each trained on once, and the clock a run keeps.

``FileStream`` follows the ``--data`` patterns of ``train --follow``: a
directory (every file in it whose name does not start with a dot) or a glob.
New files are taken once each, in name order, as they appear; the position
(files done, and the file being read with the rows of it already trained on)
goes into every checkpoint, so ``--resume`` continues with the next row:
nothing is trained twice, nothing skipped.

A file must appear whole: write it under a name starting with a dot (or in
another folder of the same file system) and rename it into place, as
``generate_criteo_stream`` and ``atomic_write`` do. ``watchdog`` wakes the
stream when a folder changes; it also re-lists every ``poll_s`` seconds, so
file systems without change events work too.

``RunClock`` is the run's time for expiry, the occurrence filter's last-seen
times and the export intervals: wall time (live use, as Monolith), or the data's
time (replays): the largest timestamp trained on so far.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from monolith_torch.core.watch import watch_folders
from monolith_torch.train.config import ConfigError

__all__ = ["FileStream", "RunClock", "StreamPosition", "check_follow_patterns"]

logger = logging.getLogger("monolith_torch.train.follow")


class RunClock:
    """Seconds since the epoch: ``time.time()`` (``kind="wall"``) or the largest data timestamp seen (``"data"``)."""

    def __init__(self, kind: str = "wall"):
        if kind not in ("wall", "data"):
            raise ValueError(f"Invalid clock: {kind!r} (expected wall or data)")
        self.kind = kind
        self.data_time = 0

    def advance(self, timestamps) -> None:
        """Moves the data clock to the batch's newest timestamp (never back); a no-op for the wall clock."""
        if self.kind == "data" and timestamps is not None and timestamps.numel():
            self.data_time = max(self.data_time, int(timestamps.max()))

    def __call__(self) -> float:
        return time.time() if self.kind == "wall" else float(self.data_time)


def _watch_folder(pattern: str) -> str:
    """The folder whose changes can add files matching ``pattern``."""
    if os.path.isdir(pattern):
        return pattern
    head = pattern
    while glob.has_magic(head):
        head = os.path.dirname(head)
    return head or "."


def check_follow_patterns(patterns: Sequence[str]) -> None:
    """Raises ``ConfigError`` unless every pattern is a folder or a glob in an existing folder."""
    if not patterns:
        raise ConfigError("follow needs --data: a folder (or glob) that receives files")
    for pattern in patterns:
        folder = _watch_folder(pattern)
        if not os.path.isdir(pattern) and not glob.has_magic(pattern):
            raise ConfigError(f"Invalid data: {pattern!r} (with --follow, a folder or a glob whose folder exists)")
        if not os.path.isdir(folder):
            raise ConfigError(f"Invalid data: {pattern!r} (folder {folder!r} does not exist)")


class StreamPosition:
    """Files done, the file being read and the rows of it already trained on; saved with checkpoints."""

    def __init__(self, done: Sequence[str] = (), current: str | None = None, rows: int = 0):
        self.done = set(done)
        self.current = current
        self.rows = rows

    def state_dict(self) -> dict:
        return {"done": sorted(self.done), "current": self.current, "rows": self.rows}

    @classmethod
    def from_state(cls, state) -> StreamPosition:
        try:
            done, current, rows = state["done"], state["current"], int(state["rows"])
            if not all(isinstance(d, str) for d in done) or not (current is None or isinstance(current, str)):
                raise TypeError("file names must be strings")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the checkpoint's stream position is unreadable ({e})") from None
        return cls(done, current, rows)


class FileStream:
    """The files of ``patterns`` not yet done, in name order, waiting for new ones.

    Args:
        patterns: folders or globs.
        position: what is done already (updated by the caller as it trains).
        poll_s: seconds between re-listings when no change event comes.
        idle_exit_s: stop after this many seconds without a new file (0: never).
        should_stop: polled while waiting; True ends the stream.
    """

    def __init__(self, patterns: Sequence[str], position: StreamPosition, poll_s: float = 1.0,
                 idle_exit_s: float = 0.0, should_stop: Callable[[], bool] = lambda: False):
        self.patterns = list(patterns)
        self.position = position
        self.poll_s = poll_s
        self.idle_exit_s = idle_exit_s
        self.should_stop = should_stop
        self._changed = threading.Event()
        self._observer = None

    def _listing(self) -> list[str]:
        found: set[str] = set()
        for pattern in self.patterns:
            if os.path.isdir(pattern):
                names = (os.path.join(pattern, n) for n in os.listdir(pattern) if not n.startswith("."))
            else:
                names = (p for p in glob.glob(pattern) if not os.path.basename(p).startswith("."))
            found.update(os.path.normpath(p) for p in names if os.path.isfile(p))
        return sorted(found - self.position.done)

    def _start_watching(self) -> None:
        self._observer = watch_folders({_watch_folder(p) for p in self.patterns}, self._changed)

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def files(self) -> Iterator[str]:
        """Yields each new file once, in name order (the current one first when resuming)."""
        self._start_watching()
        try:
            if self.position.current is not None:
                yield self.position.current
            idle_since = time.monotonic()
            while not self.should_stop():
                self._changed.clear()
                pending = [p for p in self._listing() if p != self.position.current]
                if pending:
                    yield pending[0]
                    idle_since = time.monotonic()
                    continue
                if self.idle_exit_s and time.monotonic() - idle_since >= self.idle_exit_s:
                    logger.info("no new data for %.1f s: stopping (--follow-idle-exit)", self.idle_exit_s)
                    return
                deadline = time.monotonic() + self.poll_s
                while not self.should_stop() and time.monotonic() < deadline:
                    if self._changed.wait(0.1):
                        break
        finally:
            self.close()

