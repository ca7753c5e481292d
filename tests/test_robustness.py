"""No vfio-user client can kill, freeze or mislead the server (docs/robustness.md).

One server process serves every virtio-mem device of a host, so these tests
run ``vfiouser-vmem serve`` as a separate process with two devices (vm0,
vm1) and attack vm0 over its vfio-user socket, the way a broken or hostile
QEMU (or a guest steering QEMU) could: DMA mappings the server must not
trust, messages that stop half way, replies nobody reads, chains whose
answer cannot be delivered, reads of unplugged memory.  After each attack
the process must still run, QMP must answer, and vm1 must still serve its
own client; where the attack happens while the other clients wait, they
must be answered meanwhile, not after the attacker was dropped.

Nothing sleeps for synchronisation: the server's answers, QMP and the
process state are awaited under ``trio.fail_after``.  The time bounds are
liveness bounds, far above what the operations take, and below the
server's 5 s per-message deadline where a test must show that others were
served *while* an attacker held its connection.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from proc_util import start_serve, terminate
from vfio_user_client import (
    BAR2,
    CONFIG_REGION,
    DMA_READ,
    DMA_RW,
    FLAG_TYPE_COMMAND,
    HEADER,
    HEADER_SIZE,
    VFIO_USER_REGION_READ,
    VFIO_USER_REGION_WRITE,
    ProtocolError,
    VfioUserClient,
    VfioUserError,
)
from virtio_driver import (
    ACK,
    DEFAULT_BAR_ADDR,
    PLUG,
    STATUS_NEEDS_RESET,
    UNPLUG_ALL,
    Chain,
    VirtioMemDriver,
    request,
)

MiB = 1 << 20
BLOCK = 2 * MiB
TIMEOUT = 30  # for things that take milliseconds: a process start, a round trip
#: Other clients must be answered within this while an attacker holds its
#: connection: below the server's per-message deadline (server.py
#: MESSAGE_DEADLINE_S, 5 s), so that an answer cannot be the one that
#: comes after the attacker was dropped.
WHILE_HELD_S = 3.0
DEADLINE_S = 5.0
_REGION_ACCESS = struct.Struct("<QII")  # offset, region, count


def region_write_message(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    """A whole REGION_WRITE message, to send as the test likes."""
    return HEADER.pack(msg_id, VFIO_USER_REGION_WRITE, HEADER_SIZE + _REGION_ACCESS.size + len(data),
                       FLAG_TYPE_COMMAND, 0) + _REGION_ACCESS.pack(offset, region, len(data)) + data


@asynccontextmanager
async def memory_bar_fd(driver: VirtioMemDriver) -> AsyncIterator[int]:
    """The memory BAR's fd from its region info (a dup: the client's own
    closes with it); its st_blocks are the host memory the backend holds."""
    info = await driver.client.region_info(BAR2)
    fd = os.dup(info.fd)
    try:
        yield fd
    finally:
        os.close(fd)


def allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


class Served:
    """``serve`` with vm0 (1 GiB, 256 MiB requested) and vm1 (512 MiB)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.qmp = str(tmp / "q")
        self.sockets = {"vm0": str(tmp / "vm0.sock"), "vm1": str(tmp / "vm1.sock")}
        self.proc, self.first_line = start_serve(
            "--qmp", self.qmp,
            "--object", "memory-backend-memfd,id=mem0,size=1G",
            "--device", f"id=vm0,memdev=mem0,socket={self.sockets['vm0']},requested-size=256M",
            "--object", "memory-backend-memfd,id=mem1,size=512M",
            "--device", f"id=vm1,memdev=mem1,socket={self.sockets['vm1']},requested-size=128M")
        self.stderr = ""

    def stop(self) -> tuple[int, str]:
        rc, err = terminate(self.proc)
        self.stderr += err
        return rc, self.stderr


