"""virtio-mem paths that only a real Linux driver shows (issue: conformance).

NACK after requested_size drops mid-grow, BUSY (retried, never ERROR), Big
Block Mode, a Linux 6.1 guest beside 6.12, two devices on two NUMA nodes,
and many reboots with memory plugged and touched.
"""

from __future__ import annotations

import re
import time

import pytest

from harness import GIB, MIB, wait_for
from test_guest import BOOT_TIMEOUT_S, RESIZE_TIMEOUT_S, assert_no_driver_errors, boot, resize


def test_nack_when_requested_size_drops_mid_grow(env, timing):
    """A PLUG already in flight when requested_size drops is answered NACK,
    and the guest settles at the new size (never ERROR).

    Linux checks for config changes between requests, so the window is the
    time a request spends in the queue; x-hold-requests widens it the way a
    slow host would."""
    server = env.server(size="8G", requested_size="512M")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == 512 * MIB, RESIZE_TIMEOUT_S, "512 MiB plugged at boot")
    base_kib = guest.meminfo_kib() - 512 * MIB // 1024
    server.qmp.execute("qom-set", path=server.id, property="x-hold-requests", value=True)
    server.set_requested_size(4 * GIB)
    wait_for(lambda: server.get("x-requests-pending"), RESIZE_TIMEOUT_S, "the guest's PLUG to arrive")
    server.set_requested_size(512 * MIB)
    server.qmp.execute("qom-set", path=server.id, property="x-hold-requests", value=False)
    wait_for(lambda: "answered NACK" in server.log(), 30, "the held PLUG to be NACKed")
    assert server.get("size") == 512 * MIB
    # The guest settles at the size requested now, and stays usable.
    device_s, guest_s = resize(guest, server, 512 * MIB, base_kib)
    device_s, guest_s = resize(guest, server, 1 * GIB, base_kib)
    assert_no_driver_errors(guest)


def test_busy_is_retried_by_the_guest(env, timing):
    """A host-side discard failure: the failed range is retried by the
    server, UNPLUGs meanwhile are answered BUSY, the guest retries them on
    its timer (50 s in Linux) and finishes; the device is never marked broken."""
    server = env.server(size="4G", requested_size="1G")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "1 GiB plugged at boot")
    base_kib = guest.meminfo_kib() - 1 * GIB // 1024
    # Discards run after the ACK (docs/discard.md): the first UNPLUG is
    # answered ACK and its discard fails, then is retried after 1, 2 and 4 s;
    # the guest's next UNPLUGs in those 7 s are answered BUSY.
    server.qmp.execute("qom-set", path=server.id, property="x-fail-discards", value=3)
    start = time.monotonic()
    server.set_requested_size(0)
    wait_for(lambda: "answered BUSY" in server.log(), 60, "a BUSY answer")
    assert server.get("size") > 0
    # Linux retries after its retry timer (VIRTIO_MEM_RETRY_TIMER_MIN_MS, 50 s).
    wait_for(lambda: server.get("size") == 0, 240, "the guest to retry and finish the unplug")
    wait_for(lambda: guest.meminfo_kib() == base_kib, 60, "MemTotal back to base")
    timing("shrink 1 GiB -> 0 with one BUSY answer (guest retry timer)", time.monotonic() - start)
    assert server.settled_allocated_bytes() == 0
    assert " ERROR" not in "\n".join(l for l in server.log().splitlines() if "answered" in l)
    assert_no_driver_errors(guest)


@pytest.mark.parametrize("block_size, bbm", [("1M", False), ("64M", False), ("128M", True), ("1G", True)])
def test_large_block_sizes_and_big_block_mode(env, timing, block_size, bbm):
    """Block sizes of at least the guest's memory block size (128 MiB on
    x86) make Linux use Big Block Mode; smaller ones Sub Block Mode."""
    server = env.server(size="8G", block_size=block_size)
    guest = boot(env, server)
    dmesg = guest.dmesg()
    assert ("big block size" in dmesg) == bbm, [l for l in dmesg.splitlines() if "virtio_mem" in l]
    base_kib = guest.meminfo_kib()
    device_s, guest_s = resize(guest, server, 2 * GIB, base_kib)
    timing(f"grow 0 -> 2 GiB with block size {block_size} (guest MemTotal)", guest_s)
    device_s, guest_s = resize(guest, server, 0, base_kib)
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest)


