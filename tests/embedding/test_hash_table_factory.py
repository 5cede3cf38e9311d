"""HashTableFeatureFactory: the seed's step scenarios on real tables, lookups, errors, layouts."""

from __future__ import annotations

import pytest
import torch

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig, slice_key
from monolith_torch.embedding.seq_mask import gen_seq_mask
from monolith_torch.step.async_functions import AsyncFunctionMgr
from monolith_torch.step.context import NativeContext

feature_utils = pytest.importorskip("monolith_torch.step.api")


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


# -- lookups and combiners ------------------------------------------------------


def test_lookup_shapes_and_combiners():
    factory = HashTableFeatureFactory(seed=1)
    slot = _sgd_slot(factory, has_bias=True)
    vec = slot.add_feature_slice(2)
    fsum = FeatureColumn(slot, "sum")
    fmean = FeatureColumn(slot, "mean", FeatureColumn.reduce_mean())
    fseq = FeatureColumn(slot, "seq", FeatureColumn.first_n(3))
    ids = _ids([1, 2, 3, 4, 5], [0, 2, 2, 5])
    out = factory.lookup({"sum": ids, "mean": ids, "seq": ids})
    assert slice_key("sum", 1, 3) in out
    assert fsum.embedding_lookup(vec).shape == (3, 2)
    assert fsum.get_bias().shape == (3, 1)
    # ConstantsInitializer(1.0) everywhere: sums count ids, means are 1 (0 for the empty row).
    torch.testing.assert_close(fsum.embedding_lookup(vec)[:, 0], torch.tensor([2.0, 0.0, 3.0]))
    torch.testing.assert_close(fmean.embedding_lookup(vec)[:, 0], torch.tensor([1.0, 0.0, 1.0]))
    seq = fseq.embedding_lookup(vec)
    assert seq.shape == (3, 3, 2)
    mask = gen_seq_mask(ids, 3)
    torch.testing.assert_close(seq[..., 0], mask.float())
    fseq.set_size_tensor(ids.row_lengths())
    assert torch.equal(fseq.get_size_tensor(), mask.int())
    leaf = fsum.get_all_embeddings_concat()
    assert leaf.shape == (5, 3) and leaf.requires_grad and leaf.is_leaf
    # Nested jagged tensors work too.
    nested = torch.nested.nested_tensor_from_jagged(ids.values, ids.row_splits)
    factory.lookup({"sum": nested, "mean": ids, "seq": ids})
    assert fsum.embedding_lookup(vec).shape == (3, 2)


def test_duplicate_ids_sum_and_scale():
    factory = HashTableFeatureFactory()
    slot = _sgd_slot(factory)
    vec = slot.add_feature_slice(2)
    fc = FeatureColumn(slot, "f")
    factory.lookup({"f": _ids([7, 7, 8], [0, 2, 3])})
    loss = fc.embedding_lookup(vec).sum()
    leaf = fc.get_all_embeddings_concat()
    (grad,) = torch.autograd.grad(loss, [leaf])
    factory.apply_gradients([(grad, leaf)], scale=0.25)
    rows = factory.tables["s"].lookup(torch.tensor([7, 8]), insert=False)
    torch.testing.assert_close(rows, torch.tensor([[0.5, 0.5], [0.75, 0.75]]))
    assert factory.global_step == 1


