"""HashIndex: every implementation against a Python dict, against each other, growth, removal, rebuild, errors.

Implementations: "compiled" (CPU tables: numba kernels), "torch-cpu" (the
torch probing rounds that CUDA tables use, run on CPU so they are tested
without a GPU) and "torch-cuda" (skipped without CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_torch.embedding import kernels
from monolith_torch.embedding.hash_index import HashIndex, with_torch_rounds

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
EXTREMES = [0, -1, 1, -2, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1]
# Mostly arbitrary int64s, with the extremes and a small range (so batches share ids) mixed in.
id_values = st.one_of(
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.sampled_from(EXTREMES),
    st.integers(min_value=-20, max_value=20),
)
ids_lists = st.lists(id_values, max_size=300)

IMPLS = [
    "compiled",
    "torch-cpu",
    pytest.param("torch-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def make_index(impl: str, **kwargs) -> HashIndex:
    if impl == "compiled":
        return HashIndex(**kwargs)
    if impl == "torch-cpu":
        return with_torch_rounds(HashIndex(**kwargs))
    return HashIndex(device="cuda", **kwargs)


def _t(values, impl: str) -> torch.Tensor:
    dev = "cuda" if impl == "torch-cuda" else "cpu"
    return torch.tensor(values, dtype=torch.int64, device=dev)


def test_implementation_follows_device():
    assert HashIndex()._kernels is not None
    assert with_torch_rounds(HashIndex())._kernels is None
    with pytest.raises(RuntimeError, match="empty CPU index"):
        idx = HashIndex()
        idx.insert(torch.tensor([1]))
        with_torch_rounds(idx)


@pytest.mark.parametrize("impl", IMPLS)
def test_small_hand_checked(impl):
    idx = make_index(impl)
    rows, new = idx.insert(_t([30, 10, 30, 20], impl))
    # New ids get rows in increasing id order: 10 -> 0, 20 -> 1, 30 -> 2.
    assert rows.tolist() == [2, 0, 2, 1]
    assert new.tolist() == [10, 20, 30]
    assert idx.lookup(_t([20, 40, 10], impl)).tolist() == [1, -1, 0]
    assert len(idx) == 3 and idx.num_rows == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_and_negative_ids(impl):
    # No id value doubles as an "empty" marker: the key tensor starts as zeros
    # and only the slot tensor says whether a slot is used.
    idx = make_index(impl)
    assert idx.lookup(_t(EXTREMES, impl)).tolist() == [-1] * len(EXTREMES)
    rows, new = idx.insert(_t(EXTREMES + EXTREMES[::-1], impl))
    order = sorted(EXTREMES)
    assert new.tolist() == order
    expected = [order.index(k) for k in EXTREMES]
    assert rows.tolist() == expected + expected[::-1]
    assert idx.lookup(_t([INT64_MIN, -1, 0, INT64_MAX, 5], impl)).tolist() == [0, 3, 4, 7, -1]
    assert idx.remove(_t([-1, -1, INT64_MAX], impl)).tolist() == [3, 7]
    assert idx.lookup(_t(EXTREMES, impl)).tolist() == [4, -1, 5, 2, 0, 1, -1, 6]
    rows, new = idx.insert(_t([INT64_MAX, -1], impl))
    assert rows.tolist() == [9, 8] and new.tolist() == [-1, INT64_MAX]


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(ids_lists, min_size=1, max_size=5), removals=ids_lists, reinsert=ids_lists)
def test_matches_dict(impl, batches, removals, reinsert):
    idx = make_index(impl)
    ref: dict[int, int] = {}
    next_row = 0

    def insert(batch):
        nonlocal next_row
        fresh = sorted(set(batch) - set(ref))
        for k in fresh:
            ref[k] = next_row
            next_row += 1
        rows, new = idx.insert(_t(batch, impl))
        assert rows.tolist() == [ref[k] for k in batch]
        assert new.tolist() == fresh

    for batch in batches:
        insert(batch)
    gone = idx.remove(_t(removals, impl))
    removed = sorted(set(removals))
    assert gone.tolist() == [ref.get(k, -1) for k in removed]
    for k in removed:
        ref.pop(k, None)
    insert(reinsert)  # removed ids come back with new rows; tombstones are reused
    probe = [k for b in batches for k in b] + removals + [12345, -1, INT64_MIN, INT64_MAX]
    assert idx.lookup(_t(probe, impl)).tolist() == [ref.get(k, -1) for k in probe]
    assert len(idx) == len(ref) and idx.num_rows == next_row
    keys, rows = idx.items()
    assert dict(zip(keys.tolist(), rows.tolist(), strict=True)) == ref
    assert rows.tolist() == sorted(rows.tolist())


@settings(max_examples=30, deadline=None)
@given(batches=st.lists(ids_lists, min_size=1, max_size=6), removals=ids_lists)
def test_compiled_and_torch_rounds_agree_and_share_the_layout(batches, removals):
    # Same rows from both; and each implementation's lookup reads the other's
    # table (same layout, same home bucket), which checks the hash, the
    # probing order and the empty/removed markers of one against the other.
    comp, rounds = make_index("compiled", max_load=0.9), make_index("torch-cpu", max_load=0.9)
    for batch in batches:
        a, b = comp.insert(torch.tensor(batch, dtype=torch.int64)), rounds.insert(torch.tensor(batch, dtype=torch.int64))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    r = torch.tensor(removals, dtype=torch.int64)
    assert torch.equal(comp.remove(r), rounds.remove(r))
    probe = torch.tensor([k for b in batches for k in b] + removals + EXTREMES, dtype=torch.int64)
    expected = comp.lookup(probe)
    assert torch.equal(rounds.lookup(probe), expected)
    # The compiled kernel over the torch-built table...
    out = torch.empty_like(probe)
    kernels.lookup(rounds._keys.numpy(), rounds._slots.numpy(), 64 - rounds._bits, probe.numpy(), out.numpy())
    assert torch.equal(out, expected)
    # ...and the torch rounds over the compiled table.
    out = torch.full_like(probe, -1)
    if len(comp):
        comp._probe(probe, out)
    assert torch.equal(out, expected)


def test_same_home_bucket_in_both_implementations():
    idx = HashIndex(expected_rows=100_000)
    keys = torch.cat([torch.tensor(EXTREMES), torch.randint(INT64_MIN, INT64_MAX, (2000,))])
    compiled = [
        kernels.home_slot(np.int64(k), 64 - idx._bits, np.int64(idx._num_buckets - 1))
        for k in keys.tolist()
    ]
    assert (idx._home(keys) * 8).tolist() == compiled


@pytest.mark.parametrize("impl", IMPLS)
def test_growth_to_millions_of_rows(impl):
    gen = torch.Generator().manual_seed(1)
    keys = torch.unique(torch.randint(INT64_MIN, INT64_MAX, (2_100_000,), generator=gen))[:2_000_000]
    keys = keys[torch.randperm(keys.numel(), generator=gen)]
    idx = make_index(impl)
    dev = "cuda" if impl == "torch-cuda" else "cpu"
    for chunk in keys.split(100_000):
        idx.insert(chunk.to(dev))
    assert len(idx) == keys.numel() == idx.num_rows
    assert 16 <= idx.nbytes() / len(idx) <= 32
    rows = idx.lookup(keys.to(dev)).cpu()
    # Chunk c got rows c*100K .. in increasing id order within the chunk.
    assert torch.equal(torch.sort(rows).values, torch.arange(keys.numel()))
    first = keys[:100_000]
    assert torch.equal(rows[:100_000], torch.argsort(torch.argsort(first)))
    assert bool((idx.lookup((keys[:1000] ^ 1).to(dev)) == -1).sum() >= 990)


@pytest.mark.parametrize("impl", IMPLS)
def test_reinsert_after_remove_reuses_slots(impl):
    idx = make_index(impl)
    idx.insert(torch.arange(1000, device=idx.device))
    cap = idx.capacity
    idx.remove(torch.arange(0, 1000, 2, device=idx.device))
    assert len(idx) == 500
    rows, new = idx.insert(torch.arange(0, 1000, 2, device=idx.device))
    assert new.numel() == 500 and int(rows.min()) == 1000 and idx.capacity == cap
    assert idx.lookup(torch.arange(1, 1000, 2, device=idx.device)).tolist() == list(range(1, 1000, 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_removals_pile_up_then_rehash(impl):
    # Insert/remove cycles fill the table with tombstones; the count of live +
    # removed entries triggers a rehash that drops them, and lookups stay right.
    idx = make_index(impl)
    live = torch.zeros(0, dtype=torch.int64)
    for i in range(20):
        batch = torch.arange(i * 500, (i + 1) * 500, device=idx.device)
        idx.insert(batch)
        idx.remove(batch[::2])
        live = torch.cat([live, batch[1::2].cpu()])
    assert len(idx) == live.numel()
    assert idx.nbytes() / len(idx) <= 2 * 32  # half the rows removed: slack stays bounded
    keys, rows = idx.items()
    assert torch.equal(torch.sort(keys.cpu()).values, live)
    assert idx.lookup(torch.arange(0, 10_000, 2, device=idx.device)).eq(-1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_rebuild(impl):
    idx = make_index(impl)
    idx.insert(_t([7, 8, 9], impl))
    idx.rebuild(_t([INT64_MIN, -1, 100], impl), _t([4, 0, 2], impl), num_rows=10)
    assert len(idx) == 3 and idx.num_rows == 10
    assert idx.lookup(_t([7, INT64_MIN, -1, 100], impl)).tolist() == [-1, 4, 0, 2]
    rows, new = idx.insert(_t([5, -1], impl))
    assert rows.tolist() == [10, 0] and new.tolist() == [5]
    idx.rebuild(_t([], impl), _t([], impl))
    assert len(idx) == 0 and idx.num_rows == 0 and idx.lookup(_t([5], impl)).tolist() == [-1]


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip(impl):
    idx = make_index(impl)
    idx.insert(_t([5, 3, 9, INT64_MIN], impl))
    idx.remove(_t([3], impl))
    other = make_index(impl)
    other.load_state_dict(idx.state_dict())
    q = _t([5, 3, 9, 1, INT64_MIN], impl)
    assert other.lookup(q).tolist() == idx.lookup(q).tolist()
    assert other.num_rows == idx.num_rows


def test_state_dict_moves_between_implementations():
    comp = make_index("compiled")
    comp.insert(torch.tensor([5, 3, 9, -1]))
    rounds = make_index("torch-cpu")
    rounds.load_state_dict(comp.state_dict())
    back = make_index("compiled")
    back.load_state_dict(rounds.state_dict())
    q = torch.tensor([5, 3, 9, -1, 4])
    assert comp.lookup(q).tolist() == rounds.lookup(q).tolist() == back.lookup(q).tolist() == [2, 1, 3, 0, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_input_not_modified_and_other_dtypes(impl):
    idx = make_index(impl)
    batch = _t([3, 1, 3], impl)
    before = batch.clone()
    idx.insert(batch)
    assert torch.equal(batch, before)
    dev = idx.device
    assert idx.lookup(torch.tensor([1, 3], dtype=torch.int32, device=dev)).tolist() == [0, 1]
    strided = torch.tensor([1, 0, 3, 0], device=dev)[::2]  # not contiguous
    assert idx.lookup(strided).tolist() == [0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_change_nothing(impl):
    idx = make_index(impl)
    idx.insert(_t([1, 2], impl))
    with pytest.raises(TypeError, match="integer"):
        idx.lookup(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        idx.insert([1, 2])
    with pytest.raises(ValueError, match="1-D"):
        idx.insert(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="distinct"):
        idx.rebuild(_t([1, 1], impl), _t([0, 1], impl))
    with pytest.raises(ValueError, match="distinct"):
        idx.rebuild(_t([1, 2], impl), _t([0, 0], impl))
    with pytest.raises(ValueError, match="num_rows"):
        idx.rebuild(_t([1, 2], impl), _t([0, 5], impl), num_rows=3)
    with pytest.raises(ValueError, match="max_load"):
        HashIndex(max_load=1.5)
    with pytest.raises(ValueError, match="expected_rows"):
        HashIndex(expected_rows=-1)
    assert len(idx) == 2 and idx.num_rows == 2
    assert idx.lookup(_t([1, 2, 3], impl)).tolist() == [0, 1, -1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("max_load", [0.5, 0.9])
def test_dense_tables_with_overflowing_buckets(impl, max_load):
    # At load 0.9 many buckets are full, so ids overflow into later buckets,
    # through inserts and through the rebuild on load.
    gen = torch.Generator().manual_seed(0)
    keys = torch.unique(torch.randint(-(1 << 62), 1 << 62, (30_000,), generator=gen))
    idx = make_index(impl, max_load=max_load)
    dev = idx.device
    keys = keys.to(dev)
    for chunk in keys.split(997):
        idx.insert(chunk)
    rows = idx.lookup(keys)
    assert torch.equal(torch.sort(rows).values, torch.arange(keys.numel(), device=dev))
    assert idx.lookup(keys + 1).eq(-1).sum() >= keys.numel() - 5  # absent ids (a few may collide with keys)
    idx.remove(keys[::3])
    other = make_index(impl, max_load=max_load)
    other.load_state_dict(idx.state_dict())
    for index in (idx, other):
        got = index.lookup(keys)
        assert torch.equal(got[::3], torch.full_like(got[::3], -1))
        keep = torch.ones(keys.numel(), dtype=torch.bool, device=dev)
        keep[::3] = False
        assert torch.equal(got[keep], rows[keep])
