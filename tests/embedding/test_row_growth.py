"""Row growth: the capacity rule, memory maps extended in place, and tables that grow as one built at once."""

from __future__ import annotations

import sys

import pytest
import torch

from monolith_torch.embedding import entry
from monolith_torch.embedding.row_growth import RowGrowth, capacity
from monolith_torch.embedding.table import EmbeddingTable

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory maps grow in place on Linux")


def test_capacity_doubles_small_tables_and_adds_a_sixteenth_to_large_ones():
    assert capacity(16, 17, 80) == 32  # doubling while a step is under 1 MiB
    assert capacity(16, 100, 80) == 100  # never less than asked
    big = 1_000_000
    assert capacity(big, big + 1, 144) == big + big // 16
    assert capacity(big, big, 144) == big  # nothing to do
    # A step is at least 1 MiB of rows (all fields), at most a doubling.
    assert capacity(10_000, 10_001, 144) == 10_000 + (1 << 20) // 144 + 1


@linux_only
def test_mapped_fields_keep_their_rows_through_growths_and_a_held_tensor_stays_valid():
    growth = RowGrowth(torch.device("cpu"))
    fields = {"v": torch.arange(20_000 * 16, dtype=torch.float32).view(20_000, 16),
              "t": torch.arange(20_000, dtype=torch.int64)}
    expected = {k: t.clone() for k, t in fields.items()}
    cap = growth.grow(fields, 20_001)  # into memory maps (a copy)
    assert cap >= 20_001 and all(t.shape[0] == cap for t in fields.values())
    cap2 = growth.grow(fields, cap + 1)  # the maps extend
    assert cap2 > cap
    for k, t in fields.items():
        assert torch.equal(t[:20_000], expected[k]) and not t[20_000:].any()
    held = fields["v"]  # someone holds the rows (row_storage()): growth must not move them
    before = held.clone()
    growth.grow(fields, cap2 + 1)
    assert torch.equal(held, before)  # still readable, unchanged
    assert torch.equal(fields["v"][:20_000], expected["v"])
    assert fields["v"].data_ptr() != held.data_ptr()


def _table():
    t = EmbeddingTable(name="t", seed=1)
    t.add_feature_slice(entry.Segment(16, entry.RandomUniformInitializer(-0.1, 0.1),
                                      entry.AdagradOptimizer(learning_rate=0.1, initial_accumulator_value=1.0),
                                      entry.Fp32Compressor()))
    return t


def test_a_table_grown_batch_by_batch_equals_one_built_at_once():
    ids = torch.randperm(300_000, generator=torch.Generator().manual_seed(0))[:120_000].long() * 7 + 3
    grown, at_once = _table(), _table()
    for chunk in ids.split(4_000):  # many growths, through the mapped path past 1 MiB
        grown.lookup_rows(chunk)
        grown.apply_gradients(chunk, torch.ones(chunk.numel(), 16))
    at_once.lookup_rows(ids)
    at_once.apply_gradients(ids, torch.ones(ids.numel(), 16))
    a, b = grown.state_dict(), at_once.state_dict()
    oa, ob = torch.argsort(a["keys"]), torch.argsort(b["keys"])
    for key in ("keys", "values", "state.0.accumulator"):
        assert torch.equal(a[key][oa], b[key][ob]), key
    # The slack stays within a sixteenth of the rows (plus one 1 MiB step).
    row_bytes = 16 * 4 * 2 + 16
    allocated = sum(v for k, v in grown.nbytes().items() if k in ("values", "optimizer_state", "times_counts"))
    assert allocated <= len(grown) * row_bytes * 17 / 16 + (1 << 20) + row_bytes * 16
