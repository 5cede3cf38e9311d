"""Row-wise sharded embedding tables: every id's row lives on exactly one rank.

The owner of an id is ``fmix64(id) mod world`` (MurmurHash3's 64-bit
finalizer, so sequential ids spread evenly), as TorchRec's row-wise sharding
and Monolith's sync training place rows. ``HashTableFeatureFactory(sharded=True)``
uses the functions here:

- ``sharded_lookup``: each rank deduplicates its ids per table, sends the
  unique ids (with their occurrence counts when training, so the owner's
  occurrence filter counts every rank's occurrences) to their owners with one
  ``all_to_all_single``; owners look the rows up (creating admitted rows) and
  send the values back with a second one.
- ``sharded_apply_gradients``: each rank sums the gradients of its duplicate
  ids, folds in ``scale / world``, and sends (id, gradient) rows to the owners
  in one ``all_to_all_single``; each owner applies the per-id sum with its
  slices' optimizers.

All tables travel in one collective per direction (blocks grouped by peer,
then table), after one small ``all_to_all_single`` of the [world, tables]
block sizes. gloo implements ``all_to_all_single`` with uneven splits on CPU
(its list form ``all_to_all`` needs equal sizes, so it is not used); NCCL on
GPU. Tensors are exchanged on the table's device.

Checkpoint helpers (``select_owned``, ``merge_table_states``) let a shard set
written by ``world`` ranks be restored onto any number of ranks by re-hashing.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from monolith_torch.core.hashing import fmix64
from monolith_torch.core.tensor_lists import foreach_scale_
from monolith_torch.embedding import table_state as ts
from monolith_torch.embedding.placement.base import Placement, TableBatch

__all__ = [
    "ShardExchangeError",
    "ShardedPlacement",
    "shard_owner",
    "sharded_lookup",
    "sharded_apply_gradients",
    "select_owned",
    "merge_table_states",
]



class ShardExchangeError(RuntimeError):
    """A sharded-table exchange failed: a peer died, left, or did not answer within the timeout."""


def shard_owner(ids: torch.Tensor, world: int) -> torch.Tensor:
    """The owning rank [N] (int64, in ``[0, world)``) of each id in ``ids`` [N].

    A fixed function of the id and ``world`` only (no seed, no process state),
    so every rank, and a restore onto another world size, agree on it.

    Raises:
        ValueError: ``world`` < 1.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"Invalid world: {world!r} (expected an int >= 1)")
    x = fmix64(ids.to(torch.int64))
    return torch.remainder(x & ((1 << 63) - 1), world)


# -- exchange primitives -------------------------------------------------------


def _all_to_all(out, inp, out_splits, in_splits, group, timeout, what: str) -> None:
    try:
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise ShardExchangeError(
            f"sharded tables: {what} failed on rank {rank} of {world} (a peer died, left the job or did not "
            f"answer within the timeout{'' if timeout is None else f' of {timeout} s'}): {e}"
        ) from e


def _exchange_blocks(
    blocks: Sequence[torch.Tensor],
    send_counts: list[list[int]],
    recv_counts: list[list[int]],
    group,
    timeout,
    what: str,
) -> list[torch.Tensor]:
    """Sends table ``t``'s rows, grouped by destination rank, in one ``all_to_all_single``.

    Args:
        blocks: per table, [n_t, w_t] rows sorted by destination rank; all the same dtype.
        send_counts: ``send_counts[p][t]``, rows of table t for rank p.
        recv_counts: ``recv_counts[p][t]``, rows of table t coming from rank p.

    Returns:
        Per table, [sum_p recv_counts[p][t], w_t] rows ordered by source rank.
    """
    world, n_tables = len(send_counts), len(blocks)
    if n_tables == 0:
        return []
    widths = [b.shape[1] for b in blocks]
    chunks = [b.split([send_counts[p][t] for p in range(world)]) for t, b in enumerate(blocks)]
    inp = torch.cat([chunks[t][p].reshape(-1) for p in range(world) for t in range(n_tables)])
    in_splits = [sum(send_counts[p][t] * widths[t] for t in range(n_tables)) for p in range(world)]
    out_splits = [sum(recv_counts[p][t] * widths[t] for t in range(n_tables)) for p in range(world)]
    out = inp.new_empty(sum(out_splits))
    _all_to_all(out, inp, out_splits, in_splits, group, timeout, what)
    pieces = out.split([recv_counts[p][t] * widths[t] for p in range(world) for t in range(n_tables)])
    return [
        torch.cat([pieces[p * n_tables + t] for p in range(world)]).view(-1, widths[t]) for t in range(n_tables)
    ]


