"""Tests for the aligned flat buffers (Monolith's monolith_aligned_flat_concat/split)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_torch.distributed import flat_buffers as dops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def garbage_empty(monkeypatch):
    """Makes torch.empty return NaN-filled memory, so padding that is not zeroed shows."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def _segments_by_hand(shapes, itemsize):
    """Independent reference: offsets computed one by one from the 64-byte rule."""
    align = 64 // itemsize
    offsets, cursor = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        offsets.append(cursor)
        cursor += n
        while cursor % align:
            cursor += 1
    return offsets, cursor


def test_small_case_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([[4.0, 5.0], [6.0, 7.0]])
    flat = dops.aligned_flat_concat([a, b], 2.0)
    # float32: 16 elements per 64 bytes; a at 0, b at 16, total 32.
    expected = torch.zeros(32)
    expected[:3] = torch.tensor([2.0, 4.0, 6.0])
    expected[16:20] = torch.tensor([8.0, 10.0, 12.0, 14.0])
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    a2, b2 = dops.aligned_flat_split([a, b], flat)
    torch.testing.assert_close(a2, a * 2)
    torch.testing.assert_close(b2, b * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_alignment_and_zero_padding(dtype, device, garbage_empty):
    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (), (0,), (5, 7), (16,), (2, 0, 3), (1, 1, 1), (33,)]
    tensors = [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]
    flat = dops.aligned_flat_concat(tensors, 0.5)
    offsets, total = _segments_by_hand(shapes, flat.element_size())
    assert flat.shape == (total,) and flat.dtype == dtype and flat.device.type == device
    assert flat.numel() == dops.aligned_flat_numel(tensors, dtype)
    assert flat.data_ptr() % 64 == 0
    mask = torch.ones(total, dtype=torch.bool, device=device)
    for t, off in zip(tensors, offsets, strict=True):
        assert (flat.data_ptr() + off * flat.element_size()) % 64 == 0
        torch.testing.assert_close(flat[off : off + t.numel()], (t * 0.5).reshape(-1))
        mask[off : off + t.numel()] = False
    assert torch.all(flat[mask] == 0)
    views = dops.aligned_flat_split(tensors, flat)
    for v, t in zip(views, tensors, strict=True):
        assert v.shape == t.shape
        assert v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        torch.testing.assert_close(v, t * 0.5)


def test_split_returns_views_not_copies():
    tensors = [torch.ones(4), torch.ones(2, 3)]
    flat = dops.aligned_flat_concat(tensors)
    views = dops.aligned_flat_split(tensors, flat)
    flat.fill_(7.0)
    assert torch.all(views[0] == 7) and torch.all(views[1] == 7)


def test_inputs_not_modified():
    tensors = [torch.arange(5.0), torch.arange(3.0).reshape(3, 1)]
    before = [t.clone() for t in tensors]
    dops.aligned_flat_concat(tensors, torch.tensor(3.0))
    for t, b in zip(tensors, before, strict=True):
        torch.testing.assert_close(t, b, rtol=0, atol=0)


def test_tensor_scale_and_non_contiguous_inputs():
    base = torch.arange(12.0).reshape(3, 4)
    t = base.t()  # non-contiguous
    flat = dops.aligned_flat_concat([t, base[:, 1]], torch.tensor(-2.0, dtype=torch.float64))
    v1, v2 = dops.aligned_flat_split([t, base[:, 1]], flat)
    torch.testing.assert_close(v1, t * -2)
    torch.testing.assert_close(v2, base[:, 1] * -2)


def test_many_tensors_more_than_monolith_limit():
    tensors = [torch.full((i % 7,), float(i)) for i in range(2000)]
    flat = dops.aligned_flat_concat(tensors, 1.0)
    views = dops.aligned_flat_split(tensors, flat)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors, strict=True))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_cast_to_buffer_dtype_scales_before_rounding(half):
    # 70000 overflows float16 on its own; scaled by 0.5 first it fits.
    tensors = [
        torch.tensor([70000.0, 1.0], dtype=torch.float32),
        torch.tensor([3.0], dtype=torch.float64),
    ]
    flat = dops.aligned_flat_concat(tensors, 0.5, dtype=half)
    assert flat.dtype == half
    assert flat.numel() == 64  # two segments of 32 half elements
    a, b = dops.aligned_flat_split(tensors, flat)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), torch.tensor([35000.0, 0.5]), rtol=1e-2, atol=0)
    torch.testing.assert_close(b.double(), torch.tensor([1.5], dtype=torch.float64))


