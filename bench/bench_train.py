"""Examples/s of the default CTR model vs a plain-PyTorch DLRM over pre-remapped ids.

Question: what does collisionless hashing (plus Monolith's step: global-norm
clip, per-slice FTRL/Adagrad) cost against the simplest fast baseline?

- ours: ``monolith-torch``'s default model step (``Trainer._train_step``):
  hash-table lookup of 27 features, DeepFM forward, ``apply_gradients_with_var_optimizer``.
- baseline "plain DLRM": the same dims and batch, ids remapped to 0..n-1
  beforehand (no hashing, no growth), one ``nn.EmbeddingBag(mode="sum",
  sparse=True)`` per feature holding vector + bias columns, Adagrad on the
  sparse gradients, Adam + ``clip_grad_norm_`` on the dense part.

Both train on the same in-memory batches (parsing excluded), one process and
then two (``torch.distributed`` gloo on 127.0.0.1: ours with its allreduce and
replicated tables, the baseline with DDP). Each repeat times a block of steps
per candidate, interleaved; the figure is the median over repeats.

    python bench/bench_train.py [--rows 60000] [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line  # noqa: E402
from monolith_torch.train.config import load_config  # noqa: E402
from monolith_torch.train.data import (  # noqa: E402
    CAT_COLUMNS,
    NUM_INT,
    SEQ_FEATURE,
    generate_criteo,
    read_batches,
)
from monolith_torch.train.model import _mlp  # noqa: E402  (same MLP shape on both sides)
from monolith_torch.train.trainer import Trainer  # noqa: E402

FEATURES = [*CAT_COLUMNS, SEQ_FEATURE]


class PlainDLRM(nn.Module):
    """The baseline: EmbeddingBag per feature over remapped ids, same FM + MLP shape as ours."""

    def __init__(self, vocab_sizes, dim=16, hidden=(256, 128)):
        super().__init__()
        self.dim = dim
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(v, dim + 1, mode="mean" if name == SEQ_FEATURE else "sum", sparse=True)
            for name, v in zip(FEATURES, vocab_sizes, strict=True)
        )
        self.bottom = _mlp([NUM_INT, 64, dim])
        self.top = _mlp([(len(FEATURES) + 1) * dim, *hidden, 1])

    def forward(self, dense, bags):
        fields, wide = [self.bottom(dense)], []
        for bag, (ids, offsets) in zip(self.bags, bags, strict=True):
            out = bag(ids, offsets)
            fields.append(out[:, : self.dim])
            wide.append(out[:, self.dim :])
        stacked = torch.stack(fields, 1)
        fm = 0.5 * (stacked.sum(1).pow(2) - stacked.pow(2).sum(1)).sum(-1)
        return self.top(stacked.flatten(1)).squeeze(-1) + fm + torch.cat(wide, 1).sum(1)


def _remap(batches):
    """Per feature: ids -> 0..n-1 over all batches (done before timing)."""
    remapped = [[] for _ in batches]
    vocab = []
    for name in FEATURES:
        values = torch.cat([b.sparse[name].values for b in batches])
        uniq, inverse = torch.unique(values, return_inverse=True)
        vocab.append(max(1, uniq.numel()))
        start = 0
        for i, b in enumerate(batches):
            n = b.sparse[name].values.numel()
            remapped[i].append((inverse[start : start + n], b.sparse[name].row_splits[:-1]))
            start += n
    return remapped, vocab


def _load(path, batch_size, rank, world):
    batches = list(read_batches([path], batch_size, drop_remainder=True))
    return [b for i, b in enumerate(batches) if i % world == rank]


def _run(rank, world, args, path, port, out):
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    cfg = load_config(None, {"run_dir": tempfile.mkdtemp(), "batch_size": args.batch_size})
    batches = _load(path, args.batch_size, rank, world)
    trainer = Trainer(cfg, rank, world, show_progress=False)
    remapped, vocab = _remap(_load(path, args.batch_size, 0, 1))
    remapped = [r for i, r in enumerate(remapped) if i % world == rank]
    torch.manual_seed(0)
    plain = PlainDLRM(vocab)
    model = nn.parallel.DistributedDataParallel(plain) if world > 1 else plain
    dense_opt = torch.optim.Adam([p for n, p in plain.named_parameters() if not n.startswith("bags")], lr=1e-3)
    sparse_opt = torch.optim.Adagrad(list(plain.bags.parameters()), lr=0.05)
    dense_params = [p for n, p in plain.named_parameters() if not n.startswith("bags")]

    def ours(i):
        trainer._train_step(batches[i % len(batches)], None, i)

    def baseline(i):
        b = batches[i % len(batches)]
        loss = F.binary_cross_entropy_with_logits(model(b.dense, remapped[i % len(remapped)]), b.labels)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense_params, 10.0)
        dense_opt.step()
        sparse_opt.step()

    times = {"ours": [], "plain DLRM": []}
    step = 0
    for r in range(args.repeats + 1):
        for name, fn in (("ours", ours), ("plain DLRM", baseline))[:: 1 if r % 2 == 0 else -1]:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            for k in range(args.steps):
                fn(step + k)
            if world > 1:
                dist.barrier()
            if r > 0:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
        step += args.steps
    if rank == 0:
        for name, ts in times.items():
            out[f"{world}:{name}"] = args.steps * args.batch_size * world / statistics.median(ts)
    if world > 1:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as d:
        path = generate_criteo(os.path.join(d, "train.tsv"), args.rows, seed=0)
        results = mp.Manager().dict()
        _run(0, 1, args, path, 0, results)
        port = 29000 + os.getpid() % 1000
        mp.spawn(_run, args=(2, args, path, port, results), nprocs=2, join=True)
    print(f"\nbatch {args.batch_size}, {len(FEATURES)} features, dim 16; median of {args.repeats} blocks "
          f"of {args.steps} steps; examples/s over all processes")
    print(f"{'processes':<10}{'ours':>12}{'plain DLRM':>14}{'ours / plain':>15}")
    for world in (1, 2):
        a, b = results[f"{world}:ours"], results[f"{world}:plain DLRM"]
        print(f"{world:<10}{a:>12.0f}{b:>14.0f}{a / b:>14.2f}x")
    print("goal: ours / plain DLRM >= 0.5x")


if __name__ == "__main__":
    main()
