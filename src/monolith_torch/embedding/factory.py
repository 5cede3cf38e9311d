"""``HashTableFeatureFactory``: feature slots backed by collisionless embedding tables.

Re-creates Monolith's hash-table feature factory (``feature.FeatureFactory``
over ``multi_hash_table``): one ``EmbeddingTable`` per slot; ``lookup`` turns
a batch of ragged ids into per-feature leaf tensors and slices, and
``apply_gradients`` routes the leaves' gradients back to the rows. With
``torch.distributed`` initialized and more than one process, the tables are
replicas (every rank applies the per-id average of all ranks' gradients), or,
with ``sharded=True``, row-wise shards: each id's row lives on one owner rank
and lookups and gradients travel with ``all_to_all`` (see ``sharding``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from monolith_torch.core.ragged import RaggedTensor, as_ragged
from monolith_torch.core.tensor_lists import foreach_scale_
from monolith_torch.embedding.feature import (
    EmbeddingLayoutFactory,
    FeatureColumn,
    FeatureFactory,
    FeatureSlice,
    FeatureSlot,
    FeatureSlotConfig,
    create_embedding_slices,
)
from monolith_torch.embedding.placement.sharded import (
    select_owned,
    sharded_apply_gradients,
    sharded_lookup,
)
from monolith_torch.embedding.table import EmbeddingTable

__all__ = ["HashTableFeatureFactory", "HashTableLayout"]


@dataclass
class _Looked:
    """One feature's lookup: the leaf handed to the model and the ids behind its rows."""

    leaf: torch.Tensor
    table: EmbeddingTable
    feature_name: str
    ids: torch.Tensor
    batch_no: int
    rows: torch.Tensor
    generation: int


def _validate_ragged(name: str, value) -> RaggedTensor:
    ids = as_ragged(value, f"features[{name!r}]")
    values = ids.values
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"features[{name!r}] must hold integer ids, got dtype {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"features[{name!r}] values must be 1-D, got shape {tuple(values.shape)}")
    # Re-validates the splits (start at 0, non-decreasing, end at len(values)).
    try:
        return RaggedTensor.from_row_splits(values, ids.row_splits, validate=True)
    except ValueError as e:
        raise ValueError(f"features[{name!r}]: {e}") from None


def _slot_stream_id(config: FeatureSlotConfig) -> int:
    if config.slot_id is not None:
        return int(config.slot_id)
    return zlib.crc32(str(config.name).encode())


