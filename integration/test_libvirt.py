"""A libvirt domain from ``qemu-args --format libvirt``, run by a real
libvirtd with the kit's QEMU: the guest attaches to our server, grows and
shrinks through ``vfiouser-vmem ctl resize``; ``virsh destroy`` leaves the
server serving and the next ``virsh start`` attaches again (docs/libvirt.md).

libvirt comes from Debian (scripts/setup.sh --kit installs it without
starting it).  The test configures and starts its own libvirtd and virtlogd
(PID 1 need not be systemd: ``-d`` daemonises them), and at the end
destroys and undefines its domain, stops both daemons by PID and restores
/etc/libvirt/qemu.conf byte for byte.  A libvirtd that already runs is
someone else's: the test refuses to touch it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import GIB, MIB, Guest, Kit, kvm_works, wait_for

EXE = os.path.join(os.path.dirname(sys.executable), "vfiouser-vmem")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: What libvirt needs to drive the kit's QEMU as root here: no sVirt labels
#: (none are set up for /tmp sockets), QEMU as root like the server, and no
#: chown of the images and sockets it is given.
QEMU_CONF_SETTINGS = 'security_driver = "none"\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
CONNECT = ["-c", "qemu:///system"]


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", *CONNECT, *args], capture_output=True, text=True, check=check, timeout=timeout)


def _pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def libvirtd():
    """libvirtd and virtlogd of this test, with QEMU_CONF_SETTINGS."""
    for tool in ("libvirtd", "virtlogd", "virsh"):
        assert subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode == 0, (
            f"{tool} is missing: scripts/setup.sh --kit installs libvirt")
    if _alive(_pid("/run/libvirtd.pid")) or _alive(_pid("/run/virtlogd.pid")):
        pytest.fail("a libvirtd or virtlogd runs already (not this test's): stop it, or run this test elsewhere")
    saved = QEMU_CONF.read_bytes()
    # The daemons' runtime directory, with their sockets: gone again at the end if it was not here.
    run_dir_was_there = os.path.exists("/run/libvirt")
    started: list[tuple[str, str]] = []
    try:
        QEMU_CONF.write_bytes(saved + b"\n# integration/test_libvirt.py (restored at its end)\n"
                              + QEMU_CONF_SETTINGS.encode())
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            subprocess.run([daemon, "-d"], check=True, timeout=60)
            started.append((daemon, pidfile))
            wait_for(lambda pf=pidfile: _alive(_pid(pf)), 30, f"{daemon} to write its pid file")
        wait_for(lambda: virsh("list", "--all", check=False).returncode == 0, 60, "libvirtd to answer")
        yield
    finally:
        for daemon, pidfile in reversed(started):
            pid = _pid(pidfile)
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
                try:
                    wait_for(lambda p=pid: not _alive(p), 60, f"{daemon} to exit")
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
        QEMU_CONF.write_bytes(saved)
        if not run_dir_was_there:
            shutil.rmtree("/run/libvirt", ignore_errors=True)


class _DomainProcess:
    """What Guest asks of its QEMU process, for a domain libvirt runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.returncode: int | None = None

    def poll(self) -> int | None:
        state = virsh("domstate", self.name, check=False).stdout.strip()
        self.returncode = None if state == "running" else 1
        return self.returncode


