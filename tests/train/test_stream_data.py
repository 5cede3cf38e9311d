"""The drifting Criteo-format stream: files in order and whole, deterministic, new ids and shifting popularity
with drift and none without, read by the Criteo preset; ``monolith-torch data criteo-stream``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from monolith_torch.train import data as data_module
from monolith_torch.train.cli import main
from monolith_torch.train.data import (
    CAT_COLUMNS,
    COLUMNS,
    ReadStats,
    generate_criteo,
    generate_criteo_stream,
)
from monolith_torch.train.readers import read_schema_batches
from monolith_torch.train.schema import criteo_schema

ROWS = 2000
# With rows_per_file = ROWS, file LATE sits 100,000 rows into the stream: drift 1 has slid every window by a fifth.
LATE = 50


def _ids(path) -> dict[str, Counter]:
    """Per categorical column, how often each non-empty id occurs in the file."""
    counts = {c: Counter() for c in CAT_COLUMNS}
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            for c, value in zip(CAT_COLUMNS, fields[1 + 13:], strict=True):
                if value:
                    counts[c][value] += 1
    return counts


def _seen_share(early: dict[str, Counter], late: dict[str, Counter]) -> float:
    """The share of the late file's id occurrences (all columns) whose id the early file holds."""
    seen = sum(n for c in CAT_COLUMNS for v, n in late[c].items() if v in early[c])
    return seen / sum(sum(late[c].values()) for c in CAT_COLUMNS)


def _top_overlap(early: dict[str, Counter], late: dict[str, Counter], k: int = 5) -> float:
    """The mean share of a column's ``k`` most frequent ids in the late file that are also among the early's."""
    shares = []
    for c in CAT_COLUMNS:
        top_early = {v for v, _ in early[c].most_common(k)}
        top_late = [v for v, _ in late[c].most_common(k)]
        shares.append(sum(v in top_early for v in top_late) / len(top_late))
    return sum(shares) / len(shares)


def _stream(tmp_path, name, drift, first=0, num_files=1, rows=ROWS, seed=0):
    return generate_criteo_stream(str(tmp_path / name), num_files, rows, seed=seed, drift=drift, first=first)


def test_files_are_named_in_order_and_whole(tmp_path):
    out = tmp_path / "new" / "stream"  # created, parents included
    paths = generate_criteo_stream(str(out), 3, 250, first=7)
    assert paths == [str(out / f"part-{k:05d}.tsv") for k in (7, 8, 9)]
    assert sorted(os.listdir(out)) == [f"part-{k:05d}.tsv" for k in (7, 8, 9)]  # no temp file left
    for path in paths:
        lines = open(path).read().splitlines()
        assert len(lines) == 250
        assert all(len(line.split("\t")) == len(COLUMNS) and line[0] in "01" for line in lines)


def test_stream_is_deterministic_and_continues_with_first(tmp_path):
    a = _stream(tmp_path, "a", 1.0, num_files=4, rows=300)
    b = _stream(tmp_path, "b", 1.0, num_files=4, rows=300)
    # A second call that starts where an earlier one stopped writes the same files.
    c = _stream(tmp_path, "c", 1.0, num_files=2, rows=300) + _stream(tmp_path, "c", 1.0, first=2, num_files=2, rows=300)
    other_seed = _stream(tmp_path, "d", 1.0, num_files=4, rows=300, seed=1)
    contents = [[open(p, "rb").read() for p in paths] for paths in (a, b, c, other_seed)]
    assert contents[0] == contents[1] == contents[2]
    assert all(x != y for x, y in zip(contents[0], contents[3], strict=True))
    assert len(set(contents[0])) == 4  # each file its own sample


def test_drift_brings_new_ids_and_new_favourites(tmp_path):
    early = _ids(_stream(tmp_path, "s", 1.0)[0])
    late = _ids(_stream(tmp_path, "s", 1.0, first=LATE)[0])
    new_ids = sum(len(set(late[c]) - set(early[c])) for c in CAT_COLUMNS)
    assert new_ids > 0.6 * sum(len(late[c]) for c in CAT_COLUMNS)
    # Most of the late file's rows carry ids the early file never did (about 0.3 seen; 0.7 without drift).
    assert _seen_share(early, late) < 0.45
    # The frequent ids changed: few of the late file's favourites were the early file's.
    assert _top_overlap(early, late) < 0.3


def test_no_drift_is_stationary(tmp_path):
    early = _ids(_stream(tmp_path, "s0", 0.0)[0])
    late = _ids(_stream(tmp_path, "s0", 0.0, first=LATE)[0])
    drift_early = _ids(_stream(tmp_path, "s1", 1.0)[0])
    drift_late = _ids(_stream(tmp_path, "s1", 1.0, first=LATE)[0])
    # Unseen ids without drift are the long tail a 2000-row file misses.
    assert _seen_share(early, late) > 0.6
    assert _seen_share(early, late) > _seen_share(drift_early, drift_late) + 0.25
    assert _top_overlap(early, late) > 0.6
    # The same hidden truth as generate_criteo's: its ids are the stream's ids without drift.
    reference = _ids(generate_criteo(str(tmp_path / "ref.tsv"), ROWS, seed=0))
    assert _seen_share(reference, late) > 0.6
    assert _seen_share(reference, drift_late) < 0.45


