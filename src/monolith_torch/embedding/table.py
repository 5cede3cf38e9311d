"""A collisionless embedding table: one row per int64 id, per-slice optimizers.

Re-creates the hash table behind a Monolith feature slot
(``monolith/native_training/runtime/hash_table``) on torch tensors. Every id
gets its own row of ``sum(slice dims)`` float32 values, created on first sight
(once the occurrence filter admits it) with a per-id reproducible initializer;
each slice has its own optimizer and state; rows not updated for
``expire_time`` days are removed by ``evict_expired``.

For parameter sync (``monolith_torch.sync``), a table can track which rows
changed: ``track_changes()`` turns it on, ``take_changes()`` returns the ids
and values of every row created or looked up for training since the last call
and the ids removed since, and ``assign_rows``/``remove_ids`` apply such
changes on the serving side.

All storage is a few dense tensors indexed by row (values [R, D], optimizer
state [R, d] per slice, last-update time [R], occurrence count [R]), kept
under their ``table_state`` field names, plus a ``HashIndex`` from id to
row; there are no per-id Python objects and no Python loops over ids.

Growth (``row_growth``): the row tensors grow by 1/16 of their rows, by at
least 1 MiB and at most doubling, so a large table's slack is at most 1/16 of
its rows; on Linux a CPU table's row tensors live in memory maps extended in
place.

This module is the storage: growth, the occurrence filter, expiry and
compaction, state. The update rules live in ``optimizers``, the initial
values in ``initializers``, the state layout in ``table_state``. May import
``monolith_torch.core`` and those ``embedding`` modules, ``entry``,
``feature`` and ``hash_index``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from monolith_torch.core.tensor_lists import foreach_scale_
from monolith_torch.embedding import entry, initializers, optimizers
from monolith_torch.embedding import table_state as ts
from monolith_torch.embedding.feature import DEFAULT_EXPIRE_TIME, FeatureEmbTable, slice_key
from monolith_torch.embedding.hash_index import HashIndex
from monolith_torch.embedding.row_growth import RowGrowth, copied

__all__ = ["EmbeddingTable"]

_SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class _Slice:
    start: int
    end: int
    segment: entry.Segment
    learning_rate_fn: object
    rule: optimizers.SliceOptimizer
    state_fields: Mapping[str, str]  # state name -> table_state field


class EmbeddingTable(FeatureEmbTable):
    """One slot's table: rows of ``sum(slice dims)`` float32 values keyed by int64 ids.

    Args:
        name: the slot name (used in error messages).
        slot_id: mixes into the initializer stream, so two slots differ.
        seed: mixes into the initializer stream.
        occurrence_threshold: an id gets a row once seen this many times in
            training lookups; before that it reads zeros and its gradients
            are dropped (0 and 1 both mean "at first sight").
        expire_time: days without an update after which ``evict_expired``
            removes a row.
        time_fn: seconds since the epoch; injectable for tests.
        expected_rows: pre-sizes the index.
        device: where the rows live.

    Raises:
        ValueError: negative ``occurrence_threshold``, ``expire_time`` <= 0.
    """

    def __init__(
        self,
        name: str = "",
        slot_id: int = 0,
        seed: int = 0,
        occurrence_threshold: int = 0,
        expire_time: float = DEFAULT_EXPIRE_TIME,
        time_fn: Callable[[], float] = time.time,
        expected_rows: int = 0,
        device=None,
    ):
        if isinstance(occurrence_threshold, bool) or not isinstance(occurrence_threshold, int) or occurrence_threshold < 0:
            raise ValueError(f"Invalid occurrence_threshold: {occurrence_threshold!r} (expected an int >= 0)")
        if not isinstance(expire_time, int | float) or not expire_time > 0:
            raise ValueError(f"Invalid expire_time: {expire_time!r} (expected a number of days > 0)")
        if not callable(time_fn):
            raise TypeError(f"time_fn must be callable, got {type(time_fn).__name__}")
        self.name = str(name)
        self.slot_id = int(slot_id)
        self.seed = int(seed)
        self.occurrence_threshold = occurrence_threshold
        self.expire_time = expire_time
        self._time_fn = time_fn
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._stream = initializers.stream_seed(self.seed, self.slot_id)
        # One initializer implementation per device type, as the index.
        self._init_kernels = initializers.kernels_for(self._device)
        self._slices: list[_Slice] = []
        self._dim = 0
        self._index = HashIndex(expected_rows, device=self._device)
        # Row fields but the keys (values, times, counts, optimizer state), by table_state name.
        self._rows = {ts.VALUES: torch.zeros((0, 0), dtype=torch.float32, device=self._device)}
        self._rows.update({k: torch.zeros(0, dtype=torch.int64, device=self._device) for k in (ts.TIMES, ts.COUNTS)})
        # Ids seen fewer than occurrence_threshold times: their counts and last-seen times.
        self._cand_index = HashIndex(device=self._device)
        self._cands = {k: torch.zeros(0, dtype=torch.int64, device=self._device) for k in (ts.CAND_COUNTS, ts.CAND_TIMES)}
        self._feature_combiners: dict[str, object] = {}
        self._current: dict[str, tuple[torch.Tensor, Mapping[str, torch.Tensor]]] = {}
        # Bumped whenever rows move (eviction, restore), so cached rows go stale.
        self.generation = 0
        # Grows the row and candidate tensors (row_growth: 1/16 steps, memory maps on Linux).
        self._growth = RowGrowth(self._device)
        # Change tracking (track_changes): a mark per row, and the ids removed since take_changes.
        self._touched: torch.Tensor | None = None
        self._removed: list[torch.Tensor] = []

    # -- FeatureEmbTable ---------------------------------------------------

    def add_feature_slice(self, segment: entry.Segment, learning_rate_fn=None) -> None:
        """Appends ``segment.dim_size`` columns with their initializer and optimizer.

        Raises:
            RuntimeError: the table already holds rows.
            TypeError: an unsupported initializer or optimizer (see ``optimizers.slice_optimizer_for``).
            ValueError: optimizer options its slice optimizer does not implement; a bad ``learning_rate_fn``.
        """
        if len(self._index):
            raise RuntimeError(f"table {self.name!r} already holds rows; add slices before the first lookup")
        if not isinstance(segment, entry.Segment):
            raise TypeError(f"segment must be an entry.Segment, got {type(segment).__name__}")
        rule = optimizers.slice_optimizer_for(segment.optimizer)
        initializers.check_initializer(segment.initializer)
        optimizers.check_learning_rate_fn(learning_rate_fn)
        d = segment.dim_size
        fields = {n: ts.state_field(len(self._slices), n) for n in rule.state_names}
        self._slices.append(_Slice(self._dim, self._dim + d, segment, learning_rate_fn, rule, fields))
        self._dim += d
        # Capacity >= 1 so gathering row 0 for absent ids (masked to zero) always works.
        cap = max(16, self._rows[ts.VALUES].shape[0])
        self._rows[ts.VALUES] = torch.zeros((cap, self._dim), dtype=torch.float32, device=self._device)
        self._rows.update({f: torch.zeros((cap, d), dtype=torch.float32, device=self._device) for f in fields.values()})

    def set_feature_metadata(self, feature_name: str, combiner) -> None:
        self._feature_combiners[feature_name] = combiner

    def embedding_lookup(self, feature_name: str, start: int | None, end: int | None) -> torch.Tensor:
        if feature_name not in self._current:
            raise KeyError(
                f"feature {feature_name!r} of table {self.name!r} has no looked-up embeddings; "
                "call factory.lookup(features) first"
            )
        leaf, slices = self._current[feature_name]
        if start is None and end is None:
            return leaf
        return slices[slice_key(feature_name, start, end)]

    def set_current(self, feature_name: str, leaf: torch.Tensor, slices: Mapping[str, torch.Tensor]) -> None:
        """Makes ``leaf`` [N, D] and its combined ``slices`` what ``embedding_lookup`` returns for the feature."""
        self._current[feature_name] = (leaf, slices)

    def combiner_of(self, feature_name: str):
        """The combiner registered for ``feature_name`` by ``set_feature_metadata``."""
        return self._feature_combiners[feature_name]

    # -- metadata ----------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def slice_dims(self) -> list[int]:
        return [s.end - s.start for s in self._slices]

    @property
    def feature_names(self) -> list[str]:
        return sorted(self._feature_combiners)

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return len(self._index)

    def nbytes(self) -> dict[str, int]:
        """Bytes used per part (allocated capacity, including growth slack)."""
        rows = self._rows
        return {
            "values": rows[ts.VALUES].numel() * 4,
            "optimizer_state": sum(t.numel() * t.element_size() for k, t in rows.items() if ts.is_state_field(k)),
            "times_counts": rows[ts.TIMES].numel() * 8 + rows[ts.COUNTS].numel() * 8,
            "index": self._index.nbytes(),
            "filter": self._cand_index.nbytes() + self._cands[ts.CAND_COUNTS].numel() * 16,
        }

    def _now(self) -> int:
        return int(self._time_fn())

    # -- lookup ------------------------------------------------------------

    def lookup_rows(self, ids: torch.Tensor, insert: bool = True) -> torch.Tensor:
        """Rows of ``ids`` [N] (-1 where the id has no row), counting occurrences.

        With ``insert`` (training), every occurrence counts toward the
        occurrence filter and admitted ids get initialized rows; without it
        (serving), nothing changes.
        """
        return self._lookup(ids, None, insert)

    def _admit(self, ids: torch.Tensor, now: int, occurrences: torch.Tensor | None = None) -> torch.Tensor:
        # ``occurrences`` [N]: how many times each of ``ids`` was seen (None: once each).
        rows = self._index.lookup(ids)
        miss = (rows < 0).nonzero().squeeze(1)
        if miss.numel() == 0:
            return rows
        cand = ids[miss]
        crow, _ = self._cand_index.insert(cand)
        self._growth.grow(self._cands, self._cand_index.num_rows)
        counts = self._cands[ts.CAND_COUNTS]
        seen_now = torch.ones_like(crow) if occurrences is None else occurrences[miss]
        counts.index_add_(0, crow, seen_now)
        self._cands[ts.CAND_TIMES][crow] = now
        ready = counts[crow] >= self.occurrence_threshold
        admitted = torch.unique(cand[ready])
        if admitted.numel() == 0:
            return rows
        # This batch's occurrences are counted again by the caller once they have rows.
        seen = counts[self._cand_index.lookup(admitted)]
        batch = torch.zeros_like(seen).index_add_(
            0, torch.searchsorted(admitted, cand[ready]), seen_now[ready]
        )
        self._cand_index.remove(admitted)
        new_rows, new_keys = self._index.insert(admitted)
        self._init_rows(new_keys, now)
        self._rows[ts.COUNTS][new_rows] = seen - batch
        rows[miss] = self._index.lookup(cand)
        return rows

    def lookup_unique_rows(self, ids: torch.Tensor, occurrences: torch.Tensor, insert: bool = True) -> torch.Tensor:
        """``lookup_rows`` of a batch given as its distinct ``ids`` [U] and their ``occurrences`` [U] (int64).

        The same rows, counts, filter state and row numbering as
        ``lookup_rows`` on the batch with every duplicate, for one index probe
        per distinct id (``HashEmbeddingBagCollection``'s fused path).
        """
        return self._lookup(ids, occurrences, insert)

    def _lookup(self, ids: torch.Tensor, occurrences: torch.Tensor | None, insert: bool) -> torch.Tensor:
        # ``occurrences`` [N]: how many times each of ``ids`` was seen (None: once each).
        if not self._slices:
            raise RuntimeError(f"table {self.name!r} has no slices; call add_feature_slice first")
        ids = self._check_ids(ids)
        if not insert:
            return self._index.lookup(ids)
        now = self._now()
        if self.occurrence_threshold <= 1:
            rows, new_keys = self._index.insert(ids)
            self._init_rows(new_keys, now)
            present = rows  # every id has a row now
            counts = torch.ones_like(rows) if occurrences is None else occurrences
        else:
            rows = self._admit(ids, now, occurrences)
            keep = (rows >= 0).nonzero().squeeze(1)
            present = rows[keep]
            counts = torch.ones_like(present) if occurrences is None else occurrences[keep]
        self._rows[ts.COUNTS].index_add_(0, present, counts)
        self._mark(present)
        return rows

    def row_storage(self) -> dict[str, torch.Tensor]:
        """The row tensors (``values`` [C, D], ``times``, ``counts``, ``state.{i}.{name}`` [C, d]), not copies.

        For compiled kernels that update rows in place (the fused path). C is
        the capacity (>= ``num_rows``); a growth, eviction or restore replaces
        them, so fetch them again after each lookup (and drop them: a growth
        extends a table's memory maps in place only while nothing else holds
        its row tensors, and copies otherwise).
        """
        return dict(self._rows)

    def slice_layout(self) -> list[tuple[int, int, optimizers.SliceOptimizer, object, dict[str, str]]]:
        """Per slice: (start, end, slice optimizer, learning_rate_fn, state name -> ``row_storage`` key)."""
        return [(sl.start, sl.end, sl.rule, sl.learning_rate_fn, dict(sl.state_fields)) for sl in self._slices]

    def now(self) -> int:
        """The table clock (``time_fn()``, whole seconds): what updates write into ``times``."""
        return self._now()

    def _init_rows(self, new_keys: torch.Tensor, now: int) -> None:
        n_new = new_keys.numel()
        if n_new == 0:
            return
        total = self._index.num_rows
        start = total - n_new
        cap = self._growth.grow(self._rows, total)
        rows = self._rows
        for sl in self._slices:
            cols = torch.arange(sl.start, sl.end, device=self._device)
            initializers.write_initial_values(
                sl.segment.initializer, new_keys, cols, self._stream,
                rows[ts.VALUES][start:total, sl.start:sl.end], self._init_kernels,
            )
            for name, field in sl.state_fields.items():
                rows[field][start:total] = sl.rule.initial_state(name)
        rows[ts.TIMES][start:total] = now
        rows[ts.COUNTS][start:total] = 0
        if self._touched is not None:
            if self._touched.shape[0] < cap:
                self._touched = copied(self._touched, cap)
            self._touched[start:total] = True

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Values [N, D] of ``rows`` [N]; zeros where a row is -1. A copy."""
        values = self._rows[ts.VALUES]
        if rows.numel() == 0 or int(rows.min()) >= 0:  # the common case: every id has a row
            return values.index_select(0, rows)
        if values.shape[0] == 0:  # every row evicted or cleared
            return values.new_zeros((rows.numel(), self._dim))
        out = values.index_select(0, rows.clamp_min(0))
        return out.masked_fill_((rows < 0)[:, None], 0.0)

    def lookup(self, ids: torch.Tensor, insert: bool = True) -> torch.Tensor:
        """Values [N, D] of ``ids`` [N]; see ``lookup_rows``."""
        return self.gather(self.lookup_rows(ids, insert))

    # -- update ------------------------------------------------------------

    def _check_ids(self, ids) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor of int64 ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must hold integers, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        return ids.to(self._device, torch.int64)

    def check_gradients(self, ids: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Validates ``ids`` [N] and ``grads`` [N, D] (metadata only); returns the ids as int64."""
        ids = self._check_ids(ids)
        if not isinstance(grads, torch.Tensor) or not grads.is_floating_point():
            raise TypeError(f"grads must be a floating-point tensor, got {getattr(grads, 'dtype', type(grads).__name__)}")
        if tuple(grads.shape) != (ids.numel(), self._dim):
            raise ValueError(
                f"grads of table {self.name!r} must have shape {(ids.numel(), self._dim)}, got {tuple(grads.shape)}"
            )
        return ids

    def apply_gradients(
        self,
        ids: torch.Tensor,
        grads: torch.Tensor,
        scale=1.0,
        global_step: int = 0,
        insert_missing: bool = False,
        rows: torch.Tensor | None = None,
        rows_generation: int | None = None,
    ) -> int:
        """Applies ``scale * sum of grads`` of each unique id with each slice's optimizer.

        Args:
            ids: [N] int64 ids, duplicates allowed.
            grads: [N, D] gradients of the rows of ``ids``.
            scale: a float or 0-d tensor multiplied into the summed gradient.
            global_step: the step the learning-rate functions see.
            insert_missing: create rows for ids without one (replicated tables
                receive ids first looked up on another rank); otherwise their
                gradients are dropped (ids the occurrence filter has not admitted).
            rows: the rows ``lookup_rows`` returned for ``ids``, to skip a second
                index probe; used only while ``rows_generation`` equals
                ``generation`` (no eviction or restore moved rows since).
            rows_generation: ``generation`` when ``rows`` were looked up.

        Returns:
            Number of rows updated.

        Raises:
            TypeError, ValueError: bad ids or gradients; nothing is written.
        """
        ids = self.check_gradients(ids, grads)
        if rows is not None and (
            not isinstance(rows, torch.Tensor) or rows.shape != ids.shape or rows.dtype != torch.int64
        ):
            raise ValueError(f"rows must be an int64 tensor of shape {tuple(ids.shape)}, got {rows!r}")
        now = self._now()
        if insert_missing:
            rows, new_keys = self._index.insert(ids)
            self._init_rows(new_keys, now)
        elif rows is None or rows_generation != self.generation:
            rows = self._index.lookup(ids)
        grads = grads.detach().to(self._device, torch.float32)
        if rows.numel() and int(rows.min()) < 0:  # ids the filter has not admitted: drop them
            keep = (rows >= 0).nonzero().squeeze(1)
            rows, grads = rows.index_select(0, keep), grads.index_select(0, keep)
        if rows.numel() == 0:
            return 0
        urows, inverse = torch.unique(rows, return_inverse=True)
        gsum = torch.zeros((urows.numel(), self._dim), dtype=torch.float32, device=self._device)
        gsum.index_add_(0, inverse, grads)
        foreach_scale_([gsum], scale)
        store = self._rows
        w = store[ts.VALUES].index_select(0, urows)
        for sl in self._slices:
            lr = optimizers.learning_rate_at(sl.rule.config, sl.learning_rate_fn, global_step)
            state = {n: store[f].index_select(0, urows) for n, f in sl.state_fields.items()}
            w[:, sl.start:sl.end] = sl.rule.update(w[:, sl.start:sl.end], gsum[:, sl.start:sl.end], state, lr)
            for n, t in state.items():
                store[sl.state_fields[n]].index_copy_(0, urows, t)
        store[ts.VALUES].index_copy_(0, urows, w)
        store[ts.TIMES].index_fill_(0, urows, now)
        self._mark(urows)
        return urows.numel()

    # -- expiry ------------------------------------------------------------

    def evict_expired(self, now: float | None = None) -> int:
        """Removes rows (and filter candidates) not updated for ``expire_time`` days.

        Rows are compacted, so row numbers change (``generation`` is bumped).

        Returns:
            Number of rows removed.
        """
        now = self._now() if now is None else int(now)
        cutoff = now - int(self.expire_time * _SECONDS_PER_DAY)
        keys, rows = self._index.items()
        removed = self._keep_rows(keys, rows, self._rows[ts.TIMES][rows] >= cutoff)
        ckeys, crows = self._cand_index.items()
        ckeep = (self._cands[ts.CAND_TIMES][crows] >= cutoff).nonzero().squeeze(1)
        if ckeep.numel() != ckeys.numel() or self._cand_index.num_rows != ckeys.numel():
            kept = crows[ckeep]
            self._cands = {k: t[kept] for k, t in self._cands.items()}
            self._cand_index.rebuild(ckeys[ckeep], torch.arange(ckeep.numel(), device=self._device))
        return removed

    def _keep_rows(self, keys: torch.Tensor, rows: torch.Tensor, keep_mask: torch.Tensor) -> int:
        """Compacts the table to the rows of ``keys``/``rows`` (``items()``) where ``keep_mask``; returns rows removed."""
        keep = keep_mask.nonzero().squeeze(1)
        removed = keys.numel() - keep.numel()
        if removed:
            kept_rows = rows[keep]
            self._rows = {k: t[kept_rows] for k, t in self._rows.items()}
            self._index.rebuild(keys[keep], torch.arange(keep.numel(), device=self._device))
            if self._touched is not None:
                self._removed.append(keys[~keep_mask])
                self._touched = self._touched[kept_rows]
            self.generation += 1
        return removed

    # -- change tracking and serving --------------------------------------

    def _mark(self, rows: torch.Tensor) -> None:
        if self._touched is not None:
            self._touched.index_fill_(0, rows, True)

    def track_changes(self, enable: bool = True) -> None:
        """Starts (or stops) recording which rows change; starting forgets earlier changes."""
        self._removed = []
        if not enable:
            self._touched = None
            return
        self._touched = torch.zeros(self._rows[ts.VALUES].shape[0], dtype=torch.bool, device=self._device)

    @property
    def tracks_changes(self) -> bool:
        return self._touched is not None

    def take_changes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows changed since the last call, and forgets them.

        Changed: created, looked up for training or updated (a superset of the
        rows whose values moved). Removed: evicted (or ``remove_ids``) and not
        present now, or present again after a removal (apply the removals
        first, then the rows).

        Returns:
            (ids [n] int64, values [n, D] float32 copies, removed ids [m] int64), on the CPU.

        Raises:
            RuntimeError: ``track_changes`` was not called.
        """
        if self._touched is None:
            raise RuntimeError(f"table {self.name!r} does not track changes; call track_changes() first")
        keys, rows = self._index.items(ordered=False)
        changed = self._touched[rows]
        rows = rows[changed]
        removed = torch.cat(self._removed) if self._removed else keys.new_zeros(0)
        out = (keys[changed].cpu(), self._rows[ts.VALUES].index_select(0, rows).cpu(), torch.unique(removed).cpu())
        self._touched.zero_()
        self._removed = []
        return out

    def serving_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [R] int64, values [R, D] float32) of every row, copies on the CPU: a full snapshot's content."""
        keys, rows = self._index.items()
        return keys.cpu(), self._rows[ts.VALUES].index_select(0, rows).cpu()

    def assign_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Sets the values of ``ids`` [n] (distinct) to ``values`` [n, D], creating rows as needed.

        Serving: applies the rows of a snapshot or delta. New rows get their
        slices' initial optimizer state; the occurrence filter is bypassed.

        Raises:
            TypeError, ValueError: bad ids or values (checked before anything changes).
        """
        ids = self._check_ids(ids)
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (ids.numel(), self._dim):
            raise ValueError(f"values of table {self.name!r} must have shape {(ids.numel(), self._dim)}, "
                             f"got {tuple(getattr(values, 'shape', ()))}")
        rows, new_keys = self._index.insert(ids)
        self._init_rows(new_keys, self._now())
        self._rows[ts.VALUES].index_copy_(0, rows, values.to(self._device, torch.float32))
        self._mark(rows)

    def remove_ids(self, ids: torch.Tensor) -> int:
        """Removes the rows of ``ids`` (absent ones ignored); compacts like ``evict_expired``. Returns rows removed."""
        ids = self._check_ids(ids)
        keys, rows = self._index.items()
        if ids.numel() == 0 or keys.numel() == 0:
            return 0
        return self._keep_rows(keys, rows, ~torch.isin(keys, ids))

    def clear(self) -> None:
        """Removes every row and filter candidate (a full snapshot replaces the table)."""
        keys, rows = self._index.items()
        self._keep_rows(keys, rows, torch.zeros_like(keys, dtype=torch.bool))
        self._cand_index.rebuild(keys[:0], rows[:0])
        self._cands = {k: t[:0] for k, t in self._cands.items()}
        self._current.clear()
        self._removed = []

    # -- state -------------------------------------------------------------

    def _config_signature(self) -> list:
        return [[s.end - s.start, type(s.rule.config).__name__] for s in self._slices]

    def state_dict(self) -> dict:
        """Ids, values, optimizer state, last-update times, occurrence counts (rows in id-table order).

        On the CPU, in ``table_state``'s layout.
        """
        keys, rows = self._index.items()
        ckeys, crows = self._cand_index.items()
        state = ts.make_state(
            self._config_signature(),
            {ts.KEYS: keys} | {k: t[rows] for k, t in self._rows.items()},
            {ts.CAND_KEYS: ckeys} | {k: t[crows] for k, t in self._cands.items()},
        )
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def check_state_dict(self, state: Mapping) -> None:
        """Raises ValueError if ``state`` does not fit this table's slices; changes nothing."""
        names = [sl.rule.state_names for sl in self._slices]
        ts.check_state(state, self._config_signature(), names, f"table {self.name!r}")

    def load_state_dict(self, state: Mapping) -> None:
        """Replaces all rows with ``state``; validates everything first."""
        self.check_state_dict(state)
        dev = self._device
        self._rows = {k: state[k].to(dev, t.dtype).clone() for k, t in self._rows.items()}
        self._cands = {k: state[k].to(dev, t.dtype).clone() for k, t in self._cands.items()}
        r, c = state[ts.KEYS].shape[0], state[ts.CAND_KEYS].shape[0]
        self._index.rebuild(state[ts.KEYS].to(dev), torch.arange(r, device=dev))
        self._cand_index.rebuild(state[ts.CAND_KEYS].to(dev), torch.arange(c, device=dev))
        self._current.clear()
        if self._touched is not None:
            self.track_changes()  # a restored table is published whole (a full snapshot), not as changes
        self.generation += 1
