"""table_state: the layout of a table's state_dict, and its row-wise helpers on real table states."""

from __future__ import annotations

import pytest
import torch

from monolith_torch.embedding import entry
from monolith_torch.embedding import table_state as ts
from monolith_torch.embedding.table import EmbeddingTable

# The layout as checkpoints written before table_state hold it: these spellings must keep loading.
OLD_KEYS = ["slices", "keys", "values", "times", "counts", "cand_keys", "cand_counts", "cand_times",
            "state.0.accumulator", "state.2.n", "state.2.z"]


def _segments():
    return [
        entry.Segment(2, entry.RandomUniformInitializer(), entry.AdagradOptimizer(learning_rate=0.1),
                      entry.Fp32Compressor()),
        entry.Segment(1, entry.ZerosInitializer(), entry.SgdOptimizer(learning_rate=0.1), entry.Fp32Compressor()),
        entry.Segment(3, entry.ConstantsInitializer(0.1), entry.FtrlOptimizer(learning_rate=0.1),
                      entry.Fp32Compressor()),
    ]


def _table():
    t = EmbeddingTable(name="t", occurrence_threshold=3)
    for seg in _segments():
        t.add_feature_slice(seg)
    return t


@pytest.fixture
def state():
    t = _table()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (300,), generator=gen)
    t.lookup(ids)
    t.apply_gradients(ids, torch.randn(300, 6, generator=gen))
    s = t.state_dict()
    assert s["keys"].numel() > 0 and s["cand_keys"].numel() > 0
    return s


def test_state_dict_layout_is_unchanged(state):
    assert list(state) == OLD_KEYS
    assert state["slices"] == [[2, "AdagradOptimizer"], [1, "SgdOptimizer"], [3, "FtrlOptimizer"]]
    dtypes = {k: v.dtype for k, v in state.items() if k != "slices"}
    assert dtypes == {"keys": torch.int64, "values": torch.float32, "times": torch.int64, "counts": torch.int64,
                      "cand_keys": torch.int64, "cand_counts": torch.int64, "cand_times": torch.int64,
                      "state.0.accumulator": torch.float32, "state.2.n": torch.float32, "state.2.z": torch.float32}
    assert all(v.device.type == "cpu" for k, v in state.items() if k != "slices")


def test_expected_fields_and_shapes_describe_a_table_state(state):
    names = [("accumulator",), (), ("n", "z")]
    assert ["slices"] + ts.expected_fields(names) == OLD_KEYS
    r, c = state["keys"].shape[0], state["cand_keys"].shape[0]
    shapes = ts.expected_shapes(r, c, [2, 1, 3], names)
    assert list(shapes) == OLD_KEYS[1:]
    assert shapes == {k: tuple(state[k].shape) for k in OLD_KEYS[1:]}
    ts.check_state(state, state["slices"], names)


def test_field_predicates():
    assert ts.state_field(2, "z") == "state.2.z"
    assert [k for k in OLD_KEYS if ts.is_row_field(k)] == ["keys", "values", "times", "counts",
                                                           "state.0.accumulator", "state.2.n", "state.2.z"]
    assert [k for k in OLD_KEYS if ts.is_cand_field(k)] == ["cand_keys", "cand_counts", "cand_times"]
    assert ts.learned_fields({k: None for k in OLD_KEYS}) == [
        "keys", "state.0.accumulator", "state.2.n", "state.2.z", "values"]


def test_make_state_orders_keys():
    rows = {"state.0.m": 1, "values": 2, "counts": 3, "keys": 4, "times": 5, "state.1.v": 6}
    cands = {"cand_times": 7, "cand_counts": 8, "cand_keys": 9}
    assert list(ts.make_state([], rows, cands)) == ["slices", "keys", "values", "times", "counts", "cand_keys",
                                                   "cand_counts", "cand_times", "state.0.m", "state.1.v"]


def _sorted_by_key(state):
    order, corder = torch.argsort(state["keys"]), torch.argsort(state["cand_keys"])
    return ts.select_rows(state, order, corder)


def _assert_states_equal(a, b):
    assert list(a) == list(b) and a["slices"] == b["slices"]
    for k in a:
        if k != "slices":
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_select_and_concat_round_trip(state, parts):
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    pieces = [ts.select_rows(state, state["keys"] % parts == p, state["cand_keys"] % parts == p)
              for p in range(parts)]
    _assert_states_equal(state, before)  # not modified
    assert sum(p["keys"].numel() for p in pieces) == state["keys"].numel()
    for p in pieces:
        assert list(p) == OLD_KEYS
        assert all(p[k].shape[0] == p["keys"].shape[0] for k in p if ts.is_row_field(k))
        assert all(p[k].shape[0] == p["cand_keys"].shape[0] for k in p if ts.is_cand_field(k))
    merged = ts.concat_states(pieces)
    _assert_states_equal(_sorted_by_key(merged), _sorted_by_key(state))
    t = _table()
    t.load_state_dict(merged)
    q = torch.arange(60)
    reference = _table()
    reference.load_state_dict(state)
    assert torch.equal(t.lookup(q, insert=False), reference.lookup(q, insert=False))


def test_select_rows_by_index_and_none(state):
    idx = torch.tensor([2, 0])
    out = ts.select_rows(state, idx)
    assert torch.equal(out["values"], state["values"][idx]) and torch.equal(out["state.2.z"], state["state.2.z"][idx])
    assert out["cand_keys"] is state["cand_keys"]
    out = ts.select_rows(state, cands=torch.tensor([0]))
    assert out["keys"] is state["keys"] and out["cand_times"].shape == (1,)


def test_concat_states_errors(state):
    with pytest.raises(ValueError, match=r"Invalid states: \[\]"):
        ts.concat_states([])
    other = dict(state)
    other["slices"] = [[6, "SgdOptimizer"]]
    with pytest.raises(ValueError, match=r"Invalid states\[1\]"):
        ts.concat_states([state, other])
    fewer = {k: v for k, v in state.items() if k != "state.2.z"}
    with pytest.raises(ValueError, match=r"Invalid states\[1\]"):
        ts.concat_states([state, fewer])
    # Without "slices" (as the trainer's digest gathers them): every key is concatenated.
    learned = {k: state[k] for k in ts.learned_fields(state)}
    both = ts.concat_states([learned, learned])
    assert list(both) == list(learned) and both["values"].shape[0] == 2 * state["values"].shape[0]


def test_check_state_rejects_and_changes_nothing(state):
    names = [("accumulator",), (), ("n", "z")]
    sig = state["slices"]
    with pytest.raises(TypeError, match="mapping"):
        ts.check_state([], sig, names)
    with pytest.raises(ValueError, match="saved slices"):
        ts.check_state(state, [[6, "SgdOptimizer"]], names)
    with pytest.raises(ValueError, match=r"missing \['state.2.z'\]"):
        ts.check_state({k: v for k, v in state.items() if k != "state.2.z"}, sig, names)
    bad = dict(state, values=state["values"][:, :5])
    with pytest.raises(ValueError, match="values has shape"):
        ts.check_state(bad, sig, names)
    dup = dict(state, cand_keys=torch.zeros_like(state["cand_keys"]))
    with pytest.raises(ValueError, match="cand_keys holds duplicate ids"):
        ts.check_state(dup, sig, names, owner="table 'x'")
    t = _table()
    before = t.state_dict()
    with pytest.raises(ValueError, match="table 't': values has shape"):
        t.load_state_dict(bad)
    _assert_states_equal(t.state_dict(), before)
