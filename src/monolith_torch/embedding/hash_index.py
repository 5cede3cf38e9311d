"""An int64 id -> row index: open addressing in two flat torch tensors.

The index behind each collisionless embedding table (Monolith keeps a cuckoo
hash map in C++). The map is two flat tensors, ``keys`` [C] int64 and
``slots`` [C] int32 (the row of each occupied slot, ``-1`` empty, ``-2``
removed), grouped in buckets of 8 slots (one 64-byte cache line of keys) and
probed linearly from a key's home bucket. Only ``slots`` marks a slot empty or
removed, so every int64 is a valid id (-1, INT64_MIN and INT64_MAX included).

One implementation per device type, chosen by the index's device:

- CPU: numba kernels (``kernels.py``) loop over the ids of a batch on
  zero-copy numpy views of the two tensors. A batch costs a handful of calls
  whatever its size; plain torch needed 100 to 200 small ops per call, whose
  dispatch cost dominated at the 4,096-id batches of one table per slot.
- Other devices (CUDA): vectorized probing rounds in torch. One round compares
  all still-unresolved ids with their current bucket (later rounds: a window
  of 4, 16, 64 buckets) in a handful of tensor ops; the loop runs over rounds,
  usually 1 to 3, never over ids.

Both use the same layout and the same home bucket, so they agree on every
lookup (the tests run both on the same streams). Memory: 12 bytes per slot;
the table doubles when live + removed entries exceed ``max_load`` (default
0.75) of the slots, so it holds between 16 and 32 bytes per live row (see
docs/perf/hash_table.md for the measured options).
"""

from __future__ import annotations

import torch

from monolith_torch.core.hashing import INDEX_GOLDEN, INDEX_MUL, signed64

__all__ = ["HashIndex", "with_torch_rounds"]

_EMPTY = -1
_REMOVED = -2
# Fibonacci hashing: the high bits of key * 2^64/phi spread nearby ids apart.
_GOLDEN = signed64(INDEX_GOLDEN)
_MIX = signed64(INDEX_MUL)
_BUCKET = 8
_MIN_CAPACITY = 16


def _check_keys(keys: torch.Tensor, name: str = "keys") -> torch.Tensor:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(keys).__name__}")
    if keys.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer ids, got dtype {keys.dtype}")
    if keys.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(keys.shape)}")
    return keys.long()


def _cpu_kernels():
    # Imported on first use: numba's import and the kernels' compilation (or
    # cache load) are paid only by processes that build a CPU index.
    from monolith_torch.embedding import kernels

    return kernels


def with_torch_rounds(index: HashIndex) -> HashIndex:
    """Switches an empty CPU ``index`` to the torch implementation (CUDA's).

    For tests and benchmarks only: it lets the CUDA code path run, and be
    compared with the compiled one, on a machine without a GPU.
    """
    if len(index) or index.device.type != "cpu":
        raise RuntimeError("with_torch_rounds needs an empty CPU index")
    index._kernels = None
    return index


def _next_pow2(n: int) -> int:
    return max(_MIN_CAPACITY, 1 << max(0, int(n) - 1).bit_length())


