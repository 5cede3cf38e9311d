"""Readers on hostile and unusual input: Parquet column types, invalid UTF-8, huge lines, binary garbage,
terminal escapes. Every bad line is counted and skipped, or (``strict``) named by file and line."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from monolith_torch.train.cli import main
from monolith_torch.train.data import (
    CAT_COLUMNS,
    COLUMNS,
    INT_COLUMNS,
    SEQ_FEATURE,
    DataError,
    ReadStats,
    generate_criteo,
)
from monolith_torch.train.readers import read_schema_batches
from monolith_torch.train.schema import criteo_schema
from monolith_torch.train.text_blocks import TEXT_BLOCK_BYTES, TextFormat, text_blocks

SMALL = ["--batch-size", "256", "--hidden", "8", "--emb-dim", "4", "--eval-batch-size", "512"]


@pytest.fixture(scope="module")
def good_lines(tmp_path_factory):
    path = generate_criteo(str(tmp_path_factory.mktemp("gen") / "rows.tsv"), 20_000, seed=11)
    with open(path, "rb") as f:
        return f.read().splitlines()


def _not_log(stderr: str) -> list[str]:
    """stderr without the log's INFO lines."""
    return [line for line in stderr.strip().splitlines() if " [rank 0] INFO " not in line]


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def read_criteo(paths, batch_size, stats=None, **kwargs):
    """The default run's reader: ``read_schema_batches`` with the Criteo preset."""
    return read_schema_batches(paths, criteo_schema(), batch_size, stats, **kwargs)


def _read(path, strict=False, batch_size=1000):
    stats = ReadStats()
    batches = list(read_criteo([str(path)], batch_size, stats, strict=strict))
    return batches, stats


def _assert_same_batches(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.dense, y.dense)
        for name in [*CAT_COLUMNS, SEQ_FEATURE]:
            assert torch.equal(x.sparse[name].values, y.sparse[name].values), name
            assert torch.equal(x.sparse[name].row_splits, y.sparse[name].row_splits), name


# ---------------------------------------------------------------- Parquet column types


def _columns(lines: list[bytes]) -> dict[str, list[str]]:
    fields = list(zip(*[line.decode().split("\t") for line in lines], strict=True))
    return {name: list(col) for name, col in zip(COLUMNS, fields, strict=True)}


@pytest.fixture(scope="module")
def reference(good_lines, tmp_path_factory):
    """400 generated rows as TSV, and what the reader makes of them."""
    lines = good_lines[:400]
    path = _write(tmp_path_factory.mktemp("ref") / "rows.tsv", lines)
    return _columns(lines), list(read_criteo([path], 150))


def _ints_or_none(col):
    return [int(v) if v else None for v in col]


@pytest.mark.parametrize(
    "int_type",
    ["string_with_nulls", "large_string", "float64", "float64_nan", "int32", "uint64", "dictionary"],
)
@pytest.mark.parametrize("cat_type", ["string", "dictionary", "binary", "uint64"])
def test_parquet_columns_of_every_lossless_type_read_like_tsv(tmp_path, reference, int_type, cat_type):
    cols, expected = reference
    data = {"label": pa.array([int(v) for v in cols["label"]], pa.int8())}
    for name in INT_COLUMNS:
        values = _ints_or_none(cols[name])
        if int_type == "string_with_nulls":
            data[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        elif int_type == "large_string":
            data[name] = pa.array(cols[name], pa.large_string())
        elif int_type == "float64":
            data[name] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        elif int_type == "float64_nan":  # how pandas stores a missing integer
            data[name] = pa.array(np.array([np.nan if v is None else v for v in values], dtype=np.float64))
        elif int_type == "dictionary":
            data[name] = pa.array(cols[name]).dictionary_encode()
        else:
            data[name] = pa.array(values, getattr(pa, int_type)())
    for name in CAT_COLUMNS:
        values = [v or None for v in cols[name]]
        if cat_type == "dictionary":
            data[name] = pa.array(values, pa.string()).dictionary_encode()
        elif cat_type == "binary":
            data[name] = pa.array([v.encode() if v else None for v in values], pa.binary())
        elif cat_type == "uint64":
            data[name] = pa.array([int(v, 16) if v else None for v in values], pa.uint64())
        else:
            data[name] = pa.array(values, pa.string())
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table(data), path, row_group_size=128)
    stats = ReadStats()
    got = list(read_criteo([str(path)], 150, stats))
    assert stats.skipped == 0, stats.malformed
    _assert_same_batches(got, expected)


def test_parquet_values_that_do_not_convert_are_malformed_rows(tmp_path, reference):
    cols, _ = reference
    data = {"label": pa.array([True, False, True, None, True, False])}  # bool labels; a null one is bad
    for name in INT_COLUMNS:
        data[name] = pa.array([1.0, 2.0, 1.5, 4.0, float("inf"), None])  # 1.5 and inf are not counts
    data["I2"] = pa.array([1, 2, 3, 4, 5, 2**64 - 1], pa.uint64())  # above int64: not a count
    for name in CAT_COLUMNS:
        data[name] = pa.array(cols[name][:6]).dictionary_encode()
    data["C3"] = pa.array([None, [2], None, None, None, None], pa.list_(pa.int64()))  # no id in a list
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table(data), path)
    batches, stats = _read(path)
    assert [b.labels.tolist() for b in batches] == [[1.0]]
    assert torch.allclose(batches[0].dense, torch.log1p(torch.ones(1, len(INT_COLUMNS))))
    assert stats.malformed == {"bad label": 1, "non-numeric integer field": 3, "bad hex id": 1}
    with pytest.raises(DataError, match=r"mixed\.parquet \(row 2\): bad hex id"):
        _read(path, strict=True)


