"""Examples/s of the default CTR model vs a plain-PyTorch DLRM over pre-remapped ids.

Question: what does collisionless hashing (plus Monolith's step: global-norm
clip, per-slice FTRL/Adagrad) cost against the simplest fast baseline?

- ours: ``monolith-torch``'s default model step (``Trainer._train_step`` of a
  ``Trainer`` built from the default config: the Criteo preset schema,
  ``HashEmbeddingBagCollection`` over 27 features, DeepFM,
  ``apply_gradients_with_var_optimizer``), on batches from the trainer's own
  reader (``read_schema_batches``). ``fused_embeddings`` off, as the default
  run; ``--fused`` also times a second trainer with ``fused_embeddings=True``
  (the fused CPU path; one process only, so only in the one-process run).
- baseline "plain DLRM": the same dims and batch, ids remapped to 0..n-1
  beforehand (no hashing, no growth), one ``nn.EmbeddingBag(mode="sum",
  sparse=True)`` per feature holding vector + bias columns, initialized as
  ours (vectors uniform in +-0.05, biases 0), Adagrad (accumulator starting
  at 1.0, as ours' vector slices) on the sparse gradients, Adam +
  ``clip_grad_norm_`` on the dense part. ``--previous-baseline`` restores the
  baseline of the earlier figures: ``nn.EmbeddingBag``'s N(0, 1) rows and
  Adagrad's accumulator at 0. Its logits then saturate (|logit| ~ 40, loss
  ~ 10) and its backward matmuls run on subnormal floats, several times slower
  (docs/PERFORMANCE.md): that made it slow, not the work it does.

Both train on the same in-memory batches (parsing excluded), one process and
then two (``torch.distributed`` gloo on 127.0.0.1: ours with its allreduce and
replicated tables, the baseline with DDP). Each repeat times a block of steps
per candidate, interleaved; the figure is the median over repeats.

    python bench/bench_train.py [--rows 60000] [--repeats 5] [--steps 8] [--fused] [--processes 1 2]

``--profile`` instead splits one process's step into phases (wall time per
phase, median over the blocks): data (the trainer's reader streaming the file,
as ``monolith-torch train`` does; the baseline's batches are in memory),
embedding lookup + pooling, embedding backward (ours: from the last
embedding output whose gradient is complete, as a hook on each output tells,
to the end of the backward: autograd runs every dense node first, as they
were created after the lookup; the baseline: each ``EmbeddingBag``'s backward
node, from a hook on its output to a hook after the node), dense forward and
backward (the rest of the model's forward and of the backward), embedding
update, dense update (the optimizer's ``step``), other (loss, global-norm
clip, non-finite check, Python in the step).
"""

from __future__ import annotations

import argparse
import collections
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
)
from monolith_torch.train.models.common import mlp  # noqa: E402  (same MLP shape on both sides)
from monolith_torch.train.readers import read_schema_batches  # noqa: E402
from monolith_torch.train.schema import criteo_schema  # noqa: E402
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
        self.bottom = mlp([NUM_INT, 64, dim])
        self.top = mlp([(len(FEATURES) + 1) * dim, *hidden, 1])

    def forward(self, dense, bags):
        fields, wide = [self.bottom(dense)], []
        for bag, (ids, offsets) in zip(self.bags, bags, strict=True):
            out = bag(ids, offsets)
            fields.append(out[:, : self.dim])
            wide.append(out[:, self.dim :])
        stacked = torch.stack(fields, 1)
        fm = 0.5 * (stacked.sum(1).pow(2) - stacked.pow(2).sum(1)).sum(-1)
        return self.top(stacked.flatten(1)).squeeze(-1) + fm + torch.cat(wide, 1).sum(1)


