"""Settings of the ``monolith-torch`` command: one frozen dataclass, from TOML and flags.

Precedence: command-line flag > TOML file (``--config``) > default. Unknown
keys and bad values raise ``ConfigError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields

__all__ = ["ConfigError", "TrainConfig", "load_config"]

_DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")


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
    output: str = ""  # predict: where scores go (default: <run_dir>/predictions.tsv)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _positive = ("generated_train_rows", "generated_eval_rows", "batch_size", "epochs", "emb_dim",
                     "seq_len", "checkpoint_every", "summary_every", "eval_batch_size")
        for name in _positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
        for name in ("max_steps", "threads", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"Invalid {name}: {value!r} (expected an integer >= 0)")
        for name in ("dense_lr", "vec_lr", "bias_lr", "clip_norm", "dist_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"Invalid {name}: {value!r} (expected a number > 0)")
        if not isinstance(self.dense_weight_decay, int | float) or self.dense_weight_decay < 0:
            raise ConfigError(f"Invalid dense_weight_decay: {self.dense_weight_decay!r} (expected a number >= 0)")
        if self.dense_optimizer not in _DENSE_OPTIMIZERS:
            raise ConfigError(f"Invalid dense_optimizer: {self.dense_optimizer!r} (expected one of {_DENSE_OPTIMIZERS})")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"Invalid hidden: {self.hidden!r} (expected positive integers, e.g. [256, 128])")
        if not self.run_dir:
            raise ConfigError("Invalid run_dir: '' (expected a directory path)")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


def _coerce(name: str, value, default):
    """Converts a TOML or flag value to the type of the field's default."""
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
                return tuple(int(x) for x in items)
            except (TypeError, ValueError):
                raise ConfigError(f"Invalid {name}: {value!r} (expected integers, e.g. 256,128)") from None
        return tuple(str(x) for x in items if str(x))
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Invalid {name}: {value!r} (expected an integer)") from None
    if isinstance(default, float):
        try:
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
    known = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig) if f.name != "extra"}
    values: dict = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"--config: cannot read {config_file!r} ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {config_file!r} is not valid TOML ({e})") from None
        raw = raw.get("train", raw) if isinstance(raw.get("train"), dict) else raw
        for key, value in raw.items():
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
