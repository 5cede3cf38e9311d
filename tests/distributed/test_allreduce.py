"""Single-process tests for AllreduceConfig and allreduce_cond (multi-process ones in tests/distributed)."""

from __future__ import annotations

import ast
import datetime
import pathlib
import sys
import types

import pytest
import torch
import torch.distributed as dist

from monolith_torch.distributed import allreduce as ar
from monolith_torch.distributed.buckets import bucket_indices
from monolith_torch.distributed.flat_buffers import aligned_flat_layout
from monolith_torch.distributed.gradient_buckets import GradientBuckets
from monolith_torch.distributed.torch_backend import allreduce_torch

ENV_VARS = (
    "MONOLITH_WITH_ALLREDUCE_FUSION",
    "MONOLITH_WITH_ALLREDUCE_FP16",
    "MONOLITH_SKIP_ALLREDUCE",
    "MONOLITH_WITH_HOROVOD",
    "MONOLITH_WITH_BYTEPS",
    "MONOLITH_WITH_BYTEPS_ALLREDUCE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- config ----------------------------------------------------------------------------


def test_defaults_are_monoliths():
    cfg = ar.AllreduceConfig()
    assert (cfg.fusion, cfg.compression, cfg.backend, cfg.group, cfg.timeout, cfg.skip) == (
        "none",
        None,
        "torch",
        None,
        None,
        False,
    )
    with pytest.raises(AttributeError):
        cfg.fusion = "one"  # frozen


def test_multi_is_dropped_with_monoliths_message():
    with pytest.raises(RuntimeError) as info:
        ar.AllreduceConfig(fusion="multi")
    assert (
        str(info.value) == "Support for multi is dropped. Please use 'one' as the fusion strategy"
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"fusion": "fused"},
            ValueError,
            r"Invalid fusion: 'fused'; expected one of \('none', 'one', 'grouped'\)",
        ),
        ({"fusion": 1}, TypeError, "fusion must be a str"),
        (
            {"compression": "fp8"},
            ValueError,
            r"Invalid compression: 'fp8'; expected one of \(None, 'fp16', 'bf16'\)",
        ),
        (
            {"backend": "mpi"},
            ValueError,
            r"Invalid backend: 'mpi'; expected one of \('torch', 'horovod', 'byteps'\)",
        ),
        ({"timeout": 5}, TypeError, "timeout must be a datetime.timedelta"),
        ({"timeout": datetime.timedelta(0)}, ValueError, "Invalid timeout: 0:00:00"),
        ({"skip": 1}, TypeError, "skip must be a bool, got int"),
        (
            {"group": "world"},
            TypeError,
            "group must be a torch.distributed.ProcessGroup or None, got str",
        ),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ar.AllreduceConfig(**kwargs)


def test_byteps_is_a_clear_not_supported_error():
    with pytest.raises(NotImplementedError, match="backend='byteps' is not supported"):
        ar.AllreduceConfig(backend="byteps")


@pytest.fixture
def no_horovod(monkeypatch):
    """Makes ``import horovod.torch`` fail, whether or not horovod is installed."""
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    return monkeypatch


def test_horovod_missing_names_the_package_and_the_build_script(no_horovod):
    with pytest.raises(ImportError, match=r"horovod\.torch.*scripts/build_horovod\.sh"):
        ar.AllreduceConfig(backend="horovod")


# --- from_env --------------------------------------------------------------------------


