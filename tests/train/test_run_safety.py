"""A run survives careless and hostile use: damaged checkpoints, changed settings, divergence,
paths in the way, leftover temp files, a second trainer on the same run directory, and an error
mid-run. Each case gets one ``error:`` line and a documented exit code, and loses nothing."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from monolith_torch.checkpoint import load_checkpoint_file
from monolith_torch.train.cli import EXIT_DIVERGED, EXIT_USAGE, main
from monolith_torch.train.data import generate_criteo
from monolith_torch.train.metrics import StreamingAUC, auc
from monolith_torch.train.run_dir import RunLock, RunPaths

SMALL = ["--batch-size", "256", "--hidden", "32,16", "--emb-dim", "8", "--eval-batch-size", "1024"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = generate_criteo(str(d / "train.tsv"), 3000, seed=5, part=0)
    evaluation = generate_criteo(str(d / "eval.tsv"), 600, seed=5, part=1)
    return train, evaluation


def _train(run, data, *extra):
    return main(["train", "--run-dir", str(run), "--data", data[0], "--eval-data", data[1], *SMALL, *extra])


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert _train(run, data, "--checkpoint-every", "4") == 0
    return run


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _checkpoints(run):
    return RunPaths(str(run)).checkpoints_newest_first()


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "foreign"])
def test_a_damaged_only_checkpoint_is_one_error_line(tmp_path, trained, data, capsys, damage):
    run = _copy_run(trained, tmp_path / "run")
    for path in _checkpoints(run)[1:]:
        os.unlink(path)
    newest = _checkpoints(run)[0]
    raw = open(newest, "rb").read()
    with open(newest, "wb") as f:
        if damage == "truncated":
            f.write(raw[: len(raw) // 2])
        elif damage == "corrupted":
            f.write(raw[:-100] + bytes(100))
        else:
            f.write(b"PK\x03\x04 this is a zip file, not a checkpoint" * 10)
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--eval-data", data[1]]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, os.path.basename(newest))
    assert _train(run, data, "--resume") == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, os.path.basename(newest))


def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, trained, data, capsys):
    run = _copy_run(trained, tmp_path / "run")
    newest, older = _checkpoints(run)[:2]
    with open(newest, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    for command in (["eval", "--eval-data", data[1]], ["predict", "--data", data[1], "--output", str(tmp_path / "s.tsv")]):
        assert main([command[0], "--run-dir", str(run), *command[1:]]) == 0
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if "skipped a damaged checkpoint" in line]
        assert len(warned) == 1 and os.path.basename(newest) in warned[0], err
    assert len((tmp_path / "s.tsv").read_text().splitlines()) == 600
    step_of_older = load_checkpoint_file(older)["global_step"]
    assert _train(run, data, "--resume", "--max-steps", str(step_of_older + 2)) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == step_of_older + 2


def test_eval_and_predict_reuse_the_runs_model_shape(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--data", data[0], "--eval-data", data[1],
                 "--batch-size", "512", "--emb-dim", "4", "--hidden", "8", "--max-steps", "3"]) == 0
    capsys.readouterr()
    # No shape flags repeated: the run's saved settings rebuild its model.
    assert main(["eval", "--run-dir", str(run), "--eval-data", data[1]]) == 0
    assert "eval AUC" in capsys.readouterr().out
    assert main(["predict", "--run-dir", str(run), "--data", data[1], "--output", str(tmp_path / "p.tsv")]) == 0


def test_resume_with_another_dense_optimizer_fails_before_training(tmp_path, trained, data, capsys):
    run = _copy_run(trained, tmp_path / "run")
    before = sorted(os.listdir(run / "checkpoints"))
    capsys.readouterr()
    assert _train(run, data, "--resume", "--dense-optimizer", "sgd") == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "optimizer")
    assert sorted(os.listdir(run / "checkpoints")) == before


def test_resume_with_a_new_dense_lr_trains_at_it(tmp_path, trained, data):
    from monolith_torch.train.config import load_config
    from monolith_torch.train.trainer import Trainer

    run = _copy_run(trained, tmp_path / "run")
    cfg = load_config(None, {"run_dir": str(run), "emb_dim": 8, "hidden": "32,16", "dense_lr": 0.5, "resume": True})
    trainer = Trainer(cfg, show_progress=False)
    trainer.restore_latest(required=True)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.5]


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    code = _train(run, data, "--dense-lr", "1e30", "--vec-lr", "1e30", "--bias-lr", "1e30", "--clip-norm", "1e30",
                  "--checkpoint-every", "1")
    assert code == EXIT_DIVERGED
    line = _one_error_line(capsys.readouterr().err, "diverged at step")
    ckpts = _checkpoints(run)
    assert ckpts, "the checkpoints before the divergence are kept"
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert load_checkpoint_file(ckpts[0])["global_step"] == step - 1
    state = load_checkpoint_file(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "metrics.json").exists()


def test_skip_nonfinite_skips_and_counts(tmp_path, data):
    run = tmp_path / "run"
    code = _train(run, data, "--dense-lr", "1e30", "--vec-lr", "1e30", "--bias-lr", "1e30", "--clip-norm", "1e30",
                  "--skip-nonfinite")
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_nonfinite"] > 0
    assert metrics["steps"] + metrics["skipped_nonfinite"] == 12


def test_nan_predictions_never_crash_a_metric():
    probs = torch.tensor([0.1, float("nan"), 0.9, float("inf")])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert math.isnan(auc(probs, labels))
    streaming = StreamingAUC()
    streaming.update(probs, labels)
    assert math.isnan(streaming.result()) and streaming.nonfinite == 2


@pytest.mark.parametrize("blocker", ["checkpoints", "tb", "train.log", "metrics.json"])
def test_paths_in_the_way_are_found_before_training(tmp_path, data, capsys, blocker):
    run = tmp_path / "run"
    run.mkdir()
    if blocker in ("checkpoints", "tb"):
        (run / blocker).write_text("a file where a folder goes")
    else:
        (run / blocker).mkdir()
    capsys.readouterr()
    assert _train(run, data) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, blocker)
    assert not (run / "data").exists() and sorted(os.listdir(run)) == [blocker]


def test_a_second_trainer_on_the_run_dir_fails_at_once(tmp_path, data, capsys):
    run = tmp_path / "run"
    with RunLock(RunPaths(str(run))):
        capsys.readouterr()
        assert _train(run, data) == EXIT_USAGE
        _one_error_line(capsys.readouterr().err, f"pid {os.getpid()}")
    assert _train(run, data, "--max-steps", "1") == 0  # free again once the holder is gone


def test_orphaned_temp_files_of_this_run_are_removed_and_nothing_else(tmp_path, trained, data):
    run = _copy_run(trained, tmp_path / "run")
    orphan = run / "checkpoints" / ".ckpt-0000000099.pt.tmp-0123456789abcdef"
    orphan.write_bytes(b"x" * 1000)
    other = run / "checkpoints" / "notes.txt"
    other.write_text("mine")
    assert _train(run, data, "--max-steps", "1") == 0
    assert not orphan.exists() and other.read_text() == "mine"


def test_an_error_after_training_started_saves_first(tmp_path, data, capsys):
    # Far enough into the file (past the reader's first ~1 MiB block) that training has started.
    lines = open(generate_criteo(str(tmp_path / "big.tsv"), 16000, seed=6)).read().splitlines(keepends=True)
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines[:15000]) + "oops\tnot\ta\trow\n" + "".join(lines[15000:]))
    run = tmp_path / "run"
    assert _train(run, (str(bad), data[1]), "--strict", "--checkpoint-every", "1000") == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "bad.tsv:15001")
    ckpts = _checkpoints(run)
    assert ckpts and load_checkpoint_file(ckpts[0])["global_step"] > 0
