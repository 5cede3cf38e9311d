"""Initial values of new embedding rows: a counter-based generator per (stream, id, column).

The ``entry`` initializers (Zeros, Constants, RandomUniform) as the
``EmbeddingTable`` applies them to rows it creates. The value of (stream, id,
column) is a hash of those three numbers, so an id gets the same initial row
whatever batch, order, process or device first sees it. One implementation per
device type, as ``HashIndex``: a compiled kernel (``kernels.fill_uniform``) for
CPU tables, torch ops elsewhere (CUDA); both give the same bits.

May import ``monolith_torch.core``, ``entry`` and ``kernels`` (on first use).
"""

from __future__ import annotations

import torch

from monolith_torch.core.hashing import COLUMN_MUL, SPLITMIX_GAMMA, signed64, splitmix64, srl
from monolith_torch.embedding import entry

__all__ = [
    "check_initializer",
    "initial_values",
    "initial_values_torch",
    "kernels_for",
    "stream_seed",
    "write_initial_values",
]

_SM_GAMMA = signed64(SPLITMIX_GAMMA)
_COL_MUL = signed64(COLUMN_MUL)
_INITIALIZERS = (entry.ZerosInitializer, entry.ConstantsInitializer, entry.RandomUniformInitializer)


def stream_seed(seed: int, slot_id: int) -> int:
    """The generator stream of a table: a 64-bit mix of its ``seed`` and ``slot_id``."""
    x = torch.tensor([signed64(seed * SPLITMIX_GAMMA + slot_id * 0xC2B2AE3D27D4EB4F + 1)])
    return int(splitmix64(x)[0])


def kernels_for(device: torch.device):
    """The compiled CPU kernels for a table on ``device``, or None (torch ops) off the CPU."""
    if torch.device(device).type != "cpu":
        return None
    # As HashIndex: numba is imported on first use, by processes with CPU tables.
    from monolith_torch.embedding import kernels

    return kernels


def check_initializer(initializer: entry.Initializer) -> None:
    """Raises TypeError unless ``initializer`` is one this module implements."""
    if not isinstance(initializer, _INITIALIZERS):
        raise TypeError(f"unsupported initializer {type(initializer).__name__}")


def initial_values_torch(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int
) -> torch.Tensor:
    """The torch implementation of ``initial_values`` (used on CUDA; tests run it on CPU too)."""
    check_initializer(initializer)
    n, d = ids.numel(), columns.numel()
    if isinstance(initializer, entry.ZerosInitializer):
        return torch.zeros((n, d), dtype=torch.float32, device=ids.device)
    if isinstance(initializer, entry.ConstantsInitializer):
        return torch.full((n, d), float(initializer.constant), dtype=torch.float32, device=ids.device)
    lo, hi = initializer.bounds()
    x = ids.long()[:, None] * _SM_GAMMA + (columns.long()[None, :] + 1) * _COL_MUL + stream
    bits = srl(splitmix64(x), 40)  # top 24 bits: exact in float32
    u = bits.to(torch.float32) * (1.0 / (1 << 24))
    return (lo + (hi - lo) * u).to(torch.float32)


def write_initial_values(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int, out: torch.Tensor, kernels
) -> None:
    """Writes the initial values of ``ids`` [U] in ``columns`` [d] into ``out`` [U, d] float32, in place.

    ``out`` may be a strided block of a table's values, so no [U, d]
    temporary is made on CPU. ``kernels``: ``kernels_for(device)``, the
    compiled CPU kernels or None for the torch implementation.

    Raises:
        TypeError: an unsupported initializer; ``out`` is not written.
    """
    check_initializer(initializer)
    if isinstance(initializer, entry.ZerosInitializer):
        out.zero_()
    elif isinstance(initializer, entry.ConstantsInitializer):
        out.fill_(float(initializer.constant))
    elif kernels is not None:
        lo, hi = initializer.bounds()
        # The same float32 rounding of the bounds as the torch ops (see fill_uniform).
        kernels.fill_uniform(
            ids.contiguous().numpy(), columns.contiguous().numpy(), stream, float(lo), float(hi - lo), out.numpy()
        )
    else:
        out.copy_(initial_values_torch(initializer, ids, columns, stream))


def initial_values(
    initializer: entry.Initializer, ids: torch.Tensor, columns: torch.Tensor, stream: int
) -> torch.Tensor:
    """Initial values [U, d] of ``ids`` [U] in row columns ``columns`` [d].

    A compiled kernel for CPU ids (one call in place of ~25 small torch ops,
    whose dispatch cost dominated), torch ops elsewhere; both give the same
    bits.

    Raises:
        TypeError: an unsupported initializer.
    """
    if ids.device.type != "cpu":
        return initial_values_torch(initializer, ids, columns, stream)
    out = torch.empty((ids.numel(), columns.numel()), dtype=torch.float32)
    write_initial_values(initializer, ids.long(), columns.long(), stream, out, kernels_for(ids.device))
    return out
