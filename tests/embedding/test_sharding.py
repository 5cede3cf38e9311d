"""Row-wise sharding in one process: owner hash, shard state helpers, the exchange on a group of one.

The multi-process behaviour (2 and 3 ranks against one process, resharding,
faults, torchrun) is in tests/distributed/test_sharded_tables.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.embedding.placement.sharded import (
    merge_table_states,
    select_owned,
    shard_owner,
    sharded_apply_gradients,
    sharded_lookup,
)
from monolith_torch.embedding.table import EmbeddingTable

# --- owner hash ---------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_owner_in_range_and_deterministic(world):
    ids = torch.cat([torch.arange(-1000, 1000), torch.tensor([2**63 - 1, -(2**63), 0, -1])])
    owner = shard_owner(ids, world)
    assert owner.dtype == torch.int64 and owner.shape == ids.shape
    assert bool(((owner >= 0) & (owner < world)).all())
    assert torch.equal(owner, shard_owner(ids.clone(), world))
    assert torch.equal(shard_owner(ids[500:600].to(torch.int32), world), owner[500:600])


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("stride", [1, 8, 1024])
def test_owner_spreads_sequential_and_strided_ids(world, stride):
    # ``id % world`` would put every multiple of ``world`` on rank 0; a mixed hash does not.
    ids = torch.arange(20000) * stride
    counts = torch.bincount(shard_owner(ids, world), minlength=world).float()
    expected = ids.numel() / world
    assert float((counts - expected).abs().max()) < 0.05 * expected, counts


def test_owner_is_a_fixed_function():
    # Shards written by one version are read by the next: pin a few values (fmix64, then mod world).
    ids = torch.tensor([0, 1, 2, 3, 12345, -7])
    assert shard_owner(ids, 3).tolist() == [0, 0, 0, 2, 0, 1]
    assert shard_owner(ids, 8).tolist() == [0, 4, 7, 6, 1, 6]


@pytest.mark.parametrize("world", [0, -1, True, 2.0, None])
def test_owner_rejects_bad_world(world):
    with pytest.raises(ValueError, match="Invalid world"):
        shard_owner(torch.arange(3), world)


# --- shard state helpers --------------------------------------------------------------


def _table(threshold=2):
    t = EmbeddingTable("t", slot_id=3, seed=1, occurrence_threshold=threshold, time_fn=lambda: 1000)
    t.add_feature_slice(entry.Segment(3, entry.RandomUniformInitializer(), entry.AdagradOptimizer(0.1, 0.1), entry.Fp32Compressor()))
    ids = torch.randint(-(2**40), 2**40, (60,), generator=torch.Generator().manual_seed(0))
    t.lookup_rows(torch.cat([ids, ids[:40]]))  # 40 admitted, 20 candidates
    return t, ids


def test_select_owned_partitions_and_merge_restores():
    table, ids = _table()
    state = table.state_dict()
    assert state["keys"].numel() == 40 and state["cand_keys"].numel() == 20
    parts = [select_owned(state, r, 3) for r in range(3)]
    assert sum(p["keys"].numel() for p in parts) == 40
    assert sum(p["cand_keys"].numel() for p in parts) == 20
    assert all(p["keys"].numel() for p in parts)  # each rank got some
    merged = merge_table_states(parts)
    restored, _ = _table()
    restored.load_state_dict(merged)
    assert torch.equal(restored.lookup(ids, insert=False), table.lookup(ids, insert=False))
    assert torch.equal(torch.sort(merged["cand_keys"]).values, torch.sort(state["cand_keys"]).values)
    # Input left as it was.
    assert torch.equal(state["keys"], table.state_dict()["keys"])


def test_merge_rejects_mismatched_or_no_shards():
    table, _ = _table()
    a = table.state_dict()
    b = dict(a, slices=[[4, "AdagradOptimizer"]])
    with pytest.raises(ValueError, match=r"Invalid states\[1\]"):
        merge_table_states([a, b])
    with pytest.raises(ValueError, match="Invalid states"):
        merge_table_states([])


# --- factory arguments --------------------------------------------------------------


def test_factory_rejects_bad_sharding_arguments():
    with pytest.raises(TypeError, match="sharded must be a bool"):
        HashTableFeatureFactory(sharded="yes")
    for bad in (0, -1.0, True, "5"):
        with pytest.raises(ValueError, match="Invalid exchange_timeout_s"):
            HashTableFeatureFactory(sharded=True, exchange_timeout_s=bad)


def _build(sharded):
    factory = HashTableFeatureFactory(seed=2, sharded=sharded, time_fn=lambda: 5000)
    slot = factory.create_feature_slot(
        FeatureSlotConfig(name="s", slot_id=1, has_bias=True, occurrence_threshold=2,
                          default_vec_optimizer=entry.AdamOptimizer(learning_rate=0.1))
    )
    vec = slot.add_feature_slice(4)
    return factory, FeatureColumn(slot, "f"), vec


def _train(factory, fc, vec, steps=3):
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        lengths = torch.randint(0, 4, (6,), generator=g)
        ids = torch.randint(0, 15, (int(lengths.sum()),), generator=g)
        factory.lookup({"f": RaggedTensor.from_row_lengths(ids, lengths)})
        loss = (fc.embedding_lookup(vec).sum(1) + fc.get_bias().squeeze(1)).square().mean()
        leaf = fc.get_all_embeddings_concat()
        factory.apply_gradients([(torch.autograd.grad(loss, [leaf])[0], leaf)])
    return factory.state_dict()["tables"]["s"]


def test_sharded_without_a_group_is_the_plain_factory():
    a = _train(*_build(False))
    factory, fc, vec = _build(True)
    b = _train(factory, fc, vec)
    assert factory.shard_group() is None and factory.shard_info() is None
    assert "shard" not in factory.state_dict()
    for k in a:
        if k != "slices":
            assert torch.equal(a[k], b[k]), k


# --- the exchange itself, on a group of one process -------------------------------


@pytest.fixture
def solo_group():
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_exchange_on_one_rank_equals_local_table_calls(solo_group):
    # The pack / route / unpack code with every rank's blocks on one rank: duplicates,
    # an empty table and two widths in one exchange.
    t1, ids1 = _table()
    t2, _ = _table(threshold=0)
    r1, _ = _table()
    r2, _ = _table(threshold=0)
    batch1 = torch.cat([ids1[:50], ids1[:10]])
    empty = torch.zeros(0, dtype=torch.int64)
    got = sharded_lookup([t1, t2], [batch1, empty], True, solo_group)
    want = r1.lookup(batch1)
    assert torch.equal(got[0], want) and got[1].shape == (0, 3)
    assert r2.lookup(empty).shape == (0, 3)
    for a, b in ((t1, r1), (t2, r2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "slices")
    grads = torch.randn(batch1.numel(), 3, generator=torch.Generator().manual_seed(1))
    sharded_apply_gradients([t1, t2], [batch1, empty], [grads, torch.zeros(0, 3)], 0.5, 0, solo_group)
    r1.apply_gradients(batch1, grads, 0.5, 0)
    torch.testing.assert_close(t1.lookup(batch1, insert=False), r1.lookup(batch1, insert=False))
    # A 0-d tensor scale (the deferred clip factor) folds in like a float.
    sharded_apply_gradients([t1, t2], [batch1, empty], [grads, torch.zeros(0, 3)], torch.tensor(0.25), 1,
                            solo_group)
    r1.apply_gradients(batch1, grads, 0.25, 1)
    torch.testing.assert_close(t1.lookup(batch1, insert=False), r1.lookup(batch1, insert=False))
    got = sharded_lookup([t1], [ids1], False, solo_group)  # serving: no counts, no new rows
    assert torch.equal(got[0], r1.lookup(ids1, insert=False))
    assert len(t1) == len(r1)
