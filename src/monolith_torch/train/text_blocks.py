"""Text files as blocks of rows: whole-line chunks, the header line, and lines of the wrong shape.

``text_blocks`` reads a CSV/TSV file (plain, or compressed as its extension
says: ``.gz``, ``.bz2``, ...) in chunks of whole lines of about 1 MiB
(``TEXT_BLOCK_BYTES``: each read up to its last newline, the same blocks
pyarrow's streaming CSV reader makes), settles whether the first line is a
header (``TextFormat.header``), and parses each chunk with pyarrow's CSV
parser into byte columns (only the columns the schema reads), so no byte
sequence can fail a chunk. A chunk pyarrow refuses holds a line with the
wrong number of fields: it takes a slow path over its lines, which counts
and drops (or, under ``strict``, raises on) each such line; a line holding an
unquoted lone ``\\r`` (where pyarrow would end a row) is one such line, so one
bad line is one bad line. A line that does not end within a block and a half
is skipped as "line too long" as it streams past, so memory stays at a few
blocks whatever the file holds.

Each ``Block`` can name the file and line of any of its rows, for the
messages ``train.readers`` raises. Imports ``train.data`` for ``DataError``
and ``ReadStats``.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv

from monolith_torch.core.fileio import printable
from monolith_torch.train.data import DataError, ReadStats

__all__ = ["TEXT_BLOCK_BYTES", "MAX_LINE_BYTES", "Block", "TextFormat", "default_delimiter", "text_blocks"]

TEXT_BLOCK_BYTES = 1 << 20
# A line that does not end within a block and a half is malformed ("line too long").
MAX_LINE_BYTES = TEXT_BLOCK_BYTES
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")


@dataclass
class Block:
    """Rows of one file, and where to find row ``i`` of them for a message (the error path only)."""

    table: pa.Table | pa.RecordBatch
    locate: Callable[[int], tuple[str, str]]  # row -> ("file:line" or "file (row N)", printable row text)


@dataclass(frozen=True)
class TextFormat:
    """How to read a text file.

    Attributes:
        delimiter: one character (``default_delimiter`` picks one by the file name).
        header: True, the first line names the columns; False, they are
            ``names``; None, a header when the first line names every column
            in ``needed``.
        names: the columns of a headerless file, in order.
        needed: the columns to keep.
    """

    delimiter: str
    header: bool | None
    names: tuple[str, ...]
    needed: tuple[str, ...]


def default_delimiter(path: str) -> str:
    """``,`` for a ``.csv`` file (also ``.csv.gz`` and other compressed forms), a tab otherwise."""
    name = path.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return "," if name.endswith(".csv") else "\t"


def _line_chunks(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[bytes, int]]:
    """(chunk of whole lines, number of its first line): each read of ``TEXT_BLOCK_BYTES`` up to its last newline.

    A line that does not end within two reads is skipped as "line too long" as it streams past.
    """
    with pa.input_stream(path) as stream:  # decompresses by extension (.gz, .bz2, ...)
        rest, line, skipping = b"", 1, False
        while data := stream.read(TEXT_BLOCK_BYTES):
            if skipping:
                end = data.find(b"\n")
                if end < 0:
                    continue
                data, line, skipping = data[end + 1 :], line + 1, False
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > MAX_LINE_BYTES:
                    if strict:
                        raise DataError(f"{path}:{line}: line too long (more than {MAX_LINE_BYTES} bytes)")
                    stats.add("line too long")
                    buf, skipping = b"", True
                rest = buf
                continue
            yield buf[:cut], line
            line += buf.count(b"\n", 0, cut)
            rest = buf[cut:]
        if rest and not skipping:
            yield rest, line


_ROW_BREAK = re.compile(rb"\r\n|\n|\r")


def _row_lines(chunk: bytes, first_line: int) -> list[tuple[int, bytes]]:
    """(line number, text) of each row pyarrow sees in ``chunk``: non-empty, ended by \\n, \\r\\n or \\r."""
    out, pos = [], 0
    for m in [*_ROW_BREAK.finditer(chunk), None]:
        end = len(chunk) if m is None else m.start()
        if end > pos:
            out.append((first_line + chunk.count(b"\n", 0, pos), chunk[pos:end]))
        if m is None:
            break
        pos = m.end()
    return out


def _split_fields(line: bytes, delimiter: str) -> list[str]:
    """The fields of one (header) line; CSV quoting as pyarrow reads it."""
    text = line.decode("utf-8")
    if delimiter != ",":
        return text.split(delimiter)
    return next(csv.reader([text], delimiter=delimiter, quotechar='"'), [])


def _settle_header(path: str, chunk: bytes, fmt: TextFormat) -> tuple[tuple[str, ...], bytes, int]:
    """The file's column names, the chunk without its header line, and how many lines that took."""
    if fmt.header is False:
        return fmt.names, chunk, 0
    end = chunk.find(b"\n")
    first = (chunk if end < 0 else chunk[:end]).rstrip(b"\r")
    try:
        fields = _split_fields(first, fmt.delimiter) if first else []
    except (csv.Error, UnicodeDecodeError):
        fields = []
    is_header = fmt.header is True or (fields and all(c in fields for c in fmt.needed))
    if not is_header:
        return fmt.names, chunk, 0
    missing = [c for c in fmt.needed if c not in fields]
    if missing:
        raise DataError(f"{path}: the header lacks columns {missing[:5]} (it has {printable(str(fields[:10]), 200)})")
    if len(set(fields)) != len(fields):
        raise DataError(f"{path}: the header names a column twice ({printable(str(fields[:10]), 200)})")
    return tuple(fields), (b"" if end < 0 else chunk[end + 1 :]), 1


