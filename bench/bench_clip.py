"""clip_by_global_norm over 200 mixed-size tensors vs torch.nn.utils.clip_grad_norm_(foreach=True).

200 float32 gradients of log-uniform sizes in [1e2, 1e6] elements (fixed
seed, about 29M elements, 117 MB). Every timed call starts from the same
gradient values (restored untimed before each call), whose global norm is far
above the bound, so every call really scales.

- ``clip_grad_norm_`` (baseline): in place, ``foreach=True``.
- ``clip_by_global_norm_``: ours, in place -- the like-for-like comparison.
- ``clip_by_global_norm``: ours, out of place (TF's API: allocates 200 new
  tensors, so it pays for fresh memory the in-place calls do not).

Run: .venv/bin/python bench/bench_clip.py [--tensors 200] [--repeats 31]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Candidate,
    add_threads_argument,
    apply_threads,
    machine_line,
    measure,
    print_table,
)
from monolith_torch import clip_ops  # noqa: E402

CLIP_NORM = 1.0


def make_sizes(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(s) for s in np.exp(rng.uniform(np.log(1e2), np.log(1e6), n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)
    dtype = getattr(torch, args.dtype)
    print(machine_line())

    sizes = make_sizes(args.tensors)
    gen = torch.Generator().manual_seed(0)
    originals = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    # Both sides work on the very same buffers (the parameters' .grad), so
    # memory placement cannot favour either.
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]
    for p, g in zip(params, originals, strict=True):
        p.grad = g.clone()
    grads = [p.grad for p in params]

    def restore():
        torch._foreach_copy_(grads, originals)

    # Same answer first: norms and clipped values agree.
    ref_norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM, foreach=True)
    ref_grads = [g.clone() for g in grads]
    restore()
    our_norm = clip_ops.clip_by_global_norm_(grads, CLIP_NORM)
    torch.testing.assert_close(our_norm.to(ref_norm.dtype), ref_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-7)
    del ref_grads

    timings = measure(
        [
            Candidate("torch clip_grad_norm_(foreach=True)",
                      lambda: torch.nn.utils.clip_grad_norm_(params, CLIP_NORM, foreach=True), restore),
            Candidate("clip_by_global_norm_ (in place)",
                      lambda: clip_ops.clip_by_global_norm_(grads, CLIP_NORM), restore),
            Candidate("clip_by_global_norm (out of place)",
                      lambda: clip_ops.clip_by_global_norm(grads, CLIP_NORM), restore),
            Candidate("global_norm only", lambda: clip_ops.global_norm(grads), restore),
        ],
        repeats=args.repeats,
    )
    total = sum(sizes)
    print_table(
        f"clip by global norm: {len(sizes)} {args.dtype} tensors, {total / 1e6:.1f}M elements "
        f"({total * originals[0].element_size() / 1e6:.0f} MB), sizes {min(sizes)}..{max(sizes)}",
        timings, "torch clip_grad_norm_(foreach=True)", goal=1.0, goal_for="clip_by_global_norm_ (in place)",
    )


if __name__ == "__main__":
    main()
