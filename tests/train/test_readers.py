"""Schema readers: every kind from CSV/TSV (header or not, plain or gzip) and Parquet; the Criteo preset
reads TSV, gzip and Parquet alike; malformed rows are counted and skipped, or fatal."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from monolith_torch.core.hashing import fold_ids, hash_string_ids
from monolith_torch.train import text_blocks
from monolith_torch.train.data import COLUMNS, DataError, ReadStats, generate_criteo
from monolith_torch.train.readers import read_schema_batches
from monolith_torch.train.schema import criteo_schema, load_schema

FEATURES = [
    {"name": "label", "kind": "label", "column": "click"},
    {"name": "ts", "kind": "timestamp", "column": "time"},
    {"name": "age", "kind": "dense", "transform": "standardize", "mean": 30.0, "std": 10.0, "fill": 30.0},
    {"name": "count", "kind": "dense", "dtype": "int", "transform": "log1p"},
    {"name": "user", "kind": "categorical", "column": "user_id", "dtype": "string"},
    {"name": "item", "kind": "categorical", "column": "item_id", "dtype": "int"},
    {"name": "shop", "kind": "categorical", "dtype": "hex"},
    {"name": "tags", "kind": "multi", "separator": "|", "combiner": "mean"},
    {"name": "hist", "kind": "sequence", "column": "history", "dtype": "int", "separator": " ",
     "max_seq_length": 3},
    {"name": "pair", "kind": "sequence", "columns": ["item_id", "other"], "dtype": "int"},
]
HEADER = ["click", "time", "age", "count", "user_id", "item_id", "shop", "tags", "history", "other", "unused"]
ROWS = [
    ["1", "100", "40", "3", "alice", "7", "ff", "a|b", "1 2 3 4", "9", "z"],
    ["0", "101", "", "", "bob", "8", "0A", "", "", "", "z"],
    ["0", "102", "25.5", "0", "", "", "", "b||c|", "5", "10", "z"],
]


def _ids(*values) -> list[int]:
    return hash_string_ids(list(values)).tolist()


def _check_rows(batch, ts=True):
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [1.0, 0.0, 0.0]
    if ts:
        assert batch.timestamps.dtype == torch.int64 and batch.timestamps.tolist() == [100, 101, 102]
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (3, 2)
    expected_dense = [[1.0, math.log1p(3)], [0.0, 0.0], [-0.45, 0.0]]
    torch.testing.assert_close(batch.dense, torch.tensor(expected_dense, dtype=torch.float32))
    sp = {k: (v.values.tolist(), v.row_splits.tolist()) for k, v in batch.sparse.items()}
    assert list(sp) == ["user", "item", "shop", "tags", "hist", "pair"]
    assert sp["user"] == (_ids("alice", "bob"), [0, 1, 2, 2])
    assert sp["item"] == ([7, 8], [0, 1, 2, 2])
    assert sp["shop"] == ([255, 10], [0, 1, 2, 2])
    assert sp["tags"] == (_ids("a", "b", "b", "c"), [0, 2, 2, 4])
    assert sp["hist"] == ([1, 2, 3, 4, 5], [0, 4, 4, 5])
    assert sp["pair"] == ([7, 9, 8, 10], [0, 2, 3, 4])
    for ragged in batch.sparse.values():
        assert ragged.values.dtype == torch.int64 and ragged.row_splits.dtype == torch.int64


def _write_text(path, rows, delimiter, header=True, compress=False):
    lines = ([delimiter.join(HEADER)] if header else []) + [delimiter.join(r) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name, delimiter, compress", [
    ("d.csv", ",", False), ("d.tsv", "\t", False), ("d.csv.gz", ",", True), ("d.txt.gz", "\t", True),
])
@pytest.mark.parametrize("header", [True, None])
def test_every_kind_from_text_with_a_header(tmp_path, name, delimiter, compress, header):
    path = _write_text(tmp_path / name, ROWS, delimiter, compress=compress)
    stats = ReadStats()
    (batch,) = read_schema_batches([path], load_schema(FEATURES), 10, stats, header=header)
    _check_rows(batch)
    assert stats.summary() == "3 rows read, no malformed lines"


def test_headerless_text_uses_the_schema_columns(tmp_path):
    path = _write_text(tmp_path / "d.tsv", ROWS, "\t", header=False)
    schema = load_schema(FEATURES, columns=HEADER)
    for header in (False, None):
        (batch,) = read_schema_batches([path], schema, 10, header=header)
        _check_rows(batch)


def test_a_header_missing_a_column_is_an_error(tmp_path):
    path = _write_text(tmp_path / "d.csv", ROWS, ",")
    schema = load_schema([*FEATURES, {"name": "extra", "kind": "dense"}])
    with pytest.raises(DataError, match=r"the header lacks columns \['extra'\]"):
        list(read_schema_batches([path], schema, 10, header=True))


def test_parquet_of_typed_columns_reads_like_text(tmp_path):
    table = pa.table({
        "click": pa.array([True, False, False]),
        "time": pa.array([100_000, 101_000, 102_000], pa.timestamp("ms")),
        "age": pa.array([40.0, float("nan"), 25.5]),
        "count": pa.array([3, None, 0], pa.int32()),
        "user_id": pa.array(["alice", "bob", None]).dictionary_encode(),
        "item_id": pa.array([7.0, 8.0, None]),
        "shop": pa.array(["ff", "0A", ""], pa.large_string()),
        "tags": pa.array([["a", "b"], [], ["b", "", "c", None]]),
        "history": pa.array([[1, 2, 3, 4], None, [5]], pa.list_(pa.int64())),
        "other": pa.array([9, None, 10], pa.uint64()),
    })
    pq.write_table(table, tmp_path / "d.parquet")
    (batch,) = read_schema_batches([str(tmp_path / "d.parquet")], load_schema(FEATURES), 10)
    _check_rows(batch)


def test_numbers_hash_as_their_text_for_string_ids(tmp_path):
    features = [{"name": "label", "kind": "label"}, {"name": "u", "kind": "categorical", "dtype": "string"}]
    pq.write_table(pa.table({"label": [1, 0], "u": pa.array([123, -4])}), tmp_path / "a.parquet")
    (batch,) = read_schema_batches([str(tmp_path / "a.parquet")], load_schema(features), 10)
    assert batch.sparse["u"].values.tolist() == _ids("123", "-4")
    assert batch.timestamps is None and batch.dense.shape == (2, 0)


def test_buckets_fold_the_ids(tmp_path):
    path = _write_text(tmp_path / "d.csv", ROWS, ",")
    features = [dict(f, buckets=50) if f["kind"] in ("categorical", "multi", "sequence") else f for f in FEATURES]
    (batch,) = read_schema_batches([path], load_schema(features), 10)
    assert batch.sparse["item"].values.tolist() == fold_ids(np.array([7, 8]), 50).tolist()
    assert batch.sparse["user"].values.tolist() == fold_ids(np.array(_ids("alice", "bob")), 50).tolist()
    assert all(((v.values >= 0) & (v.values < 50)).all() for v in batch.sparse.values())


def test_batches_split_and_carry_over_blocks(tmp_path):
    rows = [[str(i % 2), str(i), str(i), "1", f"u{i}", str(i), "1", "a|b", "1 2", "3", "z"] for i in range(23)]
    paths = [_write_text(tmp_path / "a.csv", rows[:10], ","), _write_text(tmp_path / "b.csv", rows[10:], ",")]
    schema = load_schema(FEATURES)
    batches = list(read_schema_batches(paths, schema, 4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert torch.cat([b.timestamps for b in batches]).tolist() == list(range(23))
    items = torch.cat([b.sparse["item"].values for b in batches]).tolist()
    assert items == list(range(23))
    assert [len(b) for b in read_schema_batches(paths, schema, 4, drop_remainder=True)] == [4] * 5


# ---------------------------------------------------------------- malformed rows

BAD = [
    (["1", "100", "forty", "3", "u", "7", "ff", "a", "1", "2", "z"], "non-numeric field", "age", "forty"),
    (["1", "100", "40", "3.5", "u", "7", "ff", "a", "1", "2", "z"], "non-numeric integer field", "count", "3.5"),
    (["1", "100", "40", "3", "u", "x7", "ff", "a", "1", "2", "z"], "bad integer id", "item_id", "x7"),
    (["1", "100", "40", "3", "u", "7", "fg", "a", "1", "2", "z"], "bad hex id", "shop", "fg"),
    (["1", "100", "40", "3", "u", "7", "ff", "a", "1 x", "2", "z"], "bad integer id", "history", "1 x"),
    (["2", "100", "40", "3", "u", "7", "ff", "a", "1", "2", "z"], "bad label", "click", "2"),
    (["1", "1e3", "40", "3", "u", "7", "ff", "a", "1", "2", "z"], "bad timestamp", "time", "1e3"),
    (["1", "100", "inf", "3", "u", "7", "ff", "a", "1", "2", "z"], "non-numeric field", "age", "inf"),
]


@pytest.mark.parametrize("row, reason, column, value", BAD)
def test_a_value_that_does_not_fit_its_kind_is_a_malformed_row(tmp_path, row, reason, column, value):
    path = _write_text(tmp_path / "d.csv", [ROWS[0], row, ROWS[1], ROWS[2]], ",")
    stats = ReadStats()
    (batch,) = read_schema_batches([path], load_schema(FEATURES), 10, stats)
    _check_rows(batch)
    assert stats.malformed == {reason: 1} and stats.rows == 3
    with pytest.raises(DataError) as err:
        list(read_schema_batches([path], load_schema(FEATURES), 10, strict=True))
    assert str(err.value).startswith(f"{path}:3: {reason} (column {column!r} = '{value}'): '")


def test_wrong_column_counts_are_counted_and_named_by_line(tmp_path):
    path = tmp_path / "d.tsv"
    lines = ["\t".join(HEADER), "\t".join(ROWS[0]), "", "1\t2", "\t".join(ROWS[1]), "\t".join(ROWS[2] + ["more"]),
             "\t".join(ROWS[2])]
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    (batch,) = read_schema_batches([str(path)], load_schema(FEATURES), 10, stats)
    _check_rows(batch)
    assert stats.malformed == {"wrong column count": 2}
    with pytest.raises(DataError, match=rf"^{path}:4: wrong column count \(expected 11\): '1\\t2'$"):
        list(read_schema_batches([str(path)], load_schema(FEATURES), 10, strict=True))


def test_a_lone_carriage_return_is_one_bad_line_and_a_quoted_one_is_data(tmp_path):
    schema = load_schema([{"name": "label", "kind": "label"}, {"name": "u", "kind": "categorical"}])
    path = tmp_path / "cr.csv"
    path.write_bytes(b'label,u\n1,a\n0,b\r1,c\n1,"x\ry"\n0,d,e\n0,z\n')
    stats = ReadStats()
    (batch,) = read_schema_batches([str(path)], schema, 10, stats)
    assert stats.malformed == {"wrong column count": 2}
    assert batch.sparse["u"].values.tolist() == _ids("a", "x\ry", "z")
    with pytest.raises(DataError, match=rf"^{path}:3: wrong column count \(expected 2\): '0,b\\r1,c'$"):
        list(read_schema_batches([str(path)], schema, 10, strict=True))


def test_a_bad_value_after_empty_lines_names_its_own_line(tmp_path):
    path = tmp_path / "d.tsv"
    lines = ["\t".join(HEADER), "", "\t".join(ROWS[0]), "", "\r", "\t".join(BAD[0][0])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:6: non-numeric field"):
        list(read_schema_batches([str(path)], load_schema(FEATURES), 10, strict=True))


def test_messages_escape_terminal_control_characters(tmp_path):
    row = list(ROWS[0])
    row[2] = "\x1b[31mred"
    path = _write_text(tmp_path / "d.csv", [row], ",")
    with pytest.raises(DataError) as err:
        list(read_schema_batches([path], load_schema(FEATURES), 10, strict=True))
    assert "\x1b" not in str(err.value) and "\\x1b[31mred" in str(err.value)


def test_parquet_rows_are_named_by_row_number(tmp_path):
    table = pa.table({"click": [1, 0, 5], "u": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "p.parquet")
    schema = load_schema([{"name": "label", "kind": "label", "column": "click"}, {"name": "u", "kind": "categorical"}])
    stats = ReadStats()
    assert [len(b) for b in read_schema_batches([str(tmp_path / "p.parquet")], schema, 10, stats)] == [2]
    assert stats.malformed == {"bad label": 1}
    with pytest.raises(DataError, match=r"p\.parquet \(row 3\): bad label \(column 'click' = '5'\): '5\\tc'"):
        list(read_schema_batches([str(tmp_path / "p.parquet")], schema, 10, strict=True))
    with pytest.raises(DataError, match=r"lacks columns \['x'\]"):
        list(read_schema_batches([str(tmp_path / "p.parquet")], load_schema([{"name": "x", "kind": "label"}]), 10))


def test_bad_arguments():
    schema = load_schema(FEATURES)
    for kwargs, match in (({"batch_size": 0}, "batch_size"), ({"shard": (2, 2)}, "shard"),
                          ({"delimiter": "ab"}, "delimiter"), ({"delimiter": '"'}, "delimiter"),
                          ({"header": "yes"}, "header")):
        args = {"batch_size": 4, **kwargs}
        with pytest.raises(ValueError, match=f"Invalid {match}"):
            next(read_schema_batches([], schema, **args))


# ---------------------------------------------------------------- the Criteo preset


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.dense, y.dense)
        assert list(x.sparse) == list(y.sparse)
        for name in x.sparse:
            assert torch.equal(x.sparse[name].values, y.sparse[name].values), name
            assert torch.equal(x.sparse[name].row_splits, y.sparse[name].row_splits), name


@pytest.fixture(scope="module")
def criteo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteo")
    tsv = generate_criteo(str(root / "c.tsv"), 2500, seed=5)
    lines = open(tsv, "rb").read().split(b"\n")
    lines[3] = lines[3].replace(b"\t", b"\tzz", 1)  # a non-numeric I1
    lines[10] = b"1\t2"
    lines[20] = lines[20][:-2] + b"g!"  # a bad hex id in C26
    lines[30] = b"2" + lines[30][1:]
    bad = root / "bad.tsv.gz"
    bad.write_bytes(gzip.compress(b"\n".join(lines)))
    table = pacsv.read_csv(tsv, read_options=pacsv.ReadOptions(column_names=COLUMNS),
                           parse_options=pacsv.ParseOptions(delimiter="\t"))
    pq.write_table(table, root / "c.parquet")
    return [tsv, str(bad), str(root / "c.parquet")]


def _rows(batches) -> dict[str, torch.Tensor]:
    """Every row of ``batches``, whatever their sizes: labels, dense, each feature's ids and lengths."""
    rows = {"labels": torch.cat([b.labels for b in batches]), "dense": torch.cat([b.dense for b in batches])}
    for name in batches[0].sparse:
        rows[name] = torch.cat([b.sparse[name].values for b in batches])
        rows[f"{name} lengths"] = torch.cat([b.sparse[name].row_lengths() for b in batches])
    return rows


