"""Criteo data: generator determinism, hex decoding, the Criteo preset through the TSV/gzip/Parquet readers,
malformed lines."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from monolith_torch.train.data import (
    CAT_COLUMNS,
    COLUMNS,
    SEQ_FEATURE,
    DataError,
    ReadStats,
    expand_paths,
    generate_criteo,
)
from monolith_torch.train.metrics import StreamingAUC, auc, log_loss
from monolith_torch.train.readers import decode_hex_ids, read_schema_batches
from monolith_torch.train.schema import criteo_schema


def read_criteo(paths, batch_size, stats=None, **kwargs):
    """The default run's reader: ``read_schema_batches`` with the Criteo preset."""
    return read_schema_batches(paths, criteo_schema(), batch_size, stats, **kwargs)


def _line(label="1", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


def test_generator_is_deterministic(tmp_path):
    a = generate_criteo(str(tmp_path / "a.tsv"), 500, seed=1)
    b = generate_criteo(str(tmp_path / "b.tsv"), 500, seed=1)
    c = generate_criteo(str(tmp_path / "c.tsv"), 500, seed=2)
    assert open(a).read() == open(b).read() != open(c).read()
    lines = open(a).read().splitlines()
    assert len(lines) == 500 and all(len(line.split("\t")) == len(COLUMNS) for line in lines)


def test_decode_hex_matches_python_int():
    values = ["0", "ff", "bec7ff7d", "FFFFFFFFFFFFFFFF", "", "12g4", "1" * 17]
    ids, present, valid = decode_hex_ids(pa.array(values))
    assert present.tolist() == [True, True, True, True, False, True, True]
    assert valid.tolist() == [True, True, True, True, True, False, False]
    assert ids[:3].tolist() == [0, 255, int("bec7ff7d", 16)]
    assert ids[3] == -1  # all 64 bits set, read as int64


def test_tsv_reader_builds_batches(tmp_path):
    path = tmp_path / "d.tsv"
    cats = [f"{i:08x}" for i in range(26)]
    cats_missing = ["" if i % 2 else c for i, c in enumerate(cats)]
    path.write_text("\n".join([_line("1", cats=cats), _line("0", ints=[""] * 13, cats=cats_missing)]) + "\n")
    stats = ReadStats()
    (batch,) = list(read_criteo([str(path)], 8, stats))
    assert batch.labels.tolist() == [1.0, 0.0]
    assert torch.allclose(batch.dense[0], torch.log1p(torch.arange(13.0)))
    assert batch.dense[1].tolist() == [0.0] * 13
    c2 = batch.sparse["C2"]
    assert c2.row_splits.tolist() == [0, 1, 1] and c2.values.tolist() == [1]
    seq = batch.sparse[SEQ_FEATURE]
    assert seq.row_lengths().tolist() == [13, 6]  # C14..C26, then only the present (even-numbered) ones
    assert stats.rows == 2 and stats.skipped == 0


def test_batches_stream_across_files_and_gzip(tmp_path):
    plain = generate_criteo(str(tmp_path / "a.tsv"), 700, seed=4, part=0)
    packed = str(tmp_path / "b.tsv.gz")
    with open(plain, "rb") as src, gzip.open(packed, "wb") as dst:
        dst.write(src.read())
    sizes = [len(b) for b in read_criteo(expand_paths(str(tmp_path / "*.tsv*")), 300)]
    assert sizes == [300, 300, 300, 300, 200]
    sizes = [len(b) for b in read_criteo([plain], 300, drop_remainder=True)]
    assert sizes == [300, 300]


def test_parquet_reader_matches_tsv(tmp_path):
    tsv = generate_criteo(str(tmp_path / "a.tsv"), 400, seed=6)
    cols = list(zip(*[line.split("\t") for line in open(tsv).read().splitlines()], strict=True))
    table = pa.table({name: pa.array(list(col)) for name, col in zip(COLUMNS, cols, strict=True)})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=128)
    a = list(read_criteo([tsv], 150))
    b = list(read_criteo([str(tmp_path / "a.parquet")], 150))
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.dense, y.dense)
        for name in [*CAT_COLUMNS, SEQ_FEATURE]:
            assert torch.equal(x.sparse[name].values, y.sparse[name].values)
            assert torch.equal(x.sparse[name].row_splits, y.sparse[name].row_splits)


def test_malformed_rows_counted_or_fatal(tmp_path):
    path = tmp_path / "bad.tsv"
    lines = [_line(), "1\t2", _line(ints=["x"] + ["1"] * 12), _line(label="7"), _line(cats=["zz"] * 26), _line()]
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    batches = list(read_criteo([str(path)], 10, stats))
    assert sum(len(b) for b in batches) == 2
    assert stats.malformed == {
        "wrong column count": 1, "non-numeric integer field": 1, "bad label": 1, "bad hex id": 1,
    }
    with pytest.raises(DataError, match=r"bad\.tsv:2: wrong column count"):
        list(read_criteo([str(path)], 10, strict=True))
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: non-numeric integer field"):
        list(read_criteo([str(path)], 10, strict=True))


@pytest.mark.timeout(120)
def test_reading_streams_with_memory_well_below_the_file_size(tmp_path):
    # Arrow's allocations while reading a 116 MB file batch by batch stay far
    # below the file size: a file larger than memory can be read.
    path = generate_criteo(str(tmp_path / "big.tsv"), 500_000, seed=8)
    size = os.path.getsize(path)
    peak, rows = 0, 0
    for batch in read_criteo([path], 1024):
        peak = max(peak, pa.total_allocated_bytes())
        rows += len(batch)
    assert rows == 500_000
    assert peak < size / 2, (peak, size)


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        expand_paths(str(tmp_path / "nothing*.tsv"))
    with pytest.raises(ValueError, match="batch_size"):
        list(read_criteo([], 0))


def test_auc_and_log_loss_against_numpy():
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.3
    # Scores on a 0.01 grid: ties on purpose, and exactly one streaming bin per value.
    scores = np.minimum(rng.integers(0, 80, 2000) + labels * 20, 100) / 100
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    got = auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.float32))
    assert got == pytest.approx(expected, abs=1e-12)
    streaming = StreamingAUC(num_bins=101)
    for chunk in np.array_split(np.arange(2000), 7):
        streaming.update(torch.tensor(scores[chunk]), torch.tensor(labels[chunk], dtype=torch.float32))
    assert streaming.result() == pytest.approx(expected, abs=1e-6)
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    expected_ll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert log_loss(torch.tensor(p), torch.tensor(labels, dtype=torch.float32)) == pytest.approx(expected_ll)


def test_shards_partition_the_rows(tmp_path):
    path = generate_criteo(str(tmp_path / "a.tsv"), 5000, seed=9)
    whole = torch.cat([b.labels for b in read_criteo([path], 700)])
    parts = [list(read_criteo([path], 700, shard=(i, 3))) for i in range(3)]
    assert all(parts), "every shard gets rows"
    assert sum(sum(len(b) for b in p) for p in parts) == 5000
    # Each shard's rows are a contiguous part of every block, in order: together they hold every row once.
    merged = torch.cat([torch.cat([b.dense for b in p]) for p in parts])
    reference = torch.cat([b.dense for b in read_criteo([path], 700)])
    assert torch.equal(merged.sort(dim=0).values, reference.sort(dim=0).values)
    assert whole.numel() == 5000
    with pytest.raises(ValueError, match="shard"):
        list(read_criteo([path], 10, shard=(3, 3)))
