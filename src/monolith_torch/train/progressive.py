"""Progressive validation: every batch is scored before it is trained on, reported per window.

The standard metric of online learning: the scores a training step computes
in its forward pass come before that step's update, so each row is a
held-out row at the moment it is scored. ``ProgressiveValidation`` collects
them in windows of ``window_rows`` rows, and, when the schema has a timestamp
column, in windows of ``window_seconds`` of data time (rows are assigned by
their own timestamp; a time window closes when a row of a later window
arrives, and rows that arrive for a closed window are counted as ``late``
only). Each closed window is one line of ``progressive.csv`` in the run
directory and a TensorBoard scalar (``progressive/auc_rows``, ...).

The open windows travel with checkpoints (``state_dict``), and on resume the
CSV keeps only the closed windows written up to the checkpoint, so a killed
and resumed run writes each window once. At the end of a run the open
windows are written too, as kinds ``rows-open``/``time-open``.
"""

from __future__ import annotations

import csv
import io
import math
import os

import torch

from monolith_torch.core.fileio import append_file, atomic_write
from monolith_torch.train.metrics import StreamingAUC

__all__ = ["ProgressiveValidation", "CSV_COLUMNS"]

CSV_COLUMNS = ("kind", "start", "end", "rows", "auc", "log_loss", "ctr", "mean_score", "seen", "step")
_EPS = 1e-7


class _Window:
    def __init__(self, start: int):
        self.start = start
        self.auc = StreamingAUC()
        self.rows = 0
        self.loss = 0.0
        self.positives = 0.0
        self.scores = 0.0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        p = probs.double().clamp(_EPS, 1 - _EPS)
        y = labels.double()
        self.auc.update(probs, labels)
        self.rows += probs.numel()
        self.loss += float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())
        self.positives += float(y.sum())
        self.scores += float(probs.double().sum())

    def line(self, kind: str, end: int, seen: int, step: int) -> list:
        n = max(self.rows, 1)
        return [kind, self.start, end, self.rows, _fmt(self.auc.result()), _fmt(self.loss / n),
                _fmt(self.positives / n), _fmt(self.scores / n), seen, step]

    def state_dict(self) -> dict:
        return {"start": self.start, "rows": self.rows, "loss": self.loss, "positives": self.positives,
                "scores": self.scores, "pos": self.auc.pos.clone(), "neg": self.auc.neg.clone(),
                "nonfinite": self.auc.nonfinite}

    @classmethod
    def from_state(cls, state: dict) -> _Window:
        w = cls(int(state["start"]))
        w.rows, w.loss, w.positives, w.scores = int(state["rows"]), state["loss"], state["positives"], state["scores"]
        w.auc.pos, w.auc.neg, w.auc.nonfinite = state["pos"].clone(), state["neg"].clone(), int(state["nonfinite"])
        return w


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6f}"