def test_criteo_preset_reads_tsv_gzip_and_parquet_alike(criteo_files):
    tsv, bad, parquet = criteo_files
    stats = {path: ReadStats() for path in criteo_files}
    got = {path: list(read_schema_batches([path], criteo_schema(), 300, stats[path])) for path in criteo_files}
    _same_batches(got[tsv], got[parquet])
    assert stats[tsv].summary() == stats[parquet].summary() == "2500 rows read, no malformed lines"
    assert stats[bad].malformed == {"non-numeric integer field": 1, "wrong column count": 1, "bad hex id": 1,
                                    "bad label": 1}
    # The bad file's good rows are the clean file's rows without the four broken lines.
    keep = torch.ones(2500, dtype=torch.bool)
    keep[[3, 10, 20, 30]] = False
    clean, dirty = _rows(got[tsv]), _rows(got[bad])
    for key in ("labels", "dense", *(f"{name} lengths" for name in got[tsv][0].sparse)):
        assert torch.equal(clean[key][keep], dirty[key]), key
    for name in got[tsv][0].sparse:
        lengths = clean[f"{name} lengths"]
        row_of_id = torch.repeat_interleave(torch.arange(2500), lengths)
        assert torch.equal(clean[name][keep[row_of_id]], dirty[name]), name


