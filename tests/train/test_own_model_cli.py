"""A user's own data and model through the command: a CSV with a header, a [[features]] schema and
``model = "module:Class"`` defined in a test file, trained, evaluated and scored by ``monolith-torch``."""

from __future__ import annotations

import json
import textwrap

import numpy as np

from monolith_torch.train.cli import main

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class SumOfRows(nn.Module):
        """Logit: a linear layer over the sum of the id features' pooled vectors, plus the dense features."""

        def __init__(self, schema, embeddings, width=8):
            super().__init__()
            self.embeddings = embeddings
            self.names = [f.name for f in schema.embedded]
            dim = embeddings.slice_ranges(self.names[0])[-1]
            self.vec = slice(*dim)
            self.linear = nn.Linear(dim[1] - dim[0] + len(schema.dense), 1)

        def forward(self, batch):
            out = self.embeddings(batch.sparse)
            rows = sum(out[n][:, self.vec] for n in self.names)
            return self.linear(torch.cat([rows, batch.dense], 1)).squeeze(-1)
''')

CONFIG = textwrap.dedent('''
    model = "my_user_models:SumOfRows"
    batch_size = 64

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
    dim = 4
    vec_optimizer = { type = "adagrad", learning_rate = 0.5 }

    [[features]]
    name = "tags"
    kind = "multi"
    dtype = "int"
    separator = "|"
    dim = 4
''')


def _write_csv(path, rng, rows):
    users = rng.integers(0, 50, rows)
    tags = rng.integers(0, 20, (rows, 2))
    clicked = ((users % 2 == 0) ^ (rng.random(rows) < 0.1)).astype(int)
    lines = ["clicked,price,user,tags"]
    lines += [f"{c},{p:.2f},u{u},{a}|{b}" for c, p, u, (a, b) in zip(clicked, rng.random(rows) * 100, users, tags, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def test_a_users_model_and_schema_train_through_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_user_models.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "train.csv", rng, 3000)
    _write_csv(tmp_path / "test.csv", rng, 500)
    (tmp_path / "run.toml").write_text(CONFIG)
    run = tmp_path / "run"
    args = ["--config", str(tmp_path / "run.toml"), "--run-dir", str(run)]
    assert main(["train", *args, "--data", str(tmp_path / "train.csv"), "--eval-data", str(tmp_path / "test.csv"),
                 "--epochs", "3"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 * 47 and metrics["malformed_lines"] == 0
    assert metrics["eval_auc"] > 0.8  # the label follows the user id's parity, which the user's rows learn
    capsys.readouterr()
    # eval and predict rebuild the user's model from the run's saved settings: no --config needed.
    assert main(["eval", "--run-dir", str(run), "--eval-data", str(tmp_path / "test.csv")]) == 0
    assert f"eval AUC {metrics['eval_auc']:.4f}" in capsys.readouterr().out
    assert main(["predict", "--run-dir", str(run), "--data", str(tmp_path / "test.csv"),
                 "--output", str(tmp_path / "scores.tsv")]) == 0
    assert len((tmp_path / "scores.tsv").read_text().splitlines()) == 500
