"""A minimal ragged container for feature ids: flat ``values`` plus ``row_splits``.

Plays the part of ``tf.RaggedTensor`` in Monolith's APIs. Everything that takes
ragged ids here also takes a ``torch.nested`` jagged tensor (its ``offsets()``
are the row splits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RaggedTensor", "as_ragged", "check_splits_meta", "row_splits_of"]

_SPLIT_DTYPES = (torch.int32, torch.int64)


def check_splits_meta(row_splits: torch.Tensor, name: str = "row_splits") -> None:
    if not isinstance(row_splits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(row_splits).__name__}")
    if row_splits.dtype not in _SPLIT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {row_splits.dtype}")
    if row_splits.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(row_splits.shape)}")
    if row_splits.numel() == 0:
        raise ValueError(f"{name} must hold at least one element (the leading 0), got an empty tensor")


def _check_splits_values(row_splits: torch.Tensor, num_values: int | None, name: str) -> None:
    # One host sync for all value checks together.
    first, last, min_step = torch.stack(
        [
            row_splits[0].long(),
            row_splits[-1].long(),
            (row_splits[1:] - row_splits[:-1]).min().long()
            if row_splits.numel() > 1
            else torch.zeros((), dtype=torch.long, device=row_splits.device),
        ]
    ).tolist()
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {row_splits.tolist()[:8]}")
    if min_step < 0:
        raise ValueError(f"{name} must be non-decreasing, got {row_splits.tolist()[:16]}")
    if num_values is not None and last != num_values:
        raise ValueError(f"{name} must end at len(values)={num_values}, got last split {last}")


@dataclass(frozen=True)
class RaggedTensor:
    """Rows of variable length: row ``i`` is ``values[row_splits[i]:row_splits[i+1]]``.

    Shapes: ``values`` [N, ...], ``row_splits`` [B + 1].
    """

    values: torch.Tensor
    row_splits: torch.Tensor

    @classmethod
    def from_row_splits(
        cls, values, row_splits, validate: bool = True
    ) -> RaggedTensor:
        """Builds a ragged tensor; ``validate`` checks split values (one host sync).

        Raises:
            TypeError: splits not int32/int64, or values not a tensor.
            ValueError: splits not 1-D, empty, not starting at 0, decreasing, or
                not ending at ``len(values)``.
        """
        values = torch.as_tensor(values)
        row_splits = torch.as_tensor(row_splits, device=values.device)
        if row_splits.dtype not in _SPLIT_DTYPES and not row_splits.is_floating_point():
            row_splits = row_splits.long()
        check_splits_meta(row_splits)
        if values.dim() == 0:
            raise ValueError(f"values must have at least 1 dimension, got shape {tuple(values.shape)}")
        if validate:
            _check_splits_values(row_splits, values.shape[0], "row_splits")
        return cls(values, row_splits)

    @classmethod
    def from_row_lengths(cls, values, row_lengths) -> RaggedTensor:
        """Builds a ragged tensor from [B] per-row lengths (validated: one host sync).

        Raises:
            TypeError: lengths that are not integers.
            ValueError: lengths not 1-D, negative, or not summing to ``len(values)``.
        """
        row_lengths = torch.as_tensor(row_lengths)
        if row_lengths.is_floating_point() or row_lengths.is_complex() or row_lengths.dtype == torch.bool:
            raise TypeError(f"row_lengths must hold integers, got {row_lengths.dtype}")
        if row_lengths.dim() != 1:
            raise ValueError(f"row_lengths must be 1-D, got shape {tuple(row_lengths.shape)}")
        if row_lengths.numel() and bool((row_lengths < 0).any()):
            raise ValueError(f"row_lengths must be >= 0, got {row_lengths.tolist()[:16]}")
        splits = torch.zeros(row_lengths.numel() + 1, dtype=torch.int64, device=row_lengths.device)
        torch.cumsum(row_lengths, 0, out=splits[1:])
        return cls.from_row_splits(values, splits)

    def nrows(self) -> int:
        """Number of rows B (metadata only, no host sync)."""
        return self.row_splits.numel() - 1

    def row_lengths(self) -> torch.Tensor:
        """[B] lengths of the rows."""
        return self.row_splits[1:] - self.row_splits[:-1]

    def value_rowids(self) -> torch.Tensor:
        """[N] int64 row index of each value, computed without a host sync."""
        rows = torch.arange(self.nrows(), device=self.row_splits.device)
        return torch.repeat_interleave(rows, self.row_lengths(), output_size=self.values.shape[0])

    def to(self, device) -> RaggedTensor:
        return RaggedTensor(self.values.to(device), self.row_splits.to(device))


def as_ragged(ids, name: str = "ids") -> RaggedTensor:
    """Accepts a ``RaggedTensor`` or a ``torch.nested`` jagged tensor.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(ids, RaggedTensor):
        return ids
    if isinstance(ids, torch.Tensor) and ids.is_nested:
        if ids.layout != torch.jagged:
            raise TypeError(f"{name}: only torch.jagged nested tensors are supported, got {ids.layout}")
        if ids.lengths() is not None:
            # A jagged tensor with holes (e.g. from torch.nested.narrow): its
            # offsets are row starts, not splits; pack it first.
            ids = ids.contiguous()
        return RaggedTensor(ids.values(), ids.offsets())
    raise TypeError(f"{name} must be a RaggedTensor or a torch.nested jagged tensor, got {type(ids).__name__}")


def row_splits_of(splits, name: str = "splits") -> torch.Tensor:
    """Row splits of a 1-D splits tensor, a ``RaggedTensor`` or a nested jagged tensor."""
    if isinstance(splits, RaggedTensor):
        return splits.row_splits
    if isinstance(splits, torch.Tensor) and splits.is_nested:
        return as_ragged(splits, name).row_splits
    if isinstance(splits, torch.Tensor):
        return splits
    raise TypeError(
        f"{name} must be a 1-D tensor, a RaggedTensor or a nested jagged tensor, got {type(splits).__name__}"
    )
