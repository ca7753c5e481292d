"""The out-of-tree examples (examples/*.py), run as a user runs them, with a real guest.

Each example is a script that embeds the device server through the public
API (``vfiouser_vmem.open_server``) with a plug policy; it is started as a
subprocess with ``--qmp``, and the test reads the device over QMP (the
harness's client), the guest's view over its shell (MemTotal, memory
blocks, dmesg) and what the policy did from the script's log.  Every wait
polls a state in another process with a deadline (``harness.wait_for``).
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
from harness import GIB, MIB, Guest, GuestError, VmemServer, wait_for

EXAMPLES = harness.REPO / "examples"
BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow; a BUSY costs the guest its 50 s retry timer on top.
RESIZE_TIMEOUT_S = 180
# Linux's virtio_mem retries a BUSY after VIRTIO_MEM_RETRY_TIMER_MIN_MS (50 s) first.
DRIVER_RETRY_S = 50


class ExampleServer(VmemServer):
    """``python examples/SCRIPT --socket ... --qmp ... ARGV`` in a child process.

    The examples take ``vfiouser-vmem serve``'s device options and print a
    line with "ready" once their sockets listen, so VmemServer's QMP helpers
    (``get``, ``set_requested_size``, ``allocated_bytes``) and ``stop``
    apply; the script's stderr (its log) goes to ``<stem>-server.log``."""

    def __init__(self, workdir: Path, script: str, argv: list[str], *, id: str = "vmem0",
                 start_timeout_s: float = 60) -> None:
        self.id = id
        self.name = Path(script).stem
        self.workdir = workdir
        self.socket = str(workdir / f"{id}.sock")
        self.qmp_path = str(workdir / f"{id}.qmp")
        self.log_path = workdir / f"{self.name}-server.log"
        self.log_file = open(self.log_path, "wb")
        self.argv = [sys.executable, str(EXAMPLES / script), "--socket", self.socket, "--id", id,
                     "--qmp", self.qmp_path, *argv]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log_file)
        self.first_line = self._readline(start_timeout_s)
        if "ready" not in self.first_line:
            self.stop()
            raise GuestError(f"{script} did not start: {self.first_line!r}\n{self.log()}")
        # The harness's QMP client, whichever it is at the time.
        self.qmp = harness.QmpClient(self.qmp_path, timeout_s=30)

    def _readline(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().decode() if ready else ""

    def output(self) -> str:
        """What the script printed after its ready line (once it has exited)."""
        assert self.proc.poll() is not None
        return self.proc.stdout.read().decode()

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]


@pytest.fixture
def lab(request, kit, workdir):
    """Start example servers and guests through this; all are stopped at the
    end, guests first, and their logs printed if the test failed."""
    started: list[Guest | ExampleServer] = []

    class Lab:
        def server(self, script: str, argv: list[str]) -> ExampleServer:
            s = ExampleServer(workdir, script, argv)
            started.append(s)
            return s

        def guest(self, server: ExampleServer, **kw) -> Guest:
            g = Guest(kit, workdir, [server.socket], **kw)
            started.append(g)
            return g

    yield Lab()
    failed = harness.node_failed(request)
    for thing in reversed(started):
        harness.stop_and_report(thing, failed)


def boot(lab, server: ExampleServer) -> Guest:
    guest = lab.guest(server)
    guest.wait_ready(BOOT_TIMEOUT_S)
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind")
    return guest


def online_blocks(guest: Guest) -> int:
    return int(guest.run("cat /sys/devices/system/memory/memory*/state 2>/dev/null | grep -c '^online'").strip())


