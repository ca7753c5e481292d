"""What a running guest sees when the server dies (SIGKILL), and what a
server started again on the same socket path does
(docs/reliability.md, "When the server dies").

QEMU's vfio-user client has no reconnect: the end of the socket (a read of
0 bytes) shuts its proxy down for good (hw/vfio-user/proxy.c, state
VFIO_PROXY_ERROR), and every later message fails at once instead of waiting
for ``x-msg-timeout``.  What the guest keeps is what QEMU mapped: the
memory BAR is an mmap of the server's memfd in QEMU, which QEMU holds open,
so the plugged memory stays, with its content, readable and writable.
What traps to the server (BAR0: the virtio configuration and the notify
area; PCI config space) fails in QEMU, which logs each access; the guest
reads all-ones there (measured on device_status).  A rebooted guest hangs
in its boot.  The operator's procedure is in the doc.

A server that only stalls past QEMU's ``x-msg-timeout`` loses the
connection too, while QEMU and its guest run on: the second test shows that
the server then holds the lost connection's reset (the blocks and what the
guest wrote in them stay) until that QEMU exits.
"""

from __future__ import annotations

import re
import signal

from harness import MIB, memfd_allocated_bytes, wait_for
from test_guest import BOOT_TIMEOUT_S, RESIZE_TIMEOUT_S, assert_no_driver_errors, boot

PLUGGED = 256 * MIB
#: What the guest writes: within the plugged memory (tmpfs pages go to
#: ZONE_MOVABLE, where the plugged memory was onlined, first).
WRITTEN_MIB = 128
PATTERN = "vfiouser-vmem server-dies pattern 0123456789abcdef"
OVERWRITE = "overwritten after the server died"
#: The common configuration's device_status (virtio 1.x, 4.1.4.3: offset
#: 0x14 of the structure, which the server puts at the start of BAR0).
STATUS_READ_FAILED = re.compile(r"vfio_region_read\(vfio-user:\S+/vmem0\.sock:region0\+0x14, 1\) failed: Bad address")


def fill(guest, line: str, *, in_place: bool = False) -> str:
    """/tmp/pattern: ``WRITTEN_MIB`` MiB of ``line`` repeated, over the old
    content (the same tmpfs pages) when ``in_place``; returns the SHA-1 of
    what was meant to be written, computed apart from the file.  Made of a
    1 MiB chunk: busybox yes writes a line per write(), slow under TCG."""
    guest.run(f"yes '{line}' | head -c 1m > /tmp/chunk")
    stream = f"for i in $(seq {WRITTEN_MIB}); do cat /tmp/chunk; done"
    dd = "dd of=/tmp/pattern bs=1M 2>/dev/null" + (" conv=notrunc" if in_place else "")
    guest.run(f"{stream} | {dd}", timeout_s=300)
    return guest.run(f"{stream} | sha1sum", timeout_s=300).split()[0]


def file_digest(guest) -> str:
    return guest.run("sha1sum /tmp/pattern", timeout_s=300).split()[0]


def qemu_allocated(guest) -> int:
    """The allocated bytes of the device's memfd as QEMU holds it (the
    server that made it may be gone): what the host keeps for the guest."""
    return memfd_allocated_bytes(guest.proc.pid, name_prefix="vfiouser-vmem:vmem0 ")


