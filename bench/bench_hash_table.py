"""Collisionless embedding tables vs a pre-remapped EmbeddingBag, on one thread.

Question: how fast are lookups and Adagrad updates of ``EmbeddingTable`` on a
Zipf id stream, what does a row cost in memory, and how does one training step
compare with ``torch.nn.EmbeddingBag(mode="sum", sparse=True)`` +
``torch.optim.Adagrad`` over a pre-sized table whose ids were remapped to
0..n-1 beforehand (no hashing, no growth)?

Stream: Zipf(1.1) over 50M ids, batches of 4096 examples x 26 features (one id
each), dim 16, Adagrad. Each feature has its own table (one slot per feature,
as Monolith). The tables are pre-filled with the most popular ids so they hold
``--rows`` rows in total (default 10M), then keep growing with the stream.

Run: ``.venv/bin/python bench/bench_hash_table.py`` (``--rows 2000000`` for a
quicker run; ``--shared`` puts all features in one table, so each step makes
one call of 106K ids instead of 26 calls of 4096). Prints one line per figure
and the ratio our step / baseline step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from monolith_torch.embedding import entry
from monolith_torch.embedding.table import EmbeddingTable

ID_SPACE = 50_000_000
_ODD = 0x5DEECE66D1  # spreads Zipf ranks over the int64 id space


def _rank_to_id(ranks: np.ndarray, feature: int) -> np.ndarray:
    return (ranks.astype(np.int64) * _ODD + feature * 1_000_003) & ((1 << 62) - 1)


def _zipf(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        z = rng.zipf(1.1, 2 * n)
        out = np.concatenate([out, z[z <= ID_SPACE]])
    return out[:n]


def _make_tables(groups: list[list[int]], dim: int, rows_per_feature: int) -> list[EmbeddingTable]:
    seg = entry.Segment(dim, entry.RandomUniformInitializer(), entry.AdagradOptimizer(
        learning_rate=0.01, initial_accumulator_value=0.1), entry.Fp32Compressor())
    tables = []
    for g, feats in enumerate(groups):
        t = EmbeddingTable(name=f"t{g}", slot_id=g, seed=0)
        t.add_feature_slice(seg)
        for f in feats:
            head = torch.from_numpy(_rank_to_id(np.arange(1, rows_per_feature + 1), f))
            for chunk in head.split(1 << 20):
                t.lookup_rows(chunk, insert=True)
        tables.append(t)
    return tables


def _our_step(tables, batch, weight, timings):
    t0 = time.perf_counter()
    leaves, rowss = [], []
    for t, ids in zip(tables, batch, strict=True):
        rows = t.lookup_rows(ids, insert=True)
        leaves.append(t.gather(rows).requires_grad_(True))
        rowss.append(rows)
    t1 = time.perf_counter()
    # One id per example and feature: ReduceSum is the identity here, as in the bag.
    loss = sum((leaf * weight).sum() for leaf in leaves)
    grads = torch.autograd.grad(loss, leaves)
    t2 = time.perf_counter()
    for t, ids, g, rows in zip(tables, batch, grads, rowss, strict=True):
        t.apply_gradients(ids, g, rows=rows, rows_generation=t.generation)
    t3 = time.perf_counter()
    timings["lookup"].append(t1 - t0)
    timings["backward"].append(t2 - t1)
    timings["update"].append(t3 - t2)
    timings["step"].append(t3 - t0)


def _baseline_step(bags, opt, batch, offsets, weight, timings):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = sum((bag(ids, offsets) * weight).sum() for bag, ids in zip(bags, batch, strict=True))
    loss.backward()
    opt.step()
    timings["step"].append(time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows pre-filled over all tables")
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shared", action="store_true",
                        help="one table for all features (one call per step) instead of one per feature")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    per_feature = args.rows // args.features
    groups = [list(range(args.features))] if args.shared else [[f] for f in range(args.features)]

    t0 = time.perf_counter()
    tables = _make_tables(groups, args.dim, per_feature)
    fill_s = time.perf_counter() - t0
    n_steps = args.warmup + args.steps
    raw = [
        [np.concatenate([_rank_to_id(_zipf(rng, args.batch), f) for f in feats]) for feats in groups]
        for _ in range(n_steps)
    ]
    batches = [[torch.from_numpy(x) for x in b] for b in raw]

    # Baseline: ids remapped to 0..n-1 beforehand, tables pre-sized for every id the run will see.
    bags, remapped = [], [[None] * len(groups) for _ in range(n_steps)]
    for g, feats in enumerate(groups):
        heads = [_rank_to_id(np.arange(1, per_feature + 1), f) for f in feats]
        vocab = np.unique(np.concatenate(heads + [raw[s][g] for s in range(n_steps)]))
        for s in range(n_steps):
            remapped[s][g] = torch.from_numpy(np.searchsorted(vocab, raw[s][g]))
        bags.append(torch.nn.EmbeddingBag(vocab.size, args.dim, mode="sum", sparse=True))
    opt = torch.optim.Adagrad([b.weight for b in bags], lr=0.01, initial_accumulator_value=0.1)
    offsets = torch.arange(args.batch * len(groups[0]))
    weight = torch.randn(args.dim)

    ours = {"lookup": [], "backward": [], "update": [], "step": []}
    base = {"step": []}
    for s in range(n_steps):
        # Interleaved, so both see the same machine load.
        o, b = (ours, base) if s >= args.warmup else ({k: [] for k in ours}, {"step": []})
        _our_step(tables, batches[s], weight, o)
        _baseline_step(bags, opt, remapped[s], offsets, weight, b)

    ids_per_step = args.batch * args.features
    rows = sum(len(t) for t in tables)
    parts = {}
    for t in tables:
        for k, v in t.nbytes().items():
            parts[k] = parts.get(k, 0) + v
    med = {k: statistics.median(v) for k, v in ours.items()}
    base_med = statistics.median(base["step"])
    print(f"threads: {torch.get_num_threads()}; tables: {len(tables)} ({'shared' if args.shared else 'one per feature'})")
    print(f"rows after run: {rows:,} (pre-fill {fill_s:.1f} s)")
    print(f"lookup: {ids_per_step / med['lookup'] / 1e6:.2f} M ids/s (median {med['lookup'] * 1e3:.1f} ms/step)")
    print(f"update: {ids_per_step / med['update'] / 1e6:.2f} M ids/s (median {med['update'] * 1e3:.1f} ms/step)")
    print(f"backward through gathered rows: {med['backward'] * 1e3:.1f} ms/step")
    for k, v in parts.items():
        print(f"bytes/row {k}: {v / rows:.1f}")
    print(f"bytes/row total (allocated, incl. growth slack): {sum(parts.values()) / rows:.1f}")
    print(f"our step: {med['step'] * 1e3:.1f} ms; EmbeddingBag+Adagrad step: {base_med * 1e3:.1f} ms")
    print(f"ratio our step / baseline step: {med['step'] / base_med:.2f}")


if __name__ == "__main__":
    main()