def _plain(vocab, previous):
    """The baseline model and its sparse optimizer (see the module's docstring)."""
    torch.manual_seed(0)
    plain = PlainDLRM(vocab)
    if not previous:
        with torch.no_grad():
            for bag in plain.bags:
                bag.weight[:, : plain.dim].uniform_(-0.05, 0.05)
                bag.weight[:, plain.dim :].zero_()
    sparse_opt = torch.optim.Adagrad(list(plain.bags.parameters()), lr=0.05,
                                     initial_accumulator_value=0.0 if previous else 1.0)
    return plain, sparse_opt


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
    # The trainer's reader and schema (the default run's Criteo preset).
    batches = list(read_schema_batches([path], criteo_schema(), batch_size, drop_remainder=True))
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
    fused = None
    if args.fused and world == 1:
        fused_cfg = load_config(None, {"run_dir": tempfile.mkdtemp(), "batch_size": args.batch_size,
                                       "fused_embeddings": True})
        fused = Trainer(fused_cfg, rank, world, show_progress=False)
        assert fused.embeddings.uses_fused_path and not trainer.embeddings.uses_fused_path
    remapped, vocab = _remap(_load(path, args.batch_size, 0, 1))
    remapped = [r for i, r in enumerate(remapped) if i % world == rank]
    plain, sparse_opt = _plain(vocab, args.previous_baseline)
    model = nn.parallel.DistributedDataParallel(plain) if world > 1 else plain
    dense_opt = torch.optim.Adam([p for n, p in plain.named_parameters() if not n.startswith("bags")], lr=1e-3)
    dense_params = [p for n, p in plain.named_parameters() if not n.startswith("bags")]

    def ours(i):
        trainer._train_step(batches[i % len(batches)], None, i)

    def ours_fused(i):
        fused._train_step(batches[i % len(batches)], None, i)

    def baseline(i):
        b = batches[i % len(batches)]
        loss = F.binary_cross_entropy_with_logits(model(b.dense, remapped[i % len(remapped)]), b.labels)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense_params, 10.0)
        dense_opt.step()
        sparse_opt.step()

    candidates = [("ours", ours), ("plain DLRM", baseline)] + ([("ours fused", ours_fused)] if fused else [])
    times = {name: [] for name, _ in candidates}
    step = 0
    for r in range(args.repeats + 1):
        for name, fn in candidates[:: 1 if r % 2 == 0 else -1]:
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


_PHASES = ("data", "embedding lookup+pooling", "dense forward", "dense backward", "embedding backward",
           "embedding update", "dense update", "other")


class _Timer:
    """Seconds per phase, summed over a block of steps; ``current`` is the candidate being timed."""

    current: collections.defaultdict | None = None
    last_hook = 0.0
    node_start = 0.0
    node_seconds = 0.0

    @classmethod
    def wrap(cls, phase, fn, hook_outputs=None):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            cls.current[phase] += time.perf_counter() - t0
            for t in (out.values() if isinstance(out, dict) else [out]) if hook_outputs else []:
                if hook_outputs == "last":  # the backward reached this embedding output
                    t.register_hook(cls._stamp)
                else:  # "node": time this output's own backward node
                    t.register_hook(cls._node_start)
                    t.grad_fn.register_hook(cls._node_end)
            return out

        return timed

    @classmethod
    def _stamp(cls, grad):
        cls.last_hook = time.perf_counter()

    @classmethod
    def _node_start(cls, grad):
        cls.node_start = time.perf_counter()

    @classmethod
    def _node_end(cls, grad_inputs, grad_outputs):
        cls.node_seconds += time.perf_counter() - cls.node_start

    @classmethod
    def backward(cls, fn, split):
        """Times a backward call, split into dense and embedding parts (see the module's docstring)."""

        def timed(*a, **k):
            t0 = cls.last_hook = time.perf_counter()
            cls.node_seconds = 0.0
            out = fn(*a, **k)
            t1 = time.perf_counter()
            embedding = t1 - cls.last_hook if split == "last" else cls.node_seconds
            cls.current["dense backward"] += t1 - t0 - embedding
            cls.current["embedding backward"] += embedding
            return out

        return timed


