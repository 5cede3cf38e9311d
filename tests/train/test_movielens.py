"""MovieLens-100k preparation, on a small fake recbole wheel (no network): temporal split, label,
features, a schema that loads and reads, atomic outputs, and clear errors."""

from __future__ import annotations

import os
import subprocess
import tomllib
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from monolith_torch.core.fileio import SymlinkTargetError
from monolith_torch.train.data import DataError, ReadStats
from monolith_torch.train.datasets import movielens
from monolith_torch.train.datasets.movielens import (
    RECBOLE_WHEEL,
    prepare_movielens_100k,
    split_rows,
)
from monolith_torch.train.readers import read_schema_batches
from monolith_torch.train.schema import load_schema

USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "01040"), (3, 17, "M", "student", "T8H1N"),
         (4, 56, "F", "writer", "55105"), (5, 45, "M", "executive", "90210")]
ITEMS = [(1, "Toy Story", "1995", "Animation Children's Comedy"), (2, "GoldenEye", "1995", "Action Thriller"),
         (3, "unkonwn", "unkonwn", "unknown"), (4, "Land Before Time III", "V", "Animation"),
         (5, "Casablanca", "1942", "Drama Romance War")]


def _ratings(n=50, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in range(1, 6) for i in range(1, 6)] * 2
    rows = []
    for k in range(n):
        u, i = pairs[k]
        # Timestamps descend with k and repeat in pairs, so the sort and its tie-break both matter.
        rows.append((u, i, int(rng.integers(1, 6)), 1_000_000 - (k // 2) * 10))
    return rows


def _member(header, rows):
    return "\n".join(["\t".join(header)] + ["\t".join(str(v) for v in r) for r in rows]) + "\n"


def _fake_wheel(directory, ratings=None, drop=None):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RECBOLE_WHEEL)
    members = {
        "inter": _member(["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
                         ratings if ratings is not None else _ratings()),
        "user": _member(["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"], USERS),
        "item": _member(["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"], ITEMS),
    }
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("recbole/__init__.py", "")
        for kind, text in members.items():
            if kind != drop:
                z.writestr(f"recbole/dataset_example/ml-100k/ml-100k.{kind}", text)
    return path


@pytest.fixture
def prepared(tmp_path):
    _fake_wheel(tmp_path / "wheels")
    out = prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "wheels", expected_sha256=None)
    return out, {name: pq.read_table(out[name]) for name in ("train", "valid", "test")}


def test_split_sizes_are_72_8_20():
    assert split_rows(100_000) == {"train": (0, 72_000), "valid": (72_000, 80_000), "test": (80_000, 100_000)}
    assert split_rows(50) == {"train": (0, 36), "valid": (36, 40), "test": (40, 50)}


def test_rows_are_sorted_by_time_and_split_in_order(prepared):
    out, tables = prepared
    assert sorted(os.listdir(os.path.dirname(out["train"]))) == ["schema.toml", "test.parquet", "train.parquet",
                                                                 "valid.parquet"]
    assert [tables[s].num_rows for s in ("train", "valid", "test")] == [36, 4, 10]
    ts = np.concatenate([tables[s]["timestamp"].to_numpy() for s in ("train", "valid", "test")])
    users = np.concatenate([tables[s]["user_id"].to_numpy() for s in ("train", "valid", "test")])
    assert (np.diff(ts) >= 0).all()
    items = np.concatenate([tables[s]["item_id"].to_numpy() for s in ("train", "valid", "test")])
    ties = np.diff(ts) == 0
    assert ties.any()
    # Ties broken by user, then item.
    assert ((np.diff(users) > 0) | ((np.diff(users) == 0) & (np.diff(items) > 0)))[ties].all()
    expected = sorted(_ratings(), key=lambda r: (r[3], r[0], r[1]))
    assert ts.tolist() == [r[3] for r in expected]
    labels = np.concatenate([tables[s]["label"].to_numpy() for s in ("train", "valid", "test")])
    assert labels.tolist() == [int(r[2] >= 4) for r in expected]


def test_user_and_item_features(prepared):
    _, tables = prepared
    rows = {(r["user_id"], r["item_id"]): r for s in tables.values() for r in s.to_pylist()}
    assert rows[(2, 5)]["zip_prefix"] == "01"  # the leading zero is kept
    assert rows[(3, 1)]["zip_prefix"] == "T8"
    assert {u: rows[(u, 1)]["age_bucket"] for u in range(1, 6)} == {
        1: "18-24", 2: "50-55", 3: "<18", 4: "56+", 5: "45-49"}
    assert rows[(1, 2)]["gender"] == "M" and rows[(4, 2)]["occupation"] == "writer"
    assert [rows[(1, i)]["release_year"] for i in range(1, 6)] == [1995, 1995, None, None, 1942]
    assert rows[(1, 1)]["genres"] == ["Animation", "Children's", "Comedy"]
    assert rows[(1, 5)]["genres"] == ["Drama", "Romance", "War"]


def test_the_schema_loads_and_reads_every_split(prepared):
    out, tables = prepared
    with open(out["schema"], "rb") as f:
        schema = load_schema(tomllib.load(f)["features"])
    assert [f.name for f in schema.embedded] == ["user", "item", "age", "gender", "occupation", "zip", "year",
                                                 "genres"]
    assert schema.table_of("user").vec_optimizer.learning_rate == 0.5
    assert schema.timestamp.name == "timestamp"
    for split in ("train", "valid", "test"):
        stats = ReadStats()
        assert sum(len(b) for b in read_schema_batches([out[split]], schema, 16, stats)) == tables[split].num_rows
        assert stats.rows == tables[split].num_rows and not stats.skipped
    batch = next(read_schema_batches([out["train"]], schema, 100))
    lengths = batch.sparse["year"].row_splits.diff()
    assert lengths.tolist() == [0 if y is None else 1 for y in tables["train"]["release_year"].to_pylist()]
    assert batch.sparse["genres"].row_splits[-1] == sum(len(g) for g in tables["train"]["genres"].to_pylist())


def test_the_wheel_hash_is_checked(tmp_path):
    _fake_wheel(tmp_path / "w")
    with pytest.raises(DataError, match="is not recbole 1.2.1's"):
        prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "w")
    assert not os.listdir(tmp_path / "out")


def test_a_wheel_without_the_data_is_an_error(tmp_path):
    _fake_wheel(tmp_path / "w", drop="user")
    with pytest.raises(DataError, match="the wheel has no recbole/dataset_example/ml-100k/ml-100k.user"):
        prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "w", expected_sha256=None)
    (tmp_path / "w" / RECBOLE_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "w", expected_sha256=None)


