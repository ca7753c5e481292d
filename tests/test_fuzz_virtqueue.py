"""Virtqueue requests against an independent reference model (tests/vmem_reference.py).

A real ``vfiouser-vmem serve`` process, the tests' vfio-user client and
virtio driver: batches of random requests (valid and invalid types,
addresses aligned or not, inside and outside the usable region, near 2^64;
nb_blocks 0, 1, large, overflowing), some in chains split over several
descriptors, with zero-length and huge descriptors, some with their buffers
in plugged device memory (the BAR DMA-mapped back without an fd, as QEMU
does), some published over several kicks; malformed chains (too short, wrong
direction, unreachable buffers, buffers in unplugged device memory, loops,
indirect descriptors, indices beyond the queue, avail index jumps, unknown
types); between batches requested-size changes over QMP, virtio resets,
vfio-user DEVICE_RESETs, reconnects, and writes into plugged memory through
the BAR's mmap.

Every answer is compared with the model's.  After every batch: the process
runs, QMP's plugged size and the config space equal the model's, the
config interrupts are those of the config changes, a malformed chain left
DEVICE_NEEDS_RESET and nothing else, and, once the deferred discards are
done (QOM ``discard-pending`` 0, docs/discard.md), the backend holds memory
only inside plugged blocks and what was written into a block that is still
plugged is still there.

Each batch and event is recorded; ``replay(inputs)`` runs a recorded
sequence against a fresh server (tests/fuzzing.py writes it on a failure,
tests/fuzz_regressions/virtqueue-*.json are replayed by the regression test).
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fuzzing import FuzzRun, budget, regressions
from proc_util import fd_count, start_serve, terminate
from test_robustness import qmp
from vfio_user_client import BAR2, DMA_RW, VfioUserClient
from virtio_driver import (
    DEFAULT_BAR_ADDR,
    STATUS_NEEDS_RESET,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VirtioMemDriver,
)
from vmem_reference import (
    REQ_PLUG,
    REQ_STATE,
    REQ_UNPLUG,
    REQ_UNPLUG_ALL,
    RESPONSE_BYTES,
    Desc,
    ProtocolViolation,
    ReferenceVmem,
    walk_chain,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procinfo import proc_rss  # noqa: E402

MiB = 1 << 20
BLOCK_BYTES = 2 * MiB
DEVICE_BYTES = 512 * MiB
INITIAL_REQUESTED_BYTES = 128 * MiB
QUEUE_SIZE = 128  # the device's maximum (vfiouser_vmem/virtio/_pci.py QUEUE_MAX_SIZE)
RAM_BYTES = 1 * MiB  # the driver's guest RAM, DMA-mapped at iova 0
TIMEOUT_S = 30  # liveness bound for what takes milliseconds
STDERR_TAIL_CHARS = 4000  # of the server's log, printed on a failure
U64 = 1 << 64
_DESC = struct.Struct("<QIHH")
_ANSWER_NAMES = ["ACK", "NACK", "BUSY", "ERROR"]
_UNREACHABLE = [0x7000_0000_0000, RAM_BYTES, RAM_BYTES - 8, U64 - 16, DEFAULT_BAR_ADDR, 0x1_0000_0000]


# ---------------------------------------------------------------------------
# the rig: a server process, one client, the model, the checks


def _server_figures(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS bytes) of the server process."""
    return fd_count(pid), proc_rss(pid)["VmRSS"]


