"""RaggedTensor and the embedding combiners, against naive per-row loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from monolith_torch import FirstN, RaggedTensor, ReduceMean, ReduceSum
from monolith_torch.core.ragged import as_ragged, row_splits_of

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
FLOAT_DTYPES = [torch.float32, torch.float64]


def ragged(lengths, device="cpu", dtype=torch.int64):
    lengths = torch.tensor(lengths, dtype=dtype)
    splits = torch.zeros(len(lengths) + 1, dtype=dtype)
    splits[1:] = torch.cumsum(lengths, 0)
    return RaggedTensor.from_row_splits(torch.arange(int(splits[-1]), device=device), splits.to(device))


# ---------------------------------------------------------------- RaggedTensor


def test_ragged_accessors():
    r = RaggedTensor.from_row_splits(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([0, 2, 2, 5]))
    assert r.nrows() == 3
    assert r.row_lengths().tolist() == [2, 0, 3]
    assert r.value_rowids().tolist() == [0, 0, 2, 2, 2]


def test_ragged_from_lists_and_from_row_lengths():
    r = RaggedTensor.from_row_splits([1, 2, 3], [0, 1, 3])
    assert r.values.tolist() == [1, 2, 3] and r.row_splits.dtype == torch.int64
    r2 = RaggedTensor.from_row_lengths(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 2], dtype=torch.int32))
    assert r2.row_splits.tolist() == [0, 1, 1, 3]
    assert r2.value_rowids().tolist() == [0, 2, 2]


def test_ragged_zero_rows_and_multi_dim_values():
    r = RaggedTensor.from_row_splits(torch.zeros(0, 4), torch.tensor([0]))
    assert r.nrows() == 0 and r.value_rowids().tolist() == []
    r = RaggedTensor.from_row_splits(torch.zeros(3, 4), torch.tensor([0, 3]))
    assert r.value_rowids().tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "splits, match",
    [
        ([-1, 2, 3], r"start at 0, got \[-1, 2, 3\]"),
        ([1, 2, 3], r"start at 0, got \[1, 2, 3\]"),
        ([0, 3, 2, 3], r"non-decreasing, got \[0, 3, 2, 3\]"),
        ([0, 1, 2], r"end at len\(values\)=3, got last split 2"),
        ([0, 1, 4], r"end at len\(values\)=3, got last split 4"),
    ],
)
def test_ragged_bad_row_splits(splits, match):
    with pytest.raises(ValueError, match=match):
        RaggedTensor.from_row_splits(torch.arange(3), torch.tensor(splits))


def test_ragged_bad_row_splits_meta():
    with pytest.raises(TypeError, match="row_splits must be int32 or int64, got torch.float32"):
        RaggedTensor.from_row_splits(torch.arange(3), torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match=r"row_splits must be 1-D, got shape \(1, 2\)"):
        RaggedTensor.from_row_splits(torch.arange(3), torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="row_splits must hold at least one element"):
        RaggedTensor.from_row_splits(torch.arange(3), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"values must have at least 1 dimension, got shape \(\)"):
        RaggedTensor.from_row_splits(torch.tensor(5), torch.tensor([0]))


def test_ragged_validate_false_skips_value_checks():
    r = RaggedTensor.from_row_splits(torch.arange(3), torch.tensor([0, 3, 2]), validate=False)
    assert r.row_splits.tolist() == [0, 3, 2]


def test_ragged_bad_row_lengths():
    with pytest.raises(ValueError, match=r"row_lengths must be >= 0, got \[2, -1, 2\]"):
        RaggedTensor.from_row_lengths(torch.arange(3), torch.tensor([2, -1, 2]))
    with pytest.raises(TypeError, match="row_lengths must hold integers, got torch.float32"):
        RaggedTensor.from_row_lengths(torch.arange(3), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"row_lengths must be 1-D, got shape \(1, 2\)"):
        RaggedTensor.from_row_lengths(torch.arange(3), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"len\(values\)=3, got last split 2"):
        RaggedTensor.from_row_lengths(torch.arange(3), torch.tensor([1, 1]))


def test_as_ragged_and_row_splits_of():
    nested = torch.nested.nested_tensor([torch.arange(2), torch.arange(3)], layout=torch.jagged)
    r = as_ragged(nested)
    assert r.row_splits.tolist() == [0, 2, 5] and r.values.tolist() == [0, 1, 0, 1, 2]
    plain = RaggedTensor.from_row_splits(torch.arange(2), torch.tensor([0, 2]))
    assert as_ragged(plain) is plain
    assert row_splits_of(plain) is plain.row_splits
    splits = torch.tensor([0, 1])
    assert row_splits_of(splits) is splits
    with pytest.raises(TypeError, match="ids must be a RaggedTensor or a torch.nested jagged tensor, got list"):
        as_ragged([1, 2])
    with pytest.raises(TypeError, match="splits must be a 1-D tensor.*got tuple"):
        row_splits_of((0, 1))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_as_ragged_rejects_strided_nested():
    with pytest.raises(TypeError, match="only torch.jagged"):
        as_ragged(torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]))


def test_as_ragged_packs_a_jagged_view_with_holes():
    base = torch.arange(20).view(2, 10)
    view = torch.nested.narrow(base, 1, torch.tensor([0, 4]), torch.tensor([2, 3]), layout=torch.jagged)
    r = as_ragged(view)
    assert r.row_splits.tolist() == [0, 2, 5]
    assert r.values.tolist() == [0, 1, 14, 15, 16]


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=0, max_size=30), dtype=st.sampled_from([torch.int32, torch.int64]))
def test_value_rowids_matches_numpy(lengths, dtype):
    r = ragged(lengths, dtype=dtype)
    assert r.nrows() == len(lengths)
    assert r.row_lengths().tolist() == lengths
    np.testing.assert_array_equal(r.value_rowids().numpy(), np.repeat(np.arange(len(lengths)), lengths))


# ---------------------------------------------------------------- combiners vs naive loops


def naive_sum(lengths, emb):
    out, start = [], 0
    for n in lengths:
        out.append(emb[start:start + n].sum(0))
        start += n
    return torch.stack(out) if out else emb.new_zeros(0, emb.shape[1])


def naive_mean(lengths, emb):
    out, start = [], 0
    for n in lengths:
        out.append(emb[start:start + n].mean(0) if n else emb.new_zeros(emb.shape[1]))
        start += n
    return torch.stack(out) if out else emb.new_zeros(0, emb.shape[1])


def naive_first_n(lengths, emb, max_len):
    out = emb.new_zeros(len(lengths), max_len, emb.shape[1])
    start = 0
    for i, n in enumerate(lengths):
        k = min(n, max_len)
        out[i, :k] = emb[start:start + k]
        start += n
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_combiners_by_hand(dtype, split_dtype, device):
    ids = ragged([2, 0, 1], device=device, dtype=split_dtype)
    emb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=dtype, device=device)
    assert_close(ReduceSum().combine(ids, emb), torch.tensor([[4.0, 6.0], [0, 0], [5.0, 6.0]], dtype=dtype,
                                                              device=device))
    assert_close(ReduceMean().combine(ids, emb), torch.tensor([[2.0, 3.0], [0, 0], [5.0, 6.0]], dtype=dtype,
                                                               device=device))
    first = FirstN(1).combine(ids, emb)
    assert first.shape == (3, 1, 2)
    assert_close(first, torch.tensor([[[1.0, 2.0]], [[0, 0]], [[5.0, 6.0]]], dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=0, max_size=12),
    dim=st.integers(1, 5),
    max_len=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    nested=st.booleans(),
)
def test_combiners_match_naive_loops(dtype, lengths, dim, max_len, seed, nested):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(sum(lengths), dim, generator=gen, dtype=dtype)
    ids = ragged(lengths)
    if nested and lengths:
        ids = torch.nested.nested_tensor_from_jagged(ids.values, ids.row_splits)
    assert_close(ReduceSum().combine(ids, emb), naive_sum(lengths, emb))
    assert_close(ReduceMean().combine(ids, emb), naive_mean(lengths, emb))
    assert_close(FirstN(max_len).combine(ids, emb), naive_first_n(lengths, emb, max_len))


@pytest.mark.parametrize("combiner", [ReduceSum(), ReduceMean(), FirstN(2)], ids=repr)
def test_combiner_gradcheck(combiner):
    ids = ragged([3, 0, 1, 2])
    emb = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: combiner.combine(ids, e), (emb,))


def test_combiner_gradients_equal_manual_ones():
    lengths = [3, 0, 1, 2]
    ids = ragged(lengths)
    rowids = torch.tensor([0, 0, 0, 2, 3, 3])
    positions = torch.tensor([0, 1, 2, 0, 0, 1])
    emb = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ReduceSum().combine(ids, emb) * w).sum(), emb)
    assert_close(grad, w[rowids])
    (grad,) = torch.autograd.grad((ReduceMean().combine(ids, emb) * w).sum(), emb)
    counts = torch.tensor(lengths, dtype=torch.float64)[rowids]
    assert_close(grad, w[rowids] / counts[:, None])
    w3 = torch.randn(4, 2, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((FirstN(2).combine(ids, emb) * w3).sum(), emb)
    keep = (positions < 2).to(torch.float64)[:, None]
    assert_close(grad, w3[rowids, positions.clamp_max(1)] * keep)  # ids past L get no gradient


def test_combiners_on_zero_ids():
    ids = ragged([0, 0])
    emb = torch.zeros(0, 3, requires_grad=True)
    assert torch.equal(ReduceSum().combine(ids, emb), torch.zeros(2, 3))
    assert torch.equal(ReduceMean().combine(ids, emb), torch.zeros(2, 3))
    assert torch.equal(FirstN(2).combine(ids, emb), torch.zeros(2, 2, 3))
    ReduceSum().combine(ids, emb).sum().backward()
    assert emb.grad.shape == (0, 3)


def test_combiner_bad_inputs():
    ids = ragged([1, 1])
    with pytest.raises(ValueError, match=r"2-D \[N, D\] tensor, got shape \(2,\)"):
        ReduceSum().combine(ids, torch.zeros(2))
    with pytest.raises(TypeError, match="got list"):
        ReduceSum().combine(ids, [[0.0], [1.0]])
    with pytest.raises(ValueError, match="embeddings has 3 rows but the ids hold 2 values"):
        ReduceMean().combine(ids, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="RaggedTensor or a torch.nested jagged tensor"):
        ReduceSum().combine(torch.tensor([0, 1]), torch.zeros(2, 4))
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"max_seq_length: {bad!r}"):
            FirstN(bad)


def test_combiner_repr_and_max_seq_length():
    assert repr(FirstN(3)) == "FirstN(max_seq_length=3)" and FirstN(3).max_seq_length == 3
    assert repr(ReduceSum()) == "ReduceSum()" and ReduceSum().max_seq_length == 0
