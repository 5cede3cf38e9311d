"""Criteo-format data: a deterministic generator with a planted signal, and streaming readers.

A Criteo line is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer
counts and 26 categorical features as hex ids, any field but the label may be
empty. Readers stream TSV (plain or gzip) through pyarrow's CSV reader and
Parquet through ``ParquetFile.iter_batches``, so files larger than memory
train. Parsing is vectorized over whole record batches (hex ids are decoded
from the Arrow buffers with numpy), never a Python loop over lines.

Malformed lines (wrong column count, a non-numeric integer field, a bad label
or hex id) are counted and skipped; with ``strict=True`` the first one raises
``DataError`` naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from monolith_torch.core.hashing import splitmix64_np
from monolith_torch.core.ragged import RaggedTensor

__all__ = [
    "NUM_INT",
    "NUM_CAT",
    "COLUMNS",
    "SEQ_FEATURE",
    "SEQ_SOURCE",
    "Batch",
    "DataError",
    "ReadStats",
    "expand_paths",
    "generate_criteo",
    "read_batches",
]

NUM_INT = 13
NUM_CAT = 26
INT_COLUMNS = [f"I{i}" for i in range(1, NUM_INT + 1)]
CAT_COLUMNS = [f"C{i}" for i in range(1, NUM_CAT + 1)]
COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
# The default model's sequence feature: the non-empty ids of C14..C26 in order.
SEQ_FEATURE = "seq"
SEQ_SOURCE = CAT_COLUMNS[13:]
_MAX_HEX = 16
TSV_BLOCK_BYTES = 1 << 20

_HEX_TABLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_TABLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_TABLE[_c] = 10 + _i


class DataError(ValueError):
    """A data file that cannot be read, or a malformed line under ``strict``."""


@dataclass
class ReadStats:
    """Counts of what a reader saw; ``malformed`` maps a reason to its count."""

    rows: int = 0
    malformed: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.malformed.values())

    def add(self, reason: str, count: int = 1) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + count

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.rows} rows read, no malformed lines"
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.malformed.items()))
        return f"{self.rows} rows read, {self.skipped} malformed lines skipped ({detail})"


@dataclass
class Batch:
    """One batch. Shapes: labels [B], dense [B, 13]; each sparse feature is ragged ids over B rows."""

    labels: torch.Tensor
    dense: torch.Tensor
    sparse: dict[str, RaggedTensor]

    def __len__(self) -> int:
        return self.labels.shape[0]


# ---------------------------------------------------------------- paths


def expand_paths(data: str | Sequence[str]) -> list[str]:
    """Files named by a path, a directory, a glob, or a list of those; sorted, deduplicated.

    Raises:
        DataError: a pattern that matches nothing.
    """
    patterns = [data] if isinstance(data, str) else list(data)
    out: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if not f.startswith(".")
            )
        else:
            matches = sorted(glob.glob(pattern))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"--data: no file matches {pattern!r}")
        out.extend(m for m in matches if m not in out)
    return out


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class _World:
    """The hidden truth of the generator: vocabularies and per-id weights."""

    vocab: np.ndarray
    missing: np.ndarray
    weights: list[np.ndarray]
    pair: np.ndarray
    dense_w: np.ndarray


def _make_world(seed: int) -> _World:
    rng = np.random.default_rng(seed)
    vocab = np.round(10 ** rng.uniform(1.0, 4.7, NUM_CAT)).astype(np.int64)
    missing = rng.uniform(0.0, 0.25, NUM_CAT)
    scales = rng.uniform(0.2, 0.9, NUM_CAT)
    weights = [rng.normal(0.0, s, v) for s, v in zip(scales, vocab, strict=True)]
    pair = rng.normal(0.0, 0.9, (32, 32))
    dense_w = rng.normal(0.0, 0.35, NUM_INT)
    return _World(vocab, missing, weights, pair, dense_w)


def _generate_rows(world: _World, rng: np.random.Generator, n: int, seed: int) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    logit = np.full(n, -1.2)
    idx = np.empty((n, NUM_CAT), dtype=np.int64)
    for f in range(NUM_CAT):
        # Skewed popularity: small indices are frequent, as real id streams are.
        idx[:, f] = np.minimum((world.vocab[f] * rng.random(n) ** 2.5).astype(np.int64), world.vocab[f] - 1)
        present = rng.random(n) >= world.missing[f]
        logit += np.where(present, world.weights[f][idx[:, f]], 0.0)
        hex_ids = splitmix64_np(idx[:, f].astype(np.uint64) * np.uint64(NUM_CAT) + np.uint64(f) + np.uint64(seed << 20))
        cols[CAT_COLUMNS[f]] = _where_present(present, _hex8(hex_ids))
    # A planted interaction between the first two features (think user x item).
    logit += world.pair[idx[:, 0] % 32, idx[:, 1] % 32]
    counts = np.floor(rng.lognormal(1.0, 1.2, (n, NUM_INT))).astype(np.int64)
    logit += (np.log1p(counts) - 1.3) @ world.dense_w
    for j, name in enumerate(INT_COLUMNS):
        present = rng.random(n) >= 0.1
        cols[name] = _where_present(present, pa.array(counts[:, j]).cast(pa.string()))
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    cols["label"] = pa.array(labels).cast(pa.string())
    return cols


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(values: np.ndarray) -> pa.Array:
    """The low 32 bits of ``values`` as 8-digit lower-case hex strings (vectorized)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = _HEX_DIGITS[((values[:, None] >> shifts[None, :]) & np.uint64(0xF)).astype(np.intp)]
    return pa.array(np.ascontiguousarray(digits).view("S8").ravel()).cast(pa.string())