class HashIndex:
    """Maps int64 ids to dense row numbers ``0..num_rows-1``.

    New ids get the next free row numbers; removed ids leave their row number
    unused until ``rebuild`` renumbers (the embedding table compacts its rows
    and rebuilds the index when it evicts).

    Args:
        expected_rows: pre-sizes the table for this many rows.
        max_load: fraction of slots (live + removed) that triggers doubling.
        device: where the index tensors live.

    Raises:
        ValueError: ``expected_rows`` < 0 or ``max_load`` outside (0, 0.9].
    """

    def __init__(self, expected_rows: int = 0, max_load: float = 0.75, device=None):
        if not isinstance(expected_rows, int) or expected_rows < 0:
            raise ValueError(f"Invalid expected_rows: {expected_rows!r} (expected an int >= 0)")
        if not 0.0 < max_load <= 0.9:
            raise ValueError(f"Invalid max_load: {max_load!r} (expected 0 < max_load <= 0.9)")
        self._max_load = float(max_load)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        # One implementation per device type: compiled kernels over numpy views
        # for CPU tables; batched torch probing rounds elsewhere (CUDA), where
        # each op is one kernel launch over the whole batch.
        self._kernels = _cpu_kernels() if self._device.type == "cpu" else None
        self._num_live = 0
        self._num_removed = 0
        self._num_rows = 0
        self._alloc(_next_pow2(int(expected_rows / max_load) + 1))

    # -- storage -----------------------------------------------------------

    def _alloc(self, capacity: int) -> None:
        self._capacity = capacity
        self._num_buckets = capacity // _BUCKET
        self._bits = self._num_buckets.bit_length() - 1
        self._keys = torch.zeros(capacity, dtype=torch.int64, device=self._device)
        self._slots = torch.full((capacity,), _EMPTY, dtype=torch.int32, device=self._device)
        # [buckets, 8] views: one bucket of keys is one 64-byte cache line.
        self._bkeys = self._keys.view(self._num_buckets, _BUCKET)
        self._bslots = self._slots.view(self._num_buckets, _BUCKET)
        if self._kernels is not None:
            # Zero-copy numpy views for the compiled kernels.
            self._nkeys, self._nslots = self._keys.numpy(), self._slots.numpy()

    def _home(self, keys: torch.Tensor) -> torch.Tensor:
        """Home bucket of each key."""
        # A multiply-xorshift mix before Fibonacci hashing, so structured ids
        # (arithmetic progressions, ids with common low bits) still spread out.
        # Arithmetic shifts are fine here: any fixed bijective mix will do.
        x = keys * _MIX
        x = (x ^ (x >> 32)) * _GOLDEN
        # Arithmetic shift, then mask: the top ``bits`` bits as a bucket number.
        return (x >> (64 - self._bits)) & (self._num_buckets - 1)

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return self._num_live

    @property
    def num_rows(self) -> int:
        """One past the largest row number handed out (removed rows included)."""
        return self._num_rows

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def device(self) -> torch.device:
        return self._device

    def nbytes(self) -> int:
        """Bytes held by the index tensors."""
        return self._keys.numel() * 8 + self._slots.numel() * 4

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of ``keys`` [N]; ``-1`` where absent. Inserts nothing.

        Duplicates are fine. CUDA: one host sync per probing round.

        Raises:
            TypeError: keys not an integer tensor.
            ValueError: keys not 1-D.
        """
        keys = _check_keys(keys).to(self._device)
        if self._kernels is not None and self._num_live:
            out = torch.empty(keys.shape, dtype=torch.int64)
            self._kernels.lookup(self._nkeys, self._nslots, 64 - self._bits, keys.contiguous().numpy(), out.numpy())
            return out
        out = torch.full(keys.shape, -1, dtype=torch.int64, device=self._device)
        if keys.numel() == 0 or self._num_live == 0:
            return out
        self._probe(keys, out)
        return out

    def _window(self, bucket: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot positions [P, 8*width] of ``width`` buckets from ``bucket`` on, and their rows."""
        if width == 1:
            buckets = bucket[:, None]
        else:
            buckets = (bucket[:, None] + torch.arange(width, device=self._device)) & (self._num_buckets - 1)
        flat = buckets.reshape(-1)
        slots = self._bslots.index_select(0, flat).view(bucket.numel(), width * _BUCKET)
        return buckets, slots

    def _probe(self, keys: torch.Tensor, out: torch.Tensor, want_slot: bool = False) -> None:
        # Each round reads whole buckets (8 keys: one cache line) and compares
        # them at once: the home bucket first, then windows of 4, 16, 64
        # buckets, so even a long run of full buckets costs a few rounds. An id
        # lives in the first bucket from its home that had a free slot when it
        # was inserted, so a window holding an empty slot ends the search.
        bucket = self._home(keys)
        idx = None
        width = 1
        while True:
            buckets, bslots = self._window(bucket, width)
            bkeys = self._bkeys.index_select(0, buckets.reshape(-1)).view(keys.numel(), width * _BUCKET)
            found = (bkeys == keys[:, None]) & (bslots >= 0)
            hit = found.any(1)
            j = found.to(torch.uint8).argmax(1, keepdim=True)
            if want_slot:
                first = buckets.gather(1, j // _BUCKET).squeeze(1)
                res = torch.where(hit, first * _BUCKET + (j.squeeze(1) % _BUCKET), -1)
            else:
                res = torch.where(hit, bslots.gather(1, j).squeeze(1).long(), -1)
            if idx is None:
                out.copy_(res)
            else:
                out.index_copy_(0, idx, res)
            full = ~(bslots == _EMPTY).any(1)
            pending = (full & ~hit).nonzero().squeeze(1)
            if pending.numel() == 0:
                return
            idx = pending if idx is None else idx.index_select(0, pending)
            keys = keys.index_select(0, pending)
            bucket = (bucket.index_select(0, pending) + width) & (self._num_buckets - 1)
            width = min(4 * width, 64)

    def items(self, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [R], rows [R]) of the live entries, ordered by row (``ordered=False``: in slot order, no sort)."""
        keys, rows = self._live()
        if not ordered:
            return keys, rows
        order = torch.argsort(rows)
        return keys[order], rows[order]

    # -- updates -----------------------------------------------------------

    def insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys`` [N], inserting the absent ones.

        New ids get rows ``num_rows, num_rows + 1, ...`` in increasing id order
        (so the numbering does not depend on where in the batch an id appears).

        Returns:
            (rows [N] int64, new_keys [M] int64: the ids inserted, in row order).

        Raises:
            TypeError: keys not an integer tensor.
            ValueError: keys not 1-D.
        """
        keys = _check_keys(keys).to(self._device)
        if self._kernels is not None:
            return self._insert_compiled(keys.contiguous())
        rows = self.lookup(keys)
        miss_idx = (rows < 0).nonzero().squeeze(1)
        if miss_idx.numel() == 0:
            return rows, keys.new_zeros(0)
        missed = keys.index_select(0, miss_idx)
        new_keys, inverse = torch.unique(missed, return_inverse=True)
        new_rows = torch.arange(
            self._num_rows, self._num_rows + new_keys.numel(), dtype=torch.int64, device=self._device
        )
        self._reserve(new_keys.numel())
        self._place(new_keys, new_rows, fresh=self._num_live == 0 and self._num_removed == 0)
        self._num_live += new_keys.numel()
        self._num_rows += new_keys.numel()
        rows.index_copy_(0, miss_idx, new_rows.index_select(0, inverse))
        return rows, new_keys

    def _insert_compiled(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty(keys.shape, dtype=torch.int64)
        q, out = keys.numpy(), rows.numpy()
        k = self._kernels
        if self._num_live == 0:
            out.fill(-1)
        elif k.lookup(self._nkeys, self._nslots, 64 - self._bits, q, out) == 0:
            return rows, keys.new_zeros(0)
        new_keys = k.missing_keys(q, out)
        if new_keys.size == 0:
            return rows, keys.new_zeros(0)
        # Room first (a rehash replaces the arrays), then place and number.
        self._reserve(new_keys.size)
        k.insert_missing(self._nkeys, self._nslots, 64 - self._bits, q, out, new_keys, self._num_rows)
        self._num_live += new_keys.size
        self._num_rows += new_keys.size
        return rows, torch.from_numpy(new_keys)

    def _reserve(self, extra: int) -> None:
        need = self._num_live + self._num_removed + extra
        if need <= self._max_load * self._capacity:
            return
        keys, rows = self._live()
        # Doubling at least, so a stream of small inserts rehashes O(log n) times.
        capacity = max(_next_pow2(int((self._num_live + extra) / self._max_load) + 1), 2 * self._capacity)
        self._alloc(capacity)
        self._num_removed = 0
        if keys.numel():
            self._place(keys, rows, fresh=True)

    def _place_fresh(self, keys, rows32, bucket):
        # Into an empty table (rehash, rebuild): sort by bucket, and the i-th
        # id of a bucket takes slot i; no races. Returns the overflow (more
        # than 8 ids for one bucket) for the general rounds.
        order = torch.argsort(bucket, stable=True)
        bucket, keys, rows32 = bucket[order], keys[order], rows32[order]
        _, counts = torch.unique_consecutive(bucket, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=keys.numel())
        rank = torch.arange(keys.numel(), device=self._device) - starts
        fits = rank < _BUCKET
        pos = (bucket * _BUCKET + rank)[fits]
        self._keys.index_copy_(0, pos, keys[fits])
        self._slots.index_copy_(0, pos, rows32[fits])
        over = (~fits).nonzero().squeeze(1)
        return keys[over], rows32[over], bucket[over]

    def _place(self, keys: torch.Tensor, rows: torch.Tensor, fresh: bool = False) -> None:
        # ``keys`` are distinct and absent, so any empty or removed slot will do.
        # Each id takes the first free slot in its window of buckets; ids
        # racing for one slot write their key, read it back, and only the id
        # whose key stayed claims it.
        rows32 = rows.to(torch.int32)
        if self._kernels is not None:
            self._kernels.place(
                self._nkeys, self._nslots, 64 - self._bits, keys.contiguous().numpy(), rows32.contiguous().numpy()
            )
            return
        bucket = self._home(keys)
        if fresh:
            keys, rows32, bucket = self._place_fresh(keys, rows32, bucket)
        width = 1
        while keys.numel():
            buckets, bslots = self._window(bucket, width)
            free = bslots < 0
            has_free = free.any(1)
            j = free.to(torch.uint8).argmax(1, keepdim=True)
            first = buckets.gather(1, j // _BUCKET).squeeze(1)
            target = first * _BUCKET + (j.squeeze(1) % _BUCKET)
            cand = has_free.nonzero().squeeze(1)
            tpos = target.index_select(0, cand)
            ckeys = keys.index_select(0, cand)
            self._keys.index_copy_(0, tpos, ckeys)
            won = self._keys.index_select(0, tpos) == ckeys
            win = cand[won]
            self._slots.index_copy_(0, tpos[won], rows32.index_select(0, win))
            keep = torch.ones(keys.shape, dtype=torch.bool, device=self._device).index_fill_(0, win, False)
            keep = keep.nonzero().squeeze(1)
            # Losers retry from the bucket they raced for; ids without a free
            # slot in the window move past it.
            nxt = torch.where(has_free, first, (bucket + width) & (self._num_buckets - 1))
            bucket = nxt.index_select(0, keep)
            keys, rows32 = keys.index_select(0, keep), rows32.index_select(0, keep)
            width = min(4 * width, 64)

    def _live(self) -> tuple[torch.Tensor, torch.Tensor]:
        live = (self._slots >= 0).nonzero().squeeze(1)
        return self._keys.index_select(0, live), self._slots.index_select(0, live).long()

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """Removes ``keys`` (absent ones are ignored); returns the rows they held, -1 if absent."""
        keys = _check_keys(keys).to(self._device)
        keys = torch.unique(keys)
        if self._kernels is not None:
            rows = torch.empty(keys.shape, dtype=torch.int64)
            n = self._kernels.remove(self._nkeys, self._nslots, 64 - self._bits, keys.numpy(), rows.numpy())
            self._num_live -= n
            self._num_removed += n
            return rows
        rows = self.lookup(keys)
        present = rows >= 0
        if not bool(present.any()):
            return rows
        gone = keys[present]
        pos = torch.empty_like(gone)
        self._probe(gone, pos, want_slot=True)
        # Removed, not empty: probes for ids stored further on must not stop here.
        self._slots.index_fill_(0, pos, _REMOVED)
        n = gone.numel()
        self._num_live -= n
        self._num_removed += n
        return rows

    def rebuild(self, keys: torch.Tensor, rows: torch.Tensor, num_rows: int | None = None) -> None:
        """Replaces the contents with distinct ``keys`` -> distinct ``rows`` >= 0.

        Args:
            keys, rows: [R] ids and their rows.
            num_rows: the next row to hand out; default ``max(rows) + 1``.

        Raises:
            ValueError: mismatched lengths, duplicate keys or rows, negative
                rows, or ``num_rows`` <= ``max(rows)``.
        """
        keys = _check_keys(keys).to(self._device)
        rows = _check_keys(rows, "rows").to(self._device)
        if keys.shape != rows.shape:
            raise ValueError(
                f"keys and rows must have the same shape, got {tuple(keys.shape)} and {tuple(rows.shape)}"
            )
        n = keys.numel()
        top = int(rows.max()) + 1 if n else 0
        if n:
            if torch.unique(keys).numel() != n:
                raise ValueError("keys must be distinct")
            if torch.unique(rows).numel() != n or int(rows.min()) < 0:
                raise ValueError("rows must be distinct and >= 0")
        if num_rows is None:
            num_rows = top
        if num_rows < top:
            raise ValueError(f"Invalid num_rows: {num_rows!r} (expected >= max(rows) + 1 = {top})")
        self._alloc(_next_pow2(int(n / self._max_load) + 1))
        self._num_live = n
        self._num_removed = 0
        self._num_rows = int(num_rows)
        if n:
            self._place(keys, rows, fresh=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live (keys, rows) pairs; the slot layout is rebuilt on load."""
        keys, rows = self.items()
        return {"keys": keys, "rows": rows, "num_rows": torch.tensor(self._num_rows)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rebuild(state["keys"], state["rows"], int(state["num_rows"]))
