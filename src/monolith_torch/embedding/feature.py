"""Feature slots, slices, columns and factories: Monolith's ``feature.py`` on PyTorch.

A *slot* owns one embedding table whose rows are split into *slices*
(``add_feature_slice(dim)``), each with its own initializer and optimizer. A
*column* binds an input feature name to a slot and a combiner. A *factory*
makes slots and applies the embedding gradients the step function routes back.

In eager PyTorch the embedding "variable" of a column is the [N, D_total] leaf
tensor of its looked-up rows; ``create_embedding_slices`` combines and splits it
into the per-slice [B, d] tensors the model reads, and the gradient of that leaf
goes to ``FeatureFactory.apply_gradients``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from monolith_torch.core.ragged import as_ragged
from monolith_torch.embedding import combiners as embedding_combiners
from monolith_torch.embedding import entry
from monolith_torch.embedding.seq_mask import lengths_to_mask

__all__ = [
    "DEFAULT_EXPIRE_TIME",
    "FeatureEmbTable",
    "FeatureSlice",
    "FeatureSlotConfig",
    "FeatureSlot",
    "FeatureColumn",
    "FeatureColumnV1",
    "FeatureFactory",
    "FeatureFactoryFromEmbeddings",
    "EmbeddingLayoutFactory",
    "create_embedding_slices",
    "slice_key",
]

# Monolith's default: 100 years, i.e. rows never expire.
DEFAULT_EXPIRE_TIME = 36500

GradsAndVars = Iterable[tuple[torch.Tensor, torch.Tensor]]


def slice_key(feature_name: str, start: int, end: int) -> str:
    """Key of one slice of a feature in the dict ``create_embedding_slices`` returns."""
    return f"{feature_name}:{start}_{end}"


class FeatureEmbTable(abc.ABC):
    """The table behind a slot. Framework-facing; users go through ``FeatureSlot``."""

    def add_feature_slice(self, segment: entry.Segment, learning_rate_fn=None) -> None:  # noqa: B027
        """Registers one more slice of ``segment.dim_size`` columns."""

    @abc.abstractmethod
    def embedding_lookup(self, feature_name: str, start: int | None, end: int | None) -> torch.Tensor:
        """Combined [B, end - start] embeddings of a feature; ``None, None`` gives the per-id leaf."""

    def set_feature_metadata(self, feature_name: str, combiner: embedding_combiners.Combiner) -> None:  # noqa: B027
        """Records that ``feature_name`` reads this table with ``combiner``."""


class FeatureSlice(NamedTuple):
    """Columns ``[start, end)`` of a slot's rows."""

    feature_slot: FeatureSlot
    start: int
    end: int


@dataclass
class FeatureSlotConfig:
    """Configuration of one slot, with Monolith's defaults.

    Bias slices default to FTRL (``initial_accumulator_value=1e-6, beta=1.0``)
    over zeros; vector slices to Adagrad (``initial_accumulator_value=1.0``, no
    epsilon) over ``RandomUniformInitializer()``'s range. An optimizer built
    without a ``learning_rate`` trains at ``entry.DEFAULT_LEARNING_RATE`` (0.01),
    unless the slice's ``learning_rate_fn`` says otherwise. ``expire_time`` is
    in days (default 36500); ``occurrence_threshold`` 0 gives every id a row at
    first sight.
    """

    name: str | None = None
    has_bias: bool = False
    bias_initializer: entry.Initializer = field(default_factory=entry.ZerosInitializer)
    bias_optimizer: entry.Optimizer = field(
        default_factory=lambda: entry.FtrlOptimizer(initial_accumulator_value=1e-6, beta=1.0)
    )
    bias_compressor: entry.Compressor = field(default_factory=entry.Fp32Compressor)
    bias_learning_rate_fn: Callable | float | None = None
    default_vec_initializer: entry.Initializer = field(default_factory=entry.RandomUniformInitializer)
    default_vec_optimizer: entry.Optimizer = field(
        default_factory=lambda: entry.AdagradOptimizer(initial_accumulator_value=1.0)
    )
    default_vec_compressor: entry.Compressor = field(default_factory=entry.Fp16Compressor)
    default_vec_learning_rate_fn: Callable | float | None = None
    hashtable_config: entry.HashTableConfig = field(default_factory=entry.CuckooHashTableConfig)
    slot_id: int | None = None
    occurrence_threshold: int = 0
    expire_time: int = DEFAULT_EXPIRE_TIME

    def __post_init__(self):
        if not self.name:
            if self.slot_id is None:
                raise ValueError("FeatureSlotConfig needs a name or a slot_id, got neither")
            self.name = str(self.slot_id)
        if not isinstance(self.occurrence_threshold, int) or self.occurrence_threshold < 0:
            raise ValueError(f"Invalid occurrence_threshold: {self.occurrence_threshold!r} (expected an int >= 0)")
        if not isinstance(self.expire_time, int | float) or not self.expire_time > 0:
            raise ValueError(f"Invalid expire_time: {self.expire_time!r} (expected a number of days > 0)")


