"""virtio 1.x modern PCI transport (virtio spec 4.1) of a ``VirtioDevice``.

BAR layout (docs/design.md, "Memory through the BAR"):

- BAR0 (32-bit memory, 16 KiB, trapped): the virtio structures the vendor
  capabilities point at: common config, ISR, device config, notify.
- BAR1 (32-bit memory, 4 KiB, trapped): the MSI-X table and PBA.  QEMU
  emulates the table itself; it reads the PBA from the device.
- BAR2/3 (64-bit prefetchable memory, mmap-able): the device memory, backed
  by the server's memory backend; a power of two >= max(device memory, 128 MiB).

The device type is behind ``VirtioDevice`` (``_device.py``): nothing here
names one.

Queue work never runs in a region callback: a notify write only records the
kick (an mmap-able region turns off QEMU's posted writes, so the vCPU waits
for the reply); ``process_queue()`` runs after ``VfuContext.run()``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from vfiouser_vmem.errors import DriverError, GuestMemoryError, QueueError
from vfiouser_vmem.util.sizes import format_size
from vfiouser_vmem.virtio._device import NativeConfigReads, ServeResult, VirtioDevice
from vfiouser_vmem.virtio._virtqueue import GuestMemory, SplitQueue

log = logging.getLogger("vfiouser_vmem.virtio_pci")

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
# Modern virtio PCI devices: 0x1040 + the virtio device id (spec 4.1.2.1).
PCI_DEVICE_ID_VIRTIO_BASE = 0x1040
PCI_SUBSYSTEM_ID_QEMU = 0x1100
PCI_CLASS_OTHERS = 0xFF
# Non-transitional devices SHOULD have revision >= 1 (virtio spec 4.1.2.1).
PCI_REVISION_MODERN = 1

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
VIRTIO_MSI_NO_VECTOR = 0xFFFF

BAR0_SIZE = 0x4000
COMMON_CFG_OFFSET, COMMON_CFG_SIZE = 0x0000, 0x40
ISR_OFFSET, ISR_SIZE = 0x1000, 0x4
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER = 0x3000, 4
BAR1_SIZE = 0x1000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x000, 0x800
MSIX_VECTORS = 2  # config changes, the one virtqueue
QUEUE_MAX_SIZE = 128
NUM_QUEUES = 1
MIN_MEMORY_BAR_BYTES = 128 << 20


def pci_device_id(device: VirtioDevice) -> int:
    return PCI_DEVICE_ID_VIRTIO_BASE + device.device_id


def memory_bar_size(region_size_bytes: int) -> int:
    """A power of two >= max(device size, 128 MiB) (docs/design.md, "Memory through the BAR")."""
    size = MIN_MEMORY_BAR_BYTES
    while size < region_size_bytes:
        size <<= 1
    return size


def virtio_pci_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap (16 bytes; the notify cap adds a u32)."""
    return struct.pack("<BBBBBBxxII", PCI_CAP_ID_VNDR, 0, 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


def msix_cap(vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> bytes:
    return struct.pack(
        "<BBHII", PCI_CAP_ID_MSIX, 0, vectors - 1, table_offset | table_bar, pba_offset | pba_bar
    )


# Common configuration (virtio spec 4.1.4.3): name -> (offset, size)
_COMMON = {
    "device_feature_select": (0x00, 4),
    "device_feature": (0x04, 4),
    "driver_feature_select": (0x08, 4),
    "driver_feature": (0x0C, 4),
    "config_msix_vector": (0x10, 2),
    "num_queues": (0x12, 2),
    "device_status": (0x14, 1),
    "config_generation": (0x15, 1),
    "queue_select": (0x16, 2),
    "queue_size": (0x18, 2),
    "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2),
    "queue_desc_lo": (0x20, 4),
    "queue_desc_hi": (0x24, 4),
    "queue_driver_lo": (0x28, 4),
    "queue_driver_hi": (0x2C, 4),
    "queue_device_lo": (0x30, 4),
    "queue_device_hi": (0x34, 4),
}
_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


class _Generation:
    """The home of ``config_generation`` for a device without a C answer to
    its configuration reads."""

    config_generation = 0


class VirtioPciTransport:
    """The virtio-pci function state of one device (everything but the
    vfio-user plumbing, which the server wires to it).

    ``config_generation`` lives in the device's C answer to configuration
    reads when it has one (``VirtioDevice.native_config_reads``).

    ``config_space`` is the PCI config space (libvfio-user's copy), read for
    the BAR address and the MSI-X enable bit; ``trigger(vector)`` raises an
    MSI-X interrupt.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        config_space: Callable[[], memoryview],
        trigger: Callable[[int], None],
        memory_bar_index: int = 2,
        msix_cap_offset: int | None = None,
        name: str = "virtio0",
    ) -> None:
        self.device = device
        self.name = name
        self._config_reads = device.native_config_reads(
            DEVICE_CFG_OFFSET, COMMON_CFG_OFFSET + _COMMON["config_generation"][0])
        self._generation_home: NativeConfigReads | _Generation = self._config_reads or _Generation()
        #: The memory BAR's guest address as last read (refresh_addr).
        self.memory_addr = 0
        self.config_space = config_space
        self.trigger = trigger
        self.memory_bar_index = memory_bar_index
        self.msix_cap_offset = msix_cap_offset
        self.memory = GuestMemory()
        self.queue = SplitQueue(QUEUE_MAX_SIZE)
        self.kick_pending = False
        self.broken_reason: str | None = None
        self.hold_requests = False
        #: The device's handler of the queue's requests, and its request
        #: path in C if it has one.
        self.handler = device.queue_handler(self.queue, self.memory)
        #: Serve what it can through the device's request path in C;
        #: False: every request goes through Python (tests compare the two).
        self.serve_in_c = self.handler.native is not None
        # Requests served inside a notify write that stopped for Python:
        # process_queue counts them when it decides on the interrupt.
        self._notify_served_pending = 0
        device.set_config_notifier(self.notify_config)
        self.virtio_reset()

    @property
    def config_generation(self) -> int:
        return self._generation_home.config_generation

    @config_generation.setter
    def config_generation(self, value: int) -> None:
        self._generation_home.config_generation = value

    # -- state ---------------------------------------------------------
    def virtio_reset(self) -> None:
        """Driver-initiated reset (device_status <- 0): the transport's state;
        what the device keeps is its own business (``VirtioDevice.virtio_reset``)."""
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.status = 0
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self.queue.reset()
        self.kick_pending = False
        self._notify_served_pending = 0
        self.broken_reason = None
        self._warned_unassigned_bar = False
        # A fault stopped the old queue; the driver's new one may lie elsewhere.
        self.memory.c_memory.faulted = 0
        self.device.virtio_reset()

    def system_reset(self) -> None:
        """vfio-user DEVICE_RESET / lost connection: the device's system
        reset, then virtio's and the MSI-X enable bits' as a PCI reset does."""
        # Requests a notify write served but nobody booked (the connection
        # broke in the same vfu_run_ctx): the device's reset undoes them.
        if self.handler.native is not None:
            self.handler.native.drop_notify()
        try:
            self.device.system_reset()
        finally:
            self.virtio_reset()
            if self.msix_cap_offset is not None:
                cfg = self.config_space()
                ctrl_at = self.msix_cap_offset + 2
                ctrl = struct.unpack_from("<H", cfg, ctrl_at)[0]
                struct.pack_into("<H", cfg, ctrl_at, ctrl & ~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL))

    @property
    def memory_bar_addr(self) -> int:
        """The memory BAR's guest address, from the BAR registers QEMU wrote
        through to us (both dwords of the 64-bit BAR)."""
        cfg = self.config_space()
        lo, hi = struct.unpack_from("<II", cfg, PCI_BASE_ADDRESS_0 + 4 * self.memory_bar_index)
        return (hi << 32) | (lo & ~0xF)

    def refresh_addr(self) -> None:
        if self.device.memory_size:
            self.memory_addr = self.memory_bar_addr
            self.device.set_memory_address(self.memory_addr)

    def msix_enabled(self) -> bool:
        if self.msix_cap_offset is None:
            return False
        ctrl = struct.unpack_from("<H", self.config_space(), self.msix_cap_offset + 2)[0]
        return bool(ctrl & PCI_MSIX_FLAGS_ENABLE) and not ctrl & PCI_MSIX_FLAGS_MASKALL

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        self.isr |= isr_bit
        # Only MSI-X: with INTx QEMU disables the BAR mmap until EOI and the
        # guest soft-locks (docs/design.md, "Memory through the BAR").  Never trigger a vector the
        # guest did not enable: the eventfd could be something else.
        if vector != VIRTIO_MSI_NO_VECTOR and vector < MSIX_VECTORS and self.msix_enabled():
            try:
                self.trigger(vector)
            except OSError as exc:
                self.interrupt_lost(vector, exc)

    def interrupt_lost(self, vector: int, why: object) -> None:
        """The guest enabled MSI-X but the client gave no eventfd for the
        vector (here or in the C notify serve): the interrupt is lost, the
        device carries on."""
        log.warning("%s: MSI-X vector %d could not be triggered: %s", self.name, vector, why)

    def notify_config(self) -> None:
        """Config change: new generation and a config interrupt (QEMU's
        virtio_notify_config sends none before DRIVER_OK)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self._interrupt(self.config_msix_vector, 2)

    # -- BAR0 ------------------------------------------------------------
    def bar0_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        n = len(buf)
        if COMMON_CFG_OFFSET <= offset and offset + n <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            self._common_access(offset - COMMON_CFG_OFFSET, buf, is_write)
        elif ISR_OFFSET <= offset and offset + n <= ISR_OFFSET + ISR_SIZE:
            if is_write:
                raise PermissionError("the ISR status is read-only")
            data = bytes([self.isr]) + bytes(ISR_SIZE - 1)
            buf[:] = data[offset - ISR_OFFSET : offset - ISR_OFFSET + n]
            self.isr = 0  # read-to-clear (virtio spec 4.1.4.5)
        elif DEVICE_CFG_OFFSET <= offset and offset + n <= DEVICE_CFG_OFFSET + self.device.config_size:
            if is_write:
                raise PermissionError("the device configuration is read-only")
            self.refresh_addr()
            if self.device.memory_size and self.memory_addr == 0 and not self._warned_unassigned_bar:
                self._warned_unassigned_bar = True
                log.warning(
                    "%s: the driver reads the device config but the memory BAR (%s) has no guest address: "
                    "the guest could not place it (BARs above 256 GiB need a wider guest physical address "
                    "space, e.g. QEMU -cpu qemu64,phys-bits=46); the driver will fail to reserve the region",
                    self.name, format_size(memory_bar_size(self.device.memory_size)),
                )
            start = offset - DEVICE_CFG_OFFSET
            buf[:] = self.device.config_bytes()[start : start + n]
        elif NOTIFY_OFFSET <= offset and offset + n <= NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * NUM_QUEUES:
            if is_write:
                self.kick_pending = True
            else:
                buf[:] = bytes(n)
        else:
            raise ValueError(f"no register at BAR0 offset {offset:#x} (+{n})")

    def _common_regs(self) -> bytearray:
        q = self.queue
        regs = bytearray(COMMON_CFG_SIZE)
        features = self.device.features
        values = {
            "device_feature_select": self.device_feature_select,
            "device_feature": (features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
            if self.device_feature_select < 2
            else 0,
            "driver_feature_select": self.driver_feature_select,
            "driver_feature": (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2
            else 0,
            "config_msix_vector": self.config_msix_vector,
            "num_queues": NUM_QUEUES,
            "device_status": self.status,
            "config_generation": self.config_generation,
            "queue_select": self.queue_select,
        }
        if self.queue_select < NUM_QUEUES:
            values.update(
                queue_size=q.size,
                queue_msix_vector=q.msix_vector,
                queue_enable=int(q.enabled),
                queue_notify_off=0,
                queue_desc_lo=q.desc_addr & 0xFFFFFFFF,
                queue_desc_hi=q.desc_addr >> 32,
                queue_driver_lo=q.driver_addr & 0xFFFFFFFF,
                queue_driver_hi=q.driver_addr >> 32,
                queue_device_lo=q.device_addr & 0xFFFFFFFF,
                queue_device_hi=q.device_addr >> 32,
            )
        for name, value in values.items():
            off, size = _COMMON[name]
            struct.pack_into(_FMT[size], regs, off, value)
        return regs

    def _common_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        regs = self._common_regs()
        n = len(buf)
        if not is_write:
            buf[:] = regs[offset : offset + n]
            return
        regs[offset : offset + n] = buf
        for name, (off, size) in _COMMON.items():
            if off < offset + n and offset < off + size:
                self._common_write(name, struct.unpack_from(_FMT[size], regs, off)[0])

    def _common_write(self, name: str, value: int) -> None:
        q = self.queue
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                raise PermissionError("driver features written after FEATURES_OK")
            if self.driver_feature_select < 2:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "config_msix_vector":
            self.config_msix_vector = value if value < MSIX_VECTORS else VIRTIO_MSI_NO_VECTOR
        elif name == "device_status":
            self._write_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif self.queue_select >= NUM_QUEUES:
            if name.startswith("queue_"):
                log.info("%s: write to %s of queue %d, which does not exist: ignored",
                         self.name, name, self.queue_select)
        elif name == "queue_size":
            # The driver may make the queue smaller, to a power of two
            # (split queues, virtio spec 2.7).
            if value == 0 or value > q.max_size or value & (value - 1):
                log.warning("%s: queue size %d refused (max %d, power of two)", self.name, value, q.max_size)
            else:
                q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = value if value < MSIX_VECTORS else VIRTIO_MSI_NO_VECTOR
        elif name == "queue_enable":
            if value == 1:
                q.enabled = True
        elif name.startswith("queue_") and name.endswith(("_lo", "_hi")):
            attr = name[len("queue_") : -3] + "_addr"
            old = getattr(q, attr)
            if name.endswith("_lo"):
                setattr(q, attr, (old & ~0xFFFFFFFF) | value)
            else:
                setattr(q, attr, (old & 0xFFFFFFFF) | (value << 32))

    def _write_status(self, value: int) -> None:
        if value == 0:
            log.info("%s: virtio reset by the driver", self.name)
            self.virtio_reset()
            return
        if value & VIRTIO_CONFIG_S_FEATURES_OK and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            why = self.device.features_refusal(self.driver_features)
            if why is None and self.driver_features & ~self.device.features:
                why = (f"the driver accepted features {self.driver_features & ~self.device.features:#x} "
                       "that were not offered")
            if why is not None:
                # The driver reads FEATURES_OK back and gives up (spec 3.1.1).
                log.warning("%s: feature negotiation failed: %s", self.name, why)
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK
        newly_ready = value & VIRTIO_CONFIG_S_DRIVER_OK and not self.status & VIRTIO_CONFIG_S_DRIVER_OK
        self.status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        if newly_ready:
            log.info("%s: driver ready (features %#x)", self.name, self.driver_features)
            self._check_rings_reachable()

    def _check_rings_reachable(self) -> None:
        """The rings must lie in memory this process can reach; guest RAM
        without share=on is found here, before the first request."""
        q = self.queue
        if not q.enabled:
            return
        try:
            self.memory.check(q.desc_addr, 16 * q.size, writable=False)
            self.memory.check(q.driver_addr, 6 + 2 * q.size, writable=False)
            # The device writes the used ring: a read-only mapping there (a
            # ring in guest ROM, DMA_MAP without write access) is refused
            # now rather than at the first answer.
            self.memory.check(q.device_addr, 6 + 8 * q.size, writable=True)
        except GuestMemoryError as exc:
            self._mark_broken(f"the virtqueue is unreachable: {exc}")

    # -- BAR1: MSI-X table (emulated by QEMU) and PBA ---------------------
    def bar1_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        if is_write:
            # QEMU emulates the table; writes reaching us are harmless.
            return
        # Pending bits: we never keep an interrupt pending (we do not
        # trigger masked vectors), so the PBA reads as zeros.
        buf[:] = bytes(len(buf))

    # -- the virtqueue -----------------------------------------------------
    def process_queue(self) -> int:
        """Handle every available request; returns how many.  Called from
        the main loop after vfio-user messages were handled, never from a
        region callback."""
        if not self.kick_pending:
            return 0
        if self.hold_requests:
            # Testing aid (QOM x-hold-requests): leave the requests in the
            # queue, as a host too slow to answer would.
            return 0
        self.kick_pending = False
        q = self.queue
        if self.broken_reason or not (q.enabled and self.status & VIRTIO_CONFIG_S_DRIVER_OK):
            return 0
        self.refresh_addr()
        handler = self.handler
        native = handler.native if self.serve_in_c else None
        response_size = handler.response_size
        # Requests a notify write served before it stopped for Python: the
        # interrupt below answers them too.
        handled = served_before = self._notify_served_pending
        self._notify_served_pending = 0
        interrupted = False
        try:
            while True:
                if native is not None:
                    started = time.perf_counter()
                    result, count = native.serve()
                    waited_s = time.perf_counter() - started
                    handled += count
                    if result == ServeResult.DONE:
                        # Nothing is left for Python: the guest gets its
                        # interrupt before the bookkeeping, which it need not
                        # wait for (the next request is served on this thread,
                        # after it).
                        if handled and not q.c_interrupts_suppressed():
                            self._interrupt(q.msix_vector, 1)
                        interrupted = True
                        if count:
                            native.book(count, waited_s)
                        break
                    # Before Python serves a chain: a request there may
                    # depend on the bookkeeping of one answered here (a
                    # virtio-mem PLUG claiming the discard of an UNPLUG).
                    if count:
                        native.book(count, waited_s)
                    if result == ServeResult.FULL:
                        continue
                    if result == ServeResult.FAULT:
                        raise GuestMemoryError(self.memory.fault_message or "guest memory faulted")
                # The next chain is Python's (or there is no C path).
                chain = q.pop(self.memory)
                if chain is None:
                    break
                if chain.writable_bytes < response_size:
                    raise QueueError(
                        f"chain {chain.head} has {chain.writable_bytes} device-writable bytes, "
                        f"a response needs {response_size}"
                    )
                # The answer must be deliverable before the request may take
                # effect: a request that changed state is always answered.
                q.check_push(self.memory, chain, response_size)
                started = time.perf_counter()
                response = handler.handle(chain.readable)
                q.push(self.memory, chain, response)
                handler.record(chain.readable, response, time.perf_counter() - started)
                handled += 1
            if handled and not interrupted and not q.interrupts_suppressed(self.memory):
                self._interrupt(q.msix_vector, 1)
        except (DriverError, GuestMemoryError) as exc:
            self._mark_broken(str(exc))
        # After the interrupt: the guest is not kept waiting for events
        # and metrics.
        handler.done()
        return handled - served_before

    # -- serving inside the notify write -----------------------------------
    def _arm_notify_serve(self) -> bool:
        """Get the device's notify serve ready for the guest's next notify
        write and say whether it may run: only in the state where
        process_queue would hand the whole queue to the C path first.  The
        vfio-user binding disarms it after one notify and before any other
        callback, so this runs again after each vfio-user message
        (DeviceServer.serve_requests) and after anything else that changes what
        it checks.  The BAR address is the caller's to refresh (arm_c_paths)."""
        q = self.queue
        native = self.handler.native
        if (native is None or not self.serve_in_c or self.hold_requests or self.kick_pending or self.broken_reason
                or not (q.enabled and self.status & VIRTIO_CONFIG_S_DRIVER_OK)):
            return False
        vector = q.msix_vector
        # As _interrupt: never a vector the guest did not enable.
        if not (vector != VIRTIO_MSI_NO_VECTOR and vector < MSIX_VECTORS and self.msix_enabled()):
            vector = -1
        native.prepare_notify(vector)
        return True

    def serve_kicks(self, kicked: bool) -> int:
        """After vfio-user messages: the bookkeeping of what a notify write
        served in C, then, if a notify was counted as a kick, the queue.
        Returns how many requests were answered."""
        answered = self.take_notify_served()
        if kicked:
            self.kick_pending = True
        answered += self.process_queue()
        # Once for both (process_queue may have done it already).
        self.handler.done()
        return answered

    @property
    def notify_serve_address(self) -> tuple[int, int] | None:
        """(function, argument) of the device's serve inside the notify
        write, for ``VfuContext.set_notify_serve``; None without a C path."""
        native = self.handler.native
        return None if native is None else (native.notify_fn_address, native.notify_arg_address)

    @property
    def fast_read_address(self) -> tuple[int, int] | None:
        """(function, argument) of the device's C answer to configuration
        reads, for ``VfuContext.set_fast_read``; None without one.  The
        argument is valid as long as this transport."""
        reads = self._config_reads
        return None if reads is None else (reads.fn_address, reads.arg_address)

    def arm_c_paths(self) -> tuple[bool, bool]:
        """After each vfio-user message: (arm the notify serve, arm the C
        answer to device-configuration reads), with the BAR address read
        once for both."""
        self.refresh_addr()
        return self._arm_notify_serve(), self._arm_fast_reads()

    def _arm_fast_reads(self) -> bool:
        """Whether reads of the device configuration (and of
        config_generation) may be answered in C until the next Python
        callback: only with the memory BAR's address known (bar0_access
        warns about an unassigned one)."""
        return self._config_reads is not None and (not self.device.memory_size or self.memory_addr != 0)

    def take_notify_served(self) -> int:
        """The bookkeeping of the requests the last notify write served in C,
        as process_queue does after the C path; returns how many.  When that
        call stopped for Python, the notify also counted as a kick, and
        process_queue serves the rest and decides the interrupt for all of
        them."""
        native = self.handler.native
        if native is None:
            return 0
        count, interrupt_due, need_python = native.take_notify()
        if not count:
            return 0
        if interrupt_due:
            self.isr |= 1  # the vector, if any, was triggered in C
        if need_python:
            self._notify_served_pending += count
        return count

    def _mark_broken(self, why: str) -> None:
        """A driver bug or an unreachable buffer: like QEMU's virtio_error(),
        stop using the queue, set DEVICE_NEEDS_RESET and tell the driver
        (virtio spec 2.1.1); block state is untouched."""
        self.broken_reason = why
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        log.error("%s: virtqueue stopped until the driver resets the device: %s", self.name, why)
        self.notify_config()