def test_preset_reader_reads_every_row(tmp_path):
    paths = generate_criteo_stream(str(tmp_path / "s"), 3, 700, drift=2.0, first=40)
    stats = ReadStats()
    rows = sum(len(b) for b in read_schema_batches(paths, criteo_schema(), 256, stats, strict=True))
    assert rows == stats.rows == 3 * 700 and stats.skipped == 0
    # The label stays learnable: both classes, neither rare.
    labels = [line[0] for p in paths for line in open(p)]
    assert 0.1 < labels.count("1") / len(labels) < 0.9


def test_generate_criteo_unchanged_by_the_stream(tmp_path):
    a = generate_criteo(str(tmp_path / "a.tsv"), 3000, seed=0, part=0)
    generate_criteo_stream(str(tmp_path / "s"), 2, 500, seed=0)  # shares the generator's code and the world
    b = generate_criteo(str(tmp_path / "b.tsv"), 3000, seed=0, part=0)
    assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_files": 0}, "num_files"),
        ({"num_files": True}, "num_files"),
        ({"rows_per_file": 0}, "rows_per_file"),
        ({"rows_per_file": 2.5}, "rows_per_file"),
        ({"drift": -0.1}, "drift"),
        ({"drift": float("nan")}, "drift"),
        ({"drift": float("inf")}, "drift"),
        ({"interval_s": -1.0}, "interval_s"),
        ({"seed": -1}, "seed"),
        ({"first": -1}, "first"),
        ({"first": 99_999, "num_files": 2}, "first"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(tmp_path, kwargs, name):
    args = {"num_files": 2, "rows_per_file": 10, **kwargs}
    with pytest.raises(ValueError, match=rf"^Invalid {name}: "):
        generate_criteo_stream(str(tmp_path / "out"), **args)
    assert not (tmp_path / "out").exists()


def test_interval_waits_between_files(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(data_module.time, "sleep", waits.append)
    assert len(generate_criteo_stream(str(tmp_path / "s"), 3, 10, interval_s=0.5)) == 3
    assert waits == [0.5, 0.5]  # between files, not before the first or after the last


class _StopOnSecondWait(threading.Event):
    """An Event that something sets during the second wait between files."""

    def __init__(self):
        super().__init__()
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        if self.waits == 2:
            self.set()
        return self.is_set()


def test_stop_ends_the_stream_early_with_whole_files(tmp_path):
    stop = _StopOnSecondWait()
    paths = generate_criteo_stream(str(tmp_path / "s"), 5, 40, interval_s=60.0, stop=stop)
    assert [os.path.basename(p) for p in paths] == ["part-00000.tsv", "part-00001.tsv"]
    assert sorted(os.listdir(tmp_path / "s")) == ["part-00000.tsv", "part-00001.tsv"]
    assert all(len(open(p).read().splitlines()) == 40 for p in paths)
    stopped = threading.Event()
    stopped.set()
    assert generate_criteo_stream(str(tmp_path / "none"), 3, 10, stop=stopped) == []


# ---------------------------------------------------------------- the CLI


def test_cli_writes_the_stream_and_says_how_to_train(tmp_path, capsys):
    out = tmp_path / "stream"
    assert main(["data", "criteo-stream", "--out", str(out), "--files", "3", "--rows-per-file", "100"]) == 0
    assert sorted(os.listdir(out)) == ["part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    assert all(len(open(out / n).read().splitlines()) == 100 for n in os.listdir(out))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote 3 files (100 rows each) to {out}"
    assert f"monolith-torch train --follow --data {out} --follow-idle-exit 10 --run-dir runs/stream" in lines[1]
    # --first continues the stream; --seed and --drift reach the generator.
    args = ["--out", str(out), "--rows-per-file", "100", "--seed", "4", "--drift", "0"]
    assert main(["data", "criteo-stream", *args, "--files", "1", "--first", "3"]) == 0
    expected = generate_criteo_stream(str(tmp_path / "ref"), 1, 100, seed=4, drift=0.0, first=3)[0]
    assert open(out / "part-00003.tsv", "rb").read() == open(expected, "rb").read()


@pytest.mark.parametrize(
    "args, name",
    [
        (["--files", "0"], "files"),
        (["--files", "abc"], "files"),
        (["--rows-per-file", "-5"], "rows_per_file"),
        (["--drift", "nan"], "drift"),
        (["--interval", "-1"], "interval"),
        (["--first", "x"], "first"),
    ],
)
def test_cli_bad_values_exit_2_in_one_line(tmp_path, capsys, args, name):
    out = tmp_path / "stream"
    assert main(["data", "criteo-stream", "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"monolith-torch data: error: Invalid {name}: "), err
    assert captured.out == "" and not out.exists()


def test_cli_unwritable_out_exits_74(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["data", "criteo-stream", "--out", str(blocker / "stream"), "--files", "1"]) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monolith-torch data: error:")


@pytest.mark.timeout(60)
def test_cli_sigint_while_waiting_keeps_the_files_written(tmp_path):
    out = tmp_path / "stream"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith_torch", "data", "criteo-stream", "--out", str(out), "--files", "5",
         "--rows-per-file", "300", "--interval", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        deadline = time.monotonic() + 40
        while not (out / "part-00000.tsv").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first file never came"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["monolith-torch data: interrupted by SIGINT"]
    assert "Traceback" not in stdout + stderr
    assert os.listdir(out) == ["part-00000.tsv"]
    assert len(open(out / "part-00000.tsv").read().splitlines()) == 300
