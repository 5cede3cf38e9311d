"""A collisionless embedding table: one row per int64 id, per-slice optimizers.

Re-creates the hash table behind a Monolith feature slot
(``monolith/native_training/runtime/hash_table``) on torch tensors. Every id
gets its own row of ``sum(slice dims)`` float32 values, created on first sight
(once the occurrence filter admits it) with a per-id reproducible initializer;
each slice has its own optimizer and state; rows not updated for
``expire_time`` days are removed by ``evict_expired``.

All storage is a few dense tensors indexed by row (values [R, D], optimizer
state [R, d] per slice, last-update time [R], occurrence count [R]) plus a
``HashIndex`` from id to row; there are no per-id Python objects and no
Python loops over ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from monolith_torch.core.hashing import COLUMN_MUL, SPLITMIX_GAMMA, signed64, splitmix64, srl
from monolith_torch.core.tensor_lists import foreach_scale_
from monolith_torch.embedding import entry
from monolith_torch.embedding.feature import DEFAULT_EXPIRE_TIME, FeatureEmbTable, slice_key
from monolith_torch.embedding.hash_index import HashIndex

__all__ = ["EmbeddingTable", "initial_values", "learning_rate_at"]

_SECONDS_PER_DAY = 86400
_SM_GAMMA = signed64(SPLITMIX_GAMMA)
_COL_MUL = signed64(COLUMN_MUL)


def _stream_seed(seed: int, slot_id: int) -> int:
    x = torch.tensor([signed64(seed * SPLITMIX_GAMMA + slot_id * 0xC2B2AE3D27D4EB4F + 1)])
    return int(splitmix64(x)[0])


def _cpu_kernels():
    # As HashIndex: numba is imported on first use, by processes with CPU tables.
    from monolith_torch.embedding import kernels

    return kernels


_INITIALIZERS = (entry.ZerosInitializer, entry.ConstantsInitializer, entry.RandomUniformInitializer)


def _check_initializer(initializer: entry.Initializer) -> None:
    if not isinstance(initializer, _INITIALIZERS):
        raise TypeError(f"unsupported initializer {type(initializer).__name__}")


def _initial_values_torch(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int
) -> torch.Tensor:
    """The torch implementation of ``initial_values`` (used on CUDA; tests run it on CPU too)."""
    _check_initializer(initializer)
    n, d = ids.numel(), columns.numel()
    if isinstance(initializer, entry.ZerosInitializer):
        return torch.zeros((n, d), dtype=torch.float32, device=ids.device)
    if isinstance(initializer, entry.ConstantsInitializer):
        return torch.full((n, d), float(initializer.constant), dtype=torch.float32, device=ids.device)
    lo, hi = initializer.bounds()
    x = ids.long()[:, None] * _SM_GAMMA + (columns.long()[None, :] + 1) * _COL_MUL + stream
    bits = srl(splitmix64(x), 40)  # top 24 bits: exact in float32
    u = bits.to(torch.float32) * (1.0 / (1 << 24))
    return (lo + (hi - lo) * u).to(torch.float32)


def _write_initial_values(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int, out: torch.Tensor, kernels
) -> None:
    """Writes the initial values of ``ids`` [U] in ``columns`` [d] into ``out`` [U, d] float32, in place.

    ``out`` may be a strided block of a table's values, so no [U, d]
    temporary is made on CPU. ``kernels``: the compiled CPU kernels, or None
    for the torch implementation.
    """
    _check_initializer(initializer)
    if isinstance(initializer, entry.ZerosInitializer):
        out.zero_()
    elif isinstance(initializer, entry.ConstantsInitializer):
        out.fill_(float(initializer.constant))
    elif kernels is not None:
        lo, hi = initializer.bounds()
        # The same float32 rounding of the bounds as the torch ops (see fill_uniform).
        kernels.fill_uniform(
            ids.contiguous().numpy(), columns.contiguous().numpy(), stream, float(lo), float(hi - lo), out.numpy()
        )
    else:
        out.copy_(_initial_values_torch(initializer, ids, columns, stream))


def initial_values(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int
) -> torch.Tensor:
    """Initial values [U, d] of ``ids`` [U] in row columns ``columns`` [d].

    A counter-based generator: the value of (stream, id, column) is a hash of
    those three numbers, so an id gets the same initial row whatever batch,
    order, process or device first sees it. One implementation per device
    type, as ``HashIndex``: a compiled kernel for CPU ids (one call in place of
    ~25 small torch ops, whose dispatch cost dominated), torch ops elsewhere
    (CUDA); both give the same bits.

    Raises:
        TypeError: an unsupported initializer.
    """
    if ids.device.type != "cpu":
        return _initial_values_torch(initializer, ids, columns, stream)
    out = torch.empty((ids.numel(), columns.numel()), dtype=torch.float32)
    _write_initial_values(initializer, ids.long(), columns.long(), stream, out, _cpu_kernels())
    return out


def learning_rate_at(optimizer: entry.Optimizer, learning_rate_fn, global_step: int) -> float:
    """The learning rate of a slice at ``global_step``.

    ``learning_rate_fn`` (a float, or a function of the global step) overrides
    the optimizer's ``learning_rate``; ``warmup_steps`` then scales it linearly
    from 0 (Monolith's polynomial warmup with power 1).
    """
    if callable(learning_rate_fn):
        lr = float(learning_rate_fn(global_step))
    elif learning_rate_fn is not None:
        lr = float(learning_rate_fn)
    else:
        lr = optimizer.effective_learning_rate()
    if optimizer.warmup_steps:
        lr *= min(global_step, optimizer.warmup_steps) / optimizer.warmup_steps
    return lr


def _state_names(optimizer: entry.Optimizer) -> tuple[str, ...]:
    if isinstance(optimizer, entry.SgdOptimizer):
        return ()
    if isinstance(optimizer, entry.AdagradOptimizer):
        return ("accumulator",)
    if isinstance(optimizer, entry.FtrlOptimizer):
        return ("n", "z")
    if isinstance(optimizer, entry.AdamOptimizer):
        return ("m", "v", "steps")
    raise TypeError(f"unsupported optimizer {type(optimizer).__name__}")


def _initial_state(optimizer: entry.Optimizer, name: str) -> float:
    if name in ("accumulator", "n"):
        return float(optimizer.initial_accumulator_value or 0.0)
    return 0.0


@dataclass(frozen=True)
class _Slice:
    start: int
    end: int
    segment: entry.Segment
    learning_rate_fn: object

    @property
    def optimizer(self) -> entry.Optimizer:
        return self.segment.optimizer


def _update_slice(opt: entry.Optimizer, lr: float, w: torch.Tensor, g: torch.Tensor, state: dict) -> torch.Tensor:
    """One optimizer step on gathered rows: ``w`` [U, d], summed grads ``g`` [U, d].

    ``state`` maps name -> gathered [U, d] tensors, updated in place.
    Returns the new ``w``.
    """
    if isinstance(opt, entry.SgdOptimizer):
        return w - lr * g
    if isinstance(opt, entry.AdagradOptimizer):
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        acc = state["accumulator"]
        acc.add_(g * g)
        # No epsilon, as Monolith's kernel: acc starts at initial_accumulator_value.
        return w - lr * g / acc.sqrt()
    if isinstance(opt, entry.FtrlOptimizer):
        n, z = state["n"], state["z"]
        l1 = float(opt.l1_regularization or 0.0)
        l2 = float(opt.l2_regularization or 0.0)
        beta = float(opt.beta or 0.0)
        if lr <= 0:  # warmup step 0: sigma would divide by zero; FTRL leaves the row as is
            return w
        n_new = n + g * g
        sigma = (n_new.sqrt() - n.sqrt()) / lr
        z.add_(g - sigma * w)
        n.copy_(n_new)
        w_new = lr * (torch.sign(z) * l1 - z) / (n.sqrt() + beta + l2 * lr)
        return torch.where(z.abs() > l1, w_new, torch.zeros_like(w_new))
    if isinstance(opt, entry.AdamOptimizer):
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        m, v, steps = state["m"], state["v"], state["steps"]
        steps.add_(1.0)
        m.mul_(opt.beta1).add_((1 - opt.beta1) * g)
        v.mul_(opt.beta2).add_((1 - opt.beta2) * g * g)
        m_hat = m / (1 - torch.pow(opt.beta1, steps))
        v_hat = v / (1 - torch.pow(opt.beta2, steps))
        return w - lr * m_hat / (v_hat.sqrt() + opt.epsilon)
    raise TypeError(f"unsupported optimizer {type(opt).__name__}")


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    cap = max(rows, 2 * t.shape[0], 16)
    out = t.new_zeros((cap,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


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
        self._stream = _stream_seed(self.seed, self.slot_id)
        # One initializer implementation per device type, as the index.
        self._init_kernels = _cpu_kernels() if self._device.type == "cpu" else None
        self._slices: list[_Slice] = []
        self._dim = 0
        self._index = HashIndex(expected_rows, device=self._device)
        self._values = torch.zeros((0, 0), dtype=torch.float32, device=self._device)
        self._states: list[dict[str, torch.Tensor]] = []
        self._times = torch.zeros(0, dtype=torch.int64, device=self._device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self._device)
        # Ids seen fewer than occurrence_threshold times: their counts and last-seen times.
        self._cand_index = HashIndex(device=self._device)
        self._cand_counts = torch.zeros(0, dtype=torch.int64, device=self._device)
        self._cand_times = torch.zeros(0, dtype=torch.int64, device=self._device)
        self._feature_combiners: dict[str, object] = {}
        self._current: dict[str, tuple[torch.Tensor, Mapping[str, torch.Tensor]]] = {}
        # Bumped whenever rows move (eviction, restore), so cached rows go stale.
        self.generation = 0

    # -- FeatureEmbTable ---------------------------------------------------

    def add_feature_slice(self, segment: entry.Segment, learning_rate_fn=None) -> None:
        """Appends ``segment.dim_size`` columns with their initializer and optimizer.

        Raises:
            RuntimeError: the table already holds rows.
            TypeError: an unsupported initializer or optimizer.
            ValueError: Adam options this store does not implement.
        """
        if len(self._index):
            raise RuntimeError(f"table {self.name!r} already holds rows; add slices before the first lookup")
        if not isinstance(segment, entry.Segment):
            raise TypeError(f"segment must be an entry.Segment, got {type(segment).__name__}")
        names = _state_names(segment.optimizer)
        _check_initializer(segment.initializer)
        opt = segment.optimizer
        if isinstance(opt, entry.AdamOptimizer) and (opt.use_beta1_warmup or opt.use_nesterov):
            raise ValueError("AdamOptimizer: use_beta1_warmup and use_nesterov are not supported by this store")
        if learning_rate_fn is not None and not callable(learning_rate_fn):
            lr = float(learning_rate_fn)
            if not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"Invalid learning_rate_fn: {learning_rate_fn!r} (expected a float > 0 or a callable)")
        d = segment.dim_size
        self._slices.append(_Slice(self._dim, self._dim + d, segment, learning_rate_fn))
        self._dim += d
        # Capacity >= 1 so gathering row 0 for absent ids (masked to zero) always works.
        cap = max(16, self._values.shape[0])
        self._values = torch.zeros((cap, self._dim), dtype=torch.float32, device=self._device)
        self._states.append({n: torch.zeros((cap, d), dtype=torch.float32, device=self._device) for n in names})

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
        states = sum(t.numel() * t.element_size() for s in self._states for t in s.values())
        return {
            "values": self._values.numel() * 4,
            "optimizer_state": states,
            "times_counts": self._times.numel() * 8 + self._counts.numel() * 8,
            "index": self._index.nbytes(),
            "filter": self._cand_index.nbytes() + self._cand_counts.numel() * 16,
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
        else:
            rows = self._admit(ids, now)
            present = rows[rows >= 0]
        self._counts.index_add_(0, present, torch.ones_like(present))
        return rows

    def _admit(self, ids: torch.Tensor, now: int) -> torch.Tensor:
        rows = self._index.lookup(ids)
        miss = (rows < 0).nonzero().squeeze(1)
        if miss.numel() == 0:
            return rows
        cand = ids[miss]
        crow, _ = self._cand_index.insert(cand)
        self._cand_counts = _grow(self._cand_counts, self._cand_index.num_rows)
        self._cand_times = _grow(self._cand_times, self._cand_index.num_rows)
        self._cand_counts.index_add_(0, crow, torch.ones_like(crow))
        self._cand_times[crow] = now
        ready = self._cand_counts[crow] >= self.occurrence_threshold
        admitted = torch.unique(cand[ready])
        if admitted.numel() == 0:
            return rows
        # This batch's occurrences are counted again by the caller once they have rows.
        seen = self._cand_counts[self._cand_index.lookup(admitted)]
        batch = torch.zeros_like(seen).index_add_(
            0, torch.searchsorted(admitted, cand[ready]), torch.ones_like(cand[ready])
        )
        self._cand_index.remove(admitted)
        new_rows, new_keys = self._index.insert(admitted)
        self._init_rows(new_keys, now)
        self._counts[new_rows] = seen - batch
        rows[miss] = self._index.lookup(cand)
        return rows

    def _init_rows(self, new_keys: torch.Tensor, now: int) -> None:
        n_new = new_keys.numel()
        if n_new == 0:
            return
        total = self._index.num_rows
        start = total - n_new
        self._values = _grow(self._values, total)
        self._times = _grow(self._times, total)
        self._counts = _grow(self._counts, total)
        for i, sl in enumerate(self._slices):
            cols = torch.arange(sl.start, sl.end, device=self._device)
            _write_initial_values(
                sl.segment.initializer, new_keys, cols, self._stream,
                self._values[start:total, sl.start:sl.end], self._init_kernels,
            )
            for name, t in self._states[i].items():
                t = _grow(t, total)
                t[start:total] = _initial_state(sl.optimizer, name)
                self._states[i][name] = t
        self._times[start:total] = now
        self._counts[start:total] = 0

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Values [N, D] of ``rows`` [N]; zeros where a row is -1. A copy."""
        if rows.numel() == 0 or int(rows.min()) >= 0:  # the common case: every id has a row
            return self._values.index_select(0, rows)
        out = self._values.index_select(0, rows.clamp_min(0))
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
        w = self._values.index_select(0, urows)
        for i, sl in enumerate(self._slices):
            lr = learning_rate_at(sl.optimizer, sl.learning_rate_fn, global_step)
            state = {n: t.index_select(0, urows) for n, t in self._states[i].items()}
            w[:, sl.start:sl.end] = _update_slice(
                sl.optimizer, lr, w[:, sl.start:sl.end], gsum[:, sl.start:sl.end], state
            )
            for n, t in state.items():
                self._states[i][n].index_copy_(0, urows, t)
        self._values.index_copy_(0, urows, w)
        self._times.index_fill_(0, urows, now)
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
        keep = (self._times[rows] >= cutoff).nonzero().squeeze(1)
        removed = keys.numel() - keep.numel()
        if removed:
            kept_rows = rows[keep]
            self._values = self._values[kept_rows]
            self._times = self._times[kept_rows]
            self._counts = self._counts[kept_rows]
            self._states = [{n: t[kept_rows] for n, t in s.items()} for s in self._states]
            self._index.rebuild(keys[keep], torch.arange(keep.numel(), device=self._device))
            self.generation += 1
        ckeys, crows = self._cand_index.items()
        ckeep = (self._cand_times[crows] >= cutoff).nonzero().squeeze(1)
        if ckeep.numel() != ckeys.numel() or self._cand_index.num_rows != ckeys.numel():
            kept = crows[ckeep]
            self._cand_counts = self._cand_counts[kept]
            self._cand_times = self._cand_times[kept]
            self._cand_index.rebuild(ckeys[ckeep], torch.arange(ckeep.numel(), device=self._device))
        return removed

    # -- state -------------------------------------------------------------

    def _config_signature(self) -> list:
        return [[s.end - s.start, type(s.optimizer).__name__] for s in self._slices]

    def state_dict(self) -> dict:
        """Ids, values, optimizer state, last-update times, occurrence counts (rows in id-table order)."""
        keys, rows = self._index.items()
        ckeys, crows = self._cand_index.items()
        state = {
            "slices": self._config_signature(),
            "keys": keys.cpu(),
            "values": self._values[rows].cpu(),
            "times": self._times[rows].cpu(),
            "counts": self._counts[rows].cpu(),
            "cand_keys": ckeys.cpu(),
            "cand_counts": self._cand_counts[crows].cpu(),
            "cand_times": self._cand_times[crows].cpu(),
        }
        for i, s in enumerate(self._states):
            for n, t in s.items():
                state[f"state.{i}.{n}"] = t[rows].cpu()
        return state

    def check_state_dict(self, state: Mapping) -> None:
        """Raises ValueError if ``state`` does not fit this table's slices; changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        sig = [list(x) for x in state.get("slices", [])]
        if sig != self._config_signature():
            raise ValueError(f"table {self.name!r}: saved slices {sig} do not match {self._config_signature()}")
        expected = {"keys", "values", "times", "counts", "cand_keys", "cand_counts", "cand_times"}
        expected |= {f"state.{i}.{n}" for i, s in enumerate(self._states) for n in s}
        missing = expected - set(state)
        if missing:
            raise ValueError(f"table {self.name!r}: state is missing {sorted(missing)}")
        r = state["keys"].shape[0]
        shapes = {"keys": (r,), "values": (r, self._dim), "times": (r,), "counts": (r,)}
        c = state["cand_keys"].shape[0]
        shapes.update({"cand_keys": (c,), "cand_counts": (c,), "cand_times": (c,)})
        for i, s in enumerate(self._states):
            d = self._slices[i].end - self._slices[i].start
            shapes.update({f"state.{i}.{n}": (r, d) for n in s})
        for k, shape in shapes.items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"table {self.name!r}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
        for k in ("keys", "cand_keys"):
            if state[k].numel() and torch.unique(state[k]).numel() != state[k].numel():
                raise ValueError(f"table {self.name!r}: {k} holds duplicate ids")

    def load_state_dict(self, state: Mapping) -> None:
        """Replaces all rows with ``state``; validates everything first."""
        self.check_state_dict(state)
        dev = self._device
        r = state["keys"].shape[0]
        self._values = state["values"].to(dev, torch.float32).clone()
        self._times = state["times"].to(dev, torch.int64).clone()
        self._counts = state["counts"].to(dev, torch.int64).clone()
        self._states = [
            {n: state[f"state.{i}.{n}"].to(dev, torch.float32).clone() for n in s} for i, s in enumerate(self._states)
        ]
        self._index.rebuild(state["keys"].to(dev), torch.arange(r, device=dev))
        c = state["cand_keys"].shape[0]
        self._cand_counts = state["cand_counts"].to(dev, torch.int64).clone()
        self._cand_times = state["cand_times"].to(dev, torch.int64).clone()
        self._cand_index.rebuild(state["cand_keys"].to(dev), torch.arange(c, device=dev))
        self._current.clear()
        self.generation += 1
