"""``monolith-torch serve``: answers click-probability requests over HTTP, from a trainer's export folder.

    monolith-torch serve --export-dir exports/ctr [--host 127.0.0.1] [--port 8080] [--max-rows 4096]
                         [--max-body-bytes 67108864] [--max-batch-rows 4096] [--poll-s 0.5] [--threads 1]

The server follows the folder a trainer publishes into (``train
--export-dir``): it waits for the first full snapshot (``/healthz`` answers
503 meanwhile), builds the run's model from it and applies every delta as it
arrives. See docs/SERVING.md.

A bad argument prints one ``monolith-torch serve: error: ...`` line and exits
2 (as does an address it cannot listen on); never a traceback. SIGINT and
SIGTERM stop it cleanly: requests in flight are answered (for up to 10 s),
the folder watcher stops, and it exits 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys

__all__ = ["main"]

EXIT_USAGE = 2
_MAX_THREADS = 1024
_GRACEFUL_SHUTDOWN_S = 10


class _UsageError(Exception):
    pass


class _Terminated(BaseException):
    """SIGTERM after the server stopped; a BaseException so no ``except Exception`` swallows it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="monolith-torch serve", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="exit codes: 0 done, 2 bad argument or an address it cannot listen on, "
                       "130 stopped by SIGINT, 143 by SIGTERM")
    p.add_argument("--export-dir", required=True,
                   help="the folder the trainer publishes into (train --export-dir); it may not exist yet")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", default="8080", help="port to listen on; 0 picks a free one (default 8080)")
    p.add_argument("--max-rows", default="4096", help="most rows in one /predict request (default 4096)")
    p.add_argument("--max-body-bytes", default=str(64 << 20),
                   help=f"most bytes in one request body (default {64 << 20})")
    p.add_argument("--max-batch-rows", default="4096",
                   help="most rows of concurrent requests scored in one forward (default 4096)")
    p.add_argument("--poll-s", default="0.5",
                   help="seconds between looks at the export folder; change events wake it sooner (default 0.5)")
    p.add_argument("--threads", default="1", help="torch threads for the forward; 0: torch's default (default 1)")
    return p


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise _UsageError(f"Invalid {name}: {text!r} (expected an integer in {low}..{high})")
    return value


def _options(args) -> dict:
    """Checks every argument before anything starts; raises ``_UsageError`` naming the first bad one."""
    out = {
        "port": _int("port", args.port, 0, 65535),
        "max_rows": _int("max-rows", args.max_rows, 1, 10_000_000),
        "max_body_bytes": _int("max-body-bytes", args.max_body_bytes, 1, 1 << 40),
        "max_batch_rows": _int("max-batch-rows", args.max_batch_rows, 1, 10_000_000),
        "threads": _int("threads", args.threads, 0, _MAX_THREADS),
    }
    try:
        poll_s = float(args.poll_s)
    except ValueError:
        poll_s = math.nan
    if not 0 < poll_s <= 3600:
        raise _UsageError(f"Invalid poll-s: {args.poll_s!r} (expected seconds in (0, 3600])")
    out["poll_s"] = poll_s
    if not args.host:
        raise _UsageError("Invalid host: '' (expected an address or host name)")
    export_dir = args.export_dir
    if not export_dir:
        raise _UsageError("Invalid export-dir: '' (expected a folder)")
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise _UsageError(f"Invalid export-dir: {export_dir!r} (not a folder)")
    if os.path.isdir(export_dir) and not os.access(export_dir, os.R_OK | os.X_OK):
        raise _UsageError(f"Invalid export-dir: {export_dir!r} (not readable)")
    return out


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; bound here so a taken port is a one-line error, not a log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise _UsageError(f"Invalid host: {host!r} ({e})") from None
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets' connections, and without it
    # every answer on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise _UsageError(f"cannot listen on {host}:{port} ({os.strerror(e.errno) if e.errno else e})") from None
    return sock


def _raise_terminated(signum, _frame) -> None:
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Runs the server until SIGINT/SIGTERM; returns the exit code."""
    from monolith_torch.core.fileio import printable

    try:
        args = _parser().parse_args(argv)
        options = _options(args)
        sock = _listen(args.host, options["port"])
    except _UsageError as e:
        print(f"monolith-torch serve: error: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _serve(args.export_dir, sock, options)
    finally:
        sock.close()


def _serve(export_dir: str, sock: socket.socket, options: dict) -> int:
    # Heavy imports (torch, the app) after the arguments checked out: a bad flag answers at once.
    import torch
    import uvicorn

    from monolith_torch.serve.app import Limits, create_app
    from monolith_torch.serve.model import ServedModel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    limits = Limits(max_rows=options["max_rows"], max_body_bytes=options["max_body_bytes"],
                    max_batch_rows=options["max_batch_rows"])
    app = create_app(ServedModel(export_dir), limits, options["poll_s"])
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    logging.getLogger("monolith_torch.serve").info(
        "listening on http://%s:%d (export dir %s)", f"[{host}]" if ":" in host else host, port, export_dir)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: caught below.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        print("monolith-torch serve: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated:
        print("monolith-torch serve: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
