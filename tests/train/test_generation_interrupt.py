"""SIGINT/SIGTERM while the default dataset is generated: exit 130/143, one line, no file left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_generation_exits_cleanly_and_leaves_nothing(tmp_path, signum, code):
    run = tmp_path / "run"
    data = run / "data"
    # Far more rows than can be written before the signal arrives.
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith_torch", "train", "--run-dir", str(run),
         "--generated-train-rows", "50000000", "--max-steps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True,
    )
    try:
        deadline = time.monotonic() + 100
        while not (data.is_dir() and any(".tmp" in name for name in os.listdir(data))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    assert os.listdir(data) == []
    problems = [line for line in err.splitlines() if " INFO " not in line or "stopped by signal" in line]
    assert len(problems) == 1 and f"stopped by signal {int(signum)} while generating data" in problems[0], err
    assert "Traceback" not in out + err
    assert f"stopped by signal {int(signum)}" in (run / "train.log").read_text()
