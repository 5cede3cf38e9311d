"""How fast is allreduce_cond against DDP and a raw single-buffer allreduce?

Spawns 2 processes (gloo on 127.0.0.1) and times, per workload,
  (a) 200 gradient tensors of mixed sizes, about 10M floats in all,
  (b) 1000 tensors of 1k floats:
- ``allreduce_cond`` with fusion "one", "grouped", "none" (float32), and "one" with
  fp16/bf16 compression, and with a tensor scale folded in;
- ``torch.nn.parallel.DistributedDataParallel`` on parameters of the same shapes: the
  time of its gradient allreduce is (backward with DDP) - (the same backward without
  DDP), each the median of the repeats. The forward is one ``cat`` of all parameters
  times fixed coefficients, so the backward hands every parameter its gradient with
  little compute of its own to hide communication behind;
- a raw ``dist.all_reduce`` of one preallocated float32 buffer of the same total size
  (the practical limit), and of a float16 one.
Every time is the median over repeats of rank 0's wall time, after a barrier. Ratios
are printed against named baselines.

Run: ``python bench/bench_allreduce.py [--repeats 15]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond
from monolith_torch.distributed.flat_buffers import aligned_flat_numel


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    """(a): 200 mixed sizes, ~10M floats, some 2-D; (b): 1000 x 1k floats."""
    if name == "b":
        return [(1000,)] * 1000
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(200, generator=g) ** 3 + 1e-4
    sizes = (weights / weights.sum() * 10_000_000).long().clamp(min=1).tolist()
    return [(n // 8, 8) if n % 8 == 0 and n >= 64 else (n,) for n in sizes]


def _round_robin_ms(methods: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per method; each repeat runs every method once, so background load
    (this machine is shared) hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for k in range(warmup + repeats):
        for key, fn in methods.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if k >= warmup:
                times[key].append(dt)
    return {key: statistics.median(v) * 1e3 for key, v in times.items()}


class _Params(torch.nn.Module):
    def __init__(self, shapes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes
        )
        total = sum(p.numel() for p in self.ps)
        self.register_buffer("coef", torch.randn(total, generator=g))

    def forward(self):
        flat = torch.cat([p.reshape(-1) for p in self.ps])
        return (flat * self.coef).sum()


def _backward_step(module):
    params = list(module.parameters())

    def run():
        # Zeroing and the forward are in both DDP and plain steps: they cancel in the
        # difference, which leaves DDP's bucket copies, division and allreduce.
        for p in params:
            p.grad = None
        module().backward()

    return run


def _bench_workload(name: str, rank: int, repeats: int):
    shapes = workload_shapes(name)
    g = torch.Generator().manual_seed(10 + rank)
    grads = [torch.randn(s, generator=g) for s in shapes]
    total = sum(t.numel() for t in grads)
    padded = aligned_flat_numel(grads, torch.float32)

    def cond(scale, **kwargs):
        cfg = AllreduceConfig(**kwargs)
        return lambda: allreduce_cond(grads, scale, cfg)

    raw = torch.randn(padded)
    raw16 = torch.randn(padded).half()
    ddp = torch.nn.parallel.DistributedDataParallel(_Params(shapes, seed=rank))
    plain = _Params(shapes, seed=rank)
    methods = {
        "one": cond(1.0, fusion="one"),
        "grouped": cond(1.0, fusion="grouped"),
        "none": cond(1.0, fusion="none"),
        "one, single buffer": cond(1.0, fusion="one", bucket_cap_bytes=None),
        "one, tensor scale": cond(torch.tensor(0.5), fusion="one"),
        "one, fp16": cond(1.0, fusion="one", compression="fp16"),
        "one, bf16": cond(1.0, fusion="one", compression="bf16"),
        "raw fp32 buffer": lambda: dist.all_reduce(raw),
        "raw fp16 buffer": lambda: dist.all_reduce(raw16),
        "DDP backward": _backward_step(ddp),
        "plain backward": _backward_step(plain),
    }
    res = _round_robin_ms(methods, repeats)
    res["DDP allreduce (difference)"] = res["DDP backward"] - res["plain backward"]
    return name, len(shapes), total, padded, res


def _bench_rank(rank: int, world: int, port: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    report = [_bench_workload(name, rank, repeats) for name in ("a", "b")]
    if rank == 0:
        _print(report)
    dist.barrier()
    dist.destroy_process_group()


def _print(report) -> None:
    for name, count, total, padded, res in report:
        print(f"\n({name}) {count} tensors, {total:,} floats ({padded:,} in the aligned buffer)")
        for key, ms in res.items():
            print(f"  {key:28s} {ms:9.2f} ms")
        ddp = res["DDP allreduce (difference)"]
        one = res["one"]
        print(f"  speedup one vs none          {res['none'] / one:9.2f} x   (goal on (b): >= 10)")
        print(f"  ratio one / DDP allreduce    {one / ddp:9.2f}     (goal: <= 1.0)")
        print(
            f"  ratio one / raw fp32 buffer  {one / res['raw fp32 buffer']:9.2f}     (goal: <= 1.2)"
        )
        print(f"  ratio one / grouped          {one / res['grouped']:9.2f}")
        for comp, size in (("fp16", 2), ("bf16", 2)):
            print(
                f"  {comp}: {padded * size / 2**20:7.1f} MiB on the wire per rank vs "
                f"{padded * 4 / 2**20:7.1f} MiB fp32; time ratio {res[f'one, {comp}'] / one:5.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(
        f"torch {torch.__version__}, {args.world} processes, gloo, {os.cpu_count()} CPU cores, "
        f"median of {args.repeats} repeats"
    )
    mp.spawn(_bench_rank, args=(args.world, port, args.repeats), nprocs=args.world)


if __name__ == "__main__":
    main()
