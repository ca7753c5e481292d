"""The images of docker/, built and run with podman: the server as a sidecar
(docker/Dockerfile.runtime) serving a real guest whose QEMU runs on the host,
and the test-runner image (docker/Dockerfile).

No Docker Hub here: the base image is made locally (debootstrap minbase
trixie, imported), and the builds take it by ``--build-arg BASE``.  PyPI is
reached by the host's pip only (the builds' TLS would meet a proxy whose CA
the images do not carry), so the wheels are downloaded on the host into a
wheelhouse that the builds mount.  Storage, configuration and wheelhouse are
the project's own, in VMEM_CACHE_DIR/containers (integration/podman_env.py):
the base image, the images and their layers stay there as the cache of the
next run; every container a test starts is removed by its name, also when
the test fails.

The sidecar shares nothing with the host but a directory, bind-mounted as its
socket volume: the vfio-user and QMP sockets are made there by the image's
unprivileged user, and the server hands its memory to QEMU as a file
descriptor over the vfio-user socket (SCM_RIGHTS), so no /dev/shm is shared.
QEMU runs as root on the host, which the sockets' 0600 does not keep out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import GIB, Guest, QmpClient, short_tmpdir, stop_and_report, wait_for
from podman_env import BASE_IMAGE, Podman

RUNTIME_IMAGE = "localhost/vfiouser-vmem"
TESTS_IMAGE = "localhost/vfiouser-vmem-tests"
#: docker/Dockerfile.runtime's user (ARG UID): it makes the sockets.
SIDECAR_UID = 10001
#: The image's socket volume and what its CMD serves there.
VOLUME = "/run/vfiouser-vmem"
SOCKET, QMP = "vmem0.sock", "qmp.sock"
METRICS_PORT = 9464
BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    if os.environ.get("VMEM_TEST_IMAGE") == "1":
        # Inside the test-runner image itself (docker/Dockerfile sets it): a
        # container in a container needs privileges that image is not run with.
        pytest.skip("builds and runs containers: on a host, not inside the test-runner image")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (scripts/setup.sh --kit installs podman, buildah and runc)")
    # containers/image keeps a blob-info cache in /var/lib/containers/cache
    # for root whatever the storage configuration says: made by us, it goes.
    var_lib = Path("/var/lib/containers")
    existed = var_lib.exists()
    yield Podman()
    if not existed and var_lib.is_dir():
        left = sorted(str(p.relative_to(var_lib)) for p in var_lib.rglob("*"))
        if set(left) <= {"cache", "cache/blob-info-cache-v1.boltdb"}:
            shutil.rmtree(var_lib)


@pytest.fixture(scope="module")
def images(podman) -> dict[str, float]:
    """Both images built (from the layer cache when nothing changed); the
    seconds each step took."""
    seconds: dict[str, float] = {}
    start = time.monotonic()
    podman.ensure_base()
    seconds["base image (debootstrap + import, or cached)"] = time.monotonic() - start
    start = time.monotonic()
    podman.ensure_wheelhouse()
    seconds["wheelhouse (pip download on the host, or cached)"] = time.monotonic() - start
    seconds["podman build docker/Dockerfile.runtime"], _ = podman.build("Dockerfile.runtime", RUNTIME_IMAGE)
    seconds["podman build docker/Dockerfile (test runner)"], _ = podman.build("Dockerfile", TESTS_IMAGE)
    for image in (BASE_IMAGE, RUNTIME_IMAGE, TESTS_IMAGE):
        print(f"image {image}: {podman.image_size(image) / 1e6:.0f} MB")
    return seconds


class Containers:
    """Containers of one test, by the names it gave them: removed at the end."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.names: list[str] = []

    def name(self, what: str) -> str:
        # Unique, so that two runs (two checkouts) never touch each other's.
        name = f"vmem-test-{what}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def logs(self, name: str) -> str:
        result = self.podman.run("logs", name, check=False)
        return result.stdout + result.stderr

    def remove_all(self, failed: bool) -> None:
        for name in reversed(self.names):
            if failed:
                print(f"===== podman logs {name} =====\n{self.logs(name)[-20000:]}")
            self.podman.run("rm", "--force", "--ignore", "--time", "0", name, check=False)


@pytest.fixture
def containers(request, podman):
    made = Containers(podman)
    yield made
    rep = getattr(request.node, "rep_call", None)
    made.remove_all(failed=rep is None or rep.failed)


