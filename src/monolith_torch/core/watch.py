"""Wake-ups when folders change: a ``watchdog`` observer that sets an event.

Used where a loop waits for files (``train --follow``'s data folders, the
server's export folder): the loop waits on the event with a timeout and lists
the folder itself, so a missed or refused watch only makes it poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

__all__ = ["watch_folders"]

logger = logging.getLogger("monolith_torch.core.watch")


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event):
        super().__init__()
        self._wake = wake

    def on_any_event(self, event) -> None:
        self._wake.set()


def watch_folders(folders: Iterable[str], wake: threading.Event):
    """Starts a daemon observer that sets ``wake`` on any change in ``folders`` (not their subfolders).

    Returns:
        The observer (``stop()`` and ``join()`` it when done), or None when the
        system refuses the watch (e.g. out of inotify watches; logged): poll then.
    """
    observer = Observer()
    try:
        for folder in dict.fromkeys(folders):
            observer.schedule(_Wake(wake), folder, recursive=False)
        observer.daemon = True
        observer.start()
    except OSError as e:
        logger.warning("cannot watch %s for changes (%s); polling instead", list(folders), e)
        return None
    return observer