class HashTableFeatureFactory(FeatureFactory):
    """Makes slots with real embedding tables and trains them.

    Args:
        seed: seeds every table's per-id initializers.
        time_fn: seconds since the epoch (last-update times, expiry); injectable for tests.
        device: where the tables live.
        process_group: the group replicas average over; None uses the default
            group when ``torch.distributed`` is initialized with more than one
            process, else updates are local.
        max_pending_lookups: how many recent ``lookup`` calls keep their leaves
            resolvable by ``apply_gradients`` (a step may apply a batch late).
        sharded: shard every table row-wise over the group instead of
            replicating it (explicit, never automatic: a sharded factory's
            ``lookup`` is a collective, so every rank must call it in step,
            which a replicated one does not require). Without a group of more
            than one process it behaves as a plain local factory.
        exchange_timeout_s: seconds each sharded exchange may wait for its
            peers before raising ``ShardExchangeError``; None uses the process
            group's timeout.

    Attributes:
        global_step: apply_gradients calls so far; the learning-rate functions
            of the slices see it.
    """

    def __init__(
        self,
        seed: int = 0,
        time_fn: Callable[[], float] = time.time,
        device=None,
        process_group=None,
        max_pending_lookups: int = 4,
        sharded: bool = False,
        exchange_timeout_s: float | None = None,
    ):
        super().__init__()
        if not isinstance(sharded, bool):
            raise TypeError(f"sharded must be a bool, got {type(sharded).__name__}")
        if exchange_timeout_s is not None and (
            isinstance(exchange_timeout_s, bool) or not isinstance(exchange_timeout_s, int | float)
            or not exchange_timeout_s > 0
        ):
            raise ValueError(f"Invalid exchange_timeout_s: {exchange_timeout_s!r} (expected a number > 0 or None)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(max_pending_lookups, int) or max_pending_lookups < 1:
            raise ValueError(f"Invalid max_pending_lookups: {max_pending_lookups!r} (expected an int >= 1)")
        self.seed = seed
        self._time_fn = time_fn
        self._device = device
        self._process_group = process_group
        self._max_pending = max_pending_lookups
        self.sharded = sharded
        self._exchange_timeout = exchange_timeout_s
        self._checked_layout = None  # the slot layout last agreed on by all shard ranks
        self._tables: dict[str, EmbeddingTable] = {}
        self._slots: dict[str, FeatureSlot] = {}
        self._looked: dict[int, _Looked] = {}
        self._batch_no = 0
        self.global_step = 0

    # -- slots -------------------------------------------------------------

    def create_feature_slot(self, config: FeatureSlotConfig) -> FeatureSlot:
        """Creates a slot and its table.

        Raises:
            TypeError: config not a FeatureSlotConfig.
            ValueError: a slot of the same name exists.
        """
        if not isinstance(config, FeatureSlotConfig):
            raise TypeError(f"config must be a FeatureSlotConfig, got {type(config).__name__}")
        if config.name in self._tables:
            raise ValueError(f"Invalid config.name: {config.name!r} (a slot of that name already exists)")
        expected = getattr(config.hashtable_config, "initial_capacity", 0)
        table = EmbeddingTable(
            name=config.name,
            slot_id=_slot_stream_id(config),
            seed=self.seed,
            occurrence_threshold=config.occurrence_threshold,
            expire_time=config.expire_time,
            time_fn=self._time_fn,
            expected_rows=int(expected) if expected > 1 else 0,
            device=self._device,
        )
        slot = FeatureSlot(table, config)
        self._tables[config.name] = table
        self._slots[config.name] = slot
        if config.slot_id is not None:
            self.slot_to_occurrence_threshold[config.slot_id] = config.occurrence_threshold
            self.slot_to_expire_time[config.slot_id] = config.expire_time
        return slot

    @property
    def tables(self) -> dict[str, EmbeddingTable]:
        """Slot name -> table, in creation order."""
        return dict(self._tables)

    def _feature_tables(self) -> dict[str, EmbeddingTable]:
        out: dict[str, EmbeddingTable] = {}
        for table in self._tables.values():
            for name in table.feature_names:
                if name in out:
                    raise RuntimeError(f"feature {name!r} is read from two slots: {out[name].name!r} and {table.name!r}")
                out[name] = table
        return out

    # -- lookup ------------------------------------------------------------

    def lookup(self, features: Mapping[str, object], training: bool = True) -> dict[str, torch.Tensor]:
        """Gathers the rows of every registered feature for one batch.

        After it, ``fc.embedding_lookup(slice)`` returns [B, d] ([B, L, d] for
        ``FirstN``) and ``fc.get_all_embeddings_concat()`` the [N, D] leaf
        whose gradient ``apply_gradients`` takes.

        Args:
            features: feature name -> ragged int ids (``RaggedTensor`` or a
                ``torch.nested`` jagged tensor), one entry per registered feature.
            training: count occurrences and create rows for new ids; False
                reads absent ids as zeros and changes nothing.

        Returns:
            ``slice_key(name, start, end)`` -> combined slice, for all features.

        Raises:
            TypeError: ids that are not integer ragged tensors.
            ValueError: unknown or missing feature names, bad row splits.
                Checked before any table changes.
        """
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of feature name -> ragged ids, got {type(features).__name__}")
        feature_tables = self._feature_tables()
        unknown = sorted(set(features) - set(feature_tables))
        if unknown:
            raise ValueError(f"Invalid features: unknown feature names {unknown}; known: {sorted(feature_tables)}")
        missing = sorted(set(feature_tables) - set(features))
        if missing:
            raise ValueError(f"Invalid features: missing ids for registered features {missing}")
        ragged = {name: _validate_ragged(name, features[name]) for name in sorted(features)}
        self._batch_no += 1
        self._prune()
        if self.shard_group() is not None:
            return self._lookup_sharded(ragged, training)
        out: dict[str, torch.Tensor] = {}
        for table in self._tables.values():
            names = [n for n in table.feature_names if n in ragged]
            if not names:
                continue
            # One index call per table, for all its features: the fixed cost
            # of a call (a few hundred small tensor ops) is paid once.
            values = [ragged[n].values.to(table.device, torch.int64) for n in names]
            all_rows = table.lookup_rows(torch.cat(values), insert=training)
            for name, ids, rows in zip(names, values, all_rows.split([v.numel() for v in values]), strict=True):
                out.update(self._register_leaf(table, name, ragged[name], ids, table.gather(rows), rows))
        return out

    def _register_leaf(self, table, name: str, ragged_ids: RaggedTensor, ids, values, rows) -> dict:
        """Makes ``values`` the feature's leaf for this batch and builds its slices."""
        leaf = values.requires_grad_(True)
        slices = create_embedding_slices(
            {name: leaf}, {name: ragged_ids.to(table.device)}, {name: table.combiner_of(name)},
            {name: table.slice_dims},
        )
        table.set_current(name, leaf, slices)
        self._looked[id(leaf)] = _Looked(leaf, table, name, ids, self._batch_no, rows, table.generation)
        return slices

    def _lookup_sharded(self, ragged: Mapping[str, RaggedTensor], training: bool) -> dict[str, torch.Tensor]:
        self._check_same_slots()
        plan = []
        for table in self._tables.values():
            names = [n for n in table.feature_names if n in ragged]
            if names:
                plan.append((table, names, [ragged[n].values.to(table.device, torch.int64) for n in names]))
        values = sharded_lookup(
            [p[0] for p in plan], [torch.cat(p[2]) for p in plan], training, self.shard_group(),
            self._exchange_timeout,
        )
        out: dict[str, torch.Tensor] = {}
        no_rows = torch.zeros(0, dtype=torch.int64)
        for (table, names, ids), vals in zip(plan, values, strict=True):
            for name, t_ids, leaf in zip(names, ids, vals.split([v.numel() for v in ids]), strict=True):
                out.update(self._register_leaf(table, name, ragged[name], t_ids, leaf, no_rows))
        return out

    def _check_same_slots(self) -> None:
        """Every rank must send the same tables in the same order: checked once per slot layout."""
        layout = [(name, t.dim, t.feature_names) for name, t in self._tables.items()]
        if layout == self._checked_layout:
            return
        group = self.shard_group()
        layouts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, layout, group=group)
        differ = [r for r, other in enumerate(layouts) if other != layouts[0]]
        if differ:
            raise RuntimeError(
                f"sharded tables: ranks {differ} registered other slots than rank 0 "
                f"(rank 0: {layouts[0]}; rank {differ[0]}: {layouts[differ[0]]}); every rank must create "
                "the same slots, features and slices in the same order"
            )
        self._checked_layout = layout

    def _prune(self) -> None:
        oldest = self._batch_no - self._max_pending
        self._looked = {k: v for k, v in self._looked.items() if v.batch_no > oldest}

    # -- update ------------------------------------------------------------

    def _resolve(self, grads_and_vars) -> list[tuple[_Looked, torch.Tensor]]:
        resolved = []
        for i, pair in enumerate(grads_and_vars):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"grads_and_vars[{i}] must be a (grad, var) pair, got {type(pair).__name__}")
            grad, var = pair
            if not isinstance(var, torch.Tensor):
                raise TypeError(f"grads_and_vars[{i}]: var must be a torch.Tensor, got {type(var).__name__}")
            looked = self._looked.get(id(var))
            if looked is None or looked.leaf is not var:
                raise ValueError(
                    f"grads_and_vars[{i}]: var of shape {tuple(var.shape)} is not an embedding tensor from one "
                    f"of the last {self._max_pending} lookups of this factory"
                )
            if grad is None:
                continue
            if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                raise TypeError(f"grads_and_vars[{i}]: grad must be a floating-point tensor, got {type(grad).__name__}")
            if grad.shape != var.shape:
                raise ValueError(
                    f"grads_and_vars[{i}]: grad shape {tuple(grad.shape)} does not match the looked-up "
                    f"tensor of feature {looked.feature_name!r}, shape {tuple(var.shape)}"
                )
            resolved.append((looked, grad))
        return resolved

    def apply_gradients(self, grads_and_vars: Iterable[tuple[torch.Tensor, torch.Tensor]], scale=1) -> None:
        """Updates the rows behind each looked-up leaf with ``scale * grad``.

        Gradients of repeated ids are summed; each id's row is updated once,
        by each slice's optimizer. ``None`` gradients are skipped. Replicated
        (multi-process): each rank's grads are multiplied by its own ``scale``,
        all ranks' (ids, grads) are gathered in rank order and each id receives
        the sum over ranks divided by the world size (clip, then average). Every
        rank must call this in the same order (it is a collective).

        Raises:
            TypeError, ValueError: unknown vars, grads of the wrong shape or
                dtype. Checked before any row changes.
        """
        resolved = self._resolve(list(grads_and_vars))
        per_table: dict[str, list[tuple[torch.Tensor, torch.Tensor, _Looked]]] = {}
        for looked, grad in resolved:
            per_table.setdefault(looked.table.name, []).append((looked.ids, grad, looked))
        step = self.global_step
        shard_group = self.shard_group()
        if shard_group is not None:
            self._apply_sharded(per_table, scale, step, shard_group)
            self.global_step += 1
            return
        group = self._replica_group()
        checked = []
        for name, table in self._tables.items():
            pairs = per_table.get(name, [])
            if group is None and not pairs:
                continue
            ids = torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0, dtype=torch.int64)
            grads = (
                torch.cat([p[1].detach().to(table.device, torch.float32) for p in pairs])
                if pairs
                else torch.zeros((0, table.dim))
            )
            checked.append((table, pairs, table.check_gradients(ids, grads), grads))
        if group is None:
            for table, pairs, ids, grads in checked:
                # Reuse the looked-up rows unless an eviction or restore moved them.
                fresh = all(p[2].generation == table.generation for p in pairs)
                rows = torch.cat([p[2].rows for p in pairs]) if fresh else None
                table.apply_gradients(ids, grads, scale, step, rows=rows, rows_generation=table.generation)
        else:
            # ``scale`` is this rank's own (a deferred clip factor from its own norm):
            # fold it in before gathering, or each rank would apply its factor to
            # every rank's gradients and the replicas would drift apart.
            foreach_scale_([c[3] for c in checked], scale)
            world = dist.get_world_size(group)
            gathered = _all_gather_tables([c[2] for c in checked], [c[3] for c in checked], group)
            for (table, _, _, _), (ids, grads) in zip(checked, gathered, strict=True):
                table.apply_gradients(ids, grads.div_(world), 1.0, step, insert_missing=True)
        self.global_step += 1

    def _apply_sharded(self, per_table, scale, step: int, group) -> None:
        # Every table takes part every step, with or without gradients, so the
        # ranks' collectives line up (a rank may have no gradient for a table).
        tables, ids, grads = [], [], []
        for name, table in self._tables.items():
            pairs = per_table.get(name, [])
            t_ids = torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0, dtype=torch.int64, device=table.device)
            t_grads = (
                torch.cat([p[1].detach().to(table.device, torch.float32) for p in pairs])
                if pairs
                else torch.zeros((0, table.dim), device=table.device)
            )
            ids.append(table.check_gradients(t_ids, t_grads))
            grads.append(t_grads)
            tables.append(table)
        sharded_apply_gradients(tables, ids, grads, scale, step, group, self._exchange_timeout)

    def _group(self):
        if not dist.is_available() or not dist.is_initialized():
            return None
        group = self._process_group if self._process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _replica_group(self):
        return None if self.sharded else self._group()

    def shard_group(self):
        """The process group the tables are sharded over (None: not sharded, or one process)."""
        return self._group() if self.sharded else None

    def shard_info(self) -> tuple[int, int] | None:
        """(rank, world size) when the tables are sharded over more than one process, else None."""
        group = self.shard_group()
        if group is None:
            return None
        return dist.get_rank(group), dist.get_world_size(group)

    # -- fused layout ------------------------------------------------------

    def lookup_layout(
        self,
        features: Mapping[str, object],
        layouts: Mapping[str, Sequence[tuple[FeatureColumn, FeatureSlice]]],
        training: bool = True,
        layout_factory: EmbeddingLayoutFactory | None = None,
    ) -> EmbeddingLayoutFactory:
        """Looks up a batch and assembles named fused layouts from feature slices.

        Each layout is the concatenation, along the last dim, of
        ``fc.embedding_lookup(slice)`` for its (column, slice) pairs: e.g.
        ``"bias"`` [B, number of slots] from bias slices, ``"vec"`` [B, sum of dims].

        Args:
            features: as for ``lookup``.
            layouts: layout name -> list of (FeatureColumn, FeatureSlice).
            training: as for ``lookup``.
            layout_factory: one returned earlier; updated in place (so a
                ``NativeContext(layout_factory=...)`` built once keeps working).

        Returns:
            An ``EmbeddingLayoutFactory`` whose ``hash_table`` is a
            ``HashTableLayout`` routing layout gradients back to rows.

        Create the slots with this factory's ``create_feature_slot`` (an
        ``EmbeddingLayoutFactory`` makes placeholder slots without tables).
        """
        if not isinstance(layouts, Mapping) or not layouts:
            raise ValueError(f"Invalid layouts: {layouts!r} (expected a non-empty mapping of name -> [(column, slice)])")
        for lname, parts in layouts.items():
            if not parts:
                raise ValueError(f"Invalid layouts[{lname!r}]: empty")
            for part in parts:
                if not (isinstance(part, tuple | list) and len(part) == 2 and isinstance(part[0], FeatureColumn)
                        and isinstance(part[1], FeatureSlice)):
                    raise TypeError(f"layouts[{lname!r}] entries must be (FeatureColumn, FeatureSlice), got {part!r}")
                if part[0].feature_slot.table not in self._tables.values():
                    raise ValueError(f"layouts[{lname!r}]: column {part[0].feature_name!r} is not from this factory")
        if layout_factory is not None and not isinstance(layout_factory.hash_table, HashTableLayout):
            raise TypeError("layout_factory must be one returned by lookup_layout")
        self.lookup(features, training)
        combined = {}
        for lname in sorted(layouts):
            parts = [fc.embedding_lookup(s) for fc, s in layouts[lname]]
            combined[lname] = torch.cat(parts, dim=-1)
        batch_leaves = [lk.leaf for lk in self._looked.values() if lk.batch_no == self._batch_no]
        binding = HashTableLayout(self, combined, batch_leaves)
        embeddings = {name: binding.leaves[name] for name in combined}
        if layout_factory is None:
            return EmbeddingLayoutFactory(binding, embeddings)
        layout_factory.hash_table = binding
        layout_factory.layout_embeddings = embeddings
        return layout_factory

    # -- expiry and state --------------------------------------------------

    def evict_expired(self, now: float | None = None) -> dict[str, int]:
        """Runs ``evict_expired`` on every table; returns rows removed per slot."""
        return {name: t.evict_expired(now) for name, t in self._tables.items()}

    def state_dict(self) -> dict:
        """Seed, global step and every table's rows; sharded: this rank's rows and ``"shard"`` (rank, world)."""
        state = {
            "seed": self.seed,
            "global_step": self.global_step,
            "tables": {name: t.state_dict() for name, t in self._tables.items()},
        }
        info = self.shard_info()
        if info is not None:
            state["shard"] = {"rank": info[0], "world": info[1]}
        return state

    def check_state_dict(self, state: Mapping) -> None:
        """Raises if ``state`` does not match this factory's slots; changes nothing."""
        if not isinstance(state, Mapping) or "tables" not in state:
            raise ValueError("factory state must be a mapping with 'tables'")
        if set(state["tables"]) != set(self._tables):
            raise ValueError(
                f"saved slots {sorted(state['tables'])} do not match this factory's slots {sorted(self._tables)}"
            )
        for name, table in self._tables.items():
            table.check_state_dict(state["tables"][name])

    def load_state_dict(self, state: Mapping) -> None:
        """Restores every table; validates all of them first.

        Sharded: keeps only the rows this rank owns, so ``state`` may hold any
        superset of them (e.g. all shards of a checkpoint written by another
        number of ranks, merged).
        """
        self.check_state_dict(state)
        info = self.shard_info()
        for name, table in self._tables.items():
            t_state = state["tables"][name]
            table.load_state_dict(t_state if info is None else select_owned(t_state, *info))
        self.global_step = int(state.get("global_step", 0))
        self._looked.clear()


