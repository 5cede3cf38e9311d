"""Slice optimizers: hand-checked steps, numpy references, the registry, and tables that use them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from monolith_torch.embedding import entry, optimizers
from monolith_torch.embedding.optimizers import (
    SliceOptimizer,
    learning_rate_at,
    register_slice_optimizer,
    slice_optimizer_for,
)
from monolith_torch.embedding.table import EmbeddingTable

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


# -- numpy references (float64), one per rule ---------------------------------------------


def _np_step(opt, lr, w, g, st):
    """One step of ``opt``'s rule on float64 arrays; updates ``st`` and returns the new ``w``."""
    if isinstance(opt, entry.SgdOptimizer):
        return w - lr * g
    if isinstance(opt, entry.AdagradOptimizer):
        g = g + opt.weight_decay_factor * w
        st["accumulator"] = st["accumulator"] + g * g
        return w - lr * g / np.sqrt(st["accumulator"])
    if isinstance(opt, entry.FtrlOptimizer):
        l1, l2, beta = opt.l1_regularization or 0.0, opt.l2_regularization or 0.0, opt.beta or 0.0
        n_new = st["n"] + g * g
        st["z"] = st["z"] + g - (np.sqrt(n_new) - np.sqrt(st["n"])) / lr * w
        st["n"] = n_new
        z = st["z"]
        return np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / ((np.sqrt(n_new) + beta) / lr + l2), 0.0)
    if isinstance(opt, entry.AdamOptimizer):
        g = g + opt.weight_decay_factor * w
        st["steps"] = st["steps"] + 1
        st["m"] = opt.beta1 * st["m"] + (1 - opt.beta1) * g
        st["v"] = opt.beta2 * st["v"] + (1 - opt.beta2) * g * g
        m_hat = st["m"] / (1 - opt.beta1 ** st["steps"])
        v_hat = st["v"] / (1 - opt.beta2 ** st["steps"])
        return w - lr * m_hat / (np.sqrt(v_hat) + opt.epsilon)
    if isinstance(opt, entry.MomentumOptimizer):
        # TF's form of the step (velocity without the learning rate) would differ when lr changes;
        # this is Monolith's, n carrying lr.
        g = g + opt.weight_decay_factor * w
        n_old = st["n"]
        st["n"] = opt.momentum * n_old - lr * g
        if opt.use_nesterov:
            return w + opt.momentum * st["n"] - lr * g
        return w + st["n"]
    if isinstance(opt, entry.RmspropOptimizer):
        g = g + opt.weight_decay_factor * w
        st["n"] = opt.momentum * st["n"] + (1 - opt.momentum) * g * g
        return w - lr * g / (np.sqrt(st["n"]) + 1.0)
    raise AssertionError(opt)


def _np_state(opt, shape):
    init = float(getattr(opt, "initial_accumulator_value", None) or 0.0)
    names = slice_optimizer_for(opt).state_names
    return {n: np.full(shape, init if n in ("accumulator", "n") and init else 0.0) for n in names}


OPTIMIZERS = [
    entry.SgdOptimizer(learning_rate=0.1),
    entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.5),
    entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0, weight_decay_factor=0.01),
    entry.FtrlOptimizer(learning_rate=0.1, initial_accumulator_value=1e-6, beta=1.0),
    entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=0.1, beta=0.5,
                        l1_regularization=0.01, l2_regularization=0.1),
    entry.AdamOptimizer(learning_rate=0.01),
    entry.AdamOptimizer(learning_rate=0.01, beta1=0.5, weight_decay_factor=0.1, epsilon=1e-3),
    entry.MomentumOptimizer(learning_rate=0.1),
    entry.MomentumOptimizer(learning_rate=0.1, use_nesterov=True),
    entry.MomentumOptimizer(learning_rate=0.05, weight_decay_factor=0.1, use_nesterov=True, momentum=0.5),
    entry.MomentumOptimizer(learning_rate=0.05, weight_decay_factor=0.1, momentum=0.0),
    entry.RmspropOptimizer(learning_rate=0.1),
    entry.RmspropOptimizer(learning_rate=0.05, weight_decay_factor=0.1, momentum=0.5),
]


def _blocks(u, d):
    return hnp.arrays(np.float32, (u, d), elements=st.floats(-2, 2, width=32))


