"""EmbeddingTable: optimizers vs numpy references, initializers, occurrence filter, expiry, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimizers import _np_state, _np_step

from monolith_torch.embedding import entry
from monolith_torch.embedding.initializers import initial_values, initial_values_torch, stream_seed
from monolith_torch.embedding.optimizers import learning_rate_at
from monolith_torch.embedding.table import EmbeddingTable


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _segment(dim, optimizer, initializer=None):
    return entry.Segment(dim, initializer or entry.ConstantsInitializer(0.5), optimizer, entry.Fp32Compressor())


def _table(*segments, **kw):
    t = EmbeddingTable(name="t", **kw)
    for seg in segments:
        t.add_feature_slice(seg)
    return t


# The numpy references of every rule live with the optimizer tests.


OPTIMIZERS = [
    entry.SgdOptimizer(learning_rate=0.1),
    entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.5),
    entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0, weight_decay_factor=0.01),
    entry.FtrlOptimizer(learning_rate=0.1, initial_accumulator_value=1e-6, beta=1.0),
    entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=0.1, beta=0.5,
                        l1_regularization=0.01, l2_regularization=0.1),
    entry.AdamOptimizer(learning_rate=0.01),
]

batch_st = st.lists(
    st.tuples(st.integers(0, 12), st.lists(st.floats(-2, 2, width=32), min_size=3, max_size=3)),
    min_size=1, max_size=20,
)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o)[:40])
@settings(max_examples=25, deadline=None)
@given(batches=st.lists(batch_st, min_size=1, max_size=4), scale=st.sampled_from([1.0, 0.5, 2.0]))
def test_optimizer_matches_numpy(opt, batches, scale):
    bias_opt = entry.SgdOptimizer(learning_rate=1.0)
    table = _table(_segment(1, bias_opt), _segment(2, opt))
    ref_w: dict[int, np.ndarray] = {}
    ref_st: dict[int, list] = {}
    for batch in batches:
        ids = torch.tensor([b[0] for b in batch], dtype=torch.int64)
        grads = torch.tensor([b[1] for b in batch], dtype=torch.float32)
        table.lookup(ids)
        table.apply_gradients(ids, grads, scale=scale)
        gsum: dict[int, np.ndarray] = {}
        for fid, g in batch:
            gsum[fid] = gsum.get(fid, 0.0) + np.asarray(g, dtype=np.float32).astype(np.float64)
        for fid, g in gsum.items():
            g = g * scale
            w = ref_w.setdefault(fid, np.full(3, 0.5))
            sts = ref_st.setdefault(fid, [_np_state(bias_opt, 1), _np_state(opt, 2)])
            w[:1] = _np_step(bias_opt, 1.0, w[:1], g[:1], sts[0])
            w[1:] = _np_step(opt, opt.learning_rate, w[1:], g[1:], sts[1])
    fids = sorted(ref_w)
    got = table.lookup(torch.tensor(fids), insert=False)
    want = torch.tensor(np.stack([ref_w[f] for f in fids]), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_learning_rate_fn_and_warmup():
    opt = entry.SgdOptimizer(learning_rate=1.0, warmup_steps=4)
    assert learning_rate_at(opt, None, 0) == 0.0
    assert learning_rate_at(opt, None, 2) == 0.5
    assert learning_rate_at(opt, None, 10) == 1.0
    assert learning_rate_at(entry.SgdOptimizer(), lambda step: 0.1 * step, 3) == pytest.approx(0.3)
    table = EmbeddingTable()
    table.add_feature_slice(_segment(1, entry.SgdOptimizer(learning_rate=1.0)), learning_rate_fn=lambda s: 0.25 * (s + 1))
    ids = torch.tensor([1])
    table.lookup(ids)
    table.apply_gradients(ids, torch.ones(1, 1), global_step=3)  # lr = 1.0
    torch.testing.assert_close(table.lookup(ids, insert=False), torch.tensor([[-0.5]]))


def test_random_uniform_reproducible_per_id():
    seg = _segment(4, entry.SgdOptimizer(learning_rate=1.0), entry.RandomUniformInitializer(-0.5, 0.5))
    a, b = _table(seg, seed=3, slot_id=1), _table(seg, seed=3, slot_id=1)
    ids = torch.arange(500) * 7919
    va = a.lookup(ids)
    vb = b.lookup(ids.flip(0)).flip(0)  # different batch order
    assert torch.equal(va, vb)
    assert torch.equal(va[3:4], _table(seg, seed=3, slot_id=1).lookup(ids[3:4]))
    assert float(va.min()) >= -0.5 and float(va.max()) <= 0.5
    assert abs(float(va.mean())) < 0.05 and float(va.std()) > 0.25  # roughly uniform
    assert not torch.equal(va, _table(seg, seed=4, slot_id=1).lookup(ids))
    assert not torch.equal(va, _table(seg, seed=3, slot_id=2).lookup(ids))
    assert not torch.equal(va[:, 0], va[:, 1])


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
INITIALIZERS = [
    entry.ZerosInitializer(),
    entry.ConstantsInitializer(0.1),
    entry.ConstantsInitializer(-3.0),
    entry.RandomUniformInitializer(),
    entry.RandomUniformInitializer(-0.5, 0.5),
    entry.RandomUniformInitializer(1e-3, 1.0 / 3),  # bounds not exact in float32
]


def _special_and_random_ids(seed: int, n: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(_INT64_MIN, _INT64_MAX, (n,), dtype=torch.int64, generator=g)
    return torch.cat([torch.tensor([-1, 0, 1, _INT64_MIN, _INT64_MAX, _INT64_MIN + 1, _INT64_MAX - 1]), rand])


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("initializer", INITIALIZERS, ids=repr)
@pytest.mark.parametrize(("seed", "slot_id"), [(0, 0), (3, 1), (-7, 12345), (_INT64_MAX, _INT64_MIN)])
@pytest.mark.parametrize(("first", "dim"), [(0, 1), (0, 16), (5, 3), (_INT64_MAX - 4, 4)])
def test_initializer_kernel_bitwise_equals_torch(initializer, seed, slot_id, first, dim):
    # The CPU implementation (compiled kernel) against the CUDA one (torch), run on CPU.
    ids = _special_and_random_ids(seed & 0xFFFF)
    cols = torch.arange(first, first + dim)
    for stream in (stream_seed(seed, slot_id), 0, -1, _INT64_MIN, _INT64_MAX):
        _assert_same_bits(initial_values(initializer, ids, cols, stream), initial_values_torch(initializer, ids, cols, stream))


@pytest.mark.parametrize("seed", [0, 11])
def test_table_rows_from_kernel_bitwise_equal_torch(seed):
    # Several slices: the kernel writes into strided blocks of the values.
    segs = [
        _segment(3, entry.AdagradOptimizer(), entry.RandomUniformInitializer(-0.2, 0.7)),
        _segment(2, entry.SgdOptimizer(), entry.ConstantsInitializer(0.3)),
        _segment(5, entry.FtrlOptimizer(), entry.RandomUniformInitializer()),
        _segment(1, entry.SgdOptimizer(), entry.ZerosInitializer()),
    ]
    compiled, torch_ops = _table(*segs, seed=seed, slot_id=4), _table(*segs, seed=seed, slot_id=4)
    assert compiled._init_kernels is not None
    torch_ops._init_kernels = None  # the CUDA implementation, on CPU
    ids = _special_and_random_ids(seed)
    for t in (compiled, torch_ops):
        for chunk in ids.split(700):  # several calls, so rows are appended and grown
            t.lookup_rows(chunk)
    _assert_same_bits(compiled.lookup(ids, insert=False), torch_ops.lookup(ids, insert=False))
    _assert_same_bits(compiled.lookup(ids, insert=False)[:, :3], initial_values_torch(
        segs[0].initializer, ids, torch.arange(3), stream_seed(seed, 4)))


def test_initial_values_rejects_unknown_initializer():
    with pytest.raises(TypeError, match="unsupported initializer"):
        initial_values(object(), torch.zeros(1, dtype=torch.int64), torch.arange(2), 0)
    with pytest.raises(TypeError, match="unsupported initializer"):
        EmbeddingTable().add_feature_slice(
            entry.Segment(2, entry.Initializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
        )


def test_zeros_and_constants():
    t = _table(_segment(2, entry.SgdOptimizer(), entry.ZerosInitializer()),
               _segment(1, entry.SgdOptimizer(), entry.ConstantsInitializer(3.0)))
    torch.testing.assert_close(t.lookup(torch.tensor([4, 5])), torch.tensor([[0.0, 0.0, 3.0]] * 2))


def test_occurrence_filter():
    t = _table(_segment(2, entry.SgdOptimizer(learning_rate=1.0)), occurrence_threshold=3)
    ids = torch.tensor([1, 2, 1])
    v = t.lookup(ids)  # id 1 seen twice, id 2 once
    assert torch.equal(v, torch.zeros(3, 2)) and len(t) == 0
    assert t.apply_gradients(ids, torch.ones(3, 2)) == 0  # dropped: no rows
    v = t.lookup(torch.tensor([1, 2]))  # id 1 reaches 3: admitted now
    torch.testing.assert_close(v, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert len(t) == 1
    t.apply_gradients(torch.tensor([1, 2]), torch.ones(2, 2))
    torch.testing.assert_close(t.lookup(torch.tensor([1]), insert=False), torch.tensor([[-0.5, -0.5]]))
    assert int(t.state_dict()["counts"][0]) == 3
    t.lookup(torch.tensor([2, 2]))
    assert len(t) == 2
    assert int(t.state_dict()["counts"][1]) == 4  # seen once, once, then twice


def test_lookup_without_insert_changes_nothing():
    t = _table(_segment(2, entry.SgdOptimizer()), occurrence_threshold=2)
    before = t.state_dict()
    assert torch.equal(t.lookup(torch.tensor([1, 1, 1]), insert=False), torch.zeros(3, 2))
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_expiry():
    clock = FakeClock()
    t = _table(_segment(2, entry.SgdOptimizer(learning_rate=1.0)), expire_time=1, time_fn=clock)
    t.lookup(torch.tensor([1, 2, 3]))
    clock.t += 0.5 * 86400
    t.apply_gradients(torch.tensor([2]), torch.ones(1, 2))
    assert t.evict_expired(clock.t) == 0
    clock.t += 0.75 * 86400  # 1.25 days after 1 and 3 were created, 0.75 after 2 was updated
    assert t.evict_expired() == 2
    assert len(t) == 1
    torch.testing.assert_close(t.lookup(torch.tensor([2, 1]), insert=False), torch.tensor([[-0.5, -0.5], [0.0, 0.0]]))
    # Evicted ids come back fresh.
    torch.testing.assert_close(t.lookup(torch.tensor([1])), torch.tensor([[0.5, 0.5]]))


def test_expiry_drops_stale_filter_candidates():
    clock = FakeClock()
    t = _table(_segment(1, entry.SgdOptimizer()), occurrence_threshold=2, expire_time=1, time_fn=clock)
    t.lookup(torch.tensor([9]))
    clock.t += 2 * 86400
    t.evict_expired()
    t.lookup(torch.tensor([9]))  # the count restarted: still not admitted
    assert len(t) == 0


def test_bad_input_changes_nothing():
    t = _table(_segment(2, entry.SgdOptimizer(learning_rate=1.0)))
    ids = torch.tensor([1, 2])
    t.lookup(ids)
    before = t.state_dict()
    with pytest.raises(ValueError, match="shape"):
        t.apply_gradients(ids, torch.ones(3, 2))
    with pytest.raises(ValueError, match="shape"):
        t.apply_gradients(ids, torch.ones(2, 5))
    with pytest.raises(TypeError, match="integers"):
        t.apply_gradients(torch.tensor([1.0, 2.0]), torch.ones(2, 2))
    with pytest.raises(TypeError, match="floating"):
        t.apply_gradients(ids, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integers"):
        t.lookup(torch.tensor([0.5]))
    after = t.state_dict()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, after[k]), k
    with pytest.raises(ValueError, match="occurrence_threshold"):
        EmbeddingTable(occurrence_threshold=-1)
    with pytest.raises(ValueError, match="expire_time"):
        EmbeddingTable(expire_time=0)
    with pytest.raises(RuntimeError, match="already holds rows"):
        t.add_feature_slice(_segment(1, entry.SgdOptimizer()))


def test_state_dict_round_trip_bit_identical():
    seg = _segment(3, entry.AdagradOptimizer(learning_rate=0.1), entry.RandomUniformInitializer())
    a = _table(seg, occurrence_threshold=2)
    ids = torch.randint(0, 50, (200,))
    a.lookup(ids)
    a.apply_gradients(ids, torch.randn(200, 3))
    b = _table(seg, occurrence_threshold=2)
    b.load_state_dict(a.state_dict())
    q = torch.arange(60)
    assert torch.equal(a.lookup(q, insert=False), b.lookup(q, insert=False))
    g = torch.randn(200, 3)
    for t in (a, b):
        t.lookup(ids)
        t.apply_gradients(ids, g)
    assert torch.equal(a.lookup(q, insert=False), b.lookup(q, insert=False))
    bad = dict(a.state_dict())
    bad["values"] = bad["values"][:, :2]
    with pytest.raises(ValueError, match="values"):
        b.load_state_dict(bad)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_device_matches_cpu(device):
    seg = _segment(3, entry.AdagradOptimizer(learning_rate=0.1), entry.RandomUniformInitializer())
    ref, dev = _table(seg), _table(seg, device=device)
    ids = torch.randint(0, 100, (500,), generator=torch.Generator().manual_seed(0))
    grads = torch.randn(500, 3, generator=torch.Generator().manual_seed(1))
    for t in (ref, dev):
        t.lookup(ids.to(t.device))
        t.apply_gradients(ids.to(t.device), grads.to(t.device))
    q = torch.arange(100)
    torch.testing.assert_close(dev.lookup(q.to(device), insert=False).cpu(), ref.lookup(q, insert=False))
