"""The input schema: which columns a run reads, what each one is, and the table behind each id feature.

A run config describes its input with a ``[[features]]`` list in TOML, one
entry per feature (``load_schema`` turns it into a frozen ``Schema``)::

    [[features]]
    name = "label"
    kind = "label"                # 0/1; exactly one per schema

    [[features]]
    name = "age"
    kind = "dense"                # one float per row
    dtype = "float"               # or "int": a non-integer is then malformed
    transform = "standardize"     # "none" (default), "log1p" (of max(x, 0)), "standardize"
    mean = 33.5                   # standardize: (x - mean) / std
    std = 11.2
    fill = 0.0                    # the value of an empty/null field, before the transform

    [[features]]
    name = "user"
    kind = "categorical"          # one id per row
    column = "user_id"            # the source column (default: the name)
    dtype = "string"              # "string" (hashed, see below), "int", or "hex"
    slot = 1                      # the table; features with one slot share it
    dim = 16                      # the vector slice's width D
    bias = true                   # a 1-wide bias slice before the vector (the wide part)
    vec_optimizer = { type = "adagrad", learning_rate = 0.5, initial_accumulator_value = 1.0 }
    bias_optimizer = { type = "ftrl", learning_rate = 0.05, initial_accumulator_value = 1e-6, beta = 1.0 }
    vec_initializer = { type = "random_uniform", minval = -0.05, maxval = 0.05 }
    bias_initializer = { type = "zeros" }
    occurrence_threshold = 0      # an id gets a row only after this many sightings
    expire_time = 36500           # days without a sighting before a row is dropped
    buckets = 0                   # > 0: fold ids into this many hashed buckets (a collision baseline)

    [[features]]
    name = "genres"
    kind = "multi"                # several ids in one field, pooled
    separator = "|"               # text fields; Arrow list columns need none
    combiner = "mean"             # "sum" (default, Monolith's ReduceSum) or "mean"

    [[features]]
    name = "history"
    kind = "sequence"             # ordered ids, read with FirstN(max_seq_length), masked with gen_seq_mask
    columns = ["h1", "h2", "h3"]  # one id from each column, in order (or: column + separator)
    max_seq_length = 8

    [[features]]
    name = "ts"
    kind = "timestamp"            # an integer per row, handed to the run, not embedded

Table options (``slot`` .. ``expire_time``) belong to the slot: features that
share a slot may each state them, and must then agree; unstated ones take the
defaults. Slots without a number are numbered 1, 2, ... in order, skipping
the numbers given explicitly.

Defaults, stated once (``DEFAULT_*`` below): the vector slice uses Adagrad
with learning rate 0.05 and initial accumulator 1.0 over
``RandomUniform(-0.05, 0.05)``; the bias slice FTRL with learning rate 0.05,
initial accumulator 1e-6 and beta 1.0 over zeros; D is 16. An optimizer table
that names a type fills its unset fields from that type's defaults in
``OPTIMIZER_DEFAULTS`` (Adagrad: lr 0.05, accumulator 1.0; FTRL: lr 0.05,
accumulator 1e-6, beta 1.0; SGD, momentum, RMSProp: lr 0.05; Adam: lr 0.001,
Monolith's beta2 0.99 and epsilon 0.01), never from another type's.

String ids are hashed with ``monolith_torch.hash_string_ids`` (XXH64 of the
UTF-8 bytes, seed 0, as int64; defined in ``core/hashing.py``); ``int`` ids
are the integers themselves and ``hex`` ids are hexadecimal text of up to 16
digits (Criteo).

``criteo_schema`` is the built-in preset of the default run: today's
Criteo layout, feature for feature.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from monolith_torch.embedding import entry
from monolith_torch.embedding.combiners import FirstN, ReduceMean, ReduceSum
from monolith_torch.embedding.feature import DEFAULT_EXPIRE_TIME, FeatureSlotConfig
from monolith_torch.embedding.module import EmbeddingFeatureConfig, EmbeddingTableConfig
from monolith_torch.train.config import ConfigError

__all__ = [
    "KINDS",
    "EMBEDDED_KINDS",
    "DEFAULT_DIM",
    "DEFAULT_VEC_OPTIMIZER",
    "DEFAULT_BIAS_OPTIMIZER",
    "DEFAULT_VEC_INITIALIZER",
    "DEFAULT_BIAS_INITIALIZER",
    "OPTIMIZER_DEFAULTS",
    "FeatureSpec",
    "TableSpec",
    "Schema",
    "load_schema",
    "criteo_schema",
    "schema_to_toml",
]

KINDS = ("label", "dense", "categorical", "multi", "sequence", "timestamp")
EMBEDDED_KINDS = ("categorical", "multi", "sequence")
_ID_DTYPES = ("string", "int", "hex")
_DENSE_DTYPES = ("float", "int")
_TRANSFORMS = ("none", "log1p", "standardize")
_COMBINERS = ("sum", "mean")
_INT64_MAX = (1 << 63) - 1

DEFAULT_DIM = 16
DEFAULT_SEQ_LENGTH = 8
DEFAULT_SEPARATOR = ","
DEFAULT_VEC_OPTIMIZER = entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0)
DEFAULT_BIAS_OPTIMIZER = entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=1e-6, beta=1.0)
DEFAULT_VEC_INITIALIZER = entry.RandomUniformInitializer(-0.05, 0.05)
DEFAULT_BIAS_INITIALIZER = entry.ZerosInitializer()

_OPTIMIZER_TYPES: dict[str, type] = {
    "sgd": entry.SgdOptimizer,
    "adagrad": entry.AdagradOptimizer,
    "ftrl": entry.FtrlOptimizer,
    "adam": entry.AdamOptimizer,
    "momentum": entry.MomentumOptimizer,
    "rmsprop": entry.RmspropOptimizer,
}
# Unset fields of an optimizer table, per type (see the module docstring).
OPTIMIZER_DEFAULTS: dict[str, dict] = {
    "sgd": {"learning_rate": 0.05},
    "adagrad": {"learning_rate": 0.05, "initial_accumulator_value": 1.0},
    "ftrl": {"learning_rate": 0.05, "initial_accumulator_value": 1e-6, "beta": 1.0},
    "adam": {"learning_rate": 0.001},
    "momentum": {"learning_rate": 0.05},
    "rmsprop": {"learning_rate": 0.05},
}
_INITIALIZER_TYPES: dict[str, type] = {
    "zeros": entry.ZerosInitializer,
    "constant": entry.ConstantsInitializer,
    "random_uniform": entry.RandomUniformInitializer,
}

_COMMON_KEYS = ("name", "kind", "column")
_TABLE_KEYS = ("slot", "dim", "bias", "vec_optimizer", "bias_optimizer", "vec_initializer", "bias_initializer",
               "occurrence_threshold", "expire_time")
_KIND_KEYS = {
    "label": (),
    "timestamp": (),
    "dense": ("dtype", "transform", "mean", "std", "fill"),
    "categorical": ("dtype", "buckets", *_TABLE_KEYS),
    "multi": ("dtype", "buckets", "separator", "combiner", *_TABLE_KEYS),
    "sequence": ("dtype", "buckets", "separator", "columns", "max_seq_length", *_TABLE_KEYS),
}


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature. ``columns``: its source column(s); ``slot``: its table (embedded kinds only)."""

    name: str
    kind: str
    columns: tuple[str, ...]
    dtype: str = "float"
    separator: str | None = None
    combiner: str = "sum"
    max_seq_length: int = 0
    transform: str = "none"
    mean: float = 0.0
    std: float = 1.0
    fill: float = 0.0
    slot: int | None = None
    buckets: int = 0

    @property
    def embedded(self) -> bool:
        return self.kind in EMBEDDED_KINDS


