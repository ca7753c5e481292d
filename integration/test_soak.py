"""Soak loops with real QEMU 11 guests: many cycles of what a host does to a
device all day, on one server process, checked at every cycle on both sides
(the guest's MemTotal, the server's QOM ``size``, the backend memfd's
allocated bytes) and, over the whole run, for leaks (the server's fd count
and RSS at the start and at the end).

1. **Resizes.** Cycles between random sizes (multiples of the block size,
   0 and the maximum included) with the guest writing into its plugged
   memory after each grow: after each settle the backend holds at most the
   plugged size, after the guest's writes close to it.
2. **Reboots.** ``reboot -f`` with memory plugged and touched: the reset
   leaves size 0 and an empty backend before the rebooted guest's driver is
   back, and that driver plugs the requested size again.
3. **QEMU killed in the middle of a resize** (SIGKILL): the lost-connection
   reset leaves size 0 and an empty backend, the server lives, and a new
   QEMU on the same socket attaches and plugs the requested size.  Every
   other kill holds the guest's requests in the server's queue
   (``x-hold-requests``) so that a PLUG or UNPLUG is in flight for certain;
   the others kill once the size has started to move.
4. **A frozen guest** (SIGSTOP of its QEMU in the middle of a grow, with a
   request of it queued) holds up no other device of the process: a second
   QEMU on a second device of the same server grows and shrinks meanwhile,
   and the frozen one, continued, finishes its grow.

Counts: ``budget(ci=..., long=...)`` of tests/fuzzing.py, so that
``VFIOUSER_VMEM_LONG=1`` selects the long run (1,000 resize cycles, 100
reboots, 20 kills, 5 freezes) and the default is the CI-sized one (10, 3,
2, 1).  ``VFIOUSER_VMEM_SOAK_CYCLES=N`` sets the count of every soak of this
module outright (a long run that has to fit a time slot: select one soak
with ``-k``).  ``VFIOUSER_VMEM_SEED`` replays the random choices; a failure
writes a reproducer (fuzz-failures/soak-*.json) whose ``inputs`` the resize
soak's regression test replays once copied to tests/fuzz_regressions/.
The figures of each soak (cycles, fd count and RSS of the server before and
after, host memory checks) are in the terminal summary (conftest.py).

Under TCG a guest boots in tens of seconds, so the resize soak and its
regression replays share one guest (a module-scoped rig) and the others
boot only what their cycles need.
"""

# ruff: noqa: F811 (the "host" fixture imported from test_memory_backends, used as a parameter)
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import pytest
from harness import GIB, MIB, REPO, Guest, short_tmpdir, wait_for
from test_memory_backends import (
    BOOT_TIMEOUT_S,
    RESIZE_TIMEOUT_S,
    BackendServer,
    Host,
    assert_no_driver_errors,
    boot,
    host,  # noqa: F401 (the fixture)
    memfd_of,
    resize,
    touch,
    untouch,
)

sys.path.insert(0, str(REPO / "tests"))
from fuzzing import FuzzRun, budget, regressions  # noqa: E402

from vfiouser_vmem.util.sizes import format_size  # noqa: E402

DEVICE_SIZE = GIB
BLOCK_SIZE = 2 * MIB
#: The fd count of the server may differ by this much between two moments
#: of the same state: trio's and libvfio-user's own fds come and go (a
#: QMP connection, the accept of the next client).
FD_SLACK = 4
#: RSS growth allowed over a whole soak: Python's allocator keeps what it
#: once used, and the server maps the backend (pages it reads show in its
#: RSS); a leak per cycle exceeds it in the long run.
RSS_SLACK_BYTES = 64 * MIB
#: After the guest wrote all of its plugged memory, the backend holds at
#: least this part of it: the guest's page allocator keeps a zone's
#: watermark free and falls back to the next zone (mm/page_alloc.c), so
#: not every page of ZONE_MOVABLE gets written.
WRITTEN_FRACTION = 0.75


def cycles(*, ci: int, long: int) -> int:
    forced = os.environ.get("VFIOUSER_VMEM_SOAK_CYCLES")
    return int(forced) if forced else budget(ci=ci, long=long)


