"""Flat, 64-byte-aligned buffers for fused collectives.

Re-creates Monolith's ``monolith_aligned_flat_concat`` / ``monolith_aligned_flat_split``
kernels (GPU only, float32 only, at most 1023 tensors there) for any floating dtype,
any device and any number of tensors. ``allreduce_cond(..., fusion="one")`` packs the
gradients with the same layout (one buffer per bucket of at most
``AllreduceConfig.bucket_cap_bytes``), reduces each buffer and unpacks it into views.

Layout: tensor ``i`` (flattened, ``n_i`` elements) occupies ``flat[o_i : o_i + n_i]``
where every offset ``o_i`` is a multiple of ``64 // itemsize`` elements, so each
segment starts on a 64-byte boundary (the allocators hand out 64-byte-aligned CPU
and 512-byte-aligned CUDA storage). The gaps and the tail up to the next boundary are
zero. The layout depends only on the element counts and the element size, so the
same list of shapes always gives the same buffer on every rank.

Mixed dtypes: a buffer has one dtype. Either all tensors share it, or the caller
names the buffer's ``dtype`` and the values are cast during the copy (this is how
fp16/bf16 compression packs float32 gradients). ``allreduce_cond`` groups its
gradients by (device, dtype) and builds one buffer per group.

:func:`aligned_flat_layout`, :func:`aligned_flat_pack` and :func:`aligned_flat_views`
are the unchecked building blocks the allreduce uses on its hot path. Imports only
torch. Also importable under Monolith's name, ``monolith_torch.distribution_ops``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ALIGNMENT_BYTES",
    "aligned_flat_concat",
    "aligned_flat_layout",
    "aligned_flat_numel",
    "aligned_flat_pack",
    "aligned_flat_split",
    "aligned_flat_views",
    "check_scale",
    "one_dim_view",
]

ALIGNMENT_BYTES = 64
# Mean elements per tensor from which a per-tensor multiply-copy beats cat + multiply.
_LARGE_MEAN_NUMEL = 16384


def _align_elems(dtype: torch.dtype) -> int:
    itemsize = dtype.itemsize
    return max(1, ALIGNMENT_BYTES // itemsize)


def aligned_flat_layout(numels: Sequence[int], dtype: torch.dtype) -> tuple[list[int], int]:
    """The aligned layout of tensors with ``numels`` elements in a buffer of ``dtype``.

    No validation: the building block of :func:`aligned_flat_concat` and
    :func:`aligned_flat_split` for callers that checked their inputs.

    Returns:
        The split sizes ``[n_0, pad_0, n_1, pad_1, ...]`` (``flat.split(sizes)[0::2]``
        are the segments) and the buffer's total length.
    """
    align = _align_elems(dtype)
    sizes: list[int] = []
    total = 0
    for n in numels:
        padded = -(-n // align) * align
        sizes.append(n)
        sizes.append(padded - n)
        total += padded
    return sizes, total


def _check_floating_dtype(dtype: object, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating dtype, got {dtype}")
    return dtype


def _check_tensor_list(tensors: object, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(tensors)


def one_dim_view(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a 1-element view of it when ``t`` is 0-d.

    For multiplying by a 0-d tensor ``scale`` in ``t``'s dtype: torch promotes a 0-d
    tensor times a 0-d tensor of a wider dtype (bfloat16 * float32 -> float32), but
    not a tensor with a dimension, whose product keeps its dtype and rounds exactly as
    a whole flat buffer multiplied in place does.
    """
    return t.reshape(1) if t.dim() == 0 else t