@dataclass(frozen=True)
class TableSpec:
    """The table behind one slot: a bias slice (when ``bias``) then one vector slice of ``dim``."""

    slot: int
    name: str
    dim: int = DEFAULT_DIM
    bias: bool = True
    vec_optimizer: entry.Optimizer = DEFAULT_VEC_OPTIMIZER
    bias_optimizer: entry.Optimizer = DEFAULT_BIAS_OPTIMIZER
    vec_initializer: entry.Initializer = DEFAULT_VEC_INITIALIZER
    bias_initializer: entry.Initializer = DEFAULT_BIAS_INITIALIZER
    occurrence_threshold: int = 0
    expire_time: int | float = DEFAULT_EXPIRE_TIME


@dataclass(frozen=True)
class Schema:
    """A validated list of features, and the tables of the embedded ones (by slot).

    ``columns`` are the source columns in the order of a file without a header
    (by default every column the features read, in the order first named).
    """

    features: tuple[FeatureSpec, ...]
    tables: tuple[TableSpec, ...]
    columns: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> FeatureSpec:
        """The feature called ``name``; ``KeyError`` when there is none."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def label(self) -> FeatureSpec:
        return next(f for f in self.features if f.kind == "label")

    @property
    def timestamp(self) -> FeatureSpec | None:
        return next((f for f in self.features if f.kind == "timestamp"), None)

    @property
    def dense(self) -> tuple[FeatureSpec, ...]:
        """Dense features, in the order of the columns of ``Batch.dense``."""
        return tuple(f for f in self.features if f.kind == "dense")

    @property
    def embedded(self) -> tuple[FeatureSpec, ...]:
        """Categorical, multi and sequence features, in declaration order."""
        return tuple(f for f in self.features if f.embedded)

    def table(self, slot: int) -> TableSpec:
        return next(t for t in self.tables if t.slot == slot)

    def table_of(self, feature: str) -> TableSpec:
        return self.table(self[feature].slot)

    def with_buckets(self, buckets: int) -> Schema:
        """A copy whose id features fold their ids into ``buckets`` hashed buckets (0: collisionless)."""
        _check_int("buckets", buckets, 0, _INT64_MAX)
        feats = tuple(dataclasses.replace(f, buckets=buckets) if f.embedded else f for f in self.features)
        return dataclasses.replace(self, features=feats)

    def slot_configs(self) -> dict[str, FeatureSlotConfig]:
        """Monolith's ``FeatureSlotConfig`` of every table, keyed by table name (the slot's first feature)."""
        return {
            t.name: FeatureSlotConfig(
                name=t.name, slot_id=t.slot, has_bias=t.bias, bias_optimizer=t.bias_optimizer,
                bias_initializer=t.bias_initializer, default_vec_optimizer=t.vec_optimizer,
                default_vec_initializer=t.vec_initializer, occurrence_threshold=t.occurrence_threshold,
                expire_time=t.expire_time,
            )
            for t in self.tables
        }

    def embedding_configs(self) -> tuple[list[EmbeddingTableConfig], list[EmbeddingFeatureConfig]]:
        """The ``HashEmbeddingBagCollection`` configs: one table per slot (by slot id), one feature per id feature.

        A table is named after the first feature of its slot and holds a bias
        slice (when ``bias``) then one vector slice of ``dim``. Categorical
        features read with ``ReduceSum``, multi with ``ReduceSum`` or
        ``ReduceMean`` (their ``combiner``), sequences with
        ``FirstN(max_seq_length)``.
        """
        slots = self.slot_configs()
        tables = [EmbeddingTableConfig(slot=slots[t.name], vec_dims=(t.dim,)) for t in self.tables]
        features = []
        for f in self.embedded:
            if f.kind == "sequence":
                combiner = FirstN(f.max_seq_length)
            else:
                combiner = ReduceMean() if f.combiner == "mean" else ReduceSum()
            features.append(EmbeddingFeatureConfig(name=f.name, table=self.table(f.slot).name, combiner=combiner))
        return tables, features

    def to_features(self) -> list[dict]:
        """The ``[[features]]`` list that ``load_schema`` turns back into this schema."""
        out, seen_slots = [], set()
        for f in self.features:
            d: dict = {"name": f.name, "kind": f.kind}
            if f.kind == "sequence" and len(f.columns) > 1:
                d["columns"] = list(f.columns)
            elif f.columns != (f.name,):
                d["column"] = f.columns[0]
            if f.kind == "dense":
                d.update(dtype=f.dtype, transform=f.transform, fill=f.fill)
                if f.transform == "standardize":
                    d.update(mean=f.mean, std=f.std)
            if f.embedded:
                d["dtype"] = f.dtype
                if f.buckets:
                    d["buckets"] = f.buckets
                if f.kind == "multi" or (f.kind == "sequence" and len(f.columns) == 1):
                    d["separator"] = f.separator
                if f.kind == "multi":
                    d["combiner"] = f.combiner
                if f.kind == "sequence":
                    d["max_seq_length"] = f.max_seq_length
                d["slot"] = f.slot
                if f.slot not in seen_slots:
                    seen_slots.add(f.slot)
                    d.update(_table_to_dict(self.table(f.slot)))
            out.append(d)
        return out


# ---------------------------------------------------------------- validation


def _where(i: int, key: str) -> str:
    return f"features[{i}].{key}"


def _bad(i: int, key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"Invalid {_where(i, key)}: {value!r} (expected {expected})")


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"Invalid {name}: {value!r} (expected an integer in [{low}, {high}])")
    return value


def _int(i: int, key: str, value, low: int, high: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        expected = f"an integer >= {low}" if high == _INT64_MAX else f"an integer in [{low}, {high}]"
        raise _bad(i, key, value, expected)
    return value


def _float(i: int, key: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(i, key, value, "a finite number")
    if positive and not value > 0:
        raise _bad(i, key, value, "a finite number > 0")
    return float(value)


def _choice(i: int, key: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _bad(i, key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _name(i: int, key: str, value) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise _bad(i, key, value, "a non-empty string without surrounding spaces")
    return value


def _typed_config(i: int, key: str, value, types: Mapping[str, type], defaults: Mapping[str, dict]):
    """An ``entry`` optimizer/initializer from ``{type = "...", field = value, ...}``."""
    if not isinstance(value, Mapping):
        raise _bad(i, key, value, 'a table such as { type = "' + next(iter(types)) + '", ... }')
    kind = value.get("type")
    if kind not in types:
        raise _bad(i, f"{key}.type", kind, "one of " + ", ".join(repr(t) for t in types))
    cls = types[kind]
    known = {f.name: f for f in fields(cls)}
    args = dict(defaults.get(kind, {}))
    for name, v in value.items():
        if name == "type":
            continue
        if name not in known:
            raise ConfigError(f"Invalid {_where(i, key)}: unknown key {name!r} for type {kind!r}; "
                              f"known keys: {', '.join(known)}")
        default = known[name].default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise _bad(i, f"{key}.{name}", v, "true or false")
        elif isinstance(default, int):
            _int(i, f"{key}.{name}", v, 0)
        else:
            _float(i, f"{key}.{name}", v)
        args[name] = v
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid {_where(i, key)}: {dict(value)!r} ({err})") from None


def _table_options(i: int, raw: Mapping) -> dict:
    """The table keys a feature states, validated (slot excluded)."""
    opts: dict = {}
    if "dim" in raw:
        opts["dim"] = _int(i, "dim", raw["dim"], 1, 1 << 16)
    if "bias" in raw:
        if not isinstance(raw["bias"], bool):
            raise _bad(i, "bias", raw["bias"], "true or false")
        opts["bias"] = raw["bias"]
    for key in ("vec_optimizer", "bias_optimizer"):
        if key in raw:
            opts[key] = _typed_config(i, key, raw[key], _OPTIMIZER_TYPES, OPTIMIZER_DEFAULTS)
    for key in ("vec_initializer", "bias_initializer"):
        if key in raw:
            opts[key] = _typed_config(i, key, raw[key], _INITIALIZER_TYPES, {})
    if "occurrence_threshold" in raw:
        opts["occurrence_threshold"] = _int(i, "occurrence_threshold", raw["occurrence_threshold"], 0)
    if "expire_time" in raw:
        value = raw["expire_time"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise _bad(i, "expire_time", value, "a number of days > 0")
        opts["expire_time"] = value
    return opts


def _columns(i: int, raw: Mapping, kind: str, name: str) -> tuple[str, ...]:
    if "columns" in raw:
        if "column" in raw:
            raise ConfigError(f"Invalid {_where(i, 'columns')}: give column or columns, not both")
        cols = raw["columns"]
        if not isinstance(cols, list) or not cols:
            raise _bad(i, "columns", cols, "a non-empty list of column names")
        out = tuple(_name(i, f"columns[{j}]", c) for j, c in enumerate(cols))
        if len(set(out)) != len(out):
            raise _bad(i, "columns", cols, "distinct column names")
        return out
    return (_name(i, "column", raw.get("column", name)),)


def _feature(i: int, raw) -> tuple[FeatureSpec, dict, bool]:
    """One validated feature, the table options it states, and whether it named its slot."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"Invalid features[{i}]: {raw!r} (expected a table with name and kind)")
    for key in ("name", "kind"):
        if key not in raw:
            raise ConfigError(f"Invalid features[{i}]: no {key!r} key")
    name = _name(i, "name", raw["name"])
    kind = _choice(i, "kind", raw["kind"], KINDS)
    allowed = (*_COMMON_KEYS, *_KIND_KEYS[kind])
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"Invalid {_where(i, key)}: unknown key for a {kind} feature; "
                              f"known keys: {', '.join(allowed)}")
    spec: dict = {"name": name, "kind": kind, "columns": _columns(i, raw, kind, name)}
    if kind == "dense":
        spec["dtype"] = _choice(i, "dtype", raw.get("dtype", "float"), _DENSE_DTYPES)
        spec["transform"] = _choice(i, "transform", raw.get("transform", "none"), _TRANSFORMS)
        spec["fill"] = _float(i, "fill", raw.get("fill", 0.0))
        standardize = spec["transform"] == "standardize"
        for key in ("mean", "std"):
            if standardize and key not in raw:
                raise ConfigError(f"Invalid features[{i}]: transform 'standardize' needs {key!r}")
            if key in raw and not standardize:
                raise ConfigError(f"Invalid {_where(i, key)}: only a 'standardize' transform takes {key!r}")
        if standardize:
            spec["mean"] = _float(i, "mean", raw["mean"])
            spec["std"] = _float(i, "std", raw["std"], positive=True)
    elif kind in EMBEDDED_KINDS:
        spec["dtype"] = _choice(i, "dtype", raw.get("dtype", "string"), _ID_DTYPES)
        spec["buckets"] = _int(i, "buckets", raw.get("buckets", 0), 0)
        if kind == "multi" or (kind == "sequence" and len(spec["columns"]) == 1):
            sep = raw.get("separator", DEFAULT_SEPARATOR)
            if not isinstance(sep, str) or not sep:
                raise _bad(i, "separator", sep, "a non-empty string")
            spec["separator"] = sep
        elif "separator" in raw:
            raise ConfigError(f"Invalid {_where(i, 'separator')}: a sequence of several columns takes no separator")
        if kind == "multi":
            spec["combiner"] = _choice(i, "combiner", raw.get("combiner", "sum"), _COMBINERS)
        if kind == "sequence":
            spec["max_seq_length"] = _int(i, "max_seq_length", raw.get("max_seq_length", DEFAULT_SEQ_LENGTH), 1,
                                          1 << 16)
        if "slot" in raw:
            spec["slot"] = _int(i, "slot", raw["slot"], 1)
    return FeatureSpec(**spec), (_table_options(i, raw) if kind in EMBEDDED_KINDS else {}), "slot" in raw


