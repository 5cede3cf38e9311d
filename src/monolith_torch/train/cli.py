"""``monolith-torch``: train, evaluate and score a CTR model with Monolith's machinery.

    monolith-torch train [--config run.toml] [--data 'day_*.tsv.gz'] [--flag value ...]
    monolith-torch eval --run-dir runs/default [--eval-data held_out.tsv]
    monolith-torch predict --run-dir runs/default --data new.tsv --output scores.tsv
    torchrun --nproc_per_node 2 -m monolith_torch train ...

Bad settings, a missing data path or an unwritable run directory print one
``error:`` line and exit with code 2 before anything is written. SIGINT and
SIGTERM save a checkpoint and exit with 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from monolith_torch.train.config import ConfigError, TrainConfig, load_config
from monolith_torch.train.data import DataError, expand_paths

__all__ = ["main"]

EXIT_USAGE = 2


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {f.default})")
        elif f.name in ("data", "eval_data"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="PATH_OR_GLOB",
                                help="a file, directory or glob; repeatable (default: the embedded dataset)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"(default {f.default!r})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monolith-torch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train a model (resume with --resume)"),
        ("eval", "AUC and log-loss of the latest checkpoint on held-out data"),
        ("predict", "write scores of the latest checkpoint for --data to --output"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="a TOML file of settings (flags override it)")
        _add_setting_flags(p)
    return parser


def _print_config(cfg: TrainConfig) -> None:
    print("effective config:")
    for key, value in cfg.to_dict().items():
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
    print(f"data: {metrics['data_summary']}")
    if metrics.get("checkpoint"):
        print(f"checkpoint: {metrics['checkpoint']}")


def _validate(command: str, cfg: TrainConfig) -> None:
    """Checks everything that can be checked before a single file is written."""
    from monolith_torch.train.trainer import check_run_dir

    check_run_dir(cfg.run_dir)
    if cfg.data:
        expand_paths(cfg.data)
    if cfg.eval_data:
        expand_paths(cfg.eval_data)
    if command == "predict" and not cfg.data:
        raise ConfigError("predict needs --data (the rows to score)")
    if command == "eval" and cfg.data and not cfg.eval_data:
        raise ConfigError("eval needs --eval-data when --data names your own training files")
    if command in ("eval", "predict") and not os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")):
        raise ConfigError(f"no checkpoints in run_dir {cfg.run_dir!r}; train first")


def _setup_logging(cfg: TrainConfig, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(cfg.run_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", handlers=handlers, force=True)


def _run(command: str, cfg: TrainConfig) -> int:
    from monolith_torch.train.trainer import StopRequested, Trainer, init_distributed

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        cfg = load_config(args.config, overrides)
        _validate(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"monolith-torch {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if int(os.environ.get("RANK", "0")) == 0:
        _print_config(cfg)
    try:
        return _run(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"monolith-torch {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
