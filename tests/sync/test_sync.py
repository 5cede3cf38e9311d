"""Parameter sync: change tracking in tables, the publication format, the exporter and exact replay."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureSlotConfig
from monolith_torch.sync.exporter import DeltaExporter, ExportError
from monolith_torch.sync.format import (
    SyncError,
    TableRows,
    list_publications,
    prune_publications,
    read_publication,
    write_publication,
)
from monolith_torch.sync.replica import Replica

DAY = 86400


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _factory(clock) -> HashTableFeatureFactory:
    factory = HashTableFeatureFactory(seed=3, time_fn=clock)
    for name, expire in (("a", 2), ("b", 5)):
        factory.create_feature_slot(FeatureSlotConfig(
            name=name, has_bias=True, expire_time=expire,
            default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.1),
        ))
        factory.tables[name].set_feature_metadata(name, None)
    return factory


def _table_state(factory) -> dict:
    out = {}
    for name, table in factory.tables.items():
        ids, values = table.serving_rows()
        order = torch.argsort(ids)
        out[name] = (ids[order].clone(), values[order].clone())
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        assert torch.equal(a[name][1], b[name][1]), name


def _train_step(factory, rng, step) -> None:
    """Looks up a random batch (new ids appear over time) and applies random gradients."""
    for table in factory.tables.values():
        ids = torch.from_numpy(rng.integers(step * 5, step * 5 + 40, size=30)).long()
        table.lookup_rows(ids)
        grads = torch.from_numpy(rng.normal(size=(30, table.dim)).astype(np.float32))
        table.apply_gradients(ids, grads)


def test_table_tracks_created_updated_and_evicted_rows():
    clock = Clock()
    factory = _factory(clock)
    table = factory.tables["a"]
    table.track_changes()
    table.lookup_rows(torch.tensor([1, 2, 3]))
    ids, values, removed = table.take_changes()
    assert sorted(ids.tolist()) == [1, 2, 3] and values.shape == (3, table.dim) and removed.numel() == 0
    assert table.take_changes()[0].numel() == 0  # forgotten once taken
    table.apply_gradients(torch.tensor([2]), torch.ones(1, table.dim))
    ids, values, _ = table.take_changes()
    assert ids.tolist() == [2]
    assert torch.equal(values, table.gather(table.lookup_rows(torch.tensor([2]), insert=False)))
    clock.t += 3 * DAY  # past expire_time (2 days) for every row
    table.lookup_rows(torch.tensor([9]))
    assert factory.evict_expired()["a"] == 3
    ids, _, removed = table.take_changes()
    assert ids.tolist() == [9] and sorted(removed.tolist()) == [1, 2, 3]


def test_publication_round_trip_and_checks(tmp_path):
    rows = {"t": TableRows(np.array([5, -7], np.int64), np.arange(6, dtype=np.float32).reshape(2, 3),
                           np.array([11], np.int64))}
    dense = {"w": np.ones((2, 2), np.float32), "n": np.array(4, np.int64)}
    path = write_publication(str(tmp_path), 1, "full", "r1", rows, {"t": 2}, dense, 7, 1.5, 2.5, {"model": "x"})
    pub = read_publication(path, run_id="r1")
    assert (pub.seq, pub.kind, pub.global_step, pub.model_settings) == (1, "full", 7, {"model": "x"})
    assert np.array_equal(pub.tables["t"].ids, [5, -7]) and np.array_equal(pub.tables["t"].values, rows["t"].values)
    assert pub.tables["t"].removed.size == 0  # a full snapshot has no removals
    assert pub.dense["n"].dtype == np.int64 and int(pub.dense["n"]) == 4 and pub.dense["w"].shape == (2, 2)
    with pytest.raises(SyncError, match="belongs to run"):
        read_publication(path, run_id="other")
    delta = write_publication(str(tmp_path), 2, "delta", "r1", rows, {"t": 2}, None, 8, 2.0, 3.0)
    assert read_publication(delta).tables["t"].removed.tolist() == [11]
    with pytest.raises(FileExistsError):
        write_publication(str(tmp_path), 2, "delta", "r1", rows, {"t": 2}, None, 8, 2.0, 3.0)
    # A flipped byte in a data file: the checksum catches it.
    data = os.path.join(delta, "table-0000.part-0000.arrow")
    blob = bytearray(open(data, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(data, "wb").write(bytes(blob))
    with pytest.raises(SyncError, match="checksum"):
        read_publication(delta)
    # A manifest from a newer format version is refused, not guessed at.
    manifest = os.path.join(path, "manifest.json")
    doc = json.load(open(manifest))
    doc["version"] = 99
    open(manifest, "w").write(json.dumps(doc))
    with pytest.raises(SyncError, match="version"):
        read_publication(path)
    assert [seq for seq, _, _ in list_publications(str(tmp_path))] == [1, 2]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temp folders left


def test_replay_reproduces_every_published_state_exactly(tmp_path):
    """Full snapshots, deltas, evictions and compaction: a replica equals the trainer at every version."""
    clock = Clock()
    factory = _factory(clock)
    model = torch.nn.Linear(4, 1)
    export = str(tmp_path / "export")
    exporter = DeltaExporter(export, "run", factory, model, {"k": 1}, sync_every=60, dense_sync_every=180,
                             full_every=900, clock=clock)
    exporter.start(0)
    published = {1: (_table_state(factory), {k: v.clone() for k, v in model.state_dict().items()})}
    replica_factory = _factory(Clock())
    replica_model = torch.nn.Linear(4, 1)
    replica = Replica(replica_factory.tables, replica_model)
    rng = np.random.default_rng(0)
    for step in range(1, 80):
        _train_step(factory, rng, step)
        with torch.no_grad():
            model.weight.add_(0.01)
        clock.t += 30
        if step % 20 == 0:
            clock.t += 3 * DAY  # everything of "a" expires
            factory.evict_expired()
        if exporter.maybe_publish(step):
            exporter._wait()
            published[exporter.seq] = (_table_state(factory), {k: v.clone() for k, v in model.state_dict().items()})
        if step % 9 == 0:  # the replica catches up now and then, at whatever version is there
            replica.poll(export)
            tables, _ = published[replica.seq]
            _assert_same(_table_state(replica_factory), tables)
    exporter.finish(79)
    published[exporter.seq] = (_table_state(factory), {k: v.clone() for k, v in model.state_dict().items()})
    replica.poll(export)
    assert replica.seq == exporter.seq and replica.refused == 0
    _assert_same(_table_state(replica_factory), _table_state(factory))
    assert torch.equal(replica_model.weight, model.weight)
    # Compaction left at most two full snapshots, and a fresh replica replays from what is left.
    kinds = [k for _, k, _ in list_publications(export)]
    assert kinds.count("full") == 2 and kinds[0] == "full"
    fresh_factory = _factory(Clock())
    fresh = Replica(fresh_factory.tables, torch.nn.Linear(4, 1))
    fresh.poll(export)
    _assert_same(_table_state(fresh_factory), _table_state(factory))


def test_replica_refuses_corrupt_and_foreign_publications_and_keeps_its_version(tmp_path):
    clock = Clock()
    factory = _factory(clock)
    model = torch.nn.Linear(4, 1)
    export = str(tmp_path)
    exporter = DeltaExporter(export, "run", factory, model, {}, sync_every=0, clock=clock)
    exporter.start(0)
    rng = np.random.default_rng(1)
    _train_step(factory, rng, 1)
    exporter.maybe_publish(1)
    exporter._wait()
    replica_factory = _factory(Clock())
    replica = Replica(replica_factory.tables, torch.nn.Linear(4, 1))
    replica.poll(export)
    assert replica.seq == 2
    held = _table_state(replica_factory)
    _train_step(factory, rng, 2)
    exporter.maybe_publish(2)  # seq 3, then corrupt it
    exporter._wait()
    _, _, path = list_publications(export)[-1]
    with open(os.path.join(path, "table-0000.part-0000.arrow"), "r+b") as f:
        f.seek(200)
        f.write(b"\0garbage\0")
    _train_step(factory, rng, 3)
    exporter.maybe_publish(3)  # seq 4 applies on 3: cannot be applied either
    exporter._wait()
    assert replica.poll(export) == 0
    assert replica.seq == 2 and replica.refused == 1 and "checksum" in replica.last_error
    _assert_same(_table_state(replica_factory), held)
    # A snapshot of another run in the same folder is refused too.
    other = write_publication(export, 5, "full", "someone-else", {}, {}, {}, 0, 0.0, 0.0, {})
    assert replica.poll(export) == 0 and replica.refused == 2 and "belongs to run" in replica.last_error
    os.rename(other, os.path.join(export, ".gone"))
    # The next full snapshot of the run gets the replica going again.
    clock.t += 10_000
    exporter.full_every = 1
    exporter.maybe_publish(4)
    exporter.finish(4)
    replica.poll(export)
    assert replica.seq == exporter.seq
    _assert_same(_table_state(replica_factory), _table_state(factory))


def test_exporter_refuses_another_runs_folder(tmp_path):
    factory = _factory(Clock())
    write_publication(str(tmp_path), 1, "full", "someone-else", {}, {}, {}, 0, 0.0, 0.0, {})
    exporter = DeltaExporter(str(tmp_path), "mine", factory, torch.nn.Linear(1, 1), {})
    with pytest.raises(ExportError, match="another run"):
        exporter.start(0)
    with pytest.raises(ValueError, match="sync_every"):
        DeltaExporter(str(tmp_path), "mine", factory, torch.nn.Linear(1, 1), {}, sync_every=-1)


def test_prune_keeps_the_newest_full_snapshots_and_what_follows(tmp_path):
    for seq, kind in enumerate(["full", "delta", "full", "delta", "delta", "full", "delta"], start=1):
        write_publication(str(tmp_path), seq, kind, "r", {}, {}, {} if kind == "full" else None, 0, 0.0, 0.0, {})
    removed = prune_publications(str(tmp_path), keep_fulls=2)
    assert [os.path.basename(p) for p in removed] == [f"{1:020d}.full", f"{2:020d}.delta"]
    assert [seq for seq, _, _ in list_publications(str(tmp_path))] == [3, 4, 5, 6, 7]
