"""Lists of tensors grouped by device and dtype, for one ``torch._foreach_*`` call per group.

The one home of the grouping that clipping, the allreduce and the embedding
updates share. Imports only torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["group_by_device_and_dtype", "grouped", "foreach_scale_"]


def group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for one foreach call per group."""
    keys = [(t.device, t.dtype) for t in tensors]
    if keys and keys.count(keys[0]) == len(keys):
        return {keys[0]: list(range(len(keys)))}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return dict(groups)


def grouped(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.device, torch.dtype, list[torch.Tensor]]]:
    """(device, dtype, tensors) per group; the common single-group case copies nothing but the list."""
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        ((device, dtype),) = groups
        return [(device, dtype, list(tensors))]
    return [(device, dtype, [tensors[i] for i in idx]) for (device, dtype), idx in groups.items()]


def foreach_scale_(tensors: Sequence[torch.Tensor], factor: torch.Tensor | float) -> None:
    """Multiplies every tensor in place by ``factor`` (a float or 0-d tensor), per device/dtype group."""
    if not tensors:
        return
    if not isinstance(factor, torch.Tensor):
        if factor != 1:  # a python 1 would cost a whole pass over the gradients for nothing
            torch._foreach_mul_(list(tensors), factor)
        return
    factor = factor.detach()
    for device, dtype, group in grouped(tensors):
        torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))