class Rig:
    """``serve`` with one device (vm0) and what the fuzzer needs of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.qmp = str(tmp / "q")  # the attribute test_robustness.qmp() reads
        self.socket = str(tmp / "vm0.sock")
        # scrub-interval=0: no periodic scrub pass, which would give back
        # memory a bug put into unplugged blocks before the check sees it.
        self.proc, _ = start_serve(
            "--qmp", self.qmp,
            "--object", f"memory-backend-memfd,id=mem0,size={DEVICE_BYTES}",
            "--device", f"id=vm0,memdev=mem0,socket={self.socket},"
                        f"requested-size={INITIAL_REQUESTED_BYTES},scrub-interval=0")
        self.model = ReferenceVmem(BLOCK_BYTES, DEVICE_BYTES, DEFAULT_BAR_ADDR, INITIAL_REQUESTED_BYTES)
        self.client: VfioUserClient | None = None
        self.driver: VirtioMemDriver | None = None
        self.bar_fd = -1
        self.bar_map: mmap.mmap | None = None
        #: block -> marker written into it through the BAR while plugged.
        self.markers: dict[int, tuple[int, bytes]] = {}
        #: The last of the server's log, read as it comes: a pipe nobody
        #: reads stops the server in write(2) once 64 KiB of log are in it.
        self.log_tail = bytearray()
        self.log_limit_chars = STDERR_TAIL_CHARS
        #: What the inputs came to (booked into the run's summary line).
        self.outcomes: Counter[str] = Counter()
        self.returncode: int | None = None
        self.stderr = ""

    async def drain_log(self) -> None:
        """Read the server's stderr until cancelled or end of file."""
        stream = trio.lowlevel.FdStream(os.dup(self.proc.stderr.fileno()))
        async with stream:
            while chunk := await stream.receive_some(65536):
                self.log_tail += chunk
                del self.log_tail[:-self.log_limit_chars]

    # -- connection ---------------------------------------------------------------------
    async def connect(self) -> None:
        with trio.fail_after(TIMEOUT_S):
            self.client = await VfioUserClient.connect(self.socket)
            self.driver = VirtioMemDriver(self.client, bar_addr=DEFAULT_BAR_ADDR, ram_size=RAM_BYTES,
                                          queue_size=QUEUE_SIZE)
            await self.driver.probe_pci()
            await self.driver.setup_pci()
            await self.driver.map_ram()
            # The device's own BAR, DMA-mapped back without an fd as QEMU does
            # (docs/robustness.md, "Device memory only where plugged"): buffers
            # there are reachable only inside plugged blocks.
            self.bar_bytes = (await self.client.region_info(BAR2)).size
            await self.client.dma_map_no_fd(DEFAULT_BAR_ADDR, self.bar_bytes, DMA_RW)
            await self.driver.start_virtio()
            if self.bar_fd < 0:
                # The backend memfd, the same for every client of the device.
                info = await self.client.region_info(BAR2)
                self.bar_fd = os.dup(info.fd)
            if self.bar_map is None:
                self.bar_map = mmap.mmap(self.bar_fd, DEVICE_BYTES, mmap.MAP_SHARED,
                                         mmap.PROT_READ | mmap.PROT_WRITE)

    def disconnect(self) -> None:
        # As a QEMU that goes away: its mapping of the BAR first.  A client
        # that still maps the device's memory when its connection ends has
        # its reset held until it unmaps (DeviceServer._hold_lost_connection).
        if self.bar_map is not None:
            self.bar_map.close()
            self.bar_map = None
        if self.driver is not None:
            self.driver.close()
            self.driver = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        """Stop the server (once) and let go of everything."""
        self.disconnect()
        if self.bar_map is not None:
            self.bar_map.close()
            self.bar_map = None
        if self.bar_fd >= 0:
            os.close(self.bar_fd)
            self.bar_fd = -1
        if self.returncode is None:
            self.returncode, err = terminate(self.proc)
            self.stderr = self.log_tail.decode(errors="replace") + err

    # -- checks --------------------------------------------------------------------------
    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"serve died with {self.proc.returncode}"

    async def qom_get(self, prop: str) -> Any:
        with trio.fail_after(TIMEOUT_S):
            return await qmp(self, "qom-get", {"path": "vm0", "property": prop})

    async def check(self, *, needs_reset: bool = False) -> None:
        """What must hold after every batch."""
        d, m = self.driver, self.model
        self.assert_running()
        assert await self.qom_get("size") == m.plugged_size, "QMP plugged size"
        with trio.fail_after(TIMEOUT_S):
            config = await d.read_config()
            status = await d.status()
        seen = {k: getattr(config, k) for k in m.config()}
        assert seen == m.config(), f"config space {seen} != model {m.config()}"
        assert bool(status & STATUS_NEEDS_RESET) == needs_reset, f"status {status:#x}"
        await self.check_backend()

    async def check_backend(self) -> None:
        """Once the deferred discards are done: host memory only inside
        plugged blocks, and what was written into plugged blocks is kept."""
        with trio.fail_after(TIMEOUT_S):
            # Discards run after the answer (docs/discard.md); the queue is
            # idle when discard-pending is 0.  Each round is a QMP round trip.
            while await self.qom_get("discard-pending"):
                await trio.lowlevel.checkpoint()
        plugged = self.model.plugged_blocks()
        offset = 0
        while offset < DEVICE_BYTES:
            try:
                start = os.lseek(self.bar_fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(self.bar_fd, start, os.SEEK_HOLE)
            outside = sorted({b for b in range(start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES + 1)} - plugged)
            assert not outside, (f"backend holds memory at {start:#x}-{end:#x}, in unplugged block(s) "
                                 f"{outside[:8]}")
            offset = end
        for block, (off, marker) in self.markers.items():
            got = os.pread(self.bar_fd, len(marker), block * BLOCK_BYTES + off)
            assert got == marker, f"what was written into plugged block {block} is gone"

    def forget_markers(self) -> None:
        plugged = self.model.plugged_blocks()
        for block in [b for b in self.markers if b not in plugged]:
            del self.markers[block]

    # -- inputs --------------------------------------------------------------------------
    async def execute(self, item: dict[str, Any]) -> int:
        """Apply one recorded input and check its outcome; returns the
        number of requests it held."""
        op = item["op"]
        if op == "batch":
            return await self.batch(item)
        self.outcomes[op] += 1
        m, d = self.model, self.driver
        if op == "resize":
            m.set_requested_size(item["value"])
            d.config_irq.fire_count()
            with trio.fail_after(TIMEOUT_S):
                await qmp(self, "qom-set", {"path": "vm0", "property": "requested-size", "value": item["value"]})
                # Every requested-size set is a config change for the driver
                # (virtio spec 5.15.4; QEMU notifies even for the same value).
                await d.config_irq.wait(TIMEOUT_S)
        elif op == "virtio_reset":
            m.virtio_reset()
            with trio.fail_after(TIMEOUT_S):
                await d.start_virtio()
        elif op == "device_reset":
            m.system_reset()
            with trio.fail_after(TIMEOUT_S):
                await self.client.reset()
                await d.probe_pci()
                await d.setup_pci()
                await d.start_virtio()
        elif op == "reconnect":
            m.system_reset()
            self.disconnect()
            await self.connect()
        elif op == "touch":
            plugged = m.plugged_blocks()
            for block, off, marker_hex in item["writes"]:
                # Only plugged blocks: memory outside them would be the guest
                # breaking the rules (docs/scrub.md), not the device.
                assert block in plugged, f"touch of unplugged block {block} in the inputs"
                marker = bytes.fromhex(marker_hex)
                at = block * BLOCK_BYTES + off
                self.bar_map[at:at + len(marker)] = marker
                self.markers[block] = (off, marker)
        else:
            raise AssertionError(f"unknown input {op!r}")
        self.forget_markers()
        await self.check()
        return 0

    # -- guest memory: the driver's RAM at iova 0, the device's BAR at its address
    def reachable(self, addr: int, length: int) -> bool:
        """Whether the device may touch [addr, addr + length) now."""
        if 0 <= addr and addr + length <= RAM_BYTES:
            return True
        offset = addr - DEFAULT_BAR_ADDR
        if offset < 0 or offset + length > DEVICE_BYTES:
            return False  # no mapping, or the BAR beyond the device's memory
        plugged = self.model.plugged
        return all(plugged[b] for b in range(offset // BLOCK_BYTES, (offset + length - 1) // BLOCK_BYTES + 1))

    def guest_read(self, addr: int, length: int) -> bytes:
        if addr + length <= RAM_BYTES:
            return self.driver.ram.read(addr, length)
        # pread(2): reading a hole this way allocates nothing (a read fault
        # through the mmap would, on shmem).
        return os.pread(self.bar_fd, length, addr - DEFAULT_BAR_ADDR)

    def guest_write(self, addr: int, data: bytes) -> None:
        if addr + len(data) <= RAM_BYTES:
            self.driver.ram.write(addr, data)
            return
        offset = addr - DEFAULT_BAR_ADDR
        # Through the BAR's mmap, as the guest writes device memory: only into
        # plugged blocks, or the test itself would put memory where the guest
        # has none.
        assert self.reachable(addr, len(data)), f"the inputs write to unplugged device memory at {addr:#x}"
        self.bar_map[offset:offset + len(data)] = data

    def gather(self, buffers: list[tuple[int, int]], count: int) -> bytes:
        """The first ``count`` bytes of the buffers, in order."""
        out = b""
        for addr, length in buffers:
            n = min(length, count - len(out))
            if n:
                out += self.guest_read(addr, n)
        return out

    async def batch(self, item: dict[str, Any]) -> int:
        d, m = self.driver, self.model
        ram = d.ram
        # A clean descriptor table: a chain that wanders off its own
        # descriptors reads zeros (a terminal zero-length descriptor), the
        # same for the model and the device.
        ram.write(d.desc_addr, bytes(16 * QUEUE_SIZE))
        table = {i: Desc(0, 0, 0, 0) for i in range(QUEUE_SIZE)}
        heads = []
        base = 0
        for chain in item["chains"]:
            for addr, data_hex in chain["writes"]:
                self.guest_write(addr, bytes.fromhex(data_hex))
            for i, (addr, length, flags, nxt, absolute) in enumerate(chain["descs"]):
                nxt_index = nxt if absolute else (base + nxt) % QUEUE_SIZE
                index = (base + i) % QUEUE_SIZE
                table[index] = Desc(addr, length, flags, nxt_index)
                ram.write(d.desc_addr + 16 * index, _DESC.pack(addr, length, flags, nxt_index & 0xFFFF))
            heads.append(chain.get("head", base))
            base += len(chain["descs"])
        assert base <= QUEUE_SIZE, "a batch of more descriptors than the queue holds"
        first_avail = d.avail_idx
        for i, head in enumerate(heads):
            ram.write_u16(d.avail_addr + 4 + 2 * ((first_avail + i) % QUEUE_SIZE), head & 0xFFFF)

        # What the device must do, from the model, before it runs.  The
        # requests are read as the device reads them: in order, each after
        # the ones before it took effect (a buffer in device memory is
        # reachable while its blocks are plugged).
        expected: list[tuple[int, list[tuple[int, int]], bytes]] = []  # head, writable, response
        avail_extra = item.get("avail_extra", 0)
        violation = len(heads) + avail_extra > QUEUE_SIZE
        usable_changed = False
        if not violation:
            for head in heads:
                try:
                    readable, writable = walk_chain(table, head, QUEUE_SIZE, self.reachable)
                    usable_before = m.usable_region_size
                    expected.append((head, writable, m.answer(self.gather(readable, 24))))
                    usable_changed |= m.usable_region_size != usable_before
                    # A block unplugged on the way may lose what was written
                    # there, even if a later chain plugs it again.
                    self.forget_markers()
                except ProtocolViolation:
                    violation = True
                    break
        for _, _, want in expected:
            self.outcomes[_ANSWER_NAMES[want[0]]] += 1
        self.outcomes["stopped queue"] += violation
        self.outcomes["usable region shrunk"] += usable_changed

        d.config_irq.fire_count()  # earlier config interrupts (resizes) are not this batch's
        # Publish and kick in steps (a driver adds chains while the device
        # serves the ones before): the device serves them in order all the same.
        steps = [k for k in item.get("kicks", []) if 0 < k < len(heads)] + [len(heads)]
        with trio.fail_after(TIMEOUT_S):
            for k in steps:
                d.avail_idx = (first_avail + k + (avail_extra if k == len(heads) else 0)) & 0xFFFF
                d.publish()
                await d.kick()
            if violation:
                # The device stops the queue and tells the driver (a config
                # interrupt, DEVICE_NEEDS_RESET: docs/conformance.md).
                while not await d.status() & STATUS_NEEDS_RESET:
                    await d.config_irq.wait(TIMEOUT_S)
                used = d.take_used()
            else:
                used = await d.wait_used(len(expected), timeout=TIMEOUT_S) if expected else []
        assert [h for h, _ in used] == [h for h, _, _ in expected], \
            f"used heads {[h for h, _ in used]}, model says {[h for h, _, _ in expected]}"
        for (head, length), (_, writable, want) in zip(used, expected):
            got = self.gather(writable, RESPONSE_BYTES)
            assert (length, got) == (RESPONSE_BYTES, want), \
                f"chain at head {head}: the device answered {got.hex()} ({length} bytes), the model {want.hex()}"
        self.forget_markers()
        await self.check(needs_reset=violation)
        if not violation:
            # A config interrupt only when the configuration changed: when
            # UNPLUG_ALL shrank the usable region; plugged_size alone is the
            # driver's own doing (docs/conformance.md).  The round trips of
            # check() came after everything the batch made the device send.
            assert d.config_irq.pending() == usable_changed, \
                f"config interrupt {'missing' if usable_changed else 'without a config change'}"
        if violation:
            # Recovery, as a driver does it: a virtio reset (block state kept).
            m.virtio_reset()
            with trio.fail_after(TIMEOUT_S):
                await d.start_virtio()
        return len(heads)


# ---------------------------------------------------------------------------
# generation


def _request(rng: Any, type_: int, addr: int, nb_blocks: int) -> bytes:
    # The padding is the driver's to leave as it likes (QEMU reads only
    # type, addr and nb_blocks): random now and then.
    pad = rng.randbytes(6) if rng.random() < 0.2 else bytes(6)
    tail = rng.randbytes(6) if rng.random() < 0.2 else bytes(6)
    return struct.pack("<H", type_) + pad + struct.pack("<QH", addr % U64, nb_blocks) + tail


def _address(rng: Any, m: ReferenceVmem) -> int:
    usable_blocks = m.usable_region_size // BLOCK_BYTES
    region_blocks = m.region_size // BLOCK_BYTES
    r = rng.random()
    if r < 0.70 and usable_blocks:
        # Mostly where the plugged blocks are, so that UNPLUG and STATE meet them.
        plugged = sorted(m.plugged_blocks())
        if plugged and rng.random() < 0.4:
            return m.addr + BLOCK_BYTES * rng.choice(plugged)
        return m.addr + BLOCK_BYTES * rng.randrange(usable_blocks)
    if r < 0.78:
        return m.addr + BLOCK_BYTES * rng.randrange(region_blocks + 2)  # also beyond the usable region
    if r < 0.84:
        return m.addr + BLOCK_BYTES * rng.randrange(region_blocks) + rng.randrange(1, BLOCK_BYTES)
    if r < 0.88:
        return m.addr - BLOCK_BYTES * rng.randrange(1, 4)
    if r < 0.94:
        return U64 - BLOCK_BYTES * rng.randrange(1, 4) - (rng.randrange(BLOCK_BYTES) if rng.random() < 0.3 else 0)
    if r < 0.97:
        return rng.randrange(U64)
    return m.addr + m.region_size


def _nb_blocks(rng: Any, m: ReferenceVmem, addr: int) -> int:
    r = rng.random()
    if r < 0.55:
        return rng.randrange(1, 9)
    if r < 0.70:
        return rng.randrange(1, 65)
    if r < 0.75:
        return 0
    if r < 0.80:
        return 0xFFFF
    if r < 0.85:
        return rng.randrange(1 << 16)
    # Up to the end of the usable region, or one block beyond it.
    end = m.addr + m.usable_region_size
    blocks = max(0, (end - addr) // BLOCK_BYTES) if addr < end else 1
    return min(0xFFFF, blocks + rng.choice([0, 0, 1]))


def _valid_request(rng: Any, m: ReferenceVmem) -> bytes:
    r = rng.random()
    type_ = REQ_PLUG if r < 0.38 else REQ_UNPLUG if r < 0.72 else REQ_STATE if r < 0.97 else REQ_UNPLUG_ALL
    if type_ == REQ_UNPLUG_ALL:
        return _request(rng, type_, rng.randrange(U64) if rng.random() < 0.5 else 0, rng.randrange(1 << 16))
    addr = _address(rng, m)
    return _request(rng, type_, addr, _nb_blocks(rng, m, addr))


def _slot(index: int) -> tuple[int, int]:
    """(request address, response address) of buffer slot ``index``."""
    req_addr = VirtioMemDriver.BUFFERS_OFFSET + 64 * index
    return req_addr, req_addr + 32


def _desc(addr: int, length: int, writable: bool, last: bool, nxt: int) -> list[int]:
    flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
    return [addr % U64, length & 0xFFFFFFFF, flags, 0 if last else nxt, 0]


def _device_memory_slot(block: int, index: int) -> tuple[int, int]:
    """(request address, response address) of buffer slot ``index`` in
    device memory: the last 4 KiB of ``block`` (markers stay below it)."""
    req_addr = DEFAULT_BAR_ADDR + (block + 1) * BLOCK_BYTES - 4096 + 64 * index
    return req_addr, req_addr + 32


def _chain(rng: Any, buffers: tuple[int, int], req: bytes, *, split: bool, huge: bool = True) -> dict[str, Any]:
    """A well-formed chain: the request in device-readable buffers, then a
    device-writable response buffer; ``split`` spreads both over several
    descriptors, with zero-length and (``huge``) huge ones among them."""
    req_addr, resp_addr = buffers
    writes = [[req_addr, req.hex()], [resp_addr, ("ee" * 16)]]
    parts: list[tuple[int, int, bool]] = []  # (address, length, writable)
    if not split:
        parts = [(req_addr, 24, False), (resp_addr, RESPONSE_BYTES + rng.choice([0, 0, 0, 6]), True)]
    else:
        cuts = sorted(rng.sample(range(1, 24), rng.randrange(0, 3)))
        bounds = [0, *cuts, 24]
        parts += [(req_addr + a, b - a, False) for a, b in zip(bounds, bounds[1:])]
        # Up to 5 writable pieces: more than the C path takes
        # (csrc/vmem_queue.c MAX_WRITABLE), so that Python's path serves those.
        wcuts = sorted(rng.sample(range(1, RESPONSE_BYTES), rng.randrange(1, 5)))
        wbounds = [0, *wcuts, RESPONSE_BYTES]
        parts += [(resp_addr + a, b - a, True) for a, b in zip(wbounds, wbounds[1:])]
        r = rng.random()
        if r < 0.3:
            # A zero-length descriptor anywhere, even at an address no mapping
            # covers: nothing to read or write there.
            at = rng.randrange(len(parts) + 1)
            writable = at > 0 and parts[at - 1][2] if at == len(parts) else parts[at][2]
            parts.insert(at, (rng.choice([*_UNREACHABLE, req_addr]), 0, writable))
        elif r < 0.5 and huge:
            # A huge length on the last readable or writable descriptor: only
            # the part the device uses must be reachable (vmem_reference.walk_chain).
            want_writable = rng.random() < 0.5
            i = max(i for i, p in enumerate(parts) if p[2] == want_writable)
            parts[i] = (parts[i][0], rng.choice([0xFFFFFFFF, 1 << 20, 4096]), parts[i][2])
    descs = [_desc(a, n, w, i == len(parts) - 1, i + 1) for i, (a, n, w) in enumerate(parts)]
    return {"descs": descs, "writes": writes}


def _moved(chain: dict[str, Any], old_addr: int, new_addr: int) -> dict[str, Any]:
    """``chain`` with its buffers in the 64-byte slot at ``old_addr`` moved
    to ``new_addr``."""
    def move(addr: int) -> int:
        return addr - old_addr + new_addr if old_addr <= addr < old_addr + 64 else addr
    return {**chain, "writes": [[move(a), data] for a, data in chain["writes"]],
            "descs": [[move(a), *rest] for a, *rest in chain["descs"]]}


MALFORMED = ["short_request", "short_response", "no_response", "response_readable", "request_writable",
             "readable_after_writable", "unreachable_request", "unreachable_response", "huge_unreachable",
             "loop", "indirect", "head_beyond", "next_beyond", "avail_jump", "unknown_type",
             "request_in_unplugged_memory", "response_in_unplugged_memory"]


def _malformed(rng: Any, kind: str, slot: int, req: bytes, unplugged_block: int | None) -> dict[str, Any]:
    req_addr, resp_addr = _slot(slot)
    writes = [[req_addr, req.hex()], [resp_addr, "ee" * 16]]
    r = lambda a, n: (a, n, False)  # noqa: E731
    w = lambda a, n: (a, n, True)  # noqa: E731
    parts = [r(req_addr, 24), w(resp_addr, RESPONSE_BYTES)]
    chain: dict[str, Any] = {}
    loop_to = None
    if kind == "short_request":
        n = rng.randrange(0, 24)
        parts = [r(req_addr, n), w(resp_addr, RESPONSE_BYTES)] if rng.random() < 0.5 else \
            [r(req_addr, n // 2), r(req_addr + n // 2, n - n // 2), w(resp_addr, RESPONSE_BYTES)]
    elif kind == "short_response":
        parts = [r(req_addr, 24), w(resp_addr, rng.randrange(0, RESPONSE_BYTES))]
    elif kind == "no_response":
        parts = [r(req_addr, 24)]
    elif kind == "response_readable":
        parts = [r(req_addr, 24), r(resp_addr, RESPONSE_BYTES)]
    elif kind == "request_writable":
        parts = [w(req_addr, 24), w(resp_addr, RESPONSE_BYTES)]
    elif kind == "readable_after_writable":
        parts = [r(req_addr, 12), w(resp_addr, RESPONSE_BYTES), r(req_addr + 12, 12)]
    elif kind == "unreachable_request":
        parts = [r(rng.choice(_UNREACHABLE), 24), w(resp_addr, RESPONSE_BYTES)]
    elif kind == "unreachable_response":
        parts = [r(req_addr, 24), w(rng.choice(_UNREACHABLE), RESPONSE_BYTES)]
    elif kind == "huge_unreachable":
        # The request itself lies in guest RAM, the device reads up to 4 KiB
        # of a readable buffer (vmem_reference.MAX_READABLE_BYTES): that runs
        # beyond the mapping.
        tail = RAM_BYTES - 24
        writes = [[tail, req.hex()], [resp_addr, "ee" * 16]]
        parts = [r(tail, 0xFFFFFFFF), w(resp_addr, RESPONSE_BYTES)]
    elif kind in ("request_in_unplugged_memory", "response_in_unplugged_memory") and unplugged_block is not None:
        # Device memory the guest has not plugged: the device must not touch
        # it (docs/robustness.md), and nothing is written there beforehand.
        where = DEFAULT_BAR_ADDR + unplugged_block * BLOCK_BYTES + rng.randrange(0, BLOCK_BYTES - 64, 8)
        if kind == "request_in_unplugged_memory":
            writes = [[resp_addr, "ee" * 16]]
            parts = [r(where, 24), w(resp_addr, RESPONSE_BYTES)]
        else:
            writes = [[req_addr, req.hex()]]
            parts = [r(req_addr, 24), w(where, RESPONSE_BYTES)]
    elif kind == "loop":
        loop_to = rng.randrange(0, 2)  # back to itself or to the chain's first descriptor
    elif kind == "indirect":
        pass
    descs = [_desc(a, n, wr, i == len(parts) - 1, i + 1) for i, (a, n, wr) in enumerate(parts)]
    if kind == "loop":
        last = len(descs) - 1
        descs[last][2] |= VRING_DESC_F_NEXT
        descs[last][3] = last if loop_to else 0
    elif kind == "indirect":
        descs[0][2] |= VRING_DESC_F_INDIRECT
    elif kind == "next_beyond":
        descs[0][3] = QUEUE_SIZE + rng.randrange(0, 0xFFFF - QUEUE_SIZE)
        descs[0][4] = 1
    elif kind == "head_beyond":
        chain["head"] = QUEUE_SIZE + rng.randrange(0, 0xFFFF - QUEUE_SIZE)
    chain.update({"descs": descs, "writes": writes})
    return chain


def generate(rng: Any, m: ReferenceVmem, max_requests: int) -> dict[str, Any]:
    """The next input, for the model's state now."""
    r = rng.random()
    if r < 0.06:
        # Any aligned size up to the region, often small enough for NACKs.
        return {"op": "resize", "value": BLOCK_BYTES * rng.randrange(m.region_size // BLOCK_BYTES + 1)}
    if r < 0.08:
        return {"op": "virtio_reset"}
    if r < 0.095:
        return {"op": "device_reset", "requested_size": m.requested_size}
    if r < 0.105:
        return {"op": "reconnect", "requested_size": m.requested_size}
    if r < 0.14 and m.plugged_blocks():
        plugged = sorted(m.plugged_blocks())
        return {"op": "touch", "writes": [[b, rng.randrange(0, BLOCK_BYTES - 8192, 8), rng.randbytes(8).hex()]
                                          for b in rng.sample(plugged, min(len(plugged), rng.randrange(1, 4)))]}
    chains: list[dict[str, Any]] = []
    count = min(max_requests, rng.randrange(8, 49))
    descs = 0
    # A shadow of the model, so that later requests of the batch are drawn
    # for the state the earlier ones leave.
    shadow = ReferenceVmem(m.block_size, m.region_size, m.addr, m.requested_size)
    shadow.usable_region_size, shadow.plugged = m.usable_region_size, bytearray(m.plugged)
    malformed_at = rng.randrange(count) if rng.random() < 0.12 else None
    avail_extra = 0
    # Blocks plugged since the batch began: buffers in device memory go only
    # there (written before the kick, read by the device after the chains
    # before them; a block unplugged on the way may have lost them).
    steady = set(m.plugged_blocks())
    in_blocks: list[tuple[int, int]] = []  # (chain, block) of buffers in device memory
    for i in range(count):
        if i == malformed_at:
            kind = rng.choice(MALFORMED)
            if kind == "avail_jump":
                avail_extra = QUEUE_SIZE + rng.randrange(1, 4000)
                continue
            type_ = rng.randrange(4, 1 << 16) if kind == "unknown_type" else REQ_PLUG
            usable_blocks = max(1, m.usable_region_size // BLOCK_BYTES)
            req = _request(rng, type_, m.addr + BLOCK_BYTES * rng.randrange(usable_blocks), 1)
            unplugged = sorted(set(range(m.region_size // BLOCK_BYTES)) - shadow.plugged_blocks())
            chain = _malformed(rng, kind, i, req, rng.choice(unplugged) if unplugged else None)
        else:
            req = _valid_request(rng, shadow)
            shadow.answer(req)
            in_device_memory = steady and rng.random() < 0.15
            block = rng.choice(sorted(steady)) if in_device_memory else None
            buffers = _slot(i) if block is None else _device_memory_slot(block, i)
            chain = _chain(rng, buffers, req, split=rng.random() < 0.2, huge=block is None)
            if block is not None:
                in_blocks.append((len(chains), block))
            steady &= shadow.plugged_blocks()
        if descs + len(chain["descs"]) > QUEUE_SIZE:
            break
        descs += len(chain["descs"])
        chains.append(chain)
    for n, block in in_blocks:
        if block not in steady:
            # A later chain unplugs the block: the answer there could be
            # discarded before the driver reads it.  Back into guest RAM.
            chains[n] = _moved(chains[n], _device_memory_slot(block, n)[0], _slot(n)[0])
    item: dict[str, Any] = {"op": "batch", "chains": chains}
    if avail_extra:
        item["avail_extra"] = avail_extra
    elif len(chains) > 1 and rng.random() < 0.2:
        # Not with an avail index jump: whether the device had served the
        # chains of an earlier kick when it sees the jump would be timing.
        item["kicks"] = sorted(rng.sample(range(1, len(chains)), min(len(chains) - 1, rng.randrange(1, 4))))
    return item


# ---------------------------------------------------------------------------
# runs


@asynccontextmanager
async def serving(log_limit_chars: int = STDERR_TAIL_CHARS) -> AsyncIterator[Rig]:
    """A fresh server and its rig, the server's log read as it comes; after
    the block, the server is stopped and ``rig.returncode``/``rig.stderr``
    are set (the tail of the log printed when the block raised)."""
    tmp = Path(tempfile.mkdtemp(prefix="vmem-fuzz-", dir="/tmp"))
    rig: Rig | None = None
    try:
        rig = Rig(tmp)
        rig.log_limit_chars = log_limit_chars
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.drain_log)
            yield rig
            nursery.cancel_scope.cancel()
    except BaseException:
        if rig is not None:
            rig.close()
            print("serve's stderr (tail):\n" + rig.stderr[-STDERR_TAIL_CHARS:])
        raise
    finally:
        if rig is not None:
            rig.close()
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


async def _run(inputs_or_run: list[dict[str, Any]] | FuzzRun, count: int = 0) -> dict[str, Any]:
    """Against a fresh server: the given inputs (replay), or ``count``
    generated requests (recorded in the run).  Returns the server's figures."""
    figures: dict[str, Any] = {}
    async with serving() as rig:
        await _drive(rig, inputs_or_run, count, figures)
    # Killed by a signal shows as a negative code.
    assert rig.returncode == 0, f"serve exited with {rig.returncode}:\n{rig.stderr[-STDERR_TAIL_CHARS:]}"
    return figures


async def _drive(rig: Rig, inputs_or_run: list[dict[str, Any]] | FuzzRun, count: int,
                 figures: dict[str, Any]) -> None:
    await rig.connect()
    await rig.check()
    figures["fds_start"], figures["rss_start_bytes"] = _server_figures(rig.proc.pid)
    if isinstance(inputs_or_run, FuzzRun):
        run = inputs_or_run
        requests = 0
        while requests < count:
            item = generate(run.rng, rig.model, count - requests)
            run.record(item)
            n = await rig.execute(item)
            requests += n
            run.done(n)
    else:
        for item in inputs_or_run:
            await rig.execute(item)
    figures["fds_end"], figures["rss_end_bytes"] = _server_figures(rig.proc.pid)
    # The scrubber's passes after resizes and resets found nothing either:
    # no memory ever was where the model says no block is plugged.
    assert await rig.qom_get("unplugged-found") == 0
    figures["outcomes"] = dict(sorted(rig.outcomes.items()))


async def replay(inputs: list[dict[str, Any]], dropped_before: int = 0) -> dict[str, Any]:
    """Run recorded inputs against a fresh server.  A reproducer that kept
    only the last inputs of a long run starts at its first reset (the state
    before it is unknown; a reset makes it empty, with the requested size
    the input carries)."""
    if dropped_before:
        starts = [i for i, item in enumerate(inputs) if item["op"] in ("device_reset", "reconnect")]
        assert starts, "a truncated reproducer without a reset to start from"
        first = starts[0]
        inputs = [{"op": "resize", "value": inputs[first]["requested_size"]}, *inputs[first:]]
    return await _run(inputs)


def _book(run: FuzzRun, figures: dict[str, Any]) -> None:
    run.extra["server fds"] = f"{figures['fds_start']}->{figures['fds_end']}"
    run.extra["server RSS MiB"] = f"{figures['rss_start_bytes'] / MiB:.0f}->{figures['rss_end_bytes'] / MiB:.0f}"
    run.extra["outcomes"] = " ".join(f"{k}={v}" for k, v in figures["outcomes"].items())


async def test_virtqueue_requests_against_the_reference_model() -> None:
    count = budget(ci=20_000, long=100_000)
    with FuzzRun("virtqueue", unit="requests") as run:
        figures = await _run(run, count)
        _book(run, figures)
        # No growth without bound: a few fds of a connection in progress at
        # most, and memory well within what one batch could explain.
        assert figures["fds_end"] <= figures["fds_start"] + 4, figures
        assert figures["rss_end_bytes"] < figures["rss_start_bytes"] + 64 * MiB, figures
    assert run.count >= count


@pytest.mark.parametrize("name,reproducer", [pytest.param(n, r, id=n) for n, r in regressions("virtqueue")]
                         or [pytest.param("none", None, id="none")])
async def test_virtqueue_regressions_replay(name: str, reproducer: dict[str, Any] | None) -> None:
    assert reproducer is not None, "tests/fuzz_regressions/ holds no virtqueue-*.json (the hand-written one is gone)"
    assert reproducer["fuzzer"] == "virtqueue"
    assert reproducer["inputs"], name
    await replay(reproducer["inputs"], reproducer.get("inputs_dropped_before", 0))


async def test_refused_requests_cost_a_bounded_log() -> None:
    # Every refused request had its own log line, on the only thread: a
    # guest sending refusals as fast as it can wrote the log as fast as that,
    # and the server stopped in write(2) once the log's reader fell behind
    # (found by the fuzzer above, when its own reading of stderr lagged).
    # Now at most 10 lines per device per 10 s, plus one count per window.
    burst, window_s = 10, 10.0  # vfiouser_vmem/vmem/_model.py _LOG_BURST, _LOG_WINDOW_S
    unaligned = struct.pack("<H6xQH6x", REQ_PLUG, DEFAULT_BAR_ADDR + 1, 1).hex()
    chains = [{"descs": [_desc(req_addr, 24, False, False, 1), _desc(resp_addr, RESPONSE_BYTES, True, True, 0)],
               "writes": [[req_addr, unaligned]]} for req_addr, resp_addr in map(_slot, range(48))]
    async with serving(log_limit_chars=64 << 20) as rig:
        await rig.connect()
        started = trio.current_time()
        for _ in range(40):
            assert await rig.execute({"op": "batch", "chains": chains}) == 48
        assert rig.outcomes["ERROR"] == 40 * 48
        windows = int((trio.current_time() - started) // window_s) + 2
    assert rig.returncode == 0, rig.stderr[-STDERR_TAIL_CHARS:]
    lines = rig.stderr.count("answered ERROR")
    assert 0 < lines <= burst * windows, f"{lines} log lines for {40 * 48} refused requests"