@st.composite
def _runs(draw):
    u, d = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    steps = draw(st.integers(1, 4))
    w = draw(_blocks(u, d))
    grads = [draw(_blocks(u, d)) for _ in range(steps)]
    lrs = [draw(st.sampled_from([0.01, 0.1, 0.5])) for _ in range(steps)]
    return w, grads, lrs


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:60])
@settings(max_examples=30, deadline=None)
@given(run=_runs())
def test_update_matches_numpy(opt, run):
    w0, grads, lrs = run
    rule = slice_optimizer_for(opt)
    w = torch.from_numpy(w0.copy())
    state = {n: torch.full_like(w, rule.initial_state(n)) for n in rule.state_names}
    ref_w, ref_st = w0.astype(np.float64), _np_state(opt, w0.shape)
    for g, lr in zip(grads, lrs, strict=True):
        w = rule.update(w, torch.from_numpy(g), state, lr)
        ref_w = _np_step(opt, lr, ref_w, g.astype(np.float64), ref_st)
    near = np.zeros(w0.shape, dtype=bool)
    if isinstance(opt, entry.FtrlOptimizer):  # |z| at the l1 threshold: float32 may fall either side
        near = np.abs(np.abs(ref_st["z"]) - (opt.l1_regularization or 0.0)) < 1e-4
    torch.testing.assert_close(w[~torch.from_numpy(near)], torch.from_numpy(ref_w[~near]).float(),
                               rtol=1e-4, atol=1e-5)
    for n, t in state.items():
        if not isinstance(opt, entry.FtrlOptimizer):
            torch.testing.assert_close(t, torch.from_numpy(ref_st[n]).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:60])
def test_update_leaves_inputs_alone(opt):
    rule = slice_optimizer_for(opt)
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    w0, g0 = w.clone(), g.clone()
    state = {n: torch.full_like(w, rule.initial_state(n)) for n in rule.state_names}
    rule.update(w, g, state, 0.1)
    assert torch.equal(w, w0) and torch.equal(g, g0)


def test_momentum_by_hand():
    # momentum 0.5, lr 0.1, g = 1 from w = 0.
    plain = slice_optimizer_for(entry.MomentumOptimizer(learning_rate=0.1, momentum=0.5))
    n, w, g = {"n": torch.zeros(1)}, torch.zeros(1), torch.ones(1)
    w = plain.update(w, g, n, 0.1)  # n = -0.1
    torch.testing.assert_close((w, n["n"]), (torch.tensor([-0.1]), torch.tensor([-0.1])))
    w = plain.update(w, g, n, 0.1)  # n = 0.5 * -0.1 - 0.1
    torch.testing.assert_close((w, n["n"]), (torch.tensor([-0.25]), torch.tensor([-0.15])))
    nesterov = slice_optimizer_for(entry.MomentumOptimizer(learning_rate=0.1, momentum=0.5, use_nesterov=True))
    n, w = {"n": torch.zeros(1)}, torch.zeros(1)
    w = nesterov.update(w, g, n, 0.1)  # w += -0.5 * 0 + 1.5 * -0.1
    torch.testing.assert_close(w, torch.tensor([-0.15]))
    w = nesterov.update(w, g, n, 0.1)  # w += -0.5 * -0.1 + 1.5 * -0.15
    torch.testing.assert_close(w, torch.tensor([-0.325]))


def test_rmsprop_by_hand():
    # momentum 0.75, lr 0.1, g = 2 from w = 0: n = 0.25 * 4 = 1, w = -0.1 * 2 / (1 + 1).
    rule = slice_optimizer_for(entry.RmspropOptimizer(learning_rate=0.1, momentum=0.75))
    n, w, g = {"n": torch.zeros(1)}, torch.zeros(1), torch.full((1,), 2.0)
    w = rule.update(w, g, n, 0.1)
    torch.testing.assert_close((w, n["n"]), (torch.tensor([-0.1]), torch.tensor([1.0])))
    w = rule.update(w, g, n, 0.1)  # n = 0.75 + 1
    torch.testing.assert_close(w, torch.tensor([-0.1 - 0.2 / (1.75**0.5 + 1)]))


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:60])
def test_update_on_device_matches_cpu(opt, device):
    rule = slice_optimizer_for(opt)
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(64, 5, generator=gen), torch.randn(64, 5, generator=gen)
    out = {}
    for dev in ("cpu", device):
        state = {n: torch.full((64, 5), rule.initial_state(n), device=dev) for n in rule.state_names}
        out[dev] = rule.update(w.to(dev), g.to(dev), state, 0.1).cpu()
    torch.testing.assert_close(out[device], out["cpu"])


