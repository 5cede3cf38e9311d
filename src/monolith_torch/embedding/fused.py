"""The fused CPU path of ``HashEmbeddingBagCollection``: lookup, pooling, backward and update in few passes.

Per table and batch (``FusedEngine.forward``):

1. ``dedupe`` the ids of all the table's features at once (distinct ids in
   first-seen order, ``inverse``, occurrences), in a scratch set that stays
   in cache;
2. probe the table's index for the distinct ids only
   (``EmbeddingTable.lookup_unique_rows``: growth, occurrence counts and the
   occurrence filter as for every id; ids not admitted get row -1);
3. ``gather`` their rows into one [U, D] leaf (zeros for row -1);
4. ``pool`` every feature from the leaf over its CSR offsets (sum, mean,
   first L), in one compiled call; no per-id [N, D] tensor is made.

The backward (``_PooledLookup``) turns the outputs' gradients straight into
per-distinct-row sums [U, D] (the leaf's ``.grad``). ``FusedEngine.apply``
(``sparse_step``) updates the rows in place with each slice's compiled
optimizer (``fused_kernels``), in the same float32 operations as
``embedding.optimizers``. A slice optimizer without a compiled kernel (a
user's own) is applied by ``EmbeddingTable.apply_gradients``.

Under Monolith's step the leaves are the step's embedding variables
(``HashTableFeatureFactory.track_rows`` lets ``apply_gradients`` resolve
them), so clipping sees them and the factory's update applies them.

Kernels run on numba's threads (chunks of rows) when
``torch.get_num_threads() > 1``. May import ``embedding.fused_kernels``,
``embedding.optimizers``, ``embedding.table_state``, numpy and torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from monolith_torch.embedding import combiners as embedding_combiners
from monolith_torch.embedding import entry, optimizers
from monolith_torch.embedding import table_state as ts

__all__ = ["FusedEngine", "TableBatch", "fused_threads", "supports_fused"]

_KINDS = {embedding_combiners.ReduceSum: 0, embedding_combiners.ReduceMean: 1, embedding_combiners.FirstN: 2}


def supports_fused(factory, tables: Sequence) -> bool:
    """Whether the fused path applies: every table on the CPU, in a local placement."""
    return factory.placement.kind == "local" and all(t.device.type == "cpu" for t in tables)


def _compiled():
    # Imported on first use, as the hash index's kernels: numba's import and
    # the compilation (or cache load) are paid by processes that run the path.
    from monolith_torch.embedding import fused_kernels

    return fused_kernels


def fused_threads() -> int:
    """Threads the kernels use: ``torch.get_num_threads()``, at most numba's thread count."""
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _kernels(threads: int):
    if threads > 1:
        import numba

        numba.set_num_threads(threads)
    return _compiled().KERNELS[threads > 1]


def _rows_of(t: torch.Tensor, d: int) -> np.ndarray:
    """A contiguous [..., D] tensor as a 2-D numpy view (numpy's reshape costs less than torch's view)."""
    a = t.numpy()
    return a if a.ndim == 2 else a.reshape(-1, d)


class _TableFeatures:
    """A table and the features reading it, in the module's order (fixed at construction)."""

    def __init__(self, table, names: list[str], combiners: list):
        self.table = table
        self.names = names
        self.kinds = np.array([_KINDS[type(c)] for c in combiners], dtype=np.int64)
        self.limits = np.array([max(1, c.max_seq_length) for c in combiners], dtype=np.int64)
        self.dim = table.dim