def test_errors_before_any_write():
    factory = HashTableFeatureFactory()
    slot = _sgd_slot(factory)
    vec = slot.add_feature_slice(2)
    fc = FeatureColumn(slot, "f")
    with pytest.raises(ValueError, match="already exists"):
        _sgd_slot(factory)
    factory.lookup({"f": _ids([1, 2], [0, 1, 2])})
    leaf = fc.get_all_embeddings_concat()
    before = factory.state_dict()
    bad_features = [
        ({"f": _ids([1], [0, 1]), "nope": _ids([1], [0, 1])}, ValueError, "unknown feature"),
        ({}, ValueError, "missing"),
        ({"f": RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, -1, 2]))}, ValueError, "non-decreasing"),
        ({"f": RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2, 1]))}, ValueError, "non-decreasing"),
        ({"f": RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 1]))}, ValueError, "len\\(values\\)"),
        ({"f": RaggedTensor(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))}, TypeError, "integer"),
        ({"f": [1, 2]}, TypeError, "RaggedTensor"),
    ]
    for features, exc, match in bad_features:
        with pytest.raises(exc, match=match):
            factory.lookup(features)
    with pytest.raises(ValueError, match="does not match"):
        factory.apply_gradients([(torch.ones(3, 2), leaf)])
    with pytest.raises(ValueError, match="not an embedding tensor"):
        factory.apply_gradients([(torch.ones(2, 2), leaf), (torch.ones(2, 2), torch.zeros(2, 2))])
    with pytest.raises(TypeError, match="floating"):
        factory.apply_gradients([(torch.ones(2, 2, dtype=torch.int64), leaf)])
    after = factory.state_dict()
    for k in ("keys", "values", "counts", "times"):
        assert torch.equal(before["tables"]["s"][k], after["tables"]["s"][k]), k
    assert factory.global_step == 0
    with pytest.raises(ValueError, match="occurrence_threshold"):
        FeatureSlotConfig(name="x", occurrence_threshold=-1)
    del vec


def test_lookup_without_training_reads_zeros():
    factory = HashTableFeatureFactory()
    slot = _sgd_slot(factory)
    vec = slot.add_feature_slice(2)
    fc = FeatureColumn(slot, "f")
    factory.lookup({"f": _ids([1, 2], [0, 2])}, training=False)
    assert torch.equal(fc.embedding_lookup(vec), torch.zeros(1, 2))
    assert len(factory.tables["s"]) == 0


# -- fused layout -----------------------------------------------------------------


def _layout_model(factory_seed=0):
    factory = HashTableFeatureFactory(seed=factory_seed)
    cols = []
    for i, name in enumerate(("a", "b")):
        slot = factory.create_feature_slot(
            FeatureSlotConfig(name=name, slot_id=i, has_bias=True,
                              default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=1.0))
        )
        vec = slot.add_feature_slice(3)
        cols.append((FeatureColumn(slot, f"f{name}"), slot.get_bias_slice(), vec))
    return factory, cols


def _layout_batches(steps=4):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 3, (8,), generator=gen)
        splits = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        ids = RaggedTensor.from_row_splits(torch.randint(0, 10, (int(splits[-1]),), generator=gen), splits)
        out.append(({"fa": ids, "fb": ids}, torch.rand(8, generator=gen)))
    return out


