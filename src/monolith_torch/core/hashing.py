"""The one home of the 64-bit integer hashes: mixers and their constants, for torch, numpy and numba.

- ``splitmix64``: splitmix64's finalizer (Steele, Lea and Flood). Seeds the
  per-id initializers and the synthetic data generator.
- ``fmix64``: MurmurHash3's 64-bit finalizer. Picks the owner rank of an id
  in sharded tables.
- ``INDEX_MUL``/``INDEX_GOLDEN``: the hash index's multiply-xorshift before
  Fibonacci hashing (home bucket of a key).
- ``hash_string_ids``: XXH64 (Yann Collet's xxHash, 64-bit variant, seed 0)
  of a string's UTF-8 bytes, as int64: the id of a ``dtype = "string"``
  feature. Fixed for good: an id computed today is the id of the same string
  in every later version, on every platform, so tables and checkpoints stay
  valid; ``np.uint64(xxhash.xxh64_intdigest(s.encode())).view(np.int64)``
  reproduces it without this library. pyarrow.compute has no element-wise
  hash, so it runs in numpy over the Arrow buffers, one vector step per
  8-byte word position over all strings at once (strings of 32 bytes or more
  sorted by length so each step touches only the ones still running); no
  Python loop over strings.
- ``fold_ids``: ids folded into a fixed number of hashed buckets
  (``splitmix64`` then modulo), the collision-prone baseline that
  collisionless tables are compared against.

torch has no uint64 arithmetic, so the torch versions work on int64 with the
constants as signed values (multiplication wraps the same way) and a logical
right shift (``srl``). The numpy and scalar versions work on uint64, where
shifts are logical and multiplies wrap by definition; ``splitmix64_scalar`` is
plain code that numba compiles inside the CPU kernels. All give the same bits.
Imports only torch, numpy and pyarrow.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    "hash_string_ids",
    "fold_ids",
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


# ---------------------------------------------------------------- XXH64 of strings (Yann Collet's constants)

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
_LOW32 = np.uint64(0xFFFFFFFF)
# Reads past a string's end (masked out afterwards) stay inside the word table.
_PAD = 40


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotl(acc + lane * _P2, 31) * _P1


def _merge(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (h ^ _round(np.zeros_like(v), v)) * _P1 + _P4


def _word_table(buf: np.ndarray) -> np.ndarray:
    """[8, M] little-endian uint64 words of ``buf`` starting at every byte offset: row r holds offsets r, r+8, ...

    Eight shifted copies of the buffer let one gather read a word at any byte
    offset, instead of gathering eight bytes per word.
    """
    m = (len(buf) - 8) // 8
    table = np.empty((8, m), dtype="<u8")
    as_bytes = table.view(np.uint8)
    for r in range(8):
        as_bytes[r] = buf[r : r + 8 * m]
    return table


def _read(words: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The 8-byte little-endian words at byte offsets ``pos``."""
    return words[pos & 7, pos >> 3]


def _stripes(words: np.ndarray, starts: np.ndarray, n_stripes: np.ndarray, seed: int) -> np.ndarray:
    """XXH64's four-lane accumulation over 32-byte stripes, for rows with at least one."""
    order = np.argsort(-n_stripes, kind="stable")
    starts, neg = starts[order], -n_stripes[order]
    n = len(order)
    s64 = np.uint64(seed)
    v = [np.full(n, (seed + int(_P1) + int(_P2)) & MASK64, np.uint64),
         np.full(n, (seed + int(_P2)) & MASK64, np.uint64),
         np.full(n, s64, np.uint64), np.full(n, (seed - int(_P1)) & MASK64, np.uint64)]
    for s in range(int(-neg[0])):
        k = int(np.searchsorted(neg, -s, side="left"))  # rows with more than s stripes
        pos = starts[:k] + 32 * s
        for lane in range(4):
            v[lane][:k] = _round(v[lane][:k], _read(words, pos + 8 * lane))
    h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
    for lane in range(4):
        h = _merge(h, v[lane])
    out = np.empty(n, np.uint64)
    out[order] = h
    return out


