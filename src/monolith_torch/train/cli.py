"""``monolith-torch``: train, evaluate, score and serve a CTR model (serve: ``monolith-torch serve --help``).

    monolith-torch train [--config run.toml] [--data 'day_*.tsv.gz'] [--flag value ...]
    monolith-torch eval --run-dir runs/default [--eval-data held_out.tsv]
    monolith-torch predict --run-dir runs/default --data new.tsv --output scores.tsv
    monolith-torch serve --export-dir exports/default [--port 8080]   (HTTP; monolith_torch.serve.cli)
    torchrun --nproc_per_node 2 -m monolith_torch train ...

Every failure prints one ``error:`` line (text from data files and paths
escaped, see ``core.fileio.printable``) and exits with a documented code
(``EXIT_CODES``, shown by ``--help``); never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import signal
import sys
import threading
from dataclasses import fields

from monolith_torch.checkpoint import CheckpointError
from monolith_torch.core.fileio import append_file, check_target, printable
from monolith_torch.sync.exporter import ExportError, check_export_dir
from monolith_torch.train.config import HELP, ConfigError, TrainConfig, load_config
from monolith_torch.train.data import DataError, expand_paths
from monolith_torch.train.follow import check_follow_patterns
from monolith_torch.train.run_dir import RunPaths, check_outputs, run_id, saved_model_settings

__all__ = ["main", "EXIT_CODES"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_IO = 74  # sysexits.h EX_IOERR
EXIT_CODES = f"""exit codes:
  0    done
  2    bad input: a bad setting or config file, a missing data path, an unwritable
       run directory or --output (all before anything is written), a run directory
       another trainer holds (its pid named), a checkpoint that cannot be restored
       (the file and the reason named; an older intact one is used instead, with a
       warning, when there is one), or a malformed data line under --strict (the
       file and line named; training saves a checkpoint first)
  3    training diverged: a NaN/inf loss or gradient at the step named; nothing is
       saved after it, the last good checkpoint is kept (skip_nonfinite = true
       skips and counts such steps instead)
  {EXIT_IO}   an I/O error while running: a file could not be written (disk full, no
       permission, a symbolic link where monolith-torch writes); the line names it
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM: training saves a checkpoint
       first; an interrupted data generation or --output write leaves no file
       behind and the previous one as it was
"""


class _Terminated(BaseException):
    """SIGTERM outside the training loop; a BaseException so no ``except Exception`` swallows it."""


def _raise_terminated(signum, _frame) -> None:
    raise _Terminated(signum)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name in ("features", "model_options"):
            continue  # tables: TOML only
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{HELP[f.name]} (default {f.default})")
        elif f.name in ("data", "eval_data"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="PATH_OR_GLOB",
                                help=HELP[f.name])
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"{HELP[f.name]} (default {f.default!r})")


def _number_or_text(kind: type):
    """An argparse ``type`` that leaves text it cannot parse as is, for the generator to reject in one line."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monolith-torch", description=__doc__.split("\n")[0],
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train a model (resume with --resume)"),
        ("eval", "AUC and log-loss of the latest checkpoint on held-out data"),
        ("predict", "write scores of the latest checkpoint for --data to --output"),
    ):
        p = sub.add_parser(name, help=help_text, epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=None, help="a TOML file of settings (flags override it)")
        _add_setting_flags(p)
    p = sub.add_parser("data", help="write a data set, ready to train: MovieLens, or a drifting Criteo-format stream",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["movielens-100k", "criteo-stream"],
                   help="movielens-100k: from the recbole==1.2.1 wheel on PyPI, read without installing it; "
                        "criteo-stream: generated part-NNNNN.tsv files whose ids and popularity drift, "
                        "for training with --follow")
    p.add_argument("--out", required=True,
                   help="the folder: movielens-100k, train/valid/test Parquet files and schema.toml; "
                        "criteo-stream, the part files")
    p.add_argument("--wheel-dir", default=None,
                   help="movielens-100k: where the wheel is, or is downloaded to "
                        "(a cache; default: a temporary folder)")
    # dest stream_*: train's setting flags own the plain names (seed), and main() keeps these out of them.
    p.add_argument("--files", dest="stream_files", metavar="N", type=_number_or_text(int), default=20,
                   help="criteo-stream: files to write (default 20)")
    p.add_argument("--rows-per-file", dest="stream_rows_per_file", metavar="R", type=_number_or_text(int), default=5000,
                   help="criteo-stream: rows per file (default 5000)")
    p.add_argument("--drift", dest="stream_drift", metavar="X", type=_number_or_text(float), default=1.0,
                   help="criteo-stream: drift rate, 0 for a stationary stream (default 1.0)")
    p.add_argument("--seed", dest="stream_seed", metavar="S", type=_number_or_text(int), default=0,
                   help="criteo-stream: the hidden truth (ids, weights; default 0)")
    p.add_argument("--interval", dest="stream_interval", metavar="SECONDS", type=_number_or_text(float), default=0.0,
                   help="criteo-stream: seconds to wait between files, a live trickle (default 0)")
    p.add_argument("--first", dest="stream_first", metavar="K", type=_number_or_text(int), default=0,
                   help="criteo-stream: index of the first file; continues an earlier stream (default 0)")
    return parser