def load_schema(features, columns: Sequence[str] | None = None) -> Schema:
    """Validates a ``[[features]]`` list (as ``tomllib`` reads it) into a ``Schema``.

    Args:
        features: a list of tables, one per feature (see the module docstring).
        columns: the source columns of a headerless file, in order; default:
            the columns the features read, in the order first named.

    Returns:
        The frozen ``Schema``.

    Raises:
        ConfigError: an unknown key or a bad value, naming ``features[i].key``
            and the value; no label or two; two timestamps; a repeated name;
            features sharing a slot whose table options disagree.
    """
    if not isinstance(features, list | tuple) or not features:
        raise ConfigError(f"Invalid features: {features!r} (expected a non-empty list of [[features]] tables)")
    parsed = [_feature(i, raw) for i, raw in enumerate(features)]
    specs = [p[0] for p in parsed]
    seen: dict[str, int] = {}
    for i, f in enumerate(specs):
        if f.name in seen:
            raise ConfigError(f"Invalid features[{i}].name: {f.name!r} (already the name of features[{seen[f.name]}])")
        seen[f.name] = i
    for kind, low in (("label", 1), ("timestamp", 0)):
        count = sum(f.kind == kind for f in specs)
        if not low <= count <= 1:
            raise ConfigError(f"Invalid features: {count} features of kind {kind!r} (expected "
                              f"{'exactly one' if low else 'at most one'})")
    specs = _number_slots(specs, [p[2] for p in parsed])
    tables = _tables(specs, [p[1] for p in parsed])
    needed = list(dict.fromkeys(c for f in specs for c in f.columns))
    if columns is None:
        columns = needed
    else:
        if (not isinstance(columns, list | tuple) or len(set(columns)) != len(columns)
                or any(not isinstance(c, str) or not c for c in columns)):
            raise ConfigError(f"Invalid columns: {columns!r} (expected distinct column names)")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ConfigError(f"Invalid columns: {columns!r} (lacks {missing}, which features read)")
    return Schema(tuple(specs), tables, tuple(columns))


