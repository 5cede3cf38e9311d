"""Collisionless embedding tables vs a pre-remapped EmbeddingBag, on one thread.

Question: how fast are lookups and Adagrad updates of ``EmbeddingTable`` on a
Zipf id stream, what does a row cost in memory, and how does one training step
compare with ``torch.nn.EmbeddingBag(mode="sum", sparse=True)`` +
``torch.optim.Adagrad`` over a pre-sized table whose ids were remapped to
0..n-1 beforehand (no hashing, no growth)?

Memory is the bytes the tables allocate (growth slack included) per live row,
by part, and their ratio to the bytes the live rows' values and optimizer
state need (issue 13's goal: at most 1.5x), at the end of the run and at its
worst after any step (warm-up included). The pre-fill leaves the row tensors
exactly full, so the first new rows make every table grow: the worst is
measured just after a growth step. ``--rows 2555930`` (98,305 rows per table)
also starts each index just after it doubled (32 B/row): the worst case of both.

Stream: Zipf(1.1) over 50M ids, batches of 4096 examples x 26 features (one id
each), dim 16, Adagrad. Each feature has its own table (one slot per feature,
as Monolith). The tables are pre-filled with the most popular ids so they hold
``--rows`` rows in total (default 10M), then keep growing with the stream.

Run: ``.venv/bin/python bench/bench_hash_table.py`` (``--rows 2000000`` for a
quicker run; ``--shared`` puts all features in one table, so each step makes
one call of 106K ids instead of 26 calls of 4096). Prints one line per figure,
the ratio our step / baseline step and the memory ratio against its goal.
Lookup and update rates are medians over the timed steps (as before) and
means over all steps, warm-up included, which charge growth to the rate.

Before/after a change to the table: ``--compare-table FILE`` also runs the
``EmbeddingTable`` of another ``table.py`` (``git show
REV:src/monolith_torch/embedding/table.py > FILE``) on the same stream,
interleaved step by step in this process, and prints its figures after ours
(one process: both see the same load and allocator; separate runs of this
script differ by 20-40% on a loaded machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time

import numpy as np
import torch

from monolith_torch.embedding import entry
from monolith_torch.embedding import table_state as ts
from monolith_torch.embedding.table import EmbeddingTable

ID_SPACE = 50_000_000
MEMORY_GOAL = 1.5  # issue 13: allocated bytes <= 1.5x the values and optimizer state of the live rows
_ODD = 0x5DEECE66D1  # spreads Zipf ranks over the int64 id space


def _rank_to_id(ranks: np.ndarray, feature: int) -> np.ndarray:
    return (ranks.astype(np.int64) * _ODD + feature * 1_000_003) & ((1 << 62) - 1)


def _zipf(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        z = rng.zipf(1.1, 2 * n)
        out = np.concatenate([out, z[z <= ID_SPACE]])
    return out[:n]


def _make_tables(groups: list[list[int]], dim: int, rows_per_feature: int, table_cls=EmbeddingTable) -> list:
    seg = entry.Segment(dim, entry.RandomUniformInitializer(), entry.AdagradOptimizer(
        learning_rate=0.01, initial_accumulator_value=0.1), entry.Fp32Compressor())
    tables = []
    for g, feats in enumerate(groups):
        t = table_cls(name=f"t{g}", slot_id=g, seed=0)
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


def _load_table_class(path: str):
    """``EmbeddingTable`` of the ``table.py`` at ``path`` (its imports resolve in the installed package)."""
    spec = importlib.util.spec_from_file_location("compared_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.EmbeddingTable


def _needed_row_bytes(table) -> int:
    """Bytes of one row's values and optimizer state."""
    return sum(
        math.prod(t.shape[1:]) * t.element_size()
        for k, t in table.row_storage().items()
        if k == ts.VALUES or ts.is_state_field(k)
    )


