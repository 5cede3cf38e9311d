"""``HashTableFeatureFactory``: feature slots backed by collisionless embedding tables.

Re-creates Monolith's hash-table feature factory (``feature.FeatureFactory``
over ``multi_hash_table``): one ``EmbeddingTable`` per slot; ``lookup`` turns
a batch of ragged ids into per-feature leaf tensors and slices, and
``apply_gradients`` routes the leaves' gradients back to the rows. Where the
rows live (this process, replicas, or row-wise shards) is the factory's
``placement``, picked once when the factory is made (``embedding.placement``).
May import ``embedding.feature``, ``embedding.table``, ``embedding.layout``,
``embedding.placement`` and ``monolith_torch.core``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from monolith_torch.core.ragged import RaggedTensor, as_ragged
from monolith_torch.embedding.feature import (
    EmbeddingLayoutFactory,
    FeatureColumn,
    FeatureFactory,
    FeatureSlice,
    FeatureSlot,
    FeatureSlotConfig,
    create_embedding_slices,
)
from monolith_torch.embedding.layout import HashTableLayout, build_layout
from monolith_torch.embedding.placement import Placement, TableBatch, concat_or_empty, placement_for
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
    rows: torch.Tensor | None
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
        process_group: the group replicas average over (or shards spread
            over); None uses the default group.
        max_pending_lookups: how many recent ``lookup`` calls keep their leaves
            resolvable by ``apply_gradients`` (a step may apply a batch late).
        sharded: shard every table row-wise over the group instead of
            replicating it (explicit, never automatic: a sharded factory's
            ``lookup`` is a collective, so every rank must call it in step,
            which a replicated one does not require).
        exchange_timeout_s: seconds each sharded exchange may wait for its
            peers before raising ``ShardExchangeError``; None uses the process
            group's timeout.

    The placement is chosen here, once: local without ``torch.distributed``
    initialized or with one process in the group; replicas over the group
    with more; row-wise shards with ``sharded``. Make the factory after
    ``init_process_group``.

    Attributes:
        global_step: a 0-d int64 tensor counting ``apply_gradients`` calls made
            without a ``global_step``. The slices' learning-rate functions see
            the ``global_step`` the step passes (``apply_gradients_with_var_optimizer``
            passes its own), else this count: a run has one global step.
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
        self._max_pending = max_pending_lookups
        self.sharded = sharded
        self._placement = placement_for(process_group, sharded, exchange_timeout_s)
        self._tables: dict[str, EmbeddingTable] = {}
        self._slots: dict[str, FeatureSlot] = {}
        self._looked: dict[int, _Looked] = {}
        self._batch_no = 0
        self.global_step = torch.zeros((), dtype=torch.int64)

    @property
    def placement(self) -> Placement:
        """Where the rows live (``LocalPlacement``, ``ReplicatedPlacement`` or ``ShardedPlacement``)."""
        return self._placement

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
        self._placement.check_tables(list(self._tables.values()))
        self._batch_no += 1
        self._prune()
        # One placement call for all tables, and per table all its features at
        # once: the fixed cost of an index call or an exchange is paid once.
        plan = []
        for table in self._tables.values():
            names = [n for n in table.feature_names if n in ragged]
            if names:
                plan.append((table, names, [ragged[n].values.to(table.device, torch.int64) for n in names]))
        found = self._placement.lookup([p[0] for p in plan], [torch.cat(p[2]) for p in plan], training)
        out: dict[str, torch.Tensor] = {}
        for (table, names, ids), (values, rows) in zip(plan, found, strict=True):
            sizes = [v.numel() for v in ids]
            rows_per = rows.split(sizes) if rows is not None else [None] * len(names)
            for name, t_ids, leaf, f_rows in zip(names, ids, values.split(sizes), rows_per, strict=True):
                out.update(self._register_leaf(table, name, ragged[name], t_ids, leaf, f_rows))
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

    def track_rows(self, entries: Sequence[tuple[EmbeddingTable, torch.Tensor, torch.Tensor, torch.Tensor | None]]
                   ) -> None:
        """Makes tensors of rows that a caller looked up itself resolvable by ``apply_gradients``, as one lookup.

        Each entry is (table, leaf [U, D], ids [U], rows [U] or None): the leaf
        holds the rows of ``ids`` in ``table``, which ``lookup_unique_rows``
        (or ``lookup_rows``) returned as ``rows``. ``apply_gradients`` then
        takes (gradient, leaf) pairs as for ``lookup``'s leaves
        (``HashEmbeddingBagCollection``'s fused path, under Monolith's step).
        """
        self._batch_no += 1
        self._prune()
        for table, leaf, ids, rows in entries:
            self._looked[id(leaf)] = _Looked(leaf, table, f"{table.name}:unique_rows", ids, self._batch_no, rows,
                                             table.generation)

    def last_batch_leaves(self) -> list[torch.Tensor]:
        """The per-feature leaves of the latest ``lookup``, in lookup order."""
        return [lk.leaf for lk in self._looked.values() if lk.batch_no == self._batch_no]

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

    def _table_batch(self, table: EmbeddingTable, pairs: list[tuple[_Looked, torch.Tensor]]) -> TableBatch:
        ids = concat_or_empty([lk.ids for lk, _ in pairs], torch.zeros(0, dtype=torch.int64, device=table.device))
        grads = concat_or_empty(
            [g.detach().to(table.device, torch.float32) for _, g in pairs],
            torch.zeros((0, table.dim), device=table.device),
        )
        ids = table.check_gradients(ids, grads)
        # The looked-up rows can be reused unless an eviction or restore moved them since.
        fresh = bool(pairs) and all(lk.rows is not None and lk.generation == table.generation for lk, _ in pairs)
        rows = torch.cat([lk.rows for lk, _ in pairs]) if fresh else None
        return TableBatch(table, ids, grads, rows, table.generation if fresh else None)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[torch.Tensor, torch.Tensor]], scale=1,
                        global_step=None) -> None:
        """Updates the rows behind each looked-up leaf with ``scale * grad``.

        Gradients of repeated ids are summed; each id's row is updated once,
        by each slice's optimizer. ``None`` gradients are skipped. Replicated
        (multi-process): each rank's grads are multiplied by its own ``scale``,
        all ranks' (ids, grads) are gathered in rank order and each id receives
        the sum over ranks divided by the world size (clip, then average). Every
        rank must call this in the same order (it is a collective).

        Args:
            grads_and_vars: (gradient, looked-up leaf) pairs.
            scale: a float or 0-d tensor multiplied into the summed gradients.
            global_step: the step the slices' learning-rate functions see (an
                int or one-element tensor); None uses and then increments
                ``self.global_step``.

        Raises:
            TypeError, ValueError: unknown vars, grads of the wrong shape or
                dtype. Checked before any row changes.
        """
        resolved = self._resolve(list(grads_and_vars))
        per_table: dict[str, list[tuple[_Looked, torch.Tensor]]] = {}
        for looked, grad in resolved:
            per_table.setdefault(looked.table.name, []).append((looked, grad))
        # Collective placements take every table every step, so the ranks' exchanges line up.
        batches = [
            self._table_batch(table, per_table.get(name, []))
            for name, table in self._tables.items()
            if self._placement.collective or name in per_table
        ]
        own_step = global_step is None
        step = int(self.global_step if own_step else global_step)
        self._placement.apply_gradients(batches, scale, step)
        if own_step:
            self.global_step.add_(1)

    def shard_group(self):
        """The process group the tables are sharded over (None: not sharded, or one process)."""
        return self._placement.group if self._placement.kind == "sharded" else None

    def shard_info(self) -> tuple[int, int] | None:
        """(rank, world size) when the tables are sharded over more than one process, else None."""
        return self._placement.shard_info()

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
        return build_layout(self, features, layouts, training, layout_factory)

    # -- expiry and state --------------------------------------------------

    def evict_expired(self, now: float | None = None) -> dict[str, int]:
        """Removes expired rows from every table; returns rows removed per slot.

        ``now`` defaults to ``time_fn()``. Replicated tables: a collective, at
        rank 0's ``now``, so every replica drops the same rows.
        """
        return self._placement.evict_expired(self._tables, self._time_fn() if now is None else now)

    def state_dict(self) -> dict:
        """Seed and every table's rows; sharded: this rank's rows and ``"shard"`` (rank, world).

        The global step is not part of it: checkpoints save the run's one
        global step once (``save_checkpoint(global_step=...)``).
        """
        state = {"seed": self.seed, "tables": {name: t.state_dict() for name, t in self._tables.items()}}
        info = self.shard_info()
        if info is not None:
            state["shard"] = {"rank": info[0], "world": info[1]}
        return state

    def check_state_dict(self, state: Mapping) -> None:
        """Raises if ``state`` does not match this factory's slots; changes nothing."""
        if not isinstance(state, Mapping) or not isinstance(state.get("tables"), Mapping):
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
        number of ranks, merged). A ``global_step`` in ``state`` (checkpoints
        written before the step had one home) is ignored.
        """
        self.check_state_dict(state)
        for name, table in self._tables.items():
            table.load_state_dict(self._placement.owned_state(state["tables"][name]))
        self._looked.clear()