class HashTableLayout:
    """The ``LayoutTable`` of a fused-layout batch: routes layout gradients to rows.

    Holds the combined layout tensors (still attached to the per-feature
    leaves) and hands out detached leaf copies; ``apply_layout_gradients``
    backpropagates layout gradients to the per-feature leaves and passes them
    to ``HashTableFeatureFactory.apply_gradients``.
    """

    def __init__(
        self, factory: HashTableFeatureFactory, combined: Mapping[str, torch.Tensor], feature_leaves: list[torch.Tensor]
    ):
        self.factory = factory
        self._feature_leaves = list(feature_leaves)
        self._combined = dict(combined)
        self.leaves = {name: t.detach().requires_grad_(True) for name, t in self._combined.items()}
        self._applied = False

    def flatten_layout(self, layout_embeddings: Mapping[str, object]) -> list[torch.Tensor]:
        """The layout tensors in sorted-name order (lists flattened in place)."""
        out = []
        for name in sorted(layout_embeddings):
            value = layout_embeddings[name]
            out.extend(value if isinstance(value, list | tuple) else [value])
        return out

    def apply_layout_gradients(self, grads_and_vars, scale=1) -> None:
        """Applies layout gradients (``None`` as zeros) to the rows behind them.

        Raises:
            ValueError: an unknown var, a grad of the wrong shape.
            RuntimeError: this batch's gradients were applied already.
        """
        by_id = {id(leaf): name for name, leaf in self.leaves.items()}
        outputs, grad_outputs = [], []
        for i, (grad, var) in enumerate(grads_and_vars):
            name = by_id.get(id(var))
            if name is None or self.leaves[name] is not var:
                raise ValueError(f"grads_and_vars[{i}]: var of shape {tuple(var.shape)} is not a layout of this batch")
            if grad is not None and grad.shape != var.shape:
                raise ValueError(
                    f"grads_and_vars[{i}]: grad shape {tuple(grad.shape)} does not match layout {name!r} "
                    f"shape {tuple(var.shape)}"
                )
            outputs.append(self._combined[name])
            grad_outputs.append(torch.zeros_like(var) if grad is None else grad.detach())
        if self._applied:
            raise RuntimeError("the gradients of this layout batch were applied already; look up a new batch")
        leaves = self._feature_leaves
        pairs = []
        if outputs:
            grads = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
            pairs = [(g, leaf) for g, leaf in zip(grads, leaves, strict=True) if g is not None]
        self._applied = True
        # Called even with nothing to apply: replicated and sharded tables update collectively.
        self.factory.apply_gradients(pairs, scale)


