"""gen_seq_mask: Monolith's seed case by hand, a numpy reference, every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_torch import RaggedTensor, gen_seq_mask
from monolith_torch.embedding.seq_mask import lengths_to_mask

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
SPLIT_DTYPES = [torch.int32, torch.int64]

# Monolith's gen_seq_mask_test: splits [0, 5, 7, 9, 13] are rows of 5, 2, 2 and 4 ids.
SEED_SPLITS = [0, 5, 7, 9, 13]
SEED_MASK = [
    [1, 1, 1, 1, 1, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
]


def np_reference(lengths, max_seq_length, dtype):
    """Row by row, the way the op is specified."""
    out = np.zeros((len(lengths), max_seq_length), dtype=dtype)
    for i, n in enumerate(lengths):
        out[i, : max(0, min(int(n), max_seq_length))] = 1
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
def test_seed_case(dtype, device):
    mask = gen_seq_mask(torch.tensor(SEED_SPLITS, dtype=dtype, device=device), 6)
    assert mask.dtype == dtype
    assert mask.device.type == device
    assert mask.shape == (4, 6)
    assert mask.tolist() == SEED_MASK


@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
def test_rows_longer_than_max_seq_length_are_cut(dtype):
    mask = gen_seq_mask(torch.tensor([0, 10, 10, 12], dtype=dtype), 3)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]


def test_zero_width_and_zero_rows():
    assert gen_seq_mask(torch.tensor(SEED_SPLITS), 0).shape == (4, 0)
    empty = gen_seq_mask(torch.tensor([0], dtype=torch.int32), 5)
    assert empty.shape == (0, 5) and empty.dtype == torch.int32


def test_splits_need_not_start_at_zero():
    # Only differences matter, as in Monolith's kernel.
    assert gen_seq_mask(torch.tensor([3, 5, 9]), 3).tolist() == [[1, 1, 0], [1, 1, 1]]


def test_max_seq_length_accepts_numpy_and_index_types():
    assert gen_seq_mask(torch.tensor(SEED_SPLITS), np.int64(6)).tolist() == SEED_MASK


@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
def test_ragged_tensor_input(dtype):
    ragged = RaggedTensor.from_row_splits(torch.arange(13), torch.tensor(SEED_SPLITS, dtype=dtype))
    mask = gen_seq_mask(ragged, 6)
    assert mask.dtype == dtype and mask.tolist() == SEED_MASK


def test_nested_jagged_input():
    rows = [torch.arange(n, dtype=torch.float32) for n in (5, 2, 2, 4)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    mask = gen_seq_mask(nested, 6)
    assert mask.dtype == nested.offsets().dtype
    assert mask.tolist() == SEED_MASK


def test_nested_jagged_with_holes_uses_row_lengths():
    # torch.nested.narrow makes a jagged view whose offsets are row starts, not splits.
    base = torch.arange(20).view(2, 10)
    view = torch.nested.narrow(base, 1, torch.tensor([0, 4]), torch.tensor([2, 3]), layout=torch.jagged)
    assert gen_seq_mask(view, 4).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([0, 3, 1], dtype=torch.int16), 2, torch.float32)
    assert mask.dtype == torch.float32 and mask.tolist() == [[0, 0], [1, 1], [1, 0]]


def test_validate_false_skips_the_check_and_gives_zero_rows():
    mask = gen_seq_mask(torch.tensor([0, 3, 1]), 4, validate=False)
    assert mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------- hypothesis vs numpy


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=0, max_size=60),
    max_seq_length=st.integers(0, 50),
    dtype=st.sampled_from(SPLIT_DTYPES),
    start=st.integers(0, 1000),
)
def test_matches_numpy_reference(lengths, max_seq_length, dtype, start):
    splits = np.concatenate([[start], start + np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)
    t_splits = torch.tensor(splits, dtype=dtype)
    np_dtype = np.int32 if dtype == torch.int32 else np.int64
    expected = np_reference(lengths, max_seq_length, np_dtype)
    mask = gen_seq_mask(t_splits, max_seq_length)
    assert mask.dtype == dtype
    np.testing.assert_array_equal(mask.numpy(), expected)
    if start == 0:
        values = torch.zeros(int(splits[-1]))
        np.testing.assert_array_equal(gen_seq_mask(RaggedTensor.from_row_splits(values, t_splits), max_seq_length)
                                      .numpy(), expected)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=20), max_seq_length=st.integers(0, 15))
def test_nested_jagged_matches_numpy_reference(lengths, max_seq_length):
    nested = torch.nested.nested_tensor([torch.zeros(n) for n in lengths], layout=torch.jagged)
    expected = np_reference(lengths, max_seq_length, np.int64)
    np.testing.assert_array_equal(gen_seq_mask(nested, max_seq_length).numpy(), expected)


# ---------------------------------------------------------------- bad input


def test_splits_not_1d():
    with pytest.raises(ValueError, match=r"splits must be 1-D, got shape \(2, 2\)"):
        gen_seq_mask(torch.tensor([[0, 1], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        gen_seq_mask(torch.tensor(3), 3)


def test_splits_empty():
    with pytest.raises(ValueError, match="splits.*empty"):
        gen_seq_mask(torch.tensor([], dtype=torch.int64), 3)


def test_splits_decreasing_names_the_values():
    with pytest.raises(ValueError, match=r"non-decreasing.*\[0, 5, 3, 9\]"):
        gen_seq_mask(torch.tensor([0, 5, 3, 9]), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool])
def test_splits_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=f"int32 or int64, got {dtype}"):
        gen_seq_mask(torch.tensor([0, 1, 2]).to(dtype), 3)


def test_splits_not_a_tensor():
    with pytest.raises(TypeError, match="list"):
        gen_seq_mask([0, 1, 2], 3)


@pytest.mark.parametrize("bad", [-1, -100])
def test_negative_max_seq_length(bad):
    with pytest.raises(ValueError, match=f"max_seq_length: {bad}"):
        gen_seq_mask(torch.tensor(SEED_SPLITS), bad)


@pytest.mark.parametrize("bad", [2.5, "6", None, True])
def test_max_seq_length_not_an_int(bad):
    with pytest.raises(TypeError, match=f"max_seq_length must be an int, got {bad!r}"):
        gen_seq_mask(torch.tensor(SEED_SPLITS), bad)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_strided_nested_tensor_is_rejected():
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(TypeError, match="jagged"):
        gen_seq_mask(nested, 3)


# ---------------------------------------------------------------- CUDA only


@CUDA
def test_no_host_sync_without_validation_on_cuda():
    splits = torch.tensor(SEED_SPLITS, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = gen_seq_mask(splits, 6, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mask.cpu().tolist() == SEED_MASK
