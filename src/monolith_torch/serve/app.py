"""The HTTP app of ``monolith-torch serve`` (Starlette): /predict, /healthz, /metrics.

    POST /predict   {"rows": [{column: value, ...}, ...]}
                    -> 200 {"scores": [...], "version": {"seq", "global_step", "run_id"}}
                    400 malformed JSON or row ({"error": "row 3, column 'C5': bad hex id 'zz'"}),
                    413 over --max-rows or --max-body-bytes, 503 no model yet or overloaded
    GET  /healthz   200 {"ready": true, "seq", "global_step", "run_id", "refused", "last_error"}, or 503
    GET  /metrics   Prometheus text (``serve.metrics``)

Every error answer is JSON ``{"error": one line}``. Bodies are read up to
the byte cap and decoded off the event loop when large; rows are parsed and
scored on the batcher's thread (``serve.batching``), so the loop keeps
answering /healthz and /metrics while a forward runs. The app's lifespan
starts and stops the ``Watcher`` and the ``Batcher``.

May import ``monolith_torch.serve`` and ``core``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from monolith_torch.core.fileio import printable
from monolith_torch.serve.batching import Batcher, Unavailable
from monolith_torch.serve.metrics import ServeMetrics
from monolith_torch.serve.model import ServedModel
from monolith_torch.serve.watch import Watcher
from monolith_torch.train.readers import RowError

__all__ = ["Limits", "create_app"]

logger = logging.getLogger("monolith_torch.serve")

_ENDPOINTS = ("/predict", "/healthz", "/metrics")
_DECODE_INLINE_BYTES = 64 << 10  # smaller bodies decode on the loop: a thread hop costs more than the decode


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold, and how many rows one forward scores.

    Attributes:
        max_rows: rows per /predict request (more: 413).
        max_body_bytes: bytes of a request body (more: 413).
        max_batch_rows: rows of concurrent requests scored in one forward.
    """

    max_rows: int = 4096
    max_body_bytes: int = 64 << 20
    max_batch_rows: int = 4096

    def __post_init__(self):
        for name in ("max_rows", "max_body_bytes", "max_batch_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": printable(message, 500)}, status_code=status)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _rows_of(body: bytes, max_rows: int) -> list:
    """The ``rows`` of a /predict body; raises ``_HttpError`` (400 malformed, 413 too many rows)."""
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, invalid UTF-8, NaN/Infinity
        raise _HttpError(400, f"invalid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise _HttpError(400, 'expected a JSON object {"rows": [{column: value, ...}, ...]}')
    extra = [k for k in doc if k != "rows"]
    if extra:
        raise _HttpError(400, f"unknown key {extra[0]!r} (expected only \"rows\")")
    rows = doc["rows"]
    if len(rows) > max_rows:
        raise _HttpError(413, f"too many rows: {len(rows)} (the limit is {max_rows}, --max-rows)")
    return rows


async def _body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``max_bytes``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _HttpError(413, f"body of {int(length)} bytes is over the limit of {max_bytes} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _HttpError(413, f"body is over the limit of {max_bytes} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class _Observed:
    """ASGI middleware: counts every HTTP answer by endpoint and status and times it."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)


def create_app(served: ServedModel, limits: Limits | None = None, poll_s: float = 0.5,
               metrics: ServeMetrics | None = None) -> Starlette:
    """The Starlette app serving ``served``; its lifespan runs the watcher and the batcher.

    Args:
        served: the model (nothing loaded yet is fine: /healthz answers 503 until it is).
        limits: request caps and batching (default ``Limits()``).
        poll_s: seconds between looks at the export folder (change events wake it sooner).
        metrics: where counters go (default: a new ``ServeMetrics``).

    Raises:
        ValueError: a bad ``poll_s``.
    """
    limits = limits or Limits()
    metrics = metrics or ServeMetrics()
    batcher = Batcher(served.score_records, max_batch_rows=limits.max_batch_rows,
                      max_queued_rows=max(16 * limits.max_batch_rows, limits.max_rows))
    watcher = Watcher(served, poll_s)

    async def predict(request: Request) -> Response:
        if not served.ready:
            return _error(503, f"no model yet: waiting for a full snapshot in {served.export_dir}")
        try:
            body = await _body(request, limits.max_body_bytes)
            if len(body) > _DECODE_INLINE_BYTES:
                rows = await run_in_threadpool(_rows_of, body, limits.max_rows)
            else:
                rows = _rows_of(body, limits.max_rows)
            scores, version = await asyncio.wrap_future(batcher.submit(rows))
        except _HttpError as e:
            return _error(e.status, str(e))
        except RowError as e:
            return _error(400, str(e))
        except Unavailable as e:
            return _error(503, str(e))
        except Exception as e:  # one line to the client, never a traceback; the log has the detail
            logger.error("predict failed: %s: %s", type(e).__name__, e)
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        metrics.add_rows(len(scores))
        return JSONResponse({"scores": scores, "version": version})

    async def healthz(request: Request) -> Response:
        status = await run_in_threadpool(served.status)  # it waits for the model's lock: off the loop
        body = {"ready": status["ready"], "seq": status["seq"], "global_step": status["global_step"],
                "run_id": status["run_id"], "refused": status["refused"], "last_error": status["last_error"]}
        if not status["ready"]:
            body["waiting_for"] = f"a full snapshot in {served.export_dir}"
        return JSONResponse(body, status_code=200 if status["ready"] else 503)

    async def metrics_text(request: Request) -> Response:
        text = metrics.render(await run_in_threadpool(served.status))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            batcher.close()

    return Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", metrics_text, methods=["GET"])],
        middleware=[Middleware(_Observed, metrics=metrics)],
        lifespan=lifespan,
    )
