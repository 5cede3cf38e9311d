"""One apply_gradients_with_var_optimizer step vs the same step written in plain PyTorch.

The model: 4 feature columns (ragged ids, ReduceSum, D=16 each) through
``FeatureFactoryFromEmbeddings`` as in tests/conftest.py, concatenated into a
25-layer MLP (50 dense tensors), MSE loss. Both sides time the whole step,
forward included, with identical initial values and the same math:

- ours: ``create_embedding_slices`` + ``FeatureColumn.embedding_lookup`` for
  the forward, then ``apply_gradients_with_var_optimizer(ctx, columns, sgd,
  loss, clip_norm=1.0, global_step=gs)`` (synchronous ``AsyncFunctionMgr``);
  embeddings are updated by the factory's ``apply_fn`` (SGD on the per-id rows).
- baseline: ``torch.segment_reduce`` sums over the row splits for the forward
  (the kernel ``ReduceSum`` uses, so the ratio measures the step machinery,
  not a choice of kernel; ``--index-add-baseline`` pools with ``index_add``
  over per-id row ids instead), ``loss.backward()``,
  one global norm over dense + embedding gradients, TF's clip factor
  ``where(norm > c, c / norm, 1)`` applied with ``_foreach_mul_``,
  ``sgd.step()``, the embedding SGD update, ``global_step += 1``.

Before timing, three steps of each are run from the same start and their
parameters compared, so both really do the same thing.

Run: .venv/bin/python bench/bench_step.py [--config medium small] [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
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
    print_table,
)
from monolith_torch import (  # noqa: E402
    FeatureColumnV1,
    FeatureFactoryFromEmbeddings,
    FeatureSlotConfig,
    NativeContext,
    RaggedTensor,
    ReduceSum,
    apply_gradients_with_var_optimizer,
    create_embedding_slices,
)

CONFIGS = {
    # name: (batch B, MLP width H, ids per row on average)
    "medium": (1024, 256, 4),
    "small": (64, 64, 4),
}
NUM_FEATURES, DIM, NUM_LAYERS, LR, CLIP_NORM = 4, 16, 25, 0.01, 1.0


def make_data(batch: int, ids_per_row: int, gen: torch.Generator):
    ids, leaves = {}, {}
    for f in range(NUM_FEATURES):
        lengths = torch.randint(0, 2 * ids_per_row + 1, (batch,), generator=gen)
        n = int(lengths.sum())
        ids[f"f{f}"] = RaggedTensor.from_row_lengths(torch.randint(0, 10**6, (n,), generator=gen), lengths)
        leaves[f"f{f}"] = (0.1 * torch.randn(n, DIM, generator=gen)).requires_grad_()
    target = torch.randn(batch, 1, generator=gen)
    return ids, leaves, target


def make_mlp(width: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = [torch.nn.Linear(NUM_FEATURES * DIM, width), torch.nn.ReLU()]
    for _ in range(NUM_LAYERS - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


class OurStep:
    def __init__(self, mlp, ids, leaves, target):
        self.mlp, self.ids, self.leaves, self.target = mlp, ids, leaves, target
        self.slices: dict = {}
        factory = FeatureFactoryFromEmbeddings(leaves, self.slices, self._apply_embedding_gradients)
        self.ctx = NativeContext(feature_factory=factory)
        self.columns, self.feature_slices = [], []
        for name in leaves:
            slot = self.ctx.create_feature_slot(FeatureSlotConfig(name=f"slot_{name}"))
            self.feature_slices.append(slot.add_feature_slice(DIM))
            self.columns.append(FeatureColumnV1(slot, name))
        self.opt = torch.optim.SGD(mlp.parameters(), lr=LR)
        self.global_step = torch.zeros((), dtype=torch.int64)
        self.combiners = {name: ReduceSum() for name in leaves}
        self.dims = {name: [DIM] for name in leaves}

    @staticmethod
    def _apply_embedding_gradients(grads_and_vars, scale):
        grads = [g for g, _ in grads_and_vars]
        leaves = [v for _, v in grads_and_vars]
        if isinstance(scale, torch.Tensor):
            grads = torch._foreach_mul(grads, scale)
        with torch.no_grad():
            torch._foreach_add_(leaves, grads, alpha=-LR)

    def __call__(self):
        self.slices.clear()
        self.slices.update(create_embedding_slices(self.leaves, self.ids, self.combiners, self.dims))
        x = torch.cat([fc.embedding_lookup(s) for fc, s in zip(self.columns, self.feature_slices, strict=True)], 1)
        loss = torch.nn.functional.mse_loss(self.mlp(x), self.target)
        return apply_gradients_with_var_optimizer(
            self.ctx, self.columns, self.opt, loss, clip_norm=CLIP_NORM, global_step=self.global_step
        )


class PlainStep:
    def __init__(self, mlp, ids, leaves, target, index_add=False):
        self.mlp, self.ids, self.leaves, self.target = mlp, ids, leaves, target
        self.index_add = index_add
        self.opt = torch.optim.SGD(mlp.parameters(), lr=LR)
        self.global_step = torch.zeros((), dtype=torch.int64)
        self.splits = {name: r.row_splits for name, r in ids.items()}

    def __call__(self):
        pooled = []
        for name, leaf in self.leaves.items():
            if self.index_add:
                splits = self.splits[name]
                lengths = splits[1:] - splits[:-1]
                rowids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=leaf.shape[0])
                pooled.append(leaf.new_zeros(lengths.numel(), DIM).index_add(0, rowids, leaf))
            else:
                pooled.append(torch.segment_reduce(leaf, "sum", offsets=self.splits[name], axis=0, unsafe=True))
        loss = torch.nn.functional.mse_loss(self.mlp(torch.cat(pooled, 1)), self.target)
        self.opt.zero_grad(set_to_none=True)
        leaves = list(self.leaves.values())
        for leaf in leaves:
            leaf.grad = None
        loss.backward()
        grads = [p.grad for p in self.mlp.parameters()] + [leaf.grad for leaf in leaves]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        factor = torch.where(norm > CLIP_NORM, CLIP_NORM / norm, torch.ones_like(norm))
        torch._foreach_mul_(grads, factor)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_add_(leaves, [leaf.grad for leaf in leaves], alpha=-LR)
        self.global_step += 1
        return norm


def build(config: str, index_add: bool = False):
    batch, width, ids_per_row = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = make_mlp(width)
    ids, leaves, target = make_data(batch, ids_per_row, gen)
    plain_leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    plain = PlainStep(copy.deepcopy(mlp), ids, plain_leaves, target, index_add=index_add)
    return OurStep(mlp, ids, leaves, target), plain


def check_same(ours: OurStep, plain: PlainStep) -> None:
    for _ in range(3):
        result = ours()
        norm = plain()
        torch.testing.assert_close(result.global_norm, norm)
    for a, b in zip(ours.mlp.parameters(), plain.mlp.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for name in ours.leaves:
        torch.testing.assert_close(ours.leaves[name], plain.leaves[name])
    assert int(ours.global_step) == int(plain.global_step) == 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["medium", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--index-add-baseline", action="store_true",
                        help="pool with index_add over value_rowids in the baseline instead of segment_reduce")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)
    print(machine_line())
    for config in args.config:
        ours, plain = build(config, index_add=args.index_add_baseline)
        check_same(ours, plain)
        batch, width, ids_per_row = CONFIGS[config]
        n_dense = sum(1 for _ in ours.mlp.parameters())
        n_ids = sum(leaf.shape[0] for leaf in ours.leaves.values())
        timings = measure(
            [Candidate("plain PyTorch step", plain), Candidate("apply_gradients_with_var_optimizer step", ours)],
            repeats=args.repeats,
        )
        extra = {
            name: f"{(t.median - timings['plain PyTorch step'].median) * 1e3:+.3f} ms vs plain"
            for name, t in timings.items()
        }
        print_table(
            f"step '{config}': B={batch}, {n_dense} dense tensors (MLP width {width}), "
            f"{NUM_FEATURES} columns, {n_ids} ids x D={DIM}, forward + backward + clip + SGD",
            timings, "plain PyTorch step", goal=1.10, goal_for="apply_gradients_with_var_optimizer step",
            extra=extra,
        )


if __name__ == "__main__":
    main()