class _Route:
    """Where one rank's unique ids of each table go, and how many arrive from each peer."""

    def __init__(self, uniques: Sequence[torch.Tensor], group, timeout, what: str):
        world = dist.get_world_size(group)
        self.orders, counts = [], []
        for u in uniques:
            owner = shard_owner(u, world)
            self.orders.append(torch.argsort(owner, stable=True))
            counts.append(torch.bincount(owner, minlength=world).cpu())
        n_tables = len(uniques)
        send = torch.stack(counts, 1) if counts else torch.zeros((world, 0), dtype=torch.int64)
        recv = torch.empty_like(send)
        if n_tables:
            _all_to_all(recv.view(-1), send.reshape(-1), [n_tables] * world, [n_tables] * world, group, timeout,
                        f"{what} (block sizes)")
        # Python ints for the split sizes: one host copy of [world, tables] numbers per exchange.
        self.send_counts, self.recv_counts = send.tolist(), recv.tolist()
        self.group, self.timeout = group, timeout


# -- lookup and update -----------------------------------------------------------


def sharded_lookup(tables: Sequence, ids: Sequence[torch.Tensor], training: bool, group, timeout=None):
    """Values of ``ids[t]`` [N_t] from table ``tables[t]``'s owners: a list of [N_t, D_t].

    A collective: every rank of ``group`` calls it with the same tables in the
    same order (its own ids, possibly none). With ``training`` the owners count
    every occurrence (from every rank) for the occurrence filter and create
    rows for admitted ids, as ``EmbeddingTable.lookup_rows(insert=True)`` on
    the concatenation of all ranks' ids would; without it nothing changes.
    Ids without a row read as zeros.

    Raises:
        ShardExchangeError: a peer failed or timed out.
    """
    uniques, inverses, occurrences = [], [], []
    for t_ids in ids:
        u, inv, cnt = torch.unique(t_ids, return_inverse=True, return_counts=True)
        uniques.append(u)
        inverses.append(inv)
        occurrences.append(cnt)
    route = _Route(uniques, group, timeout, "lookup")
    if training:
        payload = [torch.stack([u[o], c[o]], 1) for u, c, o in zip(uniques, occurrences, route.orders, strict=True)]
    else:
        payload = [u[o][:, None] for u, o in zip(uniques, route.orders, strict=True)]
    asked = _exchange_blocks(payload, route.send_counts, route.recv_counts, group, timeout, "lookup (ids)")
    answers = []
    for table, req in zip(tables, asked, strict=True):
        req_ids = req[:, 0].to(table.device)
        if training:
            occ = req[:, 1].to(table.device)
            # Every occurrence goes through the table's own admission logic, so the
            # filter sees exactly what one process on the concatenated batch would.
            first = torch.cumsum(occ, 0) - occ
            rows = table.lookup_rows(req_ids.repeat_interleave(occ), insert=True)[first]
        else:
            rows = table.lookup_rows(req_ids, insert=False)
        answers.append(table.gather(rows))
    back = _exchange_blocks(answers, route.recv_counts, route.send_counts, group, timeout, "lookup (rows)")
    out = []
    for vals, order, inv in zip(back, route.orders, inverses, strict=True):
        per_unique = torch.empty_like(vals)
        per_unique[order] = vals
        out.append(per_unique[inv])
    return out


