"""``Watcher``: the background thread that keeps a ``ServedModel`` at the newest version of its export folder.

It refreshes the model (``ServedModel.refresh``: build on the first full
snapshot, then apply what is due) when ``watchdog`` reports a change in the
folder, and every ``poll_s`` seconds anyway (file systems without change
events, a folder that appears later). A refresh that fails unexpectedly is
logged and retried on the next tick; the thread never dies of it.

May import ``monolith_torch.serve.model``.
"""

from __future__ import annotations

import logging
import math
import os
import threading

from monolith_torch.core.watch import watch_folders
from monolith_torch.serve.model import ServedModel

__all__ = ["Watcher"]

logger = logging.getLogger("monolith_torch.serve")


class Watcher:
    """Refreshes ``served`` on change events and every ``poll_s`` seconds, on its own thread.

    Raises (``__init__``):
        ValueError: ``poll_s`` not a finite number > 0.
    """

    def __init__(self, served: ServedModel, poll_s: float = 0.5):
        if isinstance(poll_s, bool) or not isinstance(poll_s, int | float) or not 0 < poll_s < math.inf:
            raise ValueError(f"Invalid poll_s: {poll_s!r} (expected a finite number of seconds > 0)")
        self.served = served
        self.poll_s = float(poll_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None
        self._failure: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monolith-serve-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread (after the refresh in progress, if any) and the observer."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None

    def _run(self) -> None:
        waiting_logged = was_ready = False
        while not self._stop.is_set():
            self._watch_folder()
            self._wake.clear()
            self._refresh()
            if not self.served.ready and not waiting_logged:
                logger.info("waiting for a full snapshot in %s", self.served.export_dir)
                waiting_logged = True
            if self.served.ready and not was_ready:
                replica = self.served.replica
                logger.info("ready: serving publication %d (global step %d, run %s)", replica.seq,
                            replica.global_step, replica.run_id)
                was_ready = True
            self._wake.wait(self.poll_s)

    def _refresh(self) -> None:
        try:
            applied = self.served.refresh()
        except Exception as e:  # the server must outlive any one bad folder state: log it, retry next tick
            message = f"{type(e).__name__}: {e}"
            if message != self._failure:
                logger.error("refreshing from %s failed: %s", self.served.export_dir, message)
            self._failure = message
            return
        self._failure = None
        if applied:
            logger.debug("applied %d publication(s), now at %s", applied, self.served.replica.seq)

    def _watch_folder(self) -> None:
        """Starts the watchdog observer once the folder exists (polling alone works without it)."""
        if self._observer is not None or not os.path.isdir(self.served.export_dir):
            return
        observer = watch_folders([self.served.export_dir], self._wake)
        self._observer = observer if observer is not None else _NoObserver()


class _NoObserver:
    """Stands in for an observer that could not start, so the folder is not retried every tick."""

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass
