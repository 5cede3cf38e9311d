"""Replicated hash tables over 2 gloo processes: replicas stay identical and match one process."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig

WORLD = 2
STEPS = 4
PER_RANK = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build():
    factory = HashTableFeatureFactory(seed=5)
    slot = factory.create_feature_slot(
        FeatureSlotConfig(
            name="s", slot_id=1, has_bias=True,
            default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=0.1),
        )
    )
    vec = slot.add_feature_slice(4)
    fc = FeatureColumn(slot, "f")
    return factory, fc, vec


def _global_batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    n = WORLD * PER_RANK
    lengths = torch.randint(0, 4, (n,), generator=gen)
    ids = torch.randint(0, 30, (int(lengths.sum()),), generator=gen)  # many ids shared across ranks
    y = torch.randn(n, generator=gen)
    return ids, lengths, y


def _rank_batch(step: int, rank: int):
    ids, lengths, y = _global_batch(step)
    splits = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    lo, hi = rank * PER_RANK, (rank + 1) * PER_RANK
    a, b = int(splits[lo]), int(splits[hi])
    return RaggedTensor.from_row_lengths(ids[a:b], lengths[lo:hi]), y[lo:hi]


def _train(factory, fc, vec, batches):
    w = torch.linspace(-1, 1, 4)
    for ids, y in batches:
        factory.lookup({"f": ids})
        pred = fc.embedding_lookup(vec) @ w + fc.get_bias().squeeze(1)
        loss = (pred - y).square().mean()  # a per-rank mean
        leaf = fc.get_all_embeddings_concat()
        (grad,) = torch.autograd.grad(loss, [leaf])
        factory.apply_gradients([(grad, leaf)])


def _sorted_state(factory):
    st = factory.tables["s"].state_dict()
    order = torch.argsort(st["keys"])
    return st["keys"][order], st["values"][order], st["state.1.accumulator"][order]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=__import__("datetime").timedelta(seconds=60),
    )
    try:
        factory, fc, vec = _build()
        _train(factory, fc, vec, [_rank_batch(s, rank) for s in range(STEPS)])
        torch.save(_sorted_state(factory), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on POSIX only")
def test_replicas_identical_and_equal_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=90)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1, strict=True):
        assert torch.equal(a, b)  # bit-identical replicas

    # One process on the concatenated batch, loss a mean over it.
    factory, fc, vec = _build()
    batches = []
    for s in range(STEPS):
        ids, lengths, y = _global_batch(s)
        batches.append((RaggedTensor.from_row_lengths(ids, lengths), y))
    _train(factory, fc, vec, batches)
    keys, values, acc = _sorted_state(factory)
    assert torch.equal(keys, r0[0])
    torch.testing.assert_close(values, r0[1])
    torch.testing.assert_close(acc, r0[2])
