"""Progressive AUC of ``train --follow`` on MovieLens-100k's last 20% in time order vs the frozen batch model.

Question: a batch model trained on the first 80% of the ratings (early-stopped
on validation) is either served as it is, or keeps training on the ratings as
they arrive (``monolith-torch train --follow --init-from``). On the last 20%,
in time order, does the model that keeps training score better than the frozen
one, on the same rows, seed by seed?

Per seed:

- batch model: the run's model (``schema.toml`` + batch 256, DeepFM 256-128,
  Adam 1e-3, clip 10, as ``bench_movielens.py``) trained on ``train.parquet``
  shuffled every epoch; after each epoch the validation AUC; stop after
  ``--patience`` epochs without a better one; the best epoch's checkpoint.
  Then one pass over ``valid.parquet`` in time order, so the model that is
  served or streamed has seen the first 80%: the baseline checkpoint.
- frozen: the baseline scores ``test.parquet`` (20,000 rows), never updated.
- stream, 1,000-row files: ``test.parquet`` as files of 1,000 rows; the
  baseline trains on them in name order, batch by batch (batches never span
  files); every batch is scored before it is trained on (progressive
  validation). Reported: the exact AUC over all 20,000 pre-update scores.
- stream, daily files: the same rows as one file per calendar day (UTC).
- stream from scratch: all 100,000 ratings as 1,000-row files, no batch model;
  progressive AUC on the last 20,000 rows and on all rows.
- stream from the train-only model: the 1,000-row files from the best-epoch
  checkpoint without the pass over ``valid`` (the other choice of start).
- control, one file: the test rows as one file, so every batch is full (in
  the streams above each file's last batch is short: batches never span files).

Every stream also reports a file-delayed AUC: each file scored whole, before
any of it is trained on, by the model as it was after the previous file (what a
server reloading the model after every file would have served).

The streams train with the trainer's own objects (``Trainer``'s model, tables,
optimizer, step as in ``train``); for the first seed the bench also runs the
real command, ``monolith-torch train --follow --init-from``, for each stream,
and checks that its ``progressive.csv`` window over the same rows agrees with
the exact AUC (binning error only) and that the final state digests are equal.
``train --follow`` weighs a file's short last batch by its rows over the batch
size (its loss times rows / ``--batch-size``), so every row moves its ids as
far as in a full batch. ``--short-batches mean`` (a diagnosis, not what
``train`` does) trains the streams on the plain mean over each batch's rows
instead: a short batch then takes a step ``batch_size / rows`` times larger.
The protocol and the measured table are in docs/REALTIME.md.

    python bench/bench_movielens_stream.py [--data DIR] [--wheel-dir DIR] [--seeds 0 1 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line  # noqa: E402
from monolith_torch.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from monolith_torch.step.api import apply_gradients_with_var_optimizer  # noqa: E402
from monolith_torch.step.types import GradClipType  # noqa: E402
from monolith_torch.train.config import load_config  # noqa: E402
from monolith_torch.train.datasets import prepare_movielens_100k  # noqa: E402
from monolith_torch.train.metrics import auc  # noqa: E402
from monolith_torch.train.readers import read_schema_batches  # noqa: E402
from monolith_torch.train.trainer import Trainer, state_digest  # noqa: E402

SPLITS = ("train", "valid", "test")
ROWS_PER_FILE = 1000


# ---------------------------------------------------------------- the trainer's step, driven in process


def _trainer(args, seed: int, run_dir: str, init: str | None = None, follow: bool = False) -> Trainer:
    """A ``Trainer`` of the run config ``monolith-torch train --config schema.toml`` builds; ``init``: --init-from."""
    cfg = load_config(args.schema, {"run_dir": run_dir, "batch_size": args.batch_size, "seed": seed,
                                    "threads": args.threads, "clock": "data", "follow": follow})
    trainer = Trainer(cfg, show_progress=False)
    if init:
        # What train --init-from does: tables, dense model, optimizer and step; the configured dense lr.
        restore_checkpoint(init, trainer.ctx, trainer.model, trainer.optimizer, trainer.global_step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = cfg.dense_lr
    return trainer


def _train_step(trainer: Trainer, batch, mean_loss: bool = False) -> torch.Tensor:
    """One step as ``train --follow`` takes it; returns the batch's pre-update scores [B].

    ``train --follow`` weighs a short batch (a file's last) by its rows over
    the batch size. ``mean_loss``: not what ``train`` does, a diagnosis: the
    plain mean over the rows, so a short batch moves each of its rows' ids
    ``batch_size / rows`` times as far as a full batch would.
    """
    trainer.clock.advance(batch.timestamps)
    if not mean_loss:
        _, probs, applied = trainer._train_step(batch, None, int(trainer.global_step))
        if not applied:
            raise RuntimeError(f"non-finite loss or gradient at step {int(trainer.global_step)}")
        return probs
    trainer.model.train()
    logits = trainer.model(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    result = apply_gradients_with_var_optimizer(
        trainer.ctx, [], trainer.optimizer, loss, clip_type=GradClipType.ClipByGlobalNorm,
        clip_norm=trainer.cfg.clip_norm, global_step=trainer.global_step, use_allreduce=False,
        dense_weight_decay=trainer.cfg.dense_weight_decay, model=trainer.model, skip_nonfinite=True)
    if result.reason == "nonfinite":
        raise RuntimeError(f"non-finite loss or gradient at step {int(trainer.global_step)}")
    return torch.sigmoid(logits.detach())


@torch.no_grad()
def _scores(trainer: Trainer, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N] and labels [N] of the model as it is (eval mode: tables do not grow)."""
    trainer.model.eval()
    scores, labels = [], []
    for batch in read_schema_batches(paths, trainer.schema, 8192):
        scores.append(torch.sigmoid(trainer.model(batch)))
        labels.append(batch.labels)
    trainer.model.train()
    return torch.cat(scores), torch.cat(labels)


def _save(trainer: Trainer, path: str) -> None:
    trainer.ctx.async_function_mgr.flush()
    save_checkpoint(path, trainer.ctx, trainer.model, trainer.optimizer, trainer.global_step,
                    extra={"clock": trainer.clock.data_time})


# ---------------------------------------------------------------- the batch model


def train_batch_model(args, paths: dict, seed: int, work: str) -> dict:
    """Early-stopped on valid (train shuffled every epoch), then one pass over valid in time order."""
    t0 = time.perf_counter()
    trainer = _trainer(args, seed, os.path.join(work, "batch-run"))
    rng = np.random.default_rng(seed)
    train = pq.read_table(paths["train"])
    shuffled = os.path.join(work, "train-shuffled.parquet")
    best = {"valid_auc": -1.0, "epoch": 0, "path": os.path.join(work, "batch-train-only.pt")}
    waited = 0
    for epoch in range(1, args.max_epochs + 1):
        pq.write_table(train.take(rng.permutation(train.num_rows)), shuffled)
        for batch in read_schema_batches([shuffled], trainer.schema, args.batch_size):
            _train_step(trainer, batch)
        trainer.ctx.async_function_mgr.flush()
        valid = auc(*_scores(trainer, [paths["valid"]]))
        if valid > best["valid_auc"]:
            best.update(valid_auc=valid, epoch=epoch, test_auc=auc(*_scores(trainer, [paths["test"]])))
            _save(trainer, best["path"])
            waited = 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    os.remove(shuffled)
    # The baseline: the best epoch, then the validation rows once, in time order.
    trainer = _trainer(args, seed, os.path.join(work, "batch-run"), init=best["path"])
    for batch in read_schema_batches([paths["valid"]], trainer.schema, args.batch_size):
        _train_step(trainer, batch)
    best["baseline"] = os.path.join(work, "batch-80.pt")
    _save(trainer, best["baseline"])
    best["frozen_test_auc"] = auc(*_scores(trainer, [paths["test"]]))
    best["seconds"] = time.perf_counter() - t0
    return best


# ---------------------------------------------------------------- the streams


def _publish(table: pa.Table, folder: str, name: str) -> None:
    """Writes ``name`` as --follow expects: under a dot-name, then renamed into place."""
    pq.write_table(table, os.path.join(folder, "." + name))
    os.replace(os.path.join(folder, "." + name), os.path.join(folder, name))


def write_streams(paths: dict, work: str) -> dict[str, list[str]]:
    """The folders of files: the test rows in 1,000-row files, by day and in one file; all rows in 1,000-row files."""
    test = pq.read_table(paths["test"])
    everything = pa.concat_tables([pq.read_table(paths[s]) for s in SPLITS])
    folders = {}
    for kind, table, rows in (("test-1000", test, ROWS_PER_FILE), ("all-1000", everything, ROWS_PER_FILE),
                              ("test-one", test, test.num_rows)):
        folder = folders[kind] = os.path.join(work, kind)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for i, start in enumerate(range(0, table.num_rows, rows)):
            _publish(table.slice(start, rows), folder, f"part-{i:05d}.parquet")
    folder = folders["test-daily"] = os.path.join(work, "test-daily")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    days = test["timestamp"].to_numpy() // 86400
    cuts = np.flatnonzero(np.diff(days)) + 1  # the rows are in time order: each day is one run of rows
    for start, end in zip(np.r_[0, cuts], np.r_[cuts, test.num_rows], strict=True):
        day = datetime.datetime.fromtimestamp(int(days[start]) * 86400, tz=datetime.UTC)
        _publish(test.slice(int(start), int(end - start)), folder, f"day-{day:%Y%m%d}.parquet")
    return {kind: sorted(os.path.join(f, n) for n in os.listdir(f) if not n.startswith("."))
            for kind, f in folders.items()}


def stream(args, seed: int, files: list[str], init: str | None, work: str) -> dict:
    """Trains on ``files`` in order as --follow does; pre-update scores and file-delayed scores of every row."""
    trainer = _trainer(args, seed, os.path.join(work, "stream-run"), init=init, follow=True)
    progressive, delayed, labels = [], [], []
    seconds = 0.0  # reading and training only, not the file-delayed scoring
    for path in files:
        delayed.append(_scores(trainer, [path])[0])
        t0 = time.perf_counter()
        for batch in read_schema_batches([path], trainer.schema, args.batch_size):
            progressive.append(_train_step(trainer, batch, mean_loss=args.short_batches == "mean"))
            labels.append(batch.labels)
        seconds += time.perf_counter() - t0
    trainer.ctx.async_function_mgr.flush()
    return {"progressive": torch.cat(progressive), "delayed": torch.cat(delayed), "labels": torch.cat(labels),
            "seconds": seconds, "digest": state_digest(trainer.factory, trainer.model), "files": len(files)}


def run_cli(args, seed: int, folder: str, init: str | None, run_dir: str, window_rows: int) -> dict:
    """``monolith-torch train --follow`` on ``folder``; its progressive windows and final state digest."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "monolith_torch", "train", "--config", args.schema, "--follow",
               "--data", folder, "--follow-idle-exit", "1", "--follow-poll-s", "0.2", "--clock", "data",
               "--run-dir", run_dir, "--batch-size", str(args.batch_size), "--seed", str(seed),
               "--threads", str(args.threads or 1), "--progressive-window-rows", str(window_rows),
               "--checkpoint-every", "1000000"]
    if init:
        command += ["--init-from", init]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(run_dir, "progressive.csv"), newline="") as f:
        windows = [r for r in csv.DictReader(f) if r["kind"] == "rows"]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        digest = json.load(f)["state_digest"]
    return {"windows": windows, "digest": digest, "seconds": seconds, "command": command}


# ---------------------------------------------------------------- the protocol


def run_seed(args, paths: dict, files: dict, seed: int, cli: bool) -> dict:
    work = os.path.join(args.out_dir, f"seed-{seed}")
    os.makedirs(work, exist_ok=True)
    batch = train_batch_model(args, paths, seed, work)
    print(f"seed {seed}: batch model best epoch {batch['epoch']} (valid AUC {batch['valid_auc']:.4f}, "
          f"test AUC {batch['test_auc']:.4f}); + valid pass: frozen test AUC {batch['frozen_test_auc']:.4f}; "
          f"{batch['seconds']:.0f}s", flush=True)
    n_test = pq.ParquetFile(paths["test"]).metadata.num_rows
    settings = {  # name: (files, start checkpoint, rows of the test split at the end of the stream)
        "1000-row files": (files["test-1000"], batch["baseline"]),
        "daily files": (files["test-daily"], batch["baseline"]),
        "from scratch": (files["all-1000"], None),
        "1000-row files, train-only start": (files["test-1000"], batch["path"]),
        "one file (control)": (files["test-one"], batch["baseline"]),
    }
    result = {"batch": batch, "streams": {}}
    for name, (stream_files, init) in settings.items():
        s = stream(args, seed, stream_files, init, work)
        tail = slice(len(s["labels"]) - n_test, None)
        s["auc"] = auc(s["progressive"][tail], s["labels"][tail])
        s["delayed_auc"] = auc(s["delayed"][tail], s["labels"][tail])
        s["auc_all"] = auc(s["progressive"], s["labels"])
        s["delayed_auc_all"] = auc(s["delayed"], s["labels"])
        s["rows"] = len(s["labels"])
        result["streams"][name] = s
        if cli and name in ("1000-row files", "daily files", "from scratch"):
            c = run_cli(args, seed, os.path.dirname(stream_files[0]), init,
                        os.path.join(work, "cli-" + name.split()[0]), window_rows=n_test)
            last = c["windows"][-1]
            if int(last["end"]) != s["rows"]:
                raise SystemExit(f"CLI run on {name}: last progressive window ends at row {last['end']}, "
                                 f"expected {s['rows']}")
            s["cli"] = {"auc": float(last["auc"]), "digest_equal": c["digest"] == s["digest"],
                        "seconds": c["seconds"], "command": c["command"]}
    return result


def _prepare(args) -> dict:
    paths = {s: os.path.join(args.data, f"{s}.parquet") for s in SPLITS}
    paths["schema"] = os.path.join(args.data, "schema.toml")
    if not all(os.path.isfile(p) for p in paths.values()):
        print(f"preparing MovieLens-100k into {args.data} ...", flush=True)
        paths = prepare_movielens_100k(args.data, wheel_dir=args.wheel_dir)
    return paths


def _report(args, results: dict, n_test: int) -> None:
    seeds = list(results)
    print()
    print(f"AUC on the last 20% ({n_test} rows, time order); progressive = each batch scored before it is trained on;")
    print("file-delayed = each file scored whole by the model as it was before the file")
    print(f"{'':50} " + " ".join(f"seed {s:<4}" for s in seeds) + "   mean     std")

    def line(label, values):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{label:<50} " + " ".join(f"{v:.4f}   " for v in values)
              + f" {statistics.fmean(values):.4f}  {spread:.4f}")

    line("frozen batch model, train only", [results[s]["batch"]["test_auc"] for s in seeds])
    line("frozen batch model (+ valid pass): baseline", [results[s]["batch"]["frozen_test_auc"] for s in seeds])
    for name in results[seeds[0]]["streams"]:
        line(f"{name}: progressive", [results[s]["streams"][name]["auc"] for s in seeds])
        line(f"{name}: file-delayed", [results[s]["streams"][name]["delayed_auc"] for s in seeds])
    line("from scratch, all 100k rows: progressive", [results[s]["streams"]["from scratch"]["auc_all"] for s in seeds])
    line("from scratch, all 100k rows: file-delayed",
         [results[s]["streams"]["from scratch"]["delayed_auc_all"] for s in seeds])
    print()
    print("paired per seed against the frozen baseline (same rows, same seed):")
    for name in ("1000-row files", "daily files", "from scratch", "one file (control)"):
        for kind, key in (("progressive", "auc"), ("file-delayed", "delayed_auc"))[: 1 if "one" in name else 2]:
            diffs = [results[s]["streams"][name][key] - results[s]["batch"]["frozen_test_auc"] for s in seeds]
            wins = sum(d > 0 for d in diffs)
            print(f"  {name + ', ' + kind:<36} mean {statistics.fmean(diffs):+.4f}  per seed "
                  + " ".join(f"{d:+.4f}" for d in diffs) + f"  ({wins}/{len(seeds)} seeds above)")
    train_only = [results[s]["streams"]["1000-row files, train-only start"]["auc"] - results[s]["batch"]["test_auc"]
                  for s in seeds]
    print(f"  {'train-only start vs its frozen model':<36} mean {statistics.fmean(train_only):+.4f}  per seed "
          + " ".join(f"{d:+.4f}" for d in train_only))
    print()
    print("time (s): " + "; ".join(
        f"seed {s}: batch model {results[s]['batch']['seconds']:.0f} (best epoch {results[s]['batch']['epoch']}), "
        + ", ".join(f"{short} {r['seconds']:.1f} ({r['rows'] / r['seconds']:.0f} rows/s, {r['files']} files)"
                    for short, r in (("1000-row", results[s]["streams"]["1000-row files"]),
                                     ("daily", results[s]["streams"]["daily files"]),
                                     ("scratch", results[s]["streams"]["from scratch"])))
        for s in seeds))
    for s in seeds:
        for name, r in results[s]["streams"].items():
            if "cli" in r:
                c = r["cli"]
                print(f"CLI check, seed {s}, {name}: progressive.csv AUC {c['auc']:.4f} vs exact {r['auc']:.4f} "
                      f"(diff {c['auc'] - r['auc']:+.5f}); state digest equal: {c['digest_equal']}; "
                      f"{c['seconds']:.1f}s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join("runs", "movielens-100k"),
                        help="prepared data (made if missing)")
    parser.add_argument("--wheel-dir", default=None, help="where the recbole wheel is or is downloaded to")
    parser.add_argument("--out-dir", default=os.path.join("runs", "movielens-stream"),
                        help="work files: stream folders, checkpoints, CLI run directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256, help="as bench_movielens.py")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (also the CLI runs')")
    parser.add_argument("--short-batches", choices=("mean", "weighted"), default="weighted",
                        help="streams' loss: weighted, as train --follow (a short batch's loss times rows / "
                             "--batch-size); mean: the plain mean over its rows (a diagnosis; no CLI check)")
    parser.add_argument("--no-cli-check", dest="cli_check", action="store_false",
                        help="skip the monolith-torch train --follow runs (first seed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = _prepare(args)
    args.schema = paths["schema"]
    os.makedirs(args.out_dir, exist_ok=True)
    files = write_streams(paths, args.out_dir)
    n_test = pq.ParquetFile(paths["test"]).metadata.num_rows
    print(machine_line())
    print(f"streams: test rows in {len(files['test-1000'])} files of {ROWS_PER_FILE} and in "
          f"{len(files['test-daily'])} daily files; all rows in {len(files['all-1000'])} files; "
          f"batch {args.batch_size}; streams' loss: {args.short_batches}")
    t0 = time.perf_counter()
    cli = args.cli_check and args.short_batches == "weighted"
    results = {seed: run_seed(args, paths, files, seed, cli=cli and seed == args.seeds[0])
               for seed in args.seeds}
    _report(args, results, n_test)
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