def _data(args) -> int:
    if args.dataset == "criteo-stream":
        return _data_criteo_stream(args)
    from monolith_torch.train.datasets import prepare_movielens_100k

    try:
        written = prepare_movielens_100k(args.out, args.wheel_dir)
    except DataError as e:
        _error("data", e)
        return EXIT_USAGE
    except OSError as e:
        _error("data", e)
        return EXIT_IO
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"train with: monolith-torch train --config {written['schema']} --data {written['train']} "
          f"--eval-data {written['test']} --run-dir runs/movielens")
    return 0


# The generator names its parameters, the user typed flags: errors name the flag.
_STREAM_FLAG_NAMES = {"num_files": "files", "interval_s": "interval"}


def _data_criteo_stream(args) -> int:
    from monolith_torch.train.data import generate_criteo_stream

    try:
        written = generate_criteo_stream(
            args.out, args.stream_files, args.stream_rows_per_file, seed=args.stream_seed,
            drift=args.stream_drift, first=args.stream_first, interval_s=args.stream_interval,
        )
    except ValueError as e:
        message = str(e)
        for param, flag in _STREAM_FLAG_NAMES.items():
            message = message.replace(f"Invalid {param}:", f"Invalid {flag}:", 1)
        _error("data", message)
        return EXIT_USAGE
    except OSError as e:
        _error("data", e)
        return EXIT_IO
    print(f"wrote {len(written)} files ({args.stream_rows_per_file} rows each) to {args.out}")
    print(f"train with: monolith-torch train --follow --data {shlex.quote(args.out)} --follow-idle-exit 10 "
          "--run-dir runs/stream")
    return 0


def _print_config(cfg: TrainConfig) -> None:
    print("effective config:")
    for key, value in cfg.to_dict().items():
        if key == "features":
            value = f"<{len(value)} [[features]] entries>" if value else "<the Criteo preset>"
            print(f"  {key} = {value}")
            continue
        print(f"  {key} = {list(value) if isinstance(value, tuple) else value!r}")
    sys.stdout.flush()


def _print_table(metrics: dict) -> None:
    rows = [
        ("AUC", metrics.get("train_auc"), metrics.get("eval_auc")),
        ("log-loss", metrics.get("train_log_loss"), metrics.get("eval_log_loss")),
        ("examples", metrics.get("train_examples"), metrics.get("eval_examples")),
    ]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    print(f"{'metric':<10}{'train':>12}{'eval':>12}")
    for name, train, evaluation in rows:
        print(f"{name:<10}{fmt(train):>12}{fmt(evaluation):>12}")
    print(f"steps {metrics['steps']}, {metrics['examples_per_sec']:.0f} examples/s, {metrics['seconds']:.1f} s")
    if metrics.get("progressive_windows", 0) > 1:
        print(f"progressive AUC (scored before training, windows of {metrics['progressive_window_rows']} rows): "
              f"{metrics['progressive_first_auc']:.4f} in the first, {metrics['progressive_last_auc']:.4f} in the "
              f"last of {metrics['progressive_windows']} (progressive.csv)")
    print(f"data: {metrics['data_summary']}")
    if metrics.get("checkpoint"):
        print(f"checkpoint: {metrics['checkpoint']}")


