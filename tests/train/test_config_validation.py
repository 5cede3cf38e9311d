"""Settings: every key in every TOML table is used or reported; values are finite and in range;
the config file is read with a size limit. Each failure is one ``error:`` line and exit code 2."""

from __future__ import annotations

import pytest

from monolith_torch.train.cli import main
from monolith_torch.train.config import MAX_CONFIG_BYTES, ConfigError, TrainConfig, load_config


@pytest.mark.parametrize(
    "key, value",
    [
        ("dense_weight_decay", float("nan")),
        ("dense_weight_decay", float("inf")),
        ("dense_lr", float("inf")),
        ("clip_norm", float("nan")),
        ("dist_timeout_s", float("inf")),
        ("dist_timeout_s", 1e300),
        ("seed", 2**64),
        ("seed", -1),
        ("threads", 10**12),
        ("threads", 1025),
        ("batch_size", 2**63),
        ("hidden", (16, True)),
    ],
)
def test_out_of_range_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"Invalid {key}: "):
        TrainConfig(**{key: value})


def test_limits_that_still_work():
    cfg = TrainConfig(seed=2**63 - 1, threads=1024, dist_timeout_s=7 * 24 * 3600, dense_weight_decay=0.5)
    assert cfg.seed == 2**63 - 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dense-weight-decay", "nan"], "Invalid dense_weight_decay: nan"),
        (["--dense-weight-decay", "inf"], "Invalid dense_weight_decay: inf"),
        (["--dist-timeout-s", "inf"], "Invalid dist_timeout_s: inf"),
        (["--seed", "99999999999999999999999999"], "Invalid seed: 99999999999999999999999999"),
        (["--threads", "99999999999"], "Invalid threads: 99999999999"),
        (["--clip-norm", "1e999"], "Invalid clip_norm: inf"),
        (["--max-steps", "true"], "Invalid max_steps: 'true'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monolith-torch train: error: ") and message in err[0], err
    assert not run.exists()


def _config(tmp_path, text: str | bytes):
    path = tmp_path / "run.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("max_steps = -3\n[train]\nbatch_size = 64\n", "config key 'max_steps'"),
        ("learning_rat = 0.1\n[train]\nbatch_size = 64\n", "config key 'learning_rat'"),
        ("[train]\nbatch_size = 64\n[other]\nx = 1\n", "config key 'other'"),
        ("[train]\nmax_steps = -3\n", "Invalid max_steps: -3"),
        ("[train]\nlearning_rat = 0.1\n", "unknown config key 'learning_rat'"),
        ("dense_weight_decay = nan\n", "Invalid dense_weight_decay: nan"),
        ("dist_timeout_s = inf\n", "Invalid dist_timeout_s: inf"),
        ("seed = 9223372036854775807\nthreads = 5000\n", "Invalid threads: 5000"),
        ("batch_size = true\n", "Invalid batch_size: True"),
        ("hidden = [16, 1.5]\n", "Invalid hidden"),
    ],
)
def test_every_key_in_every_table_is_used_or_reported(tmp_path, capsys, toml, message):
    config = _config(tmp_path, toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(config)
    run = tmp_path / "run"
    assert main(["train", "--config", config, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()


def test_a_train_table_alone_still_works(tmp_path):
    cfg = load_config(_config(tmp_path, "[train]\nbatch_size = 64\nhidden = [4]\n"))
    assert cfg.batch_size == 64 and cfg.hidden == (4,)


def test_a_config_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    config = _config(tmp_path, b"batch_size = 64\nrun_dir = '\xff\xfe'\n")
    assert main(["train", "--config", config, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not UTF-8 text" in err[0], err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_a_config_larger_than_the_limit_is_refused(tmp_path, capsys, source):
    if source == "big":
        source = _config(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert main(["train", "--config", source, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"larger than {MAX_CONFIG_BYTES} bytes" in err[0], err


def test_control_characters_in_a_config_are_escaped(tmp_path, capsys):
    config = _config(tmp_path, 'dense_optimizer = "\\u001b]0;owned\\u0007"\n')
    assert main(["train", "--config", config, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]0;owned\\x07" in err
