"""The one definition of an ``EmbeddingTable``'s ``state_dict`` layout, and row-wise helpers on it.

A table state is a flat dict, in this order (checkpoints store it as is)::

    "slices"             [[dim, optimizer type name], ...] per slice
    "keys"               [R] int64     ids with a row
    "values"             [R, D] float32
    "times"              [R] int64     last update, seconds since the epoch
    "counts"             [R] int64     occurrences seen
    "cand_keys"          [C] int64     ids the occurrence filter holds back
    "cand_counts"        [C] int64
    "cand_times"         [C] int64     last seen
    "state.{i}.{name}"   [R, d_i] float32, per slice i and optimizer state name

Row fields (``keys`` .. ``counts`` and every ``state.*``) share the row axis,
candidate fields theirs. The table writes and checks states with these
helpers; the sharded placement splits and merges them, the trainer digests
them, all through the names here.

May import torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "CAND_COUNTS",
    "CAND_FIELDS",
    "CAND_KEYS",
    "CAND_TIMES",
    "COUNTS",
    "KEYS",
    "ROW_FIELDS",
    "SLICES",
    "TIMES",
    "VALUES",
    "check_state",
    "concat_states",
    "expected_fields",
    "expected_shapes",
    "is_cand_field",
    "is_row_field",
    "is_state_field",
    "learned_fields",
    "make_state",
    "select_rows",
    "state_field",
]

SLICES = "slices"
KEYS = "keys"
VALUES = "values"
TIMES = "times"
COUNTS = "counts"
CAND_KEYS = "cand_keys"
CAND_COUNTS = "cand_counts"
CAND_TIMES = "cand_times"
ROW_FIELDS = (KEYS, VALUES, TIMES, COUNTS)
CAND_FIELDS = (CAND_KEYS, CAND_COUNTS, CAND_TIMES)
_STATE_PREFIX = "state."


def state_field(slice_index: int, name: str) -> str:
    """The key of optimizer state ``name`` of slice ``slice_index``."""
    return f"{_STATE_PREFIX}{slice_index}.{name}"


def is_state_field(key: str) -> bool:
    """Whether ``key`` holds optimizer state (a ``state_field``)."""
    return key.startswith(_STATE_PREFIX)


def is_row_field(key: str) -> bool:
    """Whether ``key`` is indexed by row (ids with a row)."""
    return key in ROW_FIELDS or is_state_field(key)


def is_cand_field(key: str) -> bool:
    """Whether ``key`` is indexed by occurrence-filter candidate."""
    return key in CAND_FIELDS


def learned_fields(state: Mapping) -> list[str]:
    """The keys of ``state`` holding what training learned (ids, values, optimizer state), sorted.

    Times, counts and filter candidates are left out: they depend on the
    clock and on lookups, not on the model.
    """
    return sorted(k for k in state if k in (KEYS, VALUES) or is_state_field(k))


def make_state(slices: list, rows: Mapping[str, torch.Tensor], cands: Mapping[str, torch.Tensor]) -> dict:
    """A table state in the canonical key order.

    Args:
        slices: the ``SLICES`` signature.
        rows: the row fields: ``ROW_FIELDS`` and the ``state_field``s (in
            slice order, as ``expected_fields`` lists them).
        cands: the ``CAND_FIELDS``.
    """
    state = {SLICES: slices}
    state.update((k, rows[k]) for k in ROW_FIELDS)
    state.update((k, cands[k]) for k in CAND_FIELDS)
    state.update((k, t) for k, t in rows.items() if is_state_field(k))
    return state


def expected_fields(slice_state_names: Sequence[Sequence[str]]) -> list[str]:
    """Every tensor key of a table state whose slices hold ``slice_state_names``, in the canonical order."""
    fields = list(ROW_FIELDS + CAND_FIELDS)
    for i, names in enumerate(slice_state_names):
        fields.extend(state_field(i, n) for n in names)
    return fields


def expected_shapes(
    num_rows: int, num_cands: int, slice_dims: Sequence[int], slice_state_names: Sequence[Sequence[str]]
) -> dict[str, tuple[int, ...]]:
    """Every tensor key of a table state with its shape, in the canonical order.

    Args:
        num_rows: R, the ids with a row.
        num_cands: C, the occurrence-filter candidates.
        slice_dims: d_i per slice (D is their sum).
        slice_state_names: the optimizer state names per slice.
    """
    r, c = num_rows, num_cands
    shapes = {KEYS: (r,), VALUES: (r, sum(slice_dims)), TIMES: (r,), COUNTS: (r,)}
    shapes.update({k: (c,) for k in CAND_FIELDS})
    for i, (d, names) in enumerate(zip(slice_dims, slice_state_names, strict=True)):
        shapes.update({state_field(i, n): (r, d) for n in names})
    return shapes


def check_state(
    state: Mapping, slices: list, slice_state_names: Sequence[Sequence[str]], owner: str = "table"
) -> None:
    """Raises ValueError unless ``state`` has this layout for ``slices``; changes nothing.

    Checks the ``SLICES`` signature, that every key is present with its shape,
    and that no id appears twice among the rows or among the candidates
    (this last check syncs with the device).

    Args:
        state: the state to check.
        slices: the expected ``SLICES`` signature, ``[[dim, optimizer type name], ...]``.
        slice_state_names: the optimizer state names per slice.
        owner: names the table in error messages.

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: anything else does not fit.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    raw_sig = state.get(SLICES, [])
    if not isinstance(raw_sig, list | tuple) or not all(isinstance(x, list | tuple) for x in raw_sig):
        raise ValueError(f"{owner}: saved slices {raw_sig!r} are not a list of [dim, optimizer] pairs")
    sig = [list(x) for x in raw_sig]
    if sig != slices:
        raise ValueError(f"{owner}: saved slices {sig} do not match {slices}")
    missing = set(expected_fields(slice_state_names)) - set(state)
    if missing:
        raise ValueError(f"{owner}: state is missing {sorted(missing)}")
    for k in expected_fields(slice_state_names):
        value = state[k]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{owner}: {k} is a {type(value).__name__}, expected a tensor")
        # Ids, times and counts are integers; values and optimizer state are floats.
        wants_float = k == VALUES or is_state_field(k)
        if value.is_floating_point() != wants_float or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{owner}: {k} has dtype {value.dtype}, expected {'floating point' if wants_float else 'integers'}"
            )
    dims = [d for d, _ in slices]
    shapes = expected_shapes(state[KEYS].shape[0], state[CAND_KEYS].shape[0], dims, slice_state_names)
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{owner}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
    for k in (KEYS, CAND_KEYS):
        if state[k].numel() and torch.unique(state[k]).numel() != state[k].numel():
            raise ValueError(f"{owner}: {k} holds duplicate ids")


