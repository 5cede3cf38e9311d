"""gen_seq_mask over 1M rows x 64 vs the one-line PyTorch idiom, with memcpy bandwidth for scale.

Baseline: ``(torch.arange(L) < lengths[:, None]).to(dtype)`` given the lengths
(so it does not even pay for ``splits[1:] - splits[:-1]``). Ours:
``gen_seq_mask(splits, L)`` from the row splits, with and without the
validation of non-decreasing splits (one reduction and one host sync).
A ``torch.ones(B, L)`` row shows what allocating and writing a fresh output
of that size costs on this machine (page faults included), next to the
memcpy bandwidth of a pre-faulted buffer.

Run: .venv/bin/python bench/bench_seq_mask.py [--rows 1000000] [--length 64] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Candidate,
    add_threads_argument,
    apply_threads,
    machine_line,
    measure,
    memcpy_bandwidth,
    print_table,
)
from monolith_torch import gen_seq_mask  # noqa: E402


def bench(rows: int, length: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    # Lengths straddle L so rows are full, partial and empty.
    lengths = torch.randint(0, 2 * length, (rows,), generator=gen).to(dtype)
    splits = torch.zeros(rows + 1, dtype=dtype)
    torch.cumsum(lengths, 0, out=splits[1:])

    def baseline():
        return (torch.arange(length, dtype=dtype) < lengths[:, None]).to(dtype)

    expected = baseline()
    if not torch.equal(gen_seq_mask(splits, length), expected):
        raise SystemExit("gen_seq_mask disagrees with the baseline")
    del expected
    timings = measure(
        [
            Candidate("arange < lengths (baseline)", baseline),
            Candidate("gen_seq_mask", lambda: gen_seq_mask(splits, length)),
            Candidate("gen_seq_mask(validate=False)", lambda: gen_seq_mask(splits, length, validate=False)),
            # Not a competitor: what any op returning a fresh [B, L] tensor pays
            # (allocation, page faults, one write), the ceiling for both above.
            Candidate("torch.ones(B, L) (reference)", lambda: torch.ones(rows, length, dtype=dtype)),
        ],
        repeats=repeats,
    )
    out_bytes = rows * length * torch.empty((), dtype=dtype).element_size()
    gbs = {name: f"{out_bytes / t.median / 1e9:6.2f} GB/s of mask written" for name, t in timings.items()}
    ratios = print_table(
        f"gen_seq_mask {rows} x {length} {dtype} ({out_bytes / 2**20:.0f} MiB out)",
        timings, "arange < lengths (baseline)", goal=1.0, goal_for="gen_seq_mask", extra=gbs,
    )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)
    print(machine_line())
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth (torch copy_ of 512 MiB, pre-faulted): {bw:.2f} GB/s copied")
    for dtype in (torch.int32, torch.int64):
        bench(args.rows, args.length, dtype, args.repeats)
    print(f"\nmemcpy bandwidth again (end of run): {memcpy_bandwidth():.2f} GB/s copied")


if __name__ == "__main__":
    main()