class LibvirtGuest(Guest):
    """The harness's guest (its shell on the second serial port), in a
    libvirt domain made from ``vfiouser-vmem qemu-args --format libvirt``
    plus what the kit's guest needs: the emulator, the kernel and initrd,
    the two serial ports."""

    def __init__(self, kit: Kit, workdir: Path, name: str, domain_xml: str) -> None:
        import socket

        self.kit = kit
        self.workdir = workdir
        self.name = name
        self.console_path = workdir / f"{name}-console.log"
        self.stderr_path = Path(f"/var/log/libvirt/qemu/{name}.log")
        self.cmd_path = str(workdir / f"{name}-cmd.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.cmd_path)
        self.listener.listen(1)
        self.listener.settimeout(1)
        self.conn = None
        self._buf = b""
        self.proc = _DomainProcess(name)
        kernel, initrd, self.kernel_version = kit.guest_files("trixie")
        domain = ET.fromstring(domain_xml)
        domain.set("type", "kvm" if kvm_works() else "qemu")
        os_ = domain.find("os")
        for tag, text in (("kernel", kernel), ("initrd", initrd),
                          ("cmdline", "console=ttyS0 memhp_default_state=online_movable loglevel=6 panic=-1")):
            ET.SubElement(os_, tag).text = text
        ET.SubElement(domain, "on_reboot").text = "restart"
        devices = domain.find("devices")
        ET.SubElement(devices, "emulator").text = kit.qemu
        console = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(console, "source", path=str(self.console_path))
        ET.SubElement(console, "target", port="0")
        cmd = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(cmd, "source", mode="connect", path=self.cmd_path)
        ET.SubElement(cmd, "target", port="1")
        self.xml_path = workdir / f"{name}.xml"
        self.xml_path.write_text(ET.tostring(domain, encoding="unicode"))
        virsh("define", str(self.xml_path))
        self.defined = True

    def start(self) -> None:
        self.conn = None
        self._buf = b""
        virsh("start", self.name)

    def destroy(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        virsh("destroy", self.name, check=False)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        self.destroy()
        if self.defined:
            virsh("undefine", self.name, check=False)
            self.defined = False
        self.listener.close()
        for path in (self.cmd_path, self.stderr_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return 0

    def qemu_log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def ctl(qmp: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "ctl", "--qmp", qmp, *args], capture_output=True, text=True, timeout=180)


def test_a_libvirt_domain_from_qemu_args_grows_shrinks_and_reattaches(libvirtd, kit, env, workdir):
    server = env.server(size="2G")
    xml = subprocess.run([EXE, "qemu-args", "--format", "libvirt", "--socket", server.socket, "--size", "2G",
                          "--ram", "1G", "--name", f"vmem-test-{os.getpid()}"],
                         capture_output=True, text=True, check=True).stdout
    guest = LibvirtGuest(kit, workdir, f"vmem-test-{os.getpid()}", xml)
    try:
        guest.start()
        guest.wait_ready(240)
        wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"), 60,
                 "virtio_mem to bind")
        assert server.get("size") == 0
        base_kib = guest.meminfo_kib()
        grown = ctl(server.qmp_path, "resize", "vmem0", "1G", "--wait", "--timeout", "120")
        assert grown.returncode == 0, grown.stderr
        wait_for(lambda: guest.meminfo_kib() == base_kib + GIB // 1024, 60, "the guest's MemTotal to grow by 1G")
        shrunk = ctl(server.qmp_path, "resize", "vmem0", "256M", "--wait", "--timeout", "180")
        assert shrunk.returncode == 0, shrunk.stderr
        wait_for(lambda: guest.meminfo_kib() == base_kib + 256 * MIB // 1024, 60, "the guest to shrink to 256M")

        # virsh destroy: QEMU is killed; the server sees a lost connection and serves on.
        guest.destroy()
        wait_for(lambda: "disconnected" in server.log(), 30, "the server to see the client go")
        assert server.alive() and server.get("size") == 0  # the lost connection's reset: nothing plugged
        assert server.settled_allocated_bytes() == 0
        # The next start attaches again and plugs the requested size (256M, unchanged).
        guest.start()
        guest.wait_ready(240)
        wait_for(lambda: server.get("size") == 256 * MIB, 120, "the restarted guest to plug 256M again")
        assert server.log().count("connected on") == 2
    except BaseException:
        print(f"===== guest console =====\n{guest.console()[-10000:]}")
        print(f"===== libvirt's QEMU log =====\n{guest.qemu_log()[-5000:]}")
        raise
    finally:
        guest.stop()