@pytest.mark.parametrize("which", [0, 1, 2])
def test_criteo_preset_shards_split_every_file(criteo_files, which):
    path = criteo_files[which]
    whole_stats, shard_stats = ReadStats(), [ReadStats() for _ in range(3)]
    whole = _rows(list(read_schema_batches([path], criteo_schema(), 300, whole_stats)))
    parts = [_rows(list(read_schema_batches([path], criteo_schema(), 300, s, shard=(i, 3))))
             for i, s in enumerate(shard_stats)]
    assert all(len(p["labels"]) for p in parts), "every shard gets rows"
    assert sum(s.rows for s in shard_stats) == whole_stats.rows
    for reason, count in whole_stats.malformed.items():
        counts = [s.malformed.get(reason, 0) for s in shard_stats]
        # A line of the wrong shape is dropped before its block is split, so every shard counts it.
        assert counts == [count] * 3 if reason == "wrong column count" else sum(counts) == count, reason
    merged = torch.cat([p["dense"] for p in parts])
    assert torch.equal(merged.sort(dim=0).values, whole["dense"].sort(dim=0).values)


def test_criteo_preset_strict_error_names_the_first_bad_line(criteo_files):
    # The wrong column count on line 11 is found as its block is split, before values are parsed.
    with pytest.raises(DataError) as err:
        list(read_schema_batches([criteo_files[1]], criteo_schema(), 300, strict=True))
    assert str(err.value) == f"{criteo_files[1]}:11: wrong column count (expected 40): '1\\t2'"