def _profile(args, path):
    """Per-phase ms/step of ours (and ours fused) and the plain DLRM, one process, interleaved blocks."""
    from monolith_torch.step import stages
    from monolith_torch.train.data import ReadStats

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.set_num_threads(1)
    stages.compute_gradients = _Timer.backward(stages.compute_gradients, "last")
    stages._optimizer_step = _Timer.wrap("dense update", stages._optimizer_step)

    def our_candidate(fused_embeddings):
        cfg = load_config(None, {"run_dir": tempfile.mkdtemp(), "batch_size": args.batch_size,
                                 "fused_embeddings": fused_embeddings})
        tr = Trainer(cfg, 0, 1, show_progress=False)
        assert tr.embeddings.uses_fused_path == fused_embeddings
        tr.embeddings.forward = _Timer.wrap("embedding lookup+pooling", tr.embeddings.forward, hook_outputs="last")
        tr.model.forward = _Timer.wrap("model forward", tr.model.forward)
        tr.ctx.apply_embedding_gradients = _Timer.wrap("embedding update", tr.ctx.apply_embedding_gradients)
        reader = [iter(())]
        step = [0]

        def run():
            t0 = time.perf_counter()
            batch = next(reader[0], None)
            if batch is None or len(batch) < args.batch_size:  # start the file again (drop the short tail)
                reader[0] = tr._read([path], args.batch_size, ReadStats())
                t0 = time.perf_counter()
                batch = next(reader[0])
            t1 = time.perf_counter()
            tr._train_step(batch, None, step[0])
            t2 = time.perf_counter()
            step[0] += 1
            _Timer.current["data"] += t1 - t0
            _Timer.current["step"] += t2 - t1

        return run

    batches = _load(path, args.batch_size, 0, 1)
    remapped, vocab = _remap(batches)
    plain, sparse_opt = _plain(vocab, args.previous_baseline)
    for bag in plain.bags:
        bag.forward = _Timer.wrap("embedding lookup+pooling", bag.forward, hook_outputs="node")
    plain.forward = _Timer.wrap("model forward", plain.forward)
    dense_params = [p for n, p in plain.named_parameters() if not n.startswith("bags")]
    dense_opt = torch.optim.Adam(dense_params, lr=1e-3)
    dense_step = _Timer.wrap("dense update", dense_opt.step)
    sparse_step = _Timer.wrap("embedding update", sparse_opt.step)
    base_step = [0]

    def baseline():
        i = base_step[0]
        base_step[0] += 1
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(plain(b.dense, remapped[i % len(remapped)]), b.labels)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        _Timer.backward(loss.backward, "node")()
        torch.nn.utils.clip_grad_norm_(dense_params, 10.0)
        dense_step()
        sparse_step()
        _Timer.current["step"] += time.perf_counter() - t0

    candidates = [("ours", our_candidate(False))] + ([("ours fused", our_candidate(True))] if args.fused else [])
    candidates.append(("plain DLRM", baseline))
    blocks = {name: [] for name, _ in candidates}
    for r in range(args.repeats + 1):
        for name, fn in candidates[:: 1 if r % 2 == 0 else -1]:
            _Timer.current = collections.defaultdict(float)
            for _ in range(args.steps):
                fn()
            if r > 0:  # the first round warms up
                blocks[name].append(_Timer.current)

    def ms(name, phase):
        return statistics.median(b[phase] for b in blocks[name]) * 1e3 / args.steps

    print(f"\none process; ms per step, median of {args.repeats} blocks of {args.steps} steps "
          f"(share of step + data); baseline {'as before 2026-12-01' if args.previous_baseline else 'initialized as ours'}")
    print(f"{'phase':<28}" + "".join(f"{name:>20}" for name, _ in candidates))
    rows = {}
    for name, _ in candidates:
        for b in blocks[name]:
            b["dense forward"] = b["model forward"] - b["embedding lookup+pooling"]
            b["other"] = b["step"] - sum(b[p] for p in _PHASES if p not in ("data", "other"))
        total = ms(name, "step") + ms(name, "data")
        rows[name] = {p: (ms(name, p), ms(name, p) / total) for p in (*_PHASES, "step")}
        rows[name]["step + data"] = (total, 1.0)
    for phase in (*_PHASES, "step", "step + data"):
        cells = []
        for name, _ in candidates:
            v, share = rows[name][phase]
            na = name == "plain DLRM" and phase in ("data", "step + data")
            cells.append(f"{'(in memory)' if na else f'{v:8.2f} ({share * 100:4.1f}%)':>20}")
        print(f"{phase:<28}" + "".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fused", action="store_true",
                        help="also time ours with fused_embeddings=True (one-process run only)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--previous-baseline", action="store_true",
                        help="the baseline of the earlier figures: N(0, 1) rows, Adagrad accumulator 0")
    parser.add_argument("--profile", action="store_true",
                        help="split one process's step into phases instead of the throughput runs")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as d:
        path = generate_criteo(os.path.join(d, "train.tsv"), args.rows, seed=0)
        if args.profile:
            _profile(args, path)
            return
        results = mp.Manager().dict()
        if 1 in args.processes:
            _run(0, 1, args, path, 0, results)
        if 2 in args.processes:
            port = 29000 + os.getpid() % 1000
            mp.spawn(_run, args=(2, args, path, port, results), nprocs=2, join=True)
    print(f"\nbatch {args.batch_size}, {len(FEATURES)} features, dim 16; median of {args.repeats} blocks "
          f"of {args.steps} steps; examples/s over all processes; baseline "
          f"{'as before 2026-12-01 (N(0, 1) rows)' if args.previous_baseline else 'initialized as ours'}")
    print(f"{'processes':<10}{'candidate':<12}{'examples/s':>12}{'plain DLRM':>14}{'ours / plain':>15}")
    for world in sorted(set(args.processes)):
        b = results[f"{world}:plain DLRM"]
        for name in ("ours", "ours fused"):
            if f"{world}:{name}" in results:
                a = results[f"{world}:{name}"]
                label = "fused" if name == "ours fused" else "unfused"
                print(f"{world:<10}{label:<12}{a:>12.0f}{b:>14.0f}{a / b:>14.2f}x")
    print("goal: ours / plain DLRM >= 1.5x (stretch 2.0x)")


if __name__ == "__main__":
    main()
