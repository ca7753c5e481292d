"""The scrubber with a real QEMU 11 and a real guest (docs/scrub.md).

A guest can write to blocks of the memory BAR it has not plugged: QEMU maps
the whole device's memory into it.  Here the guest does so through /dev/mem
(busybox ``devmem``, one write per 4 KiB page), and the host's side is
checked: the backend's allocated bytes (the server's memfd), the device's
QOM counters (``unplugged-found``, ``unplugged-reclaimed``,
``unplugged-episodes``, ``scrub-passes``), the server's WARNING and the QMP
event ``__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND`` on the server's QMP.

1. virtio_mem unloaded, nothing plugged: the memory written comes back to
   the host within the scrub period (measured with scrub-interval 1 and the
   default 10), the guest reads zeros there, and the driver loaded again
   plugs and unplugs as before.
2. ``reboot -f`` after such writes, with no periodic scrub at all: the
   reset (which discards the whole device) empties the backend before the
   rebooted guest's driver is back, and the rebooted guest plugs and unplugs.
3. Plugged memory filled with a pattern reads back intact after several
   scrub passes, none of which finds or gives back anything.  (With the
   driver loaded the guest cannot write into unplugged blocks through
   /dev/mem: virtio_mem claims the device's range as an exclusive resource
   and devmem's mmap fails with EPERM, also with iomem=relaxed; so the
   guests of 1, 2 and 4 unload it first.)
4. ``unplugged-access=disconnect``: what QEMU and the guest do when the
   server drops QEMU's vfio-user connection, and the next QEMU on the same
   socket is served.

Servers and guests are stopped by PID by the ``host`` fixture
(integration/test_memory_backends.py), also when a test fails.
"""

# ruff: noqa: F811 (the "host" fixture imported from test_memory_backends, used as a parameter)
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from harness import GIB, MIB, Guest, wait_for
from test_memory_backends import (
    BOOT_TIMEOUT_S,
    VIRTIO_MEM_PCI_ID,
    BackendServer,
    Host,
    assert_no_driver_errors,
    boot,
    host,  # noqa: F401 (the fixture; the tests' parameters of that name are it: F811 below)
    memfd_of,
    resize,
)

PAGE = 4096
#: The counters of findings (not of passes).
FOUND = ("unplugged-found", "unplugged-reclaimed", "unplugged-episodes")
EVENT = "__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND"
WARNING_RE = re.compile(r"WARNING .*vm0: host memory in unplugged blocks: ")
#: Written into unplugged blocks: 4 MiB, one 32-bit write per page.
WRITTEN = 4 * MIB
#: Written where the amount does not matter (devmem takes ~40 ms a page under TCG).
SMALL = 1 * MIB


def start(host: Host, name: str, options: str) -> BackendServer:
    """A server with one 1G memfd device ``vm0`` (``options``: more device keys)."""
    return host.server(name, {"vm0": ("memory-backend-memfd,size=1G", options)})


def allocated(server: BackendServer) -> int:
    return server.backend_file(memfd_of("vm0")).st_blocks * 512


