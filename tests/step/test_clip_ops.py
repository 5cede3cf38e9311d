"""clip_ops: TF's clipping semantics, checked by hand, against numpy and against torch's clip_grad_norm_."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from monolith_torch.step import clip_ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (rtol, atol) for outputs; bf16 keeps 8 significant bits, so a scaled value may be two roundings off.
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1.6e-2, 1e-3)}
HYP = settings(max_examples=60, deadline=None)


def t(values, dtype=torch.float32, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


# ---------------------------------------------------------------- small cases, by hand


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_two_clipped_by_one(dtype, device):
    # Monolith's case: gradients [1, 1, 1] and [1] have global norm 2; a bound of 1 halves them.
    grads = [t([1.0, 1.0, 1.0], dtype, device), t([1.0], dtype, device)]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.0)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # bf16: each tensor's norm is rounded to bf16 (sqrt(3) -> 1.734), as in clip_grad_norm_.
    norm_rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert_close(norm.double(), t(2.0, torch.float64, device), rtol=norm_rtol, atol=0)
    assert_close(clipped[0], t([0.5, 0.5, 0.5], dtype, device))
    assert_close(clipped[1], t([0.5], dtype, device))
    assert clipped[0].dtype == dtype and clipped[0].device.type == device


def test_three_four_five():
    clipped, norm = clip_ops.clip_by_global_norm([t([3.0, 4.0])], 1.0)
    assert_close(norm, t(5.0))
    assert_close(clipped[0], t([0.6, 0.8]))


def test_below_the_bound_values_are_unchanged():
    grads = [t([0.3, -0.4]), t([[0.1]])]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.0)
    assert_close(norm, t(math.sqrt(0.26)))
    for c, g in zip(clipped, grads, strict=True):
        assert torch.equal(c, g)


def test_bound_equal_to_norm_is_unchanged():
    clipped, _ = clip_ops.clip_by_global_norm([t([3.0, 4.0])], 5.0)
    assert torch.equal(clipped[0], t([3.0, 4.0]))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_global_norm_gives_nan_everywhere(bad):
    # TF (and Monolith's docs): an infinite or NaN global norm turns every clipped tensor into NaN.
    grads = [t([bad, 1.0]), t([2.0, 3.0])]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.0)
    assert not torch.isfinite(norm)
    assert all(torch.isnan(c).all() for c in clipped)


def test_non_finite_norm_in_place_gives_nan_everywhere():
    grads = [t([math.inf]), t([2.0, 3.0])]
    norm = clip_ops.clip_by_global_norm_(grads, 1.0)
    assert torch.isinf(norm)
    assert all(torch.isnan(g).all() for g in grads)


def test_zero_norm_is_unchanged_and_finite():
    grads = [torch.zeros(3), torch.zeros(2, 2)]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.0)
    assert norm.item() == 0.0
    assert all(torch.equal(c, torch.zeros_like(c)) for c in clipped)


def test_zero_bound_gives_zeros_and_zero_norm_against_zero_bound_stays_finite():
    clipped, _ = clip_ops.clip_by_global_norm([t([3.0, 4.0])], 0.0)
    assert torch.equal(clipped[0], torch.zeros(2))
    clipped, _ = clip_ops.clip_by_global_norm([torch.zeros(2)], 0.0)
    assert torch.equal(clipped[0], torch.zeros(2))


def test_none_entries_pass_through():
    a, b = t([3.0]), t([4.0])
    clipped, norm = clip_ops.clip_by_global_norm([None, a, None, b], 1.0)
    assert clipped[0] is None and clipped[2] is None
    assert_close(norm, t(5.0))
    assert_close(clipped[1], t([0.6]))
    assert_close(clipped[3], t([0.8]))
    norm_ = clip_ops.clip_by_global_norm_([None, a, None, b], 1.0)
    assert_close(norm_, t(5.0))
    assert_close(a, t([0.6]))


def test_all_none_and_empty_list():
    clipped, norm = clip_ops.clip_by_global_norm([None, None], 1.0)
    assert clipped == [None, None]
    assert norm.item() == 0.0
    clipped, norm = clip_ops.clip_by_global_norm([], 1.0)
    assert clipped == [] and norm.item() == 0.0
    assert clip_ops.clip_by_global_norm_([], 1.0).item() == 0.0


def test_use_norm_is_honoured_not_recomputed():
    g = t([3.0, 4.0])  # its own norm is 5
    clipped, norm = clip_ops.clip_by_global_norm([g], 2.0, use_norm=t(4.0))
    assert_close(norm, t(4.0))
    assert_close(clipped[0], t([1.5, 2.0]))  # scaled by 2 / 4
    clipped, _ = clip_ops.clip_by_global_norm([g], 2.0, use_norm=1.0)  # a plain number works too
    assert torch.equal(clipped[0], g)
    clipped, _ = clip_ops.clip_by_global_norm([g], 2.0, use_norm=t(math.inf))
    assert torch.isnan(clipped[0]).all()
    norm_ = clip_ops.clip_by_global_norm_([g], 2.0, use_norm=t(8.0))
    assert_close(norm_, t(8.0))
    assert_close(g, t([0.75, 1.0]))


def test_use_norm_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="use_norm"):
        clip_ops.clip_by_global_norm([t([1.0])], 1.0, use_norm="2")


def test_clip_norm_as_tensor():
    clipped, _ = clip_ops.clip_by_global_norm([t([3.0, 4.0])], t(2.5))
    assert_close(clipped[0], t([1.5, 2.0]))


def test_mixed_dtypes_keep_their_dtype_and_share_one_norm():
    a = t([3.0], torch.float64)
    b = t([4.0], torch.float32)
    c = t([0.0], torch.bfloat16)
    clipped, norm = clip_ops.clip_by_global_norm([a, b, c], 1.0)
    assert norm.dtype == torch.float64
    assert_close(norm, t(5.0, torch.float64))
    assert [x.dtype for x in clipped] == [torch.float64, torch.float32, torch.bfloat16]
    assert_close(clipped[0], t([0.6], torch.float64))
    assert_close(clipped[1], t([0.8]))


@pytest.mark.parametrize("bad", [-1.0, math.nan, -1e-9, "1.0", None])
def test_bad_clip_norm_is_rejected_before_any_change(bad):
    g = t([3.0, 4.0])
    with pytest.raises(ValueError, match=r"clip_norm.*" + (r"nan" if bad != bad else "")):
        clip_ops.clip_by_global_norm_([g], bad)
    assert torch.equal(g, t([3.0, 4.0]))
    with pytest.raises(ValueError, match="clip_norm"):
        clip_ops.clip_by_global_norm([g], bad)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_ops.clip_by_norm(g, bad)


def test_bad_clip_norm_message_names_the_value():
    with pytest.raises(ValueError, match=r"-2\.5"):
        clip_ops.clip_by_global_norm([t([1.0])], -2.5)


# ---------------------------------------------------------------- global_norm


def test_global_norm_by_hand():
    assert_close(clip_ops.global_norm([t([3.0]), None, t([[4.0, 12.0]])]), t(13.0))
    assert clip_ops.global_norm([]).item() == 0.0
    assert clip_ops.global_norm([torch.zeros(0)]).item() == 0.0


def test_global_norm_returns_float32_for_low_precision_and_float64_when_present():
    assert clip_ops.global_norm([t([1.0], torch.bfloat16)]).dtype == torch.float32
    assert clip_ops.global_norm([t([1.0], torch.float16)]).dtype == torch.float32
    assert clip_ops.global_norm([t([1.0]), t([1.0], torch.float64)]).dtype == torch.float64


def test_global_norm_of_fp16_does_not_overflow():
    # Each element is representable in fp16, but the norm (1e5) is not: it must not become inf.
    g = torch.full((10_000,), 1000.0, dtype=torch.float16)
    norm = clip_ops.global_norm([g])
    assert_close(norm, t(1e5), rtol=1e-4, atol=0)
    clipped, _ = clip_ops.clip_by_global_norm([g], 1.0)
    assert torch.isfinite(clipped[0]).all()
    assert_close(clipped[0].float(), torch.full((10_000,), 0.01), rtol=1e-3, atol=0)


def test_global_norm_of_bf16_is_summed_in_float32():
    # 1e5 ones summed in bf16 would stall at 256 (8 bits of mantissa); the kernels
    # accumulate in float32 and only the per-tensor norm is rounded to bf16.
    g = torch.ones(100_000, dtype=torch.bfloat16)
    norm = clip_ops.global_norm([g, g])
    assert norm.dtype == torch.float32
    assert_close(norm, t(math.sqrt(200_000)), rtol=2**-8, atol=0)


def test_global_norm_matches_get_total_norm():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 500, (30,), generator=gen)]
    assert_close(clip_ops.global_norm(grads), torch.nn.utils.get_total_norm(grads))


# ---------------------------------------------------------------- clip_factor, foreach_scale_, grouping


def test_clip_factor_cases():
    assert_close(clip_ops.clip_factor(t(2.0), 1.0), t(0.5))
    assert_close(clip_ops.clip_factor(t(0.5), 1.0), t(1.0))
    assert_close(clip_ops.clip_factor(t(0.0), 0.0), t(1.0))
    assert_close(clip_ops.clip_factor(t(3.0), 0.0), t(0.0))
    assert_close(clip_ops.clip_factor(t(4.0), t(2.0)), t(0.5))
    assert torch.isnan(clip_ops.clip_factor(t(math.inf), 1.0))
    assert torch.isnan(clip_ops.clip_factor(t(math.nan), 1.0))
    assert clip_ops.clip_factor(t(2.0, torch.float64), 1.0).dtype == torch.float64


def test_foreach_scale_with_float_and_tensor_over_dtype_groups():
    xs = [t([1.0, 2.0]), t([4.0], torch.float64), t([8.0], torch.bfloat16)]
    clip_ops.foreach_scale_(xs, 0.5)
    assert_close(xs[0], t([0.5, 1.0]))
    clip_ops.foreach_scale_(xs, t(2.0, torch.float64))
    assert_close(xs[0], t([1.0, 2.0]))
    assert_close(xs[1], t([4.0], torch.float64))
    assert_close(xs[2], t([8.0], torch.bfloat16))
    clip_ops.foreach_scale_([], t(3.0))  # nothing to do, no error


def test_group_by_device_and_dtype():
    xs = [t([1.0]), t([1.0], torch.float64), t([2.0]), t([1.0], torch.bfloat16)]
    groups = clip_ops.group_by_device_and_dtype(xs)
    cpu = torch.device("cpu")
    assert dict(groups) == {(cpu, torch.float32): [0, 2], (cpu, torch.float64): [1], (cpu, torch.bfloat16): [3]}


# ---------------------------------------------------------------- clip_by_norm, clip_by_value


def test_clip_by_norm_by_hand():
    assert_close(clip_ops.clip_by_norm(t([3.0, 4.0]), 1.0), t([0.6, 0.8]))
    assert_close(clip_ops.clip_by_norm(t([[3.0], [4.0]]), 2.5), t([[1.5], [2.0]]))  # over all axes
    g = t([0.3, 0.4])
    assert torch.equal(clip_ops.clip_by_norm(g, 1.0), g)
    assert torch.equal(clip_ops.clip_by_norm(torch.zeros(3), 1.0), torch.zeros(3))
    assert torch.equal(clip_ops.clip_by_norm(torch.zeros(3), 0.0), torch.zeros(3))
    assert_close(clip_ops.clip_by_norm(t([3.0, 4.0]), t(2.5)), t([1.5, 2.0]))


def test_clip_by_norm_non_finite_follows_tf():
    # TF: t * c / max(norm, c): an infinite norm zeroes the finite entries, inf * 0 is NaN.
    out = clip_ops.clip_by_norm(t([math.inf, 2.0]), 1.0)
    assert torch.isnan(out[0]) and out[1].item() == 0.0
    assert torch.isnan(clip_ops.clip_by_norm(t([math.nan, 2.0]), 1.0)).all()


def test_clip_by_norm_rejects_integers():
    with pytest.raises(TypeError, match="int64"):
        clip_ops.clip_by_norm(torch.tensor([3, 4]), 1.0)


def test_clip_by_value_by_hand():
    assert_close(clip_ops.clip_by_value(t([-3.0, 0.5, 3.0]), -1.0, 2.0), t([-1.0, 0.5, 2.0]))
    assert_close(clip_ops.clip_by_value(t([-3.0, 3.0]), t(-1.0), t(1.0)), t([-1.0, 1.0]))
    assert torch.isnan(clip_ops.clip_by_value(t([math.nan]), -1.0, 1.0)).all()


def test_clip_by_value_min_above_max():
    with pytest.raises(ValueError, match=r"clip_value_min=2\.0.*clip_value_max=1\.0"):
        clip_ops.clip_by_value(t([0.0]), 2.0, 1.0)


# ---------------------------------------------------------------- in/out of place, idempotence


def test_out_of_place_calls_do_not_modify_inputs():
    grads = [t([3.0, 4.0]), t([[1.0, -2.0]]), None]
    before = [None if g is None else g.clone() for g in grads]
    clipped, _ = clip_ops.clip_by_global_norm(grads, 1.0)
    clip_ops.global_norm(grads)
    clip_ops.clip_by_norm(grads[0], 1.0)
    clip_ops.clip_by_value(grads[1], -1.0, 1.0)
    for g, b in zip(grads, before, strict=True):
        assert (g is None and b is None) or torch.equal(g, b)
    assert all(c is None or c.data_ptr() not in {g.data_ptr() for g in grads if g is not None} for c in clipped)


def test_in_place_matches_out_of_place():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, generator=gen) * 10, torch.randn(2, 3, generator=gen)]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.5)
    ptrs = [g.data_ptr() for g in grads]
    norm_ = clip_ops.clip_by_global_norm_(grads, 1.5)
    assert [g.data_ptr() for g in grads] == ptrs
    assert_close(norm_, norm)
    assert_close(grads, clipped, rtol=0, atol=0)


def test_clipping_twice_equals_clipping_once():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(7, generator=gen) * 5, torch.randn(3, 3, generator=gen)]
    once, _ = clip_ops.clip_by_global_norm(grads, 1.0)
    twice, norm2 = clip_ops.clip_by_global_norm(once, 1.0)
    assert_close(norm2, t(1.0))
    assert_close(twice, once)
    g = grads[0]
    assert_close(clip_ops.clip_by_norm(clip_ops.clip_by_norm(g, 1.0), 1.0), clip_ops.clip_by_norm(g, 1.0))
    v = clip_ops.clip_by_value(g, -0.5, 0.5)
    assert torch.equal(clip_ops.clip_by_value(v, -0.5, 0.5), v)


# ---------------------------------------------------------------- hypothesis properties vs numpy


def _array():
    shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    # Magnitudes below 1e-6 are left out: their float32 squares underflow
    # (to subnormals or 0), so a float32 norm, ours or clip_grad_norm_'s,
    # cannot match the float64 reference there.
    element = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32).filter(
        lambda v: v == 0 or abs(v) > 1e-6
    )
    return hnp.arrays(np.float64, shape, elements=element)


def _arrays(max_tensors=5):
    return st.lists(_array(), min_size=0, max_size=max_tensors)


def _to_torch(arrays, dtype, device="cpu"):
    """Tensors of ``dtype``, plus float64 numpy copies of exactly the values they hold."""
    tensors = [torch.from_numpy(a).to(device=device, dtype=dtype) for a in arrays]
    return tensors, [x.double().cpu().numpy() for x in tensors]


def _np_global_norm(arrays):
    return math.sqrt(sum(float(np.sum(a * a)) for a in arrays))


def _close(actual: torch.Tensor, expected: np.ndarray, dtype, scale: float = 1.0):
    rtol, atol = TOL[dtype]
    assert_close(actual.double().cpu(), torch.from_numpy(np.asarray(expected, dtype=np.float64)),
                 rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@HYP
@given(arrays=_arrays())
def test_global_norm_property(dtype, arrays):
    tensors, ref = _to_torch(arrays, dtype)
    expected = _np_global_norm(ref)
    # Accumulated in float32 or better; bf16 per-tensor norms are rounded to bf16 (2**-8).
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-8}[dtype]
    assert_close(clip_ops.global_norm(tensors).double(), torch.tensor(expected, dtype=torch.float64),
                 rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@HYP
@given(arrays=_arrays(), clip_norm=st.floats(0.0, 2e3), with_none=st.booleans())
def test_clip_by_global_norm_property(dtype, arrays, clip_norm, with_none):
    tensors, ref = _to_torch(arrays, dtype)
    if with_none:
        tensors = [None, *tensors]
    before = [None if x is None else x.clone() for x in tensors]
    clipped, norm = clip_ops.clip_by_global_norm(tensors, clip_norm)
    g = _np_global_norm(ref)
    factor = clip_norm / max(g, clip_norm) if max(g, clip_norm) > 0 else 1.0
    present = [c for c in clipped if c is not None]
    assert len(present) == len(ref)
    for c, r in zip(present, ref, strict=True):
        assert c.dtype == dtype and c.shape == r.shape
        _close(c, r * factor, dtype, scale=float(np.max(np.abs(r), initial=0.0)) * factor)
    # Out of place: the inputs are untouched.
    for x, b in zip(tensors, before, strict=True):
        assert (x is None and b is None) or torch.equal(x, b)
    # The result never exceeds the bound (up to rounding of the dtype).
    out_norm = _np_global_norm([c.double().numpy() for c in present])
    assert out_norm <= min(g, clip_norm) * (1 + TOL[dtype][0]) + TOL[dtype][1]


@pytest.mark.parametrize("dtype", DTYPES)
@HYP
@given(arrays=st.lists(_array(), min_size=1, max_size=1), clip_norm=st.floats(0.0, 2e3))
def test_clip_by_norm_property(dtype, arrays, clip_norm):
    tensors, ref = _to_torch(arrays, dtype)
    n = _np_global_norm(ref)
    factor = clip_norm / max(n, clip_norm) if max(n, clip_norm) > 0 else 1.0
    out = clip_ops.clip_by_norm(tensors[0], clip_norm)
    assert out.dtype == dtype
    _close(out, ref[0] * factor, dtype, scale=float(np.max(np.abs(ref[0]), initial=0.0)) * factor)


@pytest.mark.parametrize("dtype", DTYPES)
@HYP
@given(arrays=st.lists(_array(), min_size=1, max_size=1), lo=st.floats(-1e3, 1e3), width=st.floats(0.0, 1e3))
def test_clip_by_value_property(dtype, arrays, lo, width):
    tensors, ref = _to_torch(arrays, dtype)
    hi = lo + width
    out = clip_ops.clip_by_value(tensors[0], lo, hi)
    # Bounds are compared at the tensor's precision, as torch.clamp does.
    lo_d, hi_d = (torch.tensor([lo, hi], dtype=torch.float64).to(dtype).double().tolist())
    _close(out, np.clip(ref[0], lo_d, hi_d), dtype, scale=max(abs(lo), abs(hi)))


# ---------------------------------------------------------------- cross-check with torch.nn.utils.clip_grad_norm_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_matches_clip_grad_norm(dtype, device, max_norm):
    gen = torch.Generator().manual_seed(7)
    sizes = [int(n) for n in torch.randint(1, 2000, (40,), generator=gen)]
    values = [torch.randn(n, generator=gen, dtype=dtype).to(device) for n in sizes]
    params = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    for p, v in zip(params, values, strict=True):
        p.grad = v.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [v.clone() for v in values]
    norm = clip_ops.clip_by_global_norm_(grads, max_norm)
    assert_close(norm, ref_norm)
    # torch divides by norm + 1e-6 where TF divides by norm: a relative difference of 1e-6 / norm.
    assert_close(grads, [p.grad for p in params], rtol=1e-5, atol=1e-8)
    out, _ = clip_ops.clip_by_global_norm(values, max_norm)
    assert_close(out, [p.grad for p in params], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- CUDA only


@CUDA
def test_no_host_sync_on_cuda():
    grads = [torch.randn(100, device="cuda") for _ in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_ops.clip_by_global_norm_(grads, 1.0)
        clip_ops.clip_by_global_norm(grads, 1.0)
        clip_ops.clip_by_norm(grads[0], 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_mixed_devices_share_one_norm():
    grads = [t([3.0]), t([4.0], device="cuda")]
    clipped, norm = clip_ops.clip_by_global_norm(grads, 1.0)
    assert_close(norm.cpu(), t(5.0))
    assert clipped[1].device.type == "cuda"
    assert_close(clipped[1].cpu(), t([0.8]))
