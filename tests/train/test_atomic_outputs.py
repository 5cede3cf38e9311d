"""Checkpoints, predictions, generated data and the log: a planted symlink never redirects a write."""

from __future__ import annotations

import os

import pytest
import torch

from monolith_torch.checkpoint import restore_checkpoint, save_checkpoint
from monolith_torch.core.fileio import SymlinkTargetError
from monolith_torch.train.cli import main
from monolith_torch.train.config import TrainConfig
from monolith_torch.train.data import generate_criteo
from monolith_torch.train.trainer import Trainer

SMALL = ["--batch-size", "256", "--hidden", "8", "--emb-dim", "4", "--eval-batch-size", "512"]


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def _plant(directory, victim, *names):
    for name in names:
        os.symlink(victim, directory / name)


def _no_temp_files(directory):
    return [n for n in os.listdir(directory) if ".tmp" in n and not os.path.islink(directory / n)] == []


def test_checkpoint_save_ignores_symlinks_at_the_old_temp_names(tmp_path, victim):
    path = tmp_path / "ckpt"
    _plant(tmp_path, victim, f".ckpt.tmp-{os.getpid()}")
    model = torch.nn.Linear(3, 1)
    save_checkpoint(path, None, model, global_step=1)
    assert victim.read_text() == "precious"
    restored = torch.nn.Linear(3, 1)
    assert restore_checkpoint(path, None, restored) == 1
    assert torch.equal(restored.weight, model.weight)
    assert _no_temp_files(tmp_path)


def test_checkpoint_save_refuses_a_symlink_at_the_target(tmp_path, victim):
    path = tmp_path / "ckpt"
    os.symlink(victim, path)
    with pytest.raises(SymlinkTargetError):
        save_checkpoint(path, None, torch.nn.Linear(3, 1), global_step=1)
    assert victim.read_text() == "precious" and path.is_symlink()


@pytest.mark.parametrize("name", ["train.tsv", "train.tsv.gz"])
def test_generated_data_ignores_symlinks_at_the_old_temp_names(tmp_path, victim, name):
    path = tmp_path / name
    _plant(tmp_path, victim, f"{name}.tmp.{os.getpid()}")
    generate_criteo(str(path), 300, seed=2)
    assert victim.read_text() == "precious"
    assert _no_temp_files(tmp_path)
    os.symlink(victim, tmp_path / "other.tsv")
    with pytest.raises(SymlinkTargetError):
        generate_criteo(str(tmp_path / "other.tsv"), 300, seed=2)
    assert victim.read_text() == "precious"


def test_predict_ignores_symlinks_at_the_old_temp_names(tmp_path, victim):
    data = generate_criteo(str(tmp_path / "rows.tsv"), 300, seed=2)
    out = tmp_path / "scores.tsv"
    _plant(tmp_path, victim, f"scores.tsv.tmp.{os.getpid()}")
    trainer = Trainer(TrainConfig(run_dir=str(tmp_path / "run"), hidden=(8,), emb_dim=4), show_progress=False)
    assert trainer.predict([data], str(out)) == 300
    assert victim.read_text() == "precious"
    assert len(out.read_text().splitlines()) == 300
    os.symlink(victim, tmp_path / "linked.tsv")
    with pytest.raises(SymlinkTargetError):
        trainer.predict([data], str(tmp_path / "linked.tsv"))
    assert victim.read_text() == "precious"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    data = generate_criteo(str(d / "rows.tsv"), 600, seed=3)
    assert main(["train", "--run-dir", str(d / "run"), "--data", data, "--max-steps", "2", *SMALL]) == 0
    return d / "run", data


def test_cli_predict_refuses_a_symlinked_output_before_scoring(tmp_path, victim, trained, capsys):
    run, data = trained
    link = tmp_path / "scores.tsv"
    os.symlink(victim, link)
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run), "--data", data, "--output", str(link), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monolith-torch predict: error: Invalid output:")
    assert "symbolic link" in err[0]
    assert victim.read_text() == "precious"


def test_cli_refuses_a_symlinked_train_log(tmp_path, victim, capsys):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "train.log")
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.log' is a symbolic link" in err[0]
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(run)) == ["train.log"]
