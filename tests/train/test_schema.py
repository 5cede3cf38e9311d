"""The [[features]] schema: validation naming features[i].key, slots and shared tables, the Criteo preset,
TOML round trips, and the string-id hash (XXH64) against an independent scalar implementation."""

from __future__ import annotations

import tomllib

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_torch.core.hashing import fold_ids, hash_string_ids
from monolith_torch.embedding import entry
from monolith_torch.embedding.combiners import FirstN, ReduceMean, ReduceSum
from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.config import ConfigError
from monolith_torch.train.datasets import movielens_features
from monolith_torch.train.schema import (
    DEFAULT_BIAS_OPTIMIZER,
    DEFAULT_VEC_INITIALIZER,
    DEFAULT_VEC_OPTIMIZER,
    criteo_schema,
    load_schema,
    schema_to_toml,
)

LABEL = {"name": "label", "kind": "label"}


def _schema(*features, **kw):
    return load_schema([LABEL, *features], **kw)


# ---------------------------------------------------------------- the Criteo preset


def test_criteo_preset_is_the_default_models_layout():
    s = criteo_schema()
    assert s.columns == ("label", *(f"I{j}" for j in range(1, 14)), *(f"C{j}" for j in range(1, 27)))
    assert [f.name for f in s.dense] == [f"I{j}" for j in range(1, 14)]
    assert all(f.dtype == "int" and f.transform == "log1p" for f in s.dense)
    assert [f.name for f in s.embedded] == [*(f"C{j}" for j in range(1, 27)), "seq"]
    assert [f.slot for f in s.embedded] == list(range(1, 28))
    seq = s["seq"]
    assert seq.kind == "sequence" and seq.columns == tuple(f"C{j}" for j in range(14, 27))
    assert seq.max_seq_length == 8 and seq.dtype == "hex"
    for t in s.tables:
        assert t.dim == 16 and t.bias
        assert t.vec_optimizer == entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0)
        assert t.bias_optimizer == entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=1e-6, beta=1.0)
        assert t.vec_initializer == entry.RandomUniformInitializer(-0.05, 0.05)
        assert t.bias_initializer == entry.ZerosInitializer()
    assert [t.name for t in s.tables] == [*(f"C{j}" for j in range(1, 27)), "seq"]


def test_criteo_preset_takes_the_run_settings():
    s = criteo_schema(emb_dim=4, seq_len=3, vec_lr=0.1, bias_lr=0.2)
    assert {t.dim for t in s.tables} == {4}
    assert s["seq"].max_seq_length == 3
    assert {t.vec_optimizer.learning_rate for t in s.tables} == {0.1}
    assert {t.bias_optimizer.learning_rate for t in s.tables} == {0.2}


def test_embedding_configs_build_the_module():
    s = _schema(
        {"name": "user", "kind": "categorical", "dim": 4, "slot": 1},
        {"name": "tags", "kind": "multi", "combiner": "mean", "dim": 3, "bias": False},
        {"name": "hist", "kind": "sequence", "column": "h", "max_seq_length": 5, "slot": 1},
    )
    tables, features = s.embedding_configs()
    assert [(t.name, t.vec_dims, t.slot.has_bias, t.slot.slot_id) for t in tables] == [
        ("user", (4,), True, 1), ("tags", (3,), False, 2)]
    combiners = {f.name: f.combiner for f in features}
    assert isinstance(combiners["user"], ReduceSum) and isinstance(combiners["tags"], ReduceMean)
    assert isinstance(combiners["hist"], FirstN) and combiners["hist"].max_seq_length == 5
    assert {f.name: f.table for f in features} == {"user": "user", "tags": "tags", "hist": "user"}
    module = HashEmbeddingBagCollection(tables, features)
    assert module.slice_ranges("hist") == [(0, 1), (1, 5)]
    assert module.slice_ranges("tags") == [(0, 3)]


# ---------------------------------------------------------------- defaults, slots, round trips


