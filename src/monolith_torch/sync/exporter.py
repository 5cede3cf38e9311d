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

Sharded tables (``HashTableFeatureFactory(sharded=True)`` over several
processes): every rank runs an exporter over the same folder, and ``start``,
``publish`` and ``finish`` are collectives. Each rank writes its own rows as
part ``rank`` of every table (on the training thread: the parts are small
deltas, except the full snapshots), rank 0 the dense parameters and the
manifest, which lists the parts in rank order; rank 0's clock decides what
is due (``due``), and the caller tells every rank (the trainer does it with
one tiny allreduce per step).

May import ``monolith_torch.core``, ``embedding`` and ``sync.format``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import shutil
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from monolith_torch.sync.format import (
    TableRows,
    begin_publication,
    finish_publication,
    list_publications,
    newest_run_id,
    prune_publications,
    remove_temp_publications,
    write_parts,
    write_publication,
)

__all__ = ["DeltaExporter", "ExportError", "check_export_dir"]

logger = logging.getLogger("monolith_torch.sync.exporter")


class ExportError(ValueError):
    """An export folder that cannot be used (a file or a link, or another run's publications)."""


def _check_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number of seconds >= 0)")
    return float(value)


def check_export_dir(export_dir: str, run_id: str | None) -> None:
    """Raises ``ExportError`` if run ``run_id`` cannot publish into ``export_dir``; changes nothing.

    Unusable: a file or a link, or a folder holding another run's publications
    (``run_id`` None: a run without an id yet, for which any publication is another run's).
    """
    if os.path.lexists(export_dir) and (os.path.islink(export_dir) or not os.path.isdir(export_dir)):
        raise ExportError(f"Invalid export_dir: {export_dir!r} (a file or a link, not a folder)")
    other = newest_run_id(export_dir)
    if other is not None and other != run_id:
        raise ExportError(f"Invalid export_dir: {export_dir!r} holds the publications of another run "
                          f"({other!r}); use an empty folder")


class DeltaExporter:
    """Publishes a factory's tables and a model's parameters into ``export_dir``.

    Args:
        export_dir: the folder (created when missing).
        run_id: names the run; a folder holding another run's publications is refused.
        factory: a ``HashTableFeatureFactory``: local, or replicated (run the
            exporter on one rank), or sharded (run it on every rank).
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
    """

    def __init__(self, export_dir: str, run_id: str, factory, model: torch.nn.Module, model_settings: dict,
                 sync_every: float = 10.0, dense_sync_every: float = 60.0, full_every: float = 3600.0,
                 clock: Callable[[], float] = time.time, keep_fulls: int = 2):
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
        self.group = factory.shard_group()
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.world = dist.get_world_size(self.group) if self.group is not None else 1

    def check(self) -> None:
        """Raises ``ExportError`` if ``export_dir`` is unusable (see ``check_export_dir``)."""
        check_export_dir(self.export_dir, self.run_id)

    def _rank0_then_share(self, fn: Callable[[], object]) -> object:
        """Runs ``fn`` on rank 0 and hands its result (or error) to every rank; raises that error everywhere."""
        out: list = [None, None]
        if self.rank == 0:
            try:
                out[0] = fn()
            except (OSError, ValueError) as e:
                out[1] = e
        if self.group is not None:
            dist.broadcast_object_list(out, src=dist.get_global_rank(self.group, 0), group=self.group)
        if out[1] is not None:
            raise out[1]
        return out[0]

    def _open_folder(self) -> int:
        self.check()
        os.makedirs(self.export_dir, exist_ok=True)
        remove_temp_publications(self.export_dir)
        pubs = list_publications(self.export_dir)
        return pubs[-1][0] if pubs else 0

    def start(self, global_step: int) -> None:
        """Checks the folder, turns on change tracking and publishes a full snapshot (sharded: a collective)."""
        self.seq = self._rank0_then_share(self._open_folder)
        for table in self.factory.tables.values():
            table.track_changes()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")
        now = self.clock()
        self.publish("full", global_step, now)
        self._wait()
        if not now:  # a data clock before the first row: the intervals start with the first step
            self._last = dict.fromkeys(self._last)

    def due(self, now: float | None = None) -> str | None:
        """What the clock says is due: "full", "delta" or None (sharded: rank 0's answer counts)."""
        now = self.clock() if now is None else now
        if self._last["sync"] is None:
            self._last = dict.fromkeys(self._last, now)
            return None
        if now - self._last["full"] >= self.full_every > 0:
            return "full"
        if now - self._last["sync"] >= self.sync_every:
            return "delta"
        return None

    def maybe_publish(self, global_step: int) -> bool:
        """Publishes what is due on the clock; returns whether it published. Not for sharded tables (use ``due``)."""
        now = self.clock()
        kind = self.due(now)
        if kind is not None:
            self.publish(kind, global_step, now)
        return kind is not None

    def finish(self, global_step: int) -> None:
        """Publishes a last delta with the dense parameters and waits for the writes (sharded: a collective)."""
        if self._pool is None:
            return
        try:
            self.publish("delta", global_step, self.clock(), dense=True)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def publish(self, kind: str, global_step: int, now: float | None = None, dense: bool = False) -> None:
        """Publishes a full snapshot or a delta now (sharded: a collective, every rank with the same ``kind``)."""
        now = self.clock() if now is None else now
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
                  if with_dense and self.rank == 0 else None)
        self.seq += 1
        self._last["sync"] = now
        if with_dense:
            self._last["dense"] = now
        if full:
            self._last["full"] = now
        meta = (self.seq, kind, self.run_id)
        tail = (params, int(global_step), now, time.time(), self.model_settings if full else None)
        if self.group is None:
            self._pending = self._pool.submit(self._write, full, meta, tables, rows, tail)
            return
        # Sharded: each rank writes its parts into rank 0's folder, rank 0 the manifest.
        folder = self._rank0_then_share(lambda: begin_publication(self.export_dir, self.seq, kind))
        try:
            mine = (write_parts(folder, kind, tables, part=self.rank), rows, None)
        except (OSError, ValueError) as e:
            mine = (None, rows, f"rank {self.rank}: {type(e).__name__}: {e}")
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.group)
        failed = [m[2] for m in everyone if m[2] is not None]
        if failed:
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            raise OSError(f"publication {self.seq} not written: {'; '.join(failed)}")
        if self.rank == 0:
            self._pending = self._pool.submit(self._finish, full, meta, folder, [m[0] for m in everyone],
                                              [m[1] for m in everyone], tail)

    def _write(self, full: bool, meta: tuple, tables: dict, rows: dict, tail: tuple) -> None:
        self._published(full, write_publication(self.export_dir, *meta, tables, rows, *tail))

    def _finish(self, full: bool, meta: tuple, folder: str, parts: list, rows: list, tail: tuple) -> None:
        totals = {name: sum(r[name] for r in rows) for name in rows[0]}
        self._published(full, finish_publication(self.export_dir, folder, *meta, parts, totals, *tail))

    def _published(self, full: bool, path: str) -> None:
        self.published += 1
        logger.debug("published %s", path)
        if full:
            for old in prune_publications(self.export_dir, self.keep_fulls):
                logger.debug("compacted: removed %s", old)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
