"""Protocol-level tests: the real DeviceServer, driven over vfio-user without QEMU.

The server runs in the test's own trio loop (``DeviceServer.run()`` in a
fixture's nursery); ``vfio_user_client.VfioUserClient`` speaks the wire
protocol to it as QEMU's ``vfio-user-pci`` does, and
``virtio_driver.VirtioMemDriver`` plays the guest's virtio-mem driver with a
memfd as shared guest RAM and eventfds as MSI-X vectors.

Synchronisation: the server handles the client's messages in order, and
processes the virtqueue right after the message batch that carried a kick,
before it can wait again; so the reply to any request sent after a kick
means the kick was fully processed (``sync()``).  Interrupts are awaited on
their eventfds under ``trio.fail_after``.  Nothing sleeps.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import struct
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from vfio_user_client import (
    BAR0,
    BAR1,
    BAR2,
    BAR3,
    CONFIG_REGION,
    DMA_RW,
    MSIX_IRQ,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    VfioUserClient,
    VfioUserError,
)
from virtio_driver import (
    ACK,
    BUSY,
    COMMON_GF,
    COMMON_GFSELECT,
    DEFAULT_FEATURES,
    ERROR,
    MIXED,
    NACK,
    PCI_BASE_ADDRESS_0,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    PLUG,
    PLUGGED,
    STATE,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    UNPLUG,
    UNPLUGGED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VRING_AVAIL_F_NO_INTERRUPT,
    Chain,
    DriverError,
    VirtioMemDriver,
    request,
    response,
)
from vfiouser_vmem.server import DeviceConfig, DeviceServer
from vfiouser_vmem.vmem import MemoryBackendConfig

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 2 * MiB
TIMEOUT = 5  # generous bound for things that take milliseconds
BAR_ADDR = 0x10_0000_0000
USABLE_EXTENT = 256 * MiB

VIRTIO_VENDOR = 0x1AF4
VIRTIO_MEM_DEVICE = 0x1058  # 0x1040 + 24


# ---------------------------------------------------------------------------
# fixtures and helpers


class MemoryBar:
    """The memory BAR as the client sees it: the fd from its region info
    (dup'ed, so it outlives the client) and a shared mapping of it."""

    def __init__(self, fd: int, size: int, map_bytes: int) -> None:
        self.fd = os.dup(fd)
        self.size = size
        self.map = mmap.mmap(self.fd, map_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def allocated(self) -> int:
        """Host memory in use: the honest measure (docs/design.md, "Memory through the BAR")."""
        return os.fstat(self.fd).st_blocks * 512

    def fill(self, offset: int, length: int, byte: int) -> None:
        self.map[offset:offset + length] = bytes([byte]) * length

    def pread(self, offset: int, length: int) -> bytes:
        """Read with pread(2): reading holes this way allocates nothing."""
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class Vmem:
    """One in-process device with a connected client and (initialised) driver."""

    server: DeviceServer
    client: VfioUserClient
    driver: VirtioMemDriver
    factory: "VmemFactory"
    crashes: list[BaseException] | None = None

    @property
    def path(self) -> str:
        return self.server.config.socket

    async def connect(self) -> VfioUserClient:
        """Another vfio-user client on the same socket (closed at teardown)."""
        with trio.fail_after(TIMEOUT):
            client = await VfioUserClient.connect(self.path)
        self.factory.stack.callback(client.close)
        return client

    def new_driver(self, client: VfioUserClient, **kwargs) -> VirtioMemDriver:
        driver = VirtioMemDriver(client, bar_addr=BAR_ADDR, **kwargs)
        self.factory.stack.callback(driver.close)
        return driver

    async def memory_bar(self, map_bytes: int | None = None, client: VfioUserClient | None = None) -> MemoryBar:
        info = await (client or self.client).region_info(BAR2)
        assert info.fd >= 0, "the memory BAR came without an fd"
        # What QEMU maps: the sparse mmap areas (the device's size), not the whole BAR.
        mappable = max((a.offset + a.size for a in info.sparse_areas), default=info.size)
        bar = MemoryBar(info.fd, info.size, map_bytes or min(mappable, 256 * MiB))
        self.factory.stack.callback(bar.close)
        return bar

    async def sync(self, driver: VirtioMemDriver | None = None) -> None:
        """A round trip: the server has processed everything sent before,
        including the virtqueue work of an earlier kick."""
        with trio.fail_after(TIMEOUT):
            await (driver or self.driver).status()

    async def discarded(self) -> None:
        """Until the memory of every answered UNPLUG is back with the host
        (discards run after the answer: vfiouser_vmem/discard.py)."""
        with trio.fail_after(TIMEOUT):
            await self.server.discards.wait_idle()

    async def assert_not_crashed(self) -> None:
        """Once every task is blocked (the server handled what it was sent),
        DeviceServer.run() is still running (needs ``record_crash``)."""
        await trio.testing.wait_all_tasks_blocked()
        assert self.crashes == [], f"DeviceServer.run() died: {self.crashes[0]!r}"

    async def assert_alive(self) -> None:
        """The server still answers the current client."""
        with trio.fail_after(TIMEOUT):
            info = await self.client.device_info()
        assert info.num_regions > CONFIG_REGION


async def _serve(server: DeviceServer, crashes: list[BaseException] | None, *,
                 task_status=trio.TASK_STATUS_IGNORED) -> None:
    # close() in the same task, after run() was cancelled: nothing waits on
    # the context's fds any more when it is destroyed.  With ``crashes``,
    # an exception out of run() is recorded there instead of propagating
    # (for tests that check the server survives something).
    try:
        task_status.started()
        await server.run()
    except Exception as exc:
        if crashes is None:
            raise
        crashes.append(exc)
    finally:
        server.close()


class VmemFactory:
    def __init__(self, nursery: trio.Nursery, stack: ExitStack, sock_dir: str) -> None:
        self.nursery = nursery
        self.stack = stack
        self.sock_dir = sock_dir
        self.count = 0

    async def start(
        self,
        *,
        size: int = 1 * GiB,
        block_size: int = BLOCK,
        requested: int = 256 * MiB,
        node: int | None = None,
        initialize: bool = True,
        features: int = DEFAULT_FEATURES,
        record_crash: bool = False,
        memory_backend: MemoryBackendConfig | None = None,
        prealloc: bool = False,
        scrub_interval_s: float = 10.0,
        unplugged_access: str = "reclaim",
    ) -> Vmem:
        self.count += 1
        config = DeviceConfig(
            socket=os.path.join(self.sock_dir, f"vmem{self.count}.sock"),
            size_bytes=size if memory_backend is None else memory_backend.size_bytes,
            block_size_bytes=block_size,
            requested_size_bytes=requested,
            id=f"vmem{self.count}",
            node=node,
            memory_backend=memory_backend,
            prealloc=prealloc,
            scrub_interval_s=scrub_interval_s,
            unplugged_access=unplugged_access,
        )
        server = DeviceServer(config)
        crashes: list[BaseException] | None = [] if record_crash else None
        await self.nursery.start(_serve, server, crashes)
        with trio.fail_after(TIMEOUT):
            client = await VfioUserClient.connect(config.socket)
        self.stack.callback(client.close)
        driver = VirtioMemDriver(client, bar_addr=BAR_ADDR)
        self.stack.callback(driver.close)
        vmem = Vmem(server, client, driver, self, crashes)
        if initialize:
            with trio.fail_after(TIMEOUT):
                await driver.initialize(features)
        return vmem


@pytest.fixture
async def vmem_factory():
    sock_dir = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")  # socket paths < 107 bytes
    try:
        with ExitStack() as stack:  # clients, drivers, mappings: closed after the servers
            async with trio.open_nursery() as nursery:
                yield VmemFactory(nursery, stack, sock_dir)
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
async def vmem(vmem_factory: VmemFactory) -> Vmem:
    """A 1 GiB device, 2 MiB blocks, 256 MiB requested, driver at DRIVER_OK."""
    return await vmem_factory.start()


def usable_size(requested: int, region: int, block: int) -> int:
    """QEMU's rule, computed independently of the product code."""
    if requested == 0:
        return 0
    size = min(region, requested + USABLE_EXTENT)
    return (size + block - 1) // block * block


# ---------------------------------------------------------------------------
# handshake, PCI identity, regions


async def test_handshake_device_info_and_irq_info(vmem: Vmem) -> None:
    c = vmem.client
    assert c.server_version == (0, 1)
    caps = c.server_capabilities["capabilities"]
    assert caps["max_msg_fds"] >= 1 and caps["max_data_xfer_size"] >= 4096
    info = await c.device_info()
    assert info.flags & VFIO_DEVICE_FLAGS_PCI and info.flags & VFIO_DEVICE_FLAGS_RESET
    assert info.num_regions > CONFIG_REGION
    assert info.num_irqs > MSIX_IRQ
    msix = await c.irq_info(MSIX_IRQ)
    assert msix.index == MSIX_IRQ
    assert msix.count == 2  # config changes + the one virtqueue
    assert msix.flags & VFIO_IRQ_INFO_EVENTFD
    assert vmem.server.connected and vmem.server.clients_total == 1


async def test_pci_identity_and_capabilities(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(initialize=False)
    c = v.client
    assert await c.config_read_int(PCI_VENDOR_ID, 2) == VIRTIO_VENDOR
    assert await c.config_read_int(PCI_DEVICE_ID, 2) == VIRTIO_MEM_DEVICE
    assert await c.config_read_int(PCI_REVISION_ID, 1) >= 1  # modern (spec 4.1.2.1; patch 0003)
    assert await c.config_read_int(PCI_SUBSYSTEM_VENDOR_ID, 2) == VIRTIO_VENDOR
    assert await c.config_read_int(PCI_CLASS_PROG + 2, 1) == 0xFF  # PCI_CLASS_OTHERS, as QEMU's virtio-mem-pci
    assert await c.config_read_int(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
    assert await c.config_read_int(PCI_CAPABILITY_LIST, 1) >= 0x40

    bar0 = await c.config_read_int(PCI_BASE_ADDRESS_0, 4)
    assert bar0 & 0x7 == 0  # 32-bit memory BAR
    bar2 = await c.config_read_int(PCI_BASE_ADDRESS_0 + 4 * BAR2, 4)
    assert bar2 & 0x1 == 0, "BAR2 must be a memory BAR"
    assert bar2 & 0x6 == 0x4, "BAR2 must be 64-bit (patch 0002)"
    assert bar2 & 0x8, "BAR2 must be prefetchable (patch 0002)"
    assert await c.config_read_int(PCI_BASE_ADDRESS_0 + 4 * BAR3, 4) == 0  # no I/O bit ORed in

    d = v.driver
    await d.probe_pci()
    ids = [cap_id for _, cap_id in d.cap_ids]
    assert ids.count(PCI_CAP_ID_MSIX) == 1 and ids.count(PCI_CAP_ID_VNDR) == 4
    bar0_size = (await c.region_info(BAR0)).size
    expected_min = {
        VIRTIO_PCI_CAP_COMMON_CFG: 0x38,
        VIRTIO_PCI_CAP_ISR_CFG: 1,
        VIRTIO_PCI_CAP_DEVICE_CFG: 56,
        VIRTIO_PCI_CAP_NOTIFY_CFG: 2,
    }
    for cfg_type, min_len in expected_min.items():
        cap = d.caps[cfg_type]
        assert cap.bar == BAR0, cap
        assert cap.length >= min_len, cap
        assert cap.offset + cap.length <= bar0_size, cap
    notify = d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert notify.notify_off_multiplier % 2 == 0  # spec 4.1.4.4: even (or 0)

    ctrl = await c.config_read_int(d.msix_pos + PCI_MSIX_FLAGS, 2)
    assert (ctrl & PCI_MSIX_FLAGS_QSIZE) + 1 == 2
    table, pba = struct.unpack("<II", await c.config_read(d.msix_pos + 4, 8))
    bar1_size = (await c.region_info(BAR1)).size
    assert table & 7 == BAR1 and pba & 7 == BAR1
    assert (table & ~7) + 2 * 16 <= bar1_size and (pba & ~7) + 8 <= bar1_size
    assert (pba & ~7) >= (table & ~7) + 2 * 16  # table and PBA do not overlap

    # The virtio capabilities are read-only; writing one is refused.
    common_at = d.caps[VIRTIO_PCI_CAP_COMMON_CFG].pos
    before = await c.config_read(common_at, 16)
    with pytest.raises(VfioUserError) as exc:
        await c.config_write_int(common_at + 8, 4, 0x12345678)
    assert exc.value.errno == errno.EPERM
    assert await c.config_read(common_at, 16) == before


@pytest.mark.parametrize(
    "size, bar_size",
    [(64 * MiB, 128 * MiB), (128 * MiB, 128 * MiB), (1 * GiB, 1 * GiB), (1536 * MiB, 2 * GiB)],
)
async def test_memory_bar_region_info(vmem_factory: VmemFactory, size: int, bar_size: int) -> None:
    v = await vmem_factory.start(size=size, requested=0, initialize=False)
    info = await v.client.region_info(BAR2)
    assert info.index == BAR2
    assert info.flags & VFIO_REGION_INFO_FLAG_MMAP
    assert info.flags & VFIO_REGION_INFO_FLAG_READ and info.flags & VFIO_REGION_INFO_FLAG_WRITE
    assert info.size == bar_size
    assert bar_size & (bar_size - 1) == 0 and bar_size >= max(size, 128 * MiB)
    assert info.fd >= 0
    # The backend holds exactly the device's size, and only that much of the
    # BAR is mmap-able: the rest traps to the server (docs/backends.md).
    assert os.fstat(info.fd).st_size == size
    assert os.readlink(f"/proc/self/fd/{info.fd}").startswith("/memfd:")
    assert [(a.offset, a.size) for a in info.sparse_areas] == [(0, size)]
    assert info.offset == 0

    # The trapped BARs come without an fd; config space is 256 bytes.
    for index, expected in ((BAR0, 0x4000), (BAR1, 0x1000)):
        trapped = await v.client.region_info(index)
        assert trapped.size == expected
        assert not trapped.flags & VFIO_REGION_INFO_FLAG_MMAP and trapped.fd == -1
    assert (await v.client.region_info(CONFIG_REGION)).size == 256
    # BAR3 is the upper half of BAR2: no region of its own.
    assert (await v.client.region_info(BAR3)).size == 0

    # The device's region_size is the device size, not the BAR size.
    await v.driver.initialize()
    assert (await v.driver.read_config()).region_size == size


async def test_8gib_device(vmem_factory: VmemFactory) -> None:
    """Region sizes above 4 GiB (patch 0001) and the 64-bit BAR's sizing (0002)."""
    size = 8 * GiB
    v = await vmem_factory.start(size=size, requested=size, initialize=False)
    info = await v.client.region_info(BAR2)
    assert info.size == size and info.flags & VFIO_REGION_INFO_FLAG_MMAP
    assert os.fstat(info.fd).st_size == size

    # BAR sizing, as firmware does it: all ones in both dwords, read back the mask.
    c = v.client
    lo_at, hi_at = PCI_BASE_ADDRESS_0 + 4 * BAR2, PCI_BASE_ADDRESS_0 + 4 * BAR3
    await c.config_write_int(lo_at, 4, 0xFFFFFFFF)
    await c.config_write_int(hi_at, 4, 0xFFFFFFFF)
    mask = (await c.config_read_int(hi_at, 4) << 32) | (await c.config_read_int(lo_at, 4) & ~0xF)
    assert (~mask + 1) & 0xFFFF_FFFF_FFFF_FFFF == size
    assert await c.config_read_int(lo_at, 4) & 0xF == 0xC

    d = v.driver
    await d.initialize()  # programs BAR_ADDR
    cfg = await d.read_config()
    assert (cfg.region_size, cfg.usable_region_size, cfg.addr) == (size, size, BAR_ADDR)

    # A block beyond 4 GiB plugs, holds data and is discarded on unplug.
    offset = 6 * GiB + 4 * BLOCK
    assert await d.plug(BAR_ADDR + offset, 1) == ACK
    bar = MemoryBar(info.fd, size, size)
    v.factory.stack.callback(bar.close)
    bar.fill(offset, BLOCK, 0x5A)
    assert bar.allocated() >= BLOCK
    assert await c.bar_read(BAR2, offset + 4096, 8) == b"\x5a" * 8  # the slow path too
    assert await d.unplug(BAR_ADDR + offset, 1) == ACK
    await v.discarded()
    assert bar.allocated() == 0
    assert bar.pread(offset, 4096) == bytes(4096)


async def test_64bit_bar_address_and_device_config_addr(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=64 * MiB, initialize=False)
    d, c = v.driver, v.client
    await d.initialize()
    lo_at, hi_at = PCI_BASE_ADDRESS_0 + 4 * BAR2, PCI_BASE_ADDRESS_0 + 4 * BAR3
    assert await c.config_read_int(lo_at, 4) == 0x0000000C  # address bits + 64-bit prefetchable
    assert await c.config_read_int(hi_at, 4) == 0x10  # the upper dword was kept (patch 0002)
    assert await d.read_bar_addr() == BAR_ADDR
    assert (await d.read_config()).addr == BAR_ADDR
    assert v.server.transport.memory_bar_addr == BAR_ADDR

    # Move the BAR (both dwords change); the device config follows.
    new_addr = 0x3_4000_0000
    await d.write_bar_addr(new_addr)
    assert await c.config_read_int(lo_at, 4) == 0x4000000C
    assert await c.config_read_int(hi_at, 4) == 0x3
    assert (await d.read_config()).addr == new_addr
    # Only the upper dword changes.
    await c.config_write_int(hi_at, 4, 0x7)
    assert (await d.read_config()).addr == 0x7_4000_0000
    await d.write_bar_addr(new_addr)

    # Requests are checked against the new address.
    assert await d.plug(BAR_ADDR, 1) == ERROR
    assert await d.plug(new_addr, 1) == ACK
    assert await d.state(new_addr, 1) == (ACK, PLUGGED)


# ---------------------------------------------------------------------------
# feature negotiation


async def test_features_version_1_and_unplugged_inaccessible_accepted(vmem: Vmem) -> None:
    d = vmem.driver
    assert d.device_features == 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    assert await d.status() == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    # The driver features read back as written.
    for select in (0, 1):
        await d.common_write(COMMON_GFSELECT, 4, select)
        assert await d.common_read(COMMON_GF, 4) == (DEFAULT_FEATURES >> (32 * select)) & 0xFFFFFFFF
    # Writing features after FEATURES_OK is refused.
    with pytest.raises(VfioUserError) as exc:
        await d.common_write(COMMON_GF, 4, 0)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "features",
    [
        pytest.param(1 << VIRTIO_F_VERSION_1, id="no-unplugged-inaccessible"),
        pytest.param(1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, id="no-version-1"),
        pytest.param(DEFAULT_FEATURES | 1 << VIRTIO_MEM_F_PERSISTENT_SUSPEND, id="not-offered-persistent-suspend"),
        pytest.param(DEFAULT_FEATURES | 1 << VIRTIO_MEM_F_ACPI_PXM, id="not-offered-acpi-pxm"),
    ],
)
async def test_unacceptable_features_clear_features_ok(vmem_factory: VmemFactory, features: int) -> None:
    v = await vmem_factory.start(initialize=False)
    d = v.driver
    await d.probe_pci()
    await d.setup_pci()
    await d.map_ram()
    with pytest.raises(DriverError, match="refused"):
        await d.start_virtio(features)
    assert not await d.status() & STATUS_FEATURES_OK
    # A driver that then accepts the offer gets through.
    await d.start_virtio(DEFAULT_FEATURES)
    assert await d.status() & STATUS_FEATURES_OK


async def test_acpi_pxm_offered_when_a_node_is_configured(vmem_factory: VmemFactory) -> None:
    features = DEFAULT_FEATURES | 1 << VIRTIO_MEM_F_ACPI_PXM
    v = await vmem_factory.start(node=3, features=features)
    d = v.driver
    assert d.device_features == features
    assert await d.status() & STATUS_FEATURES_OK
    assert (await d.read_config()).node_id == 3
    # Node 0 is a configured node too.
    v0 = await vmem_factory.start(node=0, initialize=False)
    await v0.driver.probe_pci()
    assert await v0.driver.read_device_features() >> VIRTIO_MEM_F_ACPI_PXM & 1


# ---------------------------------------------------------------------------
# requests (docs/design.md, "virtio-mem rules")


async def test_plug_state_unplug_round_trip(vmem: Vmem) -> None:
    d, model = vmem.driver, vmem.server.model
    addr = BAR_ADDR + 8 * BLOCK
    assert await d.state(addr, 4) == (ACK, UNPLUGGED)
    assert await d.plug(addr, 4) == ACK
    assert model.plugged_size == 4 * BLOCK
    assert (await d.read_config()).plugged_size == 4 * BLOCK
    assert await d.state(addr, 4) == (ACK, PLUGGED)
    assert await d.state(addr + BLOCK, 1) == (ACK, PLUGGED)
    assert await d.state(addr - BLOCK, 2) == (ACK, MIXED)
    assert await d.state(addr + 3 * BLOCK, 2) == (ACK, MIXED)
    assert await d.unplug(addr, 2) == ACK
    assert await d.state(addr, 2) == (ACK, UNPLUGGED)
    assert await d.state(addr, 4) == (ACK, MIXED)
    assert (await d.read_config()).plugged_size == 2 * BLOCK
    assert await d.unplug(addr + 2 * BLOCK, 2) == ACK
    assert await d.state(addr, 4) == (ACK, UNPLUGGED)
    assert model.plugged_size == 0
    # The whole usable region in one STATE.
    usable = (await d.read_config()).usable_region_size
    assert await d.state(BAR_ADDR, usable // BLOCK) == (ACK, UNPLUGGED)


async def test_invalid_ranges_are_errors(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=64 * MiB)
    d, model = v.driver, v.server.model
    usable = usable_size(64 * MiB, 1 * GiB, BLOCK)
    assert (await d.read_config()).usable_region_size == usable
    assert await d.plug(BAR_ADDR, 2) == ACK
    before = model.bitmap.count_plugged()
    bad = [
        (BAR_ADDR + 4 * BLOCK + 4096, 1),  # not block aligned
        (BAR_ADDR + 4 * BLOCK, 0),  # nb_blocks 0
        (BAR_ADDR - BLOCK, 1),  # below the region
        (BAR_ADDR + usable, 1),  # at the end of the usable region
        (BAR_ADDR + usable - BLOCK, 2),  # straddles the end of the usable region
        (BAR_ADDR + 1 * GiB, 1),  # beyond the region
        ((1 << 64) - BLOCK, 2),  # overflows
        (0, 1),  # guest RAM, not the device
    ]
    for addr, nb in bad:
        for type_ in (PLUG, UNPLUG, STATE):
            assert await d.call(type_, addr, nb) == (ERROR, 0), (type_, hex(addr), nb)
    assert model.bitmap.count_plugged() == before
    assert await d.state(BAR_ADDR, 2) == (ACK, PLUGGED)
    # The last usable block is valid.
    assert await d.state(BAR_ADDR + usable - BLOCK, 1) == (ACK, UNPLUGGED)


async def test_nothing_requested_means_nothing_usable(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(requested=0)
    cfg = await v.driver.read_config()
    assert (cfg.requested_size, cfg.usable_region_size) == (0, 0)
    # Outside the (empty) usable region: ERROR before the NACK rule.
    assert await v.driver.plug(BAR_ADDR, 1) == ERROR
    assert await v.driver.state(BAR_ADDR, 1) == (ERROR, 0)


async def test_plug_beyond_requested_size_is_nacked(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(requested=4 * BLOCK)
    d, model = v.driver, v.server.model
    assert await d.plug(BAR_ADDR, 5) == NACK
    assert model.plugged_size == 0
    assert await d.plug(BAR_ADDR, 3) == ACK
    assert await d.plug(BAR_ADDR + 3 * BLOCK, 2) == NACK
    assert await d.plug(BAR_ADDR + 3 * BLOCK, 1) == ACK
    assert await d.plug(BAR_ADDR + 4 * BLOCK, 1) == NACK
    assert model.plugged_size == 4 * BLOCK
    # A smaller requested size NACKs further plugs but keeps what is plugged.
    model.set_requested_size(2 * BLOCK)
    assert await d.unplug(BAR_ADDR, 1) == ACK
    assert await d.plug(BAR_ADDR, 1) == NACK
    assert model.plugged_size == 3 * BLOCK


async def test_double_plug_and_unplug_of_unplugged_are_errors(vmem: Vmem) -> None:
    d, model = vmem.driver, vmem.server.model
    assert await d.plug(BAR_ADDR + 2 * BLOCK, 2) == ACK
    assert await d.plug(BAR_ADDR + 2 * BLOCK, 2) == ERROR
    assert await d.plug(BAR_ADDR + 3 * BLOCK, 2) == ERROR  # partly plugged
    assert await d.unplug(BAR_ADDR + 4 * BLOCK, 1) == ERROR
    assert await d.unplug(BAR_ADDR + BLOCK, 2) == ERROR  # partly unplugged
    assert model.plugged_size == 2 * BLOCK
    assert await d.state(BAR_ADDR + 2 * BLOCK, 2) == (ACK, PLUGGED)
    assert await d.state(BAR_ADDR + BLOCK, 4) == (ACK, MIXED)


async def test_several_requests_before_one_kick(vmem: Vmem) -> None:
    d = vmem.driver
    reqs = [
        request(PLUG, BAR_ADDR, 2),
        request(STATE, BAR_ADDR, 2),
        request(UNPLUG, BAR_ADDR, 1),
        request(STATE, BAR_ADDR, 2),
        request(PLUG, BAR_ADDR, 1),
    ]
    posted = [d.prepare(r) for r in reqs]
    assert d.used_idx() == 0
    d.publish()
    await d.kick()
    await vmem.sync()
    used = d.take_used()
    assert [head for head, _ in used] == [head for head, _ in posted]
    assert all(length == 10 for _, length in used)
    assert [response(d.ram.read(addr, 10)) for _, addr in posted] == [
        (ACK, 0), (ACK, PLUGGED), (ACK, 0), (ACK, MIXED), (ACK, 0)
    ]
    # One interrupt for the batch; plugged_size changes make no config interrupt.
    assert d.queue_irq.fire_count() == 1
    assert not d.config_irq.pending()
    # submit_many does the same through the helper.
    assert [response(r) for r in await d.submit_many([request(STATE, BAR_ADDR, 2)] * 3)] == [(ACK, PLUGGED)] * 3


async def test_no_queue_interrupt_when_the_driver_suppresses_them(vmem: Vmem) -> None:
    d = vmem.driver
    d.ram.write_u16(d.avail_addr, VRING_AVAIL_F_NO_INTERRUPT)
    d.prepare(request(PLUG, BAR_ADDR, 1))
    d.publish()
    await d.kick()
    await vmem.sync()
    assert [length for _, length in d.take_used()] == [10]
    assert not d.queue_irq.pending()
    d.ram.write_u16(d.avail_addr, 0)
    assert await d.state(BAR_ADDR, 1) == (ACK, PLUGGED)  # waits for the interrupt


async def test_unplug_all(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=512 * MiB)
    d, model = v.driver, v.server.model
    assert await d.plug(BAR_ADDR, 4) == ACK
    assert await d.plug(BAR_ADDR + 100 * BLOCK, 3) == ACK
    bar = await v.memory_bar()
    bar.fill(0, 4 * BLOCK, 0x11)
    bar.fill(100 * BLOCK, 3 * BLOCK, 0x22)
    assert bar.allocated() >= 7 * BLOCK
    # Lower the request: usable_region_size does not shrink on resize...
    model.set_requested_size(64 * MiB)
    await d.config_irq.wait(TIMEOUT)
    assert (await d.read_config()).usable_region_size == usable_size(512 * MiB, 1 * GiB, BLOCK)
    # ...but on UNPLUG_ALL, with a config interrupt.
    assert await d.unplug_all() == ACK
    cfg = await d.read_config()
    assert cfg.plugged_size == 0 and model.plugged_size == 0
    assert cfg.usable_region_size == usable_size(64 * MiB, 1 * GiB, BLOCK)
    assert d.config_irq.pending()
    await v.discarded()
    assert bar.allocated() == 0
    assert bar.pread(0, 4096) == bytes(4096) and bar.pread(100 * BLOCK, 4096) == bytes(4096)
    assert await d.state(BAR_ADDR, 128) == (ACK, UNPLUGGED)
    # UNPLUG_ALL with nothing plugged: ACK, and no interrupt when nothing changed.
    assert await d.unplug_all() == ACK
    assert not d.config_irq.pending()


# ---------------------------------------------------------------------------
# config changes


async def test_config_interrupt_when_requested_size_changes(vmem_factory: VmemFactory) -> None:
    region = 1 * GiB
    v = await vmem_factory.start(size=region, requested=0)
    d, model = v.driver, v.server.model
    assert (await d.read_config()).usable_region_size == 0
    assert await d.isr() == 0

    gen = await d.config_generation()
    model.set_requested_size(512 * MiB)
    await d.config_irq.wait(TIMEOUT)
    assert await d.isr() & 2  # the config bit; read to clear
    assert await d.isr() == 0
    assert await d.config_generation() != gen
    cfg = await d.read_config()
    assert cfg.requested_size == 512 * MiB
    assert cfg.usable_region_size == usable_size(512 * MiB, region, BLOCK) == 768 * MiB

    # Shrinking the request: an interrupt, usable_region_size stays.
    model.set_requested_size(128 * MiB)
    await d.config_irq.wait(TIMEOUT)
    cfg = await d.read_config()
    assert (cfg.requested_size, cfg.usable_region_size) == (128 * MiB, 768 * MiB)

    # The same value again: an interrupt all the same, as QEMU's
    # virtio_mem_set_requested_size (the operator's nudge after a BUSY).
    model.set_requested_size(128 * MiB)
    await d.config_irq.wait(TIMEOUT)
    cfg = await d.read_config()
    assert (cfg.requested_size, cfg.usable_region_size) == (128 * MiB, 768 * MiB)

    # Capped at the region size.
    model.set_requested_size(region)
    await d.config_irq.wait(TIMEOUT)
    cfg = await d.read_config()
    assert (cfg.requested_size, cfg.usable_region_size) == (region, region)
    # Plugging changes plugged_size without a config interrupt.
    assert await d.plug(BAR_ADDR + region - BLOCK, 1) == ACK
    assert not d.config_irq.pending()


async def test_usable_region_rounds_up_to_the_block_size(vmem_factory: VmemFactory) -> None:
    block = 512 * MiB
    region = 2 * GiB
    v = await vmem_factory.start(size=region, block_size=block, requested=block)
    d, model = v.driver, v.server.model
    cfg = await d.read_config()
    assert cfg.block_size == block
    # 512 MiB + 256 MiB = 768 MiB, rounded up to 1 GiB.
    assert cfg.usable_region_size == usable_size(block, region, block) == 1 * GiB
    model.set_requested_size(3 * block)
    await d.config_irq.wait(TIMEOUT)
    assert (await d.read_config()).usable_region_size == region
    assert await d.plug(BAR_ADDR + 3 * block, 1) == ACK


async def test_no_config_interrupt_before_driver_ok(vmem_factory: VmemFactory) -> None:
    """As QEMU's virtio_notify_config: the generation changes, the interrupt
    waits for DRIVER_OK (the vectors are set up before it, as Linux does)."""
    v = await vmem_factory.start(initialize=False)
    d = v.driver
    await d.probe_pci()
    await d.setup_pci()
    await d.map_ram()
    await d.start_virtio(driver_ok=False)
    gen = await d.config_generation()
    v.server.model.set_requested_size(64 * MiB)
    assert not d.config_irq.pending()
    assert await d.config_generation() != gen
    await d.set_driver_ok()
    assert (await d.read_config()).requested_size == 64 * MiB
    v.server.model.set_requested_size(128 * MiB)
    await d.config_irq.wait(TIMEOUT)


# ---------------------------------------------------------------------------
# memory: discard, slow path, resets


async def test_unplug_discards_memory_seen_through_the_bar_fd(vmem: Vmem) -> None:
    d = vmem.driver
    bar = await vmem.memory_bar()
    assert bar.allocated() == 0
    assert await d.plug(BAR_ADDR + 10 * BLOCK, 2) == ACK
    assert bar.allocated() == 0  # plug is lazy
    bar.fill(10 * BLOCK, BLOCK, 0xA5)
    bar.fill(11 * BLOCK, BLOCK, 0x5A)
    full = bar.allocated()
    assert full >= 2 * BLOCK
    # The slow path (REGION_READ of BAR2) sees the same memory.
    assert await vmem.client.bar_read(BAR2, 10 * BLOCK + 100, 4) == b"\xa5" * 4

    assert await d.unplug(BAR_ADDR + 10 * BLOCK, 1) == ACK
    await vmem.discarded()
    assert full - bar.allocated() >= BLOCK
    assert bar.pread(10 * BLOCK, BLOCK) == bytes(BLOCK)
    assert bar.pread(11 * BLOCK, 4096) == b"\x5a" * 4096  # the neighbour is untouched
    assert await d.unplug(BAR_ADDR + 11 * BLOCK, 1) == ACK
    await vmem.discarded()
    assert bar.allocated() == 0
    assert bar.pread(11 * BLOCK, BLOCK) == bytes(BLOCK)


async def _until(predicate, what: str) -> None:
    """Until ``predicate()`` holds (state changed by a worker thread)."""
    with trio.move_on_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.001)
        return
    pytest.fail(f"timed out waiting for {what}")


async def test_a_failure_on_the_host_side_answers_busy_and_the_device_carries_on(
        vmem: Vmem, caplog: pytest.LogCaptureFixture) -> None:
    # A bug in what serves a request (here the step that claims a range from
    # the discard queue before a PLUG) must not escape the request path: the
    # guest gets BUSY (never ERROR, which marks its device broken), nothing
    # changes, and the next request is served.
    d, model = vmem.driver, vmem.server.model
    host = model.host_memory  # the DeviceServer

    def broken_claim(offset: int, length: int) -> None:
        raise RuntimeError("claim failed")

    host.claim, host.claim_due = broken_claim, lambda: True  # PLUGs go to Python
    await vmem.sync()  # the C paths are armed again after a message: now without PLUGs
    try:
        with caplog.at_level(logging.ERROR):
            assert await d.plug(BAR_ADDR, 1) == BUSY
        assert "claim failed" in caplog.text and "answered BUSY" in caplog.text
        assert model.plugged_size == 0
        assert not await d.status() & STATUS_NEEDS_RESET
    finally:
        del host.claim, host.claim_due
    assert await d.plug(BAR_ADDR, 1) == ACK
    await vmem.assert_alive()


async def test_failed_discards_make_unplug_busy_until_they_are_retried(vmem: Vmem) -> None:
    """UNPLUG is answered before its memory goes back (discard.py).  When
    that discard fails the range is kept for a retry, new UNPLUGs are
    answered BUSY (never ERROR) meanwhile, and nothing plugged is lost."""
    d, server = vmem.driver, vmem.server
    bar = await vmem.memory_bar()
    server.discards.retry_initial_s = 3600  # retried only when the test says so
    assert await d.plug(BAR_ADDR, 4) == ACK
    bar.fill(0, 4 * BLOCK, 0x77)
    server.fail_discards = 1000
    assert await d.unplug(BAR_ADDR, 1) == ACK
    await _until(lambda: server.discards.failure is not None, "the discard to fail")
    assert server.discards.pending_bytes == BLOCK
    assert await d.unplug(BAR_ADDR + BLOCK, 1) == BUSY
    assert await d.unplug_all() == BUSY
    assert server.model.plugged_size == 3 * BLOCK
    assert bar.pread(BLOCK, 3 * BLOCK) == b"\x77" * 3 * BLOCK
    # The host recovers: the retry gives the memory back, UNPLUG works again.
    server.fail_discards = 0
    server.discards.retry_now()
    await vmem.discarded()
    assert server.discards.failure is None
    assert bar.pread(0, BLOCK) == bytes(BLOCK)
    assert await d.unplug(BAR_ADDR + BLOCK, 1) == ACK
    await vmem.discarded()
    assert bar.pread(BLOCK, BLOCK) == bytes(BLOCK)
    assert bar.pread(2 * BLOCK, 2 * BLOCK) == b"\x77" * 2 * BLOCK


async def test_a_block_plugged_again_keeps_what_the_guest_writes(vmem: Vmem) -> None:
    """A PLUG of a range whose discard is still queued takes it out of the
    queue: the guest's new data survives (discard.py, claim)."""
    d, server = vmem.driver, vmem.server
    bar = await vmem.memory_bar()
    server.discards.retry_initial_s = 3600
    assert await d.plug(BAR_ADDR, 2) == ACK
    bar.fill(0, 2 * BLOCK, 0x11)
    server.fail_discards = 1000  # keeps the discard queued
    assert await d.unplug(BAR_ADDR, 2) == ACK
    await _until(lambda: server.discards.failure is not None, "the discard to fail")
    assert await d.plug(BAR_ADDR, 2) == ACK
    assert server.discards.failure is None and server.discards.pending_bytes == 0
    bar.fill(0, 2 * BLOCK, 0x22)
    server.fail_discards = 0
    assert await d.plug(BAR_ADDR + 8 * BLOCK, 1) == ACK
    assert await d.unplug(BAR_ADDR + 8 * BLOCK, 1) == ACK  # not BUSY: the failure is over
    await vmem.discarded()
    assert bar.pread(0, 2 * BLOCK) == b"\x22" * 2 * BLOCK


async def test_bar_slow_path_writes_only_plugged_memory(vmem_factory: VmemFactory) -> None:
    size = 64 * MiB  # in a 128 MiB BAR
    v = await vmem_factory.start(size=size, requested=size)
    c, d = v.client, v.driver
    bar = await v.memory_bar()
    with pytest.raises(VfioUserError) as exc:
        await c.bar_write(BAR2, 3 * BLOCK, b"\x01" * 64)
    assert exc.value.errno == errno.EINVAL
    assert bar.allocated() == 0
    assert await d.plug(BAR_ADDR + 3 * BLOCK, 1) == ACK
    await c.bar_write(BAR2, 3 * BLOCK + 8, b"\x01\x02\x03\x04")
    assert bar.map[3 * BLOCK + 8:3 * BLOCK + 12] == b"\x01\x02\x03\x04"
    # A write straddling into an unplugged block is refused as a whole.
    with pytest.raises(VfioUserError):
        await c.bar_write(BAR2, 4 * BLOCK - 4, b"\xff" * 8)
    assert bar.map[4 * BLOCK - 4:4 * BLOCK] == bytes(4)
    # Beyond the device's size, inside the BAR (not mmap-able, not host
    # memory): reads as zeros, writes are dropped, the client carries on.
    before = bar.allocated()
    assert await c.bar_read(BAR2, size + 4096, 16) == bytes(16)
    await c.bar_write(BAR2, size + 4096, b"\x01" * 64)
    assert await c.bar_read(BAR2, size + 4096, 64) == bytes(64)
    assert os.fstat(bar.fd).st_size == size and bar.allocated() == before
    # Straddling the end: the part inside is plugged memory and is written.
    assert await d.plug(BAR_ADDR + size - BLOCK, 1) == ACK
    await c.bar_write(BAR2, size - 4, b"\x05" * 8)
    assert bar.map[size - 4:size] == b"\x05" * 4
    assert await c.bar_read(BAR2, size - 4, 8) == b"\x05" * 4 + bytes(4)


async def test_device_reset_unplugs_and_discards(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=512 * MiB)
    c, d, model = v.client, v.driver, v.server.model
    bar = await v.memory_bar()
    assert await d.plug(BAR_ADDR, 8) == ACK
    bar.fill(0, 8 * BLOCK, 0x77)
    assert bar.allocated() >= 8 * BLOCK
    model.set_requested_size(64 * MiB)
    await d.config_irq.wait(TIMEOUT)

    await c.reset()
    assert model.plugged_size == 0
    await v.discarded()
    assert bar.allocated() == 0
    assert bar.pread(0, 4096) == bytes(4096)
    assert await d.status() == 0
    assert not await d.msix_enabled()  # a PCI reset clears MSI-X enable
    # usable_region_size shrinks on system reset; requested_size stays.
    assert (model.requested_size, model.usable_region_size) == (64 * MiB, usable_size(64 * MiB, 1 * GiB, BLOCK))
    await c.reset()  # QEMU sometimes sends two: idempotent
    assert model.plugged_size == 0

    # The guest boots again: the driver starts from PCI setup.
    await d.setup_pci()
    await d.start_virtio()
    cfg = await d.read_config()
    assert (cfg.plugged_size, cfg.requested_size, cfg.usable_region_size) == (0, 64 * MiB, 320 * MiB)
    assert await d.state(BAR_ADDR, 8) == (ACK, UNPLUGGED)
    assert await d.plug(BAR_ADDR, 8) == ACK


async def test_virtio_reset_keeps_block_state(vmem: Vmem) -> None:
    d = vmem.driver
    bar = await vmem.memory_bar()
    assert await d.plug(BAR_ADDR + 4 * BLOCK, 2) == ACK
    bar.fill(4 * BLOCK, 2 * BLOCK, 0x33)
    await d.reset_virtio()  # the driver reloads
    await d.start_virtio()
    assert (await d.read_config()).plugged_size == 2 * BLOCK
    assert await d.state(BAR_ADDR + 4 * BLOCK, 2) == (ACK, PLUGGED)
    assert bar.pread(5 * BLOCK, 8) == b"\x33" * 8


async def test_memory_goes_back_after_a_disconnect_with_no_next_client(vmem: Vmem) -> None:
    """The lost-connection reset queues the discard of everything; the
    worker must run although no further message (no next QEMU) comes."""
    d, server = vmem.driver, vmem.server
    bar = await vmem.memory_bar()
    assert await d.plug(BAR_ADDR, 4) == ACK
    bar.fill(0, 4 * BLOCK, 0x45)
    vmem.client.close()
    await _until(lambda: not server.connected, "the server to see the client go")
    await vmem.discarded()
    assert server.model.plugged_size == 0
    assert bar.allocated() == 0


async def test_client_disconnect_unplugs_and_a_second_client_plugs(vmem: Vmem) -> None:
    d, model, server = vmem.driver, vmem.server.model, vmem.server
    bar = await vmem.memory_bar()
    assert await d.plug(BAR_ADDR, 4) == ACK
    bar.fill(0, 4 * BLOCK, 0x44)
    assert bar.allocated() >= 4 * BLOCK
    vmem.client.close()

    # The server handles the first client's end before it answers the second
    # client's VERSION: by then everything is unplugged and discarded.
    client2 = await vmem.connect()
    # The handshake runs in a worker thread; a first reply means the
    # server's loop has taken the new client on.
    await client2.device_info()
    assert server.clients_total == 2 and server.connected
    assert model.plugged_size == 0
    await vmem.discarded()
    assert bar.allocated() == 0
    assert len(server.transport.memory) == 0  # the old DMA mappings are gone

    d2 = vmem.new_driver(client2)
    await d2.initialize()
    assert (await d2.read_config()).plugged_size == 0
    assert await d2.state(BAR_ADDR, 4) == (ACK, UNPLUGGED)
    assert await d2.plug(BAR_ADDR + 2 * BLOCK, 2) == ACK
    assert await d2.state(BAR_ADDR + 2 * BLOCK, 2) == (ACK, PLUGGED)


# ---------------------------------------------------------------------------
# broken chains and unreachable buffers: DEVICE_NEEDS_RESET, never a crash


def _post_malformed(d: VirtioMemDriver, kind: str) -> None:
    slot = d.slot_addr(d._take_slot())
    if kind == "short-response":
        d.ram.write(slot, request(PLUG, BAR_ADDR + 20 * BLOCK, 1))
        d.post(Chain([(slot, 24)], [(slot + 32, 8)]))
    elif kind == "no-response":
        d.ram.write(slot, request(PLUG, BAR_ADDR + 20 * BLOCK, 1))
        d.post(Chain([(slot, 24)], []))
    elif kind == "short-request":
        d.ram.write(slot, request(PLUG, BAR_ADDR + 20 * BLOCK, 1))
        d.post(Chain([(slot, 16)], [(slot + 32, 10)]))
    elif kind == "unknown-type":
        d.ram.write(slot, request(7, BAR_ADDR + 20 * BLOCK, 1))
        d.post(Chain([(slot, 24)], [(slot + 32, 10)]))
    else:  # pragma: no cover
        raise AssertionError(kind)
    d.publish()


@pytest.mark.parametrize("kind", ["short-response", "no-response", "short-request", "unknown-type"])
async def test_malformed_chain_sets_needs_reset(vmem: Vmem, kind: str) -> None:
    d, model = vmem.driver, vmem.server.model
    assert await d.plug(BAR_ADDR, 2) == ACK
    used_before = d.used_idx()

    _post_malformed(d, kind)
    await d.kick()
    await d.config_irq.wait(TIMEOUT)  # the device tells the driver
    assert await d.status() & STATUS_NEEDS_RESET
    assert d.used_idx() == used_before
    assert model.plugged_size == 2 * BLOCK
    assert model.bitmap.range_state(20, 1) == UNPLUGGED

    # The queue is stopped: a valid request is not processed until a reset.
    d.prepare(request(PLUG, BAR_ADDR + 30 * BLOCK, 1))
    d.publish()
    await d.kick()
    await vmem.sync()
    assert d.used_idx() == used_before
    assert model.plugged_size == 2 * BLOCK
    await vmem.assert_alive()

    # A virtio reset recovers; the block state survived.
    await d.start_virtio()
    assert not await d.status() & STATUS_NEEDS_RESET
    assert await d.state(BAR_ADDR, 2) == (ACK, PLUGGED)
    assert await d.plug(BAR_ADDR + 30 * BLOCK, 1) == ACK


async def test_buffer_in_memory_mapped_without_fd(vmem: Vmem, caplog: pytest.LogCaptureFixture) -> None:
    """Guest RAM without share=on: QEMU maps it without an fd.  Mapping it is
    no error (QEMU maps ROMs and other processes' BARs the same way); a
    request there breaks the queue only, with a message naming share=on."""
    d = vmem.driver
    iova = 0x1_0000_0000
    with caplog.at_level(logging.ERROR):
        await vmem.client.dma_map_no_fd(iova, 1 * MiB, DMA_RW)
        assert not caplog.records
        assert await d.plug(BAR_ADDR, 1) == ACK
        d.post(Chain([(iova, 24)], [(d.slot_addr(0) + 32, 10)]))
        d.publish()
        await d.kick()
        await d.config_irq.wait(TIMEOUT)
        assert await d.status() & STATUS_NEEDS_RESET
    assert any("share=on" in r.getMessage() for r in caplog.records)
    await vmem.assert_alive()
    await vmem.client.dma_unmap(iova, 1 * MiB)
    await d.start_virtio()
    assert await d.state(BAR_ADDR, 1) == (ACK, PLUGGED)


async def test_ring_unmapped_under_the_device(vmem: Vmem) -> None:
    d = vmem.driver
    await vmem.client.dma_unmap(d.ram.iova, d.ram.size)
    d.prepare(request(PLUG, BAR_ADDR, 1))
    d.publish()
    await d.kick()
    await d.config_irq.wait(TIMEOUT)
    assert await d.status() & STATUS_NEEDS_RESET
    assert vmem.server.model.plugged_size == 0
    await d.map_ram()
    await d.start_virtio()
    assert await d.plug(BAR_ADDR, 1) == ACK


async def test_buffers_in_plugged_device_memory(vmem: Vmem) -> None:
    """QEMU DMA-maps the device's own BAR back without an fd; buffers that
    lie in plugged memory are reached through the server's own mapping."""
    d = vmem.driver
    bar = await vmem.memory_bar()
    bar_size = bar.size
    await vmem.client.dma_map_no_fd(BAR_ADDR, bar_size, DMA_RW)
    assert await d.plug(BAR_ADDR + 50 * BLOCK, 1) == ACK
    req_off = 50 * BLOCK + 4096
    bar.map[req_off:req_off + 24] = request(STATE, BAR_ADDR + 50 * BLOCK, 2)
    bar.map[req_off + 64:req_off + 74] = b"\xee" * 10
    head = d.post(Chain([(BAR_ADDR + req_off, 24)], [(BAR_ADDR + req_off + 64, 10)]))
    d.publish()
    await d.kick()
    assert await d.wait_used(1) == [(head, 10)]
    assert response(bytes(bar.map[req_off + 64:req_off + 74])) == (ACK, MIXED)
    # QEMU unmaps it on a memory-decode toggle; the queue keeps working.
    await vmem.client.dma_unmap(BAR_ADDR, bar_size)
    assert await d.state(BAR_ADDR + 50 * BLOCK, 1) == (ACK, PLUGGED)


# ---------------------------------------------------------------------------
# bad vfio-user requests


async def test_bad_vfio_user_requests_are_refused(vmem: Vmem) -> None:
    c, d = vmem.client, vmem.driver

    async def refused(coro, err: int = errno.EINVAL) -> None:
        with pytest.raises(VfioUserError) as exc:
            await coro
        assert exc.value.errno == err
        await vmem.assert_alive()

    await refused(c.request(99))  # unknown command
    await refused(c.region_read(CONFIG_REGION, 250, 8))  # beyond config space
    await refused(c.region_read(12, 0, 4))  # no such region
    await refused(c.region_read(BAR0, 0x3800, 4))  # no register there
    await refused(c.bar_write(BAR0, d.caps[VIRTIO_PCI_CAP_DEVICE_CFG].offset, b"\0" * 8))  # read-only config
    await refused(c.bar_write(BAR0, d.caps[VIRTIO_PCI_CAP_ISR_CFG].offset, b"\0"))  # read-only ISR
    await refused(c.region_info(42))
    await refused(c.irq_info(9))
    await refused(c.set_irqs(MSIX_IRQ, 0, 2, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                             [d.config_irq.fd]))  # one fd for two vectors
    await refused(c.set_irqs(MSIX_IRQ, 1, 2, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                             [d.config_irq.fd, d.queue_irq.fd]))  # beyond the vectors
    # The device still works after all that.
    assert await d.plug(BAR_ADDR, 1) == ACK
    assert await d.state(BAR_ADDR, 1) == (ACK, PLUGGED)


# ---------------------------------------------------------------------------
# clients that misbehave at the vfio-user level: the server must survive them


async def test_client_closing_before_version_does_not_stop_the_server(vmem_factory: VmemFactory) -> None:
    import socket

    v = await vmem_factory.start(initialize=False, record_crash=True)
    v.client.close()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(v.path)  # e.g. claim_socket_path() of a second instance
    probe.close()
    await v.assert_not_crashed()
    client = await v.connect()
    assert (await client.device_info()).num_regions > CONFIG_REGION


async def test_bad_version_does_not_stop_the_server(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(initialize=False, record_crash=True)
    v.client.close()
    with pytest.raises(VfioUserError) as exc:
        with trio.fail_after(TIMEOUT):
            await VfioUserClient.connect(v.path, major=7)
    assert exc.value.errno == errno.EINVAL
    await v.assert_not_crashed()
    client = await v.connect()
    assert (await client.device_info()).num_regions > CONFIG_REGION


async def test_interrupt_without_eventfd_does_not_stop_the_server(
        vmem_factory: VmemFactory, caplog: pytest.LogCaptureFixture) -> None:
    v = await vmem_factory.start(initialize=False, record_crash=True)
    d = v.driver
    await d.probe_pci()
    await d.setup_pci(eventfds=False)  # MSI-X enabled, no eventfds given (yet)
    await d.map_ram()
    await d.start_virtio()
    d.prepare(request(PLUG, BAR_ADDR, 1))
    d.publish()
    await d.kick()
    await v.assert_not_crashed()
    await v.sync()
    assert v.server.model.plugged_size == BLOCK
    assert [length for _, length in d.take_used()] == [10]
    # Raised inside the notify write (C) and reported once by the server.
    assert caplog.text.count("MSI-X vector 1 could not be triggered: [Errno 2] vfu_irq_trigger(1)") == 1


async def test_silent_client_does_not_hold_the_server(vmem_factory: VmemFactory) -> None:
    """A client that connects and never sends VERSION is dropped after the
    negotiation timeout (libvfio-user patch 0005), and meanwhile the trio
    thread stays free (the attach runs in a worker thread)."""
    import socket

    v = await vmem_factory.start(initialize=False, record_crash=True)
    v.client.close()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.setblocking(False)
    try:
        try:
            silent.connect(v.path)
        except BlockingIOError:
            pass
        # The trio loop is not blocked: a checkpoint round-trips at once.
        with trio.fail_after(1):
            await trio.sleep(0)
            await trio.testing.wait_all_tasks_blocked()
        await v.assert_not_crashed()
        # After the 5 s negotiation timeout the silent client is refused and
        # a real one attaches.
        with trio.fail_after(TIMEOUT + 6):
            client = await VfioUserClient.connect(v.path)
        try:
            assert (await client.device_info()).num_regions > CONFIG_REGION
        finally:
            client.close()
        await v.assert_not_crashed()
    finally:
        silent.close()


async def test_libvfio_user_translation_matches_the_guest_ram(vmem: Vmem) -> None:
    """VfuContext.dma_view (vfu_addr_to_sgl + vfu_sgl_get) sees the same bytes
    as the client's own memfd, and refuses what is not mapped."""
    from vfiouser_vmem.vfio_user._context import VfuError

    ram = vmem.driver.ram
    at = ram.iova + ram.size - 0x1000  # past the rings and request buffers
    ram.write(at, b"translated by libvfio-user")
    view = vmem.server.ctx.dma_view(at, 26)
    assert bytes(view) == b"translated by libvfio-user"
    view[:4] = b"TRAN"
    assert ram.read(at, 4) == b"TRAN"
    with pytest.raises(VfuError):
        vmem.server.ctx.dma_view(0x7000_0000_0000, 16)


async def test_virtqueue_in_unshared_guest_ram_is_refused_at_driver_ok(
        vmem: Vmem, caplog: pytest.LogCaptureFixture) -> None:
    """The driver's rings in RAM mapped without an fd (QEMU without
    share=on): the device refuses at DRIVER_OK with a message naming
    share=on, before any request, and the plugged state is untouched."""
    d = vmem.driver
    assert await d.plug(BAR_ADDR, 1) == ACK
    await vmem.client.dma_unmap(d.ram.iova, d.ram.size)
    await vmem.client.dma_map_no_fd(d.ram.iova, d.ram.size, DMA_RW)
    with caplog.at_level(logging.ERROR):
        await d.start_virtio()
        assert await d.status() & STATUS_NEEDS_RESET
    assert any("share=on" in r.getMessage() and "virtqueue is unreachable" in r.getMessage()
               for r in caplog.records)
    assert vmem.server.model.plugged_size == BLOCK
    await vmem.assert_alive()


async def test_bar_moved_and_decode_toggled_with_memory_plugged(vmem: Vmem) -> None:
    """Decision: block state is relative to the device region, not to a
    guest address.  Moving the BAR or turning memory decode off and on
    (QEMU does it 6 times during enumeration) loses nothing: the blocks
    stay plugged, their data stays, and requests follow the new address."""
    d, c = vmem.driver, vmem.client
    bar = await vmem.memory_bar()
    assert await d.plug(BAR_ADDR + 3 * BLOCK, 2) == ACK
    bar.fill(3 * BLOCK, 2 * BLOCK, 0x5A)
    command = await c.config_read_int(PCI_COMMAND, 2)
    await c.config_write_int(PCI_COMMAND, 2, command & ~PCI_COMMAND_MEMORY)
    new_addr = 0x20_0000_0000
    await d.write_bar_addr(new_addr)
    await c.config_write_int(PCI_COMMAND, 2, command)
    assert (await d.read_config()).addr == new_addr
    assert (await d.read_config()).plugged_size == 2 * BLOCK
    assert await d.state(new_addr + 3 * BLOCK, 2) == (ACK, PLUGGED)
    assert await d.state(BAR_ADDR + 3 * BLOCK, 2) == (ERROR, 0)  # the old address is outside now
    assert bar.pread(3 * BLOCK, 16) == b"\x5a" * 16
    assert await d.unplug(new_addr + 3 * BLOCK, 2) == ACK
    await vmem.discarded()
    assert bar.allocated() == 0


async def test_requested_size_drops_while_requests_are_in_flight(vmem_factory: VmemFactory) -> None:
    """PLUGs queued before requested_size dropped are checked against the
    size requested when the device handles them: the ones that no longer
    fit are NACKed, the others ACKed, and the config interrupt tells the
    driver."""
    v = await vmem_factory.start(requested=8 * BLOCK)
    d = v.driver
    response_addrs = [d.prepare(request(PLUG, BAR_ADDR + 2 * i * BLOCK, 2))[1] for i in range(4)]
    d.publish()
    v.server.model.set_requested_size(4 * BLOCK)  # while the four PLUGs are queued
    await d.config_irq.wait(TIMEOUT)
    await d.kick()
    used = await d.wait_used(4)
    responses = [d.ram.read(addr, 2) for addr in response_addrs]
    assert len(used) == 4
    codes = [int.from_bytes(r, "little") for r in responses]
    assert codes == [ACK, ACK, NACK, NACK], codes
    assert v.server.model.plugged_size == 4 * BLOCK


async def test_connection_log_names_the_client_pid(vmem_factory: VmemFactory,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vfiouser_vmem.server"):
        v = await vmem_factory.start()
        await v.sync()
    # The test client lives in this process: the server names its PID and
    # user (SO_PEERCRED).
    who = f"pid {os.getpid()}, uid {os.geteuid()}, gid {os.getegid()}"
    assert any(f"client 1 ({who}) connected" in r.getMessage() for r in caplog.records)
