"""Readers for any schema: CSV/TSV (with or without a header, plain or compressed) and Parquet, streamed.

``read_schema_batches`` turns files into ``Batch``es of the columns a
``Schema`` names; it is the one reader (the default run's Criteo files are
read with the preset ``criteo_schema()``). Text files are read in blocks of
whole lines of about 1 MiB (``train.text_blocks``), each parsed by pyarrow's
CSV parser into byte columns (only the columns the schema reads are kept);
Parquet through ``ParquetFile.iter_batches``. Memory stays at a few blocks
whatever the file holds, and every value is converted by vectorized
Arrow/numpy steps over a whole block, never a Python loop over rows.

Text format: the delimiter defaults to ``,`` for ``.csv`` files (also
``.csv.gz`` and other compressed forms) and to a tab otherwise. CSV fields
may be quoted with ``"`` (a quoted field may not span lines); TSV has no
quoting. A header line names the columns; ``header=None`` takes the first
line as a header when it names every column the schema reads, otherwise the
columns are ``Schema.columns`` in order. Empty lines are skipped.

What each kind accepts (text, or Parquet columns of any type that converts
losslessly: integers, integer-valued floats or decimals, bools, strings,
binary, dictionary-encoded, and lists for multi/sequence):

- label: 0 or 1.
- dense: a number (``dtype = "int"``: an integer of at most 18 digits);
  empty or null takes the feature's ``fill``.
- ids (categorical, multi, sequence): ``string`` hashes the text (numbers:
  their decimal text) with ``hash_string_ids``; ``int`` takes integers (text:
  at most 18 digits); ``hex`` takes up to 16 hex digits (numbers: the number).
  Empty or null means no id. Multi and single-column sequence fields are split
  at the feature's ``separator``; empty pieces are dropped.
- timestamp: an integer (Parquet timestamps and dates: seconds since the epoch).

A row holding a value that does not fit its kind, or a line with the wrong
number of fields or longer than ``text_blocks.MAX_LINE_BYTES``, is
malformed: counted in ``ReadStats`` by reason and skipped, or with
``strict=True`` the first one raises ``DataError`` naming the file and line
(Parquet: the row), the column and the value. Text quoted from the data is escaped (``core.fileio.printable``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from monolith_torch.core.fileio import printable
from monolith_torch.core.hashing import fold_ids, hash_string_ids
from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.train.data import DataError, ReadStats
from monolith_torch.train.schema import FeatureSpec, Schema
from monolith_torch.train.text_blocks import Block, TextFormat, default_delimiter, text_blocks

__all__ = ["Batch", "RowError", "batch_from_records", "decode_hex_ids", "read_schema_batches"]

_INT_RE = r"^-?[0-9]{1,18}$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_INT64_MAX = np.iinfo(np.int64).max
_MAX_HEX = 16
# A typed zero: comparing with a Python 0 makes pyarrow probe for dateutil on every call (0.15 ms a column).
_ZERO = pa.scalar(0, pa.int32())
# Blocks of at most this many rows parse their columns of one kind together (``_by_group``).
_JOIN_ROWS = 512

_HEX_TABLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_TABLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_TABLE[_c] = 10 + _i


@dataclass
class Batch:
    """One batch of a schema's features.

    Shapes: ``labels`` [B] float32; ``dense`` [B, n_dense] float32 (columns in
    ``Schema.dense`` order); ``sparse`` maps each id feature to ragged int64 ids
    over B rows; ``timestamps`` [B] int64, or None when the schema has none.
    """

    labels: torch.Tensor
    dense: torch.Tensor
    sparse: dict[str, RaggedTensor]
    timestamps: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]


# ---------------------------------------------------------------- values of any type


def _plain(col) -> pa.Array:
    """One contiguous array of a plain type: chunks combined, dictionaries and views decoded."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if getattr(pa.types, "is_string_view", lambda _: False)(t):
        t = pa.large_string()
    elif getattr(pa.types, "is_binary_view", lambda _: False)(t):
        t = pa.large_binary()
    chunks = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in chunks]
    chunks = [c if c.type == t else pc.cast(c, t) for c in chunks]
    return chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks) if chunks else pa.array([], t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _np(arr) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _text_scalar(t: pa.DataType, text: str) -> pa.Scalar:
    return pa.scalar(text.encode() if pa.types.is_binary(t) or pa.types.is_large_binary(t) else text, t)


def _numbers_as_int64(arr: pa.Array, wrap_uint64: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers, bools or floats -> (int64 values, present, valid).

    A float is valid when whole and in the int64 range; NaN and null are
    missing. A uint64 above the int64 range is valid only with ``wrap_uint64``.
    """
    present = _np(arr.is_valid())
    if pa.types.is_floating(arr.type):
        x = _np(pc.cast(arr, pa.float64()).fill_null(np.nan))
        present &= ~np.isnan(x)
        whole = np.isfinite(x) & (np.trunc(x) == x) & (np.abs(x) < 2.0**63)
        return np.where(whole, x, 0.0).astype(np.int64), present, whole | ~present
    if pa.types.is_uint64(arr.type):
        raw = _np(arr.fill_null(0))
        valid = np.ones(len(arr), bool) if wrap_uint64 else raw <= _INT64_MAX
        return np.where(valid, raw, 0).view(np.int64), present, valid
    return _np(pc.cast(arr, pa.int64()).fill_null(0)), present, np.ones(len(arr), bool)


def _parse_text(arr: pa.Array, pattern: str, to: pa.DataType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text matching ``pattern`` -> (values of ``to`` as numpy, 0 for missing; present; valid)."""
    present = _np(pc.greater(pc.binary_length(arr), _ZERO).fill_null(False))
    match = pc.match_substring_regex(arr, pattern).fill_null(False)
    valid = _np(match) | ~present
    kept = pc.if_else(match, arr, pa.scalar(None, arr.type))
    if not pa.types.is_string(kept.type) and not pa.types.is_large_string(kept.type):
        kept = pc.cast(kept, pa.string())  # only ASCII digits are left
    return _np(pc.cast(kept, to).fill_null(0)), present, valid


def _decimal_text(arr: pa.Array) -> pa.Array:
    """A decimal column as integer text where the value is whole ("12.00" -> "12")."""
    return pc.replace_substring_regex(pc.cast(arr, pa.string()), r"\.0*$", "")


def decode_hex_ids(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex text (up to 16 digits, either case) -> (ids int64, present, valid), vectorized over the Arrow buffers.

    Empty or null is missing (present False); more than 16 digits or any other
    byte (invalid UTF-8 included) makes the id invalid. Criteo's id format.
    """
    arr = _plain(arr)
    if not _is_text(arr.type):
        arr = pc.cast(arr, pa.string())
    present = _np(arr.is_valid())
    if arr.null_count:
        arr = arr.fill_null(_text_scalar(arr.type, ""))
    n = len(arr)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if large else np.int32, count=n + 1,
                            offset=arr.offset * (8 if large else 4)).astype(np.int64)
    data = arr.buffers()[2]
    chars = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    lengths = offsets[1:] - offsets[:-1]
    valid = lengths <= _MAX_HEX
    width = int(min(lengths.max(initial=0), _MAX_HEX))
    pos = np.arange(width)
    in_row = pos[None, :] < np.minimum(lengths, _MAX_HEX)[:, None]
    gather = np.where(in_row, offsets[:-1, None] + pos[None, :], 0)
    nibbles = _HEX_TABLE[chars[gather]] if chars.size else np.zeros(gather.shape, np.uint8)
    valid &= ~((nibbles == 255) & in_row).any(axis=1)
    # Right-align the digits so a shorter id gets its most significant nibbles as zeros.
    shift = (np.minimum(lengths, _MAX_HEX)[:, None] - 1 - pos[None, :]) * 4
    contrib = np.where(in_row & valid[:, None], nibbles.astype(np.uint64) << np.maximum(shift, 0).astype(np.uint64), 0)
    ids = contrib.sum(axis=1, dtype=np.uint64).view(np.int64)
    return ids, present & (lengths > 0), valid


def _label_values(arr: pa.Array) -> np.ndarray:
    """The label as float64: 0.0, 1.0, or -1.0 for anything else (null, "2", 0.5, a list)."""
    t = arr.type
    if _is_number(t) or pa.types.is_decimal(t):
        label = _np(pc.cast(arr, pa.float64()).fill_null(-1.0))
        return np.where((label == 0.0) | (label == 1.0), label, -1.0)
    if _is_text(t):
        one = _np(pc.equal(arr, _text_scalar(t, "1")).fill_null(False))
        zero = _np(pc.equal(arr, _text_scalar(t, "0")).fill_null(False))
        return np.where(one, 1.0, np.where(zero, 0.0, -1.0))
    return np.full(len(arr), -1.0)


def _dense_values(arr: pa.Array, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """A dense column -> (float64 values after fill and transform, valid)."""
    return _dense_finish(*_dense_raw(arr, spec.dtype), spec)


def _dense_finish(x: np.ndarray, present: np.ndarray, valid: np.ndarray, spec: FeatureSpec):
    """Parsed dense values -> (float64 values after the spec's fill and transform, valid)."""
    x = np.where(present & valid, x, spec.fill)
    if spec.transform == "log1p":
        x = np.log1p(np.maximum(x, 0))
    elif spec.transform == "standardize":
        x = (x - spec.mean) / spec.std
    return x, valid


def _dense_raw(arr: pa.Array, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense column of ``dtype`` ("int" or "float") -> (float64 values, present, valid), before fill."""
    t = arr.type
    if dtype == "int":
        if _is_number(t):
            ints, present, valid = _numbers_as_int64(arr, wrap_uint64=False)
        elif pa.types.is_decimal(t) or _is_text(t):
            ints, present, valid = _parse_text(_decimal_text(arr) if pa.types.is_decimal(t) else arr, _INT_RE, pa.int64())
        else:
            ints, present, valid = np.zeros(len(arr), np.int64), _np(arr.is_valid()), _np(arr.is_null())
        x = ints.astype(np.float64)
    elif _is_number(t) or pa.types.is_decimal(t):
        x = _np(pc.cast(arr, pa.float64()).fill_null(np.nan))
        present = ~np.isnan(x)
        valid = np.isfinite(x) | ~present
    elif _is_text(t):
        x, present, valid = _parse_text(arr, _FLOAT_RE, pa.float64())
        valid &= np.isfinite(x)
    else:
        x, present, valid = np.zeros(len(arr)), _np(arr.is_valid()), _np(arr.is_null())
    return x, present, valid


def _by_group(arrays: dict[str, pa.Array], parse, join: bool) -> dict[str, tuple]:
    """``parse`` of each array; with ``join``, once per group of arrays of one type (concatenated), split back.

    Parsing is elementwise, so the result is the same as one call per array.
    Joined, a block of many id or dense columns costs a few Arrow kernel calls,
    not a few per column: faster for small blocks (request rows), where the
    calls' fixed cost dominates, and slower for large ones (the copy).
    """
    out: dict[str, tuple] = {}
    groups: dict[pa.DataType, list[str]] = {}
    for name, arr in arrays.items():
        groups.setdefault(arr.type, []).append(name)
    for names in groups.values():
        joined = None
        if join and len(names) > 1:
            try:
                joined = pa.concat_arrays([arrays[n] for n in names])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # offsets overflow: one by one
                joined = None
        if joined is None:
            out.update({n: parse(arrays[n]) for n in names})
            continue
        parts = parse(joined)
        n_rows = len(arrays[names[0]])
        for k, name in enumerate(names):
            out[name] = tuple(p[k * n_rows:(k + 1) * n_rows] for p in parts)
    return out


def _id_values(arr: pa.Array, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An id column of any type -> (ids int64, present, valid) by the feature's ``dtype``."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_decimal(t):
        arr, t = _decimal_text(arr), pa.string()
    if dtype == "hex":
        if _is_number(t):
            return _numbers_as_int64(arr, wrap_uint64=True)
        return decode_hex_ids(arr) if _is_text(t) else _unsupported(arr)
    if dtype == "int":
        if _is_number(t):
            return _numbers_as_int64(arr, wrap_uint64=True)
        return _parse_text(arr, _INT_RE, pa.int64()) if _is_text(t) else _unsupported(arr)
    if _is_number(t):
        ints, present, valid = _numbers_as_int64(arr, wrap_uint64=pa.types.is_uint64(t))
        text = pc.cast(pa.array(ints.view(np.uint64) if pa.types.is_uint64(t) else ints), pa.string())
        return hash_string_ids(text), present, valid
    if not _is_text(t):
        return _unsupported(arr)
    present = _np(pc.greater(pc.binary_length(arr), _ZERO).fill_null(False))
    return hash_string_ids(arr), present, np.ones(len(arr), bool)


def _unsupported(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    present = _np(arr.is_valid())
    return np.zeros(len(arr), np.int64), present, ~present


def _timestamp_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        unit = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}.get(getattr(t, "unit", "s"), 1)
        raw = _np(pc.cast(arr, pa.int64()).fill_null(0))
        if pa.types.is_date64(t):
            return raw // 1000, np.ones(len(arr), bool)
        return (raw * 86400 if pa.types.is_date32(t) else raw // unit), np.ones(len(arr), bool)
    if _is_number(t):
        values, _, valid = _numbers_as_int64(arr, wrap_uint64=False)
        return values, valid
    if pa.types.is_decimal(t) or _is_text(t):
        values, _, valid = _parse_text(_decimal_text(arr) if pa.types.is_decimal(t) else arr, _INT_RE, pa.int64())
        return values, valid
    return np.zeros(len(arr), np.int64), _np(arr.is_null())


# ---------------------------------------------------------------- one block of rows


def _reason(spec: FeatureSpec) -> str:
    if spec.kind == "label":
        return "bad label"
    if spec.kind == "timestamp":
        return "bad timestamp"
    if spec.kind == "dense":
        return "non-numeric integer field" if spec.dtype == "int" else "non-numeric field"
    return {"hex": "bad hex id", "int": "bad integer id", "string": "bad string id"}[spec.dtype]


@dataclass
class _Parsed:
    """Rows of one block: arrays over rows; ``sparse`` maps a feature to (values, per-row lengths)."""

    labels: np.ndarray
    dense: np.ndarray
    timestamps: np.ndarray | None
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> _Parsed:
        sparse = {}
        for name, (values, lengths) in self.sparse.items():
            sparse[name] = (values[np.repeat(keep, lengths)], lengths[keep])
        ts = None if self.timestamps is None else self.timestamps[keep]
        return _Parsed(self.labels[keep], self.dense[keep], ts, sparse)


def _ragged_column(arr: pa.Array, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A multi or single-column sequence field -> (ids, per-row lengths, row valid)."""
    arr = _plain(arr)
    n = len(arr)
    if _is_list(arr.type):
        flat, parents = pc.list_flatten(arr), _np(pc.list_parent_indices(arr))
    elif _is_text(arr.type):
        pieces = pc.split_pattern(arr, spec.separator)
        flat, parents = pc.list_flatten(pieces), _np(pc.list_parent_indices(pieces))
    else:
        flat, parents = arr, np.arange(n)
    ids, present, valid = _id_values(flat, spec.dtype)
    row_valid = np.ones(n, bool)
    row_valid[parents[~valid]] = False
    keep = present & valid
    return ids[keep], np.bincount(parents[keep], minlength=n).astype(np.int64), row_valid


def _parse_rows(table, schema: Schema) -> tuple[_Parsed, np.ndarray, list[str], list[str]]:
    """Converts a block; returns it, per-row reason codes (0: good), the reasons, the column of each reason."""
    n = table.num_rows
    bad = np.zeros(n, dtype=np.int16)
    reasons, where = [""], [""]

    def mark(invalid: np.ndarray, spec: FeatureSpec, column: str) -> None:
        reasons.append(_reason(spec))
        where.append(column)
        bad[invalid & (bad == 0)] = len(reasons) - 1

    columns: dict[str, pa.Array] = {}
    ids_cache: dict[tuple[str, str], tuple] = {}

    def column(name: str) -> pa.Array:
        if name not in columns:
            columns[name] = _plain(table.column(name))
        return columns[name]

    def ids_of(name: str, dtype: str):
        if (name, dtype) not in ids_cache:
            ids_cache[(name, dtype)] = _id_values(column(name), dtype)
        return ids_cache[(name, dtype)]

    label_spec = schema.label
    labels = _label_values(column(label_spec.columns[0]))
    mark(labels < 0, label_spec, label_spec.columns[0])
    dense = np.zeros((n, len(schema.dense)), dtype=np.float32)
    join = n <= _JOIN_ROWS
    raw: dict[tuple[str, str], tuple] = {}
    for dtype in ("int", "float"):
        cols = {s.columns[0]: column(s.columns[0]) for s in schema.dense if s.dtype == dtype}
        raw.update({(c, dtype): r for c, r in _by_group(cols, lambda a, d=dtype: _dense_raw(a, d), join).items()})
    for j, spec in enumerate(schema.dense):
        dense[:, j], valid = _dense_finish(*raw[(spec.columns[0], spec.dtype)], spec)
        mark(~valid, spec, spec.columns[0])
    # The id columns of categorical and multi-column features, parsed a group of columns at a time.
    for dtype in ("hex", "int", "string"):
        cols = {c: column(c) for s in schema.embedded if s.dtype == dtype and (s.kind == "categorical"
                                                                             or len(s.columns) > 1)
                for c in s.columns}
        ids_cache.update({(c, dtype): r for c, r in _by_group(cols, lambda a, d=dtype: _id_values(a, d), join).items()})
    timestamps = None
    if schema.timestamp is not None:
        timestamps, valid = _timestamp_values(column(schema.timestamp.columns[0]))
        mark(~valid, schema.timestamp, schema.timestamp.columns[0])
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in schema.embedded:
        if spec.kind == "categorical" or len(spec.columns) > 1:
            parts = [ids_of(c, spec.dtype) for c in spec.columns]
            ids = np.stack([p[0] for p in parts], axis=1)
            present = np.stack([p[1] for p in parts], axis=1)
            for c, p in zip(spec.columns, parts, strict=True):
                mark(~p[2], spec, c)
            values, lengths = ids[present], present.sum(axis=1).astype(np.int64)
        else:
            values, lengths, valid = _ragged_column(column(spec.columns[0]), spec)
            mark(~valid, spec, spec.columns[0])
        if spec.buckets:
            values = fold_ids(values, spec.buckets)
        sparse[spec.name] = (np.ascontiguousarray(values, dtype=np.int64), lengths)
    return _Parsed(labels, dense, timestamps, sparse), bad, reasons, where


# ---------------------------------------------------------------- Parquet blocks (text: train.text_blocks)


def _parquet_locate(path: str, table, columns: Sequence[str], rows_before: int, row: int) -> tuple[str, str]:
    def text(v) -> str:
        return "" if v is None else v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)

    values = "\t".join(text(table.column(c)[row].as_py()) for c in columns)
    return f"{path} (row {rows_before + row + 1})", printable(values, 120)


def _parquet_blocks(path: str, needed: Sequence[str], batch_size: int) -> Iterator[Block]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({printable(str(err))})") from err
    missing = [c for c in needed if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing[:5]}")
    rows_before = 0
    for record_batch in pf.iter_batches(batch_size=batch_size, columns=list(needed)):
        yield Block(record_batch, functools.partial(_parquet_locate, path, record_batch, needed, rows_before))
        rows_before += record_batch.num_rows


def _is_parquet(path: str) -> bool:
    return path.endswith(".parquet") or path.endswith(".pq")


# ---------------------------------------------------------------- batches


def _good_rows(block: Block, lo: int, hi: int, schema: Schema, stats: ReadStats, strict: bool) -> _Parsed:
    """Rows ``lo:hi`` of ``block`` parsed; malformed ones counted and dropped, or fatal under ``strict``."""
    table = block.table.slice(lo, hi - lo) if (lo, hi) != (0, block.table.num_rows) else block.table
    parsed, bad, reasons, where = _parse_rows(table, schema)
    is_bad = bad != 0
    if not is_bad.any():
        return parsed
    if strict:
        first = int(np.argmax(is_bad))
        place, text = block.locate(lo + first)
        value = table.column(where[bad[first]])[first].as_py()
        value = value if isinstance(value, str | bytes) else str(value)
        raise DataError(f"{place}: {reasons[bad[first]]} (column {where[bad[first]]!r} = "
                        f"'{printable(value, 60)}'): '{text}'")
    codes, counts = np.unique(bad[is_bad], return_counts=True)
    for code, count in zip(codes, counts, strict=True):
        stats.add(reasons[code], int(count))
    return parsed.select(~is_bad)


def _take(pending: list[_Parsed], n: int) -> tuple[Batch, list[_Parsed], int]:
    """The first ``n`` pending rows as a ``Batch``, and the rest."""
    labels = np.concatenate([p.labels for p in pending])
    dense = np.concatenate([p.dense for p in pending])
    ts = None if pending[0].timestamps is None else np.concatenate([p.timestamps for p in pending])
    sparse_now, sparse_rest = {}, {}
    for name in pending[0].sparse:
        values = np.concatenate([p.sparse[name][0] for p in pending])
        lengths = np.concatenate([p.sparse[name][1] for p in pending])
        cut = int(lengths[:n].sum())
        splits = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths[:n], out=splits[1:])
        sparse_now[name] = RaggedTensor(torch.from_numpy(values[:cut].copy()), torch.from_numpy(splits))
        sparse_rest[name] = (values[cut:], lengths[n:])
    batch = Batch(torch.from_numpy(labels[:n].astype(np.float32)), torch.from_numpy(np.ascontiguousarray(dense[:n])),
                  sparse_now, None if ts is None else torch.from_numpy(ts[:n].astype(np.int64)))
    rest = _Parsed(labels[n:], dense[n:], None if ts is None else ts[n:], sparse_rest)
    return batch, ([rest] if len(rest) else []), len(rest)


def read_schema_batches(
    paths: Sequence[str],
    schema: Schema,
    batch_size: int,
    stats: ReadStats | None = None,
    strict: bool = False,
    shard: tuple[int, int] = (0, 1),
    header: bool | None = None,
    delimiter: str | None = None,
    drop_remainder: bool = False,
    skip_rows: int = 0,
) -> Iterator[Batch]:
    """Streams ``Batch``es of ``batch_size`` rows of ``schema``'s features from CSV/TSV/Parquet files, in order.

    Args:
        paths: files; ``.parquet``/``.pq`` read as Parquet, the rest as text
            (compressed as the extension says: ``.gz``, ``.bz2``, ...).
        schema: what to read (``load_schema``, ``criteo_schema``).
        batch_size: rows per batch (the last may be smaller unless ``drop_remainder``).
        stats: filled with row and malformed-line counts (of this shard's rows).
        strict: raise ``DataError`` (file and line, column, value) on the first malformed row.
        shard: ``(index, count)``: of every raw block of input rows keep and
            parse only the ``index``-th of ``count`` contiguous parts, so
            data-parallel workers share the parsing instead of each parsing
            everything (a zero-copy slice of the Arrow block).
        header: text files: True, the first line names the columns; False,
            they are ``schema.columns``; None, a header when the first line
            names every column the schema reads.
        delimiter: text files: one character; None: ``,`` for ``.csv``, else a tab.
        skip_rows: drop the first this many good rows (of this shard) before
            batching: where ``train --follow --resume`` left off in a file.

    Raises:
        ValueError: a bad ``batch_size``, ``shard`` or ``delimiter``.
        DataError: an unreadable file, missing columns, or a malformed row under ``strict``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected an integer >= 1)")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"Invalid shard: {shard!r} (expected (index, count) with 0 <= index < count)")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\""):
        raise ValueError(f"Invalid delimiter: {delimiter!r} (expected one character, not a quote or newline)")
    if header not in (True, False, None):
        raise ValueError(f"Invalid header: {header!r} (expected True, False or None)")
    stats = stats if stats is not None else ReadStats()
    needed = tuple(dict.fromkeys(c for f in schema.features for c in f.columns))
    pending: list[_Parsed] = []
    pending_rows = 0
    for path in paths:
        path = os.fspath(path)
        if _is_parquet(path):
            blocks = _parquet_blocks(path, needed, batch_size)
        else:
            fmt = TextFormat(delimiter or default_delimiter(path), header, schema.columns, needed)
            blocks = text_blocks(path, fmt, stats, strict)
        try:
            for block in blocks:
                n = block.table.num_rows
                parsed = _good_rows(block, n * index // count, n * (index + 1) // count, schema, stats, strict)
                stats.rows += len(parsed)
                if skip_rows:
                    drop = min(skip_rows, len(parsed))
                    skip_rows -= drop
                    parsed = parsed.select(np.arange(len(parsed)) >= drop)
                pending.append(parsed)
                pending_rows += len(parsed)
                while pending_rows >= batch_size:
                    batch, pending, pending_rows = _take(pending, batch_size)
                    yield batch
        except (pa.ArrowException, OSError, EOFError) as err:
            raise DataError(f"{path}: cannot read ({printable(str(err))})") from err
    if pending_rows and not drop_remainder:
        batch, _, _ = _take(pending, pending_rows)
        yield batch


# ---------------------------------------------------------------- request rows (monolith-torch serve)


class RowError(ValueError):
    """A request row that cannot be parsed: names the row (its index in the list), the column and the value.

    Attributes:
        row: the index of the row in the list given.
        column: the column (or unknown key) at fault; None when the row itself is not an object.
    """

    def __init__(self, row: int, column: str | None, problem: str):
        where = f"row {row}" if column is None else f"row {row}, column '{printable(column, 60)}'"
        super().__init__(f"{where}: {problem}")
        self.row = row
        self.column = column


def _shown(value) -> str:
    return printable(value if isinstance(value, str) else repr(value), 60)


def _record_text(value, row: int, column: str) -> str | None:
    """One JSON scalar as the text a data file holds there: numbers in decimal, whole floats as integers."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # JSON has one number type: 3.0 is the integer 3, as in Parquet's integer-valued floats.
        return str(int(value)) if value.is_integer() else repr(value)
    raise RowError(row, column, f"'{_shown(value)}' is not a string, a number or null")


def _record_column(values: list, column: str, separator: str | None) -> pa.Array:
    """Values of one column (over the rows) as the binary column a text file gives, or lists of pieces.

    ``separator``: the column feeds a multi or one-column sequence feature, so a
    row may give a list; a column with any list becomes ``list<binary>`` and
    its text values are split at the separator, as the reader splits them.
    """
    try:
        return pa.array(values, pa.binary())  # the common case: every value a string or null
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    # Numbers (and nulls): a typed number column, parsed as a Parquet one is (never Arrow's type
    # inference, which probes for optional modules on every call). int64 refuses bools, float64 not.
    try:
        return pa.array(values, pa.int64())
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        pass
    if not any(isinstance(v, bool) for v in values):
        try:
            return pa.array(values, pa.float64())
        except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
            pass
    as_lists = separator is not None and any(isinstance(v, list) for v in values)
    out = []
    for row, value in enumerate(values):
        if isinstance(value, list):
            if separator is None:
                raise RowError(row, column, f"'{_shown(value)}' is a list, but the column holds one value")
            out.append([_record_text(v, row, column) for v in value])
            continue
        text = _record_text(value, row, column)
        out.append(text.split(separator) if as_lists and text is not None else text)
    return pa.array(out, pa.list_(pa.binary()) if as_lists else pa.binary())


def _column_values(records: list[dict], columns: list[str]) -> list[Sequence]:
    """Per column, its value in each record (None where a record lacks the key)."""
    if not records:
        return [() for _ in columns]
    if len(columns) > 1:
        getter = itemgetter(*columns)
        try:  # one C call per row when every row has every column, as rows read from a file do
            return list(zip(*map(getter, records), strict=True))
        except KeyError:
            pass
    return [[record.get(column) for record in records] for column in columns]


def batch_from_records(records: list[dict], schema: Schema) -> Batch:
    """A ``Batch`` of JSON rows (column name -> value), parsed exactly as the file readers parse a data file.

    Values are what a data file holds: strings, or numbers (written as their
    decimal text; a whole float as an integer); null or an absent key is an
    empty field. A multi or one-column sequence field may also be a list of
    ids. The label is optional (absent or null: 0). The columns go through
    the same vectorized parsers as ``read_schema_batches``, so ids hash as in
    training. The loop over rows only gathers each column's values.

    Args:
        records: the rows; each a dict whose keys are columns of ``schema.columns``.
        schema: the run's schema.

    Returns:
        A ``Batch`` of ``len(records)`` rows, in order.

    Raises:
        TypeError: ``records`` is not a list.
        RowError: a row that is not an object, has an unknown key, or holds
            a value that does not fit its column's kind (the row, the column
            and the value named, escaped with ``printable``); of the rows whose
            values do not parse, the first.
    """
    if not isinstance(records, list | tuple):
        raise TypeError(f"records must be a list of dicts, got {type(records).__name__}")
    allowed = frozenset(schema.columns)
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            raise RowError(row, None, f"expected an object of column: value, got {type(record).__name__}")
        if not allowed.issuperset(record):
            key = next(k for k in record if k not in allowed)
            raise RowError(row, str(key), "not a column of the schema (its columns: "
                           f"{', '.join(schema.columns[:8])}{', ...' if len(schema.columns) > 8 else ''})")
    separators = {spec.columns[0]: spec.separator for spec in schema.embedded
                  if spec.kind != "categorical" and len(spec.columns) == 1}
    label = schema.label.columns[0]
    columns = [c for c in dict.fromkeys(c for f in schema.features for c in f.columns) if c != label]
    arrays = {label: _record_column(["0" if (v := r.get(label)) is None else v for r in records], label, None)}
    for column, values in zip(columns, _column_values(records, columns), strict=True):
        arrays[column] = _record_column(values, column, separators.get(column))
    table = pa.table(arrays)
    parsed, bad, reasons, where = _parse_rows(table, schema)
    if bad.any():
        row = int(np.argmax(bad != 0))
        column = where[bad[row]]
        raise RowError(row, column, f"{reasons[bad[row]]} '{_shown(records[row].get(column))}'")
    batch, _, _ = _take([parsed], len(parsed))
    return batch

