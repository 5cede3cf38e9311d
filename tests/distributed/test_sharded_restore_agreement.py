"""A sharded restore is all or nothing: one rank's bad shard fails every rank, and none loads."""

from __future__ import annotations

import datetime
import glob
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monolith_torch import (
    FeatureColumn,
    FeatureSlotConfig,
    HashTableFeatureFactory,
    NativeContext,
    RaggedTensor,
    entry,
)
from monolith_torch.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _factory() -> tuple[HashTableFeatureFactory, FeatureColumn]:
    factory = HashTableFeatureFactory(seed=1, sharded=True, exchange_timeout_s=20)
    slot = factory.create_feature_slot(
        FeatureSlotConfig(name="s", slot_id=1, default_vec_optimizer=entry.SgdOptimizer(learning_rate=1.0))
    )
    slot.add_feature_slice(2)
    return factory, FeatureColumn(slot, "f")


def _worker(rank: int, port: int, directory: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        factory, fc = _factory()
        ids = RaggedTensor.from_row_splits(torch.arange(8) + 10 * rank, torch.arange(9))
        factory.lookup({"f": ids})
        leaf = fc.get_all_embeddings_concat()
        factory.apply_gradients([(torch.ones_like(leaf), leaf)])
        path = os.path.join(directory, "ckpt.pt")
        save_checkpoint(path, NativeContext(feature_factory=factory))
        dist.barrier()
        if rank == 0:
            (shard,) = glob.glob(path + ".*.shard-00001-of-00002")
            with open(shard, "r+b") as f:  # corrupt rank 1's shard
                f.seek(-8, os.SEEK_END)
                f.write(b"\x00" * 8)
        dist.barrier()
        fresh, _ = _factory()
        try:
            restore_checkpoint(path, NativeContext(feature_factory=fresh))
            out[rank] = "restored"
        except CheckpointError as e:
            out[rank] = str(e)
        out[f"{rank}:rows"] = sum(len(t) for t in fresh.tables.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_one_bad_shard_fails_every_rank(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), out), nprocs=WORLD, join=True)
    assert "shard-00001-of-00002" in out[1] and "corrupt" in out[1]
    assert "rank 1 cannot restore it" in out[0]
    assert out["0:rows"] == 0 and out["1:rows"] == 0  # nothing was loaded anywhere
