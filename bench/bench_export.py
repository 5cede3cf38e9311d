"""What change tracking and delta export cost the default training step.

Question (issue 14): tracking the rows each step touches must add at most 5%
to the step, and publishing deltas (``train --export-dir``) must run off the
training thread or cost under 5% of wall time.

Candidates, each its own ``Trainer`` of the default config (Criteo preset,
DeepFM, unfused tables), training blocks of ``--steps`` steps on the same
in-memory batches (the trainer's reader, parsing excluded), interleaved:

- ``export off``: the baseline, ``Trainer._train_step`` alone.
- ``tracking``: every table's ``track_changes()`` on (the mark per row each
  lookup and update writes), nothing published.
- ``export 1 s``: a ``DeltaExporter`` as ``train --export-dir`` makes it
  (deltas every second of wall time, dense parameters every 10 s, a full
  snapshot every 60 s; ``maybe_publish`` after every step): changed rows are
  copied on the training thread, files written on the exporter's thread
  (a block waits for the previous publication's write only when it publishes
  again, as in training).
- ``export every step``: the worst case, ``--sync-every 0``.

    python bench/bench_export.py [--rows 60000] [--steps 8] [--repeats 9]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    Candidate,
    add_threads_argument,
    apply_threads,
    machine_line,
    measure,
    print_table,
)
from monolith_torch.sync.exporter import DeltaExporter  # noqa: E402
from monolith_torch.train.config import TrainConfig  # noqa: E402
from monolith_torch.train.data import ReadStats, generate_criteo  # noqa: E402
from monolith_torch.train.run_dir import model_settings  # noqa: E402
from monolith_torch.train.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=9)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)
    print(machine_line())
    work = tempfile.mkdtemp(prefix="bench_export_")
    data = generate_criteo(os.path.join(work, "train.tsv"), args.rows, seed=0)
    cfg = TrainConfig(run_dir=os.path.join(work, "run"), data=(data,), threads=args.threads or 1)
    reader = Trainer(cfg, show_progress=False)
    batches = list(reader._read([data], cfg.batch_size, ReadStats()))
    print(f"{len(batches)} batches of {cfg.batch_size} rows, {args.steps} steps per block")

    def candidate(name: str, track: bool, sync_every: float | None) -> Candidate:
        trainer = Trainer(cfg, show_progress=False)
        exporter = None
        if sync_every is not None:
            exporter = DeltaExporter(os.path.join(work, name.replace(" ", "_")), "bench", trainer.factory,
                                     trainer.model, model_settings(cfg), sync_every=sync_every,
                                     dense_sync_every=10.0, full_every=60.0)
            exporter.start(0)
        elif track:
            for table in trainer.factory.tables.values():
                table.track_changes()
        feed = itertools.cycle(batches)
        step = itertools.count()

        def block():
            for _ in range(args.steps):
                n = next(step)
                trainer._train_step(next(feed), None, n)
                if exporter is not None:
                    exporter.maybe_publish(n)

        return Candidate(name, block)

    candidates = [candidate("export off", False, None), candidate("tracking", True, None),
                  candidate("export 1 s", True, 1.0), candidate("export every step", True, 0.0)]
    timings = measure(candidates, repeats=args.repeats, warmup=2)
    ratios = print_table("training step, blocks of steps", timings, "export off")
    for name in ("tracking", "export 1 s"):
        verdict = "MET" if ratios[name] <= 1.05 else "MISSED"
        print(f"   goal: {name} <= 1.05x export off: {ratios[name]:.3f}x -> {verdict}")


if __name__ == "__main__":
    main()
