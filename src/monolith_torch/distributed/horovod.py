"""The Horovod backend of :func:`~monolith_torch.distributed.allreduce.allreduce_cond`.

Horovod is optional (built by ``scripts/build_horovod.sh``): importing this module
does not import it; :func:`allreduce_horovod` does, through
:func:`~monolith_torch.distributed.config.import_horovod`, and runs only when
``AllreduceConfig(backend="horovod")`` is active, i.e. after ``hvd.init()`` under
``horovodrun``. Every rank must make the same calls in the same order: the collective
names below are positions, identical across ranks. May import
:mod:`monolith_torch.distributed.config`, ``.buckets``, ``.flat_buffers``,
:mod:`monolith_torch.core` and torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from monolith_torch.core.tensor_lists import group_by_device_and_dtype
from monolith_torch.distributed.buckets import bucket_indices, divide_scale
from monolith_torch.distributed.config import AllreduceConfig, import_horovod
from monolith_torch.distributed.flat_buffers import (
    aligned_flat_layout,
    aligned_flat_pack,
    aligned_flat_views,
    one_dim_view,
)

__all__ = ["allreduce_horovod"]


@dataclass(frozen=True)
class _HorovodWire:
    """Wire dtypes on Horovod: fp16 compression as Horovod's ``Compression.fp16``.

    Horovod 0.28 has no bfloat16 type, so bfloat16 tensors travel as float32 (never as
    float16, whose range is smaller) and are rounded back after the sum.
    """

    compression: str | None

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.compression == "fp16" and torch.finfo(dtype).bits > 16:
            return torch.float16
        return torch.float32 if dtype == torch.bfloat16 else dtype


def _fail_horovod(what: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"allreduce_cond: Horovod {what} failed. A peer process may have died or never "
        f"joined the collective (Horovod's own HOROVOD_GLOO_TIMEOUT_SECONDS bounds the "
        f"wait); treat the job as broken and restart. Cause: {err}"
    )


def allreduce_horovod(
    tensors: list[torch.Tensor], scale: float | torch.Tensor, config: AllreduceConfig
) -> list[torch.Tensor]:
    """``allreduce_cond``'s Horovod backend, on checked, non-empty ``tensors``.

    Same arithmetic as the torch backend: no compression uses Horovod's ``Average`` on
    ``x * scale``; fp16 sums ``x * scale / size`` (the division first keeps the fp16
    sum in range), with Horovod's ``Compression.fp16`` for fusion ``"none"`` and
    ``"grouped"`` and the cast folded into the flat-buffer copy for ``"one"``. Out of
    place; never reads a tensor ``scale`` on the host.

    Raises:
        RuntimeError: a Horovod collective failed (a peer died, or never joined).
    """
    hvd = import_horovod()
    if config.compression is None:
        # Horovod's own average (sum, then divide by size), as Monolith calls it.
        op, prescale = hvd.Average, scale
    else:
        # Sum of (x * scale / size): dividing first keeps the fp16 sum in range.
        op, prescale = hvd.Sum, divide_scale(scale, hvd.size())
    wire = _HorovodWire(config.compression)
    if config.fusion == "one":
        return _horovod_one(hvd, tensors, prescale, op, wire, config.bucket_cap_bytes)
    out: list[torch.Tensor] = [tensors[0]] * len(tensors)
    for k, idx in enumerate(group_by_device_and_dtype(tensors).values()):
        dtype = tensors[idx[0]].dtype
        send = wire.wire_dtype(dtype)
        # Horovod's fp16 compressor casts whatever it gets: hand it the prescaled
        # source-precision copy so the value is rounded to fp16 once, as on torch.
        compressed = send == torch.float16 and dtype != torch.float16
        compression = hvd.Compression.fp16 if compressed else hvd.Compression.none
        src = torch.float32 if dtype == torch.bfloat16 else dtype
        scaled = [_scaled_copy(tensors[i], prescale, src) for i in idx]
        try:
            if config.fusion == "grouped":
                what = f"grouped_allreduce of {len(idx)} {dtype} tensor(s) (fusion='grouped')"
                reduced = hvd.grouped_allreduce(
                    scaled, op=op, compression=compression, name=f"monolith.grouped.{k}"
                )
            else:
                reduced = []
                for i, t in zip(idx, scaled, strict=True):
                    what = f"allreduce of tensor {i} of {len(tensors)} (fusion='none')"
                    reduced.append(
                        hvd.allreduce(t, op=op, compression=compression, name=f"monolith.{i}")
                    )
        except (RuntimeError, ValueError) as err:  # HorovodInternalError is a RuntimeError
            raise _fail_horovod(what, err) from err
        for i, r in zip(idx, reduced, strict=True):
            out[i] = r if r.dtype == dtype else r.to(dtype)
    return out


def _scaled_copy(
    t: torch.Tensor, prescale: float | torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    # Horovod reads raw buffers, so they must be contiguous; its allreduce is out of
    # place, so an input that needs no change is passed as it is.
    if isinstance(prescale, (int, float)) and prescale == 1 and t.dtype == dtype:
        if t.is_contiguous():
            return t
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    torch.mul(one_dim_view(t), prescale, out=one_dim_view(out))
    return out


def _horovod_one(
    hvd: Any,
    tensors: list[torch.Tensor],
    prescale: float | torch.Tensor,
    op: Any,
    wire: _HorovodWire,
    cap_bytes: int | None,
) -> list[torch.Tensor]:
    # The aligned flat buffer is built directly in the wire dtype: the fp16 cast rides
    # on the packing copy (same single rounding as Horovod's Compression.fp16, one pass
    # fewer), and each bucket's allreduce starts while the next one is packed.
    what = f"fused allreduce of {len(tensors)} tensor(s) (fusion='one')"
    pending = []
    try:
        for k, idx in enumerate(bucket_indices(tensors, wire, cap_bytes)):
            group = [tensors[i] for i in idx]
            send = wire.wire_dtype(group[0].dtype)
            sizes, total = aligned_flat_layout([t.numel() for t in group], send)
            flat = aligned_flat_pack(group, prescale, send, sizes, total)
            handle = hvd.allreduce_async_(flat, op=op, name=f"monolith.aligned_flat.{k}")
            pending.append((idx, group, sizes, flat, handle))
        for *_, handle in pending:
            hvd.synchronize(handle)
    except RuntimeError as err:
        raise _fail_horovod(what, err) from err
    out: list[torch.Tensor] = [tensors[0]] * len(tensors)
    for idx, group, sizes, flat, _ in pending:
        dtype = group[0].dtype
        flat = flat if flat.dtype == dtype else flat.to(dtype)
        for i, view in zip(
            idx, aligned_flat_views(flat, sizes, [t.shape for t in group]), strict=True
        ):
            out[i] = view
    return out
