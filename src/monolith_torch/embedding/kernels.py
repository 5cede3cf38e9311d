"""Compiled (numba) kernels behind ``HashIndex`` and ``EmbeddingTable`` for tables on the CPU.

The same table layout as the torch implementation in ``hash_index.py``:
``keys`` [C] int64 and ``slots`` [C] int32 (the row of each slot, ``-1``
empty, ``-2`` removed), 8-slot buckets, the same home bucket per key. The
kernels work on numpy views of the index's torch tensors (``Tensor.numpy()``
shares memory), so no copy crosses the boundary. Only the slot value marks a
slot empty or removed: every int64 is a valid id, INT64_MIN and -1 included.

A key sits at the first slot, scanning linearly from the start of its home
bucket, that was free (empty or removed) when it was inserted. Empty slots
never come back (removal leaves ``-2``; only a rebuild clears them), so the
first empty slot on a key's path ends its search. The table always keeps
empty slots (load <= 0.9), so every scan stops.

``fill_uniform`` is the CPU implementation of the RandomUniform initializer
(``embedding.initializers``), bit for bit the torch one.

Compiled on first use and cached on disk (``cache=True``); ``nogil=True`` so
tables on different threads do not serialize on the GIL.
"""

from __future__ import annotations

import numba
import numpy as np

from monolith_torch.core import hashing

_EMPTY = -1
_REMOVED = -2
_BUCKET = 8
# Ids whose home slots are read before any is resolved (see lookup).
_GROUP = 64
# The hashes' constants (core.hashing), as uint64: unsigned multiplies wrap
# by definition (numba marks signed ones no-signed-wrap, which would make an
# overflow undefined).
_MIX = np.uint64(hashing.INDEX_MUL)
_GOLDEN = np.uint64(hashing.INDEX_GOLDEN)
_SM_GAMMA = np.uint64(hashing.SPLITMIX_GAMMA)
_COL_MUL = np.uint64(hashing.COLUMN_MUL)
_U24 = np.float32(1.0 / (1 << 24))

_jit = numba.njit(cache=True, nogil=True)


@_jit
def home_slot(key, shift, bucket_mask):
    # The torch implementation's home bucket, bit for bit: wrapping 64-bit
    # multiplies and arithmetic (sign-extending) shifts.
    x = np.uint64(key) * _MIX
    x = (x ^ np.uint64(np.int64(x) >> np.int64(32))) * _GOLDEN
    return ((np.int64(x) >> shift) & bucket_mask) * _BUCKET


@_jit
def _find(tkeys, tslots, key, shift, bucket_mask, slot_mask):
    """Slot position of ``key``, or -1."""
    pos = home_slot(key, shift, bucket_mask)
    while True:
        s = tslots[pos]
        if s == _EMPTY:
            return -1
        if s >= 0 and tkeys[pos] == key:
            return pos
        pos = (pos + 1) & slot_mask