def test_cast_whole_buffer_then_split_with_layout_dtype():
    tensors = [torch.randn(5), torch.randn(40), torch.randn(2, 2)]
    flat16 = dops.aligned_flat_concat(tensors, dtype=torch.float16)
    flat32 = flat16.float()
    views = dops.aligned_flat_split(tensors, flat32, layout_dtype=torch.float16)
    for v, t in zip(views, tensors, strict=True):
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, t.half().float())
    with pytest.raises(ValueError, match="needs"):
        dops.aligned_flat_split(tensors, flat32)  # float32 layout is a different length


def test_split_accepts_shapes():
    tensors = [torch.randn(2, 3), torch.randn(())]
    flat = dops.aligned_flat_concat(tensors)
    a, b = dops.aligned_flat_split([torch.Size([2, 3]), ()], flat)
    torch.testing.assert_close(a, tensors[0])
    torch.testing.assert_close(b, tensors[1])


def test_empty_list_needs_dtype():
    assert dops.aligned_flat_concat([], dtype=torch.float32).numel() == 0
    assert dops.aligned_flat_split([], torch.empty(0)) == []
    with pytest.raises(ValueError, match="tensors is empty"):
        dops.aligned_flat_concat([])


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((torch.ones(3),), {}, TypeError, "tensors must be a list"),
        (([torch.ones(2), 3.0],), {}, TypeError, r"tensors\[1\] must be a torch.Tensor, got float"),
        (
            ([torch.ones(2, dtype=torch.int64)],),
            {},
            TypeError,
            r"tensors\[0\] must have a floating dtype, got torch.int64",
        ),
        (
            ([torch.ones(2), torch.ones(2, dtype=torch.float64)],),
            {},
            TypeError,
            r"tensors\[1\] is torch.float64",
        ),
        (
            ([torch.ones(2)], torch.ones(2)),
            {},
            ValueError,
            r"scale must be a 0-d tensor, got shape \(2,\)",
        ),
        (([torch.ones(2)], "2"), {}, TypeError, "scale must be a python float"),
        (([torch.ones(2)], True), {}, TypeError, "scale must be a python float"),
        (([torch.ones(2)], torch.tensor(2)), {}, TypeError, "scale must be a floating tensor"),
        (
            ([torch.ones(2)],),
            {"dtype": torch.int32},
            TypeError,
            "dtype must be a floating dtype, got torch.int32",
        ),
    ],
)
def test_concat_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dops.aligned_flat_concat(*args, **kwargs)


def test_split_errors():
    like = [torch.ones(3)]
    with pytest.raises(ValueError, match="flat has 15 elements"):
        dops.aligned_flat_split(like, torch.zeros(15))
    with pytest.raises(ValueError, match="1-D contiguous"):
        dops.aligned_flat_split(like, torch.zeros(4, 4))
    with pytest.raises(TypeError, match="flat must be a torch.Tensor"):
        dops.aligned_flat_split(like, [0.0] * 16)
    with pytest.raises(TypeError, match=r"like\[0\] must be a torch.Tensor or a shape"):
        dops.aligned_flat_split(["x"], torch.zeros(16))


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.integers(min_value=0, max_value=70), min_size=1, max_size=12),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(min_value=-4, max_value=4, allow_nan=False),
)
def test_property_matches_naive_reference(numels, dtype, scale):
    g = torch.Generator().manual_seed(len(numels))
    tensors = [torch.randn(n, generator=g).to(dtype) for n in numels]
    flat = dops.aligned_flat_concat(tensors, scale)
    offsets, total = _segments_by_hand([(n,) for n in numels], flat.element_size())
    ref = torch.zeros(total, dtype=dtype)
    for t, off in zip(tensors, offsets, strict=True):
        ref[off : off + t.numel()] = t * scale
    torch.testing.assert_close(flat, ref)
    back = dops.aligned_flat_split(tensors, flat)
    for v, t in zip(back, tensors, strict=True):
        torch.testing.assert_close(v, t * scale)


@pytest.mark.parametrize("scale", [0.5, torch.tensor(-3.0)])
def test_large_tensors_scaled_with_zero_padding(scale, garbage_empty):
    # Mean size above the cat-then-multiply threshold: the per-tensor multiply-copy path.
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(40_001, generator=g), torch.randn(3, 9_999, generator=g)]
    flat = dops.aligned_flat_concat(tensors, scale)
    offsets, total = _segments_by_hand([t.shape for t in tensors], 4)
    assert flat.numel() == total
    mask = torch.ones(total, dtype=torch.bool)
    for t, off in zip(tensors, offsets, strict=True):
        torch.testing.assert_close(flat[off : off + t.numel()], (t * scale).reshape(-1))
        mask[off : off + t.numel()] = False
    assert mask.any() and torch.all(flat[mask] == 0)
