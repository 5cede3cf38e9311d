"""The server as a process: the scores it answers are the scores ``predict`` writes for the same rows."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from serve_helpers import tsv_records

from monolith_torch.train.cli import main as train_main
from monolith_torch.train.config import TrainConfig
from monolith_torch.train.trainer import Trainer


@pytest.fixture(scope="module")
def reference(trained):
    """The trained run's scores of its eval rows, computed the way ``predict`` computes them."""
    run, _, eval_path = trained
    trainer = Trainer(TrainConfig(run_dir=run, batch_size=512), show_progress=False)
    trainer.restore_latest(required=True)
    probs, _ = trainer._scores([eval_path])
    return probs.numpy().astype(np.float64)


def test_served_scores_equal_the_checkpoint_scores(trained, reference, serve):
    _, export, eval_path = trained
    server = serve(export)
    health = server.wait_ready()
    rows = tsv_records(eval_path)
    scores = []
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        for start in range(0, len(rows), 500):
            r = client.post("/predict", json={"rows": rows[start:start + 500]})
            assert r.status_code == 200, r.text
            assert r.json()["version"]["seq"] == health["seq"]
            scores += r.json()["scores"]
    assert len(scores) == len(reference)
    np.testing.assert_allclose(np.array(scores), reference, rtol=0, atol=1e-6)


def test_concurrent_requests_get_their_own_rows_scores(trained, reference, serve):
    _, export, eval_path = trained
    server = serve(export)
    server.wait_ready()
    rows = tsv_records(eval_path, label=False)
    sizes = [1, 7, 250, 3, 64, 1, 500, 31] * 3
    starts = np.cumsum([0, *sizes[:-1]]) % (len(rows) - 500)

    async def post_all() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            async def one(start: int, size: int) -> list[float]:
                r = await client.post("/predict", json={"rows": rows[start:start + size]})
                assert r.status_code == 200, r.text
                return r.json()["scores"]

            return await asyncio.gather(*(one(int(a), n) for a, n in zip(starts, sizes, strict=True)))

    answers = asyncio.run(post_all())
    for start, size, scores in zip(starts, sizes, answers, strict=True):
        np.testing.assert_allclose(np.array(scores), reference[start:start + size], rtol=0, atol=1e-6)


def test_served_scores_match_the_predict_command(trained, serve, tmp_path):
    run, export, eval_path = trained
    output = str(tmp_path / "scores.tsv")
    assert train_main(["predict", "--run-dir", run, "--data", eval_path, "--output", output]) == 0
    predicted = np.loadtxt(output, delimiter="\t", usecols=0)
    server = serve(export)
    server.wait_ready()
    rows = tsv_records(eval_path, limit=1000)
    r = httpx.post(server.url + "/predict", json={"rows": rows}, timeout=60.0)
    assert r.status_code == 200
    # predict prints 6 decimals: half a unit of rounding on top of the 1e-6.
    np.testing.assert_allclose(np.array(r.json()["scores"]), predicted[:1000], rtol=0, atol=1e-6 + 5e-7)