def settle(guest: Guest, server: ExampleServer, size_bytes: int, base_kib: int, timeout_s: float = RESIZE_TIMEOUT_S):
    """Wait for the device (QMP) and then the guest (MemTotal) to reach ``size_bytes``."""
    try:
        wait_for(lambda: server.get("size") == size_bytes, timeout_s, f"device size {size_bytes >> 20} MiB", 0.1)
        wait_for(lambda: guest.meminfo_kib() == base_kib + size_bytes // 1024, timeout_s,
                 f"guest MemTotal at base + {size_bytes >> 20} MiB")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: device size {server.get('size')}, guest MemTotal {guest.meminfo_kib()} kB "
                           f"(base {base_kib} kB)\n{guest.run('dmesg | tail -30')}") from None


def assert_no_driver_errors(guest: Guest) -> None:
    bad = [line for line in guest.dmesg().splitlines()
           if "virtio_mem" in line and any(w in line.lower() for w in ("error", "fail", "broken", "could not"))]
    assert not bad, "\n".join(bad)


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` at once (the policy never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_meminfo(path: Path, available_bytes: int) -> None:
    replace_file(path, f"MemTotal:       {64 * GIB // 1024} kB\nMemFree:        {available_bytes // 2048} kB\n"
                       f"MemAvailable:   {available_bytes // 1024} kB\nBuffers:        1024 kB\n")


def write_psi(path: Path, some_avg10: float) -> None:
    replace_file(path, f"some avg10={some_avg10:.2f} avg60=0.00 avg300=0.00 total=0\n"
                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_host_pressure_holds_plugs_until_the_pressure_ends(lab, workdir, timing):
    meminfo, psi = workdir / "meminfo", workdir / "psi"
    write_meminfo(meminfo, 8 * GIB)
    write_psi(psi, 42.0)  # under pressure from the start: PSI above --max-psi
    server = lab.server("host_pressure.py", [
        "--size", "4G", "--meminfo", str(meminfo), "--psi", str(psi), "--min-available", "2G",
        "--max-psi", "10", "--recheck-interval", "0.2"])
    guest = boot(lab, server)
    base_kib = guest.meminfo_kib()
    blocks_before = online_blocks(guest)
    target = 512 * MIB

    def refusals() -> list[str]:
        return server.log_lines(r"refused PLUG .* host under memory pressure")

    asked = time.monotonic()
    server.set_requested_size(target)
    # The driver's first PLUG is refused (BUSY) for the PSI...
    wait_for(lambda: len(refusals()) >= 1, RESIZE_TIMEOUT_S, "a PLUG refused for the PSI")
    first = time.monotonic()
    assert "memory PSI some avg10 42.00% > 10%" in refusals()[0], refusals()
    # ...then the pressure changes cause, never ending: MemAvailable low first, PSI fine second.
    write_meminfo(meminfo, 512 * MIB)
    write_psi(psi, 0.0)
    # The driver retries on its own (its retry timer, after a BUSY) and is refused again, for MemAvailable.
    wait_for(lambda: len(refusals()) >= 2, DRIVER_RETRY_S + RESIZE_TIMEOUT_S, "the driver's retry to be refused")
    timing("host_pressure: guest's retry after a BUSY plug", time.monotonic() - first)
    assert "MemAvailable 512M < 2G" in refusals()[1], refusals()
    # Nothing was plugged meanwhile, on the device nor in the guest; nothing nudged the guest.
    assert server.get("size") == 0
    assert guest.meminfo_kib() == base_kib
    assert online_blocks(guest) == blocks_before
    assert not server.log_lines("nudging the guest")

    # The pressure ends: the script sees it and nudges the guest, which plugs without waiting for its timer.
    relief = time.monotonic()
    write_meminfo(meminfo, 8 * GIB)
    # Well within the driver's next timer (100 s after the second BUSY).
    settle(guest, server, target, base_kib, timeout_s=DRIVER_RETRY_S)
    timing("host_pressure: pressure over until the guest has 512 MiB", time.monotonic() - relief)
    timing("host_pressure: asked until the guest has 512 MiB", time.monotonic() - asked)
    assert len(server.log_lines("nudging the guest")) == 1
    assert online_blocks(guest) == blocks_before + 4  # 4 memory blocks of 128 MiB
    refused = len(refusals())

    # Unplugs are always allowed, also under pressure.
    write_meminfo(meminfo, 256 * MIB)
    start = time.monotonic()
    server.set_requested_size(0)
    settle(guest, server, 0, base_kib)
    timing("host_pressure: shrink 512 MiB -> 0 under pressure", time.monotonic() - start)
    assert online_blocks(guest) == blocks_before
    assert len(refusals()) == refused
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest)

    guest.stop()
    assert server.stop() == 0
    out = server.output()
    assert f"{refused} refused" in out, out


def test_fault_injection_driver_retries_nack_storm_busy_and_delays(lab, timing):
    server = lab.server("fault_injection.py", [
        "--size", "4G", "--nack-storm-requests", "5", "--busy-every", "7", "--busy-limit", "2",
        "--delay-ms", "5"])
    guest = boot(lab, server)
    base_kib = guest.meminfo_kib()
    blocks_before = online_blocks(guest)
    target = 512 * MIB

    def injected(answer: str, kind: str) -> list[str]:
        return server.log_lines(rf"injected {answer} into {kind} #")

    start = time.monotonic()
    server.set_requested_size(target)
    # The first PLUGs meet the NACK storm, which the driver retries at once...
    wait_for(lambda: server.log_lines("NACK storm over"), RESIZE_TIMEOUT_S, "the NACK storm to pass")
    storm_s = time.monotonic() - start
    nacks = injected("NACK", "PLUG")
    assert len(nacks) == 5
    # The same PLUG, again and again (-EAGAIN: "goto retry"), not on the driver's timer.
    assert len({re.search(r"at (0x[0-9a-f]+)", line).group(1) for line in nacks}) == 1, nacks
    assert storm_s < DRIVER_RETRY_S / 2
    # ...then a BUSY (request 7), which it retries on its timer; and it gets there.
    wait_for(lambda: injected("BUSY", "PLUG"), RESIZE_TIMEOUT_S, "a BUSY injected into a PLUG")
    busy_at = time.monotonic()
    settle(guest, server, target, base_kib, timeout_s=DRIVER_RETRY_S + RESIZE_TIMEOUT_S)
    timing("fault_injection: NACK storm of 5 PLUGs passed", storm_s)
    timing("fault_injection: BUSY on a PLUG until the guest has 512 MiB", time.monotonic() - busy_at)
    timing("fault_injection: grow 0 -> 512 MiB", time.monotonic() - start)
    assert online_blocks(guest) == blocks_before + 4
    # The driver backed off after the BUSY: its retry timer, not a loop.
    assert time.monotonic() - busy_at >= DRIVER_RETRY_S * 0.8

    start = time.monotonic()
    server.set_requested_size(0)
    settle(guest, server, 0, base_kib, timeout_s=DRIVER_RETRY_S + RESIZE_TIMEOUT_S)
    timing("fault_injection: shrink 512 MiB -> 0", time.monotonic() - start)
    assert online_blocks(guest) == blocks_before
    assert server.settled_allocated_bytes() == 0
    # The second BUSY (request 14) met an UNPLUG, and the driver got past it: here at once, since
    # removing the memory block it had just unplugged queued its work again (virtio_mem_retry()).
    assert injected("BUSY", "UNPLUG"), server.log_lines("injected")
    # No NACK outside the storm, and none to an UNPLUG; the BUSY limit held.
    assert len(server.log_lines("injected NACK")) == 5
    assert len(server.log_lines("injected BUSY")) <= 2
    assert_no_driver_errors(guest)

    guest.stop()
    assert server.stop() == 0
    out = server.output()
    m = re.search(r"(\d+) request\(s\) seen; injected (\d+) NACK, (\d+) BUSY, (\d+) delay\(s\) of 5 ms", out)
    assert m, out
    seen, nacks, busys, delays = map(int, m.groups())
    assert (nacks, delays) == (5, seen)
    assert busys == len(server.log_lines("injected BUSY"))