def _number_slots(specs: list[FeatureSpec], named: list[bool]) -> list[FeatureSpec]:
    taken = {f.slot for f in specs if f.slot is not None}
    next_slot = 1
    out = []
    for f, has_slot in zip(specs, named, strict=True):
        if f.embedded and not has_slot:
            while next_slot in taken:
                next_slot += 1
            f = dataclasses.replace(f, slot=next_slot)
            taken.add(next_slot)
        out.append(f)
    return out


def _tables(specs: list[FeatureSpec], options: list[dict]) -> tuple[TableSpec, ...]:
    """One ``TableSpec`` per slot, merging what its features state; disagreements are errors."""
    merged: dict[int, dict] = {}
    stated_by: dict[tuple[int, str], int] = {}
    for i, (f, opts) in enumerate(zip(specs, options, strict=True)):
        if not f.embedded:
            continue
        table = merged.setdefault(f.slot, {"slot": f.slot, "name": f.name})
        for key, value in opts.items():
            if key in table and table[key] != value:
                j = stated_by[(f.slot, key)]
                raise ConfigError(
                    f"Invalid {_where(i, key)}: {value!r} conflicts with {_where(j, key)} = {table[key]!r} "
                    f"(features sharing slot {f.slot} share one table)"
                )
            table[key] = value
            stated_by[(f.slot, key)] = i
    return tuple(TableSpec(**merged[slot]) for slot in sorted(merged))


