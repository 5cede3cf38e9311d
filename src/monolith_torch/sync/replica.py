"""The serving side of parameter sync: a model kept in step with an export folder.

``Replica`` holds a factory's tables and a dense model built the way the
trainer built them, and applies publications (``sync.format``) in sequence
order: the newest full snapshot first, then every later delta. A delta whose
base is not the version held, a corrupt publication, or one of another run is
refused (counted and logged once) and the replica keeps the version it has;
when deltas are missing (pruned, or one was refused) it waits for the next
full snapshot and jumps to it.

Reading and checking a publication happens outside ``lock``; only applying
it runs under it, so callers that score under the same lock always see one
whole version.

May import ``monolith_torch.core``, ``embedding`` and ``sync.format``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping

import torch

from monolith_torch.sync.format import (
    Publication,
    SyncError,
    folder_key,
    list_publications,
    read_publication,
)

__all__ = ["Replica", "apply_publication", "check_publication"]

logger = logging.getLogger("monolith_torch.sync.replica")


def check_publication(pub: Publication, tables: Mapping, model: torch.nn.Module) -> None:
    """Raises ``SyncError`` if ``pub`` does not fit the tables' slots and dims or the model's parameters."""
    if set(pub.tables) != set(tables):
        raise SyncError(f"{pub.path!r}: tables {sorted(pub.tables)} do not match the model's {sorted(tables)}")
    for name, rows in pub.tables.items():
        if rows.values.shape[1] != tables[name].dim:
            raise SyncError(f"{pub.path!r}: table {name!r} has dim {rows.values.shape[1]}, "
                            f"the model's has {tables[name].dim}")
    if pub.dense is not None:
        own = model.state_dict()
        if set(pub.dense) != set(own):
            raise SyncError(f"{pub.path!r}: dense parameters {sorted(set(pub.dense) ^ set(own))} do not match")
        for name, value in pub.dense.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise SyncError(f"{pub.path!r}: dense parameter {name!r} has shape {value.shape}, "
                                f"the model's {tuple(own[name].shape)}")


def apply_publication(pub: Publication, tables: Mapping, model: torch.nn.Module) -> None:
    """Applies ``pub`` to ``tables`` (slot -> ``EmbeddingTable``) and ``model``; checks everything first."""
    check_publication(pub, tables, model)
    for name, rows in pub.tables.items():
        table = tables[name]
        if pub.kind == "full":
            table.clear()
        elif rows.removed.size:
            table.remove_ids(torch.from_numpy(rows.removed))
        if rows.ids.size:
            table.assign_rows(torch.from_numpy(rows.ids), torch.from_numpy(rows.values))
    if pub.dense is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in pub.dense.items()})


class Replica:
    """Tables and a model kept at the newest version an export folder offers.

    Attributes:
        seq: the sequence number applied last (None: nothing yet).
        run_id: the run whose publications it applies (set by the first full snapshot).
        global_step, clock: of the publication applied last.
        refused: publications refused so far; ``last_error`` says why the newest was.
    """

    def __init__(self, tables: Mapping, model: torch.nn.Module, lock=None):
        self.tables = dict(tables)
        self.model = model
        self.lock = lock if lock is not None else threading.Lock()
        self.seq: int | None = None
        self.run_id: str | None = None
        self.global_step = 0
        self.clock = 0.0
        self.wall_time = 0.0
        self.refused = 0
        self.last_error: str | None = None
        self._refused: set[tuple[int, int, int]] = set()  # (seq, inode, ctime): a folder replaced later is read again

    def _next(self, pubs: list[tuple[int, str, str]]) -> tuple[int, str, str] | None:
        """The publication to apply next: the next seq, else the newest full snapshot ahead (a jump)."""
        ahead = [p for p in pubs if (self.seq is None or p[0] > self.seq) and folder_key(p[0], p[2]) not in self._refused]
        fulls = [p for p in ahead if p[1] == "full"]
        if self.seq is None:
            return fulls[-1] if fulls else None
        if ahead and ahead[0][0] == self.seq + 1:
            return ahead[0]
        return fulls[-1] if fulls else None

    def poll(self, export_dir: str) -> int:
        """Applies every publication that is due; returns how many were applied."""
        applied = 0
        while True:
            nxt = self._next(list_publications(export_dir))
            if nxt is None:
                return applied
            seq, kind, path = nxt
            try:
                pub = read_publication(path, self.run_id)
                check_publication(pub, self.tables, self.model)
                if kind == "delta" and pub.base_seq != self.seq:
                    raise SyncError(f"{path!r}: applies on {pub.base_seq}, this replica holds {self.seq}")
            except SyncError as e:
                if os.path.isdir(path):
                    self._refuse(nxt, str(e))
                continue  # else pruned while it was read: list again
            with self.lock:
                apply_publication(pub, self.tables, self.model)
                self.seq, self.run_id = pub.seq, pub.run_id
                self.global_step, self.clock, self.wall_time = pub.global_step, pub.clock, pub.wall_time
            applied += 1

    def _refuse(self, pub: tuple[int, str, str], why: str) -> None:
        self._refused.add(folder_key(pub[0], pub[2]))
        self.refused += 1
        self.last_error = why
        logger.warning("refused publication %d: %s", pub[0], why)

    @contextlib.contextmanager
    def reading(self):
        """Holds the lock: scoring inside sees one version."""
        with self.lock:
            yield self
