"""``monolith-torch serve``: one error line and exit 2 for bad arguments; a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port, killing

from monolith_torch.cli import main


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--port", "abc"], "Invalid port: 'abc' (expected an integer in 0..65535)"),
        (["--port", "70000"], "Invalid port: '70000' (expected an integer in 0..65535)"),
        (["--port", "-1"], "Invalid port: '-1'"),
        (["--max-rows", "0"], "Invalid max-rows: '0'"),
        (["--max-body-bytes", "1e6"], "Invalid max-body-bytes: '1e6'"),
        (["--max-batch-rows", "x"], "Invalid max-batch-rows: 'x'"),
        (["--poll-s", "nan"], "Invalid poll-s: 'nan'"),
        (["--poll-s", "0"], "Invalid poll-s: '0'"),
        (["--threads", "-2"], "Invalid threads: '-2'"),
        (["--host", ""], "Invalid host: ''"),
        (["--host", "no.such.host.invalid"], "Invalid host: 'no.such.host.invalid'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, capsys, args, error):
    assert main(["serve", "--export-dir", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith("monolith-torch serve: error: ") and error in captured.err


def test_export_dir_is_required_and_must_be_a_folder(tmp_path, capsys):
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == (
        "monolith-torch serve: error: the following arguments are required: --export-dir")
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["serve", "--export-dir", str(file)]) == 2
    assert f"Invalid export-dir: {str(file)!r} (not a folder)" in capsys.readouterr().err


def test_help_names_serve(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "monolith-torch serve --help" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--export-dir", "--port", "--max-rows", "--max-body-bytes", "--poll-s", "--threads"):
        assert flag in out


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "monolith_torch", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    with killing(proc):
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_taken_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(["--export-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)])
    assert done.returncode == 2
    assert done.stderr.strip() == f"monolith-torch serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)"


def test_the_entry_point_prints_no_traceback(tmp_path):
    done = _run(["--export-dir", str(tmp_path), "--port", "x"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "monolith-torch serve: error: Invalid port: 'x' (expected an integer in 0..65535)"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_it_cleanly(trained, tmp_path, signum, code):
    port = free_port()
    export = trained[1] if signum == signal.SIGINT else str(tmp_path / "empty")  # loaded, and still waiting
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monolith_torch", "serve", "--export-dir", export,
                                 "--host", "127.0.0.1", "--port", str(port), "--poll-s", "0.2"],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        with killing(proc):
            deadline, status = time.monotonic() + 60.0, None
            while time.monotonic() < deadline and status != (200 if export == trained[1] else 503):
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code
                except httpx.TransportError:
                    time.sleep(0.1)
            assert status is not None, log.read_text()
            os.kill(proc.pid, signum)
            assert proc.wait(timeout=30) == code
    text = log.read_text()
    assert "Traceback" not in text
    assert f"monolith-torch serve: stopped by {signal.Signals(signum).name}" in text


def test_answers_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(tmp_path, serve):
    """TCP_NODELAY on the server's connections: without it each answer after the first waits ~40 ms."""
    server = serve(str(tmp_path))
    server.wait_listening()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        times = []
        for _ in range(8):
            start = time.perf_counter()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += s.recv(65536)
            times.append(time.perf_counter() - start)
    assert b"503" in data.split(b"\r\n", 1)[0]
    assert sorted(times[1:])[3] < 0.025, times
