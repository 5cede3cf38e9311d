"""The fused CPU path: compiled optimizers against today's table update and numpy, fused against unfused."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_optimizers import OPTIMIZERS, _np_state, _np_step

from monolith_torch import (
    EmbeddingFeatureConfig,
    EmbeddingTableConfig,
    FeatureSlotConfig,
    FirstN,
    HashEmbeddingBagCollection,
    HashTableFeatureFactory,
    RaggedTensor,
    ReduceMean,
    ReduceSum,
    entry,
)
from monolith_torch.embedding import fused
from monolith_torch.embedding.optimizers import SgdSlice, register_slice_optimizer
from monolith_torch.embedding.table import EmbeddingTable

NOW = 1_700_000_000.0


def _table(opt, dim=5, threshold=0, bias=True):
    t = EmbeddingTable("t", slot_id=3, seed=1, occurrence_threshold=threshold, time_fn=lambda: NOW)
    if bias:
        t.add_feature_slice(entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.FtrlOptimizer(
            learning_rate=0.1, initial_accumulator_value=1e-6, beta=1.0), entry.Fp32Compressor()))
    t.add_feature_slice(entry.CombineAsSegment(dim, entry.RandomUniformInitializer(-0.5, 0.5), opt,
                                               entry.Fp32Compressor()))
    return t


def _assert_tables_equal(a, b, exact=True, rtol=2e-6, atol=1e-7):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if not isinstance(v, torch.Tensor):
            assert v == sb[k]
        elif exact or not v.is_floating_point():
            assert torch.equal(v, sb[k]), k
        else:
            torch.testing.assert_close(v, sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _bitwise(opt) -> bool:
    # torch's sqrt and pow on large CPU tensors (MKL VML, Sleef) are within an
    # ulp but not always correctly rounded; the kernels' are. The rules without
    # them give the same bits.
    return isinstance(opt, entry.SgdOptimizer | entry.MomentumOptimizer)


# -- compiled slice optimizers -------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:60])
def test_compiled_update_equals_table_update(opt, threads):
    """``apply_rows`` (compiled) against ``EmbeddingTable.apply_gradients`` (torch): the same bits, or within an ulp."""
    a, b = _table(opt), _table(opt)
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([5, 9, -3, 2**40, 7, 11])
    for step in range(4):
        ra, rb = a.lookup_rows(ids), b.lookup_rows(ids)
        grads = torch.randn(ids.numel(), a.dim, generator=gen)
        scale = [1.0, 0.5, torch.tensor(0.25), 2.0][step]
        a.apply_gradients(ids, grads, scale, global_step=step, rows=ra, rows_generation=a.generation)
        fused.apply_rows(b, ids, rb, grads, float(scale), step, threads)
    _assert_tables_equal(a, b, exact=_bitwise(opt))


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:60])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_compiled_update_matches_numpy(opt, data):
    u, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    steps = data.draw(st.integers(1, 3))
    t = _table(opt, dim=d, bias=False)
    ids = torch.arange(u) * 7 + 1
    rows = t.lookup_rows(ids)
    w0 = t.gather(rows).numpy().astype(np.float64)
    ref_w, ref_st = w0, _np_state(opt, w0.shape)
    for step in range(steps):
        g = np.asarray(data.draw(st.lists(st.floats(-2, 2, width=32), min_size=u * d, max_size=u * d)),
                       dtype=np.float32).reshape(u, d)
        lr = opt.effective_learning_rate()
        fused.apply_rows(t, ids, rows, torch.from_numpy(g), 1.0, step)
        ref_w = _np_step(opt, lr, ref_w, g.astype(np.float64), ref_st)
    near = np.zeros(w0.shape, dtype=bool)
    if isinstance(opt, entry.FtrlOptimizer):  # |z| at the l1 threshold: float32 may fall either side
        near = np.abs(np.abs(ref_st["z"]) - (opt.l1_regularization or 0.0)) < 1e-4
    got = t.gather(rows)
    torch.testing.assert_close(got[~torch.from_numpy(near)], torch.from_numpy(ref_w[~near]).float(),
                               rtol=1e-4, atol=1e-5)


def test_ftrl_warmup_step_zero_leaves_rows_alone():
    opt = entry.FtrlOptimizer(learning_rate=0.1, initial_accumulator_value=0.1, warmup_steps=10)
    a, b = _table(opt), _table(opt)
    ids = torch.tensor([1, 2])
    ra, rb = a.lookup_rows(ids), b.lookup_rows(ids)
    grads = torch.ones(2, a.dim)
    a.apply_gradients(ids, grads, 1.0, global_step=0, rows=ra, rows_generation=a.generation)
    fused.apply_rows(b, ids, rb, grads, 1.0, 0)
    _assert_tables_equal(a, b)


def test_user_optimizer_without_kernel_falls_back_to_the_table():
    @dataclass(frozen=True)
    class HalfSgd(entry.SgdOptimizer):
        pass

    @register_slice_optimizer(HalfSgd)
    class HalfSgdSlice(SgdSlice):
        def update(self, w, g, state, lr):
            return w - 0.5 * lr * g

    opt = HalfSgd(learning_rate=0.1)
    a, b = _table(opt), _table(opt)
    ids = torch.tensor([1, 2, 1])
    grads = torch.ones(3, a.dim)
    ra, rb = a.lookup_rows(ids), b.lookup_unique_rows(torch.tensor([1, 2]), torch.tensor([2, 1]))
    a.apply_gradients(ids, grads, 1.0, 0, rows=ra, rows_generation=a.generation)
    fused.apply_rows(b, torch.tensor([1, 2]), rb, torch.tensor([[2.0] * a.dim, [1.0] * a.dim]), 1.0, 0)
    _assert_tables_equal(a, b)


# -- fused against unfused modules -----------------------------------------------------------------


def _module(fused_path, vec_opt, threshold=0, dims=(3, 2)):
    combiners = (None, ReduceMean(), FirstN(3))
    slot = FeatureSlotConfig(name="a", has_bias=True, occurrence_threshold=threshold, default_vec_optimizer=vec_opt)
    other = FeatureSlotConfig(name="b", default_vec_optimizer=vec_opt)
    tables = [EmbeddingTableConfig(slot, dims), EmbeddingTableConfig(other, (4,))]
    features = [EmbeddingFeatureConfig(f"f{i}", "a", c) for i, c in enumerate(combiners)]
    features.append(EmbeddingFeatureConfig("g", "b"))
    factory = HashTableFeatureFactory(seed=7, time_fn=lambda: NOW)
    return HashEmbeddingBagCollection(tables, features, factory=factory, fused=fused_path)


@st.composite
def _batches(draw, n_features=4):
    steps = draw(st.integers(1, 3))
    out = []
    for _ in range(steps):
        b = draw(st.integers(0, 5))
        batch = {}
        for i in range(n_features):
            lengths = draw(st.lists(st.integers(0, 4), min_size=b, max_size=b))
            values = draw(st.lists(st.integers(-5, 12) | st.integers(-2**63, 2**63 - 1),
                                   min_size=sum(lengths), max_size=sum(lengths)))
            splits = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
            batch[f"f{i}" if i < n_features - 1 else "g"] = RaggedTensor.from_row_splits(
                torch.tensor(values, dtype=torch.int64), torch.from_numpy(splits))
        out.append((batch, draw(st.integers(0, 2**31 - 1))))
    return out


def _run(module, batches, train_steps=True):
    outs = []
    for batch, seed in batches:
        out = module(batch)
        outs.append({k: v.detach().clone() for k, v in out.items()})
        gen = torch.Generator().manual_seed(seed)
        loss = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in out.values())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        module.sparse_step(global_step=torch.tensor(len(outs)))
    return outs


VEC_OPTS = [
    entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.1),
    entry.FtrlOptimizer(learning_rate=0.1, initial_accumulator_value=0.1, beta=1.0, l1_regularization=0.01),
    entry.AdamOptimizer(learning_rate=0.05),
    entry.SgdOptimizer(learning_rate=0.1),
    entry.MomentumOptimizer(learning_rate=0.1, use_nesterov=True),
    entry.RmspropOptimizer(learning_rate=0.1, weight_decay_factor=0.01),
]


@pytest.mark.parametrize("vec_opt", VEC_OPTS, ids=lambda o: type(o).__name__)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=_batches(), threshold=st.sampled_from([0, 2]))
def test_fused_equals_unfused_on_random_ragged_batches(vec_opt, batches, threshold):
    """Duplicates, empty rows and batches, new ids, the occurrence filter: same outputs and tables."""
    fa, ua = _module(True, vec_opt, threshold), _module(False, vec_opt, threshold)
    assert fa.uses_fused_path and not ua.uses_fused_path
    out_f, out_u = _run(fa, batches), _run(ua, batches)
    for of, ou in zip(out_f, out_u, strict=True):
        for k in of:
            torch.testing.assert_close(of[k], ou[k], rtol=2e-6, atol=1e-7)
    for name in fa.tables:
        # The paths sum a row's duplicate gradients in different orders; FTRL's z (g - sigma * w) and
        # Adam's moments carry that float32 rounding on, up to a few ULPs of values near 1.
        _assert_tables_equal(fa.tables[name], ua.tables[name], exact=False, atol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=_batches())
def test_fused_eval_reads_without_growing(batches):
    opt = entry.AdagradOptimizer(learning_rate=0.1)
    fa, ua = _module(True, opt), _module(False, opt)
    _run(fa, batches[:1]), _run(ua, batches[:1])
    fa.eval(), ua.eval()
    sizes = {n: len(t) for n, t in fa.tables.items()}
    for batch, _ in batches:
        of, ou = fa(batch), ua(batch)
        for k in of:
            torch.testing.assert_close(of[k], ou[k], rtol=2e-6, atol=1e-7)
    assert {n: len(t) for n, t in fa.tables.items()} == sizes


def test_two_threads_match_one():
    opt = entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.1)
    gen = np.random.default_rng(0)
    b = 3000
    lengths = gen.integers(0, 4, size=b)
    splits = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    batch = {}
    for name in ("f0", "f1", "f2", "g"):
        values = torch.from_numpy(gen.integers(0, 500, size=int(splits[-1])))
        batch[name] = RaggedTensor.from_row_splits(values, splits)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = _module(True, opt)
            results.append((_run(m, [(batch, 1), (batch, 2)]), m))
    finally:
        torch.set_num_threads(before)
    (o1, m1), (o2, m2) = results
    for step, (a, b_) in enumerate(zip(o1, o2, strict=True)):
        for k in a:
            # Pooling is per row: the same bits from the same rows (the second
            # batch reads rows updated with gradients summed in another order).
            tol = 0 if step == 0 else 1e-6
            torch.testing.assert_close(a[k], b_[k], rtol=tol, atol=tol)
    for name in m1.tables:  # accumulators of ~200 summed in another order: a few ulps apart
        _assert_tables_equal(m1.tables[name], m2.tables[name], exact=False, rtol=1e-5, atol=1e-6)


def test_bad_splits_raise_before_any_table_changes():
    m = _module(True, entry.SgdOptimizer())
    good = RaggedTensor.from_row_splits(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
    bad = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]))  # not validated: decreasing
    with pytest.raises(ValueError, match="'f1'"):
        m({"f0": good, "f1": bad, "f2": good, "g": good})
    assert all(len(t) == 0 for t in m.tables.values())


def test_rows_moved_between_forward_and_step_are_probed_again():
    opt = entry.SgdOptimizer(learning_rate=0.1)
    fa, ua = _module(True, opt), _module(False, opt)
    ids = RaggedTensor.from_row_splits(torch.tensor([4, 5, 6]), torch.tensor([0, 1, 3]))
    batch = {"f0": ids, "f1": ids, "f2": ids, "g": ids}
    for m in (fa, ua):
        out = m(batch)
        sum(v.sum() for v in out.values()).backward()
        state = m.state_dict()
        m.load_state_dict(state)  # bumps every table's generation
        m.sparse_step()
    for name in fa.tables:
        _assert_tables_equal(fa.tables[name], ua.tables[name], exact=False)


def test_single_valued_features_and_combiners_by_hand():
    opt = entry.SgdOptimizer(learning_rate=1.0)
    slot = FeatureSlotConfig(name="t", default_vec_initializer=entry.ConstantsInitializer(1.0),
                             default_vec_optimizer=opt)
    m = HashEmbeddingBagCollection(
        [EmbeddingTableConfig(slot, (2,))],
        [EmbeddingFeatureConfig("s", "t", ReduceSum()), EmbeddingFeatureConfig("m", "t", ReduceMean()),
         EmbeddingFeatureConfig("q", "t", FirstN(2))])
    ragged = RaggedTensor.from_row_splits(torch.tensor([1, 2, 3]), torch.tensor([0, 3]))
    out = m({"s": torch.tensor([1, 1]), "m": ragged, "q": ragged})
    assert torch.equal(out["s"], torch.ones(2, 2))
    assert torch.equal(out["m"], torch.ones(1, 2))
    assert torch.equal(out["q"], torch.ones(1, 2, 2))
    (out["s"].sum() + out["m"].sum() * 3 + out["q"].sum()).backward()
    m.sparse_step()
    table = m.tables["t"]
    rows = table.lookup_rows(torch.tensor([1, 2, 3]), insert=False)
    # id 1: 2 (s) + 1 (mean: 3 * 1/3) + 1 (first 2) = 4; id 2: 1 + 1 = 2; id 3: 1 (mean), beyond FirstN(2).
    assert torch.equal(table.gather(rows), torch.tensor([[-3.0, -3.0], [-1.0, -1.0], [0.0, 0.0]]))
    assert torch.equal(table.state_dict()["counts"], torch.tensor([4, 2, 2]))
