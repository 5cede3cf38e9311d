"""A run with its own schema, model and options is rebuilt by the server from the snapshot's settings alone."""

from __future__ import annotations

import csv
import textwrap

import numpy as np

from monolith_torch.serve import ServedModel
from monolith_torch.train.cli import main as train_main
from monolith_torch.train.config import TrainConfig, load_config
from monolith_torch.train.trainer import Trainer

CONFIG = textwrap.dedent('''
    model = "dcn_v2"
    fused_embeddings = true
    hidden = [32, 16]
    batch_size = 128

    [model_options]
    cross_layers = 2

    [[features]]
    name = "label"
    column = "clicked"
    kind = "label"

    [[features]]
    name = "price"
    kind = "dense"
    transform = "log1p"

    [[features]]
    name = "user"
    kind = "categorical"
    dtype = "string"
    dim = 8

    [[features]]
    name = "tags"
    kind = "multi"
    dtype = "int"
    separator = "|"
    dim = 8
''')


def _write_csv(path, rng, rows):
    users = rng.integers(0, 50, rows)
    tags = rng.integers(0, 20, (rows, 2))
    clicked = ((users % 2 == 0) ^ (rng.random(rows) < 0.1)).astype(int)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clicked", "price", "user", "tags"])
        for c, p, u, (a, b) in zip(clicked, rng.random(rows) * 100, users, tags, strict=True):
            writer.writerow([c, f"{p:.2f}", f"u{u}", f"{a}|{b}"])


def test_a_custom_schema_and_model_serve_the_scores_of_the_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "train.csv", rng, 3000)
    _write_csv(tmp_path / "test.csv", rng, 300)
    (tmp_path / "run.toml").write_text(CONFIG)
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    assert train_main(["train", "--config", str(tmp_path / "run.toml"), "--run-dir", run, "--data",
                       str(tmp_path / "train.csv"), "--export-dir", export, "--epochs", "2"]) == 0

    served = ServedModel(export)
    served.refresh()
    assert served.ready
    with open(tmp_path / "test.csv", newline="") as f:
        records = [dict(r) for r in csv.DictReader(f)]
    for r in records[::2]:  # a list of ids and a number parse as their text would
        r["tags"] = [int(t) for t in r["tags"].split("|")]
        r["price"] = float(r["price"])
        del r["clicked"]
    scores, version = served.score_records(records)

    cfg = load_config(str(tmp_path / "run.toml"), {"run_dir": run})
    assert isinstance(cfg, TrainConfig) and cfg.fused_embeddings
    trainer = Trainer(cfg, show_progress=False)
    trainer.restore_latest(required=True)
    assert version["global_step"] == int(trainer.global_step)
    expected, _ = trainer._scores([str(tmp_path / "test.csv")])
    np.testing.assert_allclose(np.array(scores), expected.numpy(), rtol=0, atol=1e-6)
