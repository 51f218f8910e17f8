"""The import layers of docs/architecture.md hold: `lint-imports` keeps the pyproject.toml contract for this
checkout, and breaks it for a copy of the package with one import pointing up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

CONTRACT = "segkit layers: imports point down only"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with root's pyproject.toml, on the `segkit` package under root (not an installed one)."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", str(root / "pyproject.toml")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_this_checkout_keeps_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{CONTRACT} KEPT" in result.stdout and "0 broken" in result.stdout


def test_an_import_pointing_up_breaks_the_layers(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "segkit", tmp_path / "segkit", ignore=shutil.ignore_patterns("__pycache__", "conf"))
    errors = tmp_path / "segkit" / "errors.py"  # the lowest layer
    errors.write_text(errors.read_text() + "\n\ndef _report() -> None:\n    from segkit.cli import report  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{CONTRACT} BROKEN" in result.stdout and "1 broken" in result.stdout
    assert "segkit.errors -> segkit.cli.report" in result.stdout, result.stdout[-3000:]