# ---------------------------------------------------------------- TSV: one bad line is one bad line


def test_blocks_are_the_ones_pyarrows_streaming_reader_makes(tmp_path, good_lines):
    # Data-parallel ranks split every block; the same blocks keep the same split.
    path = _write(tmp_path / "rows.tsv", good_lines * 2)
    assert os.path.getsize(path) > 3 * TEXT_BLOCK_BYTES
    streaming = pacsv.open_csv(
        path, read_options=pacsv.ReadOptions(column_names=COLUMNS, block_size=TEXT_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
    )
    fmt = TextFormat("\t", False, tuple(COLUMNS), tuple(COLUMNS))
    assert [b.table.num_rows for b in text_blocks(path, fmt, ReadStats(), False)] == [b.num_rows for b in streaming]


def test_invalid_utf8_is_one_malformed_line(tmp_path, good_lines):
    lines = list(good_lines)
    fields = lines[15_000].split(b"\t")
    fields[1] = b"\xff" + fields[1]
    lines[15_000] = b"\t".join(fields)
    path = _write(tmp_path / "utf8.tsv", lines)
    batches, stats = _read(path)
    assert sum(len(b) for b in batches) == 19_999
    assert stats.malformed == {"non-numeric integer field": 1}
    with pytest.raises(DataError, match=r"utf8\.tsv:15001: non-numeric integer field \(column 'I1' = '\\xff\S*'\): '\S*\\xff"):
        _read(path, strict=True)


def test_a_10_mb_line_is_one_malformed_line(tmp_path, good_lines):
    lines = [*good_lines[:5000], b"1\t" + b"x" * 10_000_000, *good_lines[5000:8000]]
    path = _write(tmp_path / "long.tsv", lines)
    batches, stats = _read(path)
    rows = torch.cat([b.dense for b in batches])
    assert stats.malformed == {"line too long": 1} and rows.shape[0] == 8000
    reference, _ = _read(_write(tmp_path / "short.tsv", [*good_lines[:5000], *good_lines[5000:8000]]))
    assert torch.equal(rows, torch.cat([b.dense for b in reference]))
    with pytest.raises(DataError, match=r"long\.tsv:5001: line too long"):
        _read(path, strict=True)


def test_a_long_last_line_without_newline(tmp_path, good_lines):
    path = tmp_path / "tail.tsv"
    path.write_bytes(b"\n".join(good_lines[:10]) + b"\n" + b"y" * (3 * TEXT_BLOCK_BYTES))
    batches, stats = _read(path)
    assert sum(len(b) for b in batches) == 10 and stats.malformed == {"line too long": 1}


def test_wrong_column_counts_anywhere_in_a_block(tmp_path, good_lines):
    lines = list(good_lines[:3000])
    for i in (0, 1499, 2999):
        lines[i] = b"1\t2\t3"
    lines[700] = lines[700] + b"\textra"
    lines[800] = lines[800].replace(b"\t", b"\r", 1)  # a lone CR ends a line for pyarrow
    path = _write(tmp_path / "cols.tsv", [*lines[:100], b"", b"\r", *lines[100:]])
    batches, stats = _read(path)
    assert stats.malformed == {"wrong column count": 5} and sum(len(b) for b in batches) == 2995
    with pytest.raises(DataError, match=r"cols\.tsv:1: wrong column count"):
        _read(path, strict=True)
    del lines[0]
    path = _write(tmp_path / "cols.tsv", [*lines[:100], b"", b"\r", *lines[100:]])
    with pytest.raises(DataError, match=r"cols\.tsv:702: wrong column count"):
        _read(path, strict=True)


def test_strict_line_numbers_count_empty_lines(tmp_path, good_lines):
    fields = good_lines[50].split(b"\t")
    fields[20] = b"zz"
    lines = [*good_lines[:10], b"", b"", b"\r", *good_lines[10:50], b"\t".join(fields)]
    path = _write(tmp_path / "gaps.tsv", lines)
    with pytest.raises(DataError, match=r"gaps\.tsv:54: bad hex id"):
        _read(path, strict=True)


def test_binary_garbage_is_counted_not_a_traceback(tmp_path, capsys):
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(rng.integers(0, 256, 3 * TEXT_BLOCK_BYTES, dtype=np.uint8).tobytes())
    batches, stats = _read(garbage)
    assert batches == [] and stats.skipped > 0
    assert set(stats.malformed) <= {"wrong column count", "line too long"}
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--data", str(garbage), "--strict", *SMALL]) == 2
    err = capsys.readouterr().err
    lines = _not_log(err)
    assert len(lines) == 1 and "garbage.bin:1: wrong column count" in lines[0], err
    assert lines[0].isprintable()
    assert main(["train", "--run-dir", str(run), "--data", str(garbage), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err and "UnicodeDecodeError" not in err


# ---------------------------------------------------------------- terminal escapes


def test_escape_sequences_in_data_and_paths_never_reach_the_terminal(tmp_path, good_lines, capsys):
    hostile = b"1\t2\x1b]0;owned\x07\x1b[2J\x9b\xff"
    path = tmp_path / "evil\x1b[31m.tsv"
    _write(path, [*good_lines[:5], hostile, *good_lines[5:10]])
    with pytest.raises(DataError) as err:
        _read(path, strict=True)
    message = str(err.value).split(".tsv:", 1)[1]  # the path is escaped where it is printed, below
    assert message.isprintable() and "\\x1b]0;owned\\x07" in message
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--data", str(path), "--strict", *SMALL]) == 2
    out = capsys.readouterr()
    lines = _not_log(out.err)
    assert len(lines) == 1 and lines[0].isprintable(), lines
    assert "evil\\x1b[31m.tsv:6: wrong column count" in lines[0]
    assert "\x1b" not in out.out + out.err
