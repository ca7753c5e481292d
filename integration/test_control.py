"""The operator's workflow with a real QEMU guest: several devices in one
server process, QEMU started with exactly what ``vfiouser-vmem qemu-args``
prints, resized with ``vfiouser-vmem ctl``, watched, scraped for metrics.

The guests here are booted from ``qemu-args`` output plus only the kit's
boot options (kernel, initrd, serial ports: what harness.Guest adds besides
memory and devices), so that the printed options are proven to work as
they are.  Every process is stopped by PID at the end, also on failure,
and the logs are printed when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness import GIB, MIB, Guest, GuestError, ServerProcess, stop_and_report, node_failed, wait_for

BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180
EXE = shutil.which("vfiouser-vmem", path=str(Path(sys.executable).parent)) or "vfiouser-vmem"


class MultiServer(ServerProcess):
    """``vfiouser-vmem serve`` with the given device options, QMP and metrics."""

    def __init__(self, workdir: Path, name: str, device_args: list[str]) -> None:
        super().__init__(workdir, name, ["--metrics", "127.0.0.1:0", *device_args])
        m = re.search(r"metrics on (http://\S+)", self.first_line)
        if not m:
            self.stop()
            raise GuestError(f"no metrics address in {self.first_line!r}")
        self.metrics_url = m.group(1)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([EXE, "ctl", "--qmp", self.qmp_path, *args], capture_output=True, text=True,
                              timeout=RESIZE_TIMEOUT_S + 60)

    def resize(self, dev_id: str, size: str) -> str:
        """``ctl resize ID SIZE --wait``; its output line."""
        result = self.ctl("resize", dev_id, size, "--wait", "--timeout", str(RESIZE_TIMEOUT_S))
        assert result.returncode == 0, f"ctl resize failed ({result.returncode}): {result.stdout}{result.stderr}"
        return result.stdout.strip()

    def sizes(self) -> dict[str, tuple[int, int]]:
        """{id: (size, requested-size)} over QMP."""
        return {d["data"]["id"]: (d["data"]["size"], d["data"]["requested-size"])
                for d in self.qmp.execute("query-memory-devices")}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            body = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture
def procs(request, kit, workdir):
    """Servers and guests started by a test; stopped by PID at the end
    (guests first), with their logs printed if the test failed."""
    started: list = []

    class Procs:
        def server(self, name: str, device_args: list[str]) -> MultiServer:
            s = MultiServer(workdir, name, device_args)
            started.append(s)
            return s

        def guest(self, qemu_args: list[str], **kw) -> Guest:
            # Exactly qemu-args' memory and device options; harness.Guest
            # adds the accelerator, kernel, console and command channel.
            g = Guest(kit, workdir, [], machine_args=qemu_args, **kw)
            started.append(g)
            return g

        def process(self, proc: subprocess.Popen) -> subprocess.Popen:
            started.append(proc)
            return proc

    yield Procs()
    failed = node_failed(request)
    for thing in sorted(started, key=lambda t: not isinstance(t, (Guest, subprocess.Popen))):
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                thing.kill()
                thing.wait()
            continue
        stop_and_report(thing, failed)


def qemu_args(device_args: list[str], ram: str = "1G") -> list[str]:
    result = subprocess.run([EXE, "qemu-args", "--format", "json", "--ram", ram, *device_args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    print(f"qemu-args: {result.stdout.strip()}\n{result.stderr.strip()}")
    return json.loads(result.stdout)


def boot(guest: Guest, devices: int) -> int:
    """Wait for the guest and for virtio_mem to bind ``devices`` devices;
    returns MemTotal in kB."""
    guest.wait_ready(BOOT_TIMEOUT_S)
    guest.run("mount -o remount,size=8G /tmp")
    wait_for(lambda: guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ | grep -c '^virtio' || true").strip()
             == str(devices), 60, f"virtio_mem to bind {devices} devices")
    return guest.meminfo_kib()


def wait_memtotal(guest: Guest, kib: int) -> None:
    try:
        wait_for(lambda: guest.meminfo_kib() == kib, RESIZE_TIMEOUT_S, f"guest MemTotal {kib} kB")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: MemTotal {guest.meminfo_kib()} kB\n{guest.run('dmesg | tail -30')}") from None


def read_lines_until(proc: subprocess.Popen, pattern: str, timeout_s: float) -> list[str]:
    """Lines of ``proc``'s stdout until one matches ``pattern``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(line.decode())
            if re.search(pattern, lines[-1]):
                return lines
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout_s:.0f} s: {lines}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                raise GuestError(f"the process ended before a line matching {pattern!r}: {lines}")
            buf += data


