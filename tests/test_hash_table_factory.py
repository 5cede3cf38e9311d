"""HashTableFeatureFactory: the seed's step scenarios on real tables, lookups, errors, layouts."""

from __future__ import annotations

import pytest
import torch

from monolith_torch import entry
from monolith_torch.async_function_mgr import AsyncFunctionMgr
from monolith_torch.feature import FeatureColumn, FeatureSlotConfig, slice_key
from monolith_torch.hash_table_factory import HashTableFeatureFactory
from monolith_torch.native_context import NativeContext
from monolith_torch.ragged import RaggedTensor
from monolith_torch.seq_mask import gen_seq_mask

feature_utils = pytest.importorskip("monolith_torch.feature_utils")


def _sgd_slot(factory, name="s", **kw):
    cfg = FeatureSlotConfig(
        name=name,
        default_vec_initializer=entry.ConstantsInitializer(1.0),
        default_vec_optimizer=entry.SgdOptimizer(learning_rate=1.0),
        **kw,
    )
    return factory.create_feature_slot(cfg)


def _ids(values, splits):
    return RaggedTensor.from_row_splits(torch.tensor(values, dtype=torch.int64), torch.tensor(splits))


def _setup(is_async=False):
    """One slot, a 3-wide then a 1-wide slice, one feature with one id (the seed's setup)."""
    factory = HashTableFeatureFactory(seed=0)
    slot = _sgd_slot(factory)
    s3 = slot.add_feature_slice(3)
    slot.add_feature_slice(1)
    fc = FeatureColumn(slot, "f")
    ctx = NativeContext(feature_factory=factory, async_function_mgr=AsyncFunctionMgr(is_async=is_async))
    return ctx, factory, fc, s3


def _row(factory, fid=7):
    return factory.tables["s"].lookup(torch.tensor([fid]), insert=False)[0]


def test_apply_gradients_with_dense_optimizer():
    ctx, factory, fc, s3 = _setup()
    var = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([var], lr=1.0)
    step = torch.zeros((), dtype=torch.int64)
    factory.lookup({"f": _ids([7], [0, 1])})
    loss = var + fc.embedding_lookup(s3).sum()
    feature_utils.apply_gradients_with_var_optimizer(ctx, [fc], opt, loss, clip_norm=1.0, global_step=step)
    ctx.async_function_mgr.flush()
    torch.testing.assert_close(var.detach(), torch.tensor(0.5))
    torch.testing.assert_close(_row(factory), torch.tensor([0.5, 0.5, 0.5, 1.0]))
    assert int(step) == 1


def test_apply_gradients_with_dense_optimizer_post_push():
    ctx, factory, fc, s3 = _setup(is_async=True)
    var = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([var], lr=1.0)
    step = torch.zeros((), dtype=torch.int64)
    for _ in range(3):
        factory.lookup({"f": _ids([7], [0, 1])})
        loss = var + fc.embedding_lookup(s3).sum()
        feature_utils.apply_gradients_with_var_optimizer(ctx, [fc], opt, loss, global_step=step)
    torch.testing.assert_close(var.detach(), torch.tensor(-1.0))
    torch.testing.assert_close(_row(factory), torch.tensor([-2.0, -2.0, -2.0, 1.0]))


def test_apply_gradients_without_dense_optimizer():
    ctx, factory, fc, s3 = _setup()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.tensor(0.0))], lr=1.0)
    step = torch.zeros((), dtype=torch.int64)
    factory.lookup({"f": _ids([7], [0, 1])})
    loss = fc.embedding_lookup(s3).sum()
    feature_utils.apply_gradients_with_var_optimizer(ctx, [fc], opt, loss, global_step=step)
    ctx.async_function_mgr.flush()
    torch.testing.assert_close(_row(factory), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert int(step) == 1
