"""``HashEmbeddingBagCollection``: an ``nn.Module`` over collisionless hash tables.

A PyTorch-native front door to the embeddings, in the spirit of TorchRec's
``EmbeddingBagCollection``: ``forward(features)`` takes one batch's ids and
returns the pooled embeddings per feature; there is no hidden state between a
lookup and the forward. ``module.training`` decides whether tables grow: in
eval mode absent ids read zeros and nothing changes.

It trains two ways, with the same results:

- Monolith's: ``apply_gradients_with_var_optimizer(ctx, [], opt, loss,
  model=module)`` with ``ctx = NativeContext(feature_factory=module.factory)``;
  the step finds the module's embedding variables itself
  (``embedding_variables``), clips them together with the dense gradients
  (the global norm includes them) and applies them through
  ``ctx.apply_embedding_gradients`` -> ``factory.apply_gradients``.
- PyTorch's: ``loss.backward()``, the dense optimizer's ``step()``, then
  ``module.sparse_step()``, which applies the embedding gradients accumulated
  since the last one (so gradient accumulation, ``torch.amp.GradScaler`` and
  hand-written loops compose; ``sparse_optimizer()`` gives GradScaler an
  object to ``step``).

Which call takes which path (docs/perf/embedding_step.md):

- ``forward`` takes the fused path (``fused.py``) when ``fused`` (the
  default) and every table is on the CPU in a local placement: per table the
  batch's ids are deduplicated once and only the distinct ids probe the index;
  one compiled kernel pools the distinct rows per feature over the CSR
  offsets; the backward goes from the pooled gradients straight to
  per-distinct-row sums, the ``.grad`` of one [U, D] leaf per table.
  ``sparse_step`` then applies the slice optimizers in place in one compiled
  pass per slice. Under Monolith's step those per-table leaves are the
  embedding variables (named after the table): the global norm sums their
  per-row gradients, and ``factory.apply_gradients`` updates them with the
  torch rules, the same values within float32 rounding (the compiled sqrt
  and pow are correctly rounded, torch's MKL/Sleef ones within an ulp).
  The columns' ``embedding_lookup``/``get_all_embeddings_concat`` are not
  filled on this path.
- Otherwise (replicated or sharded placements, other devices, ``fused=False``)
  ``forward`` runs Monolith's unfused path: ``factory.lookup`` and the
  ``FeatureColumn`` per-feature [N, D] leaves, which are then the variables of
  both ways (bit-identical results, UE checks per feature).

May import ``embedding.factory``, ``embedding.feature``, ``embedding.fused``,
``embedding.combiners`` and ``monolith_torch.core``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from monolith_torch.core.ragged import RaggedTensor, as_ragged
from monolith_torch.embedding import combiners as embedding_combiners
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import (
    FeatureColumn,
    FeatureSlice,
    FeatureSlotConfig,
    slice_key,
)
from monolith_torch.embedding.fused import FusedEngine, supports_fused

__all__ = ["EmbeddingFeatureConfig", "EmbeddingTableConfig", "HashEmbeddingBagCollection"]

_TABLE_PREFIX = "tables."
# Training batches kept for sparse_step (gradient accumulation over more is dropped, with a warning).
_MAX_PENDING_BATCHES = 64


@dataclass(frozen=True)
class EmbeddingTableConfig:
    """One hash table: Monolith's slot config and the widths of its vector slices.

    A row holds the bias slice (width 1, when ``slot.has_bias``) first, then one
    slice per entry of ``vec_dims``, in order. Defaults (``FeatureSlotConfig``):
    vector slices use ``slot.default_vec_optimizer``, Adagrad with
    ``learning_rate=0.01`` (``entry.DEFAULT_LEARNING_RATE``),
    ``initial_accumulator_value=1.0``, no epsilon, no weight decay, over
    ``RandomUniform(-0.01, 0.01)``; the bias slice ``slot.bias_optimizer``,
    FTRL with ``learning_rate=0.01``, ``initial_accumulator_value=1e-6``,
    ``beta=1.0``, ``l1 = l2 = 0``, over zeros.

    Args:
        slot: the slot config (name, bias, optimizers, initializers,
            occurrence filter, expiry, slot id).
        vec_dims: widths of the vector slices, each an int >= 1.

    Raises:
        TypeError: ``slot`` is not a ``FeatureSlotConfig``.
        ValueError: ``vec_dims`` empty without a bias, or not ints >= 1.
    """

    slot: FeatureSlotConfig
    vec_dims: tuple[int, ...] = (16,)

    def __post_init__(self):
        if not isinstance(self.slot, FeatureSlotConfig):
            raise TypeError(f"slot must be a FeatureSlotConfig, got {type(self.slot).__name__}")
        dims = tuple(self.vec_dims) if isinstance(self.vec_dims, Sequence) else self.vec_dims
        if not isinstance(dims, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims
        ):
            raise ValueError(f"Invalid vec_dims: {self.vec_dims!r} (expected a sequence of ints >= 1)")
        if not dims and not self.slot.has_bias:
            raise ValueError(f"Invalid vec_dims: () for slot {self.slot.name!r} without a bias (a row needs a slice)")
        object.__setattr__(self, "vec_dims", dims)

    @property
    def name(self) -> str:
        return self.slot.name


@dataclass(frozen=True)
class EmbeddingFeatureConfig:
    """One input feature: the table it reads and how its ids are pooled.

    Args:
        name: the key of the feature in ``forward``'s input and output.
        table: the ``EmbeddingTableConfig.slot.name`` it reads (features may share a table).
        combiner: ``ReduceSum()`` (the default, None), ``ReduceMean()`` or ``FirstN(n)``.

    Raises:
        ValueError: an empty name or table.
        TypeError: a combiner that is not one of the three.
    """

    name: str
    table: str
    combiner: embedding_combiners.Combiner | None = None

    def __post_init__(self):
        for what in ("name", "table"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Invalid {what}: {value!r} (expected a non-empty str)")
        if self.combiner is not None and not isinstance(
            self.combiner,
            embedding_combiners.ReduceSum | embedding_combiners.ReduceMean | embedding_combiners.FirstN,
        ):
            raise TypeError(f"combiner must be ReduceSum, ReduceMean, FirstN or None, got {self.combiner!r}")


def as_feature_ids(name: str, value) -> RaggedTensor:
    """Ragged int64 ids of one feature from a 1-D tensor (one id per row), a RaggedTensor or a jagged tensor.

    Checks metadata only (dtype, rank); split values were checked when the
    ragged tensor was built.

    Raises:
        TypeError: not a tensor of integer ids.
        ValueError: values that are not 1-D.
    """
    if isinstance(value, torch.Tensor) and not value.is_nested:
        if value.dim() != 1:
            raise ValueError(
                f"features[{name!r}]: a plain tensor must be 1-D (one id per row), got shape {tuple(value.shape)}; "
                "pass multi-valued features as a RaggedTensor or a torch.nested jagged tensor"
            )
        splits = torch.arange(value.numel() + 1, dtype=torch.int64, device=value.device)
        ragged = RaggedTensor(value, splits)
    else:
        ragged = as_ragged(value, f"features[{name!r}]")
    values = ragged.values
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"features[{name!r}] must hold integer ids, got dtype {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"features[{name!r}] values must be 1-D, got shape {tuple(values.shape)}")
    return ragged


class _Batch:
    """One training forward's variables: (name, tensor) pairs and which received a gradient."""

    __slots__ = ("variables", "features_of", "got_grad", "handed_to_step", "plans")

    def __init__(self):
        self.plans: list = []  # the fused path's per-table parts (fused.TableBatch)
        self.variables: list[tuple[str, torch.Tensor]] = []
        self.features_of: dict[str, list[str]] = {}  # variable name -> the features behind it
        self.got_grad: set[str] = set()
        self.handed_to_step = False