def test_defaults_are_the_documented_ones():
    s = _schema({"name": "x", "kind": "categorical"}, {"name": "d", "kind": "dense"})
    t = s.table_of("x")
    assert (t.dim, t.bias, t.occurrence_threshold, t.expire_time) == (16, True, 0, 36500)
    assert t.vec_optimizer == DEFAULT_VEC_OPTIMIZER == entry.AdagradOptimizer(0.05, 1.0)
    assert t.bias_optimizer == DEFAULT_BIAS_OPTIMIZER == entry.FtrlOptimizer(0.05, 1e-6, 1.0)
    assert t.vec_initializer == DEFAULT_VEC_INITIALIZER
    x, d = s["x"], s["d"]
    assert (x.columns, x.dtype, x.buckets) == (("x",), "string", 0)
    assert (d.dtype, d.transform, d.fill) == ("float", "none", 0.0)


@pytest.mark.parametrize("table, expected", [
    ({"type": "adagrad", "learning_rate": 0.5}, entry.AdagradOptimizer(0.5, 1.0)),
    ({"type": "ftrl"}, entry.FtrlOptimizer(0.05, 1e-6, 1.0)),
    ({"type": "ftrl", "beta": 0.5, "l2_regularization": 0.1},
     entry.FtrlOptimizer(0.05, 1e-6, 0.5, l2_regularization=0.1)),
    ({"type": "sgd"}, entry.SgdOptimizer(0.05)),
    ({"type": "adam", "beta2": 0.999}, entry.AdamOptimizer(0.001, beta2=0.999)),
])
def test_optimizer_tables_fill_unset_fields_from_their_types_defaults(table, expected):
    s = _schema({"name": "x", "kind": "categorical", "vec_optimizer": table})
    assert s.table_of("x").vec_optimizer == expected


def test_slots_are_numbered_around_explicit_ones_and_shared_tables_merge():
    s = _schema(
        {"name": "a", "kind": "categorical"},
        {"name": "b", "kind": "categorical", "slot": 1, "dim": 8},
        {"name": "c", "kind": "categorical"},
        {"name": "d", "kind": "multi", "slot": 1},
    )
    assert [s[n].slot for n in "abcd"] == [2, 1, 3, 1]
    assert [(t.slot, t.name, t.dim) for t in s.tables] == [(1, "b", 8), (2, "a", 16), (3, "c", 16)]


@pytest.mark.parametrize("features", [
    criteo_schema().to_features(),
    movielens_features(),
    [LABEL, {"name": "ts", "kind": "timestamp", "column": "time"},
     {"name": "age", "kind": "dense", "transform": "standardize", "mean": 30.0, "std": 12.5, "fill": -1.0},
     {"name": "q", "kind": "sequence", "column": "qs", "separator": " ", "max_seq_length": 3, "buckets": 100,
      "vec_initializer": {"type": "constant", "constant": 0.5}, "occurrence_threshold": 2, "expire_time": 7},
     {"name": "tags", "kind": "multi", "dtype": "hex", "combiner": "mean", "slot": 1, "dim": 16,
      "vec_optimizer": {"type": "momentum", "learning_rate": 0.1, "use_nesterov": True}}],
])
def test_schema_round_trips_through_toml(features):
    s = load_schema(features)
    text = schema_to_toml(s.to_features())
    again = load_schema(tomllib.loads(text)["features"])
    assert again == s
    assert schema_to_toml(again.to_features()) == text


