"""Real QEMU, real guest: the pieces the integration tests are made of.

``Kit`` is the cached QEMU/guest kit (integration/build-kit.sh).  ``Guest``
boots a Linux guest under QEMU with our device attached over vfio-user and
talks to a shell in the guest over a second serial port (the guest's /init,
integration/guest-init.sh).  ``VmemServer`` runs ``vfiouser-vmem serve`` and
talks QMP to it (with the package's ``QmpClient``).  Every process is
started here and stopped here, by PID, also when a test fails; on failure
the logs are printed (guest console, server log, QEMU stderr) so that CI
output shows the cause.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The project's own QMP client, re-exported for the tests and bench/ (it
# raises vfiouser_vmem.errors.QmpError for error replies and failures).
from vfiouser_vmem.control import QmpClient  # noqa: F401
from vfiouser_vmem.errors import QmpError  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20


class GuestError(Exception):
    pass


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
    """Send ``sig`` to a child we started, wait for it, kill it if it does
    not exit within ``timeout_s``; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Kit:
    dir: Path

    @classmethod
    def build(cls) -> Kit:
        out = subprocess.run(
            ["bash", str(REPO / "integration" / "build-kit.sh")], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        return cls(Path(out.strip().splitlines()[-1]))

    @property
    def qemu(self) -> str:
        return str(self.dir / "qemu-system-x86_64")

    @property
    def kernel(self) -> str:
        return str(self.dir / "vmlinuz")

    @property
    def initrd(self) -> str:
        return str(self.dir / "initrd.img")

    #: Guest kernels in the kit: Debian trixie's (the default) and bookworm's.
    SUITES = ("trixie", "bookworm")

    def guest_files(self, suite: str = "trixie") -> tuple[str, str, str]:
        """(kernel, initrd, kernel version) of a suite's guest."""
        d = self.dir / f"guest-{suite}"
        return str(d / "vmlinuz"), str(d / "initrd.img"), (d / "kernel-version").read_text().strip()


@dataclass(frozen=True)
class ProjectSettings:
    """What the set-up scripts choose (scripts/lib.sh)."""

    #: VMEM_CACHE_DIR: libvfio-user's build, the kit, the wheel tools.
    cache_dir: Path
    #: The install prefix of the libvfio-user the package is built against.
    libvfio_user_prefix: Path
    #: PKG_CONFIG_PATH as use_libvfio_user leaves it, for a build of the package.
    pkg_config_path: str


def project_settings() -> ProjectSettings:
    """Asks scripts/lib.sh itself (``use_libvfio_user`` builds libvfio-user
    when it is missing), so that the tests follow the scripts."""
    script = ('set -euo pipefail; source "$1/scripts/lib.sh"; use_libvfio_user; '
              'printf "%s\\0" "$VMEM_CACHE_DIR" "$LVU_PREFIX" "${PKG_CONFIG_PATH:-}"')
    out = subprocess.run(["bash", "-c", script, "bash", str(REPO)], check=True, stdout=subprocess.PIPE).stdout
    cache_dir, prefix, pkg_config_path = out.decode().split("\0")[:3]
    return ProjectSettings(Path(cache_dir), Path(prefix), pkg_config_path)


def kvm_works() -> bool:
    """True only for a KVM that runs a stock kernel.  The paravirtual
    kvm-pvm hosts of the CI machines expose /dev/kvm but fail with
    "emulation failure" (docs/design.md, "Where the parts come from"), so ask the environment."""
    return os.environ.get("VMEM_ACCEL", "tcg") == "kvm"


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (the polled state is
    in another process: a guest or a server, nothing to wait on directly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def open_files(pid: int):
    """(link target, stat) of each fd of ``pid`` (fds closed meanwhile skipped)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            yield os.readlink(fd), os.stat(fd)
        except OSError:
            continue


def memfd_allocated_bytes(pid: int, *, name_prefix: str | None = None, size_bytes: int | None = None) -> int:
    """Allocated bytes (st_blocks * 512) of the memfds ``pid`` holds open that
    match ``name_prefix`` (``/memfd:NAME``) and/or have ``size_bytes``: the
    host's own view of the memory in use.

    The same memfd can be open more than once (libvfio-user keeps its own fd
    of a region, QEMU dups them): each file is counted once, by inode."""
    blocks_by_inode: dict[int, int] = {}
    for target, st in open_files(pid):
        if not target.startswith("/memfd:"):
            continue
        if name_prefix is not None and not target.startswith(f"/memfd:{name_prefix}"):
            continue
        if size_bytes is not None and st.st_size != size_bytes:
            continue
        blocks_by_inode[st.st_ino] = st.st_blocks
    if not blocks_by_inode:
        raise LookupError(f"no matching memfd among the fds of PID {pid} (name {name_prefix!r}, size {size_bytes})")
    return sum(blocks_by_inode.values()) * 512


VFIOUSER_VMEM = shutil.which("vfiouser-vmem", path=str(Path(sys.executable).parent)) or "vfiouser-vmem"


class ServerProcess:
    """``vfiouser-vmem serve ...`` in a child process, with a QMP client.

    ``argv`` is everything after ``serve`` except ``--qmp``; the server's
    stderr goes to ``<name>-server.log`` in ``workdir``.  A subclass runs
    another command line of the same contract (bench/served.py) by
    overriding ``command``."""

    def command(self) -> list[str]:
        """What comes before ``--qmp PATH ARGV...``."""
        return [VFIOUSER_VMEM, "serve"]

    def __init__(self, workdir: Path, name: str, argv: list[str]) -> None:
        self.workdir = workdir
        self.name = name
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.log_path = workdir / f"{name}-server.log"
        self.log_file = open(self.log_path, "wb")
        self.argv = [*self.command(), "--qmp", self.qmp_path, *argv]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log_file)
        # The server prints its first line once all its sockets listen.
        self.first_line = self.proc.stdout.readline().decode()
        if "ready" not in self.first_line:
            self.stop()
            raise GuestError(f"server did not start: {self.first_line!r}\n{self.log()}")
        self.qmp = QmpClient(self.qmp_path, timeout_s=30)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        try:
            if hasattr(self, "qmp"):
                self.qmp.close()
        except OSError:
            pass
        stop_process(self.proc)
        self.log_file.close()
        return self.proc.returncode


class VmemServer(ServerProcess):
    """A single-device server (``serve --socket ... --size ...``)."""

    def __init__(self, workdir: Path, *, size: str, block_size: str = "2M", requested_size: str = "0",
                 id: str = "vmem0", node: int | None = None, extra: list[str] | None = None) -> None:
        self.id = id
        self.socket = str(workdir / f"{id}.sock")
        argv = ["--socket", self.socket, "--size", size, "--block-size", block_size,
                "--requested-size", requested_size, "--id", id]
        if node is not None:
            argv += ["--node", str(node)]
        super().__init__(workdir, id, argv + (extra or []))

    def get(self, prop: str) -> int:
        return self.qmp.execute("qom-get", path=self.id, property=prop)

    def set_requested_size(self, size_bytes: int) -> None:
        self.qmp.execute("qom-set", path=self.id, property="requested-size", value=size_bytes)

    def allocated_bytes(self) -> int:
        """The backend memfd's allocated bytes, read from the server's fds."""
        # The trailing space: the link reads "/memfd:NAME (deleted)", and
        # vmem0 must not match vmem01.
        return memfd_allocated_bytes(self.proc.pid, name_prefix=f"vfiouser-vmem:{self.id} ")

    def settled_allocated_bytes(self, timeout_s: float = 60) -> int:
        """``allocated_bytes`` once the memory of every answered UNPLUG is
        back with the host: the server discards after answering
        (QOM ``discard-pending``, docs/discard.md)."""
        wait_for(lambda: self.get("discard-pending") == 0, timeout_s, "the deferred discards to finish")
        return self.allocated_bytes()


class Guest:
    """A Linux guest in QEMU 11 with our device(s) attached."""

    def __init__(self, kit: Kit, workdir: Path, sockets: list[str], *, ram: str = "1G", cpus: int = 2,
                 extra_args: list[str] | None = None, cmdline_extra: str = "", name: str = "guest",
                 suite: str = "trixie", numa_nodes: int = 1, machine_args: list[str] | None = None) -> None:
        """``machine_args``, when given, replace the memory and device options
        this class would choose (e.g. the output of ``vfiouser-vmem
        qemu-args``); they come last, so that their ``-cpu`` wins."""
        self.kit = kit
        self.workdir = workdir
        self.console_path = workdir / f"{name}-console.log"
        self.stderr_path = workdir / f"{name}-qemu.log"
        self.cmd_path = str(workdir / f"{name}-cmd.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.cmd_path)
        self.listener.listen(1)
        self.listener.settimeout(1)
        accel = ["-accel", "kvm", "-cpu", "host"] if kvm_works() else ["-accel", "tcg", "-cpu", "qemu64"]
        devices = []
        for path in sockets:
            devices += ["-device", json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}})]
        kernel, initrd, self.kernel_version = kit.guest_files(suite)
        if machine_args is not None:
            memory, devices = [], machine_args
        elif numa_nodes == 1:
            memory = ["-machine", "q35,memory-backend=ram0", "-m", ram,
                      "-object", f"memory-backend-memfd,id=ram0,size={ram},share=on"]
        else:
            # Guest RAM split evenly over the nodes, each part shared.
            from vfiouser_vmem.util.sizes import format_size, parse_size

            per_node = format_size(parse_size(ram) // numa_nodes)
            memory = ["-machine", "q35", "-m", ram]
            for n in range(numa_nodes):
                memory += ["-object", f"memory-backend-memfd,id=ram{n},size={per_node},share=on",
                           "-numa", f"node,nodeid={n},memdev=ram{n}"]
        self.argv = [
            kit.qemu, "-nodefaults", "-nographic", "-no-user-config",
            *memory, *accel, "-smp", str(cpus),
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 memhp_default_state=online_movable loglevel=6 panic=-1 {cmdline_extra}".strip(),
            "-serial", f"file:{self.console_path}",
            "-chardev", f"socket,id=cmd,path={self.cmd_path}",
            "-serial", "chardev:cmd",
            "-action", "reboot=reset",
            *devices, *(extra_args or []),
        ]
        self.stderr_file = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.stderr_file, stderr=subprocess.STDOUT)
        self.conn: socket.socket | None = None
        self._buf = b""

    def _accept(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.conn is None:
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited with {self.proc.returncode}")
            try:
                self.conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError("QEMU did not connect its command chardev")

    def _read_until(self, pattern: re.Pattern[bytes], timeout_s: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout_s
        while True:
            m = pattern.search(self._buf)
            if m:
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"guest did not answer within {timeout_s:.0f} s (waiting for {pattern.pattern!r})")
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited with {self.proc.returncode}")
            self.conn.settimeout(min(remaining, 1.0))
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise GuestError("the guest's command channel closed")
            self._buf += data

    def wait_ready(self, timeout_s: float = 180) -> str:
        self._accept(timeout_s)
        m = self._read_until(re.compile(rb"@@READY (\S+)\r?\n"), timeout_s)
        self._buf = self._buf[m.end():]
        return m.group(1).decode()

    def run(self, command: str, timeout_s: float = 120, check: bool = True) -> str:
        """Run a shell command in the guest; returns its output."""
        if "\n" in command:
            raise ValueError("one line per command")
        self.conn.sendall(command.encode() + b"\n")
        m = self._read_until(re.compile(rb"@@RC (\d+)\r?\n"), timeout_s)
        out = self._buf[:m.start()].decode(errors="replace")
        self._buf = self._buf[m.end():]
        rc = int(m.group(1))
        if check and rc != 0:
            raise GuestError(f"guest command {command!r} failed with {rc}:\n{out}")
        return out

    def meminfo_kib(self, field: str = "MemTotal") -> int:
        out = self.run(f"grep '^{field}:' /proc/meminfo")
        return int(out.split()[1])

    def dmesg(self) -> str:
        return self.run("dmesg")

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reboot(self) -> None:
        """``reboot -f`` in the guest; QEMU resets the machine (-action reboot=reset)."""
        # The command chardev stays connected across the machine reset; the
        # rebooted guest announces itself on it again (wait_ready).
        self.conn.sendall(b"reboot -f\n")
        self._buf = b""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        stop_process(self.proc, sig)
        self.listener.close()
        try:
            os.unlink(self.cmd_path)
        except FileNotFoundError:
            pass
        self.stderr_file.close()
        return self.proc.returncode

    def qemu_log(self) -> str:
        if not self.stderr_file.closed:
            self.stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")


def node_failed(request) -> bool:
    """Whether the test of a fixture's ``request`` failed (conftest.py's
    ``rep_call``), read at the fixture's teardown."""
    return getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed


def stop_and_report(thing, failed: bool) -> None:
    """Stop a Guest or a process of a test (anything with ``stop`` and ``log``)
    and, when the test failed, print what it logged."""
    thing.stop()
    if not failed:
        return
    if isinstance(thing, Guest):
        print(f"===== guest console ({thing.console_path}) =====\n{thing.console()[-20000:]}")
        print(f"===== guest QEMU output =====\n{thing.qemu_log()[-5000:]}")
    else:
        print(f"===== {getattr(thing, 'name', type(thing).__name__)} log =====\n{thing.log()[-20000:]}")


def short_tmpdir() -> Path:
    """UNIX socket paths are limited to 107 bytes: keep them short."""
    return Path(tempfile.mkdtemp(prefix="vmem-", dir="/tmp"))
