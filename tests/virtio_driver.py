"""A minimal virtio-pci modern driver for the virtio-mem device, for tests.

It drives the device the way Linux does through QEMU's ``vfio-user-pci``
(virtio spec 4.1 and 5.15), on top of :class:`vfio_user_client.VfioUserClient`:

- PCI: walk the capability list in config space (virtio vendor caps, MSI-X),
  program the 64-bit memory BAR (BAR2/BAR3), enable memory decode and MSI-X
  (QEMU writes the MSI-X enable bit through to the device), give the server
  one eventfd per MSI-X vector;
- guest RAM: a memfd DMA-mapped with its fd (QEMU with ``share=on``) that
  holds the split virtqueue (descriptor table, avail ring, used ring) and a
  buffer area for requests and responses;
- virtio: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (read back),
  queue 0, DRIVER_OK; then requests: a 2-descriptor chain (device-readable
  request, device-writable response), avail idx bump, a notify write, a wait
  on the queue's MSI-X eventfd, the used ring.

Waits are bounded by ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import trio

from vfio_user_client import BAR2, BAR3, VfioUserClient

MiB = 1 << 20
GiB = 1 << 30

# -- PCI ------------------------------------------------------------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_STATUS_CAP_LIST = 0x10
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x6
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000

# -- virtio ----------------------------------------------------------------------
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
VIRTIO_MSI_NO_VECTOR = 0xFFFF

VIRTIO_F_VERSION_1 = 32
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2
DEFAULT_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE

# struct virtio_pci_common_cfg (virtio spec 4.1.4.3)
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# -- virtio-mem (virtio spec 5.15; docs/design.md, "virtio-mem rules") -------------
PLUG, UNPLUG, UNPLUG_ALL, STATE = range(4)
ACK, NACK, BUSY, ERROR = range(4)
PLUGGED, UNPLUGGED, MIXED = range(3)
REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56
_REQUEST = struct.Struct("<H6xQH6x")
_RESPONSE = struct.Struct("<H6xH")
_CONFIG = struct.Struct("<QH6xQQQQQ")

CONFIG_VECTOR = 0
QUEUE_VECTOR = 1
DEFAULT_BAR_ADDR = 0x10_0000_0000
DEFAULT_TIMEOUT = 5.0


def request(type_: int, addr: int = 0, nb_blocks: int = 0) -> bytes:
    """A 24-byte virtio-mem request."""
    return _REQUEST.pack(type_, addr, nb_blocks)


def response(data: bytes) -> tuple[int, int]:
    """(type, state) of a 10-byte virtio-mem response."""
    return _RESPONSE.unpack_from(data)


@dataclass(frozen=True)
class VirtioCap:
    """A virtio vendor capability (struct virtio_pci_cap, + notify multiplier)."""

    pos: int
    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


@dataclass(frozen=True)
class MemConfig:
    """struct virtio_mem_config."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int


@dataclass
class Chain:
    """A descriptor chain as the driver builds it: readable then writable
    buffers, each (guest address, length)."""

    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


class DriverError(Exception):
    pass