def _xxh64(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """XXH64 of ``buf[starts[i] : starts[i] + lengths[i]]`` for every i; ``buf`` padded by ``_PAD``."""
    words = _word_table(buf)
    n_stripes = lengths // 32
    h = np.full(len(lengths), (seed + int(_P5)) & MASK64, np.uint64)
    long_rows = np.nonzero(n_stripes)[0]
    if long_rows.size:
        h[long_rows] = _stripes(words, starts[long_rows], n_stripes[long_rows], seed)
    h += lengths.astype(np.uint64)
    pos = starts + 32 * n_stripes
    rem = lengths - 32 * n_stripes
    n_words = rem // 8
    for j in range(3):
        step = _rotl(h ^ _round(np.zeros_like(h), _read(words, pos + 8 * j)), 27) * _P1 + _P4
        h = np.where(n_words > j, step, h)
    pos = pos + 8 * n_words
    has4 = (rem % 8) >= 4
    step = _rotl(h ^ ((_read(words, pos) & _LOW32) * _P1), 23) * _P2 + _P3
    h = np.where(has4, step, h)
    pos = pos + 4 * has4
    tail = rem % 4
    last = _read(words, pos)
    for j in range(3):
        byte = (last >> np.uint64(8 * j)) & np.uint64(0xFF)
        step = _rotl(h ^ (byte * _P5), 11) * _P1
        h = np.where(tail > j, step, h)
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


def _as_binary(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    t = values.type
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_null(t):
        return pc.cast(values, pa.large_binary())
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return pc.cast(values, pa.large_binary())
    if getattr(pa.types, "is_string_view", lambda _: False)(t) or getattr(pa.types, "is_binary_view", lambda _: False)(t):
        return pc.cast(values, pa.large_binary())
    raise TypeError(f"hash_string_ids needs strings or bytes, got an array of {t}")


def hash_string_ids(values, seed: int = 0) -> np.ndarray:
    """64-bit ids of strings: XXH64 of each value's UTF-8 bytes, as int64.

    Equal to ``xxhash.xxh64_intdigest(value.encode("utf-8"), seed)`` with the
    bits read as signed, for every value (bytes are hashed as they are). A
    null hashes as the empty string; callers that treat null as missing mask
    it themselves. Vectorized: a handful of numpy steps per 8-byte word of
    the longest value, none per string.

    Args:
        values: a pyarrow string/binary array (plain, large, view, chunked or
            dictionary-encoded), a numpy array of ``str``/``bytes``, or a list.
        seed: XXH64's seed, in [0, 2**64); the schema always uses 0.

    Returns:
        [N] int64 numpy array.

    Raises:
        TypeError: values that are not strings or bytes.
        ValueError: a seed outside [0, 2**64).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) <= MASK64:
        raise ValueError(f"Invalid seed: {seed!r} (expected an integer in [0, 2**64))")
    arr = _as_binary(values)
    if arr.null_count:
        arr = arr.fill_null(b"")
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    first, last = int(offsets[0]), int(offsets[-1])
    buf = np.zeros(last - first + _PAD, np.uint8)
    buf[: last - first] = raw[first:last]
    starts = offsets[:-1] - first
    return _xxh64(buf, starts, offsets[1:] - offsets[:-1], int(seed)).view(np.int64)


def fold_ids(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Ids folded into ``buckets`` hashed buckets: ``splitmix64(id) mod buckets``, as int64 in [0, buckets).

    The fixed-size, collision-prone table of classic CTR libraries; with a
    collisionless table every distinct id keeps its own row instead.

    Raises:
        ValueError: ``buckets`` < 1.
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"Invalid buckets: {buckets!r} (expected an integer >= 1)")
    return (splitmix64_np(np.asarray(ids).view(np.uint64)) % np.uint64(buckets)).astype(np.int64)
