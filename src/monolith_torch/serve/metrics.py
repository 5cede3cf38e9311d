"""The server's Prometheus metrics: request counters and latencies, and the model version's freshness.

``ServeMetrics`` counts what the app observes (requests by endpoint and
status, their latency in a histogram, rows scored); ``render`` writes those
and a ``ServedModel.status()`` picture as Prometheus text exposition format
0.0.4, by hand (a few lines; no client library)::

    monolith_serve_ready                          1 once a version is applied
    monolith_serve_model_seq                      sequence number of the applied publication
    monolith_serve_model_global_step              the trainer's global step in it
    monolith_serve_model_info{run_id}             1, labelled with the run
    monolith_serve_model_age_seconds              now - the applied publication's wall_time
    monolith_serve_newest_publication_seq         newest publication in the export folder
    monolith_serve_publications_behind            newest_seq - model_seq
    monolith_serve_lag_behind_newest_seconds      newest folder's mtime - applied wall_time (0 when current)
    monolith_serve_table_rows{table}              rows held per embedding table
    monolith_serve_publications_refused_total     publications refused (corrupt, out of order, other run)
    monolith_serve_requests_total{endpoint,status}
    monolith_serve_request_duration_seconds{endpoint}   histogram (_bucket{le}, _sum, _count)
    monolith_serve_rows_scored_total

May import nothing of monolith_torch.
"""

from __future__ import annotations

import bisect
import math
import threading
import time

__all__ = ["LATENCY_BUCKETS", "ServeMetrics"]

# Seconds: fine steps around the 1-20 ms a request takes, coarse ones for the tail.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_PREFIX = "monolith_serve_"


def _label(value: object) -> str:
    """A label value escaped as the exposition format wants (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class ServeMetrics:
    """Request counts, the latency histogram per endpoint and rows scored; thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
            raise ValueError(f"Invalid buckets: {buckets!r} (expected increasing positive seconds)")
        self.buckets = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, list] = {}  # endpoint -> [counts per bucket (+Inf last), sum]
        self.rows_scored = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._requests[(endpoint, status)] = self._requests.get((endpoint, status), 0) + 1
            hist = self._latency.setdefault(endpoint, [[0] * (len(self.buckets) + 1), 0.0])
            hist[0][i] += 1
            hist[1] += seconds

    def add_rows(self, n: int) -> None:
        with self._lock:
            self.rows_scored += n

    def render(self, status: dict, now: float | None = None) -> str:
        """The Prometheus text of these counters and of ``status`` (``ServedModel.status()``)."""
        now = time.time() if now is None else now
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {_PREFIX}{name} {help_text}")
            out.append(f"# TYPE {_PREFIX}{name} {kind}")
            out.extend(f"{_PREFIX}{name}{labels} {_number(value)}" for labels, value in samples)

        ready = status["ready"]
        metric("ready", "gauge", "1 once a model version is applied and scoring works", [("", int(ready))])
        if ready:
            metric("model_seq", "gauge", "sequence number of the publication applied last", [("", status["seq"])])
            metric("model_global_step", "gauge", "the trainer's global step in the applied version",
                   [("", status["global_step"])])
            metric("model_info", "gauge", "the run the served version belongs to",
                   [(f'{{run_id="{_label(status["run_id"])}"}}', 1)])
            metric("model_age_seconds", "gauge", "seconds since the applied publication was written",
                   [("", max(0.0, now - status["wall_time"]))])
        if status["newest_seq"] is not None:
            metric("newest_publication_seq", "gauge", "sequence number of the newest publication in the folder",
                   [("", status["newest_seq"])])
        if ready and status["newest_seq"] is not None:
            behind = max(0, status["newest_seq"] - status["seq"])
            lag = 0.0
            if behind and status["newest_mtime"] is not None:
                lag = max(0.0, status["newest_mtime"] - status["wall_time"])
            metric("publications_behind", "gauge", "publications in the folder newer than the applied one",
                   [("", behind)])
            metric("lag_behind_newest_seconds", "gauge",
                   "seconds between the applied publication and the newest in the folder (0 when current)",
                   [("", lag)])
        if status["table_rows"]:
            metric("table_rows", "gauge", "rows held per embedding table",
                   [(f'{{table="{_label(name)}"}}', rows) for name, rows in sorted(status["table_rows"].items())])
        metric("publications_refused_total", "counter",
               "publications refused: corrupt, out of order, of another run, or not fitting the model",
               [("", status["refused"])])
        with self._lock:
            requests = sorted(self._requests.items())
            latency = {k: (list(v[0]), v[1]) for k, v in sorted(self._latency.items())}
            rows = self.rows_scored
        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status",
               [(f'{{endpoint="{_label(e)}",status="{s}"}}', n) for (e, s), n in requests])
        samples = []
        for endpoint, (counts, total) in latency.items():
            cumulative = 0
            for le, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                samples.append((f'_bucket{{endpoint="{_label(endpoint)}",le="{_number(le)}"}}', cumulative))
            samples.append((f'_sum{{endpoint="{_label(endpoint)}"}}', total))
            samples.append((f'_count{{endpoint="{_label(endpoint)}"}}', cumulative))
        metric("request_duration_seconds", "histogram", "seconds from a request's arrival to its response",
               samples)
        metric("rows_scored_total", "counter", "rows scored by /predict", [("", rows)])
        return "\n".join(out) + "\n"