class _Run:
    """One set of tables on the stream: its step timings and memory."""

    def __init__(self, name: str, tables: list, warmup: int):
        self.name, self.tables, self.warmup = name, tables, warmup
        self.needed = [_needed_row_bytes(t) for t in tables]
        self.timed = {"lookup": [], "backward": [], "update": [], "step": []}
        self.every = {k: [] for k in self.timed}  # warm-up included
        self.worst = (0.0, None)

    def memory(self) -> tuple[dict[str, int], int, int]:
        """(bytes allocated per part over all tables, live rows, bytes their values and optimizer state need)."""
        parts: dict[str, int] = {}
        for t in self.tables:
            for k, v in t.nbytes().items():
                parts[k] = parts.get(k, 0) + v
        need = sum(len(t) * b for t, b in zip(self.tables, self.needed, strict=True))
        return parts, sum(len(t) for t in self.tables), need

    def step(self, s: int, batch, weight) -> None:
        o = {k: [] for k in self.timed}
        _our_step(self.tables, batch, weight, o)
        for k, v in o.items():
            self.every[k].append(v[-1])
            if s >= self.warmup:
                self.timed[k].append(v[-1])
        mem = self.memory()
        self.worst = max(self.worst, (sum(mem[0].values()) / mem[2], mem), key=lambda w: w[0])

    def report(self, ids_per_step: int) -> dict[str, float]:
        """Prints the rates and the memory; returns the medians."""
        med = {k: statistics.median(v) for k, v in self.timed.items()}
        mean = {k: statistics.mean(v) for k, v in self.every.items()}
        parts, rows, need = self.memory()
        print(f"rows after run: {rows:,}")
        for k in ("lookup", "update"):
            print(f"{k}: {ids_per_step / med[k] / 1e6:.2f} M ids/s (median {med[k] * 1e3:.1f} ms/step); "
                  f"mean over all {len(self.every[k])} steps, growth included: "
                  f"{ids_per_step / mean[k] / 1e6:.2f} M ids/s")
        print(f"backward through gathered rows: {med['backward'] * 1e3:.1f} ms/step")
        w_ratio, (w_parts, w_rows, w_need) = self.worst
        print(f"memory, bytes per live row (allocated, growth slack included): end of run ({rows:,} rows) | "
              f"worst after a step ({w_rows:,} rows)")
        for k in parts:
            print(f"  {k:<24} {parts[k] / rows:7.1f} | {w_parts[k] / w_rows:7.1f}")
        print(f"  {'total':<24} {sum(parts.values()) / rows:7.1f} | {sum(w_parts.values()) / w_rows:7.1f}")
        print(f"  {'needed: values + state':<24} {need / rows:7.1f} | {w_need / w_rows:7.1f}")
        ratio = sum(parts.values()) / need
        verdict = "MET" if max(ratio, w_ratio) <= MEMORY_GOAL else "MISSED"
        print(f"ratio total / (values + optimizer state): {ratio:.2f}x at the end, {w_ratio:.2f}x worst after a step "
              f"(goal <= {MEMORY_GOAL}x: {verdict})")
        return med


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
    parser.add_argument("--compare-table", metavar="FILE",
                        help="also run the EmbeddingTable of this table.py (e.g. an older revision's), interleaved")
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

    runs = [_Run("ours", tables, args.warmup)]
    if args.compare_table:
        other = _make_tables(groups, args.dim, per_feature, _load_table_class(args.compare_table))
        runs.append(_Run(f"compared ({args.compare_table})", other, args.warmup))
    base = {"step": []}
    for s in range(n_steps):
        # Interleaved (and the tables in turns), so all see the same machine load.
        for run in runs if s % 2 == 0 else runs[::-1]:
            run.step(s, batches[s], weight)
        _baseline_step(bags, opt, remapped[s], offsets, weight, base if s >= args.warmup else {"step": []})

    ids_per_step = args.batch * args.features
    print(f"threads: {torch.get_num_threads()}; tables: {len(tables)} ({'shared' if args.shared else 'one per feature'}); "
          f"pre-fill {fill_s:.1f} s")
    med = runs[0].report(ids_per_step)
    base_med = statistics.median(base["step"])
    print(f"our step: {med['step'] * 1e3:.1f} ms; EmbeddingBag+Adagrad step: {base_med * 1e3:.1f} ms")
    print(f"ratio our step / baseline step: {med['step'] / base_med:.2f}")
    for run in runs[1:]:
        print(f"--- {run.name}, the same stream interleaved:")
        other = run.report(ids_per_step)
        for k in ("lookup", "update", "step"):
            print(f"ratio ours / compared, median {k} time: {med[k] / other[k]:.2f}")
        mean_ours, mean_other = (sum(r.every["step"]) for r in (runs[0], run))
        print(f"ratio ours / compared, all steps' time (growth included): {mean_ours / mean_other:.2f}")


if __name__ == "__main__":
    main()