def inspect(podman: Podman, name: str, template: str) -> str:
    return podman.run("inspect", "--format", template, name).stdout.strip()


def test_the_runtime_image_is_the_server_and_nothing_else(podman, images, containers, timing) -> None:
    for what, seconds in images.items():
        timing(what, seconds)
    config = json.loads(podman.run("image", "inspect", "--format", "{{json .Config}}", RUNTIME_IMAGE).stdout)
    assert config["Entrypoint"] == ["vfiouser-vmem", "serve"]
    assert config["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"
    assert VOLUME in config["Volumes"]
    assert f"{METRICS_PORT}/tcp" in config["ExposedPorts"]
    health = json.loads(podman.run("image", "inspect", "--format", "{{json .HealthCheck}}", RUNTIME_IMAGE).stdout)
    assert health["Test"] == ["CMD", "vfiouser-vmem", "ctl", "--qmp-timeout", "10", "info"], health
    # No compiler, no sources, no build cache: only python3 and the venv.
    probe = containers.name("probe")
    out = podman.run("run", "--rm", "--name", probe, "--network", "none", "--entrypoint", "/bin/sh", RUNTIME_IMAGE,
                     "-c", "id -u; vfiouser-vmem --version; for p in gcc cc git meson pip3 /src /cache "
                     "/root/.cache; do command -v $p >/dev/null || test -e $p && echo found $p; done; true").stdout
    lines = out.splitlines()
    assert lines[0] == str(SIDECAR_UID)
    assert lines[1].startswith("vfiouser-vmem ")
    assert lines[2:] == [], out


def test_the_sidecar_serves_a_guest_on_the_host(kit, podman, images, containers, workdir) -> None:
    # The socket volume: a host directory the image's user may write in.
    sockets = short_tmpdir()
    sidecar = containers.name("sidecar")
    started: list[Guest] = []
    qmp: QmpClient | None = None
    failed = True
    try:
        os.chown(sockets, SIDECAR_UID, SIDECAR_UID)
        # --network none: the server needs no network for its sockets, and its
        # metrics are read from inside (below); no bridge is made on the host.
        podman.run("run", "--detach", "--name", sidecar, "--network", "none",
                   "--volume", f"{sockets}:{VOLUME}", RUNTIME_IMAGE)

        def ready() -> bool:
            if inspect(podman, sidecar, "{{.State.Running}}") != "true":
                raise AssertionError(f"the sidecar exited:\n{containers.logs(sidecar)}")
            return "ready" in containers.logs(sidecar)

        wait_for(ready, 60, "the sidecar's ready line")
        assert sorted(p.name for p in sockets.iterdir()) == [QMP, SOCKET]
        for name in (QMP, SOCKET):
            st = (sockets / name).stat()
            assert (st.st_uid, st.st_mode & 0o777) == (SIDECAR_UID, 0o600), name

        qmp = QmpClient(str(sockets / QMP), timeout_s=30)
        guest = Guest(kit, workdir, [str(sockets / SOCKET)])
        started.append(guest)
        guest.wait_ready(BOOT_TIMEOUT_S)
        wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
                 60, "virtio_mem to bind")
        base_kib = guest.meminfo_kib()

        def size() -> int:
            return qmp.execute("qom-get", path="vmem0", property="size")

        qmp.execute("qom-set", path="vmem0", property="requested-size", value=1 * GIB)
        wait_for(lambda: size() == 1 * GIB, RESIZE_TIMEOUT_S, "size 1 GiB over the sidecar's QMP")
        wait_for(lambda: guest.meminfo_kib() == base_kib + GIB // 1024, RESIZE_TIMEOUT_S,
                 "the guest's MemTotal 1 GiB above its base")
        qmp.execute("qom-set", path="vmem0", property="requested-size", value=0)
        wait_for(lambda: size() == 0, RESIZE_TIMEOUT_S, "size 0 over the sidecar's QMP")
        wait_for(lambda: guest.meminfo_kib() == base_kib, RESIZE_TIMEOUT_S, "the guest's MemTotal back at its base")
        qmp.close()
        qmp = None

        # The health check, as the image defines it; and the same command
        # does fail where no server answers.
        health = podman.run("healthcheck", "run", sidecar, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        assert inspect(podman, sidecar, "{{.State.Health.Status}}") == "healthy"
        nobody = podman.run("exec", "--env", f"VFIOUSER_VMEM_QMP={VOLUME}/none.sock", sidecar,
                            "vfiouser-vmem", "ctl", "--qmp-timeout", "5", "info", check=False)
        assert nobody.returncode == 1, nobody.stdout + nobody.stderr

        # The metrics listen on the exposed port (in the container's own network namespace).
        metrics = podman.run("exec", sidecar, "python3", "-c", "import urllib.request; print(urllib.request"
                             f".urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())")
        assert "vfiouser_vmem_requests_total" in metrics.stdout, metrics.stdout[-3000:]

        stop_and_report(guest, False)
        started.clear()
        # podman stop: SIGTERM, then (after --time) SIGKILL; the server exits 0 and removes its sockets.
        podman.run("stop", "--time", "60", sidecar)
        assert inspect(podman, sidecar, "{{.State.ExitCode}}") == "0", containers.logs(sidecar)
        assert list(sockets.iterdir()) == []
        failed = False
    finally:
        if qmp is not None:
            qmp.close()
        for guest in started:
            stop_and_report(guest, failed)
        shutil.rmtree(sockets, ignore_errors=True)


def test_the_test_image_has_its_own_venv_and_kit(podman, images, containers) -> None:
    # The checkout's .venv and .git stay out (.dockerignore): the image's venv
    # is its own (trixie's Python), and its repository has no history.
    runner = containers.name("runner")
    out = podman.run("run", "--rm", "--name", runner, "--network", "none", TESTS_IMAGE, "bash", "-c",
                     ".venv/bin/python -c 'import sys, vfiouser_vmem._vfu; print(sys.version_info[:2])'; "
                     "git log --oneline 2>&1 | head -1; ls dist 2>&1 | head -1; "
                     "bash integration/build-kit.sh; "
                     ".venv/bin/python -m pytest -q -p no:cacheprovider tests/test_repository.py 2>&1 | tail -1",
                     timeout=600, check=False)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 5, out.stdout + out.stderr
    assert lines[0] == "(3, 13)"
    assert "does not have any commits" in lines[1]
    assert "No such file" in lines[2]
    assert lines[3] == "/root/.cache/vfiouser-vmem/kit"
    assert " passed" in lines[4] and "failed" not in lines[4], out.stdout


def test_a_group_both_sides_know_lets_another_user_in(podman, images, containers) -> None:
    # docker/README.md, "Sockets": the sidecar joins a group (--group-add) and
    # gives its sockets to it (--socket-group); a client of another user in
    # that group connects, one outside it does not.  The client is a second
    # container on the same directory (the image's own ctl, as user 20000).
    gid = 4242
    sockets = short_tmpdir()
    try:
        os.chown(sockets, SIDECAR_UID, gid)
        os.chmod(sockets, 0o750)
        sidecar = containers.name("grouped")
        podman.run("run", "--detach", "--name", sidecar, "--network", "none", "--group-add", str(gid),
                   "--volume", f"{sockets}:{VOLUME}", RUNTIME_IMAGE,
                   "--socket", f"{VOLUME}/{SOCKET}", "--size", "1G", "--qmp", f"{VOLUME}/{QMP}",
                   "--socket-group", str(gid))
        wait_for(lambda: "ready" in containers.logs(sidecar), 60, "the sidecar's ready line")
        for name in (QMP, SOCKET):
            st = (sockets / name).stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (SIDECAR_UID, gid, 0o660), name

        def ctl_as(user: str) -> subprocess.CompletedProcess[str]:
            return podman.run("run", "--rm", "--name", containers.name("client"), "--network", "none",
                              "--user", user, "--volume", f"{sockets}:{VOLUME}", "--entrypoint", "vfiouser-vmem",
                              RUNTIME_IMAGE, "ctl", "--qmp-timeout", "5", "info", check=False)

        member = ctl_as(f"20000:{gid}")
        assert member.returncode == 0 and "vmem0" in member.stdout, member.stdout + member.stderr
        stranger = ctl_as("20000:20000")
        assert stranger.returncode == 1 and "Permission denied" in stranger.stdout + stranger.stderr, \
            stranger.stdout + stranger.stderr
        podman.run("stop", "--time", "60", sidecar)
        assert inspect(podman, sidecar, "{{.State.ExitCode}}") == "0"
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
