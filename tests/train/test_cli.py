"""``monolith-torch`` end to end: train -> eval -> predict, resume, signals, bad input, torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from monolith_torch.checkpoint import load_checkpoint_file
from monolith_torch.train.cli import main
from monolith_torch.train.data import generate_criteo

SMALL = ["--batch-size", "256", "--hidden", "32,16", "--emb-dim", "8", "--eval-batch-size", "1024"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = generate_criteo(str(d / "train.tsv"), 3000, seed=3, part=0)
    evaluation = generate_criteo(str(d / "eval.tsv.gz"), 800, seed=3, part=1)
    return train, evaluation


def _train(run_dir, data, *extra):
    return main(["train", "--run-dir", str(run_dir), "--data", data[0], "--eval-data", data[1], *SMALL, *extra])


def test_train_eval_predict(tmp_path, small_data, capsys):
    run = tmp_path / "run"
    assert _train(run, small_data) == 0
    out = capsys.readouterr().out
    assert "effective config:" in out and re.search(r"AUC\s+0\.\d+\s+0\.\d+", out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12  # ceil(3000 / 256)
    assert 0.0 <= metrics["eval_auc"] <= 1.0 and metrics["malformed_lines"] == 0
    assert os.listdir(run / "tb"), "TensorBoard logs written"
    assert main(["eval", "--run-dir", str(run), "--eval-data", small_data[1], *SMALL]) == 0
    assert f"eval AUC {metrics['eval_auc']:.4f}" in capsys.readouterr().out
    out_file = tmp_path / "scores.tsv"
    assert main(["predict", "--run-dir", str(run), "--data", small_data[1], "--output", str(out_file), *SMALL]) == 0
    lines = out_file.read_text().splitlines()
    assert len(lines) == 800
    scores = torch.tensor([float(line.split("\t")[0]) for line in lines])
    assert ((scores > 0) & (scores < 1)).all()


def _checkpoint_state(run):
    ckpts = sorted((run / "checkpoints").iterdir())
    return load_checkpoint_file(str(ckpts[-1]))


def _assert_same_state(a, b):
    assert a["global_step"] == b["global_step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name, table in a["tables"]["tables"].items() if "tables" in a["tables"] else a["tables"].items():
        other = (b["tables"]["tables"] if "tables" in b["tables"] else b["tables"])[name]
        oa, ob = torch.argsort(table["keys"]), torch.argsort(other["keys"])
        assert torch.equal(table["keys"][oa], other["keys"][ob]), name
        assert torch.equal(table["values"][oa], other["values"][ob]), name


def test_resume_equals_uninterrupted_run(tmp_path, small_data):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, small_data, "--max-steps", "8") == 0
    assert _train(part, small_data, "--max-steps", "4") == 0
    assert _train(part, small_data, "--max-steps", "8", "--resume") == 0
    _assert_same_state(_checkpoint_state(full), _checkpoint_state(part))
    assert json.loads((part / "metrics.json").read_text())["steps"] == 8


def test_malformed_lines_counted_and_skipped(tmp_path, small_data):
    good = open(small_data[0]).read().splitlines()
    bad_file = tmp_path / "bad.tsv"
    cols = good[1].split("\t")
    non_numeric = "\t".join([cols[0], "12x", *cols[2:]])
    bad_file.write_text("\n".join([good[0], "1\t2\t3", non_numeric, *good[1:50]]) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--data", str(bad_file), *SMALL]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["malformed_lines"] == 2
    assert "wrong column count" in metrics["data_summary"] and "non-numeric" in metrics["data_summary"]


@pytest.mark.parametrize("bad_line, reason", [("1\t2\t3", "wrong column count"), (None, "non-numeric integer field")])
def test_strict_reports_file_and_line(tmp_path, small_data, capsys, bad_line, reason):
    good = open(small_data[0]).read().splitlines()
    if bad_line is None:
        cols = good[2].split("\t")
        bad_line = "\t".join([cols[0], "abc", *cols[2:]])
    bad_file = tmp_path / "bad.tsv"
    bad_file.write_text("\n".join([good[0], good[1], bad_line, *good[3:40]]) + "\n")
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--data", str(bad_file), "--strict", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad_file}:3: {reason}" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/*.tsv"], "no file matches"),
        (["--batch-size", "0"], "batch_size"),
        (["--dense-optimizer", "rmsprop"], "dense_optimizer"),
        (["--clip-norm", "abc"], "clip_norm"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("monolith-torch train: error:")
    assert not run.exists()


def test_unknown_config_key_and_unwritable_run_dir(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('batch_size = 128\nlearning_rat = 0.1\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["train", "--run-dir", str(blocker / "run")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not run.exists()


def test_toml_config_and_flag_precedence(tmp_path, small_data, capsys):
    config = tmp_path / "run.toml"
    config.write_text('batch_size = 1000\nmax_steps = 2\n[ignored_section_is_an_error]\n')
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    config.write_text("batch_size = 1000\nmax_steps = 2\nhidden = [16]\nemb_dim = 4\nstrict = true\n")
    run = tmp_path / "r"
    assert main(["train", "--config", str(config), "--batch-size", "500", "--run-dir", str(run),
                 "--data", small_data[0], "--no-strict"]) == 0
    out = capsys.readouterr().out
    assert "batch_size = 500" in out and "max_steps = 2" in out and "strict = False" in out
    assert json.loads((run / "metrics.json").read_text())["train_examples"] == 1000


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_loadable_checkpoint(tmp_path, signum, code):
    data = generate_criteo(str(tmp_path / "big.tsv"), 200_000, seed=5)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith_torch", "train", "--run-dir", str(run), "--data", data, *SMALL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
    )
    try:
        deadline = time.time() + 120
        log = run / "train.log"
        while time.time() < deadline:
            if log.exists() and "training from step" in log.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not start")
        time.sleep(2.0)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, out[-2000:]
    payload = _checkpoint_state(run)
    assert payload["global_step"] >= 1
    assert f"stopped by signal {int(signum)} at step {payload['global_step']}" in (run / "train.log").read_text()


@pytest.mark.timeout(300)
def test_torchrun_two_processes_end_identical(tmp_path, small_data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monolith_torch", "train", "--run-dir", str(run), "--data", small_data[0],
           "--eval-data", small_data[1], "--max-steps", "5", "--dist-timeout-s", "60", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) state digest ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"}
    assert digests["0"] == digests["1"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["train_examples"] == 5 * 2 * 256
