"""The serving pieces alone: the batcher's coalescing and error isolation, the metrics text, settings."""

from __future__ import annotations

import json
import threading

import pytest

from monolith_torch.serve import Batcher, ServeMetrics, Unavailable, config_from_settings
from monolith_torch.train.config import ConfigError, TrainConfig
from monolith_torch.train.readers import RowError
from monolith_torch.train.run_dir import model_settings


class FakeScorer:
    """Scores a row {"x": v} as v; a row {"bad": ...} is a RowError. The first call waits for ``release``."""

    def __init__(self):
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, records):
        self.calls.append(len(records))
        self.entered.set()
        self.release.wait(10)
        for i, r in enumerate(records):
            if "bad" in r:
                raise RowError(i, "bad", "a bad row")
        return [float(r["x"]) for r in records], {"seq": 1}


def test_waiting_requests_are_scored_in_one_call_and_each_gets_its_own_rows():
    scorer = FakeScorer()
    batcher = Batcher(scorer, max_batch_rows=100)
    batcher.start()
    try:
        first = batcher.submit([{"x": 0}])
        assert scorer.entered.wait(10)  # the worker is busy with the first request
        waiting = [batcher.submit([{"x": 10 * i + j} for j in range(i + 1)]) for i in range(1, 5)]
        scorer.release.set()
        assert first.result(10) == ([0.0], {"seq": 1})
        for i, future in enumerate(waiting, start=1):
            assert future.result(10) == ([float(10 * i + j) for j in range(i + 1)], {"seq": 1})
        assert scorer.calls == [1, 2 + 3 + 4 + 5]
    finally:
        batcher.close()


def test_a_group_is_cut_at_max_batch_rows_but_a_large_request_still_goes():
    scorer = FakeScorer()
    batcher = Batcher(scorer, max_batch_rows=4)
    batcher.start()
    try:
        first = batcher.submit([{"x": 0}])
        assert scorer.entered.wait(10)
        futures = [batcher.submit([{"x": 1}] * n) for n in (3, 1, 6, 2)]
        scorer.release.set()
        first.result(10)
        for future, n in zip(futures, (3, 1, 6, 2), strict=True):
            assert future.result(10)[0] == [1.0] * n
        assert scorer.calls == [1, 4, 6, 2]
    finally:
        batcher.close()


def test_a_bad_row_fails_only_its_own_request():
    scorer = FakeScorer()
    batcher = Batcher(scorer)
    batcher.start()
    try:
        first = batcher.submit([{"x": 0}])
        assert scorer.entered.wait(10)
        good1 = batcher.submit([{"x": 1}])
        bad = batcher.submit([{"x": 2}, {"bad": 1}])
        good2 = batcher.submit([{"x": 3}])
        scorer.release.set()
        first.result(10)
        assert good1.result(10)[0] == [1.0] and good2.result(10)[0] == [3.0]
        with pytest.raises(RowError, match=r"^row 1, column 'bad'"):  # the row index within its own request
            bad.result(10)
    finally:
        batcher.close()


def test_it_refuses_beyond_the_queue_limit_and_after_close():
    scorer = FakeScorer()
    batcher = Batcher(scorer, max_queued_rows=5)
    batcher.start()
    first = batcher.submit([{"x": 0}])
    assert scorer.entered.wait(10)
    queued = batcher.submit([{"x": 1}] * 5)
    with pytest.raises(Unavailable, match="overloaded: 5 rows are waiting"):
        batcher.submit([{"x": 1}])
    scorer.release.set()
    batcher.close()  # what was queued is still answered
    assert first.result(10)[0] == [0.0] and queued.result(10)[0] == [1.0] * 5
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.submit([{"x": 1}])
    with pytest.raises(ValueError, match="Invalid max_batch_rows: 0"):
        Batcher(scorer, max_batch_rows=0)


def test_an_unexpected_error_reaches_the_requests_and_the_worker_lives_on():
    calls = []

    def score(records):
        calls.append(len(records))
        if len(calls) == 1:
            raise MemoryError("no room")
        return [1.0] * len(records), {}

    batcher = Batcher(score)
    batcher.start()
    try:
        with pytest.raises(MemoryError):
            batcher.submit([{}]).result(10)
        assert batcher.submit([{}]).result(10) == ([1.0], {})
    finally:
        batcher.close()


STATUS = {"ready": True, "seq": 7, "global_step": 120, "run_id": 'ab"c', "wall_time": 1000.0, "refused": 2,
          "last_error": "x", "table_rows": {"C1": 10, 'we"ird\n': 3}, "newest_seq": 9, "newest_mtime": 1004.5}


def test_metrics_text_exposition():
    m = ServeMetrics(buckets=(0.01, 0.1))
    m.observe_request("/predict", 200, 0.005)
    m.observe_request("/predict", 200, 0.05)
    m.observe_request("/predict", 400, 5.0)
    m.add_rows(12)
    text = m.render(STATUS, now=1010.0)
    lines = text.splitlines()
    for expected in (
        "monolith_serve_ready 1",
        "monolith_serve_model_seq 7",
        "monolith_serve_model_global_step 120",
        'monolith_serve_model_info{run_id="ab\\"c"} 1',
        "monolith_serve_model_age_seconds 10.0",
        "monolith_serve_newest_publication_seq 9",
        "monolith_serve_publications_behind 2",
        "monolith_serve_lag_behind_newest_seconds 4.5",
        'monolith_serve_table_rows{table="C1"} 10',
        'monolith_serve_table_rows{table="we\\"ird\\n"} 3',
        "monolith_serve_publications_refused_total 2",
        'monolith_serve_requests_total{endpoint="/predict",status="200"} 2',
        'monolith_serve_requests_total{endpoint="/predict",status="400"} 1',
        'monolith_serve_request_duration_seconds_bucket{endpoint="/predict",le="0.01"} 1',
        'monolith_serve_request_duration_seconds_bucket{endpoint="/predict",le="0.1"} 2',
        'monolith_serve_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"} 3',
        'monolith_serve_request_duration_seconds_sum{endpoint="/predict"} 5.055',
        'monolith_serve_request_duration_seconds_count{endpoint="/predict"} 3',
        "monolith_serve_rows_scored_total 12",
        "# TYPE monolith_serve_request_duration_seconds histogram",
        "# TYPE monolith_serve_requests_total counter",
    ):
        assert expected in lines, expected
    assert text.endswith("\n")


def test_metrics_before_the_first_version_leave_out_what_is_not_known():
    status = dict(STATUS, ready=False, seq=None, global_step=None, run_id=None, wall_time=None, table_rows={},
                  newest_seq=None, newest_mtime=None, refused=0)
    text = ServeMetrics().render(status)
    assert "monolith_serve_ready 0" in text
    for absent in ("model_seq", "model_age_seconds", "publications_behind", "table_rows{"):
        assert absent not in text


def test_config_from_settings_rebuilds_the_trained_config():
    cfg = TrainConfig(emb_dim=8, hidden=(32, 16), model="dcn_v2", seq_len=4)
    settings = model_settings(cfg)
    again = config_from_settings(json.loads(json.dumps(settings)))  # through JSON, as in a manifest
    assert model_settings(again) == settings
    assert again.hidden == (32, 16)
    with pytest.raises(ConfigError, match="Invalid hidden"):
        config_from_settings({"hidden": [0]})
    with pytest.raises(ConfigError, match="Invalid model_settings"):
        config_from_settings(None)