class FeatureSlot:
    """A user's view of one embedding table: add slices, read them through columns."""

    def __init__(self, table: FeatureEmbTable, config: FeatureSlotConfig):
        self._table = table
        self._config = config
        self._current_dim_size = 0
        self._feature_columns: list[FeatureColumn] = []
        self._bias_slice = None
        if config.has_bias:
            self._bias_slice = self.add_feature_slice(
                1, config.bias_initializer, config.bias_optimizer, config.bias_compressor,
                config.bias_learning_rate_fn,
            )

    def add_feature_slice(
        self,
        dim_size: int,
        initializer: entry.Initializer | None = None,
        optimizer: entry.Optimizer | None = None,
        compressor: entry.Compressor | None = None,
        learning_rate_fn=None,
    ) -> FeatureSlice:
        """Appends ``dim_size`` columns with their own initializer and optimizer.

        Unset arguments take the slot config's ``default_vec_*`` values.
        """
        cfg = self._config
        segment = entry.CombineAsSegment(
            dim_size,
            initializer or cfg.default_vec_initializer,
            optimizer or cfg.default_vec_optimizer,
            compressor or cfg.default_vec_compressor,
        )
        if learning_rate_fn is None:
            learning_rate_fn = cfg.default_vec_learning_rate_fn
        self._table.add_feature_slice(segment, learning_rate_fn=learning_rate_fn)
        s = FeatureSlice(self, self._current_dim_size, self._current_dim_size + dim_size)
        self._current_dim_size += dim_size
        return s

    def get_bias_slice(self) -> FeatureSlice:
        if self._bias_slice is None:
            raise RuntimeError(f"slot {self.name!r} has no bias slice (create it with has_bias=True)")
        return self._bias_slice

    def _add_feature_column(self, fc: FeatureColumn) -> None:
        self._feature_columns.append(fc)
        self._table.set_feature_metadata(fc.feature_name, fc.combiner)

    def _fc_embedding_lookup(self, feature_name: str, s: FeatureSlice) -> torch.Tensor:
        return self._table.embedding_lookup(feature_name, s.start, s.end)

    def get_feature_columns(self) -> list[FeatureColumn]:
        return list(self._feature_columns)

    @property
    def dim_size(self) -> int:
        return self._current_dim_size

    @property
    def config(self) -> FeatureSlotConfig:
        return self._config

    @property
    def table(self) -> FeatureEmbTable:
        return self._table

    @property
    def slot(self) -> int:
        """The slot id: ``config.slot_id``, else the name read as an integer (Monolith's convention)."""
        if self._config.slot_id is not None:
            return int(self._config.slot_id)
        try:
            return int(self._config.name)
        except ValueError:
            raise ValueError(f"slot {self._config.name!r} has no slot_id and its name is not an integer") from None

    @property
    def name(self) -> str:
        return self._config.name


