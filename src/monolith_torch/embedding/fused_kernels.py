"""Compiled (numba) kernels of the fused embedding step on the CPU (``embedding.fused``).

One batch of a table is its features' ids, each feature a CSR block (ids and
row splits); the kernels run over all of a table's features in one call, the
features passed as tuples of arrays:

- ``dedupe``: the distinct ids of the batch (first-seen order), each id's
  index among them (``inverse``) and each distinct id's occurrences, with a
  scratch open-addressing set that stays in cache; also checks the splits.
- ``gather``: the rows [U, D] of the distinct ids (zeros for ids without one).
- ``pool``: the pooled output of every feature straight from those rows over
  the CSR offsets: sum, mean, or the first L (``FirstN``); no per-id [N, D].
- ``scatter_grads``: the pooled outputs' gradients straight to per-distinct-row
  gradient sums [U, D], in occurrence order (the order ``index_add_`` sums in).
- ``sgd``, ``adagrad``, ``ftrl``, ``adam``, ``momentum``, ``rmsprop``: one
  slice optimizer over a block of rows, in place, in float32 with the same
  operations in the same order as ``embedding.optimizers`` (so the same bits,
  but for Adam's ``pow``, which may differ in the last place).

Each kernel exists twice: serial, and parallel over chunks of rows on numba's
threads (``numba.prange``); ``fused`` picks one by ``torch.get_num_threads()``.
The parallel ``scatter_grads`` sums per thread, then adds the threads' sums,
so its rounding depends on the thread count. Compiled on first use and cached
on disk; ``nogil``. May import numpy and numba only.
"""

from __future__ import annotations

