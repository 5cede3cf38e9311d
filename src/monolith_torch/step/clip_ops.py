"""Gradient clipping with TensorFlow's semantics, on ``torch._foreach_*`` kernels.

Re-creates Monolith's ``clip_ops`` (``global_norm``, ``clip_by_global_norm``)
and TF's ``clip_by_norm``/``clip_by_value``. Norms come back as 0-d tensors and
no function here forces a host sync: clip factors are computed with tensor ops
(``torch.where`` rather than ``if norm > clip_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from monolith_torch.core.tensor_lists import foreach_scale_, group_by_device_and_dtype, grouped

__all__ = [
    "global_norm",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_value",
    "clip_factor",
    "group_by_device_and_dtype",
    "foreach_scale_",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _present(tensors) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


def global_norm(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """sqrt(sum of squares of all elements); ``None`` entries are ignored.

    Returns:
        A 0-d float32 tensor (float64 if any input is float64) on the device of
        the first tensor; 0 for an empty list. No host sync.
    """
    present = _present(tensors)
    if not present:
        return torch.zeros((), dtype=torch.float32)
    groups = grouped(present)
    if len(groups) == 1:
        return _group_norm(groups[0][1], groups[0][2])
    out_dtype = torch.float64 if any(dtype == torch.float64 for _, dtype, _ in groups) else torch.float32
    device = present[0].device
    per_group = [_group_norm(dtype, group).to(device=device, dtype=out_dtype) for _, dtype, group in groups]
    return torch.linalg.vector_norm(torch.stack(per_group))


def _group_norm(dtype: torch.dtype, group: list[torch.Tensor]) -> torch.Tensor:
    """Norm of tensors of one device and dtype: float64 for float64, float32 otherwise."""
    if dtype == torch.float16:
        # An fp16 norm overflows past 65504, and an inf norm NaNs every clipped
        # gradient: return the per-tensor norms in float32.
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)
    else:
        # bf16 has float32's range and the kernels accumulate in float32, so only
        # the per-tensor results are rounded (<= 0.4%, as in clip_grad_norm_).
        # Asking for float32 results instead makes CPU kernels copy every
        # tensor to float32 first (1.4x the whole clip at 29M elements).
        norms = torch._foreach_norm(group, 2)
    stacked = torch.stack(norms)
    if stacked.dtype in _LOW_PRECISION:
        stacked = stacked.float()
    return torch.linalg.vector_norm(stacked)


def clip_factor(norm: torch.Tensor, clip_norm) -> torch.Tensor:
    """The factor that scales a norm down to ``clip_norm``: min(clip_norm / norm, 1).

    TF semantics: a non-finite norm gives NaN. A bound of 0 gives 0 (a zero
    norm against a zero bound gives 1, harmless since those gradients are 0).
    ``clip_norm`` may be a float or a 0-d tensor.
    """
    if isinstance(clip_norm, torch.Tensor):
        clip_norm = clip_norm.to(device=norm.device, dtype=norm.dtype)
    factor = torch.where(norm > clip_norm, clip_norm / norm, 1.0)
    # Adding norm * 0 turns the factor into NaN exactly when the norm is inf or
    # NaN (inf * 0 is NaN), with two small kernels and no host sync.
    return factor + norm * 0


def _check_clip_norm(clip_norm) -> None:
    if isinstance(clip_norm, torch.Tensor):
        return
    if not isinstance(clip_norm, int | float) or math.isnan(clip_norm) or clip_norm < 0:
        raise ValueError(f"Invalid clip_norm: {clip_norm!r} (expected a number >= 0)")


def _as_norm(use_norm, present: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(use_norm, torch.Tensor):
        return use_norm
    if isinstance(use_norm, bool) or not isinstance(use_norm, int | float):
        raise TypeError(f"use_norm must be a tensor or a number, got {type(use_norm).__name__}")
    device = present[0].device if present else None
    return torch.tensor(float(use_norm), dtype=torch.float32, device=device)


def clip_by_global_norm(t_list, clip_norm, use_norm=None):
    """Scales ``t_list`` so that its global norm is at most ``clip_norm`` (out of place).

    Args:
        t_list: tensors; ``None`` entries pass through.
        clip_norm: the bound (>= 0), a float or 0-d tensor.
        use_norm: a precomputed global norm; computed when None.

    Returns:
        (clipped list, global norm). An infinite or NaN norm makes every
        clipped tensor NaN, as in TF and Monolith.
    """
    _check_clip_norm(clip_norm)
    t_list = list(t_list)
    present = _present(t_list)
    norm = global_norm(t_list) if use_norm is None else _as_norm(use_norm, present)
    if not present:
        return t_list, norm
    factor = clip_factor(norm, clip_norm)
    clipped = iter(_scaled(present, factor))
    return [None if t is None else next(clipped) for t in t_list], norm


def _scaled(tensors: list[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        ((device, dtype),) = groups
        return list(torch._foreach_mul(list(tensors), factor.to(device=device, dtype=dtype)))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (device, dtype), idx in groups.items():
        scaled = torch._foreach_mul([tensors[i] for i in idx], factor.to(device=device, dtype=dtype))
        for i, s in zip(idx, scaled, strict=True):
            out[i] = s
    return out


def clip_by_global_norm_(t_list, clip_norm, use_norm=None) -> torch.Tensor:
    """In-place ``clip_by_global_norm``; returns the global norm."""
    _check_clip_norm(clip_norm)
    present = _present(t_list)
    norm = global_norm(present) if use_norm is None else _as_norm(use_norm, present)
    if present:
        foreach_scale_(present, clip_factor(norm, clip_norm))
    return norm


def clip_by_norm(t: torch.Tensor, clip_norm) -> torch.Tensor:
    """Scales ``t`` so that its L2 norm is at most ``clip_norm`` (out of place).

    TF's ``clip_by_norm`` over all axes: ``t * clip_norm / max(norm, clip_norm)``,
    so an infinite norm zeroes the finite entries and a NaN norm gives NaN.
    No host sync.

    Raises:
        TypeError: ``t`` not a floating-point tensor.
        ValueError: ``clip_norm`` negative or NaN.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"clip_by_norm needs a floating-point tensor, got {what}")
    _check_clip_norm(clip_norm)
    norm_dtype = torch.float32 if t.dtype in _LOW_PRECISION else t.dtype
    norm = torch.linalg.vector_norm(t, dtype=norm_dtype)
    bound = torch.as_tensor(clip_norm, dtype=norm.dtype, device=norm.device)
    factor = torch.where(norm > bound, bound / norm, torch.ones_like(norm))
    factor = torch.where(torch.isnan(norm), norm, factor)
    return t * factor.to(t.dtype)


def clip_by_value(t: torch.Tensor, clip_value_min, clip_value_max) -> torch.Tensor:
    """Clamps every element of ``t`` to ``[clip_value_min, clip_value_max]`` (out of place)."""
    if not isinstance(clip_value_min, torch.Tensor) and not isinstance(clip_value_max, torch.Tensor):
        if clip_value_min > clip_value_max:
            raise ValueError(
                f"clip_value_min={clip_value_min!r} must not exceed clip_value_max={clip_value_max!r}"
            )
    return torch.clamp(t, clip_value_min, clip_value_max)
