"""The CLI's documented exit codes: one ``error:`` line each, never a traceback."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from monolith_torch.train import trainer as trainer_module
from monolith_torch.train.cli import EXIT_CODES, main
from monolith_torch.train.data import generate_criteo

SMALL = ["--batch-size", "256", "--hidden", "8", "--emb-dim", "4", "--eval-batch-size", "512"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if " [rank 0] INFO " not in line]


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert EXIT_CODES.splitlines()[1] in out
    for text in ("  2 ", "  74 ", "  130 ", "143 by SIGTERM"):
        assert text in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    data = generate_criteo(str(d / "rows.tsv"), 600, seed=3)
    assert main(["train", "--run-dir", str(d / "run"), "--data", data, "--max-steps", "2", *SMALL]) == 0
    return d / "run", data


def test_a_write_error_while_running_is_one_line_and_exit_74(tmp_path, trained, monkeypatch, capsys):
    run, data = trained

    def disk_full(self, paths, output):
        raise OSError(errno.ENOSPC, "No space left on device", output)

    monkeypatch.setattr(trainer_module.Trainer, "predict", disk_full)
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run), "--data", data, "--output", str(tmp_path / "s.tsv"), *SMALL]) == 74
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "error: [Errno 28] No space left on device" in err[0], err


def test_a_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, trained, capsys):
    run, data = trained
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "ckpt-0000000009.pt").write_bytes(b"MTCKPT1\n" + b"0" * 200)
    assert main(["eval", "--run-dir", str(copy), "--eval-data", data, *SMALL]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "error: checkpoint" in err[0] and "ckpt-0000000009.pt" in err[0], err


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_predicting_leaves_the_old_output(tmp_path, trained, monkeypatch, capsys, signum, code):
    run, data = trained
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "scores.tsv"
    out.write_text("previous scores\n")
    original = trainer_module.Trainer._scores

    def scores_then_signal(self, paths):
        result = original(self, paths)
        os.kill(os.getpid(), signum)  # arrives while the output is being written at the latest
        return result

    monkeypatch.setattr(trainer_module.Trainer, "_scores", scores_then_signal)
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run), "--data", data, "--output", str(out), *SMALL]) == code
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"by {signal.Signals(signum).name}" in err[0], err
    assert out.read_text() == "previous scores\n"
    assert sorted(os.listdir(tmp_path)) == ["scores.tsv"]
    assert signal.getsignal(signal.SIGTERM) is before