def sharded_apply_gradients(
    tables: Sequence, ids: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale, global_step: int,
    group, timeout=None,
) -> None:
    """Sends per-id summed ``scale * grads / world`` to the owners; each owner updates its rows.

    ``ids[t]`` [N_t] with ``grads[t]`` [N_t, D_t] (duplicates allowed). Each
    owner applies, per id, the sum over ranks of ``scale_r * g_r / world``:
    the average over ranks of each rank's clipped gradient, as the replicated
    path does. Ids without a row (not admitted by the owner's occurrence
    filter) are dropped. A collective, like ``sharded_lookup``.

    Raises:
        ShardExchangeError: a peer failed or timed out.
    """
    world = dist.get_world_size(group)
    uniques, sums = [], []
    for t_ids, g in zip(ids, grads, strict=True):
        u, inv = torch.unique(t_ids, return_inverse=True)
        s = torch.zeros((u.numel(), g.shape[1]), dtype=torch.float32, device=g.device).index_add_(0, inv, g.float())
        foreach_scale_([s], scale / world)
        uniques.append(u)
        sums.append(s)
    route = _Route(uniques, group, timeout, "gradients")
    # Ids ride in the float buffer as raw bits (two float32 words each): one collective, no arithmetic on them.
    payload = [
        torch.cat([u[o].view(torch.float32).view(-1, 2), s[o]], 1)
        for u, s, o in zip(uniques, sums, route.orders, strict=True)
    ]
    got = _exchange_blocks(payload, route.send_counts, route.recv_counts, group, timeout, "gradients")
    for table, rows in zip(tables, got, strict=True):
        rid = rows[:, :2].reshape(-1).view(torch.int64)
        table.apply_gradients(rid.to(table.device), rows[:, 2:].to(table.device), 1.0, global_step)


class ShardedPlacement(Placement):
    """Row-wise shards over ``group``: every method but ``owned_state`` is a collective.

    Args:
        group: the process group (more than one rank).
        timeout: seconds each exchange may wait for its peers before raising
            ``ShardExchangeError``; None uses the group's timeout.
    """

    kind = "sharded"
    collective = True

    def __init__(self, group, timeout: float | None = None):
        self.group = group
        self.timeout = timeout
        self._checked_layout = None  # the slot layout last agreed on by all ranks

    def lookup(self, tables, ids, training):
        values = sharded_lookup(tables, ids, training, self.group, self.timeout)
        return [(v, None) for v in values]

    def apply_gradients(self, batches: Sequence[TableBatch], scale, global_step: int) -> None:
        sharded_apply_gradients([b.table for b in batches], [b.ids for b in batches], [b.grads for b in batches],
                                scale, global_step, self.group, self.timeout)

    def shard_info(self) -> tuple[int, int]:
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def owned_state(self, table_state: Mapping) -> Mapping:
        return select_owned(table_state, *self.shard_info())

    def check_tables(self, tables) -> None:
        """Every rank must hold the same tables in the same order: checked (a collective) once per layout."""
        layout = [(t.name, t.dim, t.feature_names) for t in tables]
        if layout == self._checked_layout:
            return
        layouts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(layouts, layout, group=self.group)
        differ = [r for r, other in enumerate(layouts) if other != layouts[0]]
        if differ:
            raise RuntimeError(
                f"sharded tables: ranks {differ} registered other slots than rank 0 "
                f"(rank 0: {layouts[0]}; rank {differ[0]}: {layouts[differ[0]]}); every rank must create "
                "the same slots, features and slices in the same order"
            )
        self._checked_layout = layout


# -- checkpoint helpers ----------------------------------------------------------


def select_owned(state: Mapping, rank: int, world: int) -> dict:
    """The rows (and occurrence-filter candidates) of a table ``state_dict`` that ``rank`` owns."""
    return ts.select_rows(
        state, shard_owner(state[ts.KEYS], world) == rank, shard_owner(state[ts.CAND_KEYS], world) == rank
    )


def merge_table_states(states: Sequence[Mapping]) -> dict:
    """One table ``state_dict`` holding the rows of all ``states`` (disjoint shards of one table).

    Raises:
        ValueError: no shards, or the shards disagree on their slices or keys.
    """
    return ts.concat_states(states)
