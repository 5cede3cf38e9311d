"""The app in process (Starlette's TestClient runs its lifespan): answers, errors, limits, metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings

import pytest
from serve_helpers import tsv_records

with warnings.catch_warnings():  # starlette asks for httpx2 in the test client; httpx is what is installed
    warnings.simplefilter("ignore", UserWarning)  # StarletteDeprecationWarning
    from starlette.testclient import TestClient

from monolith_torch.serve import Limits, ServedModel, create_app
from monolith_torch.sync.format import list_publications, read_publication


def _wait(client: TestClient, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/healthz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready within {timeout} s: {r.json()}")


@pytest.fixture
def export(trained, tmp_path):
    """A private copy of the trained run's export folder."""
    path = str(tmp_path / "export")
    shutil.copytree(trained[1], path)
    return path


@pytest.fixture
def client(export):
    with TestClient(create_app(ServedModel(export), Limits(max_rows=50, max_body_bytes=200_000), poll_s=0.1)) as c:
        _wait(c)
        yield c


def test_it_waits_for_the_first_full_snapshot_then_serves(trained, tmp_path):
    later = str(tmp_path / "later")  # does not exist yet
    rows = tsv_records(trained[2], limit=3, label=False)
    with TestClient(create_app(ServedModel(later), poll_s=0.1)) as c:
        r = c.get("/healthz")
        assert r.status_code == 503
        assert r.json()["ready"] is False and later in r.json()["waiting_for"]
        r = c.post("/predict", json={"rows": rows})
        assert r.status_code == 503 and "no model yet" in r.json()["error"]
        shutil.copytree(trained[1], str(tmp_path / "staging"))
        os.rename(str(tmp_path / "staging"), later)
        health = _wait(c)
        assert health["seq"] == list_publications(later)[-1][0]
        r = c.post("/predict", json={"rows": rows})
        assert r.status_code == 200 and len(r.json()["scores"]) == 3


def test_predict_answers_scores_and_the_version(client, trained, export):
    rows = tsv_records(trained[2], limit=20, label=False)
    r = client.post("/predict", json={"rows": rows})
    assert r.status_code == 200
    body = r.json()
    assert len(body["scores"]) == 20 and all(0.0 < s < 1.0 for s in body["scores"])
    newest = read_publication(list_publications(export)[-1][2])
    assert body["version"] == {"seq": newest.seq, "global_step": newest.global_step, "run_id": newest.run_id}
    assert client.post("/predict", json={"rows": []}).json()["scores"] == []
    # The same row scores the same wherever it stands in a request (up to float rounding of the batch).
    again = client.post("/predict", json={"rows": rows[5:6] + rows[:2]}).json()["scores"]
    assert again == pytest.approx([body["scores"][5], *body["scores"][:2]], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "invalid JSON: "),
        (b"\xff\xfe", 400, "invalid JSON: "),
        (b'{"rows": [{"I1": NaN}]}', 400, "invalid JSON: NaN is not a JSON number"),
        (b"[]", 400, 'expected a JSON object {"rows"'),
        (b'{"rows": 3}', 400, 'expected a JSON object {"rows"'),
        (b'{"rows": [], "extra": 1}', 400, "unknown key 'extra'"),
        (b'{"rows": [{"C5": "zz"}]}', 400, "row 0, column 'C5': bad hex id 'zz'"),
        (b'{"rows": [{}, {"C99": "1"}]}', 400, "row 1, column 'C99': not a column of the schema"),
        (b'{"rows": [{}, {}, 7]}', 400, "row 2: expected an object"),
        (json.dumps({"rows": [{}] * 51}).encode(), 413, "too many rows: 51 (the limit is 50, --max-rows)"),
        (json.dumps({"rows": [{"C1": "a" * 300_000}]}).encode(), 413, "over the limit of 200000"),
    ],
)
def test_bad_requests_get_one_line_of_json(client, body, status, error):
    r = client.post("/predict", content=body)
    assert r.status_code == status, r.text
    assert error in r.json()["error"]
    assert "\n" not in r.json()["error"]


def test_a_chunked_body_is_cut_off_at_the_byte_limit(client):
    def chunks():
        yield b'{"rows": ['
        for _ in range(2000):
            yield b'{"C1": "' + b"a" * 200 + b'"},'
        yield b"{}]}"

    r = client.post("/predict", content=chunks())
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]


def test_a_bad_row_does_not_change_the_answers_to_others(client, trained):
    rows = tsv_records(trained[2], limit=4, label=False)
    before = client.post("/predict", json={"rows": rows}).json()["scores"]
    assert client.post("/predict", json={"rows": [*rows, {"C3": "!"}]}).status_code == 400
    assert client.post("/predict", json={"rows": rows}).json()["scores"] == pytest.approx(before, abs=1e-6)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_rows_latency_and_the_version(client, trained, export):
    rows = tsv_records(trained[2], limit=7, label=False)
    for _ in range(3):
        assert client.post("/predict", json={"rows": rows}).status_code == 200
    assert client.post("/predict", content=b"{").status_code == 400
    assert client.get("/nowhere").status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        assert line.startswith("#") or re.fullmatch(r'monolith_serve_[a-z_]+(\{[^}]*\})? \S+', line), line
    m = _samples(text)
    newest = read_publication(list_publications(export)[-1][2])
    assert m["monolith_serve_ready"] == 1
    assert m["monolith_serve_model_seq"] == newest.seq
    assert m["monolith_serve_model_global_step"] == newest.global_step
    assert m[f'monolith_serve_model_info{{run_id="{newest.run_id}"}}'] == 1
    assert m["monolith_serve_publications_behind"] == 0
    assert m["monolith_serve_lag_behind_newest_seconds"] == 0
    assert m["monolith_serve_model_age_seconds"] >= 0
    assert m["monolith_serve_publications_refused_total"] == 0
    assert m['monolith_serve_table_rows{table="C1"}'] == newest.table_rows["C1"]
    assert m['monolith_serve_requests_total{endpoint="/predict",status="200"}'] == 3
    assert m['monolith_serve_requests_total{endpoint="/predict",status="400"}'] == 1
    assert m['monolith_serve_requests_total{endpoint="other",status="404"}'] == 1
    assert m["monolith_serve_rows_scored_total"] == 21
    buckets = [(k, v) for k, v in m.items()
               if k.startswith('monolith_serve_request_duration_seconds_bucket{endpoint="/predict"')]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0].endswith('le="+Inf"}') and counts[-1] == 4
    assert m['monolith_serve_request_duration_seconds_count{endpoint="/predict"}'] == 4
    assert m['monolith_serve_request_duration_seconds_sum{endpoint="/predict"}'] > 0