def test_env_is_read_only_by_from_env(clean_env):
    clean_env.setenv("MONOLITH_WITH_ALLREDUCE_FUSION", "one")
    assert ar.AllreduceConfig().fusion == "none"
    assert ar.AllreduceConfig.from_env().fusion == "one"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"fusion": "none", "compression": None, "skip": False, "backend": "torch"}),
        ({"MONOLITH_WITH_ALLREDUCE_FUSION": "one"}, {"fusion": "one"}),
        ({"MONOLITH_WITH_ALLREDUCE_FUSION": "grouped"}, {"fusion": "grouped"}),
        ({"MONOLITH_WITH_ALLREDUCE_FUSION": ""}, {"fusion": "none"}),
        ({"MONOLITH_WITH_ALLREDUCE_FP16": "1"}, {"compression": "fp16"}),
        ({"MONOLITH_WITH_ALLREDUCE_FP16": "0"}, {"compression": None}),
        ({"MONOLITH_WITH_ALLREDUCE_FP16": "bf16"}, {"compression": "bf16"}),
        ({"MONOLITH_SKIP_ALLREDUCE": "1"}, {"skip": True}),
        ({"MONOLITH_SKIP_ALLREDUCE": "0"}, {"skip": False}),
        ({"MONOLITH_SKIP_ALLREDUCE": "true"}, {"skip": True}),
        ({"MONOLITH_WITH_HOROVOD": "0"}, {"backend": "torch"}),
        (
            {"MONOLITH_WITH_BYTEPS": "1", "MONOLITH_WITH_BYTEPS_ALLREDUCE": "0"},
            {"backend": "torch"},
        ),
    ],
)
def test_from_env_meanings(clean_env, env, expected):
    for k, v in env.items():
        clean_env.setenv(k, v)
    cfg = ar.AllreduceConfig.from_env()
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field


def test_from_env_reads_an_explicit_mapping(clean_env):
    cfg = ar.AllreduceConfig.from_env({"MONOLITH_WITH_ALLREDUCE_FUSION": "grouped"})
    assert cfg.fusion == "grouped"
    assert ar.AllreduceConfig.from_env().fusion == "none"


def test_precedence_override_then_env_then_default(clean_env):
    clean_env.setenv("MONOLITH_WITH_ALLREDUCE_FUSION", "one")
    clean_env.setenv("MONOLITH_WITH_ALLREDUCE_FP16", "1")
    cfg = ar.AllreduceConfig.from_env(fusion="grouped")
    assert cfg.fusion == "grouped"  # override beats env
    assert cfg.compression == "fp16"  # env beats default
    assert cfg.skip is False  # default
    assert ar.AllreduceConfig.from_env(compression=None).compression is None


def test_override_skips_a_bad_env_value(clean_env):
    clean_env.setenv("MONOLITH_WITH_ALLREDUCE_FUSION", "bogus")
    assert ar.AllreduceConfig.from_env(fusion="one").fusion == "one"
    clean_env.setenv("MONOLITH_WITH_HOROVOD", "1")
    assert ar.AllreduceConfig.from_env(fusion="one", backend="torch").backend == "torch"


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        (
            "MONOLITH_WITH_ALLREDUCE_FUSION",
            "fused",
            r"Invalid MONOLITH_WITH_ALLREDUCE_FUSION='fused'; expected one of \('none', 'one', 'grouped'\)",
        ),
        (
            "MONOLITH_WITH_ALLREDUCE_FP16",
            "yes please",
            r"Invalid MONOLITH_WITH_ALLREDUCE_FP16='yes please'; expected one of '0'",
        ),
        (
            "MONOLITH_SKIP_ALLREDUCE",
            "maybe",
            r"Invalid MONOLITH_SKIP_ALLREDUCE='maybe'; expected an integer",
        ),
        ("MONOLITH_WITH_HOROVOD", "hvd", r"Invalid MONOLITH_WITH_HOROVOD='hvd'"),
        ("MONOLITH_WITH_BYTEPS", "x", r"Invalid MONOLITH_WITH_BYTEPS='x'"),
        ("MONOLITH_WITH_BYTEPS_ALLREDUCE", "x", r"Invalid MONOLITH_WITH_BYTEPS_ALLREDUCE='x'"),
    ],
)
def test_from_env_bad_values_name_the_variable(clean_env, name, value, match):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        ar.AllreduceConfig.from_env()


def test_from_env_multi_raises_monoliths_error(clean_env):
    clean_env.setenv("MONOLITH_WITH_ALLREDUCE_FUSION", "multi")
    with pytest.raises(RuntimeError, match="Support for multi is dropped"):
        ar.AllreduceConfig.from_env()


def test_from_env_unknown_override(clean_env):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['fuson'\]"):
        ar.AllreduceConfig.from_env(fuson="one")


def test_env_byteps_is_a_clear_error(clean_env):
    clean_env.setenv("MONOLITH_WITH_BYTEPS", "1")
    with pytest.raises(NotImplementedError, match="byteps"):
        ar.AllreduceConfig.from_env()