def test_fused_layout_matches_per_feature_path():
    torch.manual_seed(0)
    w = torch.randn(6, 1)
    # Fused: the layout step function over flattened layouts.
    factory, cols = _layout_model()
    layouts = {"bias": [(fc, b) for fc, b, _ in cols], "vec": [(fc, v) for fc, _, v in cols]}
    dense = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([dense], lr=0.1)
    step = torch.zeros((), dtype=torch.int64)
    lf = None
    ctx = None
    for features, y in _layout_batches():
        lf = factory.lookup_layout(features, layouts, layout_factory=lf)
        ctx = ctx or NativeContext(layout_factory=lf)
        assert lf.get_layout("vec").shape == (8, 6) and lf.get_layout("bias").shape == (8, 2)
        pred = (lf.get_layout("vec") @ dense).squeeze(1) + lf.get_layout("bias").sum(1)
        loss = (pred - y).square().mean()
        feature_utils.apply_gradients(ctx, opt, loss, global_step=step)
    assert int(step) == 4
    # Per feature: the same model through the column step function.
    factory2, cols2 = _layout_model()
    dense2 = torch.nn.Parameter(w.clone())
    opt2 = torch.optim.SGD([dense2], lr=0.1)
    ctx2 = NativeContext(feature_factory=factory2)
    for features, y in _layout_batches():
        factory2.lookup(features)
        vec = torch.cat([fc.embedding_lookup(v) for fc, _, v in cols2], 1)
        bias = torch.cat([fc.embedding_lookup(b) for fc, b, _ in cols2], 1)
        loss = ((vec @ dense2).squeeze(1) + bias.sum(1) - y).square().mean()
        feature_utils.apply_gradients_with_var_optimizer(ctx2, [c[0] for c in cols2], opt2, loss)
    # Fused, through the column step function with is_fused_layout=True.
    factory3, cols3 = _layout_model()
    layouts3 = {"bias": [(fc, b) for fc, b, _ in cols3], "vec": [(fc, v) for fc, _, v in cols3]}
    dense3 = torch.nn.Parameter(w.clone())
    opt3 = torch.optim.SGD([dense3], lr=0.1)
    lf3 = None
    for features, y in _layout_batches():
        lf3 = factory3.lookup_layout(features, layouts3, layout_factory=lf3)
        pred = (lf3.get_layout("vec") @ dense3).squeeze(1) + lf3.get_layout("bias").sum(1)
        loss = (pred - y).square().mean()
        feature_utils.apply_gradients_with_var_optimizer(
            NativeContext(layout_factory=lf3), [], opt3, loss, is_fused_layout=True
        )
    q = torch.arange(10)
    for name in ("a", "b"):
        for other in (factory2, factory3):
            torch.testing.assert_close(factory.tables[name].lookup(q, insert=False),
                                       other.tables[name].lookup(q, insert=False))
    torch.testing.assert_close(dense, dense2)
    torch.testing.assert_close(dense, dense3)
    with pytest.raises(RuntimeError, match="applied already"):
        lf.apply_gradients([(torch.zeros(8, 2), lf.get_layout("bias"))])


