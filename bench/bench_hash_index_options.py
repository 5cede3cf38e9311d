"""Which id -> row index? Our bucketed open-addressing table vs sorted keys + searchsorted vs a dict.

Question: for int64 ids on one CPU thread, which vectorizable index gives the
fastest lookups and inserts of a 106K-id Zipf batch into a table of ``--rows``
ids, and what does each cost per row? The dict is the per-id-object
reference point (what the store must not use), not a candidate.

Run: ``.venv/bin/python bench/bench_hash_index_options.py --rows 4000000``.
Prints, per option, lookup and insert M ids/s and index bytes/row, and the
ratio of each option's lookup time to ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from monolith_torch.hash_index import HashIndex

_ODD = 0x5DEECE66D1


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--batch", type=int, default=4096 * 26)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    table_ids = torch.from_numpy((np.arange(1, args.rows + 1, dtype=np.int64) * _ODD) & ((1 << 62) - 1))
    batch = torch.from_numpy(_zipf_ids(rng, args.batch))
    fresh = [torch.from_numpy(_zipf_ids(rng, args.batch)) + (1 << 62) for _ in range(args.repeats)]
    results = {}

    # 1. Ours: bucketed open addressing in torch tensors.
    index = HashIndex()
    index.insert(table_ids)
    look = _median_time(lambda: index.lookup(batch), args.repeats)
    it = iter(fresh)
    ins = _median_time(lambda: index.insert(next(it)), args.repeats)
    results["bucketed open addressing (ours)"] = (look, ins, index.nbytes() / len(index))

    # 2. Sorted keys + torch.searchsorted; an insert merges by re-sorting.
    state = {"keys": torch.sort(table_ids).values}
    state["rows"] = torch.argsort(table_ids)

    def sorted_lookup():
        keys = state["keys"]
        pos = torch.searchsorted(keys, batch).clamp_max(keys.numel() - 1)
        return torch.where(keys[pos] == batch, state["rows"][pos], -1)

    def sorted_insert(new):
        keys, order = torch.sort(torch.cat([state["keys"], torch.unique(new)]))
        state["keys"], state["rows"] = keys, order

    look = _median_time(sorted_lookup, args.repeats)
    it = iter(fresh)
    ins = _median_time(lambda: sorted_insert(next(it)), min(3, args.repeats))
    results["sorted keys + searchsorted"] = (look, ins, 16.0)

    # 3. A Python dict (per-id objects): the reference point only.
    d = dict(zip(table_ids.tolist(), range(args.rows), strict=True))
    look = _median_time(lambda: [d.get(k, -1) for k in batch.tolist()], args.repeats)
    it = iter(fresh)
    ins = _median_time(lambda: [d.setdefault(k, len(d)) for k in next(it).tolist()], args.repeats)
    results["python dict (reference)"] = (look, ins, sys.getsizeof(d) / len(d) + 32 + 28)

    ours = results["bucketed open addressing (ours)"][0]
    print(f"rows: {args.rows:,}; batch: {args.batch:,} ids; threads: {torch.get_num_threads()}")
    for name, (look, ins, bpr) in results.items():
        print(
            f"{name}: lookup {args.batch / look / 1e6:.2f} M ids/s, insert {args.batch / ins / 1e6:.2f} M ids/s, "
            f"~{bpr:.0f} bytes/row; lookup time / ours {look / ours:.2f}"
        )


if __name__ == "__main__":
    main()
