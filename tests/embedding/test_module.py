"""HashEmbeddingBagCollection: the contract, state_dict, eval, inputs, and the two ways to train it."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from monolith_torch import (
    EmbeddingFeatureConfig,
    EmbeddingTableConfig,
    FeatureColumn,
    FeatureSlotConfig,
    FirstN,
    GradClipType,
    HashEmbeddingBagCollection,
    HashTableFeatureFactory,
    NativeContext,
    RaggedTensor,
    ReduceMean,
    apply_gradients_with_var_optimizer,
    entry,
)

FUSED = [pytest.param(True, id="fused"), pytest.param(False, id="unfused")]


def _ragged(values, splits) -> RaggedTensor:
    return RaggedTensor.from_row_splits(torch.tensor(values, dtype=torch.int64), torch.tensor(splits))


def make_module(fused: bool = True, seed: int = 0, vec_opt=None, bias_opt=None, threshold: int = 0):
    user = FeatureSlotConfig(name="user", has_bias=True, occurrence_threshold=threshold,
                             **({"bias_optimizer": bias_opt} if bias_opt else {}),
                             **({"default_vec_optimizer": vec_opt} if vec_opt else {}))
    item = FeatureSlotConfig(name="item", **({"default_vec_optimizer": vec_opt} if vec_opt else {}))
    tables = [EmbeddingTableConfig(user, (4,)), EmbeddingTableConfig(item, (3, 2))]
    features = [
        EmbeddingFeatureConfig("user_id", "user"),
        EmbeddingFeatureConfig("user_hist", "user", FirstN(3)),
        EmbeddingFeatureConfig("item_id", "item", ReduceMean()),
    ]
    factory = HashTableFeatureFactory(seed=seed, time_fn=lambda: 1_700_000_000.0)
    return HashEmbeddingBagCollection(tables, features, factory=factory, fused=fused)


def batch(step: int = 0) -> dict:
    return {
        "user_id": torch.tensor([11, 42, 11]) + step,
        "user_hist": _ragged([5, 6, 7, 8, 5, 11], [0, 4, 4, 6]),
        "item_id": _ragged([1, 2, 2, 3, 9 + step], [0, 2, 2, 5]),
    }


class Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5 + 15 + 5, 1)

    def forward(self, emb):
        x = torch.cat([emb["user_id"], emb["user_hist"].flatten(1), emb["item_id"]], dim=1)
        return self.lin(x).squeeze(-1)


def _loss(tower, emb):
    return torch.nn.functional.binary_cross_entropy_with_logits(tower(emb), torch.tensor([1.0, 0.0, 1.0]))


def _table_states(module):
    return {name: t.state_dict() for name, t in module.tables.items()}


def _assert_states_equal(a, b, exact: bool = True):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k, v in a[name].items():
            if isinstance(v, torch.Tensor):
                if exact or not v.is_floating_point():
                    assert torch.equal(v, b[name][k]), (name, k)
                else:
                    torch.testing.assert_close(v, b[name][k], rtol=1e-6, atol=1e-7)
            else:
                assert v == b[name][k]


# -- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
def test_forward_shapes_and_slice_ranges(fused):
    m = make_module(fused)
    out = m(batch())
    assert set(out) == {"user_id", "user_hist", "item_id"}
    assert out["user_id"].shape == (3, 5)
    assert out["user_hist"].shape == (3, 3, 5)
    assert out["item_id"].shape == (3, 5)
    assert m.slice_ranges("user_id") == [(0, 1), (1, 5)]
    assert m.slice_ranges("item_id") == [(0, 3), (3, 5)]
    assert len(m.columns) == 3 and all(isinstance(c, FeatureColumn) for c in m.columns)
    assert isinstance(m.factory, HashTableFeatureFactory)
    # Bias column is FTRL over zeros: the bias part of a fresh row is 0.
    assert torch.equal(out["user_id"][:, 0], torch.zeros(3))
    # Empty rows give zeros (mean) and zero padding (FirstN).
    assert torch.equal(out["item_id"][1], torch.zeros(5))
    assert torch.equal(out["user_hist"][1], torch.zeros(3, 5))
    assert torch.equal(out["user_hist"][2, 2], torch.zeros(5))


def test_forward_matches_monolith_columns():
    """The module's output is what Monolith's factory + FeatureColumn path gives."""
    m = make_module(True)
    out = m(batch())
    factory = HashTableFeatureFactory(seed=0)
    user = factory.create_feature_slot(FeatureSlotConfig(name="user", has_bias=True))
    uvec = user.add_feature_slice(4)
    item = factory.create_feature_slot(FeatureSlotConfig(name="item"))
    i3, i2 = item.add_feature_slice(3), item.add_feature_slice(2)
    fu = FeatureColumn(user, "user_id")
    fh = FeatureColumn(user, "user_hist", FirstN(3))
    fi = FeatureColumn(item, "item_id", ReduceMean())
    b = batch()
    b["user_id"] = RaggedTensor.from_row_splits(b["user_id"], torch.arange(4))
    factory.lookup(b)
    torch.testing.assert_close(out["user_id"], torch.cat([fu.get_bias(), fu.embedding_lookup(uvec)], 1))
    torch.testing.assert_close(out["user_hist"], torch.cat([fh.get_bias(), fh.embedding_lookup(uvec)], -1))
    torch.testing.assert_close(out["item_id"], torch.cat([fi.embedding_lookup(i3), fi.embedding_lookup(i2)], 1))


@pytest.mark.parametrize("fused", FUSED)
def test_inputs_plain_ragged_and_nested_agree(fused):
    m = make_module(fused)
    b = batch()
    ref = m(b)
    nested = dict(b)
    nested["user_hist"] = torch.nested.nested_tensor_from_jagged(b["user_hist"].values, b["user_hist"].row_splits)
    nested["user_id"] = RaggedTensor.from_row_splits(b["user_id"], torch.arange(4))
    nested["item_id"] = torch.nested.nested_tensor_from_jagged(b["item_id"].values, b["item_id"].row_splits)
    out = m(nested)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


@pytest.mark.parametrize("fused", FUSED)
def test_missing_unknown_and_bad_features_change_nothing(fused):
    m = make_module(fused)
    b = batch()
    with pytest.raises(ValueError, match="user_hist"):
        m({k: v for k, v in b.items() if k != "user_hist"})
    with pytest.raises(ValueError, match="bogus"):
        m(b | {"bogus": torch.tensor([1])})
    with pytest.raises(ValueError, match="1-D"):
        m(b | {"user_id": torch.ones(3, 2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="integer"):
        m(b | {"user_id": torch.ones(3)})
    with pytest.raises(TypeError, match="mapping"):
        m([1, 2])
    assert all(len(t) == 0 for t in m.tables.values())


def test_bad_configs():
    slot = FeatureSlotConfig(name="t")
    with pytest.raises(ValueError, match="vec_dims"):
        EmbeddingTableConfig(slot, (0,))
    with pytest.raises(TypeError, match="FeatureSlotConfig"):
        EmbeddingTableConfig("t")
    with pytest.raises(ValueError, match="unknown table"):
        HashEmbeddingBagCollection([EmbeddingTableConfig(slot)], [EmbeddingFeatureConfig("f", "nope")])
    with pytest.raises(ValueError, match="duplicate feature"):
        HashEmbeddingBagCollection([EmbeddingTableConfig(slot)],
                                   [EmbeddingFeatureConfig("f", "t"), EmbeddingFeatureConfig("f", "t")])
    assert EmbeddingTableConfig(slot, [2, 3]).vec_dims == (2, 3)


@pytest.mark.parametrize("fused", FUSED)
def test_eval_never_grows_tables(fused):
    m = make_module(fused)
    m.eval()
    out = m(batch())
    assert all(len(t) == 0 for t in m.tables.values())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.values())
    m.train()
    m(batch())
    sizes = {n: len(t) for n, t in m.tables.items()}
    assert sizes == {"user": 6, "item": 4}
    m.eval()
    m(batch(step=100))
    assert {n: len(t) for n, t in m.tables.items()} == sizes


# -- state_dict ----------------------------------------------------------------------------------


def _train_torch_way(m, tower, opt, steps, start=0):
    for step in range(start, start + steps):
        loss = _loss(tower, m(batch(step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.sparse_step()


@pytest.mark.parametrize("fused", FUSED)
def test_state_dict_round_trips_through_torch_save(fused):
    vec = entry.AdamOptimizer(learning_rate=0.05)
    m, tower = make_module(fused, vec_opt=vec), Tower()
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    _train_torch_way(m, tower, opt, 3)
    sd = m.state_dict()
    assert "tables.user.values" in sd and "tables.user.state.1.m" in sd and "tables.item.state.0.v" in sd
    assert int(sd["global_step"]) == 3
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = make_module(fused, vec_opt=vec)
    m2.load_state_dict(torch.load(buf))
    _assert_states_equal(_table_states(m), _table_states(m2))
    assert int(m2.global_step) == 3
    # Both continue identically: values, optimizer state and step count came back.
    tower2 = Tower()
    tower2.load_state_dict(tower.state_dict())
    opt2 = torch.optim.SGD(tower2.parameters(), lr=0.1)
    _train_torch_way(m, tower, opt, 2, start=3)
    _train_torch_way(m2, tower2, opt2, 2, start=3)
    _assert_states_equal(_table_states(m), _table_states(m2))


def test_load_state_dict_validates_before_changing():
    m = make_module()
    m(batch())
    before = _table_states(m)
    bad = m.state_dict()
    bad["tables.item.values"] = bad["tables.item.values"][:, :2]
    with pytest.raises(RuntimeError, match="values"):
        make_module().load_state_dict(bad)
    m2 = make_module()
    m2(batch())
    with pytest.raises(RuntimeError, match="Unexpected"):
        m2.load_state_dict(m.state_dict() | {"tables.nope.values": torch.zeros(1)})
    _assert_states_equal(before, _table_states(m))


# -- the two ways to train -------------------------------------------------------------------------


OPTIMIZERS = [
    entry.SgdOptimizer(learning_rate=0.1),
    entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.1, weight_decay_factor=0.01),
    entry.FtrlOptimizer(learning_rate=0.1, initial_accumulator_value=0.1, beta=1.0, l1_regularization=0.001,
                        l2_regularization=0.01),
    entry.AdamOptimizer(learning_rate=0.05, weight_decay_factor=0.01),
    entry.MomentumOptimizer(learning_rate=0.1, use_nesterov=True, weight_decay_factor=0.01),
    entry.RmspropOptimizer(learning_rate=0.1, weight_decay_factor=0.01),
]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("vec_opt", OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_monolith_way_equals_torch_way(fused, vec_opt):
    ma, mb = make_module(fused, vec_opt=vec_opt), make_module(fused, vec_opt=vec_opt)
    ta, tb = Tower(), Tower()
    oa = torch.optim.Adam(ta.parameters(), lr=0.01)
    ob = torch.optim.Adam(tb.parameters(), lr=0.01)
    ctx = NativeContext(feature_factory=ma.factory)
    gsa = torch.zeros((), dtype=torch.int64)
    gsb = torch.zeros((), dtype=torch.int64)
    model_a = torch.nn.ModuleDict({"emb": ma, "tower": ta})
    for step in range(4):
        loss_a = _loss(ta, ma(batch(step)))
        result = apply_gradients_with_var_optimizer(ctx, [], oa, loss_a, GradClipType.NoClip,
                                                    global_step=gsa, model=model_a)
        assert result.applied and result.num_sparse >= 2
        loss_b = _loss(tb, mb(batch(step)))
        ob.zero_grad()
        loss_b.backward()
        ob.step()
        mb.sparse_step(global_step=gsb)
        gsb += 1
    assert int(gsa) == int(gsb) == 4
    _assert_states_equal(_table_states(ma), _table_states(mb), exact=not fused)
    for pa, pb in zip(ta.parameters(), tb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_monolith_way_clips_with_the_embedding_gradients():
    m, tower = make_module(), Tower()
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    ctx = NativeContext(feature_factory=m.factory)
    model = torch.nn.ModuleDict({"emb": m, "tower": tower})
    emb = m(batch())
    loss = _loss(tower, emb)
    dense_only = torch.autograd.grad(loss, list(tower.parameters()), retain_graph=True)
    dense_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dense_only]))
    result = apply_gradients_with_var_optimizer(ctx, [], opt, loss, GradClipType.ClipByGlobalNorm, clip_norm=1e-3,
                                                model=model)
    assert float(result.global_norm) > float(dense_norm)


def test_columns_passed_explicitly_are_not_collected_twice():
    m, tower = make_module(), Tower()
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    ctx = NativeContext(feature_factory=m.factory)
    loss = _loss(tower, m(batch()))
    result = apply_gradients_with_var_optimizer(ctx, m.columns, opt, loss, GradClipType.NoClip,
                                                model=torch.nn.ModuleDict({"emb": m, "tower": tower}))
    assert result.applied and result.num_sparse == len(m.embedding_variables())


@pytest.mark.parametrize("fused", FUSED)
def test_gradient_accumulation_equals_one_big_batch(fused):
    ma, mb = make_module(fused), make_module(fused)
    # Grow both tables the same way first, so both see the same rows.
    with torch.no_grad():
        ma(batch(0)), ma(batch(1)), mb(batch(0)), mb(batch(1))
    tower = Tower()
    for p in tower.parameters():
        p.requires_grad_(False)
    (_loss(tower, ma(batch(0))) + _loss(tower, ma(batch(1)))).backward()
    ma.sparse_step()
    big = {k: _cat_batches(batch(0)[k], batch(1)[k]) for k in batch()}
    emb = mb(big)
    logits = tower(emb)
    torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([1.0, 0.0, 1.0] * 2), reduction="none"
    ).view(2, 3).mean(1).sum().backward()
    mb.sparse_step()
    _assert_states_equal(_table_states(ma), _table_states(mb), exact=False)


def _cat_batches(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return RaggedTensor.from_row_splits(torch.cat([a.values, b.values]),
                                        torch.cat([a.row_splits, b.row_splits[1:] + a.row_splits[-1]]))


@pytest.mark.parametrize("fused", FUSED)
def test_grad_scaler_composes(fused):
    ma, mb = make_module(fused), make_module(fused)
    ta, tb = Tower(), Tower()
    oa, ob = torch.optim.SGD(ta.parameters(), lr=0.1), torch.optim.SGD(tb.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sparse = ma.sparse_optimizer()
    for step in range(3):
        loss = _loss(ta, ma(batch(step)))
        scaler.scale(loss).backward()
        scaler.step(oa)
        scaler.step(sparse)
        scaler.update()
        oa.zero_grad()
        _train_torch_way(mb, tb, ob, 1, start=step)
    # Scaling by a power of two is exact: the same updates.
    _assert_states_equal(_table_states(ma), _table_states(mb), exact=False)


@pytest.mark.parametrize("fused", FUSED)
def test_grad_scaler_skips_nonfinite_steps(fused):
    m, tower = make_module(fused), Tower()
    with torch.no_grad():
        m(batch())
    before = _table_states(m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sparse = m.sparse_optimizer()
    loss = _loss(tower, m(batch())) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(sparse)
    sparse.zero_grad()
    after = _table_states(m)
    for name in before:
        assert torch.equal(before[name]["values"], after[name]["values"])


@pytest.mark.parametrize("fused", FUSED)
def test_warns_once_when_a_feature_gets_no_gradient(fused):
    m, tower = make_module(fused), torch.nn.Linear(5, 1)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m(batch())
            tower(out["user_id"]).sum().backward()
            m.sparse_step()
        names = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if _ == 0:
            assert len(names) == 2 and "'item_id'" in names[0] and "'user_hist'" in names[1]
        else:
            assert names == []


@pytest.mark.parametrize("fused", FUSED)
def test_occurrence_filter_reads_zeros_and_drops_gradients(fused):
    m = make_module(fused, threshold=2)
    tower = Tower()
    b = {"user_id": torch.tensor([1, 2, 3]), "user_hist": _ragged([], [0, 0, 0, 0]), "item_id": _ragged([], [0, 0, 0, 0])}
    out = m(b)
    assert torch.equal(out["user_id"], torch.zeros(3, 5))
    _loss(tower, out).backward()
    m.sparse_step()
    assert len(m.tables["user"]) == 0
    out = m(b)  # second sight: admitted, fresh rows
    assert len(m.tables["user"]) == 3
    assert not torch.equal(out["user_id"][:, 1:], torch.zeros(3, 4))


def test_unfused_matches_fused_forward():
    a, b = make_module(True), make_module(False)
    for step in range(3):
        oa, ob = a(batch(step)), b(batch(step))
        for k in oa:
            torch.testing.assert_close(oa[k], ob[k], rtol=1e-6, atol=1e-7)