def test_with_buckets_folds_every_id_feature():
    s = criteo_schema().with_buckets(1000)
    assert {f.buckets for f in s.embedded} == {1000}
    assert criteo_schema().with_buckets(0) == criteo_schema()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("feature, where, shown", [
    ({"name": "x", "kind": "categorical", "dimm": 4}, "features[1].dimm", "known keys"),
    ({"name": "x", "kind": "dense", "slot": 2}, "features[1].slot", "unknown key for a dense feature"),
    ({"name": "x", "kind": "embedding"}, "features[1].kind", "'embedding'"),
    ({"name": "x", "kind": "categorical", "dim": 0}, "features[1].dim", "0"),
    ({"name": "x", "kind": "categorical", "dim": True}, "features[1].dim", "True"),
    ({"name": "x", "kind": "categorical", "dtype": "float"}, "features[1].dtype", "'float'"),
    ({"name": "x", "kind": "dense", "dtype": "hex"}, "features[1].dtype", "'hex'"),
    ({"name": "x", "kind": "dense", "transform": "log"}, "features[1].transform", "'log'"),
    ({"name": "x", "kind": "dense", "fill": float("nan")}, "features[1].fill", "nan"),
    ({"name": "x", "kind": "dense", "transform": "standardize", "mean": 0.0, "std": 0.0},
     "features[1].std", "0.0"),
    ({"name": "x", "kind": "categorical", "vec_optimizer": {"type": "adadelta"}},
     "features[1].vec_optimizer.type", "'adadelta'"),
    ({"name": "x", "kind": "categorical", "vec_optimizer": {"type": "adagrad", "lr": 0.1}},
     "features[1].vec_optimizer", "unknown key 'lr'"),
    ({"name": "x", "kind": "categorical", "vec_optimizer": {"type": "adagrad", "learning_rate": -1.0}},
     "features[1].vec_optimizer", "learning_rate"),
    ({"name": "x", "kind": "categorical", "vec_optimizer": {"type": "adagrad", "learning_rate": "0.1"}},
     "features[1].vec_optimizer.learning_rate", "'0.1'"),
    ({"name": "x", "kind": "categorical", "vec_optimizer": "adagrad"}, "features[1].vec_optimizer", "'adagrad'"),
    ({"name": "x", "kind": "categorical", "vec_initializer": {"type": "random_uniform", "minval": 1.0,
                                                             "maxval": 0.0}},
     "features[1].vec_initializer", "minval"),
    ({"name": "x", "kind": "categorical", "occurrence_threshold": -1}, "features[1].occurrence_threshold", "-1"),
    ({"name": "x", "kind": "categorical", "expire_time": 0}, "features[1].expire_time", "0"),
    ({"name": "x", "kind": "categorical", "slot": 0}, "features[1].slot", "0"),
    ({"name": "x", "kind": "categorical", "buckets": -5}, "features[1].buckets", "-5"),
    ({"name": "x", "kind": "multi", "separator": ""}, "features[1].separator", "''"),
    ({"name": "x", "kind": "multi", "combiner": "max"}, "features[1].combiner", "'max'"),
    ({"name": "x", "kind": "sequence", "max_seq_length": 0}, "features[1].max_seq_length", "0"),
    ({"name": "x", "kind": "sequence", "columns": ["a", "b"], "separator": ","}, "features[1].separator",
     "no separator"),
    ({"name": "x", "kind": "sequence", "columns": []}, "features[1].columns", "[]"),
    ({"name": "x", "kind": "sequence", "columns": ["a", "a"]}, "features[1].columns", "distinct"),
    ({"name": "x", "kind": "sequence", "column": "a", "columns": ["a", "b"]}, "features[1].columns", "not both"),
    ({"name": "x", "kind": "categorical", "columns": ["a"]}, "features[1].columns", "unknown key"),
    ({"name": "", "kind": "dense"}, "features[1].name", "''"),
    ({"name": "x", "kind": "dense", "column": 3}, "features[1].column", "3"),
])
def test_bad_keys_and_values_name_the_key_and_value(feature, where, shown):
    with pytest.raises(ConfigError) as err:
        _schema(feature)
    assert where in str(err.value)
    assert shown in str(err.value)


@pytest.mark.parametrize("features, shown", [
    ([], "non-empty list"),
    ({"name": "x"}, "non-empty list"),
    ([{"name": "x", "kind": "dense"}], "0 features of kind 'label'"),
    ([LABEL, {"name": "l2", "kind": "label"}], "2 features of kind 'label'"),
    ([LABEL, {"name": "t", "kind": "timestamp"}, {"name": "u", "kind": "timestamp"}], "'timestamp'"),
    ([LABEL, {"name": "label", "kind": "dense"}], "features[1].name: 'label' (already the name of features[0])"),
    ([LABEL, "x"], "features[1]: 'x'"),
    ([LABEL, {"kind": "dense"}], "features[1]: no 'name' key"),
    ([LABEL, {"name": "x", "kind": "dense", "transform": "standardize", "mean": 1.0}], "needs 'std'"),
    ([LABEL, {"name": "x", "kind": "dense", "mean": 1.0}], "features[1].mean"),
    ([LABEL, {"name": "a", "kind": "categorical", "slot": 3, "dim": 8},
      {"name": "b", "kind": "categorical", "slot": 3, "dim": 4}],
     "features[2].dim: 4 conflicts with features[1].dim = 8"),
])
def test_bad_feature_lists(features, shown):
    with pytest.raises(ConfigError) as err:
        load_schema(features)
    assert shown in str(err.value)