# -- configs ----------------------------------------------------------------------------


def test_new_entry_configs():
    m = entry.MomentumOptimizer(0.1, 0.01, True, 0.8)  # Monolith's positional order
    assert (m.learning_rate, m.weight_decay_factor, m.use_nesterov, m.momentum, m.warmup_steps) == (0.1, 0.01, True, 0.8, 0)
    r = entry.RmspropOptimizer(0.1, 0.01, 0.8)
    assert (r.learning_rate, r.weight_decay_factor, r.momentum, r.warmup_steps) == (0.1, 0.01, 0.8, 0)
    assert entry.RmspropOptimizer().effective_learning_rate() == entry.DEFAULT_LEARNING_RATE
    assert {"MomentumOptimizer", "RmspropOptimizer"} <= set(entry.__all__)
    for cls in (entry.MomentumOptimizer, entry.RmspropOptimizer):
        with pytest.raises(ValueError, match="Invalid learning_rate"):
            cls(learning_rate=0.0)
        with pytest.raises(ValueError, match="Invalid momentum"):
            cls(momentum=1.0)
        with pytest.raises(ValueError, match="Invalid weight_decay_factor"):
            cls(weight_decay_factor=-1.0)


def test_learning_rate_at_without_warmup_field():
    assert learning_rate_at(entry.RmspropOptimizer(learning_rate=0.3), None, 0) == 0.3
    assert learning_rate_at(entry.MomentumOptimizer(learning_rate=1.0, warmup_steps=4), None, 1) == 0.25


# -- registry ---------------------------------------------------------------------------


def test_every_entry_optimizer_is_registered():
    configs = [getattr(entry, n) for n in entry.__all__]
    configs = [c for c in configs if isinstance(c, type) and issubclass(c, entry.Optimizer) and c is not entry.Optimizer]
    assert len(configs) == 6
    for cls in configs:
        assert isinstance(slice_optimizer_for(cls()), SliceOptimizer)


def test_unknown_config_raises_type_error():
    with pytest.raises(TypeError, match="unsupported optimizer object"):
        slice_optimizer_for(object())

    @dataclass(frozen=True)
    class MyAdagrad(entry.AdagradOptimizer):  # a subclass is not its base's rule
        pass

    with pytest.raises(TypeError, match="unsupported optimizer MyAdagrad"):
        slice_optimizer_for(MyAdagrad())
    with pytest.raises(TypeError, match="unsupported optimizer MyAdagrad"):
        EmbeddingTable().add_feature_slice(
            entry.Segment(2, entry.ZerosInitializer(), MyAdagrad(), entry.Fp32Compressor())
        )


def test_adam_options_not_implemented():
    for opt in (entry.AdamOptimizer(use_nesterov=True), entry.AdamOptimizer(use_beta1_warmup=True)):
        with pytest.raises(ValueError, match="not supported"):
            slice_optimizer_for(opt)


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match="entry.Optimizer subclass"):
        register_slice_optimizer(int)
    with pytest.raises(TypeError, match="subclass SliceOptimizer"):
        register_slice_optimizer(type("Other", (entry.Optimizer,), {}))(object)
    with pytest.raises(ValueError, match="already uses SgdSlice"):
        register_slice_optimizer(entry.SgdOptimizer)(optimizers.AdagradSlice)
    assert type(slice_optimizer_for(entry.SgdOptimizer())) is optimizers.SgdSlice  # unchanged


