"""Publications the server must refuse (corrupt, out of order, of another run, not fitting): it keeps answering.

Each crafted publication is written (``sync.format.write_publication``) into
a staging folder, tampered with there, and renamed into the export folder
whole, as a trainer's would appear.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
from serve_helpers import tsv_records

from monolith_torch.serve import ServedModel, create_app
from monolith_torch.sync.format import (
    list_publications,
    read_publication,
    write_publication,
)

with warnings.catch_warnings():  # starlette asks for httpx2 in the test client; httpx is what is installed
    warnings.simplefilter("ignore", UserWarning)  # StarletteDeprecationWarning
    from starlette.testclient import TestClient


class Publisher:
    """Writes publications of the trained state (its last delta holds every row) into ``export``."""

    def __init__(self, export: str, staging: str):
        self.export, self.staging = export, staging
        pubs = list_publications(export)
        self.full = read_publication(pubs[0][2])
        self.last = read_publication(pubs[-1][2])  # the final delta: every row trained, and the dense parameters
        assert self.last.dense is not None

    def write(self, seq: int, kind: str, run_id: str | None = None, dense=None, tamper=None) -> None:
        os.makedirs(self.staging, exist_ok=True)
        path = write_publication(
            self.staging, seq, kind, run_id or self.last.run_id, self.last.tables, self.last.table_rows,
            dense if dense is not None else self.last.dense, self.last.global_step, self.last.clock, time.time(),
            self.full.model_settings if kind == "full" else None)
        if tamper is not None:
            tamper(path)
        os.rename(path, os.path.join(self.export, os.path.basename(path)))


def _flip_a_byte(path: str) -> None:
    file = os.path.join(path, "table-0000.part-0000.arrow")
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _wrong_base(path: str) -> None:
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        m = json.load(f)
    m["base_seq"] = m["seq"] - 2
    with open(manifest, "w") as f:
        json.dump(m, f)


def _health_when(client, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/healthz").json()
        if predicate(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"/healthz never got there: {body}")


@pytest.fixture
def setup(trained, tmp_path):
    export = str(tmp_path / "export")
    shutil.copytree(trained[1], export)
    return export, Publisher(export, str(tmp_path / "staging")), tsv_records(trained[2], limit=32, label=False)


def test_refused_publications_leave_the_served_version_and_scores_as_they_were(setup):
    export, pub, probe = setup
    with TestClient(create_app(ServedModel(export), poll_s=0.1)) as client:
        start = _health_when(client, lambda b: b["ready"])
        assert start["seq"] == pub.last.seq and start["refused"] == 0
        base = client.post("/predict", json={"rows": probe}).json()
        seq = base["version"]["seq"]

        def unchanged(refused: int, error: str) -> None:
            health = _health_when(client, lambda b: b["refused"] == refused)
            assert health["ready"] is True and health["seq"] == seq
            assert error in health["last_error"]
            answer = client.post("/predict", json={"rows": probe})
            assert answer.status_code == 200
            assert answer.json()["version"]["seq"] == seq
            assert answer.json()["scores"] == pytest.approx(base["scores"], abs=1e-6)

        # Corrupt: a data file changed after it was written.
        pub.write(seq + 1, "delta", tamper=_flip_a_byte)
        unchanged(1, "checksum mismatch")
        # Missing deltas are waited for until a full snapshot comes: jumped to.
        seq += 2
        pub.write(seq, "full")
        assert _health_when(client, lambda b: b["seq"] == seq)["refused"] == 1
        # Another run's delta.
        pub.write(seq + 1, "delta", run_id="0therrun")
        unchanged(2, "belongs to run '0therrun'")
        seq += 2
        pub.write(seq, "full")
        _health_when(client, lambda b: b["seq"] == seq)
        # Out of order: a delta that says it applies on an older version.
        pub.write(seq + 1, "delta", tamper=_wrong_base)
        unchanged(3, "base_seq")
        # A gap (seq + 2 missing): waited for, not refused, not applied.
        pub.write(seq + 3, "delta")
        time.sleep(1.0)
        unchanged(3, "base_seq")
        seq += 4
        pub.write(seq, "full")
        assert _health_when(client, lambda b: b["seq"] == seq)["refused"] == 3
        # Dense parameters that do not fit the model.
        bad_dense = dict(pub.last.dense)
        name = next(iter(bad_dense))
        bad_dense[name] = np.zeros((3, 3), np.float32)
        pub.write(seq + 1, "delta", dense=bad_dense)
        unchanged(4, f"dense parameter {name!r} has shape (3, 3)")
        metrics = client.get("/metrics").text
        assert "monolith_serve_publications_refused_total 4" in metrics


def test_a_corrupt_newest_full_snapshot_falls_back_to_an_older_one(setup, tmp_path):
    export, pub, probe = setup
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    pub.export = fresh
    pub.write(1, "full")
    pub.write(2, "full", tamper=_flip_a_byte)
    with TestClient(create_app(ServedModel(fresh), poll_s=0.1)) as client:
        health = _health_when(client, lambda b: b["ready"])
        assert health["seq"] == 1 and health["refused"] >= 1 and "checksum mismatch" in health["last_error"]
        assert client.post("/predict", json={"rows": probe}).status_code == 200


def test_model_settings_that_build_no_model_are_reported_and_waited_past(setup, tmp_path):
    export, pub, probe = setup
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    pub.export = fresh

    def bad_settings(path: str) -> None:
        manifest = os.path.join(path, "manifest.json")
        with open(manifest) as f:
            m = json.load(f)
        m["model_settings"]["model"] = "no_such_package.module:Model"
        with open(manifest, "w") as f:
            json.dump(m, f)

    pub.write(1, "full", tamper=bad_settings)
    with TestClient(create_app(ServedModel(fresh), poll_s=0.1)) as client:
        health = _health_when(client, lambda b: b["refused"] == 1)
        assert client.get("/healthz").status_code == 503
        assert "cannot build its model" in health["last_error"] and "no_such_package" in health["last_error"]
        pub.write(2, "full")
        health = _health_when(client, lambda b: b["ready"])
        assert health["seq"] == 2
        assert client.post("/predict", json={"rows": probe}).status_code == 200
