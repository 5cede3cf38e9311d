"""A tiny embedding setup on ``FeatureFactoryFromEmbeddings`` (Monolith's test fixture), for tests to import."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monolith_torch import (
    AsyncFunctionMgr,
    FeatureColumnV1,
    FeatureFactoryFromEmbeddings,
    FeatureSlotConfig,
    NativeContext,
    RaggedTensor,
    ReduceSum,
    create_embedding_slices,
)


@dataclass
class EmbeddingSetup:
    ctx: NativeContext
    fc: FeatureColumnV1
    emb_var: torch.Tensor
    slice3: object
    applied_scales: list
    _slices: dict
    _ids: RaggedTensor

    def lookup(self) -> torch.Tensor:
        """Re-runs the forward of the embedding (eager graphs are used once)."""
        self._slices.clear()
        self._slices.update(
            create_embedding_slices(
                {"feature1": self.emb_var}, {"feature1": self._ids}, {"feature1": ReduceSum()}, {"feature1": [3, 1]}
            )
        )
        return self.fc.embedding_lookup(self.slice3)


def make_embedding_setup(is_async: bool = False, summary_writer=None) -> EmbeddingSetup:
    """Monolith's ``_setup_test_embedding``: one id, a [1, 4] row read as slices of 3 and 1.

    The factory's update subtracts ``scale * grad`` from the embedding in place.
    """
    emb_var = torch.ones(1, 4, requires_grad=True)
    ids = RaggedTensor.from_row_splits(torch.tensor([111]), torch.tensor([0, 1]))
    slices: dict = {}
    applied_scales: list = []

    def apply_fn(grads_and_vars, scale):
        applied_scales.append(scale)
        with torch.no_grad():
            for grad, var in grads_and_vars:
                var.sub_(grad * scale)

    factory = FeatureFactoryFromEmbeddings({"feature1": emb_var}, slices, apply_fn)
    ctx = NativeContext(
        feature_factory=factory, async_function_mgr=AsyncFunctionMgr(is_async), summary_writer=summary_writer
    )
    slot = ctx.create_feature_slot(FeatureSlotConfig(name="Slot"))
    s = slot.add_feature_slice(3)
    fc = FeatureColumnV1(slot, "feature1")
    return EmbeddingSetup(ctx, fc, emb_var, s, applied_scales, slices, ids)
