"""Where a factory's table rows live: one process, replicas, or row-wise shards.

Three small classes behind one interface (``base.Placement``):
``LocalPlacement``, ``ReplicatedPlacement`` and ``ShardedPlacement``.
``placement_for`` picks one from the process group; a factory calls it once,
when it is made. May import ``monolith_torch.core`` and torch.distributed.
"""

from __future__ import annotations

import torch.distributed as dist

from monolith_torch.embedding.placement.base import Placement, TableBatch, concat_or_empty
from monolith_torch.embedding.placement.local import LocalPlacement
from monolith_torch.embedding.placement.replicated import ReplicatedPlacement
from monolith_torch.embedding.placement.sharded import ShardedPlacement, ShardExchangeError

__all__ = [
    "LocalPlacement",
    "Placement",
    "ReplicatedPlacement",
    "ShardExchangeError",
    "ShardedPlacement",
    "TableBatch",
    "concat_or_empty",
    "placement_for",
]


def placement_for(process_group=None, sharded: bool = False, exchange_timeout_s: float | None = None) -> Placement:
    """The placement for the current process group.

    Local without torch.distributed initialized or with one process in the
    group; otherwise replicas over the group, or row-wise shards with ``sharded``.
    ``process_group`` None means the default group.
    """
    if not dist.is_available() or not dist.is_initialized():
        return LocalPlacement()
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return LocalPlacement()
    return ShardedPlacement(group, exchange_timeout_s) if sharded else ReplicatedPlacement(group)
