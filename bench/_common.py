"""Shared timing harness for the benches: interleaved repeats, medians, ratios.

Every bench times its candidates side by side in one process: each repeat runs
every candidate once, in an order that rotates from repeat to repeat, so drift
(thermal, page cache, other load) hits all of them alike. The figure reported
is the median over repeats; ratios are medians over the baseline's median.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Candidate",
    "Timing",
    "add_threads_argument",
    "apply_threads",
    "machine_line",
    "measure",
    "memcpy_bandwidth",
    "print_table",
]


@dataclass
class Candidate:
    """A function to time; ``setup`` runs untimed before every call (e.g. to reset inputs)."""

    name: str
    fn: Callable[[], object]
    setup: Callable[[], object] | None = None


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(25th, 75th) percentiles of the repeats."""
        q = statistics.quantiles(self.seconds, n=4) if len(self.seconds) > 1 else [self.median] * 3
        return q[0], q[2]


def measure(candidates: list[Candidate], repeats: int = 21, warmup: int = 2) -> dict[str, Timing]:
    """Times each candidate ``repeats`` times, interleaved, after ``warmup`` untimed rounds."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    n = len(candidates)
    for r in range(warmup + repeats):
        for k in range(n):
            c = candidates[(r + k) % n]
            if c.setup is not None:
                c.setup()
            t0 = time.perf_counter()
            c.fn()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[c.name].append(elapsed)
    return {name: Timing(name, ts) for name, ts in times.items()}


def print_table(title: str, timings: dict[str, Timing], baseline: str, goal: float | None = None,
                goal_for: str | None = None, extra: dict[str, str] | None = None) -> dict[str, float]:
    """Prints median, quartiles and the ratio to ``baseline``; returns name -> ratio.

    ``goal_for`` names the candidate whose ratio is held against ``goal``.
    """
    base = timings[baseline].median
    print(f"\n== {title}")
    print(f"   baseline: {baseline}; median of {len(timings[baseline].seconds)} interleaved repeats "
          "[25th .. 75th percentile], fastest, ratio of medians")
    width = max(len(n) for n in timings)
    ratios = {}
    for name, t in timings.items():
        lo, hi = t.spread
        ratio = t.median / base
        ratios[name] = ratio
        note = (extra or {}).get(name, "")
        print(f"   {name:<{width}}  {t.median * 1e3:9.3f} ms  [{lo * 1e3:8.3f} .. {hi * 1e3:8.3f}]"
              f"  min {min(t.seconds) * 1e3:8.3f}  {ratio:6.3f}x  {note}")
    if goal is not None and goal_for is not None:
        r = ratios[goal_for]
        verdict = "MET" if r <= goal else "MISSED"
        print(f"   goal: {goal_for} <= {goal:.2f}x {baseline}: {r:.3f}x -> {verdict}")
    return ratios


def memcpy_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """This machine's memcpy bandwidth in GB/s: bytes copied per second by ``dst.copy_(src)``.

    As memcpy figures are usually quoted: ``nbytes / time`` (the memory traffic
    is about twice that: one read, one write). Buffers are allocated and
    touched up front, so page faults are not timed.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def machine_line() -> str:
    """Torch version, threads, CPU count and the load average (other jobs skew timings)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
            f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load}")


def add_threads_argument(parser) -> None:
    """``--threads N`` sets ``torch.set_num_threads`` (default: torch's choice)."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def apply_threads(args) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
