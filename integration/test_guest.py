"""A stock QEMU 11 guest grows and shrinks its memory through our server.

Checked on the guest's own view (/proc/meminfo, /sys/devices/system/memory,
dmesg) and on the host's (the backend's allocated bytes).
"""

from __future__ import annotations

import signal
import time

from harness import GIB, MIB, wait_for

BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180


def boot(env, server, **kw):
    guest = env.guest([server.socket], **kw)
    guest.wait_ready(BOOT_TIMEOUT_S)
    # /tmp (tmpfs) is where the tests write to the guest's memory; its limit
    # must allow more than the base RAM.
    guest.run("mount -o remount,size=8G /tmp")
    # The driver is bound once the device shows up under virtio_mem.
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind")
    return guest


def online_blocks(guest) -> int:
    # Memory blocks come and go while the driver works: a block listed by
    # the glob may be gone when cat opens it.
    return int(guest.run("cat /sys/devices/system/memory/memory*/state 2>/dev/null | grep -c '^online'").strip())


def resize(guest, server, size_bytes: int, base_kib: int) -> tuple[float, float]:
    """Ask for ``size_bytes``; returns (seconds until the device's size, over
    QMP, and until the guest's MemTotal reached it)."""
    start = time.monotonic()
    server.set_requested_size(size_bytes)
    try:
        wait_for(lambda: server.get("size") == size_bytes, RESIZE_TIMEOUT_S, f"size {size_bytes} over QMP", 0.01)
        device_s = time.monotonic() - start
        wait_for(lambda: guest.meminfo_kib() == base_kib + size_bytes // 1024, RESIZE_TIMEOUT_S,
                 f"guest MemTotal at base + {size_bytes >> 20} MiB")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: device size {server.get('size')}, guest MemTotal {guest.meminfo_kib()} kB "
                           f"(base {base_kib} kB)\n{guest.run('dmesg | tail -30')}") from None
    return device_s, time.monotonic() - start


def assert_no_driver_errors(guest) -> None:
    dmesg = guest.dmesg()
    bad = [line for line in dmesg.splitlines()
           if "virtio_mem" in line and any(w in line.lower() for w in ("error", "fail", "broken", "could not"))]
    assert not bad, "\n".join(bad)


def test_grow_1g_touch_and_shrink_gives_memory_back(env, timing):
    server = env.server(size="4G")
    guest = boot(env, server)
    base_kib = guest.meminfo_kib()
    blocks_before = online_blocks(guest)
    assert server.get("size") == 0

    device_s, guest_s = resize(guest, server, 1 * GIB, base_kib)
    timing("grow 0 -> 1 GiB (device size over QMP)", device_s)
    timing("grow 0 -> 1 GiB (guest MemTotal)", guest_s)
    # 1 GiB is 8 Linux memory blocks of 128 MiB, all online.
    assert online_blocks(guest) == blocks_before + 8, guest.run("grep . /sys/devices/system/memory/memory*/state")
    assert server.qmp.execute("query-memory-devices")[0]["data"]["size"] == 1 * GIB

    # Write to most of the new memory: movable allocations (tmpfs pages)
    # prefer ZONE_MOVABLE, where the plugged memory was onlined.
    guest.run("dd if=/dev/zero of=/tmp/fill bs=1M count=900 2>/dev/null")
    touched = server.allocated_bytes()
    assert touched >= 600 * MIB, f"the guest's writes reached only {touched >> 20} MiB of the backend"
    guest.run("rm /tmp/fill")

    device_s, guest_s = resize(guest, server, 0, base_kib)
    timing("shrink 1 GiB -> 0 after touching 900 MiB (device size)", device_s)
    timing("shrink 1 GiB -> 0 after touching 900 MiB (guest MemTotal)", guest_s)
    assert online_blocks(guest) == blocks_before
    # Every unplugged block was discarded: the host got its memory back.
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest)


def test_8g_device_grows_to_4g(env, timing):
    server = env.server(size="8G")
    guest = boot(env, server)
    base_kib = guest.meminfo_kib()
    # The guest sees the whole 8 GiB region in a 64-bit BAR.
    dmesg = guest.dmesg()
    assert "region size: 0x200000000" in dmesg
    assert server.get("memaddr") >= 4 * GIB

    device_s, guest_s = resize(guest, server, 4 * GIB, base_kib)
    timing("grow 0 -> 4 GiB of an 8 GiB device (device size)", device_s)
    timing("grow 0 -> 4 GiB of an 8 GiB device (guest MemTotal)", guest_s)
    assert_no_driver_errors(guest)


def test_reboot_with_memory_plugged_replugs_after_discard(env, timing):
    server = env.server(size="4G", requested_size="1G")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "1 GiB plugged at boot")
    guest.run("dd if=/dev/zero of=/tmp/fill bs=1M count=900 2>/dev/null")
    touched = server.allocated_bytes()
    assert touched >= 600 * MIB

    start = time.monotonic()
    guest.reboot()
    # The system reset unplugs and discards everything...
    wait_for(lambda: "DEVICE reset: unplugged and discarded 1G" in server.log(), 120, "the reset to unplug 1G")
    # ...and the rebooted guest plugs the still-requested size again.
    guest.wait_ready(BOOT_TIMEOUT_S)
    wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "1 GiB plugged after reboot")
    timing("reboot -f until 1 GiB plugged again", time.monotonic() - start)
    assert server.settled_allocated_bytes() < touched // 2, "the memory touched before the reboot was not discarded"
    wait_for(lambda: "virtio0" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/"), 60, "driver bound")
    assert_no_driver_errors(guest)


def test_qemu_sigkill_server_survives_and_serves_the_next_qemu(env, timing):
    server = env.server(size="4G", requested_size="1G")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "1 GiB plugged at boot")
    guest.run("dd if=/dev/zero of=/tmp/fill bs=1M count=512 2>/dev/null")
    assert server.allocated_bytes() > 0

    guest.stop(signal.SIGKILL)
    # The lost connection unplugs and discards everything; the server lives.
    wait_for(lambda: server.get("size") == 0, 60, "size 0 after QEMU died")
    assert server.alive()
    assert server.settled_allocated_bytes() == 0

    start = time.monotonic()
    guest2 = boot(env, server, name="guest2")
    wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "1 GiB plugged by the second QEMU")
    timing("second QEMU boot until 1 GiB plugged", time.monotonic() - start)
    base_kib = guest2.meminfo_kib() - 1 * GIB // 1024
    device_s, guest_s = resize(guest2, server, 0, base_kib)
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest2)


def test_1t_device_needs_and_works_with_phys_bits_46(env, timing):
    """Up to 256 GiB the BAR fits QEMU's defaults; a 1 TiB BAR needs a wider
    guest physical address space (README: "Large devices")."""
    server = env.server(size="1T")
    guest = boot(env, server, extra_args=["-cpu", "qemu64,phys-bits=46"])
    base_kib = guest.meminfo_kib()
    assert "region size: 0x10000000000" in guest.dmesg()
    assert server.get("memaddr") >= 1 << 40
    device_s, guest_s = resize(guest, server, 2 * GIB, base_kib)
    timing("grow 0 -> 2 GiB of a 1 TiB device (guest MemTotal)", guest_s)
    device_s, guest_s = resize(guest, server, 0, base_kib)
    assert server.settled_allocated_bytes() == 0
    assert_no_driver_errors(guest)