def pattern_count(server: BackendServer, pattern: bytes, length: int) -> int:
    """Occurrences of ``pattern`` in the first ``length`` bytes of the
    backend, read on the host through the server's fd (a read of a hole
    allocates nothing)."""
    # (The memfd may be open more than once: any of its fds will do.)
    fd = min(int(link.name) for link in Path(f"/proc/{server.proc.pid}/fd").iterdir()
             if memfd_of("vm0")(os.readlink(link)))
    count = 0
    with open(f"/proc/{server.proc.pid}/fd/{fd}", "rb") as f:
        for _ in range(length // (16 * MIB)):
            count += f.read(16 * MIB).count(pattern)  # the line is 48 bytes: a few cross a chunk
    return count


def memory_bar(guest: Guest) -> tuple[int, int]:
    """(start, length) of the virtio-mem device's memory BAR as the guest's
    PCI core placed it: line 3 of sysfs ``resource`` (BAR2)."""
    out = guest.run("for d in /sys/bus/pci/devices/*; do if [ \"$(cat $d/device)\" = " + VIRTIO_MEM_PCI_ID +
                    " ]; then sed -n 3p $d/resource; fi; done")
    (line,) = out.strip().splitlines()
    first, last, _ = line.split()
    return int(first, 16), int(last, 16) - int(first, 16) + 1


def devmem_fill(guest: Guest, addr: int, length: int, value: int) -> None:
    """One 32-bit write of ``value`` per page of [addr, addr + length) through
    /dev/mem (busybox devmem: an mmap of /dev/mem, which reaches QEMU's
    mapping of the backend like any guest access)."""
    guest.run(f"a={addr}; while [ $a -lt {addr + length} ]; do devmem $a 32 {value:#x} || exit 1; "
              f"a=$((a + {PAGE})); done", timeout_s=600)


def devmem_read(guest: Guest, addr: int) -> int:
    return int(guest.run(f"devmem {addr:#x} 32").strip(), 16)


def counters(server: BackendServer) -> dict[str, int]:
    return {p: server.get("vm0", p) for p in
            ("unplugged-found", "unplugged-reclaimed", "unplugged-episodes", "scrub-passes")}


def unload_driver(guest: Guest) -> str:
    """``rmmod virtio_mem`` (nothing plugged); returns the module's file for
    insmod (the initramfs has no modules.dep, so no modprobe)."""
    (module,) = [m for m in guest.run("cat /lib/modules/load-order").split() if m.startswith("virtio_mem")]
    guest.run("rmmod virtio_mem")
    assert guest.run("ls /sys/bus/virtio/drivers/virtio_mem 2>&1 || true").strip().endswith(
        "No such file or directory"), "virtio_mem is still registered"
    return f"/lib/modules/{module}"


def load_driver(guest: Guest, path: str) -> None:
    guest.run(f"insmod {path}")
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind again")


def assert_event(event: dict | None, bar: int, action: str) -> dict:
    assert event is not None, f"no {EVENT} event"
    data = event["data"]
    assert data["id"] == "vm0" and data["action"] == action and data["located"] is True, data
    assert data["size"] == sum(r["size"] for r in data["ranges"]) > 0, data
    assert all(bar <= r["addr"] and r["addr"] + r["size"] <= bar + GIB for r in data["ranges"]), data
    assert data["total-found"] >= data["size"], data
    return data


# ---------------------------------------------------------------------------
# 1. The driver unloaded: the host gets the memory back within the scrub period


def _unplugged_writes_are_reclaimed(host: Host, timing, interval_s: int | None) -> None:
    options = f"scrub-interval={interval_s}" if interval_s is not None else ""
    server = start(host, "reclaim", options)
    period = interval_s if interval_s is not None else 10
    assert server.get("vm0", "scrub-interval") == period
    assert server.get("vm0", "unplugged-access") == "reclaim"
    guest, base_kib = boot(host, server)
    bar, length = memory_bar(guest)
    assert (bar, length) == (server.get("vm0", "memaddr"), GIB)
    module = unload_driver(guest)
    before = counters(server)
    assert before["unplugged-found"] == before["unplugged-episodes"] == 0, before
    assert allocated(server) == 0

    # 4 MiB at 64 MiB into the BAR, all of it unplugged.
    target = bar + 64 * MIB
    t0 = time.monotonic()
    devmem_fill(guest, target, WRITTEN, 0x5A5A5A5A)
    written = time.monotonic()
    # The scrubber may take part of it while the guest is still writing
    # (the loop takes seconds under TCG): measured from the last write.
    wait_for(lambda: allocated(server) == 0 and server.get("vm0", "unplugged-reclaimed") >= WRITTEN,
             period + 30, "the host to get the 4 MiB written into unplugged blocks back")
    back = time.monotonic()
    label = f"scrub-interval={period}: last devmem write -> allocated 0"
    print(f"{label}: {back - written:.2f} s (the writes took {written - t0:.2f} s)")
    # Measured, not asserted (the wait above bounds it): TCG on shared cores.
    timing(label, back - written)

    after = counters(server)
    # Every page written was found and given back (found == reclaimed with
    # reclaim), in one or more episodes of one WARNING each.
    assert after["unplugged-found"] == after["unplugged-reclaimed"] == WRITTEN, after
    assert after["unplugged-episodes"] >= 1, after
    warnings = WARNING_RE.findall(server.log())
    assert len(warnings) == after["unplugged-episodes"], (warnings, after)
    assert server.get("vm0", "discard-pending") == 0
    # The QMP event, on the server's QMP client (events that arrived during
    # the qom-gets are queued there).
    data = assert_event(server.qmp.wait_event(EVENT, 10, data={"id": "vm0"}), bar, "reclaim")
    assert all(target <= r["addr"] and r["addr"] + r["size"] <= target + WRITTEN for r in data["ranges"]), data
    # What the guest reads there now is the hole: zeros.  A read fault on
    # a shared shmem mapping allocates a page too (no zero page): found
    # and given back as well.
    assert [devmem_read(guest, target + off) for off in (0, WRITTEN // 2, WRITTEN - PAGE)] == [0, 0, 0]
    wait_for(lambda: allocated(server) == 0 and server.get("vm0", "unplugged-found") == WRITTEN + 3 * PAGE,
             period + 30, "the pages the reads faulted in to be given back")

    # The driver loaded again plugs and unplugs as before.
    load_driver(guest, module)
    resize(guest, server, "vm0", 256 * MIB, base_kib)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated(server) == 0
    # Plugging, touching nothing, unplugging: no finding more.
    assert counters(server)["unplugged-found"] == WRITTEN + 3 * PAGE
    assert_no_driver_errors(guest)
    assert server.alive() and guest.proc.poll() is None


def test_unplugged_writes_with_the_driver_unloaded_come_back_with_a_one_second_period(host, timing):
    _unplugged_writes_are_reclaimed(host, timing, 1)


def test_unplugged_writes_with_the_driver_unloaded_come_back_with_the_default_period(host, timing):
    _unplugged_writes_are_reclaimed(host, timing, None)


# ---------------------------------------------------------------------------
# 2. reboot -f empties the backend before the guest comes back


def probes(server: BackendServer) -> int:
    """Times a guest's driver set up the device (the server logs each)."""
    return server.log().count("vm0: driver ready (features")


def test_reboot_after_unplugged_writes_leaves_the_backend_empty_and_the_driver_works(host, timing):
    # No periodic scrub (scrub-interval=0): only the reset's pass can find it.
    server = start(host, "reboot", "scrub-interval=0")
    guest, _ = boot(host, server)
    bar, _ = memory_bar(guest)
    unload_driver(guest)
    devmem_fill(guest, bar + 128 * MIB, SMALL, 0xA5A5A5A5)
    assert allocated(server) == SMALL
    assert counters(server)["unplugged-found"] == 0, "a pass ran with scrub-interval=0 and no resize"
    booted = probes(server)
    passes = server.get("vm0", "scrub-passes")
    assert booted == 1, server.log()

    start_s = time.monotonic()
    guest.reboot()
    wait_for(lambda: allocated(server) == 0, 60, "the backend to be empty after reboot -f")
    empty_s = time.monotonic() - start_s
    # Before the guest is back: its driver has not probed the device again.
    assert probes(server) == booted, "the rebooted guest's driver probed before the backend was empty"
    assert server.get("vm0", "size") == 0
    # The reset's discard of the whole device took it ("Reset means empty",
    # docs/scrub.md): no finding, no event; the reset's own pass was clean.
    wait_for(lambda: server.get("vm0", "scrub-passes") > passes, 30, "the reset's scrub pass")
    c = counters(server)
    assert {k: c[k] for k in FOUND} == dict.fromkeys(FOUND, 0), c
    assert server.qmp.wait_event(EVENT, 0) is None
    print(f"reboot -f -> backend empty: {empty_s:.2f} s")
    timing("reboot -f after unplugged writes -> backend empty", empty_s)

    guest.wait_ready(BOOT_TIMEOUT_S)
    guest.run("mount -o remount,size=8G /tmp")
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind after the reboot")
    assert probes(server) == booted + 1
    base_kib = guest.meminfo_kib()
    resize(guest, server, "vm0", 256 * MIB, base_kib)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated(server) == 0
    assert_no_driver_errors(guest)


# ---------------------------------------------------------------------------
# 3. Plugged memory is never touched


PATTERN = b"vfiouser-vmem scrub pattern 0123456789abcdef"


def test_plugged_pattern_survives_scrub_passes(host):
    server = start(host, "pattern", "scrub-interval=1")
    guest, base_kib = boot(host, server)
    resize(guest, server, "vm0", 256 * MIB, base_kib)
    # A pattern file in the guest's tmpfs: movable pages, which go to the
    # plugged memory (onlined movable) first.
    guest.run(f"yes '{PATTERN.decode()}' | head -c 200m > /tmp/pattern")
    digest = guest.run("sha1sum /tmp/pattern").split()[0]
    held = allocated(server)
    print(f"the pattern file put {held >> 20} MiB into the plugged 256 MiB")
    assert held >= 100 * MIB, f"the pattern reached only {held >> 20} MiB of the backend"
    # The host sees the pattern in the plugged 256 MiB.
    copies = pattern_count(server, PATTERN, 256 * MIB)
    assert copies >= 100 * MIB // (len(PATTERN) + 1), copies
    before = counters(server)
    assert {k: before[k] for k in FOUND} == dict.fromkeys(FOUND, 0), before

    server.settle("vm0")
    passes = server.get("vm0", "scrub-passes")
    wait_for(lambda: server.get("vm0", "scrub-passes") >= passes + 3, 30, "three more scrub passes")

    after = counters(server)
    assert after["scrub-passes"] >= passes + 3
    assert {k: after[k] for k in FOUND} == {k: before[k] for k in FOUND}, (before, after)
    assert server.get("vm0", "size") == 256 * MIB
    # Nothing of the plugged memory was given back...
    assert allocated(server) >= held, (held, allocated(server))
    assert pattern_count(server, PATTERN, 256 * MIB) == copies
    # ...and the guest reads its pattern back, through the pages the host holds.
    assert guest.run("sha1sum /tmp/pattern").split()[0] == digest

    guest.run("rm /tmp/pattern")
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated(server) == 0
    assert_no_driver_errors(guest)


# ---------------------------------------------------------------------------
# 4. unplugged-access=disconnect


def test_disconnect_drops_qemu_and_the_server_serves_the_next_one(host):
    server = start(host, "disconnect", "scrub-interval=1,unplugged-access=disconnect")
    guest, _ = boot(host, server)
    bar, _ = memory_bar(guest)
    module = unload_driver(guest)
    # The server drops QEMU at the first pass that sees some of it, while
    # the guest is still writing: the rest of the writes still succeed.
    devmem_fill(guest, bar + 64 * MIB, SMALL, 0x77777777)
    wait_for(lambda: "vm0: dropping vfio-user client 1: it put memory into unplugged blocks" in server.log(), 30,
             "the server to drop QEMU")
    assert_event(server.qmp.wait_event(EVENT, 10, data={"id": "vm0"}), bar, "disconnect")
    assert "vm0: vfio-user client 1 disconnected" in server.log()
    # QEMU says so once on stderr and goes on running, and so does the guest.
    wait_for(lambda: "failed to read header: EOF" in guest.qemu_log(), 30, "QEMU to see the end of the connection")
    assert guest.run("echo alive").strip() == "alive"
    assert guest.proc.poll() is None
    # QEMU keeps its mapping of the backend: what the guest wrote after the
    # disconnect is host memory too, found and given back all the same.
    # (Pages written between the pass that disconnected and the lost-
    # connection reset go with the reset's discard of the whole device, not
    # as findings: docs/scrub.md, "Reset means empty".)
    wait_for(lambda: allocated(server) == 0 and SMALL - 16 * PAGE <= server.get("vm0", "unplugged-found") <= SMALL,
             30, "every page written to be found or discarded")
    found = server.get("vm0", "unplugged-found")
    devmem_fill(guest, bar + 512 * MIB, PAGE, 0x11111111)
    assert devmem_read(guest, bar + 512 * MIB) == 0x11111111
    wait_for(lambda: allocated(server) == 0 and server.get("vm0", "unplugged-found") == found + PAGE, 30,
             "the write after the disconnect to be found and given back")
    # The guest's PCI device is still there, but what traps to the server
    # fails in QEMU: the driver loaded again reads and writes the common
    # configuration (BAR0) and QEMU logs each access as failed (the guest
    # reads all-ones; Linux 6.12 then oopses in virtio_pci's admin queue
    # setup and insmod is killed: printed, not asserted, that is the guest's).
    out = guest.run(f"insmod {module}; echo rc=$?; dmesg | tail -40", timeout_s=120, check=False)
    print("insmod after the disconnect:\n" + out)
    wait_for(lambda: re.search(r"vfio_region_read\(vfio-user:\S+vm0\.sock:region0\+0x\w+, \d+\) failed: Bad address",
                               guest.qemu_log()), 30, "QEMU to log the failed read of BAR0")
    print("QEMU stderr after the disconnect:\n" + guest.qemu_log())
    assert guest.run("echo alive").strip() == "alive"
    assert guest.proc.poll() is None
    assert server.get("vm0", "size") == 0

    # The first QEMU still maps the backend: the device is quarantined (no
    # new client) while it runs, or its guest could reach the next guest's
    # memory (docs/scrub.md; the refusal itself: tests/test_scrub.py).
    assert server.get("vm0", "unplugged-quarantine") == guest.proc.pid
    guest.stop()
    assert server.get("vm0", "unplugged-quarantine") == 0  # it exited: the quarantine ends
    # A second QEMU attaches to the same socket and is served as usual.
    second, base_kib = boot(host, server, name="second")
    assert "vm0: vfio-user client 2 (pid" in server.log()
    resize(second, server, "vm0", 256 * MIB, base_kib)
    resize(second, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated(server) == 0
    assert_no_driver_errors(second)
    assert server.alive()