class TableBatch:
    """One table's part of one fused forward: its distinct ids, their rows, the leaf, the CSR blocks.

    Attributes:
        table: the ``EmbeddingTable``.
        ids: [U] int64 distinct ids; occurrences [U] int64.
        rows: [U] int64 rows at ``generation`` (-1: no row).
        leaf: [U, D] float32, the rows' values; its ``.grad`` receives the
            per-distinct-row gradient sums.
    """

    __slots__ = ("features", "table", "ids", "occurrences", "rows", "generation", "leaf", "inverse", "bases",
                 "splits", "threads", "batch")

    def __init__(self, features: _TableFeatures, ids, occurrences, inverse, bases, splits):
        self.features = features
        self.table = features.table
        self.ids, self.occurrences = ids, occurrences
        self.inverse, self.bases, self.splits = inverse, bases, splits
        self.rows = None
        self.generation = None
        self.leaf = None
        self.threads = 1
        self.batch = None

    def current_rows(self) -> torch.Tensor:
        """``rows``, probed again if an eviction or restore moved rows since the lookup."""
        if self.generation == self.table.generation:
            return self.rows
        return self.table.lookup_unique_rows(self.ids, self.occurrences, insert=False)

    def pool(self, leaf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """The features' pooled outputs (of ``shapes``) from the distinct rows ``leaf`` [U, D]."""
        d = self.features.dim
        outs = [torch.empty(shape, dtype=torch.float32) for shape in shapes]
        _kernels(self.threads).pool(
            leaf.numpy(), self.inverse, self.bases, self.splits, self.features.kinds, self.features.limits,
            tuple(_rows_of(o, d) for o in outs),
        )
        return outs

    def scatter(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        d = self.features.dim
        n = self.ids.numel()
        # numpy's zeros (calloc) rather than torch's: torch fills in parallel on
        # its OpenMP threads, which then spin against numba's.
        g_out = torch.from_numpy(np.zeros((n, d), dtype=np.float32))
        arrays, has = [], np.zeros(len(grads), dtype=np.bool_)
        no_grad = np.zeros((0, d), dtype=np.float32)
        for f, g in enumerate(grads):
            if g is None:
                arrays.append(no_grad)
                continue
            has[f] = True
            arrays.append(_rows_of(g.detach().to(torch.float32).contiguous(), d))
        if self.batch is not None:
            self.batch.got_grad.update(name for name, h in zip(self.features.names, has, strict=True) if h)
        threads = self.threads
        parts = np.zeros((threads, n, d) if threads > 1 else (1, 0, 0), dtype=np.float32)
        _kernels(threads).scatter_grads(
            g_out.numpy(), parts, self.inverse, self.bases, self.splits, self.features.kinds, self.features.limits,
            tuple(arrays), has,
        )
        return g_out


class _PooledLookup(torch.autograd.Function):
    """Pooled outputs of one table's features from its distinct rows ``leaf`` [U, D]."""

    @staticmethod
    def forward(ctx, plan: TableBatch, leaf: torch.Tensor, shapes: list):
        outs = plan.pool(leaf.detach(), shapes)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        return None, ctx.plan.scatter(grads), None


class FusedEngine:
    """Runs a ``HashEmbeddingBagCollection``'s batches on the fused path (see the module docstring).

    Args:
        factory: the module's ``HashTableFeatureFactory`` (local placement, CPU tables).
        tables: table name -> ``EmbeddingTable``.
        features: (feature name, table name, combiner) in the module's order.
    """

    def __init__(self, factory, tables: Mapping[str, object], features: Sequence[tuple[str, str, object]]):
        self.factory = factory
        self._tables = []
        for name, table in tables.items():
            mine = [(f, c) for f, t, c in features if t == name]
            if mine:
                self._tables.append(_TableFeatures(table, [f for f, _ in mine], [c for _, c in mine]))
        self._scratch = np.zeros(0, dtype=np.int64)
        self._shift = 0
        self._stamp = 0

    # -- forward ---------------------------------------------------------------------------------

    def _dedupe(self, features: _TableFeatures, ragged: Mapping) -> TableBatch:
        ids = tuple(ragged[n].values.to("cpu", torch.int64).contiguous().numpy() for n in features.names)
        splits = tuple(ragged[n].row_splits.to("cpu", torch.int64).contiguous().numpy() for n in features.names)
        sizes = np.array([a.size for a in ids], dtype=np.int64)
        n = int(sizes.sum())
        if self._scratch.size < 2 * _compiled().scratch_capacity(n):
            cap = _compiled().scratch_capacity(n)
            self._scratch = np.zeros(2 * cap, dtype=np.int64)
            self._shift = 64 - (cap.bit_length() - 1)
        # Stamps live in the upper 32 bits of a slot; zeros (a fresh set) hold stamp 0.
        self._stamp = self._stamp % (1 << 30) + 1
        inverse = np.empty(n, dtype=np.int64)
        uniq = np.empty(n, dtype=np.int64)
        counts = np.empty(n, dtype=np.int64)
        u = _compiled().dedupe(ids, splits, self._scratch, np.uint64(self._shift), np.int64(self._stamp),
                                 inverse, uniq, counts)
        if u < 0:
            name = features.names[-1 - u]
            raise ValueError(f"features[{name!r}]: invalid row splits (expected 0, non-decreasing, ending at "
                             f"len(values)={ids[-1 - u].size})")
        bases = np.zeros(len(ids), dtype=np.int64)
        np.cumsum(sizes[:-1], out=bases[1:])
        return TableBatch(features, torch.from_numpy(uniq[:u]), torch.from_numpy(counts[:u]), inverse, bases,
                          splits)

    def forward(self, ragged: Mapping, training: bool, batch) -> dict[str, torch.Tensor]:
        """Pooled outputs of one batch; fills ``batch`` (variables, plans) when gradients will flow.

        ``batch`` is None when no gradient is wanted (eval, or grad disabled).
        Every table's splits are checked before any table changes.
        """
        threads = fused_threads()
        kernels = _kernels(threads)
        plans = [self._dedupe(tf, ragged) for tf in self._tables]
        out: dict[str, torch.Tensor] = {}
        tracked = []
        for plan in plans:
            table, tf = plan.table, plan.features
            plan.threads = threads
            plan.rows = table.lookup_unique_rows(plan.ids, plan.occurrences, insert=training)
            plan.generation = table.generation
            d = tf.dim
            leaf = torch.empty((plan.ids.numel(), d), dtype=torch.float32)
            kernels.gather(table.row_storage()[ts.VALUES].numpy(), plan.rows.numpy(), leaf.numpy())
            shapes = []
            for name, kind, limit in zip(tf.names, tf.kinds, tf.limits, strict=True):
                rows = ragged[name].row_splits.numel() - 1
                shapes.append((rows, int(limit), d) if kind == 2 else (rows, d))
            if batch is not None:
                plan.leaf = leaf.requires_grad_(True)
                plan.batch = batch
                outs = _PooledLookup.apply(plan, leaf, shapes)
                batch.variables.append((table.name, leaf))
                batch.features_of[table.name] = list(tf.names)
                batch.plans.append(plan)
                tracked.append((table, leaf, plan.ids, plan.rows))
            else:
                outs = plan.pool(leaf, shapes)
            out.update(zip(tf.names, outs, strict=True))
        if tracked:
            self.factory.track_rows(tracked)
        return out

    # -- update ----------------------------------------------------------------------------------

    def apply(self, plans: Sequence[TableBatch], scale=1.0, global_step=None) -> None:
        """Applies the gradients in the plans' leaves (``sparse_step``), then drops them.

        Per table, the gradients of all plans are summed per row and applied
        once by each slice's optimizer, in place. ``global_step`` None uses and
        increments ``factory.global_step``.
        """
        own_step = global_step is None
        step = int(self.factory.global_step if own_step else global_step)
        scale = float(scale)
        per_table: dict[str, list[TableBatch]] = {}
        for plan in plans:
            if plan.leaf is not None and plan.leaf.grad is not None:
                per_table.setdefault(plan.table.name, []).append(plan)
        threads = fused_threads()
        for group in per_table.values():
            ids, rows, grads = _merge(group)
            apply_rows(group[0].table, ids, rows, grads, scale, step, threads)
        for plan in plans:
            if plan.leaf is not None:
                plan.leaf.grad = None
        if own_step:
            self.factory.global_step.add_(1)


def _merge(group: list[TableBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(group) == 1:
        p = group[0]
        return p.ids, p.current_rows(), p.leaf.grad
    # Gradient accumulation: several batches' distinct rows, summed per row.
    ids = torch.cat([p.ids for p in group])
    rows = torch.cat([p.current_rows() for p in group])
    grads = torch.cat([p.leaf.grad for p in group])
    keep = (rows >= 0).nonzero().squeeze(1)
    rows, ids, grads = rows[keep], ids[keep], grads[keep]
    urows, inverse = torch.unique(rows, return_inverse=True)
    first = torch.empty_like(urows).scatter_(0, inverse, torch.arange(rows.numel()))
    gsum = torch.zeros((urows.numel(), grads.shape[1]), dtype=torch.float32).index_add_(0, inverse, grads)
    return ids[first], urows, gsum


# -- the slice optimizers' compiled steps -----------------------------------------------------------

_f32 = np.float32


def _sgd(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    k.sgd(values, c0, d, rows, g, scale, _f32(lr), times, now, write_times)


def _adagrad(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    k.adagrad(values, states[0], c0, d, rows, g, scale, _f32(lr), _f32(cfg.weight_decay_factor or 0.0), times, now, write_times)


def _ftrl(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    if lr <= 0:  # as FtrlSlice: rows and state stay as they are (their time is still written)
        if write_times:
            _compiled().fill_times(times, rows, now)
        return
    l2 = float(cfg.l2_regularization or 0.0)
    k.ftrl(values, states[0], states[1], c0, d, rows, g, scale, _f32(lr), _f32(float(cfg.l1_regularization or 0.0)),
           _f32(l2 * lr), _f32(float(cfg.beta or 0.0)), times, now, write_times)


def _adam(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    k.adam(values, states[0], states[1], states[2], c0, d, rows, g, scale, _f32(lr), _f32(cfg.beta1),
           _f32(1 - cfg.beta1), _f32(cfg.beta2), _f32(1 - cfg.beta2), _f32(cfg.epsilon),
           _f32(cfg.weight_decay_factor or 0.0), times, now, write_times)


def _momentum(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    k.momentum(values, states[0], c0, d, rows, g, scale, _f32(lr), _f32(cfg.momentum), _f32(1 + cfg.momentum),
               _f32(cfg.weight_decay_factor or 0.0), bool(cfg.use_nesterov), times, now, write_times)


def _rmsprop(k, cfg, values, states, c0, d, rows, g, scale, lr, times, now, write_times):
    k.rmsprop(values, states[0], c0, d, rows, g, scale, _f32(lr), _f32(cfg.momentum), _f32(1 - cfg.momentum),
              _f32(cfg.weight_decay_factor or 0.0), times, now, write_times)


# Keyed by config type: ``slice_optimizer_for`` binds exactly one rule class to each.
_COMPILED = {
    entry.SgdOptimizer: _sgd,
    entry.AdagradOptimizer: _adagrad,
    entry.FtrlOptimizer: _ftrl,
    entry.AdamOptimizer: _adam,
    entry.MomentumOptimizer: _momentum,
    entry.RmspropOptimizer: _rmsprop,
}
_RULES = {
    entry.SgdOptimizer: optimizers.SgdSlice,
    entry.AdagradOptimizer: optimizers.AdagradSlice,
    entry.FtrlOptimizer: optimizers.FtrlSlice,
    entry.AdamOptimizer: optimizers.AdamSlice,
    entry.MomentumOptimizer: optimizers.MomentumSlice,
    entry.RmspropOptimizer: optimizers.RmspropSlice,
}


def _compiled_step(rule):
    config_type = type(rule.config)
    # Only the built-in rule classes: a user may register a subclass with other math.
    if _RULES.get(config_type) is type(rule):
        return _COMPILED[config_type]
    return None


def apply_rows(table, ids: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, scale: float, global_step: int,
               threads: int = 1) -> None:
    """Applies ``scale * grads[u]`` to row ``rows[u]`` of ``table`` (distinct rows; -1 skipped), in place.

    Each slice's optimizer runs as a compiled kernel; the learning rate is
    the slice's at ``global_step``; updated rows get the table clock as their
    last-update time. A table with a slice optimizer that has no kernel goes
    through ``table.apply_gradients`` (same result, torch ops).
    """
    layout = table.slice_layout()
    steps = [_compiled_step(rule) for _, _, rule, _, _ in layout]
    if any(s is None for s in steps):
        table.apply_gradients(ids, grads, scale, global_step, rows=rows, rows_generation=table.generation)
        return
    storage = table.row_storage()
    k = _kernels(threads)
    values = storage[ts.VALUES].numpy()
    rows_np = rows.contiguous().numpy()
    g = grads.detach().to(torch.float32).contiguous().numpy()
    scale32 = _f32(scale)
    times = storage[ts.TIMES].numpy()
    now = np.int64(table.now())
    for i, ((start, end, rule, lr_fn, fields), step) in enumerate(zip(layout, steps, strict=True)):
        lr = optimizers.learning_rate_at(rule.config, lr_fn, global_step)
        states = [storage[fields[n]].numpy() for n in rule.state_names] or [values]
        # The last slice's pass also writes the rows' update time.
        step(k, rule.config, values, states, start, end - start, rows_np, g, scale32, lr, times, now,
             i == len(layout) - 1)
