"""The systemd unit for real: `vfiouser-vmem install-unit`'s template run by
a real systemd, with every hardening option of the unit, as Type=notify;
a real guest attaches to the service's socket and grows.

PID 1 is not systemd on every machine this runs on (containers, CI), so
the manager is systemd's own user instance (``systemd --user``), run as
root in a private mount namespace (``unshare -m``): it applies the same
namespaces, seccomp filters, capability bounds and notify protocol as the
system instance.  systemd refuses to start unless /run/systemd/system
exists ("not booted with systemd"); in the namespace a tmpfs over
/run/systemd provides it.  Its runtime directory (``%t``) is a fresh
directory under /run, which the unit's PrivateTmp=/ProtectHome= leave
visible (under /tmp it would not be).  Everything is stopped and removed
at the end, by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import MIB, QmpClient, wait_for
from test_wheel import build_wheel, resolved

REPO = Path(__file__).resolve().parent.parent
EXE = os.path.join(os.path.dirname(sys.executable), "vfiouser-vmem")
SYSTEMD = "/lib/systemd/systemd"


def _hidden_paths_the_dev_install_needs() -> list[str]:
    """The checkout (the editable install imports from it), the
    interpreter and the libraries the compiled modules load, where the unit's PrivateTmp= and
    ProtectHome= hide them (/tmp, /root, /home): bound back read-only by
    the test's drop-in.  An installed wheel needs none (docs/operating.md)."""
    import vfiouser_vmem._vfu as vfu

    # The interpreter too (a pyenv build lives in /root/.pyenv).
    paths = {str(REPO), os.path.realpath(sys.base_prefix)}
    ldd = subprocess.run(["ldd", vfu.__file__], capture_output=True, text=True, check=True).stdout
    for lib in resolved(ldd).values():
        if lib.startswith("/"):  # not "not found"
            paths.add(os.path.dirname(os.path.realpath(lib)))
    return sorted(p for p in paths if p.split("/")[1] in ("tmp", "root", "home"))


class UserManager:
    """``systemd --user`` in a mount namespace of its own; ``systemctl``
    runs in that namespace (nsenter), where /run/systemd/system exists."""

    def __init__(self, log_path: Path) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="vmem-systemd-", dir="/run"))
        (self.runtime / "systemd" / "user").mkdir(parents=True)
        self.unit_dir = self.runtime / "systemd" / "user"
        # Where configurations are read from: under /etc, as in production
        # (the service sees the host's /etc, read-only).
        self.config_dir = Path(tempfile.mkdtemp(prefix="vfiouser-vmem-test-", dir="/etc"))
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(self.runtime)}
        self.env.pop("NOTIFY_SOCKET", None)
        # Its own log to our file (stderr), the failures of units included.
        manager_env = {**self.env, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "debug"}
        self.log = open(log_path, "wb")
        # In the namespace /run is a tmpfs of its own, as on a host booted
        # with systemd (where it is not one, e.g. a directory of the root
        # file system, systemd gives each service's namespace a fresh /run
        # and the notify socket vanishes from it); the runtime directory is
        # the host's, bound into it, so that QEMU outside sees the sockets.
        # /run/systemd/system tells systemd it may run; the nodes of
        # /run/systemd/inaccessible/ are those PID 1 makes at boot, which
        # ProtectHome=, ProtectKernelLogs= (...) mount over what they hide.
        rt = str(self.runtime)
        script = ("set -e; mount --make-rprivate /; hold=$(mktemp -d); mount --bind " + rt + " $hold; "
                  "mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p " + rt + "; mount --move $hold " + rt + "; "
                  "rmdir $hold; mkdir -p /run/systemd/system /run/systemd/inaccessible; cd /run/systemd/inaccessible; "
                  "touch reg; mkdir dir; mkfifo fifo; mknod chr c 0 0; mknod blk b 0 0; "
                  "chmod 0000 reg dir fifo chr blk; cd /; exec " + SYSTEMD + " --user")
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=manager_env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.systemctl("is-system-running", check=False).stdout.strip() in ("running",
                                                                                              "degraded"),
                     30, "the systemd user manager to run")
        except BaseException:
            self.stop()
            raise

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd --user exited with {self.proc.returncode}")
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "systemctl", "--user", *args],
                              env=self.env, capture_output=True, text=True, check=check, timeout=120)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # systemd --user stops its units and exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.config_dir, ignore_errors=True)