def _read_text(chunk: bytes, names: Sequence[str], fmt: TextFormat) -> pa.Table:
    return pacsv.read_csv(
        pa.py_buffer(chunk),
        read_options=pacsv.ReadOptions(column_names=list(names), block_size=1 << 30, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char='"' if fmt.delimiter == "," else False),
        # Bytes, not strings: no value can fail a block; the field parsers reject what does not fit.
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in fmt.needed},
                                             include_columns=list(fmt.needed), strings_can_be_null=False,
                                             quoted_strings_can_be_null=False),
    )


def _lines(chunk: bytes, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, text) of each non-empty line of ``chunk``: ended by \\n, a trailing \\r dropped."""
    for i, line in enumerate(chunk.split(b"\n")):
        line = line[:-1] if line.endswith(b"\r") else line
        if line:
            yield first_line + i, line


def _is_one_row(line: bytes, delimiter: str, num_fields: int) -> bool:
    """Whether pyarrow reads ``line`` as one row of ``num_fields`` fields.

    An unquoted lone \\r ends a row for pyarrow, so a line holding one is
    malformed as a whole: one bad line is one bad line.
    """
    if delimiter != ",":
        return b"\r" not in line and line.count(delimiter.encode()) + 1 == num_fields
    try:
        fields = next(csv.reader([line.decode("utf-8", "replace")], delimiter=",", quotechar='"'), [])
    except csv.Error:  # an unquoted \r
        return False
    return len(fields) == num_fields


def _parse_text_block(path: str, chunk: bytes, first_line: int, names: Sequence[str], fmt: TextFormat,
                      stats: ReadStats, strict: bool) -> Block | None:
    """The rows of a chunk of whole lines; lines with the wrong number of fields are counted and dropped.

    pyarrow parses the chunk in one call; only a chunk it refuses (a line of
    the wrong shape) takes the slow path over its lines, which never decodes
    them (invalid UTF-8 is a malformed value, found later, not an error here).
    """
    try:
        table = _read_text(chunk, names, fmt)
        return Block(table, functools.partial(_text_locate, path, chunk, first_line)) if table.num_rows else None
    except pa.ArrowInvalid:
        pass
    keep: list[bytes] = []
    numbers: list[int] = []
    for line, text in _lines(chunk, first_line):
        if not _is_one_row(text, fmt.delimiter, len(names)):
            if strict:
                raise DataError(f"{path}:{line}: wrong column count (expected {len(names)}): "
                                f"'{printable(text, 120)}'")
            stats.add("wrong column count")
            continue
        keep.append(text)
        numbers.append(line)
    if not keep:
        return None
    try:
        table = _read_text(b"\n".join(keep) + b"\n", names, fmt)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}:{first_line}: cannot parse ({printable(str(err), 200)})") from None
    return Block(table, functools.partial(_kept_locate, path, keep, numbers))


def _text_locate(path: str, chunk: bytes, first_line: int, row: int) -> tuple[str, str]:
    line, text = _row_lines(chunk, first_line)[row]
    return f"{path}:{line}", printable(text, 120)


def _kept_locate(path: str, keep: list[bytes], numbers: list[int], row: int) -> tuple[str, str]:
    return f"{path}:{numbers[row]}", printable(keep[row], 120)


def text_blocks(path: str, fmt: TextFormat, stats: ReadStats, strict: bool) -> Iterator[Block]:
    """The rows of a text file, a block per chunk of whole lines, the header line left out.

    Args:
        path: the file; compressed as its extension says (``.gz``, ``.bz2``, ...).
        fmt: its delimiter, header and columns.
        stats: counts lines too long or of the wrong column count.
        strict: raise ``DataError`` (file and line) on such a line instead.

    Raises:
        DataError: a header that lacks a needed column or names one twice, or
            a malformed line under ``strict``.
    """
    names = None
    for chunk, line in _line_chunks(path, stats, strict):
        if names is None:
            names, chunk, used = _settle_header(path, chunk, fmt)
            line += used
            if not chunk:
                continue
        block = _parse_text_block(path, chunk, line, names, fmt, stats, strict)
        if block is not None:
            yield block

