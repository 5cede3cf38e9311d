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