def test_env_horovod_missing_is_a_clear_error(clean_env, no_horovod):
    clean_env.setenv("MONOLITH_WITH_HOROVOD", "1")
    with pytest.raises(ImportError, match="scripts/build_horovod.sh"):
        ar.AllreduceConfig.from_env()


# --- allreduce_cond without communication ------------------------------------------------


def test_not_active_without_process_group():
    assert not dist.is_initialized()
    assert not ar.AllreduceConfig().is_active()


def test_world_size_one_scales_out_of_place():
    grads = [
        torch.tensor([1.0, 2.0]),
        None,
        torch.tensor(3.0, dtype=torch.float64),
        torch.empty(0),
        None,
    ]
    before = [None if g is None else g.clone() for g in grads]
    out = ar.allreduce_cond(grads, scale=0.5, config=ar.AllreduceConfig(fusion="one"))
    assert isinstance(out, list) and len(out) == 5
    assert out[1] is None and out[4] is None
    torch.testing.assert_close(out[0], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(out[2], torch.tensor(1.5, dtype=torch.float64))
    assert out[3].shape == (0,)
    for g, b in zip(grads, before, strict=True):
        if g is not None:
            torch.testing.assert_close(g, b, rtol=0, atol=0)


def test_scale_one_returns_the_same_tensors():
    grads = [torch.ones(3), None]
    out = ar.allreduce_cond(grads)
    assert out[0] is grads[0] and out[1] is None
    assert out is not grads


def test_scale_that_requires_grad_leaves_no_graph():
    scale = torch.tensor(0.5, requires_grad=True)
    out = ar.allreduce_cond([torch.ones(3)], scale=scale)
    assert not out[0].requires_grad
    torch.testing.assert_close(out[0], torch.full((3,), 0.5))


def test_tensor_scale_keeps_each_dtype():
    grads = [torch.ones(2, dtype=torch.float16), torch.ones(2, dtype=torch.bfloat16), torch.ones(2)]
    out = ar.allreduce_cond(grads, scale=torch.tensor(0.25))
    assert [o.dtype for o in out] == [g.dtype for g in grads]
    for o in out:
        torch.testing.assert_close(o.float(), torch.full((2,), 0.25))


@pytest.mark.parametrize(
    ("grad_dtype", "scale_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_tensor_scale_keeps_the_dtype_of_0d_gradients(grad_dtype, scale_dtype):
    # 0-d * 0-d promotes in torch (bfloat16 * float32 -> float32); a gradient must not.
    grads = [torch.tensor(1.5, dtype=grad_dtype), torch.ones(3, dtype=grad_dtype)]
    out = ar.allreduce_cond(grads, scale=torch.tensor(0.3, dtype=scale_dtype))
    assert [o.dtype for o in out] == [grad_dtype, grad_dtype]
    # The same rounding as the 1-d gradient beside it.
    assert torch.equal(
        out[0].reshape(1), (grads[0].reshape(1) * torch.tensor(0.3, dtype=scale_dtype))
    )


def test_all_none_and_empty_lists():
    assert ar.allreduce_cond([None, None], scale=2.0) == [None, None]
    assert ar.allreduce_cond([]) == []


def test_skip_is_never_active():
    assert not ar.AllreduceConfig(skip=True).is_active()


@pytest.mark.parametrize(
    ("grads", "kwargs", "exc", "match"),
    [
        (torch.ones(2), {}, TypeError, "grads must be a list"),
        (
            [torch.ones(2), 1.0],
            {},
            TypeError,
            r"grads\[1\] must be a torch.Tensor or None, got float",
        ),
        (
            [torch.ones(2, dtype=torch.int32)],
            {},
            TypeError,
            r"grads\[0\] must have a floating dtype, got torch.int32",
        ),
        (
            [torch.ones(2)],
            {"scale": torch.ones(2)},
            ValueError,
            r"scale must be a 0-d tensor, got shape \(2,\)",
        ),
        ([torch.ones(2)], {"scale": "2"}, TypeError, "scale must be a python float"),
        (
            [torch.ones(2)],
            {"config": {"fusion": "one"}},
            TypeError,
            "config must be an AllreduceConfig",
        ),
    ],
)
def test_allreduce_cond_errors(grads, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ar.allreduce_cond(grads, **kwargs)


# --- compression ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "half"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_compressor_round_trip(name, half):
    comp = ar.compressor_for(name)
    t = torch.tensor([1.0, -2.5, 70000.0])
    wire, ctx = comp.compress(t, 0.5)
    assert wire.dtype == half and ctx == torch.float32
    assert torch.isfinite(wire).all()  # scaled before the cast
    back = comp.decompress(wire, ctx)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, t * 0.5, rtol=1e-2, atol=0)
    t16 = torch.ones(2, dtype=torch.bfloat16)
    assert comp.compress(t16)[0].dtype == torch.bfloat16  # 16-bit tensors travel as they are


def test_none_compressor_copies():
    comp = ar.compressor_for(None)
    t = torch.ones(3)
    wire, ctx = comp.compress(t)
    wire.add_(1)
    assert torch.all(t == 1) and comp.decompress(wire, ctx) is wire


# --- every torch path in one process (world size 1 group) --------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_world_of_one_group_is_not_active_and_every_path_is_identity_times_scale(world_of_one):
    grads = [
        torch.randn(5),
        None,
        torch.randn(()),
        torch.randn(2, 3, dtype=torch.float64),
        torch.empty(0),
        torch.randn(4, 3).t(),  # non-contiguous: collectives need contiguous copies
    ]
    assert not ar.AllreduceConfig(group=world_of_one).is_active()
    out = ar.allreduce_cond(grads, 3.0, ar.AllreduceConfig(group=world_of_one))
    torch.testing.assert_close(out[0], grads[0] * 3)
    # The communicating stages themselves, driven directly on a group of one.
    tensors = [g for g in grads if g is not None]
    for fusion in ar.FUSIONS:
        for compression in ar.COMPRESSIONS:
            cfg = ar.AllreduceConfig(fusion=fusion, compression=compression, group=world_of_one)
            res = allreduce_torch(tensors, torch.tensor(3.0), cfg)
            tol = {"fp16": 1e-3, "bf16": 8e-3, None: 1e-6}[compression]
            for r, t in zip(res, tensors, strict=True):
                assert r.dtype == t.dtype and r.shape == t.shape
                torch.testing.assert_close(r, t * 3, rtol=tol, atol=tol)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fusion", ar.FUSIONS)
@pytest.mark.parametrize("compression", ar.COMPRESSIONS, ids=str)
def test_0d_gradients_keep_their_dtype_on_every_path(world_of_one, fusion, compression):
    cfg = ar.AllreduceConfig(fusion=fusion, compression=compression, group=world_of_one)
    grads = [torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(2.0), torch.ones(3)]
    res = allreduce_torch(grads, torch.tensor(0.3, dtype=torch.float64), cfg)
    assert [r.dtype for r in res] == [g.dtype for g in grads]
    assert [r.shape for r in res] == [g.shape for g in grads]


# --- horovod wiring, against a stand-in module ---------------------------------------------
# The real thing runs under horovodrun in tests/distributed/test_horovod.py (when built).


def _fake_horovod(world):
    """A stand-in for horovod.torch in which every peer holds the same tensors.

    Checks what real Horovod 0.28 rejects: bfloat16, non-contiguous buffers.
    """
    hvd = types.ModuleType("horovod.torch")
    hvd.Average, hvd.Sum = "average", "sum"
    calls = []

    class _Fp16:
        @staticmethod
        def compress(t):
            return t.half(), t.dtype

        @staticmethod
        def decompress(t, ctx):
            return t.to(ctx)

    class _NoneC:
        @staticmethod
        def compress(t):
            return t, None

        @staticmethod
        def decompress(t, ctx):
            return t

    hvd.Compression = types.SimpleNamespace(none=_NoneC, fp16=_Fp16)
    hvd.size = lambda: world
    hvd.is_initialized = lambda: True

    def _reduce(wire, op):
        if wire.dtype == torch.bfloat16 or not wire.is_contiguous():
            raise ValueError(f"unsupported buffer {wire.dtype} contiguous={wire.is_contiguous()}")
        return wire * world / (world if op == "average" else 1)

    def allreduce(t, op=None, compression=_NoneC, name=None):
        calls.append(("allreduce", op, compression, t.dtype))
        wire, ctx = compression.compress(t)
        return compression.decompress(_reduce(wire, op), ctx)

    def grouped_allreduce(ts, op=None, compression=_NoneC, name=None):
        calls.append(("grouped", op, compression, ts[0].dtype))
        out = []
        for t in ts:
            wire, ctx = compression.compress(t)
            out.append(compression.decompress(_reduce(wire, op), ctx))
        return out

    def allreduce_async_(t, op=None, name=None):
        calls.append(("async", op, None, t.dtype))
        t.copy_(_reduce(t, op))
        return len(calls)

    hvd.allreduce, hvd.grouped_allreduce, hvd.allreduce_async_ = (
        allreduce,
        grouped_allreduce,
        allreduce_async_,
    )
    hvd.synchronize = lambda handle: None
    hvd.calls = calls
    return hvd


@pytest.fixture
def fake_hvd(monkeypatch):
    hvd = _fake_horovod(world=4)
    monkeypatch.setitem(sys.modules, "horovod", types.ModuleType("horovod"))
    monkeypatch.setitem(sys.modules, "horovod.torch", hvd)
    return hvd


@pytest.mark.parametrize("fusion", ar.FUSIONS)
@pytest.mark.parametrize("compression", [None, "fp16"])
def test_horovod_backend_wiring(fake_hvd, fusion, compression):
    hvd = fake_hvd
    cfg = ar.AllreduceConfig(fusion=fusion, compression=compression, backend="horovod")
    assert cfg.is_active()
    grads = [torch.randn(7), None, torch.randn(3, 3).t(), torch.randn(5).bfloat16()]
    before = [None if g is None else g.clone() for g in grads]
    out = ar.allreduce_cond(grads, scale=torch.tensor(0.5), config=cfg)
    assert out[1] is None
    for o, g in ((out[0], grads[0]), (out[2], grads[2]), (out[3], grads[3])):
        tol = 8e-3 if g.dtype == torch.bfloat16 else {"fp16": 1e-3, None: 1e-6}[compression]
        assert o.dtype == g.dtype and o.shape == g.shape
        # average of equal peers, scaled once
        torch.testing.assert_close(o, g * 0.5, rtol=tol, atol=tol)
    for g, b in zip(grads, before, strict=True):
        assert (g is None and b is None) or torch.equal(g, b)
    kinds = {c[0] for c in hvd.calls}
    assert kinds == {"none": {"allreduce"}, "grouped": {"grouped"}, "one": {"async"}}[fusion]
    assert {c[1] for c in hvd.calls} == ({"average"} if compression is None else {"sum"})
    # Horovod has no bfloat16: it travels as float32, never as float16.
    assert torch.bfloat16 not in {c[3] for c in hvd.calls}
    if fusion != "one":
        # fp16: the float32 gradients through Horovod's fp16 compressor, the bfloat16 one
        # uncompressed as float32 (float16's range is smaller than bfloat16's).
        fp16, none = hvd.Compression.fp16, hvd.Compression.none
        assert {c[2] for c in hvd.calls} == ({fp16, none} if compression == "fp16" else {none})


def test_horovod_one_folds_fp16_into_the_flat_buffer(fake_hvd):
    cfg = ar.AllreduceConfig(fusion="one", compression="fp16", backend="horovod")
    ar.allreduce_cond([torch.randn(7), torch.randn(3, dtype=torch.float64)], 2.0, cfg)
    assert {c[3] for c in fake_hvd.calls} == {torch.float16}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compression": "bf16"}, r"Invalid compression for backend='horovod': 'bf16'"),
        ({"timeout": datetime.timedelta(seconds=5)}, r"Invalid timeout for backend='horovod'"),
    ],
)
def test_horovod_rejects_what_it_cannot_do(fake_hvd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ar.AllreduceConfig(backend="horovod", **kwargs)


def test_horovod_not_initialised_is_inactive(fake_hvd):
    fake_hvd.is_initialized = lambda: False
    cfg = ar.AllreduceConfig(backend="horovod")
    assert not cfg.is_active()
    g = [torch.randn(3)]
    torch.testing.assert_close(ar.allreduce_cond(g, 2.0, cfg)[0], g[0] * 2)
    assert fake_hvd.calls == []


# --- persistent buckets (GradientBuckets), in one process --------------------------------------
# Multi-process runs against the packing path: tests/distributed/test_allreduce_multiprocess.py.


def _params(*specs):
    return [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape, dtype in specs]


MIXED = (
    ((5,), torch.float32),
    ((3, 4), torch.float64),
    ((), torch.float32),
    ((7,), torch.bfloat16),
)


def test_buckets_lay_out_the_params_as_fusion_one_packs_them():
    params = _params(*MIXED, ((0,), torch.float32), ((300,), torch.float32))
    cfg = ar.AllreduceConfig(fusion="one", bucket_cap_bytes=256)
    b = GradientBuckets(params, cfg)
    expected = bucket_indices(params, ar.compressor_for(None), 256)
    assert [list(idx) for idx in b.bucket_positions] == expected
    for buf, idx in zip(b.buffers, b.bucket_positions, strict=True):
        group = [params[i] for i in idx]
        assert buf.dtype == group[0].dtype and buf.dim() == 1
        assert buf.numel() == aligned_flat_layout([p.numel() for p in group], buf.dtype)[1]
        for i in idx:
            v = b.views[i]
            assert v.shape == params[i].shape and v.dtype == params[i].dtype
            assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert (v.data_ptr() - buf.data_ptr()) % 64 == 0  # 64-byte aligned segments
    # float32 tensors are cut at 256 bytes: the 300-float tensor has a bucket of its own.
    assert any(idx == (len(params) - 1,) for idx in b.bucket_positions)
    assert all(p.grad is v for p, v in zip(params, b.views, strict=True))


def test_buckets_with_compression_are_cut_by_wire_bytes():
    params = _params(((64,), torch.float32), ((64,), torch.float32))
    # 2 x 256 bytes in float32, 2 x 128 as fp16: one 256-byte bucket holds both on the wire.
    assert len(GradientBuckets(params, ar.AllreduceConfig(bucket_cap_bytes=256)).buffers) == 2
    cfg = ar.AllreduceConfig(bucket_cap_bytes=256, compression="fp16")
    assert len(GradientBuckets(params, cfg).buffers) == 1


def test_buckets_keep_existing_grads_and_backward_accumulates_into_the_views():
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    b = GradientBuckets([w])
    assert w.grad is b.views[0]
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0, 3.0]))
    b.zero_grad_()
    (w * torch.tensor([4.0, 5.0, 6.0])).sum().backward()
    assert w.grad is b.views[0]
    torch.testing.assert_close(b.buffers[0][:3], torch.tensor([4.0, 5.0, 6.0]))
    # The step's backward(inputs=...) writes into the views too.
    b.zero_grad_()
    (2 * w).sum().backward(inputs=[w])
    assert w.grad is b.views[0] and torch.equal(w.grad, torch.full((3,), 2.0))


