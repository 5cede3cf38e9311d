"""How an embedding table's row tensors grow: the capacity rule, and memory maps that grow in place.

A table keeps each row field (values, optimizer state, times, counts; the
occurrence filter's candidates likewise) as one tensor with spare capacity.
``RowGrowth.grow`` gives all fields of a dict one new capacity when rows run
out: 1/16 more rows, at least 1 MiB (all fields) and at most doubling, so a
large table's slack is at most 1/16 of its rows (with the index, at most 1.45x
the bytes of values and Adagrad state at dim 16 from 16 MiB of rows;
docs/PERFORMANCE.md). Small tables double from 16 rows.

On Linux the fields of a CPU table of 1 MiB or more live in private anonymous
memory maps, which ``mmap.resize`` (``mremap``) extends in place: pages move,
none is copied. The tensors are numpy views of the map, whose buffer export
makes ``resize`` refuse (``BufferError``) while any tensor of the rows lives
elsewhere (``EmbeddingTable.row_storage()`` callers): growth then copies into
a new map and never moves memory under a live tensor. Elsewhere (CUDA, other
systems) growth copies.

May import torch and numpy.
"""

from __future__ import annotations

import math
import mmap
import sys
import weakref

import numpy as np
import torch

__all__ = ["RowGrowth", "capacity", "copied"]

_MIN_ROWS = 16
_GROWTH_DIVISOR = 16
# Growth steps of at least this many bytes (all row fields), doubling below it. Row tensors this large
# live in memory maps on Linux CPUs.
_STEP_BYTES = 1 << 20
_CAN_REMAP = sys.platform.startswith("linux")  # mmap.resize is mremap there; other systems lack it


def capacity(cap: int, rows: int, row_bytes: int) -> int:
    """The capacity for ``rows`` rows of ``row_bytes`` bytes (all fields) grown from ``cap``."""
    if rows <= cap:
        return cap
    # 1/16 bounds the slack of large tables (issue 13: total <= 1.5x values +
    # optimizer state); steps of 1 MiB (doubling below it) keep a young table
    # from growing at nearly every batch, and each growth faults in pages anew.
    step = min(cap, max(cap // _GROWTH_DIVISOR, -(-_STEP_BYTES // max(row_bytes, 1))))
    return max(rows, cap + step, _MIN_ROWS)


def copied(t: torch.Tensor, cap: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` [n, ...] copied into the first rows of ``out`` (or a new tensor of ``cap`` >= n rows), the rest zeroed."""
    n = t.shape[0]
    if out is None:
        out = t.new_empty((cap,) + tuple(t.shape[1:]))
    out[:n] = t
    out[n:].zero_()
    return out


def _map_bytes(nbytes: int) -> int:
    return max(1, -(-nbytes // mmap.PAGESIZE)) * mmap.PAGESIZE


def _map_rows(mm: mmap.mmap, rows: int, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The first ``rows`` rows [rows, *tail] of the map ``mm``, not a copy.

    Made through numpy, whose array holds a buffer export of the map: while
    any tensor or view of these rows lives, ``mm.resize`` raises BufferError
    instead of moving the memory under it (``torch.frombuffer`` holds none).
    """
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(mm, dtype=np_dtype, count=rows * math.prod(tail))
    return torch.from_numpy(arr).view((rows,) + tail)


class RowGrowth:
    """Grows dicts of row tensors of one table on ``device``; remembers which fields live in which map."""

    def __init__(self, device: torch.device):
        self._device = torch.device(device)
        # Row fields in memory maps (see _grown): field -> (weakref to the map, data_ptr, bytes of its tensor).
        self._maps: dict[str, tuple[weakref.ref, int, int]] = {}

    def grow(self, fields: dict[str, torch.Tensor], rows: int) -> int:
        """Grows the tensors of ``fields`` (in the dict) to one capacity >= ``rows``; returns the first one's."""
        # No local may keep a tensor of ``fields``: it would keep a map from moving (see _grown).
        held = min(t.shape[0] for t in fields.values())
        if held < rows:
            row_bytes = sum(math.prod(t.shape[1:]) * t.element_size() for t in fields.values())
            cap = capacity(held, rows, row_bytes)
            mapped = _CAN_REMAP and self._device.type == "cpu" and cap * row_bytes >= _STEP_BYTES
            for k in list(fields):
                if fields[k].shape[0] < cap:
                    fields[k] = self._grown(fields, k, cap) if mapped else copied(fields[k], cap)
        return fields[next(iter(fields))].shape[0]

    def _grown(self, fields: dict[str, torch.Tensor], key: str, cap: int) -> torch.Tensor:
        """``fields[key]`` with ``cap`` rows in a memory map: its own map extended in place, else a copy."""
        t = fields[key]
        n, tail, dtype = t.shape[0], tuple(t.shape[1:]), t.dtype
        nbytes = cap * math.prod(tail) * t.element_size()
        ref, ptr, size = self._maps.pop(key, (None, 0, 0))
        mm = ref() if ref is not None else None
        if mm is not None and (ptr, size) == (t.data_ptr(), t.numel() * t.element_size()):
            fields[key] = t = None  # the table's references must go before the map may move
            try:
                mm.resize(_map_bytes(nbytes))  # mremap: the pages move, none is copied
                out = _map_rows(mm, cap, tail, dtype)
                # The new rows read as zeros already; writing them faults their pages in now, as
                # a copy would, so the growth pays for them and not the lookups that fill them.
                out[n:].zero_()
                return self._keep_map(key, mm, out)
            except BufferError:  # its rows are still held elsewhere (row_storage()): copy, never move them
                t = fields[key] = _map_rows(mm, n, tail, dtype)
            except BaseException:
                fields[key] = _map_rows(mm, n, tail, dtype)
                raise
        try:  # not in a map yet (new, restored, compacted), or its map is held: copy into a new one
            mm = mmap.mmap(-1, _map_bytes(nbytes), flags=mmap.MAP_PRIVATE)
        except OSError:  # out of maps (vm.max_map_count): a plain tensor
            return copied(t, cap)
        return self._keep_map(key, mm, copied(t, cap, _map_rows(mm, cap, tail, dtype)))

    def _keep_map(self, key: str, mm: mmap.mmap, rows: torch.Tensor) -> torch.Tensor:
        # A weak reference: the map lives as long as tensors of its rows do, and no longer.
        self._maps[key] = (weakref.ref(mm), rows.data_ptr(), rows.numel() * rows.element_size())
        return rows
