"""The README's library example runs as written."""

from __future__ import annotations

import pathlib
import re

import monolith_torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor(1)" in printed  # the global step after one step


def test_public_names_are_exported():
    for name in monolith_torch.__all__:
        assert hasattr(monolith_torch, name), name


def test_readme_run_toml_example_is_a_valid_config_and_schema(tmp_path):
    from monolith_torch.train.build import model_options, run_schema
    from monolith_torch.train.config import load_config

    block = README.read_text().split("# run.toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "run.toml"
    path.write_text(block)
    cfg = load_config(str(path))
    schema = run_schema(cfg)
    assert [f.kind for f in schema.features] == ["label", "dense", "categorical", "multi", "sequence"]
    assert cfg.model == "dcn_v2" and model_options(cfg)["cross_layers"] == 2
