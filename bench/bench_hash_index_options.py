"""Which id -> row index on one CPU thread? Compiled (numba) vs torch rounds vs sorted keys vs khash vs a dict.

Question: for int64 ids on one CPU thread, which index gives the fastest
lookups and inserts of a Zipf batch into a table of ``--rows`` ids, at the two
batch sizes the store sees (4,096 ids: one table per slot; 106,496 ids: one
table for 26 features), and what does each cost per row? Options:

- ``HashIndex`` on CPU (ours): open addressing in torch tensors, probed and
  filled by numba kernels over zero-copy numpy views.
- ``HashIndex``'s torch implementation (the one CUDA tables use), run on CPU:
  vectorized probing rounds, ~100-200 small torch ops per call.
- sorted keys + ``torch.searchsorted``; an insert merges by re-sorting.
- pandas' ``Int64HashTable`` (khash; ``pandas._libs``, a private API) and
  cykhash's ``Int64toInt64Map`` (khash): only measured if importable (they are
  not project dependencies; ``pip install --target DIR pandas cykhash`` and put
  DIR on PYTHONPATH). Neither removes keys in bulk.
- a Python dict: the per-id-object reference point, not a candidate.

Inserts give new ids rows in increasing id order, as ``HashIndex`` does.

Run: ``.venv/bin/python bench/bench_hash_index_options.py --rows 10000000``.
Prints, per option and batch size, lookup and insert M ids/s and index
bytes/row, the ratio of each option's lookup time to ours, and (with
``--compile-time``) the numba kernels' first-call time with an empty and a
warm on-disk cache, each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from monolith_torch.embedding.hash_index import HashIndex, with_torch_rounds

_ODD = 0x5DEECE66D1
_OURS = "HashIndex CPU: numba kernels (ours)"
_FIRST_CALL = (
    "import time, torch; t = time.perf_counter(); from monolith_torch.embedding.hash_index import HashIndex; "
    "i = HashIndex(); i.insert(torch.arange(10)); i.lookup(torch.arange(5)); i.remove(torch.arange(2)); "
    "print(time.perf_counter() - t)"
)


def _zipf_ids(rng, n: int) -> np.ndarray:
    z = rng.zipf(1.1, 3 * n)
    z = z[z <= 50_000_000][:n]
    return (z.astype(np.int64) * _ODD) & ((1 << 62) - 1)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Sorted:
    def __init__(self, keys: torch.Tensor):
        self.keys, self.rows = torch.sort(keys)

    def lookup(self, q):
        pos = torch.searchsorted(self.keys, q).clamp_max(self.keys.numel() - 1)
        return torch.where(self.keys[pos] == q, self.rows[pos], -1)

    def insert(self, q):
        rows = self.lookup(q)
        new = torch.unique(q[rows < 0])
        n = self.keys.numel()
        self.keys, order = torch.sort(torch.cat([self.keys, new]))
        self.rows = torch.cat([self.rows, torch.arange(n, n + new.numel())])[order]
        return self.lookup(q)


class _OnNumpy:
    """Runs a torch option on numpy batches (``torch.from_numpy`` shares memory)."""

    def __init__(self, inner):
        self.inner = inner

    def lookup(self, q):
        return self.inner.lookup(torch.from_numpy(q))

    def insert(self, q):
        return self.inner.insert(torch.from_numpy(q))


class _Pandas:
    def __init__(self, keys: np.ndarray):
        from pandas._libs import hashtable

        self.t = hashtable.Int64HashTable(2 * keys.size)
        self.t.map_keys_to_values(keys, np.arange(keys.size, dtype=np.int64))
        self.n = keys.size

    def lookup(self, q):
        return self.t.lookup(q)

    def insert(self, q):
        rows = self.t.lookup(q)
        new = np.unique(q[rows < 0])
        self.t.map_keys_to_values(new, np.arange(self.n, self.n + new.size, dtype=np.int64))
        self.n += new.size
        return self.t.lookup(q)

    def nbytes(self):
        return self.t.sizeof()


class _Cykhash:
    def __init__(self, keys: np.ndarray):
        import cykhash

        self.mod = cykhash
        self.m = cykhash.Int64toInt64Map_from_buffers(keys, np.arange(keys.size, dtype=np.int64))
        self.n = keys.size

    def lookup(self, q):
        out = np.empty(q.size, dtype=np.int64)
        self.mod.Int64toInt64Map_to(self.m, q, out, stop_at_unknown=False, default_value=-1)
        return out

    def insert(self, q):
        rows = self.lookup(q)
        new = np.unique(q[rows < 0])
        self.m.update(self.mod.Int64toInt64Map_from_buffers(new, np.arange(self.n, self.n + new.size)))
        self.n += new.size
        return self.lookup(q)


class _Dict:
    def __init__(self, keys: np.ndarray):
        self.d = dict(zip(keys.tolist(), range(keys.size), strict=True))

    def lookup(self, q):
        return [self.d.get(k, -1) for k in q.tolist()]

    def insert(self, q):
        d = self.d
        return [d.setdefault(k, len(d)) for k in q.tolist()]


def _time_option(opt, batch: np.ndarray, fresh: list[np.ndarray], repeats: int) -> tuple[float, float]:
    look = _median_time(lambda: opt.lookup(batch), repeats)
    it = iter(fresh)
    ins = _median_time(lambda: opt.insert(next(it)), len(fresh))
    return look, ins


def _first_call_times() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = [sys.executable, "-c", _FIRST_CALL]
        cold = float(subprocess.run(run, env=env, check=True, capture_output=True, text=True).stdout)
        warm = float(subprocess.run(run, env=env, check=True, capture_output=True, text=True).stdout)
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 4096 * 26])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile-time", action="store_true", help="also time the numba kernels' first call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    table_np = (np.arange(1, args.rows + 1, dtype=np.int64) * _ODD) & ((1 << 62) - 1)
    table_ids = torch.from_numpy(table_np)

    # name -> (option, index bytes/row)
    options = {}
    compiled = HashIndex()
    compiled.insert(table_ids)
    options[_OURS] = (_OnNumpy(compiled), compiled.nbytes() / len(compiled))
    rounds = with_torch_rounds(HashIndex())
    rounds.insert(table_ids)
    options["HashIndex torch rounds (ours on CUDA)"] = (_OnNumpy(rounds), rounds.nbytes() / len(rounds))
    options["sorted keys + searchsorted"] = (_OnNumpy(_Sorted(table_ids)), 16.0)
    for name, cls in (("pandas Int64HashTable (khash)", _Pandas), ("cykhash Int64toInt64Map (khash)", _Cykhash)):
        try:
            opt = cls(table_np)
        except ImportError:
            print(f"{name}: not importable, skipped")
            continue
        # cykhash does not report its size; khash stores 8-byte keys, 8-byte values and 2 flag bits per slot.
        options[name] = (opt, opt.nbytes() / args.rows if hasattr(opt, "nbytes") else float("nan"))
    d = _Dict(table_np)
    options["python dict (reference)"] = (d, sys.getsizeof(d.d) / len(d.d) + 32 + 28)

    print(f"rows: {args.rows:,}; threads: {torch.get_num_threads()}")
    for bsz in args.batches:
        batch = _zipf_ids(rng, bsz)
        results = {}
        for name, (opt, bpr) in options.items():
            # Fresh ids (outside the table's range) for the inserts; re-sorting is slow, so fewer.
            n = min(3, args.repeats) if name.startswith("sorted") else args.repeats
            fresh = [_zipf_ids(rng, bsz) + (1 << 62) for _ in range(n)]
            results[name] = (*_time_option(opt, batch, fresh, args.repeats), bpr)
        ours = results[_OURS][0]
        print(f"batch: {bsz:,} ids")
        for name, (look, ins, bpr) in results.items():
            print(
                f"  {name}: lookup {bsz / look / 1e6:.3g} M ids/s, insert {bsz / ins / 1e6:.3g} M ids/s, "
                f"~{bpr:.0f} bytes/row; lookup time / ours {look / ours:.2f}"
            )
    if args.compile_time:
        cold, warm = _first_call_times()
        print(f"numba first call (import + compile or cache load): empty cache {cold:.2f} s, warm cache {warm:.2f} s")


if __name__ == "__main__":
    main()
