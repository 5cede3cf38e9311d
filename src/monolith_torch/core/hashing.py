"""64-bit integer helpers for the hashes computed on int64 tensors."""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def signed64(x: int) -> int:
    """A 64-bit constant as a signed int64, so torch multiplies it with wraparound."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)
