"""Combiners: turn per-id embeddings of a ragged feature into per-example tensors.

Re-creates Monolith's ``embedding_combiners`` (``ReduceSum``, ``ReduceMean``,
``FirstN``). Each combiner is one segment op (``segment_reduce`` over the row
splits, or an ``index_put`` over ``value_rowids``); none loops over rows in Python.
"""

from __future__ import annotations

import abc

import torch

from monolith_torch.core.ragged import as_ragged

__all__ = ["Combiner", "ReduceSum", "ReduceMean", "FirstN"]


def _check_embeddings(ids, embeddings: torch.Tensor) -> None:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a 2-D [N, D] tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D [N, D] tensor, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] != ids.values.shape[0]:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but the ids hold {ids.values.shape[0]} values"
        )


def _segment_sum(ids, embeddings: torch.Tensor) -> torch.Tensor:
    # One segment kernel straight over the row splits: no per-id row index to
    # build, and about half the forward + backward time of an index_add over
    # value_rowids on CPU. Empty rows sum to 0. ``unsafe`` skips a host-side
    # check of the splits, which RaggedTensor validated when it was built.
    offsets = ids.row_splits.to(embeddings.device)
    return torch.segment_reduce(embeddings, "sum", offsets=offsets, axis=0, unsafe=True)


class Combiner(abc.ABC):
    """Base class: ``combine(ragged_ids, embeddings)`` with embeddings [N, D]."""

    @abc.abstractmethod
    def combine(self, ids, embeddings: torch.Tensor) -> torch.Tensor:
        """Combines [N, D] per-id embeddings into per-example outputs."""

    @property
    def max_seq_length(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReduceSum(Combiner):
    """Sum of a row's embeddings: [N, D] -> [B, D]; empty rows give zeros."""

    def combine(self, ids, embeddings: torch.Tensor) -> torch.Tensor:
        ids = as_ragged(ids)
        _check_embeddings(ids, embeddings)
        return _segment_sum(ids, embeddings)


class ReduceMean(Combiner):
    """Mean of a row's embeddings: [N, D] -> [B, D]; empty rows give zeros."""

    def combine(self, ids, embeddings: torch.Tensor) -> torch.Tensor:
        ids = as_ragged(ids)
        _check_embeddings(ids, embeddings)
        lengths = ids.row_lengths().clamp_min(1).to(embeddings.dtype)
        return _segment_sum(ids, embeddings) / lengths[:, None]


class FirstN(Combiner):
    """The first ``max_seq_length`` embeddings of each row: [N, D] -> [B, L, D], zero padded."""

    def __init__(self, max_seq_length: int):
        if not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"Invalid max_seq_length: {max_seq_length!r} (expected an int >= 1)")
        self._max_seq_length = max_seq_length

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    def combine(self, ids, embeddings: torch.Tensor) -> torch.Tensor:
        ids = as_ragged(ids)
        _check_embeddings(ids, embeddings)
        rowids = ids.value_rowids()
        n = embeddings.shape[0]
        positions = torch.arange(n, device=embeddings.device) - ids.row_splits.long()[rowids]
        # Ids past max_seq_length are routed to a spare slot that is cut off
        # afterwards, so no boolean indexing (and no host sync) is needed.
        limit = self._max_seq_length
        positions = positions.clamp_max(limit)
        out = embeddings.new_zeros((ids.nrows(), limit + 1, embeddings.shape[1]))
        out = out.index_put((rowids, positions), embeddings, accumulate=True)
        return out[:, :limit]

    def __repr__(self) -> str:
        return f"FirstN(max_seq_length={self._max_seq_length})"
