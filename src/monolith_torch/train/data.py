"""Criteo-format data: a deterministic generator with a planted signal, and streaming readers.

A Criteo line is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer
counts and 26 categorical features as hex ids, any field but the label may be
empty. TSV files (plain, or compressed as their extension says: ``.gz``,
``.bz2``, ...) are read in blocks of whole lines of about 1 MiB, each parsed
by pyarrow's CSV parser into byte columns (so no byte sequence can fail a
whole block); Parquet through ``ParquetFile.iter_batches``. Files larger than
memory train. Parsing is vectorized over whole blocks (hex ids are decoded
from the Arrow buffers with numpy), never a Python loop over lines; a block
that holds a line with the wrong number of fields takes a slow path that
splits it into lines.

Malformed lines (wrong column count, a line over 1-2 MiB, a non-numeric
integer field, a bad label or hex id, invalid UTF-8 in any of them) are
counted and skipped; with ``strict=True`` the first one raises ``DataError``
naming the file and line (Parquet: the row). Parquet columns may be of any
type that converts losslessly: integers, integer-valued floats or decimals,
bools, strings, binary, dictionary-encoded; a value that does not convert
makes its row malformed. Text quoted from the data in a message is escaped
(``core.fileio.printable``), so a line cannot drive the terminal.
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from monolith_torch.core.fileio import atomic_write, printable
from monolith_torch.core.hashing import MASK64, splitmix64_np
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
# A line longer than this may be, and one longer than twice this always is, skipped as
# "line too long" (it cannot end within the two blocks the reader holds at most).
MAX_LINE_BYTES = TSV_BLOCK_BYTES

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
        salt = np.uint64((seed << 20) & MASK64)
        hex_ids = splitmix64_np(idx[:, f].astype(np.uint64) * np.uint64(NUM_CAT) + np.uint64(f) + salt)
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
    samples of the same distribution. A ``path`` ending in ``.gz`` is gzipped.
    Written with ``core.fileio.atomic_write``: an error or interrupt
    (``KeyboardInterrupt``, or an exception a signal handler raises) leaves no
    file behind, and ``path`` only ever holds a complete file.

    Returns:
        ``path``.

    Raises:
        ValueError: ``num_rows`` < 1.
        SymlinkTargetError: ``path`` is a symbolic link.
    """
    path = os.fspath(path)
    if num_rows < 1:
        raise ValueError(f"Invalid num_rows: {num_rows!r} (expected >= 1)")
    world = _make_world(seed)
    rng = np.random.default_rng([seed, part, 1])
    with atomic_write(path, "wb") as out:
        if path.endswith(".gz"):
            # The gzip header names the final file, not the temp file.
            with gzip.GzipFile(os.path.basename(path), "wb", fileobj=out) as packed:
                _write_rows(packed, world, rng, num_rows, seed, chunk_rows)
        else:
            _write_rows(out, world, rng, num_rows, seed, chunk_rows)
    return path


def _write_rows(out, world: _World, rng: np.random.Generator, num_rows: int, seed: int, chunk_rows: int) -> None:
    for start in range(0, num_rows, chunk_rows):
        cols = _generate_rows(world, rng, min(chunk_rows, num_rows - start), seed)
        buf = pa.BufferOutputStream()
        pacsv.write_csv(
            pa.table({name: cols[name] for name in COLUMNS}), buf,
            pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
        )
        out.write(buf.getvalue())


# ---------------------------------------------------------------- columns of any type

# Why a row is malformed, by code; 0: it is not.
_REASONS = ("", "bad label", "non-numeric integer field", "bad hex id")
_BAD_LABEL, _BAD_INT, _BAD_ID = 1, 2, 3
_INT_RE = r"^-?[0-9]{1,18}$"
_INT64_MAX = np.iinfo(np.int64).max


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


def _text_scalar(t: pa.DataType, text: str) -> pa.Scalar:
    is_bytes = pa.types.is_binary(t) or pa.types.is_large_binary(t)
    return pa.scalar(text.encode() if is_bytes else text, t)


