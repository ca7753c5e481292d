"""Podman for the container tests (integration/test_containers.py): a storage
and a configuration of the project's own, the local Debian base image, and a
wheelhouse for builds that cannot reach PyPI.

Everything lives under ``VMEM_CACHE_DIR/containers`` (scripts/lib.sh), next
to the project's other caches: the host's own podman storage
(/var/lib/containers) and its containers.conf are neither read nor changed,
because podman reads ours through ``CONTAINERS_CONF`` and
``CONTAINERS_STORAGE_CONF``.  Images and build layers stay there between runs
(they are the cache); containers are the tests' to remove.

Why the configuration holds what it holds (measured on the project's Debian 12
CI hosts, podman 4.3, buildah 1.28):

- ``runtime = "runc"``: crun 1.8 refuses these hosts' hybrid cgroup layout,
  also with ``--cgroups=disabled``;
- ``cgroup_manager = "cgroupfs"``: PID 1 is not systemd here;
- ``default_ulimits``: podman's default raises nofile and nproc above the
  current hard limits, which fails without CAP_SYS_RESOURCE;
- ``tmp_dir`` and ``volume_path`` in our directory too, so that nothing of
  podman's is left in /run/libpod or /var/lib/containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO

#: The base image, made locally (Docker Hub is out of reach of the CI hosts).
BASE_IMAGE = "localhost/trixie-base"
#: Debian trixie's python3: the interpreter the images' venvs use, for which
#: the wheelhouse is downloaded.
TRIXIE_PYTHON = "3.13"
#: trixie's glibc 2.41: the newest manylinux tag its python3 can install is 2_41.
TRIXIE_GLIBC = 41
#: Where the builds see the wheelhouse (``podman build -v``, ``--build-arg WHEELHOUSE``).
WHEELHOUSE_IN_BUILD = "/wheelhouse"


def _cache_dir() -> Path:
    # scripts/lib.sh decides (VMEM_CACHE_DIR, XDG_CACHE_HOME, HOME), as for the other caches.
    out = subprocess.run(["bash", "-c", 'source "$1/scripts/lib.sh"; printf %s "$VMEM_CACHE_DIR"', "bash", str(REPO)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out)


@dataclass
class Podman:
    """``podman`` with the project's storage and configuration."""

    dir: Path = field(default_factory=lambda: _cache_dir() / "containers")

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.containers_conf = self.dir / "containers.conf"
        self.storage_conf = self.dir / "storage.conf"
        self.wheelhouse = self.dir / "wheelhouse"
        # Written every time (cheap): a changed recipe here takes effect at once.
        self.containers_conf.write_text(
            "# Written by integration/podman_env.py (its docstring says why).\n"
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.dir}/events.log"\n'
            f'tmp_dir = "{self.dir}/tmp"\n'
            f'volume_path = "{self.dir}/volumes"\n'
        )
        self.storage_conf.write_text(
            "# Written by integration/podman_env.py: the project's own image store.\n"
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.dir}/storage"\n'
            f'runroot = "{self.dir}/run"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.containers_conf),
                    "CONTAINERS_STORAGE_CONF": str(self.storage_conf)}

    def run(self, *args: str | Path, check: bool = True, timeout: float = 600,
            **kw) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *map(str, args)], env=self.env, text=True, capture_output=True,
                                timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())

    # -- the base image --------------------------------------------------------
    def ensure_base(self) -> bool:
        """Make ``BASE_IMAGE`` (debootstrap minbase trixie, imported) unless
        it exists; True when it was made."""
        if self.image_exists(BASE_IMAGE):
            return False
        root = Path(tempfile.mkdtemp(prefix="vmem-base-", dir=self.dir))
        try:
            mirror = os.environ.get("VMEM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
            subprocess.run(["debootstrap", "--variant=minbase", "trixie", str(root), mirror], check=True,
                           capture_output=True, timeout=1800)
            # As in Debian's own images: no downloaded packages, package
            # lists or apt caches (each build's RUN starts with apt-get update).
            for junk in ("var/cache/apt", "var/lib/apt/lists"):
                shutil.rmtree(root / junk, ignore_errors=True)
            (root / "var/cache/apt/archives/partial").mkdir(parents=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            self.run("import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE, stdin=tar.stdout)
            tar.stdout.close()
            assert tar.wait() == 0
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return True

    # -- the wheelhouse --------------------------------------------------------
    def requirements(self) -> list[str]:
        """What pip installs in the two images: the wheel tools of
        scripts/build-wheel, the build requirements, the dependencies and
        the test and bench extras, and what scripts/setup.sh upgrades."""
        tools = re.search(r"^TOOL_REQS=\((.*)\)$", (REPO / "scripts" / "build-wheel").read_text(), re.M)
        setup = re.search(r'pip install -q -U (.*) >&2$', (REPO / "scripts" / "setup.sh").read_text(), re.M)
        project = tomllib.loads((REPO / "pyproject.toml").read_text())
        reqs = [*tools[1].split(), *(r.strip('"') for r in setup[1].split()),
                *project["build-system"]["requires"], *project["project"]["dependencies"]]
        for extra in project["project"]["optional-dependencies"].values():
            reqs += extra
        return reqs

    def ensure_wheelhouse(self) -> bool:
        """Download the wheels for trixie's python3 (``pip download``) unless
        the wheelhouse holds those of the same requirements; True when it
        downloaded.  Builds use it where PyPI is out of reach: a TLS proxy
        whose CA the images do not carry (docker/README.md)."""
        reqs = self.requirements()
        want = hashlib.sha256(json.dumps([reqs, TRIXIE_PYTHON, TRIXIE_GLIBC]).encode()).hexdigest()[:16]
        stamp = self.wheelhouse / ".requirements"
        if stamp.is_file() and stamp.read_text() == want:
            return False
        shutil.rmtree(self.wheelhouse, ignore_errors=True)
        self.wheelhouse.mkdir()
        # Every manylinux tag trixie's glibc runs, each by name: pip takes a
        # --platform literally (manylinux_2_41 does not admit manylinux_2_5).
        platforms = [a for minor in range(TRIXIE_GLIBC, 4, -1) for a in ("--platform", f"manylinux_2_{minor}_x86_64")]
        platforms += [a for tag in ("manylinux2014", "manylinux2010", "manylinux1")
                      for a in ("--platform", f"{tag}_x86_64")]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(self.wheelhouse),
                        "--only-binary=:all:", "--implementation", "cp", "--python-version", TRIXIE_PYTHON,
                        *platforms, *reqs],
                       check=True, capture_output=True, timeout=1800,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        stamp.write_text(want)
        return True

    # -- builds ----------------------------------------------------------------
    def build(self, dockerfile: str, tag: str, *, use_wheelhouse: bool = True,
              timeout: float = 3600) -> tuple[float, str]:
        """``podman build`` of a Dockerfile of docker/ from the repository;
        (seconds, output)."""
        args = ["build", "--format", "docker",  # OCI images have no HEALTHCHECK
                "--force-rm",
                "--pull=never", "--network", "host",  # no bridge, no iptables rules left behind
                "--build-arg", f"BASE={BASE_IMAGE}", "-f", REPO / "docker" / dockerfile, "-t", tag]
        if use_wheelhouse:
            args += ["-v", f"{self.wheelhouse}:{WHEELHOUSE_IN_BUILD}:ro",
                     "--build-arg", f"WHEELHOUSE={WHEELHOUSE_IN_BUILD}"]
        before = self.working_containers()
        start = time.monotonic()
        try:
            result = self.run(*args, REPO, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            # A build that is killed leaves its working containers behind
            # (--force-rm covers the ones that fail): they are this build's.
            self.remove_working_containers(self.working_containers() - before)
            raise
        seconds = time.monotonic() - start
        if result.returncode != 0:
            self.remove_working_containers(self.working_containers() - before)
            raise AssertionError(f"podman build -f docker/{dockerfile} failed ({result.returncode}):\n"
                                 f"{result.stdout[-8000:]}\n{result.stderr[-8000:]}")
        return seconds, result.stdout + result.stderr

    def working_containers(self) -> set[str]:
        """The IDs of buildah's working containers (builds under way) in our storage."""
        out = subprocess.run(["buildah", "containers", "--quiet", "--notruncate"], env=self.env, text=True,
                             capture_output=True, check=True, timeout=60).stdout
        return set(out.split())

    def remove_working_containers(self, ids: set[str]) -> None:
        if ids:
            subprocess.run(["buildah", "rm", *sorted(ids)], env=self.env, capture_output=True, timeout=120)
