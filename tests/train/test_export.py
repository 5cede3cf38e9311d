"""train --export-dir: what the trainer publishes replays to exactly the state it checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from monolith_torch.checkpoint import restore_checkpoint
from monolith_torch.step.context import NativeContext
from monolith_torch.sync.format import list_publications, read_publication
from monolith_torch.sync.replica import Replica
from monolith_torch.train.build import build_run_model
from monolith_torch.train.cli import main
from monolith_torch.train.config import TrainConfig
from monolith_torch.train.data import generate_criteo
from monolith_torch.train.run_dir import RunPaths, model_settings_from_json

SMALL = ["--generated-train-rows", "6000", "--generated-eval-rows", "1000", "--batch-size", "500", "--hidden", "16"]


def _serving_state(factory) -> dict:
    out = {}
    for name, table in factory.tables.items():
        ids, values = table.serving_rows()
        order = torch.argsort(ids)
        out[name] = (ids[order], values[order])
    return out


def _replay(export: str):
    full = [p for _, kind, p in list_publications(export) if kind == "full"][-1]
    settings = model_settings_from_json(read_publication(full).model_settings)
    built = build_run_model(dataclasses.replace(TrainConfig(), **settings))
    replica = Replica(built.factory.tables, built.model)
    replica.poll(export)
    return replica, built


def test_export_replays_to_the_checkpointed_state_and_resume_continues_the_sequence(tmp_path, capsys):
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    args = ["train", "--run-dir", run, "--export-dir", export, "--sync-every", "0", *SMALL]
    assert main(args) == 0
    pubs = list_publications(export)
    assert pubs[0][1] == "full" and all(kind == "delta" for _, kind, _ in pubs[1:])
    assert len(pubs) == 1 + 12 + 1  # the snapshot at start, one delta per step, the final one
    replica, built = _replay(export)
    # The reference: the run's final checkpoint, restored into a fresh model.
    ref = build_run_model(TrainConfig(hidden=(16,)))
    restore_checkpoint(RunPaths(run).latest_checkpoint(), NativeContext(feature_factory=ref.factory), ref.model)
    got, want = _serving_state(built.factory), _serving_state(ref.factory)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name][0], want[name][0]) and torch.equal(got[name][1], want[name][1]), name
    for key, value in ref.model.state_dict().items():
        assert torch.equal(built.model.state_dict()[key], value), key
    assert replica.global_step == 12 and replica.refused == 0
    # A resumed run publishes a full snapshot first, continuing the sequence numbers.
    assert main([*args, "--resume", "--max-steps", "14", "--epochs", "2"]) == 0
    after = list_publications(export)
    assert after[len(pubs)][0] == pubs[-1][0] + 1 and after[len(pubs)][1] == "full"
    replica.poll(export)
    assert replica.seq == after[-1][0] and replica.global_step == 14


def test_export_dir_of_another_run_is_refused_before_training(tmp_path, capsys):
    export = str(tmp_path / "export")
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--export-dir", export, "--max-steps", "1", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "b"), "--export-dir", export, "--max-steps", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Invalid export_dir" in err and "another run" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.timeout(300)
def test_sharded_tables_export_one_part_per_rank_and_replay_to_the_union_of_shards(tmp_path):
    data, run, export = tmp_path / "t.tsv", tmp_path / "run", str(tmp_path / "export")
    generate_criteo(str(data), 6000, seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monolith_torch", "train", "--run-dir", str(run), "--data", str(data), "--sharded-tables",
           "--export-dir", export, "--sync-every", "0", "--dist-timeout-s", "60", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    full = read_publication(list_publications(export)[0][2])
    parts = json.loads(open(os.path.join(full.path, "manifest.json")).read())["tables"]["C1"]["parts"]
    assert [p["file"] for p in parts] == ["table-0000.part-0000.arrow", "table-0000.part-0001.arrow"]
    replica, built = _replay(export)
    ref = build_run_model(TrainConfig(hidden=(16,)))
    restore_checkpoint(RunPaths(str(run)).latest_checkpoint(), NativeContext(feature_factory=ref.factory), ref.model)
    got, want = _serving_state(built.factory), _serving_state(ref.factory)
    for name in want:
        assert torch.equal(got[name][0], want[name][0]) and torch.equal(got[name][1], want[name][1]), name
    assert replica.refused == 0