import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["KERNELS", "SERIAL", "PARALLEL", "scratch_capacity"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SUM, _MEAN, _FIRST_N = 0, 1, 2
# Rows per parallel chunk: big enough that a chunk outweighs its scheduling.
_CHUNK = 1024


def scratch_capacity(n: int) -> int:
    """Slots of the ``dedupe`` scratch set for ``n`` ids: a power of two >= 2n (load <= 1/2)."""
    return 1 << max(4, int(2 * n - 1).bit_length())


def _dedupe(ids, splits, scratch, shift, stamp, inverse, uniq, counts):
    # ``scratch`` [2C] int64 (C a power of two, ``shift`` = 64 - log2 C): per
    # slot the key and (stamp << 32 | index). A slot holds a key of this call
    # iff its stamp matches, so the set never needs clearing. Returns the
    # number of distinct ids, or -1 - f when feature f's splits are bad
    # (checked first: nothing is written then).
    for f in range(len(ids)):
        sp = splits[f]
        if sp.size < 1 or sp[0] != 0 or sp[sp.size - 1] != ids[f].size:
            return -1 - f
        for b in range(sp.size - 1):
            if sp[b + 1] < sp[b]:
                return -1 - f
    mask = scratch.size // 2 - 1
    tag = np.int64(stamp) << np.int64(32)
    u = 0
    base = 0
    for f in range(len(ids)):
        fid = ids[f]
        for i in range(fid.size):
            key = fid[i]
            h = np.int64((np.uint64(key) * _GOLDEN) >> shift)
            while True:
                val = scratch[2 * h + 1]
                if (val >> np.int64(32)) != stamp:
                    scratch[2 * h] = key
                    scratch[2 * h + 1] = tag | u
                    uniq[u] = key
                    counts[u] = 1
                    inverse[base + i] = u
                    u += 1
                    break
                if scratch[2 * h] == key:
                    j = val & np.int64(0xFFFFFFFF)
                    inverse[base + i] = j
                    counts[j] += 1
                    break
                h = (h + 1) & mask
        base += fid.size
    return u


# Rows ahead of the one being updated whose cache lines are requested early,
# so the misses of a run of random rows overlap (measured: -25% on Adagrad).
_AHEAD = 8


@intrinsic
def prefetch_row(typingctx, arr, row):
    """Asks for the first cache line of ``arr[row]`` (2-D, C order); a hint, no effect on results."""
    sig = types.void(arr, row)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer2(
            context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
            strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
            inds=[args[1], zero], wraparound=False,
        )
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        # read, high locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# Row slices (``out[b]``) rather than 2-D indexing in the inner loops: LLVM
# vectorizes a loop over row views (with a runtime overlap check) but not the
# same loop over ``a[r, j]`` (measured: 8x on the Adagrad update).


def _gather(values, rows, out):
    n = rows.size
    d = out.shape[1]
    for c in numba.prange((n + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            if u + _AHEAD < n and rows[u + _AHEAD] >= 0:
                prefetch_row(values, rows[u + _AHEAD])
            r = rows[u]
            o = out[u]
            if r < 0:
                for j in range(d):
                    o[j] = np.float32(0.0)
            else:
                v = values[r]
                for j in range(d):
                    o[j] = v[j]


def _pool_rows(w, inverse, base, sp, kind, limit, out, b0, b1):
    d = w.shape[1]
    for b in range(b0, b1):
        s0, s1 = sp[b], sp[b + 1]
        if kind == _FIRST_N:
            n = min(s1 - s0, limit)
            for p in range(n):
                o = out[b * limit + p]
                src = w[inverse[base + s0 + p]]
                for j in range(d):
                    o[j] = src[j]
            for p in range(n, limit):
                o = out[b * limit + p]
                for j in range(d):
                    o[j] = np.float32(0.0)
            continue
        o = out[b]
        for j in range(d):
            o[j] = np.float32(0.0)
        for i in range(s0, s1):
            src = w[inverse[base + i]]
            for j in range(d):
                o[j] += src[j]
        if kind == _MEAN:
            # ReduceMean divides the sum by max(length, 1), in float32.
            m = np.float32(max(s1 - s0, 1))
            for j in range(d):
                o[j] = o[j] / m


def _chunks(splits):
    # (feature, first row) of every chunk of _CHUNK rows, over all features.
    total = 0
    for f in range(len(splits)):
        total += (splits[f].size - 1 + _CHUNK - 1) // _CHUNK
    feat = np.empty(total, dtype=np.int64)
    first = np.empty(total, dtype=np.int64)
    k = 0
    for f in range(len(splits)):
        rows = splits[f].size - 1
        for b0 in range(0, rows, _CHUNK):
            feat[k] = f
            first[k] = b0
            k += 1
    return feat, first


def _pool(w, inverse, bases, splits, kinds, limits, outs):
    feat, first = _chunks(splits)
    for c in numba.prange(feat.size):
        f = feat[c]
        b0 = first[c]
        b1 = min(b0 + _CHUNK, splits[f].size - 1)
        _pool_rows(w, inverse, bases[f], splits[f], kinds[f], limits[f], outs[f], b0, b1)


def _scatter_rows(g_out, inverse, base, sp, kind, limit, grad, b0, b1):
    d = g_out.shape[1]
    for b in range(b0, b1):
        s0, s1 = sp[b], sp[b + 1]
        if kind == _FIRST_N:
            for p in range(min(s1 - s0, limit)):
                dst = g_out[inverse[base + s0 + p]]
                src = grad[b * limit + p]
                for j in range(d):
                    dst[j] += src[j]
        elif kind == _MEAN:
            m = np.float32(max(s1 - s0, 1))
            src = grad[b]
            for i in range(s0, s1):
                dst = g_out[inverse[base + i]]
                for j in range(d):
                    dst[j] += src[j] / m
        else:
            src = grad[b]
            for i in range(s0, s1):
                dst = g_out[inverse[base + i]]
                for j in range(d):
                    dst[j] += src[j]


def _scatter_grads(g_out, parts, inverse, bases, splits, kinds, limits, grads, has_grad):
    # ``g_out`` [U, D] zeros. One thread: straight into it. T threads: thread t
    # sums its share of the rows into ``parts[t]`` [U, D] (zeros), then the
    # parts are added (rows of g_out in parallel).
    threads = parts.shape[0]
    if threads <= 1:
        for f in range(len(splits)):
            if has_grad[f]:
                _scatter_rows(g_out, inverse, bases[f], splits[f], kinds[f], limits[f], grads[f], 0,
                              splits[f].size - 1)
        return
    total = 0
    for f in range(len(splits)):
        total += splits[f].size - 1
    for t in numba.prange(threads):
        lo = total * t // threads
        hi = total * (t + 1) // threads
        start = 0
        for f in range(len(splits)):
            rows = splits[f].size - 1
            a, b = max(lo, start), min(hi, start + rows)
            if has_grad[f] and a < b:
                _scatter_rows(parts[t], inverse, bases[f], splits[f], kinds[f], limits[f], grads[f],
                              a - start, b - start)
            start += rows
    n, d = g_out.shape
    for c in numba.prange((n + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            dst = g_out[u]
            for j in range(d):
                dst[j] = parts[0, u, j]
            for t in range(1, threads):
                src = parts[t, u]
                for j in range(d):
                    dst[j] += src[j]


# -- slice optimizers ---------------------------------------------------------------------------
# Each updates columns [c0, c0 + d) of ``values`` [C, D] for the rows ``rows``
# [U] (skipping -1) with ``scale * g[u]`` (g [U, D], the slice at column c0),
# and the slice's state [C, d] in place; with ``write_times`` it also writes
# ``now`` into ``times`` of each updated row (one pass over the rows for the
# last slice instead of one more). Scalars arrive as float32 (as torch
# rounds a Python scalar to the tensor's dtype), and every expression keeps
# the order of the torch rule in ``optimizers``.


def _ahead(rows, u, values, state):
    # Requests the cache lines of the row _AHEAD positions on (values and state).
    if u + _AHEAD < rows.size:
        r = rows[u + _AHEAD]
        if r >= 0:
            prefetch_row(values, r)
            prefetch_row(state, r)


def _sgd(values, c0, d, rows, g, scale, lr, times, now, write_times):
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, values)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            gu = g[u, c0:c0 + d]
            for j in range(d):
                w[j] = w[j] - lr * (gu[j] * scale)


def _adagrad(values, acc, c0, d, rows, g, scale, lr, wd, times, now, write_times):
    decay = wd != np.float32(0.0)
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, acc)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            a = acc[r]
            gu = g[u, c0:c0 + d]
            if decay:
                for j in range(d):
                    x = gu[j] * scale + wd * w[j]
                    aj = a[j] + x * x
                    a[j] = aj
                    if aj > 0:  # else x is 0 too: the column stays (0 / sqrt(0) is NaN)
                        w[j] = w[j] - lr * x / np.sqrt(aj)
            else:
                for j in range(d):
                    x = gu[j] * scale
                    aj = a[j] + x * x
                    a[j] = aj
                    if aj > 0:  # else x is 0 too: the column stays (0 / sqrt(0) is NaN)
                        w[j] = w[j] - lr * x / np.sqrt(aj)


def _ftrl(values, n_state, z_state, c0, d, rows, g, scale, lr, l1, l2lr, beta, times, now, write_times):
    # lr > 0 (the caller skips the slice otherwise, as FtrlSlice leaves it as is).
    zero = np.float32(0.0)
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, n_state)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            ns = n_state[r]
            zs = z_state[r]
            gu = g[u, c0:c0 + d]
            for j in range(d):
                x = gu[j] * scale
                n = ns[j]
                n_new = n + x * x
                sigma = (np.sqrt(n_new) - np.sqrt(n)) / lr
                z = zs[j] + (x - sigma * w[j])
                zs[j] = z
                ns[j] = n_new
                sign = np.float32(1.0) if z > zero else (np.float32(-1.0) if z < zero else zero)
                w_new = lr * (sign * l1 - z) / (np.sqrt(n_new) + beta + l2lr)
                w[j] = w_new if abs(z) > l1 else zero


def _adam(values, m_state, v_state, steps, c0, d, rows, g, scale, lr, b1, one_minus_b1, b2, one_minus_b2,
          eps, wd, times, now, write_times):
    one = np.float32(1.0)
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, m_state)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            ms = m_state[r]
            vs = v_state[r]
            ss = steps[r]
            gu = g[u, c0:c0 + d]
            for j in range(d):
                x = gu[j] * scale
                if wd != np.float32(0.0):
                    x = x + wd * w[j]
                s = ss[j] + one
                ss[j] = s
                m = ms[j] * b1 + one_minus_b1 * x
                v = vs[j] * b2 + one_minus_b2 * x * x
                ms[j] = m
                vs[j] = v
                m_hat = m / (one - np.power(b1, s))
                v_hat = v / (one - np.power(b2, s))
                w[j] = w[j] - lr * m_hat / (np.sqrt(v_hat) + eps)


def _momentum(values, n_state, c0, d, rows, g, scale, lr, mom, one_plus_mom, wd, nesterov, times, now, write_times):
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, n_state)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            ns = n_state[r]
            gu = g[u, c0:c0 + d]
            for j in range(d):
                x = gu[j] * scale
                if wd != np.float32(0.0):
                    x = x + wd * w[j]
                n_old = ns[j]
                n = n_old * mom - lr * x
                ns[j] = n
                if nesterov:
                    w[j] = w[j] - mom * n_old + one_plus_mom * n
                else:
                    w[j] = w[j] + n