def test_zero_grad_reattaches_after_set_to_none():
    w = torch.zeros(3, requires_grad=True)
    b = GradientBuckets([w])
    opt = torch.optim.SGD([w], lr=0.1)
    w.sum().backward()
    opt.step()
    opt.zero_grad()  # set_to_none
    assert w.grad is None
    b.zero_grad_()
    assert w.grad is b.views[0] and torch.equal(b.buffers[0], torch.zeros_like(b.buffers[0]))
    # A backward without the views makes new tensors; attach_ copies them in.
    w.grad = None
    (3 * w).sum().backward()
    assert w.grad is not b.views[0]
    b.attach_()
    assert w.grad is b.views[0] and torch.equal(w.grad, torch.full((3,), 3.0))


def test_holds_and_complete_buckets():
    params = _params(*MIXED)
    b = GradientBuckets(params)
    views = list(b.views)
    assert b.holds(views) and b.holds(tuple(views))
    assert not b.holds(views[:-1]) and not b.holds([*views[:-1], views[-1].clone()])
    assert b.complete_buckets(views) == list(range(len(b.buffers)))
    float32 = next(k for k, idx in enumerate(b.bucket_positions) if 0 in idx)
    broken = [views[0].clone(), *views[1:]]
    assert float32 not in b.complete_buckets(broken)
    assert len(b.complete_buckets(broken)) == len(b.buffers) - 1
    assert float32 not in b.complete_buckets([*views, views[0]])  # a view twice


