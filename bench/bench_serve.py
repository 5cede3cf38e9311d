"""Serving throughput and latency of ``monolith-torch serve`` while deltas land every second.

Question (issue 15): over loopback, with a publisher writing a delta every
second, does the server sustain at least 20,000 rows/s in requests of 256
rows, answer requests of one row with a p99 latency under 20 ms, and fail no
request?

Setup: a default-schema run trained with ``--export-dir`` (Criteo preset,
DeepFM), served by ``python -m monolith_torch serve`` (its own process), and
a publisher process:

- ``writer`` (default): re-publishes the trained rows every second as a new
  delta: a random 5% of each table's rows, values nudged, and the dense
  parameters. Applying it takes the model's lock, as a trainer's delta does.
- ``trainer``: ``train --follow --sync-every 1 --dense-sync-every 1`` fed a
  2,000-row file every second (training then shares the CPUs with serving).

The client (this process) is ``httpx.AsyncClient`` over a fixed number of
connections, posting pre-encoded bodies of rows from the held-out file
(dense values as JSON numbers, ids as strings) back to back for
``--duration`` seconds per case.

Baseline, measured in the same run just before and after each case (other
load drifts): ``ServedModel.score_records`` in process on the same rows
(parse and forward, no HTTP, no JSON, no batching). The ratio of the
server's rows/s to it is what HTTP, JSON and the client on the same CPUs
cost, or what coalescing concurrent requests gains.

    python bench/bench_serve.py [--train-rows 20000] [--duration 10] [--publisher writer|trainer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line  # noqa: E402
from monolith_torch.serve.model import ServedModel  # noqa: E402
from monolith_torch.sync.format import (  # noqa: E402
    TableRows,
    list_publications,
    read_publication,
    write_publication,
)
from monolith_torch.train.data import COLUMNS, generate_criteo  # noqa: E402

GOAL_ROWS_PER_S = 20_000
GOAL_P99_S = 0.020
CASES = ((1, 1), (1, 8), (256, 1), (256, 4))  # (rows per request, concurrent connections)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: str, n: int) -> list[dict]:
    """Held-out rows as a JSON client sends them: dense integers as numbers, hex ids as strings, no label."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = dict(zip(COLUMNS, line.rstrip("\n").split("\t"), strict=True))
            del row["label"]
            out.append({k: (int(v) if v else None) if k.startswith("I") else v for k, v in row.items()})
            if len(out) == n:
                break
    return out


def _republish(export: str, stop, interval_s: float) -> None:
    """The ``writer`` publisher (its own process): a delta of 5% of the rows, nudged, every ``interval_s``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pubs = list_publications(export)
    last = read_publication(pubs[-1][2])
    seq = pubs[-1][0]
    rng = np.random.default_rng(0)
    while not stop.wait(interval_s):
        seq += 1
        tables = {}
        for name, rows in last.tables.items():
            pick = rng.random(rows.ids.size) < 0.05
            values = rows.values[pick] + rng.normal(0, 1e-3, (int(pick.sum()), rows.values.shape[1])).astype(np.float32)
            tables[name] = TableRows(rows.ids[pick], values, rows.ids[:0])
        write_publication(export, seq, "delta", last.run_id, tables, last.table_rows, last.dense, last.global_step + seq - pubs[-1][0],
                          time.time(), time.time())


def _feed(folder: str, stop: threading.Event, interval_s: float) -> None:
    """The ``trainer`` publisher's input: a 2,000-row file every ``interval_s``."""
    i = 0
    while not stop.wait(interval_s):
        tmp = os.path.join(folder, f".part-{i:05d}.tsv.tmp")
        generate_criteo(tmp, 2000, seed=0, part=i)
        os.rename(tmp, os.path.join(folder, f"part-{i:05d}.tsv"))
        i += 1


def _wait_ready(url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/healthz", timeout=5.0)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not ready within {timeout} s")