def test_explicit_columns_must_hold_every_source_column():
    s = _schema({"name": "x", "kind": "dense"}, columns=["label", "other", "x"])
    assert s.columns == ("label", "other", "x")
    with pytest.raises(ConfigError, match="lacks"):
        _schema({"name": "x", "kind": "dense"}, columns=["label"])
    with pytest.raises(ConfigError, match="distinct"):
        _schema({"name": "x", "kind": "dense"}, columns=["label", "x", "x"])


# ---------------------------------------------------------------- the string hash

_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)
_M = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc, lane):
    return _rotl((acc + lane * _P2) & _M, 31) * _P1 & _M


def _xxh64_reference(data: bytes, seed: int = 0) -> int:
    """XXH64 from its specification, one byte string at a time (an independent reference)."""
    n, p = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while p + 32 <= n:
            for i in range(4):
                v[i] = _round(v[i], int.from_bytes(data[p + 8 * i: p + 8 * i + 8], "little"))
            p += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for i in range(4):
            h = ((h ^ _round(0, v[i])) * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while p + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[p:p + 8], "little")), 27) * _P1 + _P4) & _M
        p += 8
    if p + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[p:p + 4], "little") * _P1 & _M), 23) * _P2 + _P3) & _M
        p += 4
    while p < n:
        h = _rotl(h ^ (data[p] * _P5 & _M), 11) * _P1 & _M
        p += 1
    h ^= h >> 33
    h = h * _P2 & _M
    h ^= h >> 29
    h = h * _P3 & _M
    return h ^ (h >> 32)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# Published XXH64 values (seed 0), as ``xxhash.xxh64_intdigest`` gives them.
KNOWN = {
    "": 0xEF46DB3751D8E999,
    "abc": 0x44BC2CF5AD770999,
    "user_42": 0x42D3ACBA1377E487,
    "Comedy": 0xDF2AE6164A6F716E,
    "a" * 31: 0xFE47067CDA802916,
    "b" * 32: 0x52F8A81967C87AE4,
    "é€😀" * 20: 0xEBACCC76B739BDBF,
}


def test_hash_matches_published_xxh64_values():
    got = hash_string_ids(list(KNOWN))
    assert got.dtype == np.int64
    assert got.tolist() == [_signed(v) for v in KNOWN.values()]
    assert [_xxh64_reference(k.encode()) for k in KNOWN] == list(KNOWN.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=90), max_size=40), st.integers(0, (1 << 64) - 1))
def test_hash_equals_the_scalar_reference(values, seed):
    got = hash_string_ids(pa.array(values, pa.string()), seed=seed)
    assert got.tolist() == [_signed(_xxh64_reference(v.encode(), seed)) for v in values]


def test_hash_takes_every_string_layout_alike():
    values = ["x", "", "longer string of more than thirty-two bytes", "y", "x"]
    expected = hash_string_ids(values)
    assert expected[0] == expected[4] and len(set(expected.tolist())) == 4
    arr = pa.array(values)
    for layout in (arr.cast(pa.large_string()), arr.cast(pa.binary()), arr.dictionary_encode(),
                   pa.chunked_array([arr.slice(0, 2), arr.slice(2)]), np.array(values), np.array(values, object),
                   pa.array(["pad", *values]).slice(1)):
        assert hash_string_ids(layout).tolist() == expected.tolist()
    assert hash_string_ids(pa.array(["", None])).tolist() == [expected[1]] * 2
    assert hash_string_ids([]).shape == (0,)


def test_hash_rejects_non_strings_and_bad_seeds():
    with pytest.raises(TypeError, match="strings or bytes"):
        hash_string_ids(pa.array([1, 2]))
    for seed in (-1, 1 << 64, 1.5, True):
        with pytest.raises(ValueError, match="Invalid seed"):
            hash_string_ids(["a"], seed=seed)


def test_fold_ids_lands_in_range_and_is_deterministic():
    ids = np.array([0, 1, -1, 2**62, -(2**63), 12345], dtype=np.int64)
    folded = fold_ids(ids, 1000)
    assert folded.dtype == np.int64 and ((folded >= 0) & (folded < 1000)).all()
    assert fold_ids(ids, 1000).tolist() == folded.tolist()
    assert fold_ids(ids, 1).tolist() == [0] * 6
    with pytest.raises(ValueError, match="Invalid buckets"):
        fold_ids(ids, 0)
