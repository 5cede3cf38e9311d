"""The interface every placement implements, and what the placements share.

A placement decides where a factory's table rows live and how one batch's
lookups, gradient updates, expiry and checkpoint state reach them:

- ``LocalPlacement`` (``local.py``): one process holds every row.
- ``ReplicatedPlacement`` (``replicated.py``): every rank holds every row and
  applies the same (all-gathered, averaged) update.
- ``ShardedPlacement`` (``sharded.py``): each id's row lives on one owner rank;
  lookups and gradients travel with ``all_to_all``.

``HashTableFeatureFactory`` picks one when it is made (``placement_for``) and
never branches on it again. May import ``monolith_torch.core`` and torch.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch

__all__ = ["Placement", "TableBatch", "concat_or_empty"]


class TableBatch:
    """One table's part of a step: ids [N], their gradients [N, D], and the rows the lookup found.

    ``rows`` [N] (int64) are the rows ``lookup`` returned while
    ``rows_generation`` was the table's ``generation``; None when the
    placement returned none (sharded) or a lookup predates a compaction.
    """

    __slots__ = ("table", "ids", "grads", "rows", "rows_generation")

    def __init__(self, table, ids: torch.Tensor, grads: torch.Tensor, rows: torch.Tensor | None,
                 rows_generation: int | None):
        self.table, self.ids, self.grads = table, ids, grads
        self.rows, self.rows_generation = rows, rows_generation


def concat_or_empty(parts: Sequence[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts)``, or ``empty`` when there are no parts (a rank may have nothing for a table)."""
    return torch.cat(parts) if parts else empty


class Placement(abc.ABC):
    """Where rows live. Every method takes the factory's tables in creation order.

    Attributes:
        kind: ``"local"``, ``"replicated"`` or ``"sharded"``.
        group: the process group the rows are spread or replicated over; None for local.
        collective: whether ``lookup``, ``apply_gradients`` and ``evict_expired``
            are collectives that every rank must call in step, with every table.
    """

    kind: str = ""
    group = None
    collective: bool = False

    def check_tables(self, tables: Sequence) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Called before each lookup with all of the factory's tables; raises if the ranks disagree on them."""

    @abc.abstractmethod
    def lookup(self, tables: Sequence, ids: Sequence[torch.Tensor], training: bool
               ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per table, the values [N_t, D_t] of ``ids[t]`` and the rows [N_t] they came from (or None).

        ``training`` counts occurrences and creates rows for admitted ids;
        without it nothing changes and ids without a row read as zeros.
        """

    @abc.abstractmethod
    def apply_gradients(self, batches: Sequence[TableBatch], scale, global_step: int) -> None:
        """Updates the rows behind each batch with ``scale`` times the per-id summed gradients.

        ``batches`` holds one entry per table (in the factory's order) when
        ``collective``; else only the tables with gradients.
        """

    def evict_expired(self, tables: Mapping[str, object], now: float) -> dict[str, int]:
        """Removes rows not updated for their table's ``expire_time``, as of ``now``; rows removed per table."""
        return {name: t.evict_expired(now) for name, t in tables.items()}

    def shard_info(self) -> tuple[int, int] | None:
        """(rank, world size) when each rank holds a shard of the rows, else None."""
        return None

    def owned_state(self, table_state: Mapping) -> Mapping:
        """The part of a saved table state this process keeps when it loads it."""
        return table_state