class ProgressiveValidation:
    """Windows of pre-update scores, written to ``csv_path`` and TensorBoard.

    Args:
        csv_path: the CSV file (appended to; ``restore`` trims it).
        window_rows: rows per row window.
        window_seconds: data seconds per time window (used when timestamps come with the batches).
        writer: a TensorBoard ``SummaryWriter`` or None.
    """

    def __init__(self, csv_path: str, window_rows: int, window_seconds: float, writer=None):
        self.csv_path = csv_path
        self.window_rows = window_rows
        self.window_seconds = window_seconds
        self.writer = writer
        self.seen = 0  # rows scored so far
        self.late = 0  # rows whose time window had closed
        self._rows = _Window(0)
        self._times: dict[int, _Window] = {}
        self._newest_time_window: int | None = None
        # AUC of the first and the newest closed row window, and how many closed: for the run's summary.
        self.row_windows = 0
        self.first_auc = self.last_auc = float("nan")

    def _write(self, lines: list[list]) -> None:
        if not lines:
            return
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        with append_file(self.csv_path) as f:
            out = csv.writer(f, lineterminator="\n")
            if new:
                out.writerow(CSV_COLUMNS)
            out.writerows(lines)
        for line in lines:
            if line[0] == "rows":
                self.row_windows += 1
                self.last_auc = float(line[4])
                if self.row_windows == 1:
                    self.first_auc = self.last_auc
        if self.writer is not None:
            for kind, _start, end, _n, auc, loss, *_ in lines:
                self.writer.add_scalar(f"progressive/auc_{kind}", float(auc), end)
                self.writer.add_scalar(f"progressive/log_loss_{kind}", float(loss), end)

    def add(self, probs: torch.Tensor, labels: torch.Tensor, timestamps: torch.Tensor | None, step: int) -> None:
        """Adds one batch's pre-update scores [B] and labels [B] (and timestamps [B], or None)."""
        probs, labels = probs.detach().reshape(-1), labels.detach().reshape(-1)
        lines: list[list] = []
        at = 0
        while at < probs.numel():
            room = self.window_rows - self._rows.rows
            take = min(room, probs.numel() - at)
            self._rows.add(probs[at:at + take], labels[at:at + take])
            at += take
            if self._rows.rows == self.window_rows:
                end = self._rows.start + self._rows.rows
                lines.append(self._rows.line("rows", end, self.seen + at, step))
                self._rows = _Window(end)
        self.seen += probs.numel()
        if timestamps is not None and timestamps.numel():
            lines += self._add_timed(probs, labels, timestamps, step)
        self._write(lines)

    def _add_timed(self, probs, labels, timestamps, step) -> list[list]:
        windows = torch.div(timestamps, int(self.window_seconds), rounding_mode="floor")
        keys, inverse = torch.unique(windows, return_inverse=True)
        lines = []
        for i, key in enumerate(keys.tolist()):  # one pass per window the batch touches (a handful)
            sel = (inverse == i).nonzero().squeeze(1)
            if self._newest_time_window is not None and key < self._newest_time_window and key not in self._times:
                self.late += sel.numel()
                continue
            window = self._times.setdefault(key, _Window(key * int(self.window_seconds)))
            window.add(probs[sel], labels[sel])
        newest = int(keys.max())
        if self._newest_time_window is None or newest > self._newest_time_window:
            self._newest_time_window = newest
            for key in sorted(k for k in self._times if k < newest):
                w = self._times.pop(key)
                lines.append(w.line("time", w.start + int(self.window_seconds), self.seen, step))
        return lines

    def flush(self, step: int) -> None:
        """Writes the open windows as they are, as kinds ``rows-open`` and ``time-open`` (dropped on resume)."""
        lines = []
        if self._rows.rows:
            lines.append(self._rows.line("rows-open", self._rows.start + self._rows.rows, self.seen, step))
        lines += [w.line("time-open", w.start + int(self.window_seconds), self.seen, step)
                  for _, w in sorted(self._times.items())]
        self._write(lines)

    def summary(self) -> dict:
        """Closed row windows so far, with the AUC of the first and the newest (a run's metrics)."""
        return {"progressive_windows": self.row_windows, "progressive_window_rows": self.window_rows,
                "progressive_first_auc": self.first_auc, "progressive_last_auc": self.last_auc}

    def state_dict(self) -> dict:
        return {"seen": self.seen, "late": self.late, "rows": self._rows.state_dict(),
                "times": {k: w.state_dict() for k, w in self._times.items()},
                "newest_time_window": self._newest_time_window,
                "summary": [self.row_windows, self.first_auc, self.last_auc]}

    def restore(self, state: dict | None) -> None:
        """Continues from a checkpoint's ``state_dict`` (None: from nothing) and trims the CSV to it."""
        seen = 0
        if state:
            self.seen, self.late = int(state["seen"]), int(state["late"])
            self._rows = _Window.from_state(state["rows"])
            self._times = {int(k): _Window.from_state(w) for k, w in state["times"].items()}
            self._newest_time_window = state["newest_time_window"]
            self.row_windows, self.first_auc, self.last_auc = state.get("summary", (0, float("nan"), float("nan")))
            seen = self.seen
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if len(r) == len(CSV_COLUMNS) and r[0] in ("rows", "time")
                and r[8].isdigit() and int(r[8]) <= seen]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([list(CSV_COLUMNS), *kept])
        with atomic_write(self.csv_path, "w") as f:
            f.write(buf.getvalue())