def select_rows(state: Mapping, rows: torch.Tensor | None = None, cands: torch.Tensor | None = None) -> dict:
    """The rows ``rows`` and candidates ``cands`` of ``state`` (a copy; key order kept).

    Args:
        state: a table state (any subset of its keys).
        rows: a [R] bool mask or an index tensor into the row fields; None keeps all.
        cands: the same for the candidate fields.
    """
    out = dict(state)
    for k, v in state.items():
        if rows is not None and is_row_field(k):
            out[k] = v[rows]
        elif cands is not None and is_cand_field(k):
            out[k] = v[cands]
    return out


def concat_states(states: Sequence[Mapping]) -> dict:
    """One state holding the rows and candidates of all ``states`` (disjoint parts of one table).

    ``SLICES``, where present, is taken from the first state (and comes
    first); every other key is concatenated along its first axis.

    Raises:
        ValueError: no states, or the states disagree on their slices or keys.
    """
    if not states:
        raise ValueError("Invalid states: [] (expected at least one shard)")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(first) or _signature(s) != _signature(first):
            raise ValueError(f"Invalid states[{i}]: its slices or keys differ from shard 0's")
    out = {SLICES: first[SLICES]} if SLICES in first else {}
    out.update((k, torch.cat([s[k] for s in states])) for k in first if k != SLICES)
    return out


def _signature(state: Mapping) -> list | None:
    return [list(x) for x in state[SLICES]] if SLICES in state else None
