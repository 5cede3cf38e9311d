"""The package layout's rules: one-way imports (import-linter), docstrings, Monolith's module names."""

import importlib
import pathlib
import shutil
import subprocess
import sys

import pytest

import monolith_torch

SRC = pathlib.Path(monolith_torch.__file__).parent
ROOT = SRC.parent.parent


def _lint_imports() -> str | None:
    exe = pathlib.Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports")


def test_import_layers_hold():
    exe = _lint_imports()
    assert exe is not None, "import-linter is part of the test extra; install monolith-torch[test]"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_every_module_says_what_it_is_for(path):
    text = path.read_text()
    assert text.lstrip().startswith('"""'), f"{path.relative_to(SRC)} has no module docstring"


@pytest.mark.parametrize(
    "name, home",
    [
        ("feature_utils", "monolith_torch.step.api"),
        ("clip_ops", "monolith_torch.step.clip_ops"),
        ("distribution_ops", "monolith_torch.distributed.flat_buffers"),
        ("entry", "monolith_torch.embedding.entry"),
        ("embedding_combiners", "monolith_torch.embedding.combiners"),
        ("native_context", "monolith_torch.step.context"),
        ("feature", "monolith_torch.embedding.feature"),
    ],
)
def test_monolith_module_names_are_the_same_modules(name, home):
    assert importlib.import_module(f"monolith_torch.{name}") is importlib.import_module(home)


def test_public_surface_is_importable():
    for name in monolith_torch.__all__:
        assert getattr(monolith_torch, name) is not None


def test_console_script_entry_point_imports():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
