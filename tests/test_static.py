"""The package's static checks (ruff, mypy; configured in pyproject.toml), so
that CI enforces them like any test.

Only vfiouser_vmem/ is checked: tests/ and bench/ do not pass the same rules
without a rewrite of their own (line lengths, import order, zip()).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vfiouser_vmem"


def tool(name: str) -> Path:
    # The venv's own: the versions the test extra installs, and a mypy that
    # sees the packages installed next to it (trio, prometheus_client).
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable} (it comes with the test extra)")
    return exe


def run(args: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True)


def test_ruff_passes_on_the_package() -> None:
    # --no-cache: nothing is written into the work tree.
    result = run([tool("ruff"), "check", "--no-cache", PACKAGE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_the_package() -> None:
    # The files come from [tool.mypy]; the cache goes nowhere, as ruff's.
    result = run([tool("mypy"), "--config-file", REPO / "pyproject.toml", "--cache-dir", "/dev/null"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_says_it_is_typed() -> None:
    # PEP 561: without py.typed in the installed package, its users' type
    # checkers ignore its annotations.
    assert (PACKAGE / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["vfiouser_vmem"]