def _all_gather_tables(ids_list, grads_list, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All ranks' (ids [n_r], grads [n_r, D]) of every table, concatenated in rank order.

    Three collectives for all tables together (block sizes, ids, gradient
    values), not three per table.
    """
    world = dist.get_world_size(group)
    dims = [g.shape[1] for g in grads_list]
    counts = torch.tensor([i.numel() for i in ids_list], dtype=torch.int64)
    gathered_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered_counts, counts, group=group)
    per_rank = torch.stack(gathered_counts).tolist()  # [world][tables]
    n_ids = max(sum(row) for row in per_rank)
    n_vals = max(sum(c * d for c, d in zip(row, dims, strict=True)) for row in per_rank)
    pad_ids = torch.zeros(n_ids, dtype=torch.int64)
    own_ids = torch.cat([i.cpu() for i in ids_list]) if ids_list else pad_ids[:0]
    pad_ids[: own_ids.numel()] = own_ids
    pad_vals = torch.zeros(n_vals, dtype=torch.float32)
    own_vals = torch.cat([g.reshape(-1).cpu() for g in grads_list]) if grads_list else pad_vals[:0]
    pad_vals[: own_vals.numel()] = own_vals
    all_ids = [torch.zeros_like(pad_ids) for _ in range(world)]
    all_vals = [torch.zeros_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids, group=group)
    dist.all_gather(all_vals, pad_vals, group=group)
    out_ids: list[list[torch.Tensor]] = [[] for _ in ids_list]
    out_grads: list[list[torch.Tensor]] = [[] for _ in ids_list]
    for rank_ids, rank_vals, row in zip(all_ids, all_vals, per_rank, strict=True):
        id_at = val_at = 0
        for t, (c, d) in enumerate(zip(row, dims, strict=True)):
            out_ids[t].append(rank_ids[id_at : id_at + c])
            out_grads[t].append(rank_vals[val_at : val_at + c * d].view(c, d))
            id_at, val_at = id_at + c, val_at + c * d
    return [
        (torch.cat(i).to(ids_list[t].device), torch.cat(g).to(grads_list[t].device))
        for t, (i, g) in enumerate(zip(out_ids, out_grads, strict=True))
    ]