def _numbers_as_int64(arr: pa.Array, wrap_uint64: bool) -> tuple[np.ndarray, np.ndarray]:
    """Integers, bools or floats -> (int64 values, 0 where null or invalid; valid mask).

    A float is valid when it is a whole number in the int64 range, or NaN (missing,
    as pandas writes a missing integer); a uint64 above the int64 range is valid
    only with ``wrap_uint64`` (ids: the same 64 bits).
    """
    if pa.types.is_floating(arr.type):
        x = pc.cast(arr, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        whole = np.isfinite(x) & (np.trunc(x) == x) & (np.abs(x) < 2.0**63)
        return np.where(whole, x, 0.0).astype(np.int64), whole | np.isnan(x)
    if pa.types.is_uint64(arr.type):
        raw = arr.fill_null(0).to_numpy(zero_copy_only=False)
        valid = np.ones(len(arr), bool) if wrap_uint64 else raw <= _INT64_MAX
        return np.where(valid, raw, np.uint64(0)).view(np.int64), valid
    values = pc.cast(arr, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return values, np.ones(len(arr), bool)


def _decimal_text(arr: pa.Array) -> pa.Array:
    """A decimal column as integer text where the value is whole ("12.00" -> "12")."""
    return pc.replace_substring_regex(pc.cast(arr, pa.string()), r"\.0*$", "")


def _parse_ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer text, bytes or null (empty or null = missing) -> (values int64 with 0 for missing, valid mask)."""
    digits = pc.match_substring_regex(arr, _INT_RE)
    valid = pc.or_(digits, pc.equal(pc.binary_length(arr), 0)).fill_null(True).to_numpy(zero_copy_only=False)
    values = pc.cast(pc.if_else(digits, arr, pa.scalar(None, arr.type)), pa.int64()).fill_null(0)
    return values.to_numpy(zero_copy_only=False), valid


def _label_values(col) -> np.ndarray:
    """The label column as float64: 0.0, 1.0, or -1.0 for anything else (null, "2", 0.5, a list)."""
    arr = _plain(col)
    t = arr.type
    if _is_number(t) or pa.types.is_decimal(t):
        label = pc.cast(arr, pa.float64()).fill_null(-1.0).to_numpy(zero_copy_only=False)
        return np.where((label == 0.0) | (label == 1.0), label, -1.0)
    if _is_text(t):
        one = pc.equal(arr, _text_scalar(t, "1")).fill_null(False).to_numpy(zero_copy_only=False)
        zero = pc.equal(arr, _text_scalar(t, "0")).fill_null(False).to_numpy(zero_copy_only=False)
        return np.where(one, 1.0, np.where(zero, 0.0, -1.0))
    return np.full(len(arr), -1.0)


def _int_values(col) -> tuple[np.ndarray, np.ndarray]:
    """An integer-feature column of any type -> (values int64, 0 for missing; valid mask)."""
    arr = _plain(col)
    t = arr.type
    if _is_number(t):
        return _numbers_as_int64(arr, wrap_uint64=False)
    if pa.types.is_decimal(t):
        arr, t = _decimal_text(arr), pa.string()
    if _is_text(t):
        return _parse_ints(arr)
    return np.zeros(len(arr), np.int64), arr.is_null().to_numpy(zero_copy_only=False)


def _id_values(col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A categorical column of any type -> (ids int64, present mask, valid mask).

    Text is hex (``_decode_hex``); numbers are the ids themselves.
    """
    arr = _plain(col)
    t = arr.type
    present = arr.is_valid().to_numpy(zero_copy_only=False)
    if _is_text(t):
        return _decode_hex(arr)
    if _is_number(t):
        ids, valid = _numbers_as_int64(arr, wrap_uint64=True)
        if pa.types.is_floating(t):
            present &= ~pc.is_nan(arr).fill_null(False).to_numpy(zero_copy_only=False)
        return ids, present, valid
    if pa.types.is_decimal(t):
        ids, valid = _parse_ints(_decimal_text(arr))
        return ids, present, valid
    return np.zeros(len(arr), np.int64), present, ~present


def _decode_hex(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex text or bytes (empty or null = missing) -> (ids int64, present mask, valid mask).

    Vectorized over the Arrow buffers; any byte that is not a hex digit (invalid
    UTF-8 included) makes the id invalid.
    """
    arr = _plain(arr)
    if not _is_text(arr.type):
        arr = pc.cast(arr, pa.string())
    if arr.null_count:
        arr = arr.fill_null(_text_scalar(arr.type, ""))
    n = len(arr)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    width_bytes = 8 if large else 4
    offsets = np.frombuffer(
        arr.buffers()[1], dtype=np.int64 if large else np.int32, count=n + 1, offset=arr.offset * width_bytes
    ).astype(np.int64)
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


# ---------------------------------------------------------------- parsing


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
    bad: np.ndarray  # per row: an index into _REASONS, 0 when good


def _parse_table(table: pa.Table | pa.RecordBatch) -> _Parsed:
    n = table.num_rows
    bad = np.zeros(n, dtype=np.int8)
    labels = _label_values(table.column("label"))
    bad[labels < 0] = _BAD_LABEL
    ints = np.zeros((n, NUM_INT), dtype=np.int64)
    for j, name in enumerate(INT_COLUMNS):
        ints[:, j], valid = _int_values(table.column(name))
        bad[~valid & (bad == 0)] = _BAD_INT
    ids = np.zeros((n, NUM_CAT), dtype=np.int64)
    present = np.zeros((n, NUM_CAT), dtype=bool)
    for f, name in enumerate(CAT_COLUMNS):
        ids[:, f], present[:, f], valid = _id_values(table.column(name))
        bad[~valid & (bad == 0)] = _BAD_ID
    return _Parsed(labels, ints, ids, present, bad)


# ---------------------------------------------------------------- blocks of rows


@dataclass
class _Block:
    """Rows of one file, and where to find row ``i`` of them for a message (the error path only)."""

    table: pa.Table | pa.RecordBatch
    locate: Callable[[int], tuple[str, str]]  # row -> ("file:line" or "file (row N)", printable row text)


_TSV_READ = pacsv.ReadOptions(column_names=COLUMNS, block_size=1 << 30, use_threads=False)
_TSV_PARSE = pacsv.ParseOptions(delimiter="\t", quote_char=False)
# Bytes, not strings: no value can fail a block; the field parsers reject what is not ASCII.
_TSV_CONVERT = pacsv.ConvertOptions(
    column_types={c: pa.binary() for c in COLUMNS}, strings_can_be_null=False, quoted_strings_can_be_null=False
)


def _parse_tsv(data: bytes) -> pa.Table:
    return pacsv.read_csv(pa.py_buffer(data), read_options=_TSV_READ, parse_options=_TSV_PARSE,
                          convert_options=_TSV_CONVERT)


def _tsv_locate(path: str, chunk: bytes, first_line: int, numbers: list[int] | None, row: int) -> tuple[str, str]:
    lines = chunk.split(b"\n")
    if numbers is None:
        # The rows are the non-empty lines (pyarrow skips empty ones).
        index = [i for i, line in enumerate(lines) if line.rstrip(b"\r")][row]
    else:
        index = numbers[row] - first_line
    return f"{path}:{first_line + index}", printable(lines[index].rstrip(b"\r"), 120)


def _lines_of_the_right_shape(path: str, chunk: bytes, first_line: int, stats: ReadStats, strict: bool):
    """The slow path, for a block pyarrow refused: its lines with 40 fields, and their numbers.

    A line of another shape is counted and dropped, or under ``strict`` raised
    (before the block's other lines are parsed, as pyarrow's reader did).
    """
    keep, numbers = [], []
    for i, line in enumerate(chunk.split(b"\n")):
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            continue
        # pyarrow also ends a line at a lone "\r".
        if line.count(b"\t") != len(COLUMNS) - 1 or b"\r" in line:
            if strict:
                raise DataError(f"{path}:{first_line + i}: wrong column count (expected {len(COLUMNS)}): "
                                f"'{printable(line, 120)}'")
            stats.add("wrong column count")
            continue
        keep.append(line)
        numbers.append(first_line + i)
    return keep, numbers


def _tsv_block(path: str, chunk: bytes, first_line: int, stats: ReadStats, strict: bool) -> _Block | None:
    try:
        return _Block(_parse_tsv(chunk), functools.partial(_tsv_locate, path, chunk, first_line, None))
    except pa.ArrowInvalid:
        pass
    keep, numbers = _lines_of_the_right_shape(path, chunk, first_line, stats, strict)
    if not keep:
        return None
    return _Block(_parse_tsv(b"\n".join(keep)), functools.partial(_tsv_locate, path, chunk, first_line, numbers))


def _line_too_long(path: str, line: int, stats: ReadStats, strict: bool) -> None:
    if strict:
        raise DataError(f"{path}:{line}: line too long (more than {MAX_LINE_BYTES} bytes)")
    stats.add("line too long")


def _tsv_blocks(path: str, stats: ReadStats, strict: bool) -> Iterator[_Block]:
    """Blocks of whole lines: each read of ``TSV_BLOCK_BYTES`` up to its last newline.

    The same blocks pyarrow's streaming CSV reader makes, so data-parallel
    ranks split the rows as they always have. Memory stays at about two blocks
    whatever the file holds: a line that does not end within them is skipped
    as "line too long" as it streams past.
    """
    with pa.input_stream(path) as stream:  # decompresses by extension (.gz, .bz2, ...)
        rest, line, skipping = b"", 1, False  # line: the number of the first line in rest
        while data := stream.read(TSV_BLOCK_BYTES):
            if skipping:
                end = data.find(b"\n")
                if end < 0:
                    continue
                data, line, skipping = data[end + 1 :], line + 1, False
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > MAX_LINE_BYTES:
                    _line_too_long(path, line, stats, strict)
                    buf, skipping = b"", True
                rest = buf
                continue
            chunk, rest = buf[:cut], buf[cut:]
            block = _tsv_block(path, chunk, line, stats, strict)
            if block is not None:
                yield block
            line += chunk.count(b"\n")
        if rest and not skipping:
            block = _tsv_block(path, rest, line, stats, strict)
            if block is not None:
                yield block


def _row_text(table, i: int) -> str:
    def text(v) -> str:
        return "" if v is None else v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)

    return "\t".join(text(table.column(c)[i].as_py()) for c in COLUMNS)


def _parquet_locate(path: str, table, rows_before: int, row: int) -> tuple[str, str]:
    return f"{path} (row {rows_before + row + 1})", printable(_row_text(table, row), 120)


def _parquet_blocks(path: str, batch_size: int) -> Iterator[_Block]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({printable(str(err))})") from err
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing[:5]} (expected {COLUMNS[0]}, I1..I13, C1..C26)")
    rows_before = 0
    for record_batch in pf.iter_batches(batch_size=batch_size, columns=COLUMNS):
        yield _Block(record_batch, functools.partial(_parquet_locate, path, record_batch, rows_before))
        rows_before += record_batch.num_rows


def _blocks(path: str, stats: ReadStats, strict: bool, batch_size: int) -> Iterator[_Block]:
    if path.endswith(".parquet") or path.endswith(".pq"):
        return _parquet_blocks(path, batch_size)
    # pyarrow's CSV parsing allocates per block, so memory follows the block
    # size: 1 MiB blocks read as fast as 4 MiB ones and peak at a third of the
    # memory (docs/PERFORMANCE.md).
    return _tsv_blocks(path, stats, strict)


def _good_rows(block: _Block, lo: int, hi: int, stats: ReadStats, strict: bool) -> _Parsed:
    """Rows ``lo:hi`` of ``block`` parsed; malformed ones counted and dropped, or fatal under ``strict``."""
    table = block.table.slice(lo, hi - lo) if (lo, hi) != (0, block.table.num_rows) else block.table
    parsed = _parse_table(table)
    bad = parsed.bad != 0
    if bad.any():
        first = int(np.argmax(bad))
        if strict:
            where, text = block.locate(lo + first)
            raise DataError(f"{where}: {_REASONS[parsed.bad[first]]}: '{text}'")
        codes, counts = np.unique(parsed.bad[bad], return_counts=True)
        for code, count in zip(codes, counts, strict=True):
            stats.add(_REASONS[code], int(count))
        keep = ~bad
        parsed = _Parsed(parsed.labels[keep], parsed.ints[keep], parsed.ids[keep], parsed.present[keep], parsed.bad[keep])
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
        try:
            for block in _blocks(path, stats, strict, batch_size):
                n = block.table.num_rows
                parsed = _good_rows(block, n * index // count, n * (index + 1) // count, stats, strict)
                stats.rows += len(parsed.labels)
                pending.append(parsed)
                pending_rows += len(parsed.labels)
                while pending_rows >= batch_size:
                    batch, pending, pending_rows = _take(pending, batch_size)
                    yield batch
        except (pa.ArrowException, OSError, EOFError) as err:
            raise DataError(f"{path}: cannot read ({printable(str(err))})") from err
    if pending_rows and not drop_remainder:
        batch, _, _ = _take(pending, pending_rows)
        yield batch


def _take(pending: list[_Parsed], n: int) -> tuple[Batch, list[_Parsed], int]:
    cat = _Parsed(*(np.concatenate([getattr(p, k) for p in pending]) for k in _Parsed.__dataclass_fields__))
    batch = _to_batch(cat.labels[:n], cat.ints[:n], cat.ids[:n], cat.present[:n])
    rest = _Parsed(*(getattr(cat, k)[n:] for k in _Parsed.__dataclass_fields__))
    remaining = len(rest.labels)
    return batch, ([rest] if remaining else []), remaining