class Eventfd:
    """A non-blocking eventfd that a test awaits with a timeout."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fire_count(self) -> int:
        """Consume and return the pending count (0 when nothing fired)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def pending(self) -> bool:
        """Whether it fired (consumes the count)."""
        return self.fire_count() > 0

    async def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until it fires; returns (and consumes) the count."""
        with trio.fail_after(timeout):
            while True:
                count = self.fire_count()
                if count:
                    return count
                await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestRam:
    """A memfd playing the guest's shared RAM, mapped in this process too."""

    def __init__(self, size: int, iova: int) -> None:
        self.size = size
        self.iova = iova
        self.fd = os.memfd_create("vmem-test-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _at(self, addr: int, length: int) -> int:
        off = addr - self.iova
        if off < 0 or off + length > self.size:
            raise DriverError(f"guest address {addr:#x}+{length} is outside the test's guest RAM")
        return off

    def read(self, addr: int, length: int) -> bytes:
        off = self._at(addr, length)
        return bytes(self.map[off:off + length])

    def write(self, addr: int, data: bytes) -> None:
        off = self._at(addr, len(data))
        self.map[off:off + len(data)] = data

    def read_u16(self, addr: int) -> int:
        return struct.unpack("<H", self.read(addr, 2))[0]

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<H", value))

    def close(self) -> None:
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1


class VirtioMemDriver:
    """The test's virtio-mem driver on one vfio-user connection.

    Guest RAM layout (offsets from ``ram_iova``): descriptor table at 0,
    avail ring at 0x1000, used ring at 0x2000, then 64-byte slots (request
    at +0, response at +32) from 0x4000.
    """

    DESC_OFFSET = 0x0000
    AVAIL_OFFSET = 0x1000
    USED_OFFSET = 0x2000
    BUFFERS_OFFSET = 0x4000
    SLOT_SIZE = 64

    def __init__(
        self,
        client: VfioUserClient,
        *,
        ram_iova: int = 0,
        ram_size: int = 1 * MiB,
        bar_addr: int = DEFAULT_BAR_ADDR,
        queue_size: int = 16,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.client = client
        self.ram = GuestRam(ram_size, ram_iova)
        self.bar_addr = bar_addr
        self.queue_size = queue_size
        self.timeout = timeout
        self.config_irq = Eventfd()
        self.queue_irq = Eventfd()
        self.caps: dict[int, VirtioCap] = {}
        self.msix_pos: int | None = None
        self.cap_ids: list[tuple[int, int]] = []  # (position, id), in list order
        self.device_features = 0
        self.negotiated_features = 0
        self._reset_ring_state()

    # -- life cycle --------------------------------------------------------------
    def close(self) -> None:
        self.config_irq.close()
        self.queue_irq.close()
        self.ram.close()

    async def __aenter__(self) -> "VirtioMemDriver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def initialize(self, features: int = DEFAULT_FEATURES) -> None:
        """Everything from PCI enumeration to DRIVER_OK."""
        await self.probe_pci()
        await self.setup_pci()
        await self.map_ram()
        await self.start_virtio(features)

    async def start_virtio(self, features: int = DEFAULT_FEATURES, *, driver_ok: bool = True) -> None:
        """Virtio initialisation (spec 3.1.1): reset .. DRIVER_OK (Linux
        sets the MSI-X vectors before DRIVER_OK; ``driver_ok=False`` stops
        just before it); raises DriverError when the device refuses the
        features."""
        await self.reset_virtio()
        await self.set_status(STATUS_ACKNOWLEDGE)
        await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        if not await self.negotiate(features):
            await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED)
            raise DriverError(f"the device refused features {features:#x}")
        await self.setup_queue()
        await self.common_write(COMMON_MSIX, 2, CONFIG_VECTOR)
        if await self.common_read(COMMON_MSIX, 2) != CONFIG_VECTOR:
            raise DriverError("the device did not take the config MSI-X vector")
        if driver_ok:
            await self.set_driver_ok()

    async def set_driver_ok(self) -> None:
        await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    # -- PCI ---------------------------------------------------------------------
    async def probe_pci(self) -> None:
        """Walk the capability list: virtio vendor caps and MSI-X."""
        c = self.client
        if not await c.config_read_int(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            raise DriverError("no capability list")
        pos = await c.config_read_int(PCI_CAPABILITY_LIST, 1) & ~3
        seen: set[int] = set()
        while pos:
            if pos in seen or pos < 0x40 or pos > 0xFC:
                raise DriverError(f"bad capability pointer {pos:#x}")
            seen.add(pos)
            cap_id, nxt = await c.config_read(pos, 2)
            self.cap_ids.append((pos, cap_id))
            if cap_id == PCI_CAP_ID_VNDR:
                cap_len, cfg_type, bar, _id = await c.config_read(pos + 2, 4)
                offset, length = struct.unpack("<II", await c.config_read(pos + 8, 8))
                mult = 0
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    if cap_len < 20:
                        raise DriverError(f"notify capability of {cap_len} bytes")
                    mult = await c.config_read_int(pos + 16, 4)
                # The first capability of each type is the one to use (spec 4.1.4).
                self.caps.setdefault(cfg_type, VirtioCap(pos, cfg_type, bar, offset, length, mult))
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_pos = pos
            pos = nxt & ~3
        for needed in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG,
                       VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_DEVICE_CFG):
            if needed not in self.caps:
                raise DriverError(f"virtio capability {needed} missing")
        if self.msix_pos is None:
            raise DriverError("no MSI-X capability")

    async def write_bar_addr(self, addr: int) -> None:
        """Program the 64-bit memory BAR, lower dword then upper, as SeaBIOS
        and Linux do (QEMU writes both through to the device)."""
        await self.client.config_write_int(PCI_BASE_ADDRESS_0 + 4 * BAR2, 4, addr & 0xFFFFFFFF)
        await self.client.config_write_int(PCI_BASE_ADDRESS_0 + 4 * BAR3, 4, addr >> 32)
        self.bar_addr = addr

    async def read_bar_addr(self) -> int:
        lo = await self.client.config_read_int(PCI_BASE_ADDRESS_0 + 4 * BAR2, 4)
        hi = await self.client.config_read_int(PCI_BASE_ADDRESS_0 + 4 * BAR3, 4)
        return (hi << 32) | (lo & ~0xF)

    async def set_msix_enabled(self, enabled: bool) -> None:
        ctrl_at = self.msix_pos + PCI_MSIX_FLAGS
        ctrl = await self.client.config_read_int(ctrl_at, 2)
        ctrl = ctrl | PCI_MSIX_FLAGS_ENABLE if enabled else ctrl & ~PCI_MSIX_FLAGS_ENABLE
        await self.client.config_write_int(ctrl_at, 2, ctrl & ~PCI_MSIX_FLAGS_MASKALL)

    async def msix_enabled(self) -> bool:
        return bool(await self.client.config_read_int(self.msix_pos + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE)

    async def setup_pci(self, *, eventfds: bool = True) -> None:
        """BAR address, memory decode + bus master, MSI-X eventfds and enable."""
        await self.write_bar_addr(self.bar_addr)
        await self.client.config_write_int(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        if eventfds:
            await self.client.set_msix_eventfds([self.config_irq.fd, self.queue_irq.fd])
        await self.set_msix_enabled(True)

    async def map_ram(self) -> None:
        await self.client.dma_map(self.ram.iova, self.ram.size, self.ram.fd)

    # -- register access ------------------------------------------------------------
    def _cap(self, cfg_type: int) -> VirtioCap:
        return self.caps[cfg_type]

    async def common_read(self, offset: int, size: int) -> int:
        cap = self._cap(VIRTIO_PCI_CAP_COMMON_CFG)
        return await self.client.bar_read_int(cap.bar, cap.offset + offset, size)

    async def common_write(self, offset: int, size: int, value: int) -> None:
        cap = self._cap(VIRTIO_PCI_CAP_COMMON_CFG)
        await self.client.bar_write_int(cap.bar, cap.offset + offset, size, value)

    async def status(self) -> int:
        return await self.common_read(COMMON_STATUS, 1)

    async def set_status(self, value: int) -> None:
        await self.common_write(COMMON_STATUS, 1, value)

    async def reset_virtio(self) -> None:
        """Write 0 to device_status and wait for it to read back 0."""
        await self.set_status(0)
        if await self.status() != 0:
            raise DriverError("device status did not reset to 0")
        self._reset_ring_state()

    async def read_device_features(self) -> int:
        features = 0
        for select in (0, 1):
            await self.common_write(COMMON_DFSELECT, 4, select)
            features |= await self.common_read(COMMON_DF, 4) << (32 * select)
        return features

    async def write_driver_features(self, features: int) -> None:
        for select in (0, 1):
            await self.common_write(COMMON_GFSELECT, 4, select)
            await self.common_write(COMMON_GF, 4, (features >> (32 * select)) & 0xFFFFFFFF)

    async def negotiate(self, features: int) -> bool:
        """Read the device features, write ``features`` (not masked by the
        offer, so a test can misbehave), set FEATURES_OK and read it back."""
        self.device_features = await self.read_device_features()
        await self.write_driver_features(features)
        await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        ok = bool(await self.status() & STATUS_FEATURES_OK)
        if ok:
            self.negotiated_features = features
        return ok

    async def isr(self) -> int:
        cap = self._cap(VIRTIO_PCI_CAP_ISR_CFG)
        return await self.client.bar_read_int(cap.bar, cap.offset, 1)

    async def config_generation(self) -> int:
        return await self.common_read(COMMON_CFGGENERATION, 1)

    async def read_config_raw(self) -> bytes:
        """The 56-byte device config, in 32-bit accesses (as Linux reads
        64-bit fields), retried until config_generation is stable."""
        cap = self._cap(VIRTIO_PCI_CAP_DEVICE_CFG)
        for _ in range(10):
            before = await self.config_generation()
            data = b"".join(
                [await self.client.bar_read(cap.bar, cap.offset + off, 4) for off in range(0, CONFIG_SIZE, 4)]
            )
            if await self.config_generation() == before:
                return data
        raise DriverError("config_generation never settled")

    async def read_config(self) -> MemConfig:
        return MemConfig(*_CONFIG.unpack(await self.read_config_raw()))

    # -- the virtqueue -----------------------------------------------------------------
    def _reset_ring_state(self) -> None:
        self.avail_idx = 0
        self.last_used_idx = 0
        self._next_desc = 0
        self._next_slot = 0

    @property
    def desc_addr(self) -> int:
        return self.ram.iova + self.DESC_OFFSET

    @property
    def avail_addr(self) -> int:
        return self.ram.iova + self.AVAIL_OFFSET

    @property
    def used_addr(self) -> int:
        return self.ram.iova + self.USED_OFFSET

    async def setup_queue(self, size: int | None = None) -> None:
        """Queue 0: size, rings (zeroed), MSI-X vector, enable."""
        size = size or self.queue_size
        self.queue_size = size
        self.ram.write(self.ram.iova, bytes(self.BUFFERS_OFFSET))
        self._reset_ring_state()
        if await self.common_read(COMMON_NUMQ, 2) < 1:
            raise DriverError("no virtqueue")
        await self.common_write(COMMON_Q_SELECT, 2, 0)
        max_size = await self.common_read(COMMON_Q_SIZE, 2)
        if size > max_size:
            raise DriverError(f"queue size {size} > the device's {max_size}")
        await self.common_write(COMMON_Q_SIZE, 2, size)
        for lo, addr in ((COMMON_Q_DESCLO, self.desc_addr), (COMMON_Q_AVAILLO, self.avail_addr),
                         (COMMON_Q_USEDLO, self.used_addr)):
            await self.common_write(lo, 4, addr & 0xFFFFFFFF)
            await self.common_write(lo + 4, 4, addr >> 32)
        await self.common_write(COMMON_Q_MSIX, 2, QUEUE_VECTOR)
        if await self.common_read(COMMON_Q_MSIX, 2) != QUEUE_VECTOR:
            raise DriverError("the device did not take the queue MSI-X vector")
        self.notify_off = await self.common_read(COMMON_Q_NOFF, 2)
        await self.common_write(COMMON_Q_ENABLE, 2, 1)

    def slot_addr(self, slot: int) -> int:
        """Guest address of buffer slot ``slot`` (request at +0, response at +32)."""
        return self.ram.iova + self.BUFFERS_OFFSET + slot * self.SLOT_SIZE

    def _take_slot(self) -> int:
        slots = (self.ram.size - self.BUFFERS_OFFSET) // self.SLOT_SIZE
        slot = self._next_slot % min(slots, self.queue_size)
        self._next_slot += 1
        return slot

    def post(self, chain: Chain) -> int:
        """Put one chain in the descriptor table and the avail ring (no kick,
        avail idx not yet published); returns its head."""
        buffers = [(a, n, 0) for a, n in chain.readable] + [(a, n, VRING_DESC_F_WRITE) for a, n in chain.writable]
        if not buffers or len(buffers) > self.queue_size:
            raise DriverError(f"a chain of {len(buffers)} descriptors")
        indices = [(self._next_desc + i) % self.queue_size for i in range(len(buffers))]
        self._next_desc = (self._next_desc + len(buffers)) % self.queue_size
        for i, (index, (addr, length, flags)) in enumerate(zip(indices, buffers)):
            last = i == len(buffers) - 1
            nxt = 0 if last else indices[i + 1]
            self.ram.write(self.desc_addr + 16 * index,
                           _DESC.pack(addr, length, flags | (0 if last else VRING_DESC_F_NEXT), nxt))
        head = indices[0]
        self.ram.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.queue_size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make the posted chains visible: write the avail idx."""
        self.ram.write_u16(self.avail_addr + 2, self.avail_idx)

    async def kick(self) -> None:
        """Write the queue index to the queue's notify address."""
        cap = self._cap(VIRTIO_PCI_CAP_NOTIFY_CFG)
        await self.client.bar_write_int(cap.bar, cap.offset + self.notify_off * cap.notify_off_multiplier, 2, 0)

    def used_idx(self) -> int:
        return self.ram.read_u16(self.used_addr + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (head, written length), in order."""
        elems = []
        used_idx = self.used_idx()
        while self.last_used_idx != used_idx:
            slot = self.last_used_idx % self.queue_size
            elems.append(_USED_ELEM.unpack(self.ram.read(self.used_addr + 4 + 8 * slot, 8)))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return elems

    async def wait_used(self, count: int, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait on the queue's MSI-X eventfd until ``count`` chains are used."""
        elems: list[tuple[int, int]] = []
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                elems += self.take_used()
                if len(elems) >= count:
                    break
                await self.queue_irq.wait(float("inf"))
        if len(elems) != count:
            raise DriverError(f"{len(elems)} used elements, expected {count}")
        return elems

    def prepare(self, req: bytes, response_len: int = RESPONSE_SIZE) -> tuple[int, int]:
        """Write ``req`` into a buffer slot and post a 2-descriptor chain;
        returns (head, response address)."""
        slot = self._take_slot()
        req_addr = self.slot_addr(slot)
        resp_addr = req_addr + 32
        self.ram.write(req_addr, req)
        self.ram.write(resp_addr, b"\xee" * max(response_len, RESPONSE_SIZE))
        head = self.post(Chain([(req_addr, len(req))], [(resp_addr, response_len)]))
        return head, resp_addr

    async def submit_many(self, requests: Sequence[bytes]) -> list[bytes]:
        """Post every request, kick once, wait for all; responses in order."""
        posted = [self.prepare(req) for req in requests]
        self.publish()
        await self.kick()
        used = dict(await self.wait_used(len(posted)))
        responses = []
        for head, resp_addr in posted:
            if head not in used:
                raise DriverError(f"chain {head} was not used")
            if used[head] != RESPONSE_SIZE:
                raise DriverError(f"chain {head}: the device wrote {used[head]} bytes, not {RESPONSE_SIZE}")
            responses.append(self.ram.read(resp_addr, RESPONSE_SIZE))
        return responses

    async def submit(self, req: bytes) -> bytes:
        """One request, one kick, its 10-byte response."""
        return (await self.submit_many([req]))[0]

    # -- virtio-mem requests -------------------------------------------------------------
    async def call(self, type_: int, addr: int = 0, nb_blocks: int = 0) -> tuple[int, int]:
        """A request; returns (response type, state)."""
        return response(await self.submit(request(type_, addr, nb_blocks)))

    async def plug(self, addr: int, nb_blocks: int) -> int:
        return (await self.call(PLUG, addr, nb_blocks))[0]

    async def unplug(self, addr: int, nb_blocks: int) -> int:
        return (await self.call(UNPLUG, addr, nb_blocks))[0]

    async def unplug_all(self) -> int:
        return (await self.call(UNPLUG_ALL))[0]

    async def state(self, addr: int, nb_blocks: int) -> tuple[int, int]:
        return await self.call(STATE, addr, nb_blocks)
