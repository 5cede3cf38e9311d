"""Helpers of the serving tests: free ports, Criteo TSV rows as records, server processes, cleanup.

Every server listens on 127.0.0.1 on a free port, is waited for with a
deadline, and is killed (its whole process group) when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from monolith_torch.train.data import COLUMNS

TRAIN_ROWS = 20_000
EVAL_ROWS = 2_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tsv_records(path: str, limit: int | None = None, label: bool = True) -> list[dict]:
    """Rows of a headerless Criteo TSV file as /predict records (every value the text the file holds)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = dict(zip(COLUMNS, line.rstrip("\n").split("\t"), strict=True))
            if not label:
                del row["label"]
            out.append(row)
            if limit is not None and len(out) == limit:
                break
    return out


class ServerProcess:
    """``python -m monolith_torch serve`` on 127.0.0.1 and a free port; stderr kept in a file."""

    def __init__(self, export_dir: str, log_path: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "monolith_torch", "serve", "--export-dir", export_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--poll-s", "0.2", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(self.url + "/healthz", timeout=2.0)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"server did not listen within {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout: float = 60.0, seq: int | None = None) -> dict:
        """Waits until /healthz says ready (and, with ``seq``, at least that version); returns its body."""
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/healthz", timeout=5.0)
            body = r.json()
            if r.status_code == 200 and (seq is None or body["seq"] >= seq):
                return body
            time.sleep(0.1)
        raise AssertionError(f"server not ready (seq {seq}) within {timeout} s: {body}\n{self.log()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        finally:
            self._log.close()


@contextlib.contextmanager
def killing(proc: subprocess.Popen):
    """Kills ``proc``'s process group on the way out, whatever happened."""
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
