"""
The linter and the type checker, run by the test command so that a change
that breaks either fails the suite like any other regression.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = [
    "twisted_rekey",
    "tests",
    "examples",
    "benchmarks",
    "twisted",
    "docs",
    "build_backend",
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _need(module: str) -> None:
    if _run(module, "--version").returncode:
        pytest.fail(f"{module} is not installed: pip install -e '.[lint]'")


def test_ruff_check() -> None:
    _need("ruff")
    paths = [p for p in LINTED if (ROOT / p).exists()]
    result = _run("ruff", "check", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    _need("ruff")
    paths = [p for p in LINTED if (ROOT / p).exists()]
    result = _run("ruff", "format", "--check", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    _need("mypy")
    result = _run("mypy")  # files and strictness come from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
