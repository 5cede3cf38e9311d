"""train --follow: files arriving in a folder, trained once each; exactly-once resume after kill -9; the clock."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from monolith_torch.train.cli import main
from monolith_torch.train.config import ConfigError, TrainConfig
from monolith_torch.train.data import generate_criteo
from monolith_torch.train.follow import FileStream, RunClock, StreamPosition
from monolith_torch.train.trainer import Trainer

ROWS = 600


def _drop(folder: str, i: int, rows: int = ROWS) -> str:
    """Writes data file ``i`` the way a producer must: under a dot-name, then renamed into place."""
    tmp = os.path.join(folder, f".part-{i:05d}.tsv.tmp")
    generate_criteo(tmp, rows, seed=0, part=i)
    final = os.path.join(folder, f"part-{i:05d}.tsv")
    os.rename(tmp, final)
    return final


def _args(data: str, run: str, *extra: str) -> list[str]:
    return ["train", "--follow", "--data", data, "--run-dir", run, "--batch-size", "256", "--hidden", "16",
            "--follow-poll-s", "0.2", "--checkpoint-every", "3", *extra]


def _metrics(run: str) -> dict:
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def test_file_stream_yields_new_files_once_in_name_order_and_skips_dot_files(tmp_path):
    for name in ("b.tsv", "a.tsv", ".c.tsv.tmp"):
        (tmp_path / name).write_text("x")
    pos = StreamPosition(done=[str(tmp_path / "a.tsv")])
    stream = FileStream([str(tmp_path)], pos, poll_s=0.05, idle_exit_s=1.0)
    seen = []

    def later():
        time.sleep(0.3)
        (tmp_path / ".d.tsv.tmp").write_text("x")
        os.rename(tmp_path / ".d.tsv.tmp", tmp_path / "d.tsv")

    threading.Thread(target=later).start()
    for path in stream.files():
        seen.append(os.path.basename(path))
        pos.done.add(path)
    assert seen == ["b.tsv", "d.tsv"]


def test_follow_trains_each_file_once_and_stops_when_idle(tmp_path, capsys):
    data, run = tmp_path / "in", str(tmp_path / "run")
    data.mkdir()
    for i in range(2):
        _drop(str(data), i)
    threading.Timer(1.5, _drop, (str(data), 2)).start()  # arrives while the run waits
    assert main(_args(str(data), run, "--follow-idle-exit", "4", "--progressive-window-rows", "500")) == 0
    m = _metrics(run)
    assert m["train_examples"] == 3 * ROWS
    assert m["data_summary"].startswith(f"{3 * ROWS} rows read")
    # Progressive validation: one line per closed window of 500 rows, then the open rest.
    with open(os.path.join(run, "progressive.csv")) as f:
        lines = list(csv.DictReader(f))
    assert [(r["kind"], r["start"], r["end"]) for r in lines] == [
        ("rows", "0", "500"), ("rows", "500", "1000"), ("rows", "1000", "1500"), ("rows-open", "1500", "1800")]
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in lines)
    # Resuming with nothing new trains nothing twice.
    assert main(_args(str(data), run, "--follow-idle-exit", "1", "--resume")) == 0
    assert _metrics(run)["steps"] == m["steps"] and _metrics(run)["state_digest"] == m["state_digest"]


def test_follow_rejects_bad_input(tmp_path, capsys):
    assert main(_args(str(tmp_path / "missing"), str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert "Invalid data" in err and "missing" in err and "Traceback" not in err
    assert main(["train", "--follow-idle-exit", "-1"]) == 2
    assert "Invalid follow_idle_exit: -1.0" in capsys.readouterr().err
    # The data clock needs a timestamp column; the Criteo preset has none.
    with pytest.raises(ConfigError, match="clock"):
        Trainer(TrainConfig(run_dir=str(tmp_path / "r"), clock="data"))


def test_data_clock_follows_the_newest_timestamp():
    clock = RunClock("data")
    clock.advance(torch.tensor([5, 9, 7]))
    clock.advance(torch.tensor([3]))
    assert clock() == 9.0
    assert abs(RunClock("wall")() - time.time()) < 5


def _checkpoint_step(run: str) -> int:
    folder = os.path.join(run, "checkpoints")
    steps = [int(n[5:15]) for n in os.listdir(folder) if n.endswith(".pt")] if os.path.isdir(folder) else []
    return max(steps, default=0)


@pytest.mark.slow
def test_kill_9_at_random_points_loses_nothing(tmp_path):
    """10 kill -9s while files keep arriving; after --resume the run ends with the uninterrupted digest."""
    files = 20
    ref_data, ref_run = tmp_path / "ref_in", str(tmp_path / "ref_run")
    ref_data.mkdir()
    for i in range(files):
        _drop(str(ref_data), i)
    assert main(_args(str(ref_data), ref_run, "--follow-idle-exit", "0.5", "--checkpoint-every", "2")) == 0
    reference = _metrics(ref_run)

    data, run = tmp_path / "in", str(tmp_path / "run")
    data.mkdir()
    writer_done = threading.Event()

    def produce():
        for i in range(files):
            _drop(str(data), i)
            time.sleep(2.0)
        writer_done.set()

    threading.Thread(target=produce, daemon=True).start()
    rng = random.Random(7)
    cmd = [sys.executable, "-m", "monolith_torch", *_args(str(data), run, "--resume", "--checkpoint-every", "2")]
    kills, progress = 0, []
    while kills < 10:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(rng.uniform(4.0, 10.0))  # a start takes about 5 s here: some kills land in it
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                progress.append(_checkpoint_step(run))
        finally:
            proc.kill()
            proc.wait(timeout=30)
    # The kills hit a run in progress: the checkpoints they left stop at several points part-way.
    assert len({p for p in progress if 0 < p < reference["steps"]}) >= 3, progress
    writer_done.wait(timeout=120)
    done = subprocess.run([*cmd, "--follow-idle-exit", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(run)["state_digest"] == reference["state_digest"]
    assert _metrics(run)["steps"] == reference["steps"]


def test_follow_weighs_a_short_batch_by_its_rows(tmp_path):
    """A file's short last batch moves the weights rows / batch_size as far as the plain mean would."""
    data = generate_criteo(str(tmp_path / "t.tsv"), 100, seed=0)
    deltas = {}
    for follow in (False, True):
        cfg = TrainConfig(run_dir=str(tmp_path / f"r{follow}"), batch_size=256, follow=follow, hidden=(8,),
                          dense_optimizer="sgd", dense_lr=0.1, clip_norm=1e9)
        trainer = Trainer(cfg, show_progress=False)
        batch = next(iter(trainer._read([data], 256, trainer.stats)))
        before = {k: v.clone() for k, v in trainer.model.named_parameters()}
        trainer._train_step(batch, None, 0)
        deltas[follow] = {k: v.detach() - before[k] for k, v in trainer.model.named_parameters()}
    assert len(batch) == 100
    for name, plain in deltas[False].items():
        torch.testing.assert_close(deltas[True][name], plain * (100 / 256), rtol=1e-4, atol=1e-7)