def test_buckets_without_process_group_scale_in_place_and_return_the_views():
    params = _params(*MIXED)
    b = GradientBuckets(params)
    for v in b.views:
        v.fill_(2.0)
    grads = [p.grad for p in params]
    out = ar.allreduce_cond(grads, torch.tensor(0.25), buckets=b)
    assert all(o is v for o, v in zip(out, b.views, strict=True))
    assert [o.dtype for o in out] == [p.dtype for p in params]
    for o in out:
        assert torch.equal(o, torch.full_like(o, 0.5))
    ptrs = [buf.data_ptr() for buf in b.buffers]
    assert ar.allreduce_cond(grads, 1.0, buckets=b) == list(b.views)
    assert [buf.data_ptr() for buf in b.buffers] == ptrs


def test_buckets_partial_list_reduces_the_rest_out_of_place():
    params = _params(*MIXED)
    b = GradientBuckets(params)
    for v in b.views:
        v.fill_(2.0)
    other = torch.full((4,), 2.0)
    grads = [None, *[p.grad for p in params], other]
    out = ar.allreduce_cond(grads, 0.5, buckets=b)
    assert out[0] is None
    assert all(o is v for o, v in zip(out[1:-1], b.views, strict=True))
    assert out[-1] is not other and torch.equal(out[-1], torch.ones(4))
    assert torch.equal(other, torch.full((4,), 2.0))  # not a view: out of place
    assert all(torch.equal(v, torch.ones_like(v)) for v in b.views)


