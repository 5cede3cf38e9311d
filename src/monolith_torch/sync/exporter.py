"""The trainer's side of parameter sync: publishes full snapshots and deltas while it trains.

``DeltaExporter`` plays Monolith's parameter-sync push, as files (the format is
``sync.format``). At ``start`` it turns on change tracking in every table and
publishes a full snapshot; then, each time ``maybe_publish`` finds
``sync_every`` seconds passed on the run's clock (wall time, or data time for
replays), a delta of the rows changed since the last publication and the ids
removed since, with the dense parameters when ``dense_sync_every`` passed too;
every ``full_every`` a new full snapshot instead, after which publications
older than the previous full snapshot are removed (compaction: the folder
holds at most two snapshots and the deltas after the older one).

What a publication holds is copied on the training thread (the changed rows
only, except for full snapshots); writing the files, fsync and rename run on
one background thread, one publication in flight at a time. A write error is
raised by the next call.

May import ``monolith_torch.core``, ``embedding`` and ``sync.format``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from collections.abc import Callable

import torch

from monolith_torch.sync.format import (
    TableRows,
    list_publications,
    newest_run_id,
    prune_publications,
    remove_temp_publications,
    write_publication,
)

__all__ = ["DeltaExporter", "ExportError"]

logger = logging.getLogger("monolith_torch.sync.exporter")


class ExportError(ValueError):
    """An export folder that cannot be used (another run's publications, sharded tables)."""


def _check_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number of seconds >= 0)")
    return float(value)


class DeltaExporter:
    """Publishes a factory's tables and a model's parameters into ``export_dir``.

    Args:
        export_dir: the folder (created when missing).
        run_id: names the run; a folder holding another run's publications is refused.
        factory: a ``HashTableFeatureFactory`` (local or replicated; the caller
            runs the exporter on one rank).
        model: the dense model; its ``state_dict`` goes out as the dense parameters.
        model_settings: JSON-able settings a reader needs to rebuild the model
            (saved in every full snapshot).
        sync_every: seconds of the clock between deltas (0: after every step).
        dense_sync_every: seconds between the dense parameters going out.
        full_every: seconds between full snapshots (compaction).
        clock: the run's clock, seconds (``time.time``, or the data clock).
        keep_fulls: full snapshots kept by compaction (>= 1).

    Raises:
        ValueError: a bad interval.
        ExportError: sharded tables.
    """

    def __init__(self, export_dir: str, run_id: str, factory, model: torch.nn.Module, model_settings: dict,
                 sync_every: float = 10.0, dense_sync_every: float = 60.0, full_every: float = 3600.0,
                 clock: Callable[[], float] = time.time, keep_fulls: int = 2):
        if factory.shard_group() is not None:
            raise ExportError("export_dir: sharded tables cannot be exported yet (replicated or one process only)")
        if not isinstance(keep_fulls, int) or keep_fulls < 1:
            raise ValueError(f"Invalid keep_fulls: {keep_fulls!r} (expected an int >= 1)")
        self.export_dir = export_dir
        self.run_id = run_id
        self.factory = factory
        self.model = model
        self.model_settings = model_settings
        self.sync_every = _check_interval("sync_every", sync_every)
        self.dense_sync_every = _check_interval("dense_sync_every", dense_sync_every)
        self.full_every = _check_interval("full_every", full_every)
        self.clock = clock
        self.keep_fulls = keep_fulls
        self.seq = 0
        self.published = 0
        self._last: dict[str, float | None] = {"sync": 0.0, "dense": 0.0, "full": 0.0}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None

    def check(self) -> None:
        """Raises ``ExportError`` if ``export_dir`` is unusable (a file, or another run's publications)."""
        if os.path.lexists(self.export_dir) and (os.path.islink(self.export_dir) or not os.path.isdir(self.export_dir)):
            raise ExportError(f"Invalid export_dir: {self.export_dir!r} (a file or a link, not a folder)")
        other = newest_run_id(self.export_dir)
        if other is not None and other != self.run_id:
            raise ExportError(f"Invalid export_dir: {self.export_dir!r} holds the publications of another run "
                              f"({other!r}); use an empty folder")

    def start(self, global_step: int) -> None:
        """Checks the folder, turns on change tracking and publishes a full snapshot (synchronously)."""
        self.check()
        os.makedirs(self.export_dir, exist_ok=True)
        remove_temp_publications(self.export_dir)
        pubs = list_publications(self.export_dir)
        self.seq = pubs[-1][0] if pubs else 0
        for table in self.factory.tables.values():
            table.track_changes()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")
        now = self.clock()
        self._publish("full", global_step, now)
        self._wait()
        if not now:  # a data clock before the first row: the intervals start with the first step
            self._last = dict.fromkeys(self._last)

    def maybe_publish(self, global_step: int) -> bool:
        """Publishes what is due on the clock; returns whether it published."""
        now = self.clock()
        if self._last["sync"] is None:
            self._last = dict.fromkeys(self._last, now)
            return False
        if now - self._last["full"] >= self.full_every > 0:
            self._publish("full", global_step, now)
        elif now - self._last["sync"] >= self.sync_every:
            self._publish("delta", global_step, now)
        else:
            return False
        return True

    def finish(self, global_step: int) -> None:
        """Publishes a last delta with the dense parameters and waits for the writes."""
        if self._pool is None:
            return
        try:
            self._publish("delta", global_step, self.clock(), dense=True)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _publish(self, kind: str, global_step: int, now: float, dense: bool = False) -> None:
        self._wait()  # one publication in flight: its error surfaces here, and order is kept
        full = kind == "full"
        tables, rows = {}, {}
        for name, table in self.factory.tables.items():
            if full:
                table.take_changes()  # forget: everything goes out
                ids, values = table.serving_rows()
                removed = ids[:0]
            else:
                ids, values, removed = table.take_changes()
            tables[name] = TableRows(ids.numpy(), values.numpy(), removed.numpy())
            rows[name] = len(table)
        with_dense = full or dense or now - self._last["dense"] >= self.dense_sync_every
        params = ({k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
                  if with_dense else None)
        self.seq += 1
        seq = self.seq
        self._last["sync"] = now
        if with_dense:
            self._last["dense"] = now
        if full:
            self._last["full"] = now
        args = (self.export_dir, seq, kind, self.run_id, tables, rows, params, int(global_step), now, time.time(),
                self.model_settings if full else None)
        self._pending = self._pool.submit(self._write, full, args)

    def _write(self, full: bool, args: tuple) -> None:
        path = write_publication(*args)
        self.published += 1
        logger.debug("published %s", path)
        if full:
            for old in prune_publications(self.export_dir, self.keep_fulls):
                logger.debug("compacted: removed %s", old)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

