"""``LocalPlacement``: one process holds every row. May import ``placement.base``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monolith_torch.embedding.placement.base import Placement, TableBatch

__all__ = ["LocalPlacement"]


def lookup_local(tables: Sequence, ids: Sequence[torch.Tensor], training: bool):
    """Each table's rows for its ids, found in this process (``Placement.lookup``)."""
    out = []
    for table, t_ids in zip(tables, ids, strict=True):
        rows = table.lookup_rows(t_ids, insert=training)
        out.append((table.gather(rows), rows))
    return out


class LocalPlacement(Placement):
    """Every row in this process; updates reuse the rows the lookup found when no compaction moved them."""

    kind = "local"

    def lookup(self, tables, ids, training):
        return lookup_local(tables, ids, training)

    def apply_gradients(self, batches: Sequence[TableBatch], scale, global_step: int) -> None:
        for b in batches:
            b.table.apply_gradients(b.ids, b.grads, scale, global_step, rows=b.rows,
                                    rows_generation=b.rows_generation)