def _where_present(present: np.ndarray, text: pa.Array) -> pa.Array:
    return pc.if_else(pa.array(present), text, pa.scalar("", pa.string()))


def generate_criteo(path: str, num_rows: int, seed: int = 0, part: int = 0, chunk_rows: int = 100_000) -> str:
    """Writes ``num_rows`` deterministic Criteo-format lines with a learnable signal to ``path``.

    Every file generated with the same ``seed`` shares one hidden truth (ids
    and their weights), so a train and an eval file (``part`` 0 and 1) are two
    samples of the same distribution. Written atomically (temp file + rename).

    Returns:
        ``path``.
    """
    if num_rows < 1:
        raise ValueError(f"Invalid num_rows: {num_rows!r} (expected >= 1)")
    world = _make_world(seed)
    rng = np.random.default_rng([seed, part, 1])
    tmp = f"{path}.tmp.{os.getpid()}"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="ascii") as out:
        for start in range(0, num_rows, chunk_rows):
            cols = _generate_rows(world, rng, min(chunk_rows, num_rows - start), seed)
            table = pa.table({name: cols[name] for name in COLUMNS})
            buf = pa.BufferOutputStream()
            pacsv.write_csv(
                table, buf, pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
            )
            out.write(buf.getvalue().to_pybytes().decode("ascii"))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- parsing


