"""``ReplicatedPlacement``: every rank holds every row and applies the same update.

Lookups are local. An update gathers every rank's (id, gradient) rows of all
tables in three collectives (block sizes, ids, gradient values), and each
rank applies, per id, the sum over ranks divided by the world size: the
average of the ranks' clipped gradients, identical on every replica. Expiry
runs at rank 0's clock so the replicas drop the same rows. May import
``placement.base``, ``placement.local`` and ``monolith_torch.core``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from monolith_torch.core.tensor_lists import foreach_scale_
from monolith_torch.embedding.placement.base import Placement, TableBatch
from monolith_torch.embedding.placement.local import lookup_local

__all__ = ["ReplicatedPlacement", "all_gather_tables"]


class ReplicatedPlacement(Placement):
    """Replicas over ``group``: local lookups, all-gathered averaged updates (a collective)."""

    kind = "replicated"
    collective = True

    def __init__(self, group):
        self.group = group

    def lookup(self, tables, ids, training):
        return lookup_local(tables, ids, training)

    def apply_gradients(self, batches: Sequence[TableBatch], scale, global_step: int) -> None:
        grads = [b.grads for b in batches]
        # ``scale`` is this rank's own (a deferred clip factor from its own norm):
        # fold it in before gathering, or each rank would apply its factor to
        # every rank's gradients and the replicas would drift apart.
        foreach_scale_(grads, scale)
        world = dist.get_world_size(self.group)
        gathered = all_gather_tables([b.ids for b in batches], grads, self.group)
        for b, (ids, g) in zip(batches, gathered, strict=True):
            b.table.apply_gradients(ids, g.div_(world), 1.0, global_step, insert_missing=True)

    def evict_expired(self, tables: Mapping[str, object], now: float) -> dict[str, int]:
        """A collective: every replica evicts as of rank 0's ``now``, so all drop the same rows."""
        clock = torch.tensor([float(now)], dtype=torch.float64)
        dist.broadcast(clock, src=dist.get_global_rank(self.group, 0), group=self.group)
        return super().evict_expired(tables, float(clock))


def all_gather_tables(ids_list, grads_list, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All ranks' (ids [n_r], grads [n_r, D]) of every table, concatenated in rank order.

    Three collectives for all tables together (block sizes, ids, gradient
    values), not three per table.
    """
    world = dist.get_world_size(group)
    dims = [g.shape[1] for g in grads_list]
    counts = torch.tensor([i.numel() for i in ids_list], dtype=torch.int64)
    gathered_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered_counts, counts, group=group)
    per_rank = torch.stack(gathered_counts).tolist()  # [world][tables]
    n_ids = max(sum(row) for row in per_rank)
    n_vals = max(sum(c * d for c, d in zip(row, dims, strict=True)) for row in per_rank)
    pad_ids = torch.zeros(n_ids, dtype=torch.int64)
    own_ids = torch.cat([i.cpu() for i in ids_list]) if ids_list else pad_ids[:0]
    pad_ids[: own_ids.numel()] = own_ids
    pad_vals = torch.zeros(n_vals, dtype=torch.float32)
    own_vals = torch.cat([g.reshape(-1).cpu() for g in grads_list]) if grads_list else pad_vals[:0]
    pad_vals[: own_vals.numel()] = own_vals
    all_ids = [torch.zeros_like(pad_ids) for _ in range(world)]
    all_vals = [torch.zeros_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids, group=group)
    dist.all_gather(all_vals, pad_vals, group=group)
    out_ids: list[list[torch.Tensor]] = [[] for _ in ids_list]
    out_grads: list[list[torch.Tensor]] = [[] for _ in ids_list]
    for rank_ids, rank_vals, row in zip(all_ids, all_vals, per_rank, strict=True):
        id_at = val_at = 0
        for t, (c, d) in enumerate(zip(row, dims, strict=True)):
            out_ids[t].append(rank_ids[id_at : id_at + c])
            out_grads[t].append(rank_vals[val_at : val_at + c * d].view(c, d))
            id_at, val_at = id_at + c, val_at + c * d
    return [
        (torch.cat(i).to(ids_list[t].device), torch.cat(g).to(grads_list[t].device))
        for t, (i, g) in enumerate(zip(out_ids, out_grads, strict=True))
    ]