@_jit
def lookup(tkeys, tslots, shift, queries, out):
    """out[i] = row of queries[i], -1 if absent. Returns the number absent."""
    slot_mask = tslots.size - 1
    bucket_mask = np.int64(tslots.size // _BUCKET - 1)
    missing = 0
    n = queries.size
    pos = np.empty(_GROUP, dtype=np.int64)
    first_key = np.empty(_GROUP, dtype=np.int64)
    first_slot = np.empty(_GROUP, dtype=np.int32)
    for g in range(0, n, _GROUP):
        end = min(n, g + _GROUP)
        # Read the home slot of a group of ids first, in a loop without
        # branches, so that their cache misses overlap; the resolving loop
        # below branches on the data and would take them one at a time.
        # Measured: 1.5x faster lookups in a 10M-row table.
        for i in range(g, end):
            p = home_slot(queries[i], shift, bucket_mask)
            pos[i - g] = p
            first_key[i - g] = tkeys[p]
            first_slot[i - g] = tslots[p]
        for i in range(g, end):
            p, k, s, key = pos[i - g], first_key[i - g], first_slot[i - g], queries[i]
            while s != _EMPTY and (s < 0 or k != key):
                p = (p + 1) & slot_mask
                k, s = tkeys[p], tslots[p]
            if s == _EMPTY:
                out[i] = -1
                missing += 1
            else:
                out[i] = s
    return missing


@_jit
def place(tkeys, tslots, shift, keys, rows):
    """Stores distinct, absent ``keys`` with ``rows``, each at the first free slot on its path.

    Returns a checksum of the home slots read ahead (callers ignore it; it
    keeps those reads from being optimized away).
    """
    slot_mask = tslots.size - 1
    bucket_mask = np.int64(tslots.size // _BUCKET - 1)
    n = keys.size
    pos = np.empty(_GROUP, dtype=np.int64)
    touched = 0
    for g in range(0, n, _GROUP):
        end = min(n, g + _GROUP)
        # As in lookup: read the group's home slots first so the misses overlap.
        for i in range(g, end):
            p = home_slot(keys[i], shift, bucket_mask)
            pos[i - g] = p
            touched += tslots[p]
        for i in range(g, end):
            p = pos[i - g]
            while tslots[p] >= 0:
                p = (p + 1) & slot_mask
            tkeys[p] = keys[i]
            tslots[p] = rows[i]
    return touched


@_jit
def missing_keys(queries, out):
    """The distinct ``queries`` whose ``out`` is -1 (absent), sorted."""
    return np.unique(queries[out < 0])


@_jit
def insert_missing(tkeys, tslots, shift, queries, out, new_keys, first_row):
    """Stores ``new_keys`` (``missing_keys``' result) with rows ``first_row + j``; fills their rows into ``out``.

    The caller has made room for ``new_keys.size`` more entries.
    """
    rows = np.arange(first_row, first_row + new_keys.size).astype(np.int32)
    place(tkeys, tslots, shift, new_keys, rows)
    for i in range(queries.size):
        if out[i] < 0:
            out[i] = first_row + np.searchsorted(new_keys, queries[i])


@_jit
def remove(tkeys, tslots, shift, keys, out):
    """Removes distinct ``keys``; out[i] = the row keys[i] held, -1 if absent. Returns the number removed."""
    slot_mask = tslots.size - 1
    bucket_mask = np.int64(tslots.size // _BUCKET - 1)
    removed = 0
    for i in range(keys.size):
        pos = _find(tkeys, tslots, keys[i], shift, bucket_mask, slot_mask)
        if pos < 0:
            out[i] = -1
        else:
            out[i] = tslots[pos]
            tslots[pos] = _REMOVED
            removed += 1
    return removed


_mix64 = _jit(hashing.splitmix64_scalar)


@_jit
def fill_uniform(ids, columns, stream, lo, width, out):
    """out[i, j] = the RandomUniform value of (stream, ids[i], columns[j]) in [lo, lo + width).

    ``out`` [U, d] float32, any strides (a block of the table's values).
    Bitwise equal to the torch implementation: the 64-bit hash wraps as
    torch's int64 ops do, and the float math runs in float32 with ``lo`` and
    ``width`` rounded to float32 first, as torch rounds a Python scalar to the
    tensor's dtype.
    """
    lo32 = np.float32(lo)
    width32 = np.float32(width)
    d = columns.size
    col_terms = np.empty(d, dtype=np.uint64)
    for j in range(d):
        col_terms[j] = np.uint64(columns[j] + 1) * _COL_MUL + np.uint64(stream)
    for i in range(ids.size):
        base = np.uint64(ids[i]) * _SM_GAMMA
        for j in range(d):
            bits = _mix64(base + col_terms[j]) >> np.uint64(40)  # top 24 bits: exact in float32
            out[i, j] = lo32 + width32 * (np.float32(bits) * _U24)