async def _load(url: str, bodies: list[bytes], rows: int, concurrency: int, duration_s: float) -> dict:
    """Posts ``bodies`` round robin on ``concurrency`` connections for ``duration_s``; latencies and failures."""
    latencies: list[float] = []
    failures: list[str] = []
    seqs: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        for body in bodies[:2]:  # warm the connections and the model's first forward of this size
            await client.post("/predict", content=body, headers=headers)
        end = time.perf_counter() + duration_s

        async def worker(k: int) -> None:
            n = k
            while time.perf_counter() < end:
                body = bodies[n % len(bodies)]
                n += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", content=body, headers=headers)
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:120]}")
                else:
                    seqs.append(r.json()["version"]["seq"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"requests": len(latencies), "rows_per_s": len(seqs) * rows / elapsed, "req_per_s": len(latencies) / elapsed,
            "p50": q[49], "p99": q[98], "failures": failures, "seqs": (min(seqs), max(seqs)) if seqs else (0, 0)}


def _baseline(served: ServedModel, records: list[dict], rows: int, repeats: int = 11) -> float:
    """Rows/s of ``ServedModel.score_records`` in this process on requests of ``rows`` rows (median)."""
    batches = [records[i * rows:(i + 1) * rows] for i in range(max(1, min(8, len(records) // rows)))]
    served.score_records(batches[0])
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        served.score_records(batches[r % len(batches)])
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per case")
    parser.add_argument("--publisher", choices=("writer", "trainer"), default="writer")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the baseline gets what the server gets
    print(machine_line())
    work = tempfile.mkdtemp(prefix="bench_serve_")
    run, export = os.path.join(work, "run"), os.path.join(work, "export")
    procs: list[subprocess.Popen] = []
    stop_feed, writer = threading.Event(), None
    stop_writer = multiprocessing.Event()
    log = open(os.path.join(work, "processes.log"), "wb")  # noqa: SIM115 - closed in finally
    try:
        subprocess.run([sys.executable, "-m", "monolith_torch", "train", "--run-dir", run, "--generated-train-rows",
                        str(args.train_rows), "--generated-eval-rows", "4096", "--export-dir", export,
                        "--batch-size", "512"], stdout=log, stderr=log, check=True, timeout=600)
        records = _records(os.path.join(run, "data", "eval.tsv"), 4096)
        if args.publisher == "trainer":
            feed = os.path.join(work, "feed")
            os.makedirs(feed)
            export = os.path.join(work, "export_follow")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "monolith_torch", "train", "--follow", "--data", feed, "--export-dir", export,
                 "--run-dir", os.path.join(work, "run_follow"), "--batch-size", "512", "--sync-every", "1",
                 "--dense-sync-every", "1", "--follow-poll-s", "0.2"], stdout=log, stderr=log, start_new_session=True))
            threading.Thread(target=_feed, args=(feed, stop_feed, 1.0), daemon=True).start()
            while not list_publications(export):
                time.sleep(0.2)
        else:
            writer = multiprocessing.Process(target=_republish, args=(export, stop_writer, 1.0), daemon=True)
            writer.start()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "monolith_torch", "serve", "--export-dir", export, "--host", "127.0.0.1",
             "--port", str(port), "--threads", str(args.threads)], stdout=log, stderr=log, start_new_session=True))
        _wait_ready(url)
        served = ServedModel(export)
        served.refresh()
        print(f"publisher: {args.publisher} (a delta every second); {args.duration:.0f} s of load per case; "
              f"server: 1 process, {args.threads} torch thread(s)")
        print("baseline: in-process score_records (parse + forward, no HTTP), rows/s, measured just before "
              "and after each case (mean)")
        print(f"{'rows/req':>8} {'conns':>5} {'requests':>8} {'req/s':>8} {'rows/s':>9} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'failed':>6} {'versions':>12} {'baseline':>9} {'ratio':>6}")
        results = {}
        for rows, concurrency in CASES:
            bodies = [json.dumps({"rows": records[i * rows:(i + 1) * rows]}).encode()
                      for i in range(min(32, len(records) // rows))]
            before = _baseline(served, records, rows)
            res = asyncio.run(_load(url, bodies, rows, concurrency, args.duration))
            base = (before + _baseline(served, records, rows)) / 2
            results[(rows, concurrency)] = res
            print(f"{rows:>8} {concurrency:>5} {res['requests']:>8} {res['req_per_s']:>8.1f} {res['rows_per_s']:>9,.0f} "
                  f"{res['p50'] * 1e3:>7.1f} {res['p99'] * 1e3:>7.1f} {len(res['failures']):>6} "
                  f"{res['seqs'][0]:>5}..{res['seqs'][1]:<5} {base:>9,.0f} {res['rows_per_s'] / base:>5.2f}x")
            for failure in res["failures"][:3]:
                print(f"         failure: {failure}")
        best_256 = max(res["rows_per_s"] for (rows, _), res in results.items() if rows == 256)
        p99_1 = results[(1, 1)]["p99"]
        failed = sum(len(res["failures"]) for res in results.values())
        print(f"goal: batch 256 >= {GOAL_ROWS_PER_S:,} rows/s: {best_256:,.0f} -> "
              f"{'MET' if best_256 >= GOAL_ROWS_PER_S else 'MISSED'}")
        print(f"goal: batch 1 p99 < {GOAL_P99_S * 1e3:.0f} ms (1 connection): {p99_1 * 1e3:.1f} ms -> "
              f"{'MET' if p99_1 < GOAL_P99_S else 'MISSED'}")
        print(f"goal: zero failed requests: {failed} -> {'MET' if failed == 0 else 'MISSED'}")
    finally:
        stop_feed.set()
        stop_writer.set()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if writer is not None:
            writer.join(timeout=10)
            if writer.is_alive():
                writer.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
