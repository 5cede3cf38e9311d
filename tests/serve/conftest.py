"""Fixtures of the serving tests: a small trained run with its export folder, and server processes."""

from __future__ import annotations

import os

import pytest
from serve_helpers import EVAL_ROWS, TRAIN_ROWS, ServerProcess

from monolith_torch.train.cli import main as train_main


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A default-schema run trained with --export-dir: (run dir, export dir, eval.tsv path)."""
    root = tmp_path_factory.mktemp("served_run")
    run, export = str(root / "run"), str(root / "export")
    code = train_main(["train", "--run-dir", run, "--generated-train-rows", str(TRAIN_ROWS),
                       "--generated-eval-rows", str(EVAL_ROWS), "--export-dir", export, "--batch-size", "512"])
    assert code == 0
    return run, export, os.path.join(run, "data", "eval.tsv")


@pytest.fixture
def serve(tmp_path):
    """Starts servers (``serve(export_dir, *flags)``); every one is killed when the test ends."""
    started: list[ServerProcess] = []

    def start(export_dir: str, *args: str) -> ServerProcess:
        server = ServerProcess(export_dir, str(tmp_path / f"serve-{len(started)}.log"), *args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
