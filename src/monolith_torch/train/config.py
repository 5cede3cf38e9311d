"""Settings of the ``monolith-torch`` command: one frozen dataclass, from TOML and flags.

Precedence: command-line flag > TOML file (``--config``) > default. Unknown
keys and bad values raise ``ConfigError`` naming the key and the value.

A TOML file holds the settings either at its top level or all in one
``[train]`` table; every key it holds is used or reported: a key beside a
``[train]`` table, any other table, a file that is not UTF-8 or is larger than
``MAX_CONFIG_BYTES`` is an error. Numbers must be finite and in range (a seed
that fits 63 bits, at most ``MAX_THREADS`` threads, a timeout of at most
``MAX_DIST_TIMEOUT_S``), so a bad value fails here, not later with a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields

from monolith_torch.core.fileio import read_limited

__all__ = ["ConfigError", "HELP", "TrainConfig", "load_config", "MAX_CONFIG_BYTES"]

_DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
MAX_CONFIG_BYTES = 1 << 20
MAX_THREADS = 1024
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
_INT64_MAX = (1 << 63) - 1


class ConfigError(ValueError):
    """A bad setting: unknown key, wrong type or out-of-range value."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Paths may be relative to the working directory."""

    run_dir: str = "runs/default"
    data: tuple[str, ...] = ()  # empty: the embedded generated dataset
    eval_data: tuple[str, ...] = ()
    generated_train_rows: int = 500_000
    generated_eval_rows: int = 50_000
    batch_size: int = 2048
    epochs: int = 1
    max_steps: int = 0  # 0: no limit
    emb_dim: int = 16
    seq_len: int = 8
    hidden: tuple[int, ...] = (256, 128)
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-3
    vec_lr: float = 0.05
    bias_lr: float = 0.05
    clip_norm: float = 10.0
    dense_weight_decay: float = 0.0
    checkpoint_every: int = 1000
    summary_every: int = 100
    eval_batch_size: int = 8192
    seed: int = 0
    strict: bool = False
    resume: bool = False
    threads: int = 1  # 0: torch's default; 1 is fastest for these small ops on few cores (docs/PERFORMANCE.md)
    dist_timeout_s: float = 300.0
    sharded_tables: bool = False  # shard embedding rows over the ranks instead of replicating them
    skip_nonfinite: bool = False  # skip (and count) steps with a NaN/inf loss or gradient instead of stopping
    output: str = ""  # predict: where scores go (default: <run_dir>/predictions.tsv)
    model: str = "deepfm"
    fused_embeddings: bool = False
    header: str = "auto"
    delimiter: str = ""
    # Real-time training (docs/REALTIME.md).
    follow: bool = False
    follow_idle_exit: float = 0.0  # 0: follow forever
    follow_poll_s: float = 1.0
    clock: str = "wall"
    export_dir: str = ""
    sync_every: float = 10.0
    dense_sync_every: float = 60.0
    full_every: float = 3600.0
    progressive_window_rows: int = 10_000
    progressive_window_seconds: float = 86_400.0
    init_from: str = ""
    # TOML only: the [[features]] schema (empty: the Criteo preset) and the model's keyword arguments.
    features: tuple = ()
    model_options: dict = field(default_factory=dict)

    def __post_init__(self):
        _positive = ("generated_train_rows", "generated_eval_rows", "batch_size", "epochs", "emb_dim",
                     "seq_len", "checkpoint_every", "summary_every", "eval_batch_size", "progressive_window_rows")
        for name in _positive:
            _check_int(name, getattr(self, name), 1, _INT64_MAX)
        _check_int("max_steps", self.max_steps, 0, _INT64_MAX)
        _check_int("seed", self.seed, 0, _INT64_MAX)
        _check_int("threads", self.threads, 0, MAX_THREADS)
        for name in ("dense_lr", "vec_lr", "bias_lr", "clip_norm", "dist_timeout_s"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ConfigError(f"Invalid {name}: {value!r} (expected a finite number > 0)")
        if self.dist_timeout_s > MAX_DIST_TIMEOUT_S:
            raise ConfigError(f"Invalid dist_timeout_s: {self.dist_timeout_s!r} "
                              f"(expected at most {MAX_DIST_TIMEOUT_S:.0f} seconds)")
        for name in ("follow_idle_exit", "sync_every", "dense_sync_every", "full_every"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < math.inf:
                raise ConfigError(f"Invalid {name}: {value!r} (expected a finite number of seconds >= 0)")
        for name in ("follow_poll_s", "progressive_window_seconds"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ConfigError(f"Invalid {name}: {value!r} (expected a finite number of seconds > 0)")
        if self.progressive_window_seconds < 1:
            raise ConfigError(f"Invalid progressive_window_seconds: {self.progressive_window_seconds!r} "
                              "(expected at least 1 second)")
        if self.clock not in ("wall", "data"):
            raise ConfigError(f"Invalid clock: {self.clock!r} (expected wall or data)")
        if not _is_number(self.dense_weight_decay) or not 0 <= self.dense_weight_decay < math.inf:
            raise ConfigError(f"Invalid dense_weight_decay: {self.dense_weight_decay!r} (expected a finite number >= 0)")
        if self.dense_optimizer not in _DENSE_OPTIMIZERS:
            raise ConfigError(f"Invalid dense_optimizer: {self.dense_optimizer!r} (expected one of {_DENSE_OPTIMIZERS})")
        if not self.hidden or any(not _is_int(h) or not 1 <= h <= _INT64_MAX for h in self.hidden):
            raise ConfigError(f"Invalid hidden: {self.hidden!r} (expected positive integers, e.g. [256, 128])")
        if not self.run_dir:
            raise ConfigError("Invalid run_dir: '' (expected a directory path)")
        if self.header not in ("auto", "yes", "no"):
            raise ConfigError(f"Invalid header: {self.header!r} (expected auto, yes or no)")
        if len(self.delimiter) > 1 or self.delimiter in ("\r", "\n", '"'):
            raise ConfigError(f"Invalid delimiter: {self.delimiter!r} (expected one character, or empty for auto)")
        if not self.model:
            raise ConfigError("Invalid model: '' (expected deepfm, dcn_v2, dlrm, wide_deep or 'module:Class')")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# One line per setting, for ``--help`` and the docs.
HELP = {
    "run_dir": "where checkpoints, logs, TensorBoard events and metrics go",
    "data": "training files (TSV/CSV, gzip, Parquet): a file, directory or glob; repeatable",
    "eval_data": "held-out files scored after training (and by eval); repeatable",
    "generated_train_rows": "rows of the embedded Criteo-format dataset to generate (when no --data)",
    "generated_eval_rows": "held-out rows of the embedded dataset to generate",
    "batch_size": "examples per training step (per process)",
    "epochs": "passes over the training files",
    "max_steps": "stop after this many steps (0: no limit)",
    "emb_dim": "vector width D of each id feature (the Criteo preset)",
    "seq_len": "ids read from the sequence feature with FirstN (the Criteo preset)",
    "hidden": "widths of the model's top MLP, comma-separated",
    "dense_optimizer": "optimizer of the dense parameters: adam, adagrad or sgd",
    "dense_lr": "learning rate of the dense optimizer (applies on --resume too)",
    "vec_lr": "Adagrad learning rate of the vector slices (the Criteo preset; accumulator starts at 1.0)",
    "bias_lr": "FTRL learning rate of the bias slices (the Criteo preset; accumulator 1e-6, beta 1.0)",
    "clip_norm": "ClipByGlobalNorm bound over dense and embedding gradients",
    "dense_weight_decay": "decay added to dense gradients after clipping and averaging",
    "checkpoint_every": "steps between checkpoints (one is also written at the end)",
    "summary_every": "steps between TensorBoard scalars and gradient summaries",
    "eval_batch_size": "examples per evaluation and prediction batch",
    "seed": "seeds the dense initialization and every table's per-id initializer",
    "strict": "stop at the first malformed data line (file and line named) instead of skipping it",
    "resume": "continue from the run directory's newest intact checkpoint",
    "threads": "torch threads per process (0: torch's default)",
    "dist_timeout_s": "seconds a collective may wait for the other processes",
    "sharded_tables": "shard embedding rows over the processes instead of replicating them",
    "skip_nonfinite": "skip and count steps with a NaN/inf loss or gradient instead of stopping",
    "output": "predict: where scores go (default <run_dir>/predictions.tsv)",
    "model": "deepfm, dcn_v2, dlrm, wide_deep, or 'package.module:Class' for your own",
    "fused_embeddings": "train the embeddings on the fused CPU path (one process, CPU tables)",
    "header": "text files: yes, no, or auto (a header when the first line names the columns)",
    "delimiter": "text files: the field separator (empty: comma for .csv, else tab)",
    "follow": "keep training on the files that arrive in --data (a folder or glob), each once, in name order",
    "follow_idle_exit": "with --follow: stop after this many seconds without a new file (0: never)",
    "follow_poll_s": "with --follow: seconds between re-listings of the data folders",
    "clock": "time for expiry and export intervals: wall, or data (the schema's timestamp column)",
    "export_dir": "publish full snapshots and deltas of the model here, for monolith-torch serve",
    "sync_every": "seconds (of the clock) between deltas of the changed embedding rows",
    "dense_sync_every": "seconds (of the clock) between publications of the dense parameters",
    "full_every": "seconds (of the clock) between full snapshots; older publications are then removed",
    "progressive_window_rows": "rows per progressive-validation window (progressive.csv)",
    "progressive_window_seconds": "data seconds per progressive-validation time window (schemas with a timestamp)",
    "init_from": "start a new run from this checkpoint file (tables, model, optimizer), e.g. a batch model",
    "features": "TOML only: the [[features]] schema of your data (empty: the Criteo preset)",
    "model_options": "TOML only: keyword arguments of the model, e.g. [model_options] cross_layers = 2",
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        expected = f"an integer >= {low}" if high == _INT64_MAX else f"an integer in [{low}, {high}]"
        raise ConfigError(f"Invalid {name}: {value!r} (expected {expected})")


def _coerce(name: str, value, default):
    """Converts a TOML or flag value to the type of the field's default."""
    if name == "features":
        if not isinstance(value, list | tuple) or not all(isinstance(x, dict) for x in value):
            raise ConfigError(f"Invalid features: {value!r} (expected a [[features]] list of tables)")
        return tuple(value)
    if name == "model_options":
        if not isinstance(value, dict):
            raise ConfigError(f"Invalid model_options: {value!r} (expected a [model_options] table)")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"Invalid {name}: {value!r} (expected true or false)")
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"Invalid {name}: {value!r} (expected a list)")
        if name == "hidden":
            try:
                if any(isinstance(x, bool | float) for x in items):
                    raise ValueError
                return tuple(int(x) for x in items)
            except (TypeError, ValueError):
                raise ConfigError(f"Invalid {name}: {value!r} (expected integers, e.g. 256,128)") from None
        return tuple(str(x) for x in items if str(x))
    if isinstance(default, int):
        try:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Invalid {name}: {value!r} (expected an integer)") from None
    if isinstance(default, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Invalid {name}: {value!r} (expected a number)") from None
    if not isinstance(value, str):
        raise ConfigError(f"Invalid {name}: {value!r} (expected a string)")
    return value


def load_config(config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Builds a ``TrainConfig`` from an optional TOML file and flag overrides.

    Raises:
        ConfigError: unreadable file, unknown key, bad value.
    """
    defaults = TrainConfig()
    known = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    values: dict = {}
    if config_file:
        for key, value in _read_toml(config_file).items():
            if key not in known:
                raise ConfigError(f"unknown config key {key!r} in {config_file!r}; known keys: {', '.join(known)}")
            values[key] = _coerce(key, value, known[key])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}")
        values[key] = _coerce(key, value, known[key])
    try:
        return dataclasses.replace(defaults, **values)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def _read_toml(config_file: str) -> dict:
    """The settings table of a TOML file: its top level, or its ``[train]`` table when it has one."""
    try:
        text = read_limited(config_file, MAX_CONFIG_BYTES).decode("utf-8")
        raw = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {config_file!r} ({e.strerror or e})") from None
    except ValueError as e:  # too large, not UTF-8, not TOML
        if isinstance(e, UnicodeDecodeError):
            reason = f"not UTF-8 text (byte {e.start})"
        elif isinstance(e, tomllib.TOMLDecodeError):
            reason = f"not valid TOML: {e}"
        else:
            reason = f"larger than {MAX_CONFIG_BYTES} bytes"
        raise ConfigError(f"--config: {config_file!r} is {reason}") from None
    if not isinstance(raw.get("train"), dict):
        return raw
    beside = [key for key in raw if key != "train"]
    if beside:
        raise ConfigError(f"config key {beside[0]!r} in {config_file!r} is outside its [train] table; "
                          "put every setting in [train], or use no [train] table")
    return raw["train"]