def _decode_hex(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex strings -> (ids int64, present mask, valid mask), vectorized over the Arrow buffers."""
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
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
    return ids, lengths > 0, valid


def _parse_ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer strings (empty = missing) -> (values int64 with 0 for missing, valid mask)."""
    ok = pc.or_(pc.equal(arr, ""), pc.match_substring_regex(arr, r"^-?[0-9]{1,18}$"))
    valid = ok.to_numpy(zero_copy_only=False)
    cleaned = pc.if_else(pc.and_(ok, pc.not_equal(arr, "")), arr, pa.scalar(None, pa.string()))
    values = pc.cast(cleaned, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return values, valid


def _ragged_from_matrix(ids: np.ndarray, present: np.ndarray) -> RaggedTensor:
    splits = np.zeros(ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(present.sum(axis=1), out=splits[1:])
    return RaggedTensor(torch.from_numpy(np.ascontiguousarray(ids[present])), torch.from_numpy(splits))


def _to_batch(labels: np.ndarray, ints: np.ndarray, ids: np.ndarray, present: np.ndarray) -> Batch:
    dense = np.log1p(np.maximum(ints, 0)).astype(np.float32)
    sparse = {name: _ragged_from_matrix(ids[:, f : f + 1], present[:, f : f + 1]) for f, name in enumerate(CAT_COLUMNS)}
    seq_cols = [CAT_COLUMNS.index(c) for c in SEQ_SOURCE]
    sparse[SEQ_FEATURE] = _ragged_from_matrix(ids[:, seq_cols], present[:, seq_cols])
    return Batch(torch.from_numpy(labels.astype(np.float32)), torch.from_numpy(dense), sparse)


@dataclass
class _Parsed:
    labels: np.ndarray
    ints: np.ndarray
    ids: np.ndarray
    present: np.ndarray
    bad_reason: np.ndarray  # per row: "" when good


def _parse_table(table: pa.Table | pa.RecordBatch) -> _Parsed:
    n = table.num_rows
    reason = np.full(n, "", dtype=object)
    label_col = table.column("label")
    if pa.types.is_integer(label_col.type) or pa.types.is_floating(label_col.type):
        label_num = pc.cast(label_col, pa.float64()).fill_null(-1).to_numpy(zero_copy_only=False)
    else:
        label_num = np.where(
            np.isin(label_col.to_numpy(zero_copy_only=False), ["0", "1"]),
            label_col.to_numpy(zero_copy_only=False),
            "-1",
        ).astype(np.float64)
    reason[(label_num != 0) & (label_num != 1) & (reason == "")] = "bad label"
    ints = np.zeros((n, NUM_INT), dtype=np.int64)
    for j, name in enumerate(INT_COLUMNS):
        col = table.column(name)
        if pa.types.is_integer(col.type):
            ints[:, j] = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
            continue
        values, valid = _parse_ints(_as_array(col))
        ints[:, j] = values
        reason[~valid & (reason == "")] = "non-numeric integer field"
    ids = np.zeros((n, NUM_CAT), dtype=np.int64)
    present = np.zeros((n, NUM_CAT), dtype=bool)
    for f, name in enumerate(CAT_COLUMNS):
        col = _as_array(table.column(name))
        if pa.types.is_integer(col.type):
            ids[:, f] = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
            present[:, f] = col.is_valid().to_numpy(zero_copy_only=False)
            continue
        col_ids, col_present, valid = _decode_hex(col.fill_null(""))
        ids[:, f], present[:, f] = col_ids, col_present
        reason[~valid & (reason == "")] = "bad hex id"
    return _Parsed(label_num, ints, ids, present, reason)


def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.endswith(".gz") else open(
        path, encoding="utf-8", errors="replace"
    )


def _locate_line(path: str, text: str, first_line: int) -> int | None:
    """1-based number of the first line at or after ``first_line`` equal to ``text`` (error path only)."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if number >= first_line and line.rstrip("\r\n") == text:
                return number
    return None


def _row_text(table, i: int) -> str:
    return "\t".join("" if v is None else str(v) for v in (table.column(c)[i].as_py() for c in COLUMNS))


def _tsv_record_batches(path: str, stats: ReadStats, strict: bool, block_size: int) -> Iterator[pa.RecordBatch]:
    bad_rows: list[str] = []

    def on_invalid(row) -> str:
        stats.add("wrong column count")
        bad_rows.append(row.text)
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=COLUMNS, block_size=block_size),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )
    lines_before = 0
    for record_batch in reader:
        if strict and bad_rows:
            line = _locate_line(path, bad_rows[0], lines_before + 1)
            raise DataError(f"{path}:{line}: wrong column count (expected {len(COLUMNS)}): {bad_rows[0][:120]!r}")
        lines_before += record_batch.num_rows + len(bad_rows)
        bad_rows.clear()
        yield record_batch
    if strict and bad_rows:
        line = _locate_line(path, bad_rows[0], lines_before + 1)
        raise DataError(f"{path}:{line}: wrong column count (expected {len(COLUMNS)}): {bad_rows[0][:120]!r}")


def _parquet_record_batches(path: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing[:5]} (expected {COLUMNS[0]}, I1..I13, C1..C26)")
    yield from pf.iter_batches(batch_size=batch_size, columns=COLUMNS)


def _record_batches(path: str, stats: ReadStats, strict: bool, batch_size: int) -> Iterator[pa.RecordBatch]:
    if path.endswith(".parquet") or path.endswith(".pq"):
        return _parquet_record_batches(path, batch_size)
    # pyarrow's streaming CSV reader parses a number of blocks ahead, so its
    # memory grows with the block size: 1 MiB blocks read as fast as 4 MiB
    # ones here and peak at a third of the memory (docs/PERFORMANCE.md).
    return _tsv_record_batches(path, stats, strict, block_size=TSV_BLOCK_BYTES)


def _good_rows(path: str, record_batch, stats: ReadStats, strict: bool, lines_before: int) -> _Parsed:
    parsed = _parse_table(record_batch)
    bad = parsed.bad_reason != ""
    if bad.any():
        first = int(np.argmax(bad))
        if strict:
            text = _row_text(record_batch, first)
            line = _locate_line(path, text, lines_before + 1) if not path.endswith((".parquet", ".pq")) else None
            where = f"{path}:{line}" if line is not None else f"{path} (row {lines_before + first + 1})"
            raise DataError(f"{where}: {parsed.bad_reason[first]}: {text[:120]!r}")
        for reason, count in zip(*np.unique(parsed.bad_reason[bad], return_counts=True), strict=True):
            stats.add(str(reason), int(count))
        keep = ~bad
        parsed = _Parsed(parsed.labels[keep], parsed.ints[keep], parsed.ids[keep], parsed.present[keep], parsed.bad_reason[keep])
    return parsed


def read_batches(
    paths: Sequence[str],
    batch_size: int,
    stats: ReadStats | None = None,
    strict: bool = False,
    drop_remainder: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Streams ``Batch`` objects of ``batch_size`` rows from TSV/gzip/Parquet files, in order.

    Args:
        paths: files (see ``expand_paths``); ``.parquet``/``.pq`` read as Parquet, the rest as TSV.
        batch_size: rows per batch (the last one may be smaller unless ``drop_remainder``).
        stats: filled with row and malformed-line counts (of this shard's rows).
        strict: raise ``DataError`` (file and line) on the first malformed line.
        shard: ``(index, count)``: of every raw block of input rows, keep and
            parse only the ``index``-th of ``count`` contiguous parts, so
            data-parallel workers share the parsing instead of each parsing
            everything (a zero-copy slice of the Arrow block).

    Raises:
        DataError: an unreadable file, or a malformed line under ``strict``.
    """
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected >= 1)")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"Invalid shard: {shard!r} (expected (index, count) with 0 <= index < count)")
    stats = stats if stats is not None else ReadStats()
    pending: list[_Parsed] = []
    pending_rows = 0
    for path in paths:
        lines_before = 0
        try:
            for record_batch in _record_batches(path, stats, strict, batch_size):
                n = record_batch.num_rows
                lo, hi = n * index // count, n * (index + 1) // count
                part = record_batch.slice(lo, hi - lo) if count > 1 else record_batch
                parsed = _good_rows(path, part, stats, strict, lines_before + lo)
                lines_before += n
                stats.rows += len(parsed.labels)
                pending.append(parsed)
                pending_rows += len(parsed.labels)
                while pending_rows >= batch_size:
                    batch, pending, pending_rows = _take(pending, batch_size)
                    yield batch
        except (pa.ArrowInvalid, OSError, EOFError) as err:
            raise DataError(f"{path}: cannot read ({err})") from err
    if pending_rows and not drop_remainder:
        batch, _, _ = _take(pending, pending_rows)
        yield batch


def _take(pending: list[_Parsed], n: int) -> tuple[Batch, list[_Parsed], int]:
    cat = _Parsed(*(np.concatenate([getattr(p, k) for p in pending]) for k in _Parsed.__dataclass_fields__))
    batch = _to_batch(cat.labels[:n], cat.ints[:n], cat.ids[:n], cat.present[:n])
    rest = _Parsed(*(getattr(cat, k)[n:] for k in _Parsed.__dataclass_fields__))
    remaining = len(rest.labels)
    return batch, ([rest] if remaining else []), remaining