def check_scale(scale: object, device: torch.device | None = None) -> None:
    """Raises unless ``scale`` is a python number or a 0-d floating tensor (on ``device`` or the CPU)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(
            f"scale must be a python float or a 0-d floating tensor, got "
            f"{type(scale).__name__}: {scale!r}"
        )
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a 0-d tensor, got shape {tuple(scale.shape)}")
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scale must be a floating tensor, got dtype {scale.dtype}")
        if device is not None and scale.device != device and scale.device.type != "cpu":
            raise ValueError(
                f"scale must be on the tensors' device {device} or on the CPU, got {scale.device}"
            )


def aligned_flat_numel(like: Sequence[torch.Tensor | torch.Size], dtype: torch.dtype) -> int:
    """Length of the aligned flat buffer that holds tensors shaped like ``like``.

    Args:
        like: tensors or shapes, in buffer order.
        dtype: the buffer's dtype; its element size sets the alignment in elements.

    Returns:
        The number of elements of the buffer, padding included.
    """
    _check_floating_dtype(dtype, "dtype")
    return aligned_flat_layout([_numel_of(x, i) for i, x in enumerate(like)], dtype)[1]


def _numel_of(x: object, i: int) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, Sequence) and all(isinstance(d, int) and d >= 0 for d in x):
        n = 1
        for d in x:
            n *= d
        return n
    raise TypeError(f"like[{i}] must be a torch.Tensor or a shape, got {type(x).__name__}: {x!r}")


def _shape_of(x: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)


def aligned_flat_concat(
    tensors: Sequence[torch.Tensor],
    scale: float | torch.Tensor = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Copies ``tensors`` into one flat buffer, each segment 64-byte aligned, times ``scale``.

    Re-creates Monolith's ``monolith_aligned_flat_concat``. The scale (and the cast to
    ``dtype``, if any) is folded into the packing, so a clip or averaging factor costs
    no pass over the inputs of its own: large tensors are multiplied as they are copied;
    many small ones are packed by one ``cat`` and the buffer is multiplied in place
    (cheaper on CPU than a call per tensor). Out of place: the inputs are not modified.
    No host sync, also when ``scale`` is a tensor.

    Args:
        tensors: floating tensors on one device, any shapes (0-d and empty included).
        scale: python number or 0-d floating tensor (on the tensors' device or the CPU)
            that multiplies every value.
        dtype: the buffer's dtype. ``None`` (default) requires all tensors to share one
            dtype and uses it; a floating dtype casts every tensor into it.

    Returns:
        A 1-D contiguous tensor of :func:`aligned_flat_numel` elements; padding is zero
        (for a finite ``scale``; it is multiplied along with the values).

    Raises:
        TypeError: ``tensors`` is not a list of floating tensors, ``scale`` or ``dtype``
            has the wrong type, or the dtypes differ and ``dtype`` is ``None``.
        ValueError: the tensors live on different devices, an empty list is given
            without ``dtype``, or ``scale`` is not 0-d.
    """
    tensors = _check_tensor_list(tensors, "tensors")
    if dtype is not None:
        _check_floating_dtype(dtype, "dtype")
    if not tensors:
        if dtype is None:
            raise ValueError("tensors is empty: pass dtype= to build an empty buffer")
        check_scale(scale, torch.device("cpu"))
        return torch.empty(0, dtype=dtype)
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not t.dtype.is_floating_point:
            raise TypeError(f"tensors[{i}] must have a floating dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(
                f"tensors must share one device: tensors[0] is on {device}, "
                f"tensors[{i}] is on {t.device}"
            )
        if dtype is None and t.dtype != tensors[0].dtype:
            raise TypeError(
                f"tensors must share one dtype when dtype is None: tensors[0] is "
                f"{tensors[0].dtype}, tensors[{i}] is {t.dtype}; group them by dtype or pass dtype="
            )
    check_scale(scale, device)
    buf_dtype = dtype if dtype is not None else tensors[0].dtype
    sizes, total = aligned_flat_layout([t.numel() for t in tensors], buf_dtype)
    return aligned_flat_pack(tensors, scale, buf_dtype, sizes, total)