def allocated(server: BackendServer, dev: str = "vm0") -> int:
    return server.backend_file(memfd_of(dev)).st_blocks * 512


def device(dev: str = "vm0", options: str = "") -> dict[str, tuple[str, str]]:
    return {dev: (f"memory-backend-memfd,size={format_size(DEVICE_SIZE)}", f"block-size={BLOCK_SIZE}" +
                  (f",{options}" if options else ""))}


def random_size(rng, *, minimum: int = 0) -> int:
    """A multiple of the block size in [minimum, DEVICE_SIZE]; the ends come
    up more often than they would by chance."""
    roll = rng.random()
    if roll < 0.1:
        return DEVICE_SIZE
    if roll < 0.2:
        return minimum
    return rng.randrange(minimum // BLOCK_SIZE, DEVICE_SIZE // BLOCK_SIZE + 1) * BLOCK_SIZE


@dataclass
class Books:
    """The server's fd count and RSS at the start of a soak, for the check
    at its end and the terminal summary."""

    server: BackendServer
    run: FuzzRun
    fds: int = 0
    rss_bytes: int = 0
    memory_checks: int = 0

    def start(self) -> None:
        self.fds, self.rss_bytes = self.server.fd_count(), self.server.rss_bytes()
        self.run.extra.update({"fds before": self.fds, "RSS before": f"{self.rss_bytes >> 20} MiB"})

    def memory_checked(self, n: int = 1) -> None:
        self.memory_checks += n
        self.run.extra["host memory checks"] = self.memory_checks

    def end(self) -> None:
        fds, rss = self.server.fd_count(), self.server.rss_bytes()
        self.run.extra.update({"fds after": fds, "RSS after": f"{rss >> 20} MiB"})
        assert fds <= self.fds + FD_SLACK, f"the server's fds went from {self.fds} to {fds}"
        assert rss < self.rss_bytes + RSS_SLACK_BYTES, \
            f"the server's RSS went from {self.rss_bytes >> 20} MiB to {rss >> 20} MiB"


def probes(server: BackendServer, dev: str = "vm0") -> int:
    """Times a guest's driver set the device up (the server logs each)."""
    return server.log().count(f"{dev}: driver ready (features")


def attach(host: Host, server: BackendServer, dev: str, base_kib: int | None, name: str, **kw) -> tuple[Guest, int]:
    """A guest on ``dev`` only, once its driver plugged what is requested;
    returns it and its base MemTotal (``base_kib`` when given: the same
    machine booted before)."""
    guest = host.guest([server.sockets[dev]], name=name, **kw)
    return guest, ready(guest, server, dev, base_kib)


#: How far a fresh boot's MemTotal may be from the first boot's base plus
#: what is plugged: a few pages, far below one block.
BOOT_MEMTOTAL_SLACK_KIB = 64


def ready(guest: Guest, server: BackendServer, dev: str, base_kib: int | None) -> int:
    guest.wait_ready(BOOT_TIMEOUT_S)
    guest.run("mount -o remount,size=8G /tmp")
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind")
    requested = server.get(dev, "requested-size")
    wait_for(lambda: server.get(dev, "size") == requested, RESIZE_TIMEOUT_S, f"{dev} to plug {requested}")
    # A fresh boot of the same machine may come up with a page or so less
    # of boot memory than the boot that measured base_kib (measured: 4 KiB
    # less after a reboot -f, and in a new QEMU); a block not onlined would
    # be off by a whole block (2 MiB and more).
    slack_kib = BOOT_MEMTOTAL_SLACK_KIB if base_kib is not None else 0
    if base_kib is None:
        base_kib = guest.meminfo_kib() - requested // 1024
    try:
        wait_for(lambda: abs(guest.meminfo_kib() - (base_kib + requested // 1024)) <= slack_kib, RESIZE_TIMEOUT_S,
                 "the guest's MemTotal to show the plugged memory")
    except TimeoutError as exc:
        # What the next person needs to tell the server, the guest and the
        # test apart (docs/reliability.md, "Open problems").
        states = guest.run("cat /sys/devices/system/memory/memory*/state | sort | uniq -c", check=False)
        raise TimeoutError(f"{exc}: MemTotal {guest.meminfo_kib()} KiB, expected {base_kib} + "
                           f"{requested // 1024} KiB; {dev} size {server.get(dev, 'size')}; memory block states:\n"
                           f"{states}\nvirtio_mem in dmesg:\n"
                           + "\n".join(line for line in guest.dmesg().splitlines() if "virtio_mem" in line)[-3000:]
                           ) from None
    # This boot's own base, for the exact checks of the resizes that follow.
    return guest.meminfo_kib() - requested // 1024


def resize_one(guest: Guest, server: BackendServer, dev: str, size_bytes: int, base_kib: int) -> None:
    """test_memory_backends.resize for a guest that has only ``dev`` of the
    server's devices: its MemTotal counts that device's size alone."""
    server.set_requested_size(dev, size_bytes)
    wait_for(lambda: server.get(dev, "size") == size_bytes, RESIZE_TIMEOUT_S, f"{dev} size {size_bytes}")
    wait_for(lambda: guest.meminfo_kib() == base_kib + size_bytes // 1024, RESIZE_TIMEOUT_S,
             f"the guest's MemTotal to show {dev}'s {size_bytes >> 20} MiB")


def write_plugged(guest: Guest, server: BackendServer, books: Books, dev: str = "vm0") -> int:
    """The guest writes as much as is plugged (tmpfs pages go to ZONE_MOVABLE,
    where the plugged memory is, first); returns what the backend then
    holds, checked against the plugged size."""
    plugged = server.get(dev, "size")
    if plugged == 0:
        return allocated(server, dev)
    touch(guest, plugged // MIB)
    held = allocated(server, dev)
    # The host never holds more than what is plugged (docs/robustness.md,
    # rule 3), and the guest's writes did reach the plugged memory.
    assert held <= plugged, f"{dev}: the backend holds {held} bytes, {plugged} plugged"
    assert held >= WRITTEN_FRACTION * plugged, \
        f"{dev}: the guest wrote {plugged >> 20} MiB, the backend holds only {held >> 20} MiB"
    books.memory_checked()
    return held


# ---------------------------------------------------------------------------
# 1. Resizes


@dataclass
class Rig:
    host: Host
    server: BackendServer
    guest: Guest
    base_kib: int


@pytest.fixture(scope="module")
def resize_rig(kit, request):
    """One server and one guest for every resize test of the module."""
    workdir = short_tmpdir()
    rig_host = Host(kit, workdir)
    failed_before = request.session.testsfailed
    try:
        server = rig_host.server("soak", device())
        guest, base_kib = boot(rig_host, server)
        yield Rig(rig_host, server, guest, base_kib)
    finally:
        try:
            rig_host.cleanup(request.session.testsfailed > failed_before)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def resize_cycle(rig: Rig, size_bytes: int, books: Books) -> None:
    server, guest = rig.server, rig.guest
    resize(guest, server, "vm0", size_bytes, rig.base_kib)
    # What UNPLUG gave back is back with the host once the discards are
    # done: at most the plugged size is left (pages of blocks still
    # plugged keep what the guest wrote there).
    server.settle("vm0")
    held = allocated(server)
    assert held <= size_bytes, f"after settling at {size_bytes >> 20} MiB the backend holds {held >> 20} MiB"
    books.memory_checked()
    write_plugged(guest, server, books)
    # Freed in the guest before the next resize, so that every unplug can
    # succeed (the pages would otherwise have to migrate to the base RAM,
    # which cannot hold the whole device).
    untouch(guest)


def soak_resizes(rig: Rig, run: FuzzRun, sizes) -> None:
    books = Books(rig.server, run)
    books.start()
    for size_bytes in sizes:
        run.record({"size_bytes": size_bytes})
        resize_cycle(rig, size_bytes, books)
        run.done()
    # Back to 0 for the next test of the rig.
    resize_cycle(rig, 0, books)
    assert allocated(rig.server) == 0
    books.end()
    assert_no_driver_errors(rig.guest)
    assert rig.server.alive()


def test_soak_resize_cycles_with_the_guest_writing(resize_rig):
    n = cycles(ci=10, long=1000)
    with FuzzRun("soak-resize", unit="resize cycles") as run:
        start = time.monotonic()
        soak_resizes(resize_rig, run, (random_size(run.rng) for _ in range(n)))
        run.extra["wall"] = f"{time.monotonic() - start:.0f} s"
    assert run.count == n


@pytest.mark.parametrize("name,reproducer", list(regressions("soak-resize")) or
                         [pytest.param(None, None, marks=pytest.mark.skip("no reproducer saved"))])
def test_soak_resize_regressions(resize_rig, name, reproducer):
    """Replays the sizes of a saved reproducer (tests/fuzz_regressions/
    soak-resize-*.json, at least the hand-written known-good one)."""
    sizes = [item["size_bytes"] for item in reproducer["inputs"]]
    assert sizes, name
    with FuzzRun("soak-resize-replay", unit="resize cycles", seed=reproducer["seed"]) as run:
        run.extra["reproducer"] = name
        soak_resizes(resize_rig, run, sizes)
    assert run.count == len(sizes)


# ---------------------------------------------------------------------------
# 2. Reboots


def test_soak_reboot_with_memory_plugged_and_touched(host):
    n = cycles(ci=3, long=100)
    server = host.server("reboot", device())
    guest, base_kib = boot(host, server)
    with FuzzRun("soak-reboot", unit="reboots") as run:
        books = Books(server, run)
        books.start()
        for _ in range(n):
            size_bytes = random_size(run.rng, minimum=128 * MIB)
            run.record({"size_bytes": size_bytes})
            resize(guest, server, "vm0", size_bytes, base_kib)
            write_plugged(guest, server, books)
            resets = server.log().count(f"vm0: DEVICE reset: unplugged and discarded {format_size(size_bytes)}")
            booted = probes(server)

            guest.reboot()
            # The system reset (vfio-user DEVICE_RESET) unplugs and discards
            # everything, as QEMU's virtio-mem does on reset, before the
            # rebooted guest's driver is back (it has not probed again).
            wait_for(lambda: server.get("vm0", "size") == 0 and server.get("vm0", "discard-pending") == 0
                     and allocated(server) == 0, 60, "size 0 and an empty backend after reboot -f")
            assert probes(server) == booted, "the rebooted guest's driver probed before the backend was empty"
            assert server.log().count(
                f"vm0: DEVICE reset: unplugged and discarded {format_size(size_bytes)}") == resets + 1
            books.memory_checked()
            # requested-size stays: the rebooted guest plugs it again, and
            # its MemTotal is the same base plus that.
            base_kib = ready(guest, server, "vm0", base_kib)
            assert probes(server) == booted + 1
            run.done()
        resize(guest, server, "vm0", 0, base_kib)
        server.settle("vm0")
        assert allocated(server) == 0
        books.end()
    assert_no_driver_errors(guest)
    assert run.count == n


# ---------------------------------------------------------------------------
# 3. QEMU killed in the middle of a resize


def test_soak_qemu_sigkill_mid_resize_and_a_new_qemu_plugs(host):
    n = cycles(ci=2, long=20)
    server = host.server("kill", device())
    with FuzzRun("soak-qemu-kill", unit="QEMU kills") as run:
        size_bytes = random_size(run.rng, minimum=128 * MIB)
        server.set_requested_size("vm0", size_bytes)
        guest, base_kib = attach(host, server, "vm0", None, "guest0")
        books = Books(server, run)
        books.start()
        mid = 0
        for i in range(n):
            write_plugged(guest, server, books)
            target = random_size(run.rng)
            while target == size_bytes:
                target = random_size(run.rng)
            hold = i % 2 == 0
            run.record({"from": size_bytes, "to": target, "hold": hold})
            if hold:
                # The guest's requests wait in the server's queue: at the
                # kill, a PLUG or UNPLUG is in flight for certain.
                server.qmp.execute("qom-set", path="vm0", property="x-hold-requests", value=True)
            server.set_requested_size("vm0", target)
            if hold:
                wait_for(lambda: server.get("vm0", "x-requests-pending"), RESIZE_TIMEOUT_S,
                         "a request of the guest in the queue")
            else:
                wait_for(lambda start=size_bytes: server.get("vm0", "size") != start, RESIZE_TIMEOUT_S,
                         "the size to start moving")
            killed_at = server.get("vm0", "size")
            guest.stop(signal.SIGKILL)
            mid += killed_at != target
            clients = server.log().count("vm0: vfio-user client")
            # The lost connection resets the device (ResetType LOST_CONN):
            # everything unplugged and discarded, the server alive.
            wait_for(lambda: server.get("vm0", "size") == 0 and server.get("vm0", "discard-pending") == 0,
                     60, "size 0 after QEMU died")
            assert allocated(server) == 0
            assert server.alive()
            assert server.get("vm0", "requested-size") == target
            books.memory_checked()
            if hold:
                server.qmp.execute("qom-set", path="vm0", property="x-hold-requests", value=False)
            # A new QEMU attaches to the same socket and plugs what is requested.
            guest, base_kib = attach(host, server, "vm0", base_kib, f"guest{i + 1}")
            assert server.log().count("vm0: vfio-user client") > clients
            size_bytes = target
            run.done()
        run.extra["killed mid-resize"] = f"{mid}/{n}"
        # The books close with a client connected, as they opened.
        books.end()
        assert_no_driver_errors(guest)
    assert run.count == n
    # At least the held ones were in the middle of their resize.
    assert mid >= (n + 1) // 2, run.inputs


# ---------------------------------------------------------------------------
# 4. A frozen guest holds up no other device


def test_soak_sigstopped_guest_mid_grow_does_not_hold_up_the_other_device(host):
    n = cycles(ci=1, long=5)
    server = host.server("freeze", {**device("vmA"), **device("vmB")})
    guest_a = host.guest([server.sockets["vmA"]], name="guestA", cpus=1)
    guest_b = host.guest([server.sockets["vmB"]], name="guestB", cpus=1)
    base_a = ready(guest_a, server, "vmA", None)
    base_b = ready(guest_b, server, "vmB", None)
    with FuzzRun("soak-sigstop", unit="freezes") as run:
        books = Books(server, run)
        books.start()
        for _ in range(n):
            # At least two memory blocks of the guest (128 MiB each): more
            # than the one request that is queued when A stops plugs.
            target_a = random_size(run.rng, minimum=256 * MIB)
            target_b = random_size(run.rng, minimum=128 * MIB)
            run.record({"vmA": target_a, "vmB": target_b})
            # A's guest has a request in the server's queue when its QEMU
            # stops: the server answers it into the frozen guest's memory
            # (and signals its interrupt eventfd) once released.
            server.qmp.execute("qom-set", path="vmA", property="x-hold-requests", value=True)
            server.set_requested_size("vmA", target_a)
            wait_for(lambda: server.get("vmA", "x-requests-pending"), RESIZE_TIMEOUT_S,
                     "a request of guest A in the queue")
            guest_a.proc.send_signal(signal.SIGSTOP)
            try:
                server.qmp.execute("qom-set", path="vmA", property="x-hold-requests", value=False)
                stopped_at = server.get("vmA", "size")
                assert stopped_at < target_a
                # B grows, is written, and shrinks while A is frozen.
                resize_one(guest_b, server, "vmB", target_b, base_b)
                write_plugged(guest_b, server, books, "vmB")
                untouch(guest_b)
                resize_one(guest_b, server, "vmB", 0, base_b)
                server.settle("vmB")
                assert allocated(server, "vmB") == 0
                books.memory_checked()
                # A moved at most by the request answered into its frozen memory.
                assert server.get("vmA", "size") < target_a
            finally:
                guest_a.proc.send_signal(signal.SIGCONT)
            # Continued, A finishes its grow.
            wait_for(lambda t=target_a: server.get("vmA", "size") == t, RESIZE_TIMEOUT_S, "vmA to finish its grow")
            wait_for(lambda t=target_a: guest_a.meminfo_kib() == base_a + t // 1024, RESIZE_TIMEOUT_S,
                     "guest A's MemTotal to show it")
            write_plugged(guest_a, server, books, "vmA")
            untouch(guest_a)
            resize_one(guest_a, server, "vmA", 0, base_a)
            server.settle("vmA")
            assert allocated(server, "vmA") == 0
            run.done()
        books.end()
    for guest in (guest_a, guest_b):
        assert_no_driver_errors(guest)
    assert run.count == n
