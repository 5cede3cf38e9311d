"""The step function: Monolith's seed tests, each clip mode, UE check, async, summaries, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from embedding_setup import make_embedding_setup
from monolith_torch import (
    AsyncFunctionMgr,
    EmbeddingLayoutFactory,
    GradClipType,
    NativeContext,
    apply_gradients,
    apply_gradients_with_var_optimizer,
)


def _scalar_param(value: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(value))


# ---------------------------------------------------------------- Monolith's seed tests


def test_apply_gradients_with_dense_optimizer():
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    global_step = torch.zeros((), dtype=torch.int64)
    opt = torch.optim.SGD([var], lr=1.0)
    loss = s.lookup().sum() + var
    # norm is 2, clipped by 1
    result = apply_gradients_with_var_optimizer(
        s.ctx, [s.fc], opt, loss, clip_norm=1.0, global_step=global_step, grads_and_vars_summary=True
    )
    assert var.item() == 0.5
    assert s.emb_var.tolist() == [[0.5, 0.5, 0.5, 1.0]]
    assert global_step.item() == 1
    assert result.applied and result.global_norm.item() == pytest.approx(2.0)


def test_apply_gradients_with_dense_optimizer_post_push():
    s = make_embedding_setup(is_async=True)
    var = _scalar_param(1.0)
    global_step = torch.zeros((), dtype=torch.int64)
    opt = torch.optim.SGD([var], lr=1.0)
    for _ in range(3):
        loss = s.lookup().sum() + var
        apply_gradients_with_var_optimizer(s.ctx, [s.fc], opt, loss, global_step=global_step)
    # Three steps trigger two dense pushes; embeddings are updated synchronously three times.
    assert var.item() == -1.0
    assert s.emb_var.tolist() == [[-2.0, -2.0, -2.0, 1.0]]
    assert global_step.item() == 2
    assert s.ctx.async_function_mgr.flush() == 2  # the pending dense update and step increment
    assert var.item() == -2.0
    assert global_step.item() == 3


def test_apply_gradients_without_dense_optimizer():
    s = make_embedding_setup()
    global_step = torch.zeros((), dtype=torch.int64)
    opt = torch.optim.SGD([_scalar_param(5.0)], lr=1.0)
    apply_gradients_with_var_optimizer(s.ctx, [s.fc], opt, s.lookup().sum(), global_step=global_step)
    assert s.emb_var.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert global_step.item() == 1
    assert opt.param_groups[0]["params"][0].item() == 5.0  # unused: filtered out, untouched


# ---------------------------------------------------------------- clipping


def _two_param_step(clip_type, clip_norm, **kwargs):
    """Dense grads [3, 4] (norm 5) and embedding grads [1, 1, 1, 0] (norm sqrt 3)."""
    s = make_embedding_setup()
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    loss = (w * torch.tensor([3.0, 4.0])).sum() + s.lookup().sum()
    result = apply_gradients_with_var_optimizer(s.ctx, [s.fc], opt, loss, clip_type, clip_norm, **kwargs)
    dense_grad = -w.detach()
    emb_grad = 1.0 - s.emb_var.detach()[0]
    return result, dense_grad, emb_grad


def test_clip_by_global_norm_scales_both_by_one_norm():
    result, dense, emb = _two_param_step(GradClipType.ClipByGlobalNorm, 1.0)
    norm = math.sqrt(25 + 3)
    assert_close(result.global_norm, torch.tensor(norm))
    assert_close(dense, torch.tensor([3.0, 4.0]) / norm)
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]) / norm)


def test_clip_by_global_norm_with_separate_sparse_bound():
    result, dense, emb = _two_param_step(GradClipType.ClipByGlobalNorm, 1.0, sparse_clip_norm=2.0)
    norm = math.sqrt(28)
    assert_close(dense, torch.tensor([3.0, 4.0]) / norm)
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]) * 2.0 / norm)


@pytest.mark.parametrize("step, factor", [(0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0)])
def test_sparse_norm_warmup(step, factor):
    gs = torch.tensor(step, dtype=torch.int64)
    result, dense, emb = _two_param_step(
        GradClipType.ClipByGlobalNorm, 1.0, sparse_clip_norm=2.0, sparse_norm_warmup_steps=10, global_step=gs
    )
    norm = math.sqrt(28)
    assert_close(dense, torch.tensor([3.0, 4.0]) / norm)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.0]) * min(2.0 * factor / norm, 1.0)
    assert_close(emb, expected)
    assert torch.isfinite(emb).all()  # a zero bound gives zero gradients, never NaN
    assert gs.item() == step + 1


def test_clip_by_dense_and_sparse_uses_separate_norms():
    result, dense, emb = _two_param_step(GradClipType.ClipByDenseAndSparse, 1.0, sparse_clip_norm=1.0)
    assert_close(result.dense_norm, torch.tensor(5.0))
    assert_close(result.sparse_norm, torch.tensor(math.sqrt(3)))
    assert_close(dense, torch.tensor([0.6, 0.8]))
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3))


def test_clip_by_dense_and_sparse_without_sparse_bound_leaves_sparse():
    result, dense, emb = _two_param_step(GradClipType.ClipByDenseAndSparse, 1.0)
    assert result.sparse_norm is None
    assert_close(dense, torch.tensor([0.6, 0.8]))
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_clip_by_value_clamps_each_element():
    _, dense, emb = _two_param_step(GradClipType.ClipByValue, 3.5)
    assert_close(dense, torch.tensor([3.0, 3.5]))
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_clip_by_norm_clips_each_tensor():
    _, dense, emb = _two_param_step(GradClipType.ClipByNorm, 1.0)
    assert_close(dense, torch.tensor([0.6, 0.8]))
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3))


@pytest.mark.parametrize("clip_type, clip_norm", [(GradClipType.NoClip, 1.0), (GradClipType.ClipByGlobalNorm, None)])
def test_no_clip(clip_type, clip_norm):
    result, dense, emb = _two_param_step(clip_type, clip_norm)
    assert_close(dense, torch.tensor([3.0, 4.0]))
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert result.global_norm is None


def test_dense_reduce_mean_divides_before_clipping():
    result, dense, emb = _two_param_step(GradClipType.ClipByNorm, 1.0, dense_reduce_mean=True, batch_size=10)
    assert_close(dense, torch.tensor([0.3, 0.4]))  # norm 0.5: below the bound
    assert_close(emb, torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3))


def test_dense_weight_decay_added_after_clip():
    s = make_embedding_setup()
    w = torch.nn.Parameter(torch.tensor([2.0, -2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    loss = (w * torch.tensor([3.0, 4.0])).sum()
    apply_gradients_with_var_optimizer(
        s.ctx, [], opt, loss, GradClipType.ClipByNorm, 1.0, dense_weight_decay=0.1
    )
    expected = torch.tensor([2.0, -2.0]) - (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([2.0, -2.0]))
    assert_close(w.detach(), expected)


# ---------------------------------------------------------------- UE check, filtering, per-parameter optimizers


@pytest.mark.parametrize("feature_norm, expect_zero", [(0.0, True), (3.0, False)])
def test_ue_gradient_check_gates_named_variables(feature_norm, expect_zero):
    s = make_embedding_setup()
    model = torch.nn.Module()
    model.user_emb_tower = torch.nn.Parameter(torch.ones(2))
    model.uue_bias = torch.nn.Parameter(torch.ones(1))
    model.other = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model.user_emb_tower.sum() + model.uue_bias.sum() + model.other.sum()
    features = {"user_emb": torch.tensor([feature_norm, 0.0])}
    apply_gradients_with_var_optimizer(
        s.ctx, [], opt, loss, GradClipType.NoClip, ue_gradient_check=True, ue_fc_names=["user_emb"],
        ue_euclidean_norm_threshold=1.0, features=features, model=model,
    )
    gated = 1.0 if expect_zero else 0.0
    assert_close(model.user_emb_tower.detach(), torch.full((2,), gated))
    assert_close(model.uue_bias.detach(), torch.full((1,), gated))
    assert_close(model.other.detach(), torch.zeros(1))  # not a UE variable: always updated


def test_ue_gradient_check_on_feature_name():
    s = make_embedding_setup()
    opt = torch.optim.SGD([_scalar_param(0.0)], lr=1.0)
    apply_gradients_with_var_optimizer(
        s.ctx, [s.fc], opt, s.lookup().sum(), GradClipType.NoClip, ue_gradient_check=True,
        ue_fc_names=["feature1"], ue_euclidean_norm_threshold=5.0, features={"feature1": torch.ones(3)},
    )
    assert s.emb_var.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # norm sqrt(3) <= 5: zeroed


def test_per_parameter_optimizer_is_used_instead_of_var_opt():
    s = make_embedding_setup()
    a = _scalar_param(1.0)
    b = _scalar_param(1.0)
    b.optimizer = torch.optim.SGD([b], lr=0.25)
    opt = torch.optim.SGD([a, b], lr=1.0)
    apply_gradients_with_var_optimizer(s.ctx, [], opt, a + b, GradClipType.NoClip)
    assert a.item() == 0.0
    assert b.item() == 0.75  # updated once, by its own optimizer only
    assert a.grad is None and b.grad is None


def test_model_gives_names_and_own_optimizer_parameters():
    writer = _RecordingWriter()
    s = make_embedding_setup(summary_writer=writer)
    model = torch.nn.Linear(2, 1)
    model.bias.optimizer = torch.optim.SGD([model.bias], lr=0.5)
    other = _scalar_param(1.0)
    opt = torch.optim.SGD([other, model.weight], lr=1.0)
    bias_before = model.bias.detach().clone()
    weight_before = model.weight.detach().clone()
    loss = model(torch.ones(1, 2)).sum() + other
    apply_gradients_with_var_optimizer(s.ctx, [], opt, loss, GradClipType.NoClip, model=model,
                                       grads_and_vars_summary=True)
    assert_close(model.weight.detach(), weight_before - 1.0)
    assert_close(model.bias.detach(), bias_before - 0.5)  # found through the model, stepped by its own optimizer
    assert other.item() == 0.0
    tags = {t for t, _ in writer.scalars}
    assert {"gradient_norm/weight", "gradient_norm/bias", "gradient_norm/param_0"} <= tags


def test_model_parameter_without_any_optimizer_is_an_error():
    s = make_embedding_setup()
    model = torch.nn.Linear(2, 1)
    weight_before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="'bias' is neither held"):
        apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([model.weight], lr=1.0),
                                           model(torch.ones(1, 2)).sum(), model=model)
    assert torch.equal(model.weight.detach(), weight_before)


def test_named_parameters_in_optimizer_give_summary_names():
    writer = _RecordingWriter()
    s = make_embedding_setup(summary_writer=writer)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.named_parameters(), lr=1.0)
    apply_gradients_with_var_optimizer(s.ctx, [], opt, model(torch.ones(1, 2)).sum(), grads_and_vars_summary=True)
    assert {"gradient_norm/weight", "gradient_norm/bias"} <= {t for t, _ in writer.scalars}


def test_no_gradients_does_nothing():
    s = make_embedding_setup()
    unused = _scalar_param(1.0)
    gs = torch.zeros((), dtype=torch.int64)
    x = torch.ones((), requires_grad=True)
    result = apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([unused], lr=1.0), x * 2, global_step=gs)
    assert not result.applied and result.reason == "no_gradients"
    assert gs.item() == 0 and unused.item() == 1.0


def test_step_clears_grads_it_owns():
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    var.grad = torch.tensor(100.0)  # stale, from the user's own backward
    apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([var], lr=1.0), var * 1.0, GradClipType.NoClip)
    assert var.item() == 0.0 and var.grad is None


def test_aliased_gradients_are_scaled_once_each():
    # d(loss)/da and d(loss)/db may be views of one buffer inside autograd.
    s = make_embedding_setup()
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([a, b], lr=1.0), a.sum() + b.sum(),
                                       GradClipType.ClipByGlobalNorm, 1.0)
    assert_close(a.detach(), torch.full((3,), -1 / math.sqrt(6)))
    assert_close(b.detach(), torch.full((3,), -1 / math.sqrt(6)))


# ---------------------------------------------------------------- async manager


def test_async_snapshot_of_arguments():
    mgr = AsyncFunctionMgr(is_async=True)
    seen = []
    t = torch.tensor([1.0])
    mgr.add_async_function(lambda x: seen.append(x.clone()), (t,))
    t.add_(5.0)
    assert mgr.num_pending() == 1 and seen == []
    mgr.flush()
    assert seen[0].item() == 1.0 and mgr.num_pending() == 0


def test_async_function_sync_override_runs_now():
    mgr = AsyncFunctionMgr(is_async=True)
    assert mgr.add_async_function(lambda: 7, is_async=False) == 7
    with pytest.raises(TypeError, match="callable"):
        mgr.add_async_function(42)


def test_native_context_rejects_both_factories():
    s = make_embedding_setup()
    with pytest.raises(ValueError, match="cannot both"):
        NativeContext(feature_factory=s.ctx.feature_factory, layout_factory=object())


# ---------------------------------------------------------------- fused layout


class _FakeLayoutTable:
    def __init__(self, tensors):
        self.tensors = tensors
        self.received = []

    def flatten_layout(self, layout_embeddings):
        return [layout_embeddings[k] for k in sorted(layout_embeddings)]

    def apply_layout_gradients(self, grads_and_vars, scale=1):
        self.received.append(([g.clone() for g, _ in grads_and_vars], scale))


def _layout_ctx():
    bias = torch.ones(2, 3, requires_grad=True)
    vec = torch.ones(2, 4, requires_grad=True)
    table = _FakeLayoutTable([bias, vec])
    factory = EmbeddingLayoutFactory(table, {"bias": bias, "vec": vec})
    return NativeContext(layout_factory=factory), table, bias, vec


def test_fused_layout_missing_gradients_become_zeros():
    ctx, table, bias, vec = _layout_ctx()
    w = _scalar_param(1.0)
    loss = vec.sum() * w  # "bias" unused
    apply_gradients_with_var_optimizer(ctx, [], torch.optim.SGD([w], lr=1.0), loss, GradClipType.NoClip,
                                       is_fused_layout=True)
    grads, scale = table.received[0]
    assert_close(grads[0], torch.zeros(2, 3))
    assert_close(grads[1], torch.ones(2, 4))


def test_apply_gradients_fused_variant_clips_and_counts_step():
    ctx, table, bias, vec = _layout_ctx()
    gs = torch.zeros((), dtype=torch.int64)
    loss = (vec * 2).sum()  # norm of [2]*8 = sqrt(32); bias unused: dropped
    result = apply_gradients(ctx, torch.optim.SGD([_scalar_param(0.0)], lr=1.0), loss, clip_norm=1.0, global_step=gs)
    grads, _ = table.received[0]
    assert len(grads) == 1
    assert_close(grads[0], torch.full((2, 4), 2.0 / math.sqrt(32)))
    assert gs.item() == 1 and result.applied


def test_apply_gradients_rejects_unsupported_clip_type():
    ctx, *_ = _layout_ctx()
    with pytest.raises(ValueError, match="not supported yet"):
        apply_gradients(ctx, torch.optim.SGD([_scalar_param(0.0)], lr=1.0), torch.ones((), requires_grad=True),
                        GradClipType.ClipByValue, 1.0)


# ---------------------------------------------------------------- summaries


class _RecordingWriter:
    def __init__(self):
        self.scalars, self.histograms = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value))

    def add_histogram(self, tag, values, step):
        self.histograms.append(tag)


def test_summaries_written_to_a_real_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    s = make_embedding_setup(summary_writer=writer)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gs = torch.tensor(7, dtype=torch.int64)
    loss = model(torch.ones(1, 2)).sum() + s.lookup().sum()
    apply_gradients_with_var_optimizer(s.ctx, [s.fc], opt, loss, clip_norm=10.0, global_step=gs,
                                       grads_and_vars_summary=True, model=model)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    histograms = set(acc.Tags()["histograms"])
    assert {"global_gradient_norm", "trainable_variable_norm/weight", "gradient_norm/bias",
            "dense_grad_total_size", "dense_grad_total_num"} <= scalars
    assert {"variable_gradient", "trainable_variable/weight", "gradient/bias", "dense_grad_sizes",
            "feature1_gradient"} <= histograms
    assert acc.Scalars("dense_grad_total_num")[0].value == 2
    assert acc.Scalars("dense_grad_total_size")[0].value == 3
    assert acc.Scalars("global_gradient_norm")[0].step == 7
    assert acc.Scalars("global_gradient_norm")[0].value == pytest.approx(math.sqrt(1 + 1 + 1 + 3), rel=1e-6)


def test_dense_and_sparse_norm_summaries():
    writer = _RecordingWriter()
    s = make_embedding_setup(summary_writer=writer)
    w = _scalar_param(0.0)
    apply_gradients_with_var_optimizer(s.ctx, [s.fc], torch.optim.SGD([w], lr=1.0), s.lookup().sum() + 3 * w,
                                       GradClipType.ClipByDenseAndSparse, 1.0, sparse_clip_norm=1.0)
    values = dict(writer.scalars)
    assert values["global_gradient_norm/dense"] == pytest.approx(3.0)
    assert values["global_gradient_norm/sparse"] == pytest.approx(math.sqrt(3))


# ---------------------------------------------------------------- bad input: clear errors, nothing changed


def _snapshot(s, var, gs):
    return s.emb_var.detach().clone(), var.detach().clone(), gs.clone()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(clip_norm=0.0), ValueError, "clip_norm"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm"),
        (dict(clip_norm=float("nan")), ValueError, "clip_norm"),
        (dict(clip_type=GradClipType.ClipByDenseAndSparse), ValueError, "clip_norm"),
        (dict(clip_norm=1.0, sparse_clip_norm=0.0), ValueError, "sparse_clip_norm"),
        (dict(clip_norm=1.0, sparse_norm_warmup_steps=-1), ValueError, "sparse_norm_warmup_steps"),
        (dict(dense_reduce_mean=True, batch_size=0), ValueError, "batch_size"),
        (dict(dense_weight_decay=-0.5), ValueError, "dense_weight_decay"),
        (dict(clip_type=17), ValueError, "clip_type"),
        (dict(ue_gradient_check=True, ue_fc_names=["missing"], features={}), KeyError, "missing"),
        (dict(global_step=torch.zeros(1)), TypeError, "global_step"),
    ],
)
def test_bad_arguments_raise_before_anything_changes(kwargs, error, match):
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    gs = kwargs.pop("global_step", torch.zeros((), dtype=torch.int64))
    before = _snapshot(s, var, gs)
    loss = s.lookup().sum() + var
    with pytest.raises(error, match=match):
        apply_gradients_with_var_optimizer(s.ctx, [s.fc], torch.optim.SGD([var], lr=1.0), loss, global_step=gs,
                                           **kwargs)
    for a, b in zip(before, _snapshot(s, var, gs), strict=True):
        assert torch.equal(a, b)
    assert var.grad is None


def test_loss_must_be_a_scalar_that_requires_grad():
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    opt = torch.optim.SGD([var], lr=1.0)
    with pytest.raises(ValueError, match="scalar"):
        apply_gradients_with_var_optimizer(s.ctx, [], opt, var * torch.ones(3))
    with pytest.raises(ValueError, match="require grad"):
        apply_gradients_with_var_optimizer(s.ctx, [], opt, torch.ones(()))
    with pytest.raises(TypeError, match="var_opt"):
        apply_gradients_with_var_optimizer(s.ctx, [], "sgd", var * 1.0)
    assert var.item() == 1.0


def test_own_optimizer_must_hold_its_parameter():
    s = make_embedding_setup()
    a = _scalar_param(1.0)
    a.optimizer = torch.optim.SGD([_scalar_param(0.0)], lr=1.0)
    with pytest.raises(ValueError, match="does not hold"):
        apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([a], lr=1.0), a * 1.0)
    assert a.item() == 1.0


def test_skip_nonfinite_skips_the_whole_step():
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    gs = torch.zeros((), dtype=torch.int64)
    loss = s.lookup().sum() + var * float("inf")
    result = apply_gradients_with_var_optimizer(s.ctx, [s.fc], torch.optim.SGD([var], lr=1.0), loss,
                                                GradClipType.NoClip, global_step=gs, skip_nonfinite=True)
    assert not result.applied and result.reason == "nonfinite"
    assert var.item() == 1.0 and gs.item() == 0
    assert s.emb_var.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_infinite_global_norm_gives_nan_as_in_monolith():
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    loss = s.lookup().sum() + var * float("inf")
    apply_gradients_with_var_optimizer(s.ctx, [s.fc], torch.optim.SGD([var], lr=1.0), loss, clip_norm=1.0)
    assert math.isnan(var.item())


def test_skip_allreduce_env_forces_no_allreduce(monkeypatch):
    monkeypatch.setenv("MONOLITH_SKIP_ALLREDUCE", "1")
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    result = apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([var], lr=1.0), var * 1.0,
                                                GradClipType.NoClip, use_allreduce=True)
    assert not result.allreduced and var.item() == 0.0


def test_use_allreduce_without_process_group_is_a_logged_noop(caplog):
    s = make_embedding_setup()
    var = _scalar_param(1.0)
    with caplog.at_level("INFO"):
        result = apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([var], lr=1.0), var * 1.0,
                                                    clip_norm=0.5, use_allreduce=True)
    assert not result.allreduced and not result.deferred_clip
    assert var.item() == 0.5
    assert sum("allreduce skipped" in r.message for r in caplog.records) == 1


def test_feature_slot_config_needs_a_name_or_slot_id():
    from monolith_torch import FeatureSlotConfig

    with pytest.raises(ValueError, match="name or a slot_id"):
        FeatureSlotConfig()
    assert FeatureSlotConfig(slot_id=7).name == "7"
    s = make_embedding_setup()
    assert s.ctx.create_feature_slot(FeatureSlotConfig(name="12")).slot == 12
    assert s.ctx.create_feature_slot(FeatureSlotConfig(name="user", slot_id=3)).slot == 3
    with pytest.raises(ValueError, match="not an integer"):
        _ = s.ctx.create_feature_slot(FeatureSlotConfig(name="user")).slot


def test_run_pending_keeps_later_calls_when_one_raises():
    mgr = AsyncFunctionMgr(is_async=True)
    ran = []

    def boom():
        raise RuntimeError("boom")

    mgr.add_async_function(ran.append, (1,))
    mgr.add_async_function(boom)
    mgr.add_async_function(ran.append, (3,))
    with pytest.raises(RuntimeError, match="boom"):
        mgr.flush()
    assert ran == [1] and mgr.num_pending() == 1
    assert mgr.flush() == 1 and ran == [1, 3]


def test_clip_by_norm_fp16_gradient_with_a_huge_norm_is_clipped_not_zeroed():
    s = make_embedding_setup()
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    loss = (w.float() * 40000.0).sum()  # fp16 gradient [40000] * 4: norm 80000 > fp16 max
    apply_gradients_with_var_optimizer(s.ctx, [], torch.optim.SGD([w], lr=1.0), loss, GradClipType.ClipByNorm, 1.0)
    assert_close(w.detach().float(), torch.full((4,), -0.5), atol=1e-3, rtol=1e-3)