# ---------------------------------------------------------------- writing TOML


def _config_to_dict(config, types: Mapping[str, type]) -> dict:
    kind = next(name for name, cls in types.items() if type(config) is cls)
    out = {"type": kind}
    for f in fields(config):
        value = getattr(config, f.name)
        if value is not None and value != f.default:
            out[f.name] = value
    return out


def _table_to_dict(t: TableSpec) -> dict:
    return {
        "dim": t.dim,
        "bias": t.bias,
        "vec_optimizer": _config_to_dict(t.vec_optimizer, _OPTIMIZER_TYPES),
        "bias_optimizer": _config_to_dict(t.bias_optimizer, _OPTIMIZER_TYPES),
        "vec_initializer": _config_to_dict(t.vec_initializer, _INITIALIZER_TYPES),
        "bias_initializer": _config_to_dict(t.bias_initializer, _INITIALIZER_TYPES),
        "occurrence_threshold": t.occurrence_threshold,
        "expire_time": t.expire_time,
    }


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write a non-finite number to TOML: {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with ASCII escapes is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def schema_to_toml(features: Sequence[Mapping]) -> str:
    """A ``[[features]]`` list as TOML text (``Schema.to_features()`` gives one for any schema)."""
    blocks = []
    for feature in features:
        lines = ["[[features]]"] + [f"{key} = {_toml_value(value)}" for key, value in feature.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------- the Criteo preset


def criteo_schema(emb_dim: int = DEFAULT_DIM, seq_len: int = DEFAULT_SEQ_LENGTH, vec_lr: float = 0.05,
                  bias_lr: float = 0.05) -> Schema:
    """The default run's Criteo layout: ``label``, ``I1..I13``, ``C1..C26`` (a headerless TSV line).

    Features: the 0/1 ``label``; ``I1..I13`` dense integers, ``log1p(max(x, 0))``;
    ``C1..C26`` categorical hex ids in slots 1..26; ``seq``, the non-empty ids of
    ``C14..C26`` in order, read with ``FirstN(seq_len)`` (slot 27). Every slot
    has a bias slice (FTRL: ``bias_lr``, initial accumulator 1e-6, beta 1.0,
    zeros) and a vector slice of ``emb_dim`` (Adagrad: ``vec_lr``, initial
    accumulator 1.0, ``RandomUniform(-0.05, 0.05)``): the default run's tables.
    """
    table = {
        "dim": emb_dim,
        "bias": True,
        "vec_optimizer": {"type": "adagrad", "learning_rate": vec_lr, "initial_accumulator_value": 1.0},
        "bias_optimizer": {"type": "ftrl", "learning_rate": bias_lr, "initial_accumulator_value": 1e-6, "beta": 1.0},
        "vec_initializer": {"type": "random_uniform", "minval": -0.05, "maxval": 0.05},
    }
    features: list[dict] = [{"name": "label", "kind": "label"}]
    features += [{"name": f"I{j}", "kind": "dense", "dtype": "int", "transform": "log1p"} for j in range(1, 14)]
    features += [{"name": f"C{j}", "kind": "categorical", "dtype": "hex", "slot": j, **table} for j in range(1, 27)]
    features.append({"name": "seq", "kind": "sequence", "dtype": "hex", "columns": [f"C{j}" for j in range(14, 27)],
                     "max_seq_length": seq_len, "slot": 27, **table})
    return load_schema(features)