def test_registering_a_new_optimizer_makes_a_table_accept_it():
    @dataclass(frozen=True)
    class SignSgd(entry.Optimizer):
        learning_rate: float | None = None
        warmup_steps: int = 0

    @register_slice_optimizer(SignSgd)
    class SignSgdSlice(SliceOptimizer):
        state_names = ("steps",)

        def initial_state(self, name):
            return 10.0

        def update(self, w, g, state, lr):
            state["steps"].add_(1.0)
            return w - lr * torch.sign(g)

    table = EmbeddingTable()
    table.add_feature_slice(entry.Segment(2, entry.ZerosInitializer(), SignSgd(0.5), entry.Fp32Compressor()))
    ids = torch.tensor([3, 4, 3])
    table.lookup(ids)
    table.apply_gradients(ids, torch.tensor([[1.0, -2.0], [0.0, 3.0], [1.0, 1.0]]))
    torch.testing.assert_close(table.lookup(torch.tensor([3, 4]), insert=False),
                               torch.tensor([[-0.5, 0.5], [0.0, -0.5]]))
    state = table.state_dict()
    assert state["slices"] == [[2, "SignSgd"]]
    torch.testing.assert_close(state["state.0.steps"], torch.full((2, 2), 11.0))


# -- tables with the new optimizers ------------------------------------------------------------


@pytest.mark.parametrize("opt", [
    entry.MomentumOptimizer(learning_rate=0.1),
    entry.MomentumOptimizer(learning_rate=0.1, use_nesterov=True, weight_decay_factor=0.01),
    entry.RmspropOptimizer(learning_rate=0.1),
], ids=repr)
def test_table_trains_and_round_trips(opt):
    segs = [
        entry.Segment(1, entry.ZerosInitializer(), entry.SgdOptimizer(learning_rate=0.1), entry.Fp32Compressor()),
        entry.Segment(3, entry.RandomUniformInitializer(), opt, entry.Fp32Compressor()),
    ]

    def make():
        t = EmbeddingTable(name="t", occurrence_threshold=2)
        for s in segs:
            t.add_feature_slice(s)
        return t

    a = make()
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(20, 4, generator=gen)
    ids = torch.randint(0, 20, (200,), generator=gen)

    def train(t, steps):
        losses = []
        for _ in range(steps):
            w = t.lookup(ids)
            err = w - target[ids]
            losses.append(float((err * err).sum()))
            t.apply_gradients(ids, 0.2 * err)  # each id occurs ~10 times: ~2 * err per id
        return losses

    losses = train(a, 30)
    assert losses[-1] < 0.1 * losses[0]
    state = a.state_dict()
    assert list(state) == ["slices", "keys", "values", "times", "counts", "cand_keys", "cand_counts", "cand_times",
                           "state.1.n"]
    assert state["slices"] == [[1, "SgdOptimizer"], [3, type(opt).__name__]]
    assert bool((state["state.1.n"] != 0).any())
    b = make()
    b.load_state_dict(state)
    q = torch.arange(25)
    assert torch.equal(a.lookup(q, insert=False), b.lookup(q, insert=False))
    train(a, 3)
    train(b, 3)
    assert torch.equal(a.lookup(q, insert=False), b.lookup(q, insert=False))
    torch.testing.assert_close(a.state_dict()["state.1.n"], b.state_dict()["state.1.n"], rtol=0, atol=0)


def test_rmsprop_follows_learning_rate_fn():
    opt = entry.RmspropOptimizer(learning_rate=1.0, momentum=0.0)
    t = EmbeddingTable()
    t.add_feature_slice(entry.Segment(1, entry.ZerosInitializer(), opt, entry.Fp32Compressor()),
                        learning_rate_fn=lambda step: 0.5 * step)
    ids = torch.tensor([1])
    t.lookup(ids)
    t.apply_gradients(ids, torch.ones(1, 1), global_step=2)  # lr 1: n = 1, w = -1 / (1 + 1)
    torch.testing.assert_close(t.lookup(ids, insert=False), torch.tensor([[-0.5]]))


def test_adagrad_with_a_zero_accumulator_and_a_zero_gradient_column_stays_finite():
    # Monolith's Adagrad has no epsilon; a column that has seen only zero gradients
    # from a zero accumulator would compute 0 / sqrt(0). It must stay as it is.
    table = EmbeddingTable(name="t")
    table.add_feature_slice(entry.Segment(3, entry.ZerosInitializer(), entry.AdagradOptimizer(learning_rate=0.1), entry.Fp32Compressor()))
    ids = torch.tensor([5, 6])
    table.lookup_rows(ids)
    table.apply_gradients(ids, torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]]))
    values = table.lookup(ids, insert=False)
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values, torch.tensor([[-0.1, 0.0, 0.1], [0.0, 0.0, 0.0]]))