def test_two_devices_in_one_process_resized_independently(procs, workdir):
    device_args = ["--object", "memory-backend-memfd,id=mem0,size=2G",
                   "--device", f"id=vm0,memdev=mem0,socket={workdir}/vm0.sock",
                   "--object", "memory-backend-memfd,id=mem1,size=2G",
                   "--device", f"virtio-mem,id=vm1,memdev=mem1,socket={workdir}/vm1.sock"]
    argv = qemu_args(device_args)
    assert "-numa" not in argv and "-cpu" not in argv
    server = procs.server("vmem", device_args)
    print(f"serve: {server.first_line.strip()}")
    guest = procs.guest(argv)
    base_kib = boot(guest, 2)

    # Size changes as ctl watch streams them, until Ctrl-C.
    watch = procs.process(subprocess.Popen([EXE, "ctl", "--qmp", server.qmp_path, "watch"],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert "watching" in watch.stderr.readline().decode()

    print(server.resize("vm0", "512M"))
    wait_memtotal(guest, base_kib + 512 * 1024)
    assert server.sizes() == {"vm0": (512 * MIB, 512 * MIB), "vm1": (0, 0)}

    print(server.resize("vm1", "1G"))
    wait_memtotal(guest, base_kib + 1536 * 1024)
    assert server.sizes() == {"vm0": (512 * MIB, 512 * MIB), "vm1": (GIB, GIB)}

    info = server.ctl("info")
    assert info.returncode == 0, info.stderr
    print(info.stdout)
    rows = {line.split()[0]: line.split() for line in info.stdout.splitlines()[1:3]}
    assert rows["vm0"][2:4] == ["512", "MiB"] and rows["vm1"][2:4] == ["1", "GiB"]
    memaddrs = {d["data"]["memaddr"] for d in server.qmp.execute("query-memory-devices")}
    assert len(memaddrs) == 2 and 0 not in memaddrs, "each device has its own BAR, placed by the firmware"

    m = server.metrics()
    for dev_id, size, blocks in (("vm0", 512 * MIB, 4), ("vm1", GIB, 8)):
        labels = (("id", dev_id),)
        assert m[("vfiouser_vmem_plugged_size_bytes", labels)] == size
        assert m[("vfiouser_vmem_client_connected", labels)] == 1
        assert m[("vfiouser_vmem_client_connections_total", labels)] == 1
        # Linux plugs one 128 MiB memory block per request.
        assert m[("vfiouser_vmem_requests_total", (("id", dev_id), ("response", "ack"), ("type", "plug")))] >= blocks

    print(server.resize("vm0", "0"))
    wait_memtotal(guest, base_kib + 1024 * 1024)
    assert server.sizes() == {"vm0": (0, 0), "vm1": (GIB, GIB)}

    # The final size of each device reaches the watcher; Ctrl-C ends it with 0.
    lines = read_lines_until(watch, r" vm0 size 0 B \(0\)$", RESIZE_TIMEOUT_S)
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=30) == 0
    print("\n".join(lines))
    # (Intermediate sizes may be coalesced by the rate limit: only the
    # final size of each device is sure to be reported.)
    assert [line for line in lines if " vm1 " in line][-1].endswith(" vm1 size 1 GiB (1073741824)"), lines

    # QEMU DMA-maps each device's memory BAR to both devices: each server
    # recognises its sibling's (no "shared guest RAM" false alarm).
    assert "without a file descriptor" not in server.log(), server.log()

    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        print("\n".join(line for line in response.read().decode().splitlines()
                        if 'id="vm1"' in line and not line.startswith("vfiouser_vmem_request_duration_seconds_bucket")))


def test_guest_booted_from_qemu_args_with_a_numa_node(procs, workdir):
    device_args = ["--object", "memory-backend-memfd,id=mem0,size=2G",
                   "--device", f"id=vm0,memdev=mem0,socket={workdir}/vm0.sock,node=1"]
    argv = qemu_args(device_args, ram="1G")
    assert argv.count("-numa") == 2
    server = procs.server("vmem", device_args)
    guest = procs.guest(argv)
    base_kib = boot(guest, 1)
    nodes = guest.run("ls /sys/devices/system/node/ | grep '^node' | tr '\\n' ' '").split()
    assert nodes == ["node0", "node1"], nodes

    def node1_kib() -> int:
        return int(guest.run("grep MemTotal /sys/devices/system/node/node1/meminfo").split()[3])

    node1_before = node1_kib()
    print(server.resize("vm0", "1G"))
    wait_memtotal(guest, base_kib + 1024 * 1024)
    # VIRTIO_MEM_F_ACPI_PXM: the memory went to the device's node.
    assert node1_kib() == node1_before + 1024 * 1024, guest.run("dmesg | grep -i virtio_mem")
    print(server.resize("vm0", "0"))
    wait_memtotal(guest, base_kib)
    assert server.sizes() == {"vm0": (0, 0)}
