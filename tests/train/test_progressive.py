"""Progressive validation windows: by rows, by data time, and resumed from a checkpoint's state."""

from __future__ import annotations

import csv

import torch

from monolith_torch.train.metrics import auc, log_loss
from monolith_torch.train.progressive import ProgressiveValidation


def _lines(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _batches(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, generator=g)
    labels = (torch.rand(n, generator=g) < probs).float()
    ts = torch.arange(n, dtype=torch.int64) * 10 + 5  # 10 data seconds per row
    return probs, labels, ts


def test_row_windows_split_batches_at_the_boundary_and_match_exact_metrics(tmp_path):
    probs, labels, _ = _batches()
    pv = ProgressiveValidation(str(tmp_path / "p.csv"), window_rows=300, window_seconds=3600)
    for lo in range(0, 1000, 128):  # batches straddle the window boundaries
        pv.add(probs[lo:lo + 128], labels[lo:lo + 128], None, step=lo // 128 + 1)
    pv.flush(step=8)
    lines = _lines(tmp_path / "p.csv")
    assert [(r["kind"], int(r["start"]), int(r["end"]), int(r["rows"])) for r in lines] == [
        ("rows", 0, 300, 300), ("rows", 300, 600, 600 - 300), ("rows", 600, 900, 300), ("rows-open", 900, 1000, 100)]
    for r in lines:
        lo, hi = int(r["start"]), int(r["end"])
        # Binned AUC: exact up to ties within a bin of 1/2000.
        assert abs(float(r["auc"]) - auc(probs[lo:hi], labels[lo:hi])) < 2e-3
        assert abs(float(r["log_loss"]) - log_loss(probs[lo:hi], labels[lo:hi])) < 1e-5
    assert pv.summary()["progressive_windows"] == 3


def test_time_windows_close_when_a_later_window_starts_and_count_late_rows(tmp_path):
    probs, labels, ts = _batches()
    pv = ProgressiveValidation(str(tmp_path / "p.csv"), window_rows=10**6, window_seconds=3600)
    pv.add(probs[:500], labels[:500], ts[:500], step=1)  # data seconds 5 .. 4995: windows 0 and 1
    late = ts[500:600].clone()
    late[:10] = 7  # ten rows from window 0, which closed when window 1 began
    pv.add(probs[500:600], labels[500:600], late, step=2)
    lines = [r for r in _lines(tmp_path / "p.csv") if r["kind"] == "time"]
    assert [(int(r["start"]), int(r["end"]), int(r["rows"])) for r in lines] == [(0, 3600, 360)]
    assert pv.late == 10


def test_restore_continues_the_open_windows_and_trims_lines_written_after_the_checkpoint(tmp_path):
    probs, labels, _ = _batches()
    path = str(tmp_path / "p.csv")
    whole = ProgressiveValidation(str(tmp_path / "whole.csv"), window_rows=250, window_seconds=3600)
    for lo in range(0, 1000, 100):
        whole.add(probs[lo:lo + 100], labels[lo:lo + 100], None, step=lo // 100)
    first = ProgressiveValidation(path, window_rows=250, window_seconds=3600)
    for lo in range(0, 400, 100):
        first.add(probs[lo:lo + 100], labels[lo:lo + 100], None, step=lo // 100)
    saved = first.state_dict()  # a checkpoint at 400 rows
    for lo in range(400, 700, 100):  # trained, then killed before the next checkpoint
        first.add(probs[lo:lo + 100], labels[lo:lo + 100], None, step=lo // 100)
    resumed = ProgressiveValidation(path, window_rows=250, window_seconds=3600)
    resumed.restore(saved)
    assert [r["end"] for r in _lines(path)] == ["250"]  # the window closed at 500 rows is gone
    for lo in range(400, 1000, 100):
        resumed.add(probs[lo:lo + 100], labels[lo:lo + 100], None, step=lo // 100)
    assert _lines(path) == _lines(tmp_path / "whole.csv")