class FeatureColumn:
    """Binds the input feature ``feature_name`` to a slot, read with ``combiner``."""

    @classmethod
    def reduce_sum(cls) -> embedding_combiners.ReduceSum:
        return embedding_combiners.ReduceSum()

    @classmethod
    def reduce_mean(cls) -> embedding_combiners.ReduceMean:
        return embedding_combiners.ReduceMean()

    @classmethod
    def first_n(cls, seq_length: int) -> embedding_combiners.FirstN:
        return embedding_combiners.FirstN(seq_length)

    def __init__(self, feature_slot: FeatureSlot, feature_name: str, combiner=None):
        if not isinstance(feature_slot, FeatureSlot):
            raise TypeError(f"feature_slot must be a FeatureSlot, got {type(feature_slot).__name__}")
        if not isinstance(feature_name, str) or not feature_name:
            raise ValueError(f"Invalid feature_name: {feature_name!r} (expected a non-empty str)")
        self._feature_name = feature_name
        self._feature_slot = feature_slot
        self._combiner = combiner or self.reduce_sum()
        self._size_tensor = None
        feature_slot._add_feature_column(self)

    def embedding_lookup(self, s: FeatureSlice) -> torch.Tensor:
        """The combined embeddings of slice ``s`` for the current batch: [B, d] (FirstN: [B, L, d])."""
        if s.feature_slot is not self._feature_slot:
            raise ValueError(
                f"slice {s.start}:{s.end} belongs to slot {s.feature_slot.name!r}, "
                f"not to this column's slot {self._feature_slot.name!r}"
            )
        return self._feature_slot._fc_embedding_lookup(self._feature_name, s)

    def get_all_embeddings_concat(self) -> torch.Tensor:
        """The per-id leaf tensor [N, D_total] whose gradient the step routes back."""
        return self._feature_slot._table.embedding_lookup(self._feature_name, None, None)

    def get_bias(self) -> torch.Tensor:
        return self._feature_slot._fc_embedding_lookup(self._feature_name, self._feature_slot.get_bias_slice())

    def set_size_tensor(self, row_lengths: torch.Tensor) -> None:
        """Records a [B, L] int32 mask of the valid positions of a ``FirstN`` column."""
        if not isinstance(self._combiner, embedding_combiners.FirstN):
            raise RuntimeError(
                f"set_size_tensor is only supported for a sequence (FirstN) column; "
                f"{self._feature_name!r} uses {self._combiner!r}"
            )
        self._size_tensor = lengths_to_mask(row_lengths, self._combiner.max_seq_length, torch.int32)

    def get_size_tensor(self) -> torch.Tensor | None:
        return self._size_tensor

    @property
    def feature_name(self) -> str:
        return self._feature_name

    @property
    def feature_slot(self) -> FeatureSlot:
        return self._feature_slot

    @property
    def combiner(self) -> embedding_combiners.Combiner:
        return self._combiner

    def __repr__(self) -> str:
        return f"FeatureColumn(slot={self._feature_slot.name!r}, feature={self._feature_name!r}, combiner={self._combiner!r})"


FeatureColumnV1 = FeatureColumn


class FeatureFactory(abc.ABC):
    """Makes slots, and applies the embedding gradients of the columns it backs."""

    def __init__(self):
        self.slot_to_occurrence_threshold: dict[int, int] = {}
        self.slot_to_expire_time: dict[int, float] = {}

    @abc.abstractmethod
    def create_feature_slot(self, config: FeatureSlotConfig) -> FeatureSlot:
        """Creates a slot (and its table) from ``config``."""

    def apply_gradients(self, grads_and_vars: GradsAndVars, scale=1, global_step=None) -> None:
        """Applies ``scale * grad`` to the rows behind each ``get_all_embeddings_concat()`` var.

        ``global_step`` (the run's step, if the caller has one) is what the
        slices' learning-rate functions see.
        """
        raise NotImplementedError(f"{type(self).__name__} does not apply embedding gradients")


