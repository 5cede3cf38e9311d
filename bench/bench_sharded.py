"""Sharded vs replicated embedding tables on 2 gloo processes: step time, bytes exchanged, memory.

Question: with the tables sharded row-wise (``HashTableFeatureFactory(sharded=True)``),
how does a training step's time, the bytes each rank sends per step and the
table memory per rank compare with the replicated-table path (every rank holds
every row; gradients all-gathered)?

Stream: bench_hash_table.py's, scaled down: Zipf(1.1) over 50M ids, 26 features
(one slot per feature, one id per example), dim 16, Adagrad; per-rank batches of
``--batch`` examples; the tables pre-filled with the most popular ``--rows`` ids
(each rank of the sharded run pre-fills only the ids it owns). The step is
``factory.lookup`` + backward of a linear loss + ``factory.apply_gradients``, as
the training step drives them (no dense model, so the tables' cost is what is
measured). The two factories step alternately, in one run, on the same batches.

Bytes: what each rank hands to collectives for other ranks, counted by wrapping
``all_to_all_single`` and ``all_gather`` (an all-gather of n bytes sends n to
each of the world - 1 peers; an all-to-all sends its off-rank splits).

Run: ``.venv/bin/python bench/bench_sharded.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_line  # noqa: E402
from bench_hash_table import _rank_to_id, _zipf  # noqa: E402
from monolith_torch import entry  # noqa: E402
from monolith_torch.core.ragged import RaggedTensor  # noqa: E402
from monolith_torch.embedding.factory import HashTableFeatureFactory  # noqa: E402
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig  # noqa: E402
from monolith_torch.embedding.placement.sharded import shard_owner  # noqa: E402

WORLD = 2


class ByteCounter:
    """Wraps torch.distributed's all_to_all_single / all_gather to count off-rank bytes sent."""

    def __init__(self):
        self.bytes = 0
        self._a2a, self._ag = dist.all_to_all_single, dist.all_gather

        def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            per = input.numel() // world if input_split_sizes is None else None
            elems = (input.numel() - per) if per is not None else sum(
                s for p, s in enumerate(input_split_sizes) if p != rank)
            self.bytes += elems * input.element_size()
            return self._a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        def ag(tensor_list, tensor, group=None, async_op=False):
            self.bytes += tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1)
            return self._ag(tensor_list, tensor, group=group, async_op=async_op)

        dist.all_to_all_single, dist.all_gather = a2a, ag


def _factory(sharded, features, dim, head_ids, rank):
    factory = HashTableFeatureFactory(seed=0, sharded=sharded)
    cols = []
    for f in range(features):
        slot = factory.create_feature_slot(FeatureSlotConfig(
            name=f"s{f}", slot_id=f + 1, default_vec_initializer=entry.RandomUniformInitializer(),
            default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.01, initial_accumulator_value=0.1),
        ))
        vec = slot.add_feature_slice(dim)
        cols.append((FeatureColumn(slot, f"f{f}"), vec))
        head = head_ids[f]
        if sharded:
            head = head[shard_owner(head, WORLD) == rank]
        table = factory.tables[f"s{f}"]
        for chunk in head.split(1 << 20):
            table.lookup_rows(chunk, insert=True)
    return factory, cols


def _step(factory, cols, batch, weight):
    factory.lookup(batch)
    leaves = [fc.get_all_embeddings_concat() for fc, _ in cols]
    loss = sum((fc.embedding_lookup(vec) * weight).sum() for fc, vec in cols)
    grads = torch.autograd.grad(loss, leaves)
    factory.apply_gradients(list(zip(grads, leaves, strict=True)))


def _table_bytes(factory):
    return sum(sum(t.nbytes().values()) for t in factory.tables.values()), sum(len(t) for t in factory.tables.values())


def _run(rank, port, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    counter = ByteCounter()
    per_feature = args.rows // args.features
    heads = [torch.from_numpy(_rank_to_id(np.arange(1, per_feature + 1), f)) for f in range(args.features)]
    factories = {"replicated": _factory(False, args.features, args.dim, heads, rank),
                 "sharded": _factory(True, args.features, args.dim, heads, rank)}
    rng = np.random.default_rng(1 + rank)  # each rank its own examples
    n_steps = args.warmup + args.steps
    ones = torch.ones(args.batch, dtype=torch.int64)
    batches = [{f"f{f}": RaggedTensor.from_row_lengths(torch.from_numpy(_rank_to_id(_zipf(rng, args.batch), f)), ones)
                for f in range(args.features)} for _ in range(n_steps)]
    weight = torch.randn(args.dim, generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in factories}
    sent = {k: [] for k in factories}
    for s in range(n_steps):
        for name in (list(factories) if s % 2 == 0 else list(factories)[::-1]):
            factory, cols = factories[name]
            dist.barrier()
            b0 = counter.bytes
            t0 = time.perf_counter()
            _step(factory, cols, batches[s], weight)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
            if s >= args.warmup:
                times[name].append(float(elapsed))
                sent[name].append(counter.bytes - b0)
    mem = {k: _table_bytes(f) for k, (f, _) in factories.items()}
    mems = [None] * WORLD
    dist.all_gather_object(mems, mem)
    if rank == 0:
        out.update({"times": times, "sent": sent, "mem": mems})
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows pre-filled over all tables")
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--batch", type=int, default=2048, help="examples per rank per step")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_run, args=(port, args, out), nprocs=WORLD, join=True)
    times, sent, mems = out["times"], out["sent"], out["mem"]
    ids = args.batch * args.features
    print(f"{WORLD} processes (gloo, 127.0.0.1), {args.features} features x {args.batch} ids per rank per step, "
          f"dim {args.dim}, Adagrad; tables pre-filled with {args.rows:,} rows; median of {args.steps} steps")
    print(f"{'tables':<12}{'step ms':>9}{'MB sent/rank/step':>19}{'bytes/id':>10}{'rows/rank':>12}{'MB/rank':>10}")
    for name in ("replicated", "sharded"):
        ms = statistics.median(times[name]) * 1e3
        b = statistics.median(sent[name])
        rows = [m[name][1] for m in mems]
        mb = [m[name][0] / 2**20 for m in mems]
        print(f"{name:<12}{ms:>9.1f}{b / 1e6:>19.2f}{b / ids:>10.1f}{statistics.mean(rows):>12,.0f}"
              f"{statistics.mean(mb):>10.1f}")
    rt, st = statistics.median(times["replicated"]), statistics.median(times["sharded"])
    rb, sb = statistics.median(sent["replicated"]), statistics.median(sent["sharded"])
    total_rows = sum(m["sharded"][1] for m in mems)
    print(f"ratio sharded / replicated: step time {st / rt:.2f}x, bytes sent {sb / rb:.2f}x, "
          f"table memory per rank {statistics.mean(m['sharded'][0] for m in mems) / mems[0]['replicated'][0]:.2f}x")
    print(f"sharded rows per rank {[m['sharded'][1] for m in mems]} of {total_rows:,} "
          f"(replicated: {mems[0]['replicated'][1]:,} on every rank)")


if __name__ == "__main__":
    main()
