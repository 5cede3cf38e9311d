"""How fusion ``"one"`` cuts a gradient list into flat buffers, and how lists are scaled.

Shared by every backend (torch, Horovod) and by the persistent
:class:`~monolith_torch.distributed.gradient_buckets.GradientBuckets`, so a list of
gradients is cut and scaled the same way wherever it is reduced. May import
:mod:`monolith_torch.distributed.flat_buffers`, :mod:`monolith_torch.core` and torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from monolith_torch.core.tensor_lists import group_by_device_and_dtype
from monolith_torch.distributed.flat_buffers import one_dim_view

__all__ = ["WireFormat", "bucket_indices", "divide_scale", "scaled_copies"]


class WireFormat(Protocol):
    """Anything that says which dtype a gradient travels in (a compressor)."""

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` is sent in."""
        ...


def bucket_indices(
    tensors: Sequence[torch.Tensor], wire: WireFormat, cap_bytes: int | None
) -> list[list[int]]:
    """Positions of ``tensors`` per flat buffer (bucket).

    Grouped by (device, dtype) in order of first appearance, then each group is cut
    where the next tensor would take the bucket past ``cap_bytes`` of wire data (a
    tensor larger than the cap gets a bucket of its own). ``cap_bytes=None``: one
    bucket per (device, dtype), Monolith's single buffer.

    Args:
        tensors: the gradients (only their device, dtype and numel are read).
        wire: the compressor; its ``wire_dtype`` sizes the buckets.
        cap_bytes: the bucket size limit, or ``None``.

    Returns:
        One list of positions per bucket, each in the order of ``tensors``.
    """
    out: list[list[int]] = []
    for idx in group_by_device_and_dtype(tensors).values():
        if cap_bytes is None:
            out.append(idx)
            continue
        itemsize = wire.wire_dtype(tensors[idx[0]].dtype).itemsize
        current: list[int] = []
        used = 0
        for i in idx:
            nbytes = tensors[i].numel() * itemsize
            if current and used + nbytes > cap_bytes:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += nbytes
        out.append(current)
    return out


def divide_scale(scale: float | torch.Tensor, world: int) -> float | torch.Tensor:
    """``scale / world``: the factor applied before a sum so the sum is the scaled average.

    A tensor ``scale`` stays a tensor: reading it would force a host sync.
    """
    return scale / world


def scaled_copies(tensors: list[torch.Tensor], scale: float | torch.Tensor) -> list[torch.Tensor]:
    """``[t * scale for t in tensors]`` in one foreach call, each result in ``t``'s dtype.

    Out of place. A 0-d tensor ``scale`` multiplies a 0-d gradient as it multiplies a
    flat buffer (no promotion to the scale's dtype; see
    :func:`~monolith_torch.distributed.flat_buffers.one_dim_view`). No host sync.
    """
    if not (isinstance(scale, torch.Tensor) and any(t.dim() == 0 for t in tensors)):
        return list(torch._foreach_mul(tensors, scale))
    out = torch._foreach_mul([one_dim_view(t) for t in tensors], scale)
    return [o.view(t.shape) if t.dim() == 0 else o for o, t in zip(out, tensors, strict=True)]
