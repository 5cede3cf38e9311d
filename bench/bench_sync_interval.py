"""AUC of a served model against how often it receives the trainer's deltas (MovieLens-100k replay).

Question (issue 15; the Monolith paper's sync-interval experiment on real
data): a trainer streams MovieLens-100k's last 20% in time order from the
batch model of docs/REALTIME.md; a server scores each batch of rows as they
arrive, before the trainer trains on them, with the model it has. How does
the served AUC depend on how often the server applies the trainer's deltas?

- The trainer: ``Trainer`` of the prepared ``schema.toml`` (as
  ``bench_movielens_stream.py``), started from the batch model (best epoch +
  one pass over ``valid``), trained on the test rows in batches of 256 in time
  order; after every batch a ``DeltaExporter`` publishes a delta (changed
  rows and the dense parameters) into an export folder.
- The servers: one ``Replica`` per interval, each over its own copy of the
  model (built from the same config), applying every publication in order,
  but only when its interval has passed: every 200 rows (here: every batch,
  as batches are 256 rows), every 1,000 rows, every 5,000 rows, once per
  calendar day of the data (the test rows span 47 days, 425 rows a day on
  average, 6 to 2,217). Each batch is scored (eval mode, no row created)
  by every server before the trainer trains on it.
- Reported next to them: the trainer's progressive AUC (each batch scored by
  the trainer itself before its update) and the frozen batch model's AUC.

Exact AUC over all 20,000 test rows, per seed and the mean. The batch models
are the ones ``bench_movielens_stream.py`` saved in ``--out-dir`` when they
are there, else trained here (about 50 s per seed).

    python bench/bench_sync_interval.py [--data DIR] [--wheel-dir DIR] [--seeds 0 1 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line  # noqa: E402
from bench_movielens_stream import _prepare, _train_step, _trainer, train_batch_model  # noqa: E402
from monolith_torch.sync.exporter import DeltaExporter  # noqa: E402
from monolith_torch.sync.replica import Replica  # noqa: E402
from monolith_torch.train.metrics import auc  # noqa: E402
from monolith_torch.train.readers import read_schema_batches  # noqa: E402

INTERVALS = (("every 200 rows", 200), ("every 1,000 rows", 1000), ("every 5,000 rows", 5000), ("daily", "day"))


class _Server:
    """A copy of the model that applies the export folder's publications when its interval has passed."""

    def __init__(self, args, seed: int, work: str, export: str, interval):
        self.trainer = _trainer(args, seed, os.path.join(work, "server"))
        self.replica = Replica(self.trainer.factory.tables, self.trainer.model)
        self.export, self.interval = export, interval
        self.rows_since, self.day = 0, None
        self.replica.poll(export)
        self.scores: list[torch.Tensor] = []

    @torch.no_grad()
    def score(self, batch) -> None:
        day = int(batch.timestamps[0]) // 86400
        due = day != self.day if self.interval == "day" else self.rows_since >= self.interval
        if due:
            self.replica.poll(self.export)
            self.rows_since, self.day = 0, day
        self.trainer.model.eval()
        self.scores.append(torch.sigmoid(self.trainer.model(batch)))
        self.rows_since += len(batch)


def run_seed(args, paths: dict, seed: int) -> dict:
    work = os.path.join(args.out_dir, f"seed-{seed}")
    os.makedirs(work, exist_ok=True)
    baseline = os.path.join(work, "batch-80.pt")
    if not os.path.isfile(baseline):
        baseline = train_batch_model(args, paths, seed, work)["baseline"]
    export = tempfile.mkdtemp(prefix="sync_interval_")
    trainer = _trainer(args, seed, os.path.join(work, "sync-run"), init=baseline, follow=True)
    frozen = _trainer(args, seed, os.path.join(work, "frozen"), init=baseline)
    exporter = DeltaExporter(export, "sync-interval", trainer.factory, trainer.model, {}, sync_every=0.0,
                             dense_sync_every=0.0, full_every=0.0)
    exporter.start(int(trainer.global_step))
    servers = {name: _Server(args, seed, work, export, interval) for name, interval in INTERVALS}
    progressive, frozen_scores, labels = [], [], []
    t0 = time.perf_counter()
    for batch in read_schema_batches([paths["test"]], trainer.schema, args.batch_size):
        for server in servers.values():
            server.score(batch)
        with torch.no_grad():
            frozen.model.eval()
            frozen_scores.append(torch.sigmoid(frozen.model(batch)))
        progressive.append(_train_step(trainer, batch))
        labels.append(batch.labels)
        exporter.publish("delta", int(trainer.global_step), dense=True)
    exporter.finish(int(trainer.global_step))
    y = torch.cat(labels)
    result = {name: auc(torch.cat(s.scores), y) for name, s in servers.items()}
    result["trainer, progressive"] = auc(torch.cat(progressive), y)
    result["frozen batch model"] = auc(torch.cat(frozen_scores), y)
    result["applied"] = {name: s.replica.seq for name, s in servers.items()}
    result["seconds"] = time.perf_counter() - t0
    result["publications"] = exporter.seq
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join("runs", "movielens-100k"))
    parser.add_argument("--wheel-dir", default=None)
    parser.add_argument("--out-dir", default=os.path.join("runs", "movielens-stream"),
                        help="where bench_movielens_stream.py keeps its batch models (seed-N/batch-80.pt)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = _prepare(args)
    args.schema = paths["schema"]
    print(machine_line())
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args, paths, seed)
        print(f"seed {seed}: {results[seed]['publications']} publications, {results[seed]['seconds']:.0f}s", flush=True)
    names = [n for n, _ in INTERVALS] + ["trainer, progressive", "frozen batch model"]
    print("\nAUC on the 20,000 test rows, scored before the trainer trains on them")
    print(f"{'':<24}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean':>10}{'vs frozen':>11}")
    frozen = statistics.mean(results[s]["frozen batch model"] for s in args.seeds)
    for name in names:
        values = [results[s][name] for s in args.seeds]
        mean = statistics.mean(values)
        print(f"{name:<24}" + "".join(f"{v:>10.4f}" for v in values) + f"{mean:>10.4f}{mean - frozen:>+11.4f}")
    diffs = {n: [results[s][n] - results[s]["frozen batch model"] for s in args.seeds] for n in names[:-1]}
    print("\npaired per seed, minus the frozen model: "
          + "; ".join(f"{n}: {', '.join(f'{d:+.4f}' for d in v)}" for n, v in diffs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