@contextmanager
def serving(kind: type[Served] = Served, prefix: str = "vmem-") -> Iterator[Served]:
    """A ``kind`` server in a fresh directory, which must exit 0 when the
    test is done; stopped and removed whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    server = None
    try:
        server = kind(tmp)
        yield server
        rc, err = server.stop()
        # Killed by a signal shows as a negative code: the defect itself.
        assert rc == 0, f"serve exited with {rc}:\n{err}"
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def served():
    with serving() as server:
        yield server


async def qmp(served: Served, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command on a fresh connection; its ``return``."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(served.qmp)
        buf = b""

        async def line() -> dict[str, Any]:
            nonlocal buf
            while b"\n" not in buf:
                chunk = await sock.recv(65536)
                assert chunk, "QMP closed the connection"
                buf += chunk
            text, buf = buf.split(b"\n", 1)
            return json.loads(text)

        assert "QMP" in await line()
        await sock.send(b'{"execute": "qmp_capabilities"}')
        assert (await line()) == {"return": {}}
        message = {"execute": command} if arguments is None else {"execute": command, "arguments": arguments}
        await sock.send(json.dumps(message).encode())
        while True:
            reply = await line()
            if "event" not in reply:
                break
        assert "return" in reply, reply
        return reply["return"]
    finally:
        sock.close()


async def sizes(served: Served) -> dict[str, int]:
    with trio.fail_after(TIMEOUT):
        devices = await qmp(served, "query-memory-devices")
    return {d["data"]["id"]: d["data"]["size"] for d in devices}


async def assert_alive(served: Served, within_s: float = TIMEOUT) -> None:
    """The process runs, QMP answers, and vm1 serves a new client."""
    assert served.proc.poll() is None, f"serve died with {served.proc.returncode}"
    with trio.fail_after(within_s):
        assert set(await sizes(served)) == {"vm0", "vm1"}
        async with await VfioUserClient.connect(served.sockets["vm1"]) as other:
            info = await other.device_info()
    assert info.num_regions > CONFIG_REGION
    assert served.proc.poll() is None, f"serve died with {served.proc.returncode}"


@asynccontextmanager
async def driver_on(served: Served, dev: str = "vm0", *, map_ram: bool = True,
                    **kwargs: Any) -> AsyncIterator[VirtioMemDriver]:
    """A client and driver on ``dev``, PCI set up; guest RAM DMA-mapped
    read-write when ``map_ram``; virtio not started."""
    with trio.fail_after(TIMEOUT):
        client = await VfioUserClient.connect(served.sockets[dev])
    driver = VirtioMemDriver(client, bar_addr=DEFAULT_BAR_ADDR, **kwargs)
    try:
        with trio.fail_after(TIMEOUT):
            await driver.probe_pci()
            await driver.setup_pci()
            if map_ram:
                await driver.map_ram()
        yield driver
    finally:
        driver.close()
        client.close()


async def hang_up(client: VfioUserClient) -> None:
    """Until the server has shut the connection down (POLLRDHUP), without
    reading what it sent before."""
    poller = select.poll()
    poller.register(client.fileno(), select.POLLRDHUP)
    while not any(ev & select.POLLRDHUP for _, ev in await trio.to_thread.run_sync(poller.poll, 100)):
        pass


async def status(driver: VirtioMemDriver) -> int:
    with trio.fail_after(TIMEOUT):
        return await driver.status()


# ---------------------------------------------------------------------------
# A client kills the server: DMA mappings it must not take for granted


async def test_rings_in_a_read_only_mapping_stop_the_queue_not_the_server(served: Served) -> None:
    # QEMU maps read-only guest memory (ROM) with prot READ; a guest can put
    # its used ring there.  The first used-ring write was SIGSEGV.
    async with driver_on(served, map_ram=False) as d:
        with trio.fail_after(TIMEOUT):
            await d.client.dma_map(d.ram.iova, d.ram.size, d.ram.fd, prot=DMA_READ)
            await d.start_virtio()
            d.prepare(request(PLUG, DEFAULT_BAR_ADDR, 1))
            d.publish()
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
        await assert_alive(served)
        assert (await sizes(served))["vm0"] == 0


async def test_response_buffer_in_a_read_only_mapping_changes_nothing(served: Served) -> None:
    # Rings in writable memory, the response buffer in a read-only mapping:
    # the request must not take effect (it could not be answered).
    ro = os.memfd_create("ro-guest-ram")
    os.ftruncate(ro, 64 << 10)
    ro_iova = 0x100000000
    try:
        async with driver_on(served) as d:
            with trio.fail_after(TIMEOUT):
                await d.client.dma_map(ro_iova, 64 << 10, ro, prot=DMA_READ)
                await d.start_virtio()
                req_addr = d.slot_addr(0)
                d.ram.write(req_addr, request(PLUG, DEFAULT_BAR_ADDR, 1))
                d.post(Chain([(req_addr, 24)], [(ro_iova, 10)]))
                d.publish()
                await d.kick()
            assert await status(d) & STATUS_NEEDS_RESET
            assert d.used_idx() == 0
            await assert_alive(served)
            assert (await sizes(served))["vm0"] == 0
    finally:
        os.close(ro)


async def test_rings_in_a_mapping_without_access_stop_the_queue(served: Served) -> None:
    # DMA_MAP with no access flags: the mmap is PROT_NONE; reading the rings
    # at DRIVER_OK was SIGSEGV.
    async with driver_on(served, map_ram=False) as d:
        with trio.fail_after(TIMEOUT):
            await d.client.dma_map(d.ram.iova, d.ram.size, d.ram.fd, prot=0)
            await d.start_virtio()
        assert await status(d) & STATUS_NEEDS_RESET
    await assert_alive(served)


async def test_mapping_beyond_the_end_of_its_file_is_refused(served: Served) -> None:
    # 1 MiB mapped of a 64 KiB memfd, the response buffer past the end of the
    # file: touching it was SIGBUS.
    small = os.memfd_create("small-guest-ram")
    os.ftruncate(small, 64 << 10)
    try:
        async with driver_on(served, map_ram=False) as d:
            with trio.fail_after(TIMEOUT), pytest.raises(VfioUserError):
                await d.client.dma_map(0x200000000, 1 * MiB, small)
            with trio.fail_after(TIMEOUT):
                await d.client.device_info()  # the connection carries on
    finally:
        os.close(small)
    await assert_alive(served)


async def test_guest_ram_shrunk_after_dma_map_stops_the_queue_not_the_server(served: Served) -> None:
    # The client shrinks its memfd to 0 after DMA_MAP, then kicks: every ring
    # and buffer access is beyond the end of the file (SIGBUS).
    async with driver_on(served) as d:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 1) == ACK
        before = await sizes(served)
        d.prepare(request(PLUG, DEFAULT_BAR_ADDR + BLOCK, 1))
        d.publish()
        os.ftruncate(d.ram.fd, 0)
        with trio.fail_after(TIMEOUT):
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
        await assert_alive(served)
        # The request could not be answered: it took no effect.  (Checked
        # before the client goes: a lost connection unplugs everything.)
        assert (await sizes(served))["vm0"] == before["vm0"] == BLOCK


async def test_guest_ram_shrunk_with_requests_in_the_python_path(served: Served) -> None:
    # The same, with the request for Python's path (a refusal): every access
    # Python makes is guarded too.
    async with driver_on(served) as d:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
        d.prepare(request(PLUG, DEFAULT_BAR_ADDR + 1, 1))  # unaligned: ERROR, served by Python
        d.publish()
        os.ftruncate(d.ram.fd, 0)
        with trio.fail_after(TIMEOUT):
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
    await assert_alive(served)


async def test_unaligned_file_offset_leaves_the_tail_unreachable(served: Served) -> None:
    # DMA_MAP at file offset 0x800: libvfio-user maps round_up(size) bytes
    # from round_down(offset), so the last 0x800 bytes are not mapped; a
    # response buffer there was SIGSEGV.
    async with driver_on(served, map_ram=False) as d:
        ram = d.ram
        os.ftruncate(ram.fd, ram.size + 0x2000)
        tail_iova = 0x300000000
        with trio.fail_after(TIMEOUT):
            await d.client.dma_map(ram.iova, ram.size, ram.fd)
            await d.client.dma_map(tail_iova, 0x1000, ram.fd, offset=ram.size + 0x800)
            await d.start_virtio()
            req_addr = d.slot_addr(0)
            ram.write(req_addr, request(PLUG, DEFAULT_BAR_ADDR, 1))
            d.post(Chain([(req_addr, 24)], [(tail_iova + 0x1000 - 0x10, 10)]))
            d.publish()
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
        assert d.used_idx() == 0
        await assert_alive(served)
        assert (await sizes(served))["vm0"] == 0


# ---------------------------------------------------------------------------
# A client freezes the server: I/O that never completes


async def test_half_a_message_holds_neither_qmp_nor_the_other_devices(served: Served) -> None:
    # The 16-byte header of a REGION_READ and not its body: libvfio-user
    # waited for the body in a blocking recv() on the only thread.
    with trio.fail_after(TIMEOUT):
        attacker = await VfioUserClient.connect(served.sockets["vm0"])
    try:
        await attacker.send_raw(HEADER.pack(1, VFIO_USER_REGION_READ, HEADER_SIZE + _REGION_ACCESS.size,
                                            FLAG_TYPE_COMMAND, 0))
        await assert_alive(served, within_s=WHILE_HELD_S)
        # And the attacker is dropped after the deadline.
        with trio.fail_after(DEADLINE_S + TIMEOUT):
            assert await attacker.receive_raw() == b""
    finally:
        attacker.close()
    await assert_alive(served)


async def test_a_client_that_reads_no_replies_holds_nobody(served: Served) -> None:
    # 20,000 small requests and no reply read: libvfio-user's blocking
    # sendmsg() of a reply stopped the only thread once the socket was full.
    with trio.fail_after(TIMEOUT):
        attacker = await VfioUserClient.connect(served.sockets["vm0"])
    try:
        one = HEADER.pack(2, VFIO_USER_REGION_READ, HEADER_SIZE + _REGION_ACCESS.size, FLAG_TYPE_COMMAND, 0)
        one += _REGION_ACCESS.pack(0, CONFIG_REGION, 4)
        with trio.fail_after(TIMEOUT):
            sent = await attacker.send_until_full(one, 20_000)
        # The socket took no more: the server no longer reads from it,
        # because its replies are not read.
        assert 0 < sent < 20_000
        await assert_alive(served, within_s=WHILE_HELD_S)
        # Still not reading: the server hangs up after its deadline (the
        # replies already sent stay readable, so wait for the hang-up itself).
        with trio.fail_after(DEADLINE_S + TIMEOUT):
            await hang_up(attacker)
    finally:
        attacker.close()
    await assert_alive(served)


# ---------------------------------------------------------------------------
# A client makes it do the wrong thing


@pytest.mark.parametrize("req", [request(PLUG, DEFAULT_BAR_ADDR, 1), request(UNPLUG_ALL)],
                         ids=["plug", "unplug_all"])
async def test_a_request_that_cannot_be_answered_takes_no_effect(served: Served, req: bytes) -> None:
    async with driver_on(served) as d:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            if req[0] == UNPLUG_ALL:
                assert await d.plug(DEFAULT_BAR_ADDR, 2) == ACK
        before = (await sizes(served))["vm0"]
        req_addr = d.slot_addr(1)
        d.ram.write(req_addr, req)
        # The 10-byte response at a guest address no DMA mapping covers.
        d.post(Chain([(req_addr, 24)], [(0x7000_0000_0000, 10)]))
        d.publish()
        with trio.fail_after(TIMEOUT):
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
        await assert_alive(served)
        assert (await sizes(served))["vm0"] == before


async def test_region_writes_up_to_the_advertised_size_stay_in_step(served: Served) -> None:
    async with driver_on(served) as d:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 1) == ACK
        max_bytes = d.client.server_capabilities["capabilities"]["max_data_xfer_size"]
        data = os.urandom(max_bytes)
        # Sent in pieces, as a busy client's large message arrives.
        message = region_write_message(7, BAR2, 0, data)
        with trio.fail_after(TIMEOUT):
            for start in range(0, len(message), 16384):
                await d.client.send_raw(message[start:start + 16384])
            reply = await d.client.receive_raw(HEADER_SIZE + _REGION_ACCESS.size)
            assert HEADER.unpack_from(reply)[0] == 7 and not HEADER.unpack_from(reply)[3] & 0x20
            assert await d.client.region_read(BAR2, 0, 64) == data[:64]  # in step
    await assert_alive(served)


async def test_a_region_write_beyond_the_advertised_size_drops_only_its_client(served: Served) -> None:
    async with driver_on(served) as d:
        max_bytes = d.client.server_capabilities["capabilities"]["max_data_xfer_size"]
        data = bytes(max_bytes * 2)
        message = region_write_message(7, BAR2, 0, data)
        with trio.fail_after(TIMEOUT):
            await d.client.send_raw(message[:32768])
            # The header says more than the server accepts: dropped at once
            # rather than parsing the body as headers.
            assert await d.client.receive_raw() == b""
    await assert_alive(served)


async def test_reading_unplugged_memory_allocates_nothing(served: Served) -> None:
    async with driver_on(served) as d, memory_bar_fd(d) as bar_fd:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 1) == ACK
            mapped = mmap.mmap(bar_fd, BLOCK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mapped[:8] = b"plugged!"
            mapped.close()
            allocated = allocated_bytes(bar_fd)
            for offset in range(BLOCK, 64 * MiB, 1 * MiB):  # 62 MiB of unplugged memory
                assert await d.client.region_read(BAR2, offset, 4096) == bytes(4096)
            assert await d.client.region_read(BAR2, 0, 8) == b"plugged!"
        assert allocated_bytes(bar_fd) == allocated
    await assert_alive(served)


async def test_buffers_in_unplugged_device_memory_allocate_nothing(served: Served) -> None:
    # QEMU maps the device's own BAR back without an fd, and the server
    # reaches it through its own mapping of the backend: a request buffer
    # in unplugged memory was read there, which allocates a page of the
    # backend (a read fault on a shmem hole).
    async with driver_on(served) as d, memory_bar_fd(d) as bar_fd:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 1) == ACK
            bar_size = (await d.client.region_info(BAR2)).size
            await d.client.dma_map_no_fd(DEFAULT_BAR_ADDR, bar_size, DMA_RW)
        allocated = allocated_bytes(bar_fd)
        unplugged = DEFAULT_BAR_ADDR + 32 * BLOCK
        resp_addr = d.slot_addr(0) + 32
        d.post(Chain([(unplugged, 24)], [(resp_addr, 10)]))
        d.publish()
        with trio.fail_after(TIMEOUT):
            await d.kick()
        assert await status(d) & STATUS_NEEDS_RESET
        assert allocated_bytes(bar_fd) == allocated
        await assert_alive(served)
        assert (await sizes(served))["vm0"] == BLOCK


@pytest.mark.parametrize("seed", range(4))
async def test_random_messages_kill_nothing(served: Served, seed: int) -> None:
    # Random vfio-user messages, whole and well framed or not at all, on
    # connections of their own: each connection ends (refused, or dropped),
    # the process carries on.  (A bounded sample: the fuzzers of the project
    # are the long run.)
    import random

    rng = random.Random(seed)
    for _ in range(8):
        with trio.fail_after(TIMEOUT):
            attacker = await VfioUserClient.connect(served.sockets["vm0"])
        try:
            for _ in range(rng.randrange(1, 40)):
                body = rng.randbytes(rng.choice([0, 1, 8, 16, 24, 40, 200, 4096]))
                size = HEADER_SIZE + len(body) if rng.random() < 0.8 else rng.randrange(0, 1 << 32)
                cmd = rng.randrange(0, 20)
                if cmd in (1, 2, 3, 13):  # VERSION again, DMA maps and resets: the other tests'
                    cmd = VFIO_USER_REGION_READ
                message = HEADER.pack(rng.randrange(1 << 16), cmd, size, FLAG_TYPE_COMMAND, 0) + body
                try:
                    with trio.fail_after(TIMEOUT):
                        await attacker.send_raw(message)
                except (BrokenPipeError, ConnectionResetError):
                    break  # dropped: the server found the stream out of step
        finally:
            attacker.close()
        await assert_alive(served)


def test_libvfio_user_log_lines_are_escaped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A release build of libvfio-user keeps client strings out of its log
    # (lib/tran.c: "No client-supplied strings in the log for release
    # build"), a debug build or another version may not: the binding
    # escapes every line, so that no client can forge a line (a line break)
    # or send escape sequences to whoever reads the log on a terminal.
    from vfiouser_vmem._vfu import ffi, lib

    from vfiouser_vmem.vfio_user._context import VfuContext

    with VfuContext(str(tmp_path / "s.sock")) as ctx:
        with caplog.at_level("ERROR"):
            lib.vfu_py_log(ctx._ctx, 3, ffi.new("char[]", b'failed to parse client JSON "\x1b[31m\nFORGED"'))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ['libvfio-user: failed to parse client JSON "\\x1b[31m\\nFORGED"']


# -- a connection that ends while its client still maps the device ----------------------


async def _quarantine_pid(served: Served) -> int:
    with trio.fail_after(TIMEOUT):
        return await qmp(served, "qom-get", {"path": "vm0", "property": "unplugged-quarantine"})


async def _wait_reset(served: Served, bar_fd: int) -> None:
    # The held reset runs within the server's recheck (1 s): a liveness bound.
    with trio.fail_after(TIMEOUT):
        while (await sizes(served))["vm0"] or allocated_bytes(bar_fd):
            await trio.sleep(0.05)


@pytest.mark.parametrize("release", ["unmap", "lift"])
async def test_a_lost_connection_whose_client_still_maps_the_memory_keeps_it(served: Served, release: str) -> None:
    # QEMU gives a reply up after x-msg-timeout and drops the stream when the
    # late reply comes, running on with the BAR mapped; the reset of a lost
    # connection would then punch holes under its running guest.  Here the
    # client is this process: it maps the BAR, writes into plugged memory,
    # and closes its connection with the mapping kept.
    async with driver_on(served) as d, memory_bar_fd(d) as bar_fd:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 2) == ACK
        mapped = mmap.mmap(bar_fd, 2 * BLOCK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mapped[:8] = b"plugged!"
            mapped[BLOCK:BLOCK + 8] = b"second!!"
            d.client.close()
            with trio.fail_after(TIMEOUT):
                while await _quarantine_pid(served) != os.getpid():
                    await trio.sleep(0.05)
            # Kept: the size, the memory, what was written.
            assert (await sizes(served))["vm0"] == 2 * BLOCK
            assert allocated_bytes(bar_fd) >= 2 * 4096
            assert mapped[:8] == b"plugged!" and mapped[BLOCK:BLOCK + 8] == b"second!!"
            # No new client while the old one holds the memory: it would get
            # a device that still has the old guest's blocks.
            with trio.fail_after(TIMEOUT):
                async with await VfioUserClient.connect(served.sockets["vm0"]) as refused:
                    with pytest.raises((ProtocolError, OSError, VfioUserError)):
                        await refused.device_info()
            if release == "lift":
                # The operator's override: reset now, mapping or not.
                with trio.fail_after(TIMEOUT):
                    await qmp(served, "qom-set", {"path": "vm0", "property": "unplugged-quarantine", "value": 0})
                await _wait_reset(served, bar_fd)
        finally:
            mapped.close()
        # Unmapped (or lifted): the reset runs, everything goes back.
        await _wait_reset(served, bar_fd)
        assert await _quarantine_pid(served) == 0
    with trio.fail_after(TIMEOUT):
        async with await VfioUserClient.connect(served.sockets["vm0"]) as client:
            assert (await client.device_info()).num_regions > CONFIG_REGION
    await assert_alive(served)
    _, err = served.stop()
    assert "is gone but its process still runs and maps this device's memory: its 4M plugged are kept" in err
    assert "refusing a vfio-user client: the previous client (pid" in err
    assert "LOST_CONN reset: unplugged and discarded 4M" in err


async def test_a_lost_connection_whose_client_unmapped_is_reset_at_once(served: Served) -> None:
    # The usual case (a QEMU killed: the kernel releases its memory before
    # its sockets close): nothing is held.
    async with driver_on(served) as d, memory_bar_fd(d) as bar_fd:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 2) == ACK
        d.client.close()
        await _wait_reset(served, bar_fd)
        assert await _quarantine_pid(served) == 0
    await assert_alive(served)