def _rmsprop(values, n_state, c0, d, rows, g, scale, lr, mom, one_minus_mom, wd, times, now, write_times):
    for c in numba.prange((rows.size + _CHUNK - 1) // _CHUNK):
        for u in range(c * _CHUNK, min(rows.size, (c + 1) * _CHUNK)):
            _ahead(rows, u, values, n_state)
            r = rows[u]
            if r < 0:
                continue
            if write_times:
                times[r] = now
            w = values[r, c0:c0 + d]
            ns = n_state[r]
            gu = g[u, c0:c0 + d]
            for j in range(d):
                x = gu[j] * scale
                if wd != np.float32(0.0):
                    x = x + wd * w[j]
                n = ns[j] * mom + one_minus_mom * x * x
                ns[j] = n
                w[j] = w[j] - lr * x / (np.sqrt(n) + np.float32(1.0))


def _fill_times(times, rows, now):
    for u in range(rows.size):
        if rows[u] >= 0:
            times[rows[u]] = now


def _renamed(fn, suffix: str):
    # Numba's disk cache keys a function by its qualified name and bytecode,
    # not by ``parallel``: the parallel twin needs a name of its own, or the
    # two versions would load each other from the cache.
    twin = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    return twin


class _Kernels:
    """One compiled version of every kernel (serial or parallel)."""

    def __init__(self, parallel: bool):
        jit = numba.njit(cache=True, nogil=True, parallel=parallel, error_model="numpy")
        suffix = "_parallel" if parallel else ""
        self.parallel = parallel
        for name in ("gather", "pool", "scatter_grads", "sgd", "adagrad", "ftrl", "adam", "momentum", "rmsprop"):
            fn = globals()["_" + name]
            setattr(self, name, jit(_renamed(fn, suffix) if parallel else fn))


_serial_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
# Numba compiles helpers into their callers, so the parallel kernels share these.
_pool_rows = _serial_jit(_pool_rows)
_scatter_rows = _serial_jit(_scatter_rows)
_chunks = _serial_jit(_chunks)
_ahead = _serial_jit(_ahead)
dedupe = _serial_jit(_dedupe)
fill_times = _serial_jit(_fill_times)

SERIAL = _Kernels(parallel=False)
PARALLEL = _Kernels(parallel=True)
KERNELS = {False: SERIAL, True: PARALLEL}
