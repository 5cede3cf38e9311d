"""The one home of the 64-bit integer hashes: mixers and their constants, for torch, numpy and numba.

- ``splitmix64``: splitmix64's finalizer (Steele, Lea and Flood). Seeds the
  per-id initializers and the synthetic data generator.
- ``fmix64``: MurmurHash3's 64-bit finalizer. Picks the owner rank of an id
  in sharded tables.
- ``INDEX_MUL``/``INDEX_GOLDEN``: the hash index's multiply-xorshift before
  Fibonacci hashing (home bucket of a key).

torch has no uint64 arithmetic, so the torch versions work on int64 with the
constants as signed values (multiplication wraps the same way) and a logical
right shift (``srl``). The numpy and scalar versions work on uint64, where
shifts are logical and multiplies wrap by definition; ``splitmix64_scalar`` is
plain code that numba compiles inside the CPU kernels. All give the same bits.
Imports only torch and numpy.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "MASK64",
    "signed64",
    "srl",
    "SPLITMIX_GAMMA",
    "COLUMN_MUL",
    "INDEX_MUL",
    "INDEX_GOLDEN",
    "splitmix64",
    "splitmix64_np",
    "splitmix64_scalar",
    "fmix64",
]

MASK64 = (1 << 64) - 1

SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB
# Mixes a row's column number into the initializer's hash.
COLUMN_MUL = 0xD1B54A32D192ED03
_FMIX_C1 = 0xFF51AFD7ED558CCD
_FMIX_C2 = 0xC4CEB9FE1A85EC53
INDEX_MUL = 0xFF51AFD7ED558CCD
INDEX_GOLDEN = 0x9E3779B97F4A7C15


def signed64(x: int) -> int:
    """A 64-bit constant as a signed int64, so torch multiplies it with wraparound."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


_M1_S64, _M2_S64 = signed64(_SPLITMIX_M1), signed64(_SPLITMIX_M2)
_C1_S64, _C2_S64 = signed64(_FMIX_C1), signed64(_FMIX_C2)
_M1_U64, _M2_U64 = np.uint64(_SPLITMIX_M1), np.uint64(_SPLITMIX_M2)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on an int64 tensor (bits as uint64); a new tensor."""
    x = (x ^ srl(x, 30)) * _M1_S64
    x = (x ^ srl(x, 27)) * _M2_S64
    return x ^ srl(x, 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a numpy array, as uint64; a new array."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1_U64
    x ^= x >> np.uint64(27)
    x *= _M2_U64
    x ^= x >> np.uint64(31)
    return x


def splitmix64_scalar(x):
    """splitmix64's finalizer on one ``np.uint64``; numba compiles it into the CPU kernels."""
    x = (x ^ (x >> np.uint64(30))) * _M1_U64
    x = (x ^ (x >> np.uint64(27))) * _M2_U64
    return x ^ (x >> np.uint64(31))


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finalizer on an int64 tensor (bits as uint64); a new tensor."""
    x = (x ^ srl(x, 33)) * _C1_S64
    x = (x ^ srl(x, 33)) * _C2_S64
    return x ^ srl(x, 33)