def test_small_blocks_long_lines_and_line_numbers_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_blocks, "TEXT_BLOCK_BYTES", 64)
    monkeypatch.setattr(text_blocks, "MAX_LINE_BYTES", 64)
    features = [{"name": "label", "kind": "label"}, {"name": "u", "kind": "categorical", "dtype": "int"}]
    lines = ["label,u"] + [f"{i % 2},{i}" for i in range(40)]
    lines[20] = "1," + "9" * 300  # longer than a block and a half: skipped as it streams past
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    batches = list(read_schema_batches([str(path)], load_schema(features), 7, stats))
    ids = torch.cat([b.sparse["u"].values for b in batches]).tolist()
    assert ids == [i for i in range(40) if i != 19]
    assert stats.malformed == {"line too long": 1}
    with pytest.raises(DataError, match=rf"^{path}:21: line too long"):
        list(read_schema_batches([str(path)], load_schema(features), 7, strict=True))
    lines[20] = "1,x"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:21: bad integer id \(column 'u' = 'x'\): '1,x'$"):
        list(read_schema_batches([str(path)], load_schema(features), 7, strict=True))


def test_invalid_utf8_is_malformed_where_a_number_is_due_and_hashed_as_bytes_in_string_ids(tmp_path):
    path = tmp_path / "u.tsv"
    path.write_bytes(b"label\tx\ty\tz\n1\t\xff\xfe\t1\tab\n0\t2.5\t\xff1\tq\n1\t3\t4\t\xffz\n")
    schema = load_schema([{"name": "label", "kind": "label"}, {"name": "x", "kind": "dense"},
                          {"name": "y", "kind": "categorical", "dtype": "int"}, {"name": "z", "kind": "categorical"}])
    stats = ReadStats()
    (batch,) = read_schema_batches([str(path)], schema, 10, stats)
    assert stats.malformed == {"non-numeric field": 1, "bad integer id": 1}
    assert batch.sparse["z"].values.tolist() == hash_string_ids(pa.array([b"\xffz"], pa.binary())).tolist()
    with pytest.raises(DataError, match=r":2: non-numeric field \(column 'x' = '\\xff\\xfe'\)"):
        list(read_schema_batches([str(path)], schema, 10, strict=True))
