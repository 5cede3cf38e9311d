"""``batch_from_records``: JSON rows parse exactly as the same rows in a data file, or fail naming row and column."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from serve_helpers import tsv_records

from monolith_torch.train.data import generate_criteo
from monolith_torch.train.readers import Batch, RowError, batch_from_records, read_schema_batches
from monolith_torch.train.schema import criteo_schema, load_schema


def _assert_same(a: Batch, b: Batch) -> None:
    assert len(a) == len(b)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
    assert a.sparse.keys() == b.sparse.keys()
    for name in a.sparse:
        assert torch.equal(a.sparse[name].values, b.sparse[name].values), name
        assert torch.equal(a.sparse[name].row_splits, b.sparse[name].row_splits), name
    assert (a.timestamps is None) == (b.timestamps is None)
    if a.timestamps is not None:
        assert torch.equal(a.timestamps, b.timestamps)


def _file_batch(path: str, schema, rows: int) -> Batch:
    (batch,) = list(read_schema_batches([path], schema, rows))
    return batch


@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory):
    return generate_criteo(str(tmp_path_factory.mktemp("records") / "rows.tsv"), 700, seed=4, part=2)


def test_criteo_records_give_the_batch_of_the_file(criteo_file):
    schema = criteo_schema()
    records = tsv_records(criteo_file)
    before = copy.deepcopy(records)
    _assert_same(batch_from_records(records, schema), _file_batch(criteo_file, schema, 700))
    assert records == before  # the input is not modified


def test_numbers_and_nulls_parse_as_their_text_and_empty_fields(criteo_file):
    schema = criteo_schema()
    text = tsv_records(criteo_file)
    typed = []
    for row in text:
        row = dict(row)
        row["label"] = int(row["label"])
        for i in range(1, 14):  # dense integers as JSON numbers, an empty field as null or an absent key
            value = row[f"I{i}"]
            if value == "":
                if i % 2:
                    row[f"I{i}"] = None
                else:
                    del row[f"I{i}"]
            else:
                row[f"I{i}"] = int(value) if i % 3 else float(value)  # 3.0 is the integer 3
        typed.append(row)
    _assert_same(batch_from_records(typed, schema), batch_from_records(text, schema))


def test_the_label_is_optional(criteo_file):
    schema = criteo_schema()
    records = tsv_records(criteo_file, limit=50, label=False)
    batch = batch_from_records(records, schema)
    assert torch.equal(batch.labels, torch.zeros(50))
    reference = batch_from_records(tsv_records(criteo_file, limit=50), schema)
    torch.testing.assert_close(batch.dense, reference.dense, rtol=0, atol=0)


CUSTOM = [
    {"name": "click", "kind": "label"},
    {"name": "age", "kind": "dense", "transform": "standardize", "mean": 30.0, "std": 10.0, "fill": 30.0},
    {"name": "visits", "kind": "dense", "dtype": "int", "transform": "log1p"},
    {"name": "user", "kind": "categorical", "column": "user_id", "dtype": "string", "dim": 4},
    {"name": "item", "kind": "categorical", "column": "item_id", "dtype": "int", "dim": 4},
    {"name": "genres", "kind": "multi", "separator": "|", "dtype": "string", "dim": 4, "combiner": "mean"},
    {"name": "history", "kind": "sequence", "columns": ["h1", "h2", "h3"], "dtype": "int", "dim": 4,
     "max_seq_length": 3},
    {"name": "tags", "kind": "sequence", "column": "tags", "separator": ";", "dtype": "string", "dim": 4,
     "max_seq_length": 4},
    {"name": "ts", "kind": "timestamp"},
]
ROWS = [
    {"click": "1", "age": "31.5", "visits": "3", "user_id": "alice", "item_id": "17", "genres": "a|b",
     "h1": "1", "h2": "2", "h3": "", "tags": "x;y;z", "ts": "1700000000"},
    {"click": "0", "age": "", "visits": "0", "user_id": "123", "item_id": "-5", "genres": "",
     "h1": "", "h2": "", "h3": "", "tags": "", "ts": "1700000100"},
    {"click": "0", "age": "-2e1", "visits": "", "user_id": "bob", "item_id": "99999999999", "genres": "c||a|",
     "h1": "7", "h2": "", "h3": "9", "tags": ";q", "ts": "1700000200"},
    {"click": "1", "age": "44", "visits": "12", "user_id": "", "item_id": "", "genres": "b",
     "h1": "3", "h2": "3", "h3": "3", "tags": "ünïcode;x", "ts": "1700000300"},
]


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    schema = load_schema(CUSTOM)
    path = str(tmp_path_factory.mktemp("custom") / "rows.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(schema.columns))
        writer.writeheader()
        writer.writerows(ROWS)
    return schema, path


def test_custom_schema_records_give_the_batch_of_the_file(custom):
    schema, path = custom
    _assert_same(batch_from_records([dict(r) for r in ROWS], schema), _file_batch(path, schema, len(ROWS)))


def test_lists_and_numbers_for_ids_parse_as_the_file_does(custom):
    schema, path = custom
    typed = [dict(r) for r in ROWS]
    typed[0].update(genres=["a", "b"], item_id=17, h1=1, h2=2, h3=None, tags=["x", "y", "z"], ts=1700000000)
    typed[1].update(user_id=123, genres=[], tags=None, age=None)  # 123: hashed as the text "123"
    typed[2].update(genres=["c", "", "a", ""], visits=None, click=0)
    typed[3].update(tags="ünïcode;x", age=44.0, visits=12)  # a text value beside lists in the same column
    _assert_same(batch_from_records(typed, schema), _file_batch(path, schema, len(ROWS)))


def test_no_rows_is_an_empty_batch(custom):
    schema, _ = custom
    batch = batch_from_records([], schema)
    assert len(batch) == 0 and batch.dense.shape == (0, 2)


@pytest.mark.parametrize(
    ("change", "row", "column", "text"),
    [
        ({"C5": "zz"}, 2, "C5", "bad hex id 'zz'"),
        ({"I3": "1.5"}, 1, "I3", "non-numeric integer field '1.5'"),
        ({"I3": 1.5}, 1, "I3", "non-numeric integer field '1.5'"),
        ({"label": "2"}, 0, "label", "bad label '2'"),
        ({"C1": ["ab", "cd"]}, 1, "C1", "is a list, but the column holds one value"),
        ({"C2": {"x": 1}}, 2, "C2", "is not a string, a number or null"),
        ({"nope\x1b": "1"}, 1, "nope\\x1b", "not a column of the schema"),
        ({"C7": "\x1b[31m"}, 0, "C7", "bad hex id '\\x1b[31m'"),
    ],
)
def test_a_malformed_row_names_the_row_the_column_and_the_value(criteo_file, change, row, column, text):
    records = tsv_records(criteo_file, limit=4)
    records[row].update(change)
    with pytest.raises(RowError) as info:
        batch_from_records(records, criteo_schema())
    message = str(info.value)
    assert message.startswith(f"row {row}, column '{column}': "), message
    assert text in message
    assert info.value.row == row
    assert "\x1b" not in message


def test_a_row_that_is_not_an_object_and_records_that_are_not_a_list(criteo_file):
    records = tsv_records(criteo_file, limit=3)
    records[1] = ["not", "a", "dict"]
    with pytest.raises(RowError, match=r"^row 1: expected an object"):
        batch_from_records(records, criteo_schema())
    with pytest.raises(TypeError, match="records must be a list"):
        batch_from_records({"rows": []}, criteo_schema())


def test_the_first_malformed_row_is_named(criteo_file):
    records = tsv_records(criteo_file, limit=6)
    records[4]["C9"] = "not-hex"
    records[2]["I1"] = "x"
    with pytest.raises(RowError, match=r"^row 2, column 'I1': non-numeric integer field 'x'"):
        batch_from_records(records, criteo_schema())
