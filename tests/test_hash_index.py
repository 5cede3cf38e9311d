"""HashIndex: lookup/insert/remove against a Python dict, growth, rebuild, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_torch.hash_index import HashIndex

ids_lists = st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), max_size=300)



def test_small_hand_checked():
    idx = HashIndex()
    rows, new = idx.insert(torch.tensor([30, 10, 30, 20]))
    # New ids get rows in increasing id order: 10 -> 0, 20 -> 1, 30 -> 2.
    assert rows.tolist() == [2, 0, 2, 1]
    assert new.tolist() == [10, 20, 30]
    assert idx.lookup(torch.tensor([20, 40, 10])).tolist() == [1, -1, 0]
    assert len(idx) == 3 and idx.num_rows == 3


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(ids_lists, min_size=1, max_size=5), removals=ids_lists)
def test_matches_dict(batches, removals):
    idx = HashIndex()
    ref: dict[int, int] = {}
    next_row = 0
    for batch in batches:
        for k in sorted(set(batch) - set(ref)):
            ref[k] = next_row
            next_row += 1
        rows, _ = idx.insert(torch.tensor(batch, dtype=torch.int64))
        assert rows.tolist() == [ref[k] for k in batch]
    gone = idx.remove(torch.tensor(removals, dtype=torch.int64))
    removed = sorted(set(removals))
    assert gone.tolist() == [ref.get(k, -1) for k in removed]
    for k in removed:
        ref.pop(k, None)
    probe = [k for b in batches for k in b] + removals + [12345, -1]
    assert idx.lookup(torch.tensor(probe, dtype=torch.int64)).tolist() == [ref.get(k, -1) for k in probe]
    assert len(idx) == len(ref)
    keys, rows = idx.items()
    assert dict(zip(keys.tolist(), rows.tolist(), strict=True)) == ref


def test_growth_and_overhead():
    idx = HashIndex()
    keys = torch.randint(-(1 << 62), 1 << 62, (200_000,))
    keys = torch.unique(keys)
    for chunk in keys.split(7_000):
        idx.insert(chunk)
    assert len(idx) == keys.numel()
    assert torch.equal(torch.sort(idx.lookup(keys)).values, torch.arange(keys.numel()))
    assert idx.nbytes() / len(idx) <= 32


def test_reinsert_after_remove_reuses_slots():
    idx = HashIndex()
    idx.insert(torch.arange(1000))
    idx.remove(torch.arange(0, 1000, 2))
    rows, new = idx.insert(torch.arange(0, 1000, 2))
    assert new.numel() == 500 and int(rows.min()) == 1000
    assert idx.lookup(torch.arange(1, 1000, 2)).tolist() == list(range(1, 1000, 2))


def test_state_dict_round_trip():
    idx = HashIndex()
    idx.insert(torch.tensor([5, 3, 9]))
    idx.remove(torch.tensor([3]))
    other = HashIndex()
    other.load_state_dict(idx.state_dict())
    q = torch.tensor([5, 3, 9, 1])
    assert other.lookup(q).tolist() == idx.lookup(q).tolist()
    assert other.num_rows == idx.num_rows


def test_errors():
    idx = HashIndex()
    with pytest.raises(TypeError, match="integer"):
        idx.lookup(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        idx.insert([1, 2])
    with pytest.raises(ValueError, match="1-D"):
        idx.insert(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="distinct"):
        idx.rebuild(torch.tensor([1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_load"):
        HashIndex(max_load=1.5)
    with pytest.raises(ValueError, match="expected_rows"):
        HashIndex(expected_rows=-1)
    assert len(idx) == 0


@pytest.mark.parametrize("max_load", [0.5, 0.9])
def test_dense_tables_with_overflowing_buckets(max_load):
    # At load 0.9 many buckets are full, so ids overflow into later buckets,
    # both through insert rounds and through the sort-based rebuild.
    gen = torch.Generator().manual_seed(0)
    keys = torch.unique(torch.randint(-(1 << 62), 1 << 62, (30_000,), generator=gen))
    idx = HashIndex(max_load=max_load)
    for chunk in keys.split(997):
        idx.insert(chunk)
    rows = idx.lookup(keys)
    assert torch.equal(torch.sort(rows).values, torch.arange(keys.numel()))
    assert idx.lookup(keys + 1).eq(-1).sum() >= keys.numel() - 5  # absent ids (a few may collide with keys)
    idx.remove(keys[::3])
    other = HashIndex(max_load=max_load)
    other.load_state_dict(idx.state_dict())
    for index in (idx, other):
        got = index.lookup(keys)
        assert torch.equal(got[::3], torch.full_like(got[::3], -1))
        keep = torch.ones(keys.numel(), dtype=torch.bool)
        keep[::3] = False
        assert torch.equal(got[keep], rows[keep])