@pytest.fixture
def manager(workdir, request):
    for tool in ("unshare", "nsenter"):
        assert shutil.which(tool), f"{tool} (util-linux) is needed"
    assert os.access(SYSTEMD, os.X_OK), f"{SYSTEMD} is needed (Debian package systemd; scripts/setup.sh --kit)"
    m = UserManager(workdir / "systemd-user.log")
    yield m
    m.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print("---- systemd --user ----\n" + (workdir / "systemd-user.log").read_text(errors="replace"))


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def _serve_a_guest_under_the_unit(manager: UserManager, env, workdir: Path, exe: str, service_extra: str) -> None:
    """install-unit with ``exe``, a drop-in with ``service_extra`` and the
    test's log file, then: start (Type=notify), the hardening in force, a
    guest attaches and grows, reload, stop (exit 0, runtime dir gone)."""
    config_dir = manager.config_dir
    subprocess.run([exe, "install-unit", "--unit-dir", str(manager.unit_dir), "--config-dir", str(config_dir)],
                   check=True, capture_output=True)
    dropin = manager.unit_dir / "vfiouser-vmem@.service.d"
    dropin.mkdir()
    log_path = manager.runtime / "server.log"
    # No journald here: the log goes to a file the test reads (text format).
    (dropin / "test.conf").write_text("[Service]\n" + service_extra
                                      + f"StandardOutput=append:{log_path}\nStandardError=append:{log_path}\n"
                                      "Restart=no\n")
    # Relative socket paths: made in the runtime directory, the working directory.
    (config_dir / "t1.toml").write_text('qmp = "qmp.sock"\n[[object]]\nid = "mem0"\nsize = "1G"\n'
                                        '[[device]]\nid = "vm0"\nmemdev = "mem0"\nsocket = "vm0.sock"\n')
    manager.systemctl("daemon-reload")
    unit = "vfiouser-vmem@t1.service"
    # Type=notify: start returns once the server sent READY=1.
    started = manager.systemctl("start", unit, check=False)
    assert started.returncode == 0, (started.stderr, manager.systemctl("status", unit, check=False).stdout,
                                     log_path.read_text(errors="replace") if log_path.exists() else "")
    state = manager.show(unit, "ActiveState", "SubState", "StatusText", "MainPID", "Type")
    assert (state["ActiveState"], state["SubState"], state["Type"]) == ("active", "running", "notify")
    assert state["StatusText"] == "serving 1 device: vm0 waiting for a client"
    pid = int(state["MainPID"])
    # The installation install-unit was run from (its script is the interpreter's first argument).
    assert exe in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    rundir = manager.runtime / "vfiouser-vmem" / "t1"
    assert (rundir / "vm0.sock").exists() and (rundir / "qmp.sock").exists()

    # The hardening is in force on the running server.
    status = _status(pid)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # MemoryDenyWriteExecute, RestrictAddressFamilies, ...: filters
    assert int(status["CapBnd"], 16) == 1 << 0  # CAP_CHOWN only
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    # ProtectSystem=strict: /usr is read-only for it; PrivateTmp: its /tmp is not ours.
    mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    assert re.search(r" /usr \S+ ro[, ]", mounts) or re.search(r" / / ro[, ]", mounts), mounts
    assert not os.path.exists(f"/proc/{pid}/root{workdir}")

    guest = env.guest([str(rundir / "vm0.sock")])
    guest.wait_ready(180)
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"), 60,
             "virtio_mem to bind")
    assert manager.show(unit, "StatusText")["StatusText"] == "serving 1 device: vm0 client 1 connected"
    base_kib = guest.meminfo_kib()
    qmp = QmpClient(str(rundir / "qmp.sock"), timeout_s=30)
    try:
        qmp.execute("qom-set", path="vm0", property="requested-size", value=512 * MIB)
        wait_for(lambda: guest.meminfo_kib() == base_kib + 512 * 1024, 120, "the guest to grow by 512M")
        # systemctl reload: SIGHUP, rereads the log level; the server goes on.
        manager.systemctl("reload", unit)
        wait_for(lambda: "SIGHUP:" in log_path.read_text(), 30, "the server to log the SIGHUP")
        assert qmp.execute("qom-get", path="vm0", property="size") == 512 * MIB
        assert int(manager.show(unit, "MainPID")["MainPID"]) == pid
    finally:
        qmp.close()
    guest.stop()
    manager.systemctl("stop", unit)
    final = manager.show(unit, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert (final["ActiveState"], final["Result"], final["ExecMainStatus"]) == ("inactive", "success", "0"), final
    # RuntimeDirectory= is removed at stop, sockets and all.
    assert not rundir.exists()
    log = log_path.read_text()
    assert "SIGTERM: stopping" in log and "Traceback" not in log, log


def test_the_unit_as_shipped_runs_the_installed_wheel_and_a_guest_grows_on_it(manager, env, workdir):
    """The operator's path: the self-contained wheel in a venv of the
    distribution's Python, install-unit, the unit exactly as shipped
    (ProtectHome=yes: the build cache in /root/.cache is out of reach)."""
    python = "/usr/bin/python3"
    assert os.access(python, os.X_OK), "the distribution's python3 is needed (Debian package python3-venv)"
    wheel = build_wheel()
    venv = manager.runtime / "venv"  # under /run: neither /tmp nor /root, which the unit hides
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    _serve_a_guest_under_the_unit(manager, env, workdir, str(venv / "bin" / "vfiouser-vmem"), "")


def test_the_unit_runs_a_checkout_with_its_documented_drop_in(manager, env, workdir):
    """A development install (this checkout's venv): its interpreter, sources
    and libvfio-user build may live where the unit hides (/root, /tmp); the
    drop-in of docs/operating.md binds them back."""
    binds = " ".join(_hidden_paths_the_dev_install_needs())
    # Bind mounts beneath ProtectHome=yes's inaccessible /root are not
    # reachable without CAP_DAC_READ_SEARCH, which the unit drops: "tmpfs"
    # (an empty /root, /home) is how a checkout there runs under the unit.
    extra = f"BindReadOnlyPaths={binds}\nProtectHome=tmpfs\n" if binds else ""
    _serve_a_guest_under_the_unit(manager, env, workdir, EXE, extra)