def create_embedding_slices(
    name_to_embeddings: Mapping[str, torch.Tensor],
    name_to_embedding_ids: Mapping[str, object],
    feature_to_combiner: Mapping[str, embedding_combiners.Combiner],
    feature_to_unmerged_slice_dims: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """Combines each feature's per-id embeddings and splits them into slices.

    Args:
        name_to_embeddings: feature -> [N, D] per-id embeddings.
        name_to_embedding_ids: feature -> ragged ids (N values, B rows).
        feature_to_combiner: feature -> combiner.
        feature_to_unmerged_slice_dims: feature -> slice widths summing to D.

    Returns:
        ``slice_key(name, start, end)`` -> [B, d] (FirstN: [B, L, d]) tensors,
        views of one combined tensor per feature.

    Raises:
        KeyError: a feature missing from one of the mappings.
        ValueError: slice widths that do not sum to D.
    """
    slices: dict[str, torch.Tensor] = {}
    for name, embeddings in name_to_embeddings.items():
        for mapping, what in (
            (name_to_embedding_ids, "name_to_embedding_ids"),
            (feature_to_combiner, "feature_to_combiner"),
            (feature_to_unmerged_slice_dims, "feature_to_unmerged_slice_dims"),
        ):
            if name not in mapping:
                raise KeyError(f"feature {name!r} is missing from {what}")
        dims = [int(d) for d in feature_to_unmerged_slice_dims[name]]
        if sum(dims) != embeddings.shape[-1]:
            raise ValueError(
                f"slice dims {dims} of feature {name!r} sum to {sum(dims)}, "
                f"but its embeddings have {embeddings.shape[-1]} columns"
            )
        ids = as_ragged(name_to_embedding_ids[name], name)
        combined = feature_to_combiner[name].combine(ids, embeddings)
        start = 0
        for part, dim in zip(torch.split(combined, dims, dim=-1), dims, strict=True):
            slices[slice_key(name, start, start + dim)] = part
            start += dim
    return slices


class _EmbeddingFeatureEmbTable(FeatureEmbTable):
    def __init__(self, embeddings: Mapping[str, torch.Tensor], embedding_slices: Mapping[str, torch.Tensor]):
        self._embeddings = embeddings
        self._embedding_slices = embedding_slices

    def embedding_lookup(self, feature_name, start, end):
        if start is None and end is None:
            # The original tensor, so it can serve as the key of its gradient.
            return self._embeddings[feature_name]
        key = slice_key(feature_name, start, end)
        if key not in self._embedding_slices:
            raise KeyError(f"no embedding slice {key!r}; known: {sorted(self._embedding_slices)}")
        return self._embedding_slices[key]


class FeatureFactoryFromEmbeddings(FeatureFactory):
    """A factory over embeddings that already exist (Monolith's test and export path).

    Args:
        name_to_embeddings: feature -> per-id leaf tensor.
        name_to_embedding_slices: the output of ``create_embedding_slices``.
        apply_fn: optional ``apply_fn(grads_and_vars, scale)`` that updates the
            embeddings; without it ``apply_gradients`` raises, as in Monolith.
    """

    def __init__(
        self,
        name_to_embeddings: Mapping[str, torch.Tensor],
        name_to_embedding_slices: Mapping[str, torch.Tensor],
        apply_fn: Callable[[list[tuple[torch.Tensor, torch.Tensor]], object], None] | None = None,
    ):
        super().__init__()
        self._name_to_embeddings = name_to_embeddings
        self._name_to_embedding_slices = name_to_embedding_slices
        self._apply_fn = apply_fn

    def create_feature_slot(self, config: FeatureSlotConfig) -> FeatureSlot:
        table = _EmbeddingFeatureEmbTable(self._name_to_embeddings, self._name_to_embedding_slices)
        return FeatureSlot(table, config)

    def apply_gradients(self, grads_and_vars: GradsAndVars, scale=1, global_step=None) -> None:
        if self._apply_fn is None:
            return super().apply_gradients(grads_and_vars, scale)
        self._apply_fn(list(grads_and_vars), scale)


class LayoutTable(Protocol):
    """What ``EmbeddingLayoutFactory`` needs from the hash tables behind it."""

    def flatten_layout(self, layout_embeddings: Mapping[str, object]) -> list[torch.Tensor]: ...

    def apply_layout_gradients(self, grads_and_vars: list[tuple[torch.Tensor, torch.Tensor]], scale=1,
                               **kwargs) -> None: ...


class _LayoutFakeTable(FeatureEmbTable):
    def embedding_lookup(self, feature_name, start, end):
        raise RuntimeError(
            "slots of an EmbeddingLayoutFactory have no per-feature lookup; read the layouts with get_layout()"
        )


class EmbeddingLayoutFactory:
    """Named fused layouts (e.g. ``"bias"`` [B, slots], ``"vec"`` [B, sum of dims]) over hash tables.

    Args:
        hash_table: the store that assembled the layouts and routes their
            gradients back to rows (see ``LayoutTable``).
        layout_embeddings: layout name -> tensor or list of tensors.
        auxiliary_bundle: extra per-batch tensors (e.g. ``req_time``).
    """

    def __init__(self, hash_table: LayoutTable, layout_embeddings: Mapping[str, object], auxiliary_bundle=None):
        self.hash_table = hash_table
        self.layout_embeddings = dict(layout_embeddings)
        self.auxiliary_bundle = dict(auxiliary_bundle or {})

    def create_feature_slot(self, config: FeatureSlotConfig) -> FeatureSlot:
        return FeatureSlot(_LayoutFakeTable(), config)

    def apply_gradients(self, grads_and_vars: GradsAndVars, scale=1, global_step=None) -> None:
        # Only stores that schedule learning rates take the step (a user's LayoutTable may not).
        takes_step = global_step is not None and getattr(self.hash_table, "takes_global_step", False)
        extra = {"global_step": global_step} if takes_step else {}
        self.hash_table.apply_layout_gradients(list(grads_and_vars), scale, **extra)

    def get_layout(self, layout: str):
        if layout not in self.layout_embeddings:
            raise KeyError(f"unknown layout {layout!r}; known: {sorted(self.layout_embeddings)}")
        return self.layout_embeddings[layout]

    def flattened_layout(self) -> list[torch.Tensor]:
        """All layout tensors as one list, in a fixed order (the gradient targets)."""
        return self.hash_table.flatten_layout(self.layout_embeddings)