class HashEmbeddingBagCollection(torch.nn.Module):
    """Pooled embeddings of several features over collisionless hash tables.

    Args:
        tables: the tables, one slot each (slot names unique).
        features: the features, each reading one table (names unique).
        factory: makes the slots and holds the tables; None makes
            ``HashTableFeatureFactory(seed=seed)``, whose placement follows
            ``torch.distributed`` (local, or replicas over the default group).
            Its tables should be this module's only (its ``lookup`` needs
            every registered feature).
        seed: seeds the per-id initializers when ``factory`` is None.
        fused: use the fused path where it applies (CPU tables, local
            placement); False always takes the unfused one.

    Defaults: see ``EmbeddingTableConfig`` for the slice optimizers (vector
    slices Adagrad, ``learning_rate=0.01``, ``initial_accumulator_value=1.0``;
    bias FTRL, ``learning_rate=0.01``, ``initial_accumulator_value=1e-6``,
    ``beta=1.0``). ``sparse_step`` clips nothing; under
    ``apply_gradients_with_var_optimizer`` the step's clip applies (its
    default ``clip_norm=None``: no clip).

    Attributes:
        factory: the ``HashTableFeatureFactory`` holding the tables.
        columns: one ``FeatureColumn`` per feature, in ``features`` order.

    Raises:
        TypeError: configs of the wrong type.
        ValueError: duplicate table or feature names, a feature reading an
            unknown table, no features.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingTableConfig],
        features: Sequence[EmbeddingFeatureConfig],
        factory: HashTableFeatureFactory | None = None,
        seed: int = 0,
        fused: bool = True,
    ):
        super().__init__()
        tables, features = list(tables), list(features)
        _check_configs(tables, features)
        if factory is not None and not isinstance(factory, HashTableFeatureFactory):
            raise TypeError(f"factory must be a HashTableFeatureFactory or None, got {type(factory).__name__}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.factory = factory if factory is not None else HashTableFeatureFactory(seed=seed)
        self.fused = fused
        self._table_configs = {t.name: t for t in tables}
        self._feature_configs = {f.name: f for f in features}
        self._slots = {}
        self._slices: dict[str, list[FeatureSlice]] = {}
        for config in tables:
            slot = self.factory.create_feature_slot(config.slot)
            parts = [slot.get_bias_slice()] if config.slot.has_bias else []
            parts += [slot.add_feature_slice(d) for d in config.vec_dims]
            self._slots[config.name] = slot
            self._slices[config.name] = parts
        self.columns = [
            FeatureColumn(self._slots[f.table], f.name, f.combiner or embedding_combiners.ReduceSum())
            for f in features
        ]
        self._column_of = {fc.feature_name: fc for fc in self.columns}
        # The factory's own step count, saved with the module: sparse_step
        # without a global_step counts here, as factory.apply_gradients does.
        self.register_buffer("global_step", self.factory.global_step, persistent=True)
        # False: state_dict() leaves the tables and the step out, for owners that
        # checkpoint them through the factory (the trainer's save_checkpoint).
        self.state_dict_tables = True
        self._batches: list[_Batch] = []
        self._warned_no_grad: set[str] = set()
        self._warned_pending = False
        self._engine = None

    # -- metadata ------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        """The features, in construction order."""
        return [fc.feature_name for fc in self.columns]

    @property
    def tables(self) -> dict:
        """Table name -> ``EmbeddingTable``, in construction order."""
        all_tables = self.factory.tables
        return {name: all_tables[name] for name in self._table_configs}

    def slice_ranges(self, feature: str) -> list[tuple[int, int]]:
        """(start, end) column range in ``forward``'s output of each slice of ``feature``'s row, bias first.

        Raises:
            KeyError: an unknown feature.
        """
        if feature not in self._feature_configs:
            raise KeyError(f"unknown feature {feature!r}; known: {self.feature_names}")
        return [(s.start, s.end) for s in self._slices[self._feature_configs[feature].table]]

    def feature_slices(self, feature: str) -> list[FeatureSlice]:
        """The ``FeatureSlice``s of ``feature``'s table (Monolith's surface), bias first."""
        if feature not in self._feature_configs:
            raise KeyError(f"unknown feature {feature!r}; known: {self.feature_names}")
        return list(self._slices[self._feature_configs[feature].table])

    # -- forward -------------------------------------------------------------

    def _check_features(self, features) -> dict[str, RaggedTensor]:
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of feature name -> ids, got {type(features).__name__}")
        unknown = sorted(set(features) - set(self._feature_configs))
        if unknown:
            raise ValueError(f"Invalid features: unknown feature names {unknown}; known: {self.feature_names}")
        missing = [n for n in self._feature_configs if n not in features]
        if missing:
            raise ValueError(f"Invalid features: missing ids for features {missing}")
        return {name: as_feature_ids(name, features[name]) for name in self._feature_configs}

    def forward(self, features: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Pooled embeddings of one batch.

        Args:
            features: feature name -> int ids: a 1-D tensor [B] (one id per
                row), a ``RaggedTensor`` or a ``torch.nested`` jagged tensor
                (B rows). Every feature of the module, and only those.

        Returns:
            Feature name -> [B, D] (``ReduceSum``, ``ReduceMean``; empty rows
            give zeros) or [B, L, D] (``FirstN(L)``, zero padded), D the
            table's full row width (``slice_ranges`` gives the slices).

        Raises:
            TypeError: not a mapping, or ids that are not integer tensors.
            ValueError: unknown or missing features, bad shapes. Checked
                before any table changes.
        """
        ragged = self._check_features(features)
        self._retire_batches()
        batch = _Batch() if self.training and torch.is_grad_enabled() else None
        engine = self._fused_engine()
        if engine is not None:
            out = engine.forward(ragged, self.training, batch)
        else:
            out = self._forward_unfused(ragged, batch)
        if batch is not None:
            self._batches.append(batch)
            if len(self._batches) > _MAX_PENDING_BATCHES:
                self._drop_oldest_batch()
        return {name: out[name] for name in self._feature_configs}

    def _drop_oldest_batch(self) -> None:
        # Training forwards without a sparse_step (or a step) would otherwise
        # keep every batch's rows and gradients alive.
        self._batches.pop(0)
        if not self._warned_pending:
            self._warned_pending = True
            warnings.warn(
                f"HashEmbeddingBagCollection: {_MAX_PENDING_BATCHES} training forwards without sparse_step() or a "
                "step; the oldest batch's embedding gradients are dropped (call sparse_step, or run the forward "
                "under torch.no_grad() or in eval mode). Warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def uses_fused_path(self) -> bool:
        """Whether batches take the fused path (``fused`` and CPU tables in a local placement)."""
        return self._fused_engine() is not None

    def _fused_engine(self):
        if not self.fused:
            return None
        if self._engine is None:
            if not supports_fused(self.factory, list(self.tables.values())):
                return None
            features = [(fc.feature_name, fc.feature_slot.name, fc.combiner) for fc in self.columns]
            self._engine = FusedEngine(self.factory, self.tables, features)
        return self._engine

    def _forward_unfused(self, ragged: Mapping[str, RaggedTensor], batch: _Batch | None) -> dict:
        slices = self.factory.lookup(ragged, training=self.training)
        out = {}
        for fc in self.columns:
            name = fc.feature_name
            parts = [slices[slice_key(name, s.start, s.end)] for s in self._slices[fc.feature_slot.name]]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            if batch is not None:
                leaf = fc.get_all_embeddings_concat()
                batch.variables.append((name, leaf))
                batch.features_of[name] = [name]
                leaf.register_hook(_mark_grad(batch, name))
        return out

    # -- training ------------------------------------------------------------

    def embedding_variables(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the embedding variables of the latest training forward.

        ``apply_gradients_with_var_optimizer(..., model=module)`` differentiates
        these and hands their gradients to ``ctx.apply_embedding_gradients``
        (the ``ctx``'s feature factory must be ``module.factory``). Fused path:
        one [U, D] tensor per table, the rows of its U unique ids; unfused: each
        feature's [N, D] per-id leaf. Marks the batch as consumed by a step.
        """
        if not self._batches:
            return []
        batch = self._batches[-1]
        batch.handed_to_step = True
        return list(batch.variables)

    def sparse_step(self, scale=1.0, global_step=None) -> None:
        """Applies the embedding gradients ``loss.backward()`` accumulated since the last call.

        PyTorch's way to train the tables: each id's gradients (over every
        forward since the last ``sparse_step``, so gradient accumulation
        works) are summed, multiplied by ``scale`` and applied once by each
        slice's optimizer, in place. No clipping. Then the gradients are
        dropped. Warns once per feature that received no gradient.

        Args:
            scale: a float or 0-d tensor multiplied into the summed gradients
                (e.g. ``1 / accumulation_steps``).
            global_step: the step the slices' learning-rate functions see; None
                uses and then increments the module's ``global_step`` buffer
                (the factory's count).

        A collective for replicated or sharded placements: every rank calls it.
        """
        batches = [b for b in self._batches if not b.handed_to_step]
        self._batches = []
        self._warn_unused(batches)
        engine = self._fused_engine()
        if engine is not None:
            engine.apply([p for b in batches for p in b.plans], scale, global_step)
            return
        pairs = []
        for batch in batches:
            for _, var in batch.variables:
                if var.grad is not None:
                    pairs.append((var.grad, var))
        self.factory.apply_gradients(pairs, scale, global_step=global_step)
        for _, var in pairs:
            var.grad = None

    def sparse_optimizer(self) -> SparseStepOptimizer:
        """An optimizer-shaped view of ``sparse_step`` for ``torch.amp.GradScaler.step``.

        ``scaler.step(sparse_opt)`` unscales the pending embedding gradients,
        skips the step when one holds inf/NaN, else calls ``sparse_step()``;
        ``sparse_opt.zero_grad()`` drops pending gradients.
        """
        return SparseStepOptimizer(self)

    def pending_variables(self) -> list[torch.Tensor]:
        """The embedding variables ``sparse_step`` would apply (their ``.grad`` holds the gradients)."""
        return [v for b in self._batches if not b.handed_to_step for _, v in b.variables]

    def zero_sparse_grad(self) -> None:
        """Drops the embedding gradients accumulated since the last ``sparse_step``."""
        self._batches = [b for b in self._batches if b.handed_to_step]

    def _retire_batches(self) -> None:
        done = [b for b in self._batches if b.handed_to_step]
        if done:
            self._warn_unused(done)
            self._batches = [b for b in self._batches if not b.handed_to_step]

    def _warn_unused(self, batches: list[_Batch]) -> None:
        if not batches:
            return
        got = set().union(*(b.got_grad for b in batches))
        expected = {f for b in batches for fs in b.features_of.values() for f in fs}
        for name in sorted(expected - got - self._warned_no_grad):
            self._warned_no_grad.add(name)
            warnings.warn(
                f"HashEmbeddingBagCollection: feature {name!r} received no gradient (its output does not "
                "reach the loss); its rows are not trained. Warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- state ---------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.state_dict_tables:
            return  # the tables and the step travel another way (e.g. the factory's checkpoint part)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, table in self.tables.items():
            for key, value in table.state_dict().items():
                destination[f"{prefix}{_TABLE_PREFIX}{name}.{key}"] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The buffers (global_step) load as usual; every other key under
        # ``prefix`` must be a table field ``tables.{slot}.{field}``.
        if not self.state_dict_tables:
            return
        ours = f"{prefix}{_TABLE_PREFIX}"
        names = sorted(self._table_configs, key=len, reverse=True)  # longest first: "a.b" before "a"
        per_table: dict[str, dict] = {name: {} for name in self._table_configs}
        for key, value in state_dict.items():
            if not key.startswith(prefix) or key[len(prefix):] in self._buffers:
                continue
            rest = key[len(ours):] if key.startswith(ours) else ""
            table = next((t for t in names if rest.startswith(t + ".")), None)
            if table is None:
                unexpected_keys.append(key)
            else:
                per_table[table][rest[len(table) + 1:]] = value
        tables = self.tables
        for name in list(per_table):
            if not per_table[name]:
                missing_keys.append(f"{ours}{name}.*")
                del per_table[name]
        try:
            for name, state in per_table.items():
                tables[name].check_state_dict(state)
        except ValueError as e:
            error_msgs.append(f"{ours}: {e}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      [], error_msgs)
        for name, state in per_table.items():
            tables[name].load_state_dict(self.factory.placement.owned_state(state))
        self._batches = []

    def extra_repr(self) -> str:
        tables = ", ".join(f"{n}: {t.vec_dims}{' +bias' if t.slot.has_bias else ''}"
                           for n, t in self._table_configs.items())
        return f"tables=[{tables}], features={self.feature_names}, fused={self.fused}"


def _mark_grad(batch: _Batch, name: str):
    def hook(grad):
        batch.got_grad.add(name)

    return hook


def _check_configs(tables: list, features: list) -> None:
    for i, t in enumerate(tables):
        if not isinstance(t, EmbeddingTableConfig):
            raise TypeError(f"tables[{i}] must be an EmbeddingTableConfig, got {type(t).__name__}")
    for i, f in enumerate(features):
        if not isinstance(f, EmbeddingFeatureConfig):
            raise TypeError(f"features[{i}] must be an EmbeddingFeatureConfig, got {type(f).__name__}")
    if not features:
        raise ValueError("Invalid features: [] (expected at least one EmbeddingFeatureConfig)")
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Invalid tables: duplicate slot names {dup}")
    fnames = [f.name for f in features]
    dup = sorted({n for n in fnames if fnames.count(n) > 1})
    if dup:
        raise ValueError(f"Invalid features: duplicate feature names {dup}")
    for f in features:
        if f.table not in names:
            raise ValueError(f"Invalid features: feature {f.name!r} reads unknown table {f.table!r}; tables: {names}")


class SparseStepOptimizer:
    """The pending embedding gradients of a ``HashEmbeddingBagCollection``, shaped like a torch optimizer.

    Enough of ``torch.optim.Optimizer`` for ``torch.amp.GradScaler``:
    ``param_groups`` (the pending variables, read at each call), ``step()``
    (``module.sparse_step()``) and ``zero_grad()``.
    """

    def __init__(self, module: HashEmbeddingBagCollection, scale=1.0):
        self.module = module
        self.scale = scale
        self.state: dict = {}
        self.defaults: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return [{"params": self.module.pending_variables()}]

    def step(self, closure=None, global_step=None):
        if closure is not None:
            raise RuntimeError("SparseStepOptimizer.step takes no closure")
        self.module.sparse_step(self.scale, global_step=global_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.module.zero_sparse_grad()
