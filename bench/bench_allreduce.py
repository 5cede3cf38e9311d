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
  (the practical limit), and of a float16 one;
- ``allreduce_cond(..., buckets=GradientBuckets)``: the gradients already live as views
  in persistent flat buffers (as after a backward into them), so the allreduce runs
  in place with no packing, in float32, with a tensor scale, and with fp16/bf16.
Every time is the median over repeats of rank 0's wall time, after a barrier. Ratios
are printed against named baselines; the headline one is the persistent buckets
against the raw preallocated float32 buffer, measured in the same round-robin and
again alone, alternating (head to head), with a profile of the difference.

Run: ``python bench/bench_allreduce.py [--repeats 15] [--workloads ab] [--headline-only]``
(``--headline-only``: just the persistent buckets against the raw buffer, alternating,
with the profile of the difference; docs/perf/allreduce.md has the figures).
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
from monolith_torch.distributed.gradient_buckets import GradientBuckets


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    """(a): 200 mixed sizes, ~10M floats, some 2-D; (b): 1000 x 1k floats."""
    if name == "b":
        return [(1000,)] * 1000
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(200, generator=g) ** 3 + 1e-4
    sizes = (weights / weights.sum() * 10_000_000).long().clamp(min=1).tolist()
    return [(n // 8, 8) if n % 8 == 0 and n >= 64 else (n,) for n in sizes]


def _round_robin_times(methods: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per method per repeat; each repeat runs every method once, so background
    load (this machine is shared) hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for k in range(warmup + repeats):
        for key, fn in methods.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if k >= warmup:
                times[key].append(dt)
    return times


def _round_robin_ms(methods: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per method over round-robin repeats."""
    times = _round_robin_times(methods, repeats, warmup)
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


def _bench_workload(name: str, rank: int, repeats: int, headline_only: bool = False):
    shapes = workload_shapes(name)
    g = torch.Generator().manual_seed(10 + rank)
    grads = [torch.randn(s, generator=g) for s in shapes]
    total = sum(t.numel() for t in grads)
    padded = aligned_flat_numel(grads, torch.float32)

    def cond(scale, **kwargs):
        cfg = AllreduceConfig(**kwargs)
        return lambda: allreduce_cond(grads, scale, cfg)

    # Zeros: a sum of zeros stays zero, so the raw buffers cannot grow to inf over the
    # repeats (random values double on every call); adds cost the same for any value.
    raw = torch.zeros(padded)
    raw16 = torch.zeros(padded, dtype=torch.float16)
    # The gradients as views in persistent buckets, as a backward into them leaves
    # them. The in-place results are averages of the ranks' values times the scale, so
    # every scale here is 1 (the tensor one too: its multiply still runs), which keeps
    # the values from shrinking into denormals over the repeats.
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    buckets = GradientBuckets(params, AllreduceConfig(fusion="one"))
    for view, grad in zip(buckets.views, grads, strict=True):
        view.copy_(grad)
    views = [p.grad for p in params]

    def in_place(scale, **kwargs):
        cfg = AllreduceConfig(**kwargs)
        return lambda: allreduce_cond(views, scale, cfg, buckets=buckets)

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
        "buckets": in_place(1.0, fusion="one"),
        "buckets, tensor scale": in_place(torch.tensor(1.0), fusion="one"),
        "buckets, fp16": in_place(1.0, fusion="one", compression="fp16"),
        "buckets, bf16": in_place(1.0, fusion="one", compression="bf16"),
        "raw fp32 buffer": lambda: dist.all_reduce(raw),
        "raw fp16 buffer": lambda: dist.all_reduce(raw16),
        "DDP backward": _backward_step(ddp),
        "plain backward": _backward_step(plain),
    }
    res: dict[str, float] = {}
    if not headline_only:
        res = _round_robin_ms(methods, repeats)
        res["DDP allreduce (difference)"] = res["DDP backward"] - res["plain backward"]

    def scale_only():
        # The one pass the in-place path adds to a raw allreduce: x * scale / world.
        for buf in buckets.buffers:
            buf.mul_(1.0)

    # The headline pair again, alone and alternating, so neither runs after a method
    # that evicts its buffer from the caches more than the other; then the scale pass
    # alone, for the profile.
    pair = _round_robin_times(
        {"raw fp32 buffer": lambda: dist.all_reduce(raw), "buckets": in_place(1.0, fusion="one")},
        2 * repeats,
    )
    head = {key: statistics.median(v) * 1e3 for key, v in pair.items()}
    # Each repeat's ratio of two neighbouring calls: load that drifts over the run
    # cancels out of it.
    head["paired ratio"] = statistics.median(
        b / r for b, r in zip(pair["buckets"], pair["raw fp32 buffer"], strict=True)
    )
    skip = AllreduceConfig(fusion="one", skip=True)
    head.update(
        _round_robin_ms(
            {
                "buckets: scale pass only": scale_only,
                # skip and a python 1: allreduce_cond's checks and dispatch, nothing else.
                "buckets: python overhead": lambda: allreduce_cond(
                    views, 1.0, skip, buckets=buckets
                ),
            },
            repeats,
        )
    )
    return name, len(shapes), total, padded, res, head


def _bench_rank(
    rank: int, world: int, port: int, repeats: int, workloads: list[str], headline_only: bool
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    report = [_bench_workload(name, rank, repeats, headline_only) for name in workloads]
    if rank == 0:
        _print(report)
    dist.barrier()
    dist.destroy_process_group()


def _print(report) -> None:
    for name, count, total, padded, res, head in report:
        print(f"\n({name}) {count} tensors, {total:,} floats ({padded:,} in the aligned buffer)")
        if res:
            _print_table(res, padded)
        _print_headline(head)


def _print_table(res: dict[str, float], padded: int) -> None:
    for key, ms in res.items():
        print(f"  {key:28s} {ms:9.2f} ms")
    ddp = res["DDP allreduce (difference)"]
    one = res["one"]
    raw, raw16 = res["raw fp32 buffer"], res["raw fp16 buffer"]
    rows = [
        ("speedup none / one", res["none"] / one, "(goal on (b): >= 10)"),
        ("ratio one / DDP allreduce", one / ddp, "(goal: <= 1.0)"),
        ("ratio one / raw fp32 buffer", one / raw, ""),
        ("ratio buckets / raw fp32 buffer", res["buckets"] / raw, "(goal: <= 1.2)"),
        ("ratio buckets, tensor scale / raw", res["buckets, tensor scale"] / raw, ""),
        ("ratio buckets, fp16 / raw fp16", res["buckets, fp16"] / raw16, ""),
        ("ratio buckets, bf16 / raw fp16", res["buckets, bf16"] / raw16, ""),
        ("ratio one / grouped", one / res["grouped"], ""),
    ]
    for label, value, goal in rows:
        print(f"  {label:36s} {value:7.2f}  {goal}")
    for comp, size in (("fp16", 2), ("bf16", 2)):
        print(
            f"  {comp}: {padded * size / 2**20:7.1f} MiB on the wire per rank vs "
            f"{padded * 4 / 2**20:7.1f} MiB fp32; time ratio {res[f'one, {comp}'] / one:5.2f}"
        )


def _print_headline(head: dict[str, float]) -> None:
    paired = head.pop("paired ratio")
    print("  head to head (alternating, twice the repeats):")
    for key, ms in head.items():
        print(f"    {key:26s} {ms:9.3f} ms")
    ratio = head["buckets"] / head["raw fp32 buffer"]
    print(f"    ratio buckets / raw fp32 buffer, of medians {ratio:6.2f}  (goal: <= 1.2)")
    print(f"    ratio buckets / raw fp32 buffer, paired     {paired:6.2f}  (goal: <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--workloads", default="ab", help="which workloads: a, b or ab")
    parser.add_argument(
        "--headline-only",
        action="store_true",
        help="only the persistent buckets against the raw buffer (and their profile)",
    )
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(
        f"torch {torch.__version__}, {args.world} processes, gloo, {os.cpu_count()} CPU cores, "
        f"median of {args.repeats} repeats"
    )
    mp.spawn(
        _bench_rank,
        args=(args.world, port, args.repeats, list(args.workloads), args.headline_only),
        nprocs=args.world,
    )


if __name__ == "__main__":
    main()