# -- learning -----------------------------------------------------------------------


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Rank-based AUC (Mann-Whitney U); ties get average ranks."""
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    if uniq.numel() < scores.numel():  # average the ranks of tied scores
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert _auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert _auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert _auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5


def _ctr_data(n, gen, truth):
    users = torch.randint(0, 300, (n,), generator=gen)
    items = torch.randint(0, 300, (n,), generator=gen)
    ctx_len = torch.randint(1, 4, (n,), generator=gen)
    ctx_ids = torch.randint(0, 50, (int(ctx_len.sum()),), generator=gen)
    hist_len = torch.randint(0, 8, (n,), generator=gen)
    hist_ids = torch.randint(0, 300, (int(hist_len.sum()),), generator=gen)
    ctx_r = RaggedTensor.from_row_lengths(ctx_ids + 1_000_000, ctx_len)
    hist_r = RaggedTensor.from_row_lengths(hist_ids, hist_len)
    # Labels depend on the ids: per-id scores, the mean over ctx ids, and the first 5 history items.
    ctx_score = torch.zeros(n).index_add_(0, ctx_r.value_rowids(), truth["ctx"][ctx_ids]) / ctx_len
    pos = torch.arange(hist_ids.numel()) - hist_r.row_splits[:-1][hist_r.value_rowids()]
    first5 = (pos < 5).float()
    hist_score = torch.zeros(n).index_add_(0, hist_r.value_rowids(), truth["item"][hist_ids] * first5)
    hist_score = hist_score / hist_len.clamp(1, 5)
    score = truth["user"][users] * truth["item2"][items] + truth["item"][items] + ctx_score + hist_score
    labels = torch.bernoulli(torch.sigmoid(2.5 * score), generator=gen)
    feats = {
        "user": RaggedTensor.from_row_lengths(users, torch.ones(n, dtype=torch.int64)),
        "item": RaggedTensor.from_row_lengths(items, torch.ones(n, dtype=torch.int64)),
        "ctx": ctx_r,
        "hist": hist_r,
    }
    return feats, labels


def _slice_batch(feats, labels, start, end):
    out = {}
    end = min(end, labels.numel())
    for name, r in feats.items():
        lo, hi = int(r.row_splits[start]), int(r.row_splits[end])
        out[name] = RaggedTensor.from_row_splits(r.values[lo:hi], r.row_splits[start:end + 1] - lo)
    return out, labels[start:end]


@pytest.mark.timeout(120)
def test_ctr_model_learns():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    truth = {k: torch.randn(300, generator=gen) for k in ("user", "item", "item2")}
    truth["ctx"] = torch.randn(50, generator=gen)
    train_x, train_y = _ctr_data(40_000, gen, truth)
    test_x, test_y = _ctr_data(5_000, gen, truth)

    factory = HashTableFeatureFactory(seed=0)
    dim, seq_len = 8, 5
    cols, vecs = {}, {}
    opts = dict(
        bias_optimizer=entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=1e-6, beta=1.0),
        default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1e-3),
        default_vec_initializer=entry.RandomUniformInitializer(-0.05, 0.05),
    )
    for i, name in enumerate(("user", "item", "ctx")):
        slot = factory.create_feature_slot(FeatureSlotConfig(name=name, slot_id=i, has_bias=True, **opts))
        vecs[name] = slot.add_feature_slice(dim)
        cols[name] = FeatureColumn(slot, name, FeatureColumn.reduce_mean())
    hist_slot = factory.create_feature_slot(FeatureSlotConfig(name="hist", slot_id=3, **opts))
    vecs["hist"] = hist_slot.add_feature_slice(dim)
    cols["hist"] = FeatureColumn(hist_slot, "hist", FeatureColumn.first_n(seq_len))
    mlp = torch.nn.Sequential(torch.nn.Linear(4 * dim + dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=0.003)
    ctx = NativeContext(feature_factory=factory)
    step = torch.zeros((), dtype=torch.int64)

    def forward(feats):
        factory.lookup(feats, training=mlp.training)
        parts = [cols[n].embedding_lookup(vecs[n]) for n in ("user", "item", "ctx")]
        mask = gen_seq_mask(feats["hist"], seq_len).float()
        seq = cols["hist"].embedding_lookup(vecs["hist"])
        parts.append((seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
        parts.append(parts[0] * parts[1])  # user x item interaction
        bias = sum(cols[n].get_bias() for n in ("user", "item", "ctx"))
        return (mlp(torch.cat(parts, 1)) + bias).squeeze(1)

    batch = 256
    for _ in range(1):
        for start in range(0, 40_000, batch):
            feats, y = _slice_batch(train_x, train_y, start, start + batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(feats), y)
            feature_utils.apply_gradients_with_var_optimizer(
                ctx, list(cols.values()), opt, loss, clip_norm=10.0, global_step=step
            )
    mlp.eval()
    with torch.no_grad():
        scores = forward(test_x)
    auc = _auc(scores, test_y)
    print(f"held-out AUC {auc:.3f}")
    assert auc >= 0.75, auc


def test_expiry_through_factory_and_checkpoint(tmp_path):
    from monolith_torch.checkpoint import save_checkpoint

    clock = [1_000_000.0]
    factory = HashTableFeatureFactory(time_fn=lambda: clock[0])
    slot = _sgd_slot(factory, expire_time=2)
    vec = slot.add_feature_slice(2)
    fc = FeatureColumn(slot, "f")
    factory.lookup({"f": _ids([1, 2], [0, 2])})
    clock[0] += 86400
    factory.lookup({"f": _ids([2], [0, 1])})
    loss = fc.embedding_lookup(vec).sum()
    leaf = fc.get_all_embeddings_concat()
    factory.apply_gradients([(torch.autograd.grad(loss, [leaf])[0], leaf)])  # id 2 updated at day 1
    clock[0] += 1.5 * 86400  # id 1: 2.5 days old, id 2: 1.5 days
    assert factory.evict_expired() == {"s": 1}
    clock[0] += 86400  # id 2: 2.5 days old; saving evicts it
    save_checkpoint(tmp_path / "c", NativeContext(feature_factory=factory))
    assert len(factory.tables["s"]) == 0
