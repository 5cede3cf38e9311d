"""Stateless gradient compression for the allreduce, in Horovod's newer shape.

``compress(t, prescale) -> (wire, ctx)`` and ``decompress(wire, ctx)``; ``wire_dtype``
says which dtype a gradient travels in, so buffers can be laid out before packing.
A tensor ``prescale`` keeps the gradient's dtype, also for 0-d gradients. May import
:mod:`monolith_torch.distributed.config`, ``.flat_buffers`` and torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monolith_torch.distributed.config import COMPRESSIONS
from monolith_torch.distributed.flat_buffers import one_dim_view

__all__ = ["Compressor", "HalfCompressor", "NoneCompressor", "compressor_for"]


@dataclass(frozen=True)
class NoneCompressor:
    """No compression. ``compress`` still returns a new tensor: collectives work in place."""

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` travels in: itself."""
        return dtype

    def compress(
        self, tensor: torch.Tensor, prescale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, None]:
        """Returns ``(tensor * prescale, None)`` as a new tensor; the input is unchanged."""
        # Collectives need contiguous buffers; mul keeps a transposed input's strides.
        out = torch.mul(one_dim_view(tensor), prescale).contiguous()
        return out.view(tensor.shape) if tensor.dim() == 0 else out, None

    def decompress(self, tensor: torch.Tensor, ctx: None) -> torch.Tensor:
        """Returns ``tensor`` unchanged."""
        return tensor


@dataclass(frozen=True)
class HalfCompressor:
    """Sends tensors wider than 16 bits as ``half_dtype``; 16-bit tensors travel as they are.

    Attributes:
        half_dtype: ``torch.float16`` or ``torch.bfloat16``.
    """

    half_dtype: torch.dtype

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` travels in."""
        itemsize = dtype.itemsize
        return self.half_dtype if itemsize > 2 else dtype

    def compress(
        self, tensor: torch.Tensor, prescale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, torch.dtype]:
        """Returns ``(tensor * prescale cast to the wire dtype, original dtype)``.

        The multiply runs in the source precision and rounds once, so a prescale of
        ``1 / world_size`` keeps values that would overflow the half type in the sum.
        """
        # Contiguous, whatever the input's strides: collectives need it.
        out = torch.empty(tensor.shape, dtype=self.wire_dtype(tensor.dtype), device=tensor.device)
        torch.mul(one_dim_view(tensor), prescale, out=one_dim_view(out))
        return out, tensor.dtype

    def decompress(self, tensor: torch.Tensor, ctx: torch.dtype) -> torch.Tensor:
        """Casts ``tensor`` back to the dtype ``compress`` saw."""
        return tensor if tensor.dtype == ctx else tensor.to(ctx)


Compressor = NoneCompressor | HalfCompressor
"""Either compressor: what :func:`compressor_for` returns."""


def compressor_for(compression: str | None) -> Compressor:
    """The compressor for an :class:`AllreduceConfig` ``compression`` value."""
    if compression is None:
        return NoneCompressor()
    if compression == "fp16":
        return HalfCompressor(torch.float16)
    if compression == "bf16":
        return HalfCompressor(torch.bfloat16)
    raise ValueError(f"Invalid compression: {compression!r}; expected one of {COMPRESSIONS}")