def test_server_sigkill_guest_keeps_plugged_memory_and_a_new_server_serves_a_new_qemu(env):
    server = env.server(size="1G", requested_size="256M")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == PLUGGED, RESIZE_TIMEOUT_S, "256 MiB plugged at boot")
    digest = fill(guest, PATTERN)
    assert file_digest(guest) == digest
    held = server.allocated_bytes()
    assert held >= WRITTEN_MIB * MIB * 3 // 4, f"the pattern reached only {held >> 20} MiB of the backend"
    # One memfd, seen through either process's fd.
    assert qemu_allocated(guest) == held
    assert guest.run("cat /sys/bus/virtio/devices/virtio0/status").strip() == "0x0000000f"  # ... DRIVER_OK
    dmesg_lines = len(guest.dmesg().splitlines())

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    # QEMU's vfio-user iothread reads the end of the connection and says so once.
    wait_for(lambda: "failed to read header: EOF" in guest.qemu_log(), 60, "QEMU to log the end of the connection")
    log_at_death = guest.qemu_log()
    print("QEMU log after the server died:\n" + log_at_death)

    # The plugged memory stays: readable (the pattern reads back) ...
    assert file_digest(guest) == digest
    # ... and writable (in place: the same tmpfs pages, in plugged memory).
    overwritten = fill(guest, OVERWRITE, in_place=True)
    assert file_digest(guest) == overwritten != digest
    # The host keeps that memory for QEMU: the dead server's memfd lives on
    # in QEMU's fd (and mapping) until QEMU exits.
    kept = qemu_allocated(guest)
    print(f"backend memory QEMU keeps after the server died: {kept >> 20} MiB (the server held {held >> 20} MiB)")
    assert kept >= held
    # Nothing of this traps to the server: QEMU logged nothing more.
    assert guest.qemu_log() == log_at_death

    # What traps to the server fails at once: device_status, read through
    # QEMU's vfio-user proxy, is all-ones, and QEMU logs the failed access.
    assert guest.run("cat /sys/bus/virtio/devices/virtio0/status").strip() == "0x000000ff"
    wait_for(lambda: STATUS_READ_FAILED.search(guest.qemu_log()), 30, "QEMU to log the failed read of BAR0")
    print("QEMU log after a read of device_status:\n" + guest.qemu_log())
    # The guest's driver is not told anything (no config interrupt comes):
    # no line of its in dmesg, and the guest runs on.
    since = guest.dmesg().splitlines()[dmesg_lines:]
    print("guest dmesg since the server died:\n" + "\n".join(since))
    assert not [line for line in since if "virtio_mem" in line], since
    assert guest.run("echo alive").strip() == "alive"
    assert guest.proc.poll() is None

    # A server started again on the same socket path takes it (the stale
    # socket is replaced: vfiouser_vmem/util/sockets.py) ...
    # (Same id, so the same socket paths, and the same log file: the dead
    # server's log is read first, for the report of a failure.)
    print("the killed server's log:\n" + server.log()[-3000:])
    again = env.server(size="1G", requested_size="256M")
    assert again.socket == server.socket
    assert f"removed stale socket {again.socket}" in again.log(), again.log()
    # ... the running QEMU does not come back to it (no reconnect) ...
    assert "vfio-user client" not in again.log()
    # ... its memory is a new memfd, which the old QEMU does not map (the
    # old guest cannot reach the next guest's memory) ...
    assert again.allocated_bytes() == 0
    # ... and a new QEMU attaches and plugs.
    second = boot(env, again, name="second")
    wait_for(lambda: again.get("size") == PLUGGED, RESIZE_TIMEOUT_S, "256 MiB plugged by the new QEMU")
    assert "vmem0: vfio-user client 1 (pid" in again.log()
    assert "vfio-user client 2" not in again.log()
    assert_no_driver_errors(second)
    second_digest = fill(second, PATTERN)
    assert second_digest == digest
    assert again.allocated_bytes() >= WRITTEN_MIB * MIB * 3 // 4
    # The first guest's memory is its own still.
    assert file_digest(guest) == overwritten
    assert qemu_allocated(guest) == kept

    # The first guest rebooted: QEMU's system reset cannot reach the server,
    # and the rebooted guest's virtio_pci, which resets the device at probe
    # and waits for device_status to read 0 (virtio 1.x, 2.1.1; Linux
    # drivers/virtio/virtio_pci_modern.c, vp_reset: msleep(1) until 0),
    # reads all-ones for ever: the boot hangs there and never comes back
    # to the command channel.
    failed_reads = len(STATUS_READ_FAILED.findall(guest.qemu_log()))
    guest.reboot()
    wait_for(lambda: len(STATUS_READ_FAILED.findall(guest.qemu_log())) > failed_reads + 100, BOOT_TIMEOUT_S,
             "the rebooted guest's driver to poll device_status")
    print("the first guest after reboot -f, the end of its console:\n" + "\n".join(guest.console().splitlines()[-15:]))
    print(f"its QEMU logged {len(STATUS_READ_FAILED.findall(guest.qemu_log())) - failed_reads} failed reads of "
          f"device_status since the reset; memory QEMU keeps of the dead server's memfd: "
          f"{qemu_allocated(guest) >> 20} MiB")
    assert guest.proc.poll() is None


def test_server_stalled_past_x_msg_timeout_keeps_the_guests_plugged_memory(env):
    """A server that is alive but does not answer for longer than QEMU's
    ``x-msg-timeout`` (5000 ms): QEMU gives the access up (the guest reads
    all-ones), and the late reply puts QEMU's stream out of step ("unexpected
    reply", then "bad header size": hw/vfio-user/proxy.c drops the stream),
    so the connection ends while QEMU and its guest run on, mapping the
    backend.  The guest's plugged memory must stay what it wrote."""
    server = env.server(size="1G", requested_size="256M")
    guest = boot(env, server)
    wait_for(lambda: server.get("size") == PLUGGED, RESIZE_TIMEOUT_S, "256 MiB plugged at boot")
    digest = fill(guest, PATTERN)
    held = server.allocated_bytes()
    server.proc.send_signal(signal.SIGSTOP)
    try:
        assert guest.run("cat /sys/bus/virtio/devices/virtio0/status", timeout_s=120).strip() == "0x000000ff"
        assert "timed out waiting for reply" in guest.qemu_log()
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # The next trapped access reads the late reply.
    guest.run("cat /sys/bus/virtio/devices/virtio0/status", timeout_s=120)
    wait_for(lambda: "unexpected reply" in guest.qemu_log(), 30, "QEMU to read the late reply")
    # The guest runs on with what it wrote: the server holds the lost
    # connection's reset while that QEMU runs and maps the backend
    # (DeviceServer._hold_lost_connection), and takes no new client meanwhile.
    wait_for(lambda: server.get("unplugged-quarantine") == guest.proc.pid, 30, "the device held for its QEMU")
    assert file_digest(guest) == digest
    assert server.allocated_bytes() >= held
    assert server.get("size") == PLUGGED
    # Once that QEMU is gone, the reset runs: everything back to the host.
    guest.stop()
    wait_for(lambda: server.get("size") == 0 and server.allocated_bytes() == 0, 60, "the held reset after QEMU exited")
    assert server.get("unplugged-quarantine") == 0
    assert "is gone but its process still runs and maps this device's memory" in server.log()