def aligned_flat_pack(
    tensors: list[torch.Tensor],
    scale: float | torch.Tensor,
    buf_dtype: torch.dtype,
    sizes: list[int],
    total: int,
) -> torch.Tensor:
    """:func:`aligned_flat_concat` without its checks, on a precomputed layout.

    For hot paths that validated ``tensors`` and ``scale`` already (the checks cost
    more than the copy for many small tensors). Out of place; no host sync.

    Args:
        tensors: non-empty list of floating tensors on one device.
        scale: python number or 0-d floating tensor.
        buf_dtype: the buffer's floating dtype.
        sizes: :func:`aligned_flat_layout`'s split sizes for ``buf_dtype``.
        total: :func:`aligned_flat_layout`'s total length.

    Returns:
        A new 1-D buffer of ``total`` elements, as :func:`aligned_flat_concat`.
    """
    device = tensors[0].device
    flat = torch.empty(total, dtype=buf_dtype, device=device)
    scale_is_one = isinstance(scale, (int, float)) and scale == 1
    # Small tensors: one C++ cat (padding included) beats per-tensor copies by ~4x on
    # CPU, and a multiply over the whole buffer after it is cheap. Large tensors: a
    # per-tensor multiply-copy saves that second pass over the data (5-10% on
    # bench/bench_allreduce.py's workload (a)). Casting: always multiply-copy.
    small = total < _LARGE_MEAN_NUMEL * len(tensors)
    if scale_is_one or (small and all(t.dtype == buf_dtype for t in tensors)):
        zeros = torch.zeros(_align_elems(buf_dtype), dtype=buf_dtype, device=device)
        pads: dict[int, torch.Tensor] = {}
        pieces: list[torch.Tensor] = []
        append = pieces.append
        for t, pad in zip(tensors, sizes[1::2], strict=True):
            append(t if t.dim() == 1 else t.reshape(-1))
            if pad:
                z = pads.get(pad)
                if z is None:
                    z = pads[pad] = zeros[:pad]
                append(z)
        torch.cat(pieces, out=flat)
        if not scale_is_one:
            flat.mul_(scale)
    else:
        # One pass per tensor; when casting to a narrower dtype it also scales in the
        # source precision and rounds once.
        segments = flat.split(sizes)
        gaps = [p for p in segments[1::2] if p.numel()]
        if gaps:
            torch._foreach_zero_(gaps)
        for seg, t in zip(segments[0::2], tensors, strict=True):
            if t.dim() == 0:
                torch.mul(one_dim_view(t), scale, out=seg)
            else:
                torch.mul(t, scale, out=seg.view(t.shape))
    return flat


def aligned_flat_views(
    flat: torch.Tensor, sizes: Sequence[int], shapes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """:func:`aligned_flat_split` without its checks, on a precomputed layout.

    Args:
        flat: 1-D contiguous buffer of the layout's total length.
        sizes: :func:`aligned_flat_layout`'s split sizes.
        shapes: one shape per segment.

    Returns:
        Views of ``flat``, one per shape; no copy.
    """
    segments = flat.split(sizes)
    return [
        seg if len(shape) == 1 else seg.view(shape)
        for seg, shape in zip(segments[0::2], shapes, strict=True)
    ]


def aligned_flat_split(
    like: Sequence[torch.Tensor | torch.Size],
    flat: torch.Tensor,
    *,
    layout_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``: the inverse of :func:`aligned_flat_concat`.

    Re-creates Monolith's ``monolith_aligned_flat_split``. No copy: the results share
    ``flat``'s storage and have its dtype and device.

    Args:
        like: tensors or shapes, in the order they were concatenated.
        flat: the 1-D contiguous buffer.
        layout_dtype: the dtype whose element size set the offsets (default
            ``flat.dtype``). Lets a buffer packed as float16 be cast to float32 as a
            whole and then split: the element offsets stay the same.

    Returns:
        One view per entry of ``like``.

    Raises:
        TypeError: ``flat`` is not a tensor or an entry of ``like`` is neither a tensor
            nor a shape.
        ValueError: ``flat`` is not 1-D and contiguous, or its length is not the length
            the layout of ``like`` needs.
    """
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
    if isinstance(like, torch.Tensor) or not isinstance(like, Sequence):
        raise TypeError(
            f"like must be a list or tuple of tensors or shapes, got {type(like).__name__}"
        )
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(
            f"flat must be a 1-D contiguous tensor, got shape {tuple(flat.shape)} "
            f"(contiguous={flat.is_contiguous()})"
        )
    layout_dtype = flat.dtype if layout_dtype is None else layout_dtype
    _check_floating_dtype(layout_dtype, "layout_dtype")
    sizes, total = aligned_flat_layout([_numel_of(x, i) for i, x in enumerate(like)], layout_dtype)
    if flat.numel() != total:
        raise ValueError(
            f"flat has {flat.numel()} elements, but the aligned layout of {len(like)} "
            f"tensor(s) for {layout_dtype} needs {total}"
        )
    return aligned_flat_views(flat, sizes, [_shape_of(x) for x in like])