def test_buckets_scale_that_requires_grad_leaves_no_graph():
    w = torch.zeros(3, requires_grad=True)
    b = GradientBuckets([w])
    b.views[0].fill_(1.0)
    out = ar.allreduce_cond([w.grad], torch.tensor(0.5, requires_grad=True), buckets=b)
    assert not out[0].requires_grad and torch.equal(out[0], torch.full((3,), 0.5))


@pytest.mark.parametrize(
    ("params", "kwargs", "exc", "match"),
    [
        (torch.zeros(2, requires_grad=True), {}, TypeError, "params must be an iterable"),
        ([1.0], {}, TypeError, r"params\[0\] must be a torch.Tensor, got float"),
        ([torch.zeros(2, dtype=torch.int64)], {}, TypeError, r"params\[0\] must have a floating"),
        ([torch.zeros(2)], {}, ValueError, r"params\[0\] does not require grad"),
        ([torch.zeros(2, requires_grad=True)], {"config": {}}, TypeError, "config must be"),
    ],
)
def test_buckets_errors(params, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradientBuckets(params, **kwargs)


def test_buckets_reject_a_param_twice():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[1\] appears twice"):
        GradientBuckets([w, w])


def test_buckets_bad_arguments_change_nothing():
    w = torch.zeros(3, requires_grad=True)
    b = GradientBuckets([w])
    b.views[0].fill_(2.0)
    with pytest.raises(TypeError, match="buckets must be a GradientBuckets"):
        ar.allreduce_cond([w.grad], 0.5, buckets=[b])
    with pytest.raises(ValueError, match="scale must be a 0-d tensor"):
        ar.allreduce_cond([w.grad], torch.ones(2), buckets=b)
    with pytest.raises(TypeError, match="config must be an AllreduceConfig"):
        b.allreduce_(0.5, {"fusion": "one"})
    with pytest.raises(ValueError, match=r"Invalid buckets: \[3\]"):
        b.allreduce_(0.5, buckets=[3])
    assert torch.equal(b.views[0], torch.full((3,), 2.0))


# --- the package's own rules ---------------------------------------------------------------

DISTRIBUTED = pathlib.Path(ar.__file__).parent


@pytest.mark.parametrize("path", sorted(DISTRIBUTED.glob("*.py")), ids=lambda p: p.name)
def test_no_private_name_crosses_a_module_boundary(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("monolith_torch"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name} imports {private} from {node.module}"
    doc = ast.get_docstring(tree) or ""
    assert "May import" in doc or "Imports only" in doc or path.name == "__init__.py", (
        f"{path.name}: the docstring must say what the module may import"
    )
    assert len(path.read_text().splitlines()) < 400, f"{path.name} is over 400 lines"
