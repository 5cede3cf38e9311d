"""Joining the job's processes: torchrun's torch.distributed group, or Horovod plus a gloo group beside it.

May import ``monolith_torch.distributed`` and torch.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from monolith_torch.distributed.allreduce import AllreduceConfig

__all__ = ["init_distributed"]


def _init_horovod(backend: str, timeout: datetime.timedelta) -> tuple[int, int]:
    """``hvd.init()``, plus a torch.distributed group with Horovod's ranks (see ``init_distributed``)."""
    import horovod.torch as hvd

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    launched = os.environ.get("WORLD_SIZE", "1")
    if world == 1 and launched != "1":
        raise RuntimeError(
            f"MONOLITH_WITH_HOROVOD is set and WORLD_SIZE={launched}, but Horovod sees one "
            "process: launch with horovodrun, or unset MONOLITH_WITH_HOROVOD for torchrun"
        )
    if world > 1 and not dist.is_initialized():
        if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:
            import socket

            chosen = None
            if rank == 0:
                host = os.environ.get("HOROVOD_HOSTNAME", "")
                chosen_addr = socket.gethostbyname(host) if host else "127.0.0.1"
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((chosen_addr, 0))
                    chosen = (chosen_addr, sock.getsockname()[1])
            addr, port = hvd.broadcast_object(chosen, root_rank=0, name="monolith.dist_address")
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank,
            world_size=world, timeout=timeout,
        )
    return rank, world


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Joins the job's process group(s); returns (rank, world size).

    Under ``torchrun`` (``WORLD_SIZE`` > 1): joins torch.distributed's default group
    (NCCL with CUDA, else gloo).

    Under ``horovodrun`` with ``MONOLITH_WITH_HOROVOD`` true (the variable
    :meth:`AllreduceConfig.from_env` reads, so the dense allreduce then runs on
    Horovod): calls ``hvd.init()`` and takes rank and size from Horovod. The replicated
    embedding tables and the per-step stop agreement use torch.distributed, so a
    torch.distributed group is brought up as well, with Horovod's rank and size. Its
    address: ``MASTER_ADDR``/``MASTER_PORT`` when both are set; otherwise rank 0 takes
    its own address (``HOROVOD_HOSTNAME``, the host name horovodrun started it on,
    resolved; 127.0.0.1 if unset) and a free port, and broadcasts them with
    ``hvd.broadcast_object``. A port picked by rank 0 cannot collide with another job
    on the host, which a port derived from Horovod's rendezvous port could, and
    rank 0 need not run on the launcher's host.

    Args:
        timeout_s: torch.distributed's timeout for joining and for each collective.
            Horovod's own waits are bounded by ``HOROVOD_GLOO_TIMEOUT_SECONDS``.

    Returns:
        ``(rank, world)``; ``(0, 1)`` for a single process.

    Raises:
        RuntimeError: started by ``horovodrun`` (``HOROVOD_SIZE`` > 1) without
            ``MONOLITH_WITH_HOROVOD``, or by ``torchrun`` with it, where every process
            would train alone.
        ImportError: ``MONOLITH_WITH_HOROVOD`` set but ``horovod.torch`` not built.
    """

    # The trainer keeps its tensors on the CPU; with CUDA present, NCCL serves CUDA tensors beside gloo.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if AllreduceConfig.from_env().backend == "horovod":
        return _init_horovod(backend, timeout)
    hvd_size = os.environ.get("HOROVOD_SIZE", "1")
    if "WORLD_SIZE" not in os.environ and hvd_size.isdigit() and int(hvd_size) > 1:
        raise RuntimeError(
            f"started by horovodrun (HOROVOD_SIZE={hvd_size}) without MONOLITH_WITH_HOROVOD: "
            "every process would train alone; set MONOLITH_WITH_HOROVOD=1, or launch with torchrun"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()