@pytest.mark.parametrize("suite, major_minor", [("bookworm", "6.1"), ("trixie", "6.12")])
def test_linux_guest_versions(env, timing, suite, major_minor):
    server = env.server(size="4G")
    guest = boot(env, server, suite=suite)
    assert guest.run("uname -r").startswith(major_minor + ".")
    base_kib = guest.meminfo_kib()
    device_s, guest_s = resize(guest, server, 1 * GIB, base_kib)
    timing(f"Linux {major_minor}: grow 0 -> 1 GiB (guest MemTotal)", guest_s)
    guest.run("mount -o remount,size=8G /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")
    device_s, guest_s = resize(guest, server, 0, base_kib)
    timing(f"Linux {major_minor}: shrink 1 GiB -> 0 (guest MemTotal)", guest_s)
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest)


def node_memtotal_kib(guest, node: int) -> int:
    out = guest.run(f"grep MemTotal /sys/devices/system/node/node{node}/meminfo")
    return int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))


def test_two_devices_on_two_numa_nodes(env, timing):
    """With VIRTIO_MEM_F_ACPI_PXM the guest puts each device's memory on the
    node it was given."""
    s0 = env.server(size="4G", id="vmem0", node=0)
    s1 = env.server(size="4G", id="vmem1", node=1)
    guest = env.guest([s0.socket, s1.socket], numa_nodes=2)
    guest.wait_ready(BOOT_TIMEOUT_S)
    wait_for(lambda: guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ | grep -c virtio").strip() == "2",
             60, "both devices bound")
    assert "nid: 1" in guest.dmesg()
    node0, node1 = node_memtotal_kib(guest, 0), node_memtotal_kib(guest, 1)
    s1.set_requested_size(1 * GIB)
    wait_for(lambda: node_memtotal_kib(guest, 1) == node1 + 1 * GIB // 1024, RESIZE_TIMEOUT_S, "node 1 to grow")
    assert node_memtotal_kib(guest, 0) == node0
    s0.set_requested_size(512 * MIB)
    wait_for(lambda: node_memtotal_kib(guest, 0) == node0 + 512 * MIB // 1024, RESIZE_TIMEOUT_S, "node 0 to grow")
    assert node_memtotal_kib(guest, 1) == node1 + 1 * GIB // 1024
    assert (s0.get("size"), s1.get("size")) == (512 * MIB, 1 * GIB)
    assert_no_driver_errors(guest)


def test_twenty_reboots_with_memory_plugged_and_touched(env, timing):
    """Each reset unplugs and discards everything; the server leaks no fds
    and no memory over 20 reboots."""
    server = env.server(size="4G", requested_size="512M")
    guest = boot(env, server)
    fds = rss = None
    start = time.monotonic()
    for n in range(1, 21):
        wait_for(lambda: server.get("size") == 512 * MIB, RESIZE_TIMEOUT_S, f"512 MiB plugged (boot {n})")
        guest.run("mount -o remount,size=8G /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count=400 2>/dev/null")
        assert server.allocated_bytes() >= 256 * MIB
        resets_before = server.log().count("DEVICE reset: unplugged and discarded 512M")
        guest.reboot()
        wait_for(lambda: server.log().count("DEVICE reset: unplugged and discarded 512M") > resets_before,
                 120, f"reset {n} to unplug and discard 512M")
        guest.wait_ready(BOOT_TIMEOUT_S)
        if n == 2:
            fds, rss = server.fd_count(), server.rss_bytes()
    wait_for(lambda: server.get("size") == 512 * MIB, RESIZE_TIMEOUT_S, "512 MiB plugged after the last boot")
    timing("20 reboots with 512 MiB plugged and touched", time.monotonic() - start)
    assert server.fd_count() <= fds, f"fds grew from {fds} to {server.fd_count()}"
    assert server.rss_bytes() < rss + 16 * MIB, f"server RSS grew from {rss >> 20} to {server.rss_bytes() >> 20} MiB"
    assert_no_driver_errors(guest)
