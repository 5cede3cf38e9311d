"""Live: ``train --follow`` publishing while ``serve`` answers; the version moves, no request fails.

Two processes (the trainer, the server), data files dropped into the
trainer's folder over time, and client threads hammering /predict the whole
time. At the end the server holds what the trainer's last checkpoint holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import torch
from serve_helpers import ServerProcess, killing, tsv_records

from monolith_torch.sync.format import list_publications
from monolith_torch.train.config import TrainConfig
from monolith_torch.train.data import generate_criteo
from monolith_torch.train.readers import batch_from_records
from monolith_torch.train.trainer import Trainer

FILES = 4
ROWS_PER_FILE = 4000


def _probe(tmp_path) -> list[dict]:
    return tsv_records(generate_criteo(str(tmp_path / "probe.tsv"), 48, seed=0, part=99), label=False)


class Hammer:
    """Client threads posting the probe rows back to back; every answer that is not a 200 is a failure."""

    def __init__(self, url: str, probe: list[dict], threads: int = 2):
        self.url, self.probe = url, probe
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.seqs: list[list[int]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self, i: int) -> None:
        size = 1 if i == 0 else 16
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            n = 0
            while not self.stop.is_set():
                rows = self.probe[n % len(self.probe):][:size] or self.probe[:size]
                n += 1
                try:
                    r = client.post("/predict", json={"rows": rows})
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200 or len(r.json()["scores"]) != len(rows):
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                self.seqs[i].append(r.json()["version"]["seq"])


def _drop(folder: str, i: int) -> None:
    tmp = os.path.join(folder, f".part-{i:05d}.tsv.tmp")
    generate_criteo(tmp, ROWS_PER_FILE, seed=0, part=i)
    os.rename(tmp, os.path.join(folder, f"part-{i:05d}.tsv"))


def test_serving_follows_a_live_trainer_without_failing_a_request(tmp_path):
    feed, export, run = str(tmp_path / "feed"), str(tmp_path / "export"), str(tmp_path / "run")
    os.makedirs(feed)
    probe = _probe(tmp_path)
    train_log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 - closed in finally
    trainer = subprocess.Popen(
        [sys.executable, "-m", "monolith_torch", "train", "--follow", "--data", feed, "--export-dir", export,
         "--run-dir", run, "--batch-size", "512", "--sync-every", "1", "--dense-sync-every", "2",
         "--follow-idle-exit", "6", "--follow-poll-s", "0.2"],
        stdout=train_log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(export, str(tmp_path / "serve.log"))
    try:
        with killing(trainer):
            start = server.wait_ready(timeout=90)
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                first = client.post("/predict", json={"rows": probe}).json()
            with Hammer(server.url, probe) as hammer:
                for i in range(FILES):
                    _drop(feed, i)
                    time.sleep(1.5)
                assert trainer.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()
                newest = list_publications(export)[-1][0]
                server.wait_ready(timeout=30, seq=newest)
                time.sleep(0.5)  # a few more requests on the final version
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            last = client.post("/predict", json={"rows": probe}).json()
    finally:
        server.stop()
        train_log.close()

    assert hammer.failures == [], hammer.failures[:5]
    assert all(len(s) >= 5 for s in hammer.seqs), [len(s) for s in hammer.seqs]
    for seqs in hammer.seqs:  # one client's answers never go back in version
        assert seqs == sorted(seqs)
    assert len({s for seqs in hammer.seqs for s in seqs}) > 1  # the version moved while they hammered
    assert last["version"]["seq"] == newest > start["seq"]
    assert np.abs(np.array(last["scores"]) - np.array(first["scores"])).max() > 1e-3

    # What the server holds at the end is what the trainer's final checkpoint holds.
    trainer_state = Trainer(TrainConfig(run_dir=run, batch_size=512), show_progress=False)
    trainer_state.restore_latest(required=True)
    assert last["version"]["global_step"] == int(trainer_state.global_step)
    trainer_state.model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(trainer_state.model(batch_from_records(probe, trainer_state.schema)))
    np.testing.assert_allclose(np.array(last["scores"]), expected.numpy(), rtol=0, atol=1e-6)