def test_data_clock_drives_expiry_in_a_follow_run(tmp_path):
    """--clock data: rows expire by the data's timestamps (1-day expire_time), as the live run would have."""
    data = tmp_path / "in"
    data.mkdir()
    day = 86400
    # Day 0: users 1..4; day 3: users 5..8 only. User rows of day 0 are then 3 days old.
    for i, (t0, users) in enumerate(((1_000 * day, range(1, 5)), (1_003 * day, range(5, 9)))):
        lines = ["label,ts,user"] + [f"{u % 2},{t0 + u},{u}" for u in users for _ in range(8)]
        (data / f".part-{i}.csv").write_text("\n".join(lines) + "\n")
        os.rename(data / f".part-{i}.csv", data / f"part-{i}.csv")
    features = ({"name": "label", "kind": "label"}, {"name": "ts", "kind": "timestamp"},
                {"name": "user", "kind": "categorical", "dtype": "int", "dim": 4, "expire_time": 1})
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), data=(str(data),), follow=True, follow_idle_exit=0.5,
                      follow_poll_s=0.1, clock="data", features=features, model="wide_deep", hidden=(8,),
                      batch_size=16)
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()  # the final checkpoint evicts rows older than expire_time on the data clock
    table = trainer.factory.tables["user"]
    ids, _ = table.serving_rows()
    assert sorted(ids.tolist()) == [5, 6, 7, 8]
    assert trainer.clock() == 1_003 * day + 8
    assert int(table.state_dict()["times"].max()) == 1_003 * day + 8
