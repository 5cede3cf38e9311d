"""A parameter unused on one rank only: every rank still reduces the same list (zeros for it)."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monolith_torch import (
    AllreduceConfig,
    GradClipType,
    NativeContext,
    apply_gradients_with_var_optimizer,
)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fusion: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    try:
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([a, b], lr=1.0)
        config = AllreduceConfig(fusion=fusion, timeout=datetime.timedelta(seconds=10))
        for _ in range(2):
            # Rank 1's batch never touches b.
            loss = a.sum() * (rank + 1) + (b.sum() * 4.0 if rank == 0 else 0.0)
            result = apply_gradients_with_var_optimizer(NativeContext(), [], opt, loss, GradClipType.NoClip,
                                                        use_allreduce=True, allreduce_config=config)
            assert result.allreduced and result.num_dense == 2
        out[rank] = (a.detach().clone(), b.detach().clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fusion", ["none", "one", "grouped"])
def test_parameter_unused_on_one_rank(fusion):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), fusion, out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        a, b = out[rank]
        # Average gradients: a (1 + 2) / 2 = 1.5, b (4 + 0) / 2 = 2; two SGD steps of lr 1.
        torch.testing.assert_close(a, torch.full((3,), -3.0))
        torch.testing.assert_close(b, torch.full((2,), -4.0))