def test_an_unknown_user_is_an_error(tmp_path):
    _fake_wheel(tmp_path / "w", ratings=[*_ratings(10), (9, 1, 5, 7)])
    with pytest.raises(DataError, match="1 ratings name an unknown user"):
        prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "w", expected_sha256=None)


def test_a_symlinked_output_is_refused_before_anything_is_written(tmp_path):
    _fake_wheel(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "elsewhere", out / "test.parquet")
    with pytest.raises(SymlinkTargetError):
        prepare_movielens_100k(out, wheel_dir=tmp_path / "w", expected_sha256=None)
    assert sorted(os.listdir(out)) == ["test.parquet"]


def test_the_wheel_is_downloaded_with_pip_when_absent(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens.subprocess, "run", fake_run)
    out = prepare_movielens_100k(tmp_path / "out", wheel_dir=tmp_path / "cache", expected_sha256=None)
    assert calls and calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                      "recbole==1.2.1", "-d", str(tmp_path / "cache")]
    assert os.path.isfile(tmp_path / "cache" / RECBOLE_WHEEL) and os.path.isfile(out["schema"])
    prepare_movielens_100k(tmp_path / "out2", wheel_dir=tmp_path / "cache", expected_sha256=None)
    assert len(calls) == 1  # the cached wheel is used
    prepare_movielens_100k(tmp_path / "out3", expected_sha256=None)  # a temporary folder
    assert len(calls) == 2


def test_a_failed_download_is_a_data_error(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nno network")

    monkeypatch.setattr(movielens.subprocess, "run", failing)
    with pytest.raises(DataError, match=r"pip download recbole==1.2.1 failed \(exit 1\).*no network"):
        prepare_movielens_100k(tmp_path / "out", expected_sha256=None)