def _validate(command: str, cfg: TrainConfig) -> None:
    """Checks everything that can be checked before a single file is written."""
    check_outputs(RunPaths(cfg.run_dir), command)
    log = os.path.join(cfg.run_dir, "train.log")
    if os.path.islink(log):
        raise ConfigError(f"Invalid run_dir: {cfg.run_dir!r} ({log!r} is a symbolic link; refusing to log through it)")
    if cfg.follow and command == "train":
        check_follow_patterns(cfg.data)
    elif cfg.data:
        expand_paths(cfg.data)
    if cfg.export_dir and command == "train":
        try:
            check_export_dir(cfg.export_dir, run_id(RunPaths(cfg.run_dir), create=False))
        except ExportError as e:
            raise ConfigError(str(e)) from None
    if cfg.init_from and not os.path.isfile(cfg.init_from):
        raise ConfigError(f"Invalid init_from: {cfg.init_from!r} (no such checkpoint file)")
    if cfg.eval_data:
        expand_paths(cfg.eval_data)
    if command == "predict" and not cfg.data:
        raise ConfigError("predict needs --data (the rows to score)")
    if command == "eval" and cfg.data and not cfg.eval_data:
        raise ConfigError("eval needs --eval-data when --data names your own training files")
    if command in ("eval", "predict") and not os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")):
        raise ConfigError(f"no checkpoints in run_dir {cfg.run_dir!r}; train first")
    if command == "predict":
        output = cfg.output or os.path.join(cfg.run_dir, "predictions.tsv")
        try:
            check_target(output)
        except OSError as e:
            raise ConfigError(f"Invalid output: {output!r} ({e.strerror})") from None
        if not os.access(os.path.dirname(os.path.abspath(output)), os.W_OK | os.X_OK):
            raise ConfigError(f"Invalid output: {output!r} (its directory is not writable)")


class _LogFile(logging.FileHandler):
    """``logging.FileHandler`` that refuses a symlink planted at the log's name instead of appending through it."""

    def _open(self):
        return append_file(self.baseFilename, self.encoding or "utf-8")


def _setup_logging(cfg: TrainConfig, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        handlers.append(_LogFile(os.path.join(cfg.run_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", handlers=handlers, force=True)


def _with_saved_model_settings(command: str, cfg: TrainConfig) -> TrainConfig:
    """eval/predict rebuild the model the run trained: its saved shape settings win over the flags'."""
    if command == "train":
        return cfg
    saved = saved_model_settings(RunPaths(cfg.run_dir))
    changed = {k: v for k, v in saved.items() if getattr(cfg, k) != v}
    if not changed:
        return cfg
    shown = {k: f"<{len(v)} [[features]] entries>" if k == "features" else v for k, v in changed.items()}
    print(f"using the run's saved model settings: {shown}", file=sys.stderr)
    return dataclasses.replace(cfg, **changed)


def _run(command: str, cfg: TrainConfig) -> int:
    from monolith_torch.train.launch import init_distributed
    from monolith_torch.train.trainer import StopRequested, Trainer, TrainingDiverged

    rank, world = init_distributed(cfg.dist_timeout_s)
    _setup_logging(cfg, rank)
    logging.getLogger("monolith_torch").info("%s: rank %d of %d, config %s", command, rank, world, cfg.to_dict())
    trainer = Trainer(cfg, rank, world, show_progress=sys.stderr.isatty() or os.environ.get("MONOLITH_PROGRESS") == "1")
    try:
        if command == "train":
            metrics = trainer.train()
            if world > 1:
                print(f"rank {rank} state digest {metrics['state_digest']}", flush=True)
            if rank == 0:
                _print_table(metrics)
                logging.getLogger("monolith_torch").info("final metrics: %s", metrics)
            return 0
        trainer.restore_latest(required=True)
        if command == "eval":
            result = trainer.evaluate()
            print(f"eval AUC {result['auc']:.4f}  log-loss {result['log_loss']:.4f}  examples {result['examples']}")
            return 0
        output = cfg.output or os.path.join(cfg.run_dir, "predictions.tsv")
        rows = trainer.predict(expand_paths(cfg.data), output)
        print(f"wrote {rows} scores to {output}")
        return 0
    except StopRequested as stop:
        return stop.exit_code
    except TrainingDiverged as e:
        _error(command, e)
        return EXIT_DIVERGED


def _error(command: str, message: object) -> None:
    print(f"monolith-torch {command}: error: {printable(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data_args = ("dataset", "out", "wheel_dir", "stream_files", "stream_rows_per_file", "stream_drift", "stream_seed",
                 "stream_interval", "stream_first")
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", *data_args)}
    # The training loop and data generation install their own handlers and put this one back.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        if args.command == "data":
            return _data(args)
        return _main(args.command, args.config, overrides)
    except KeyboardInterrupt:
        print(f"monolith-torch {args.command}: interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated:
        print(f"monolith-torch {args.command}: terminated by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(command: str, config_file: str | None, overrides: dict) -> int:
    try:
        cfg = _with_saved_model_settings(command, load_config(config_file, overrides))
        _validate(command, cfg)
    except (ConfigError, DataError) as e:
        _error(command, e)
        return EXIT_USAGE
    if int(os.environ.get("RANK", "0")) == 0:
        _print_config(cfg)
    try:
        return _run(command, cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        _error(command, e)
        return EXIT_USAGE
    except OSError as e:
        _error(command, e)
        return EXIT_IO


def _error(command: str, message: object) -> None:
    print(f"monolith-torch {command}: error: {printable(str(message))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
