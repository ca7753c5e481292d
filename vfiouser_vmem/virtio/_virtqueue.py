"""Guest memory as the device sees it (DMA mappings) and the split virtqueue.

Guest memory is reached through the DMA mappings QEMU registers over
vfio-user.  Mappings change only inside ``VfuContext.run()``; everything here
runs between two ``run()`` calls, so a mapping is never used after it is
gone.  Every access honours the mapping's protection and runs under the
C helper's SIGBUS guard (csrc/vmem_guest.h).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Protocol

from vfiouser_vmem._blocks import ffi as _ffi, lib as _lib
from vfiouser_vmem.errors import GuestMemoryError, QueueError
from vfiouser_vmem.util.native import CData, CField

# A client may shrink the file behind its DMA mapping at any time: touching
# it then is SIGBUS, which the guard turns into a refused access.
_rc = _lib.vmem_guard_install()
if _rc < 0:  # pragma: no cover - sigaction does not fail for SIGBUS
    raise OSError(-_rc, "cannot install the SIGBUS guard for guest memory")

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class BlockMap(Protocol):
    """A bitmap of blocks, set = may be touched (csrc/vmem_guest.h)."""

    words: CData  # uint64_t[]
    nb_blocks: int


@dataclass(frozen=True)
class DeviceMemory:
    """Where a mapping lies in a device's memory region, whose blocks only
    may be touched while plugged (csrc/vmem_guest.h): the device's block
    bitmap and block size, and the region offset of the mapping's start."""

    bitmap: BlockMap
    block_size_bytes: int
    offset_bytes: int


class _Mapping:
    __slots__ = ("iova", "end", "buffer", "why_unreachable", "device")

    def __init__(self, iova: int, length: int, buffer: memoryview | None, why_unreachable: str,
                 device: DeviceMemory | None) -> None:
        self.iova = iova
        self.end = iova + length
        self.buffer = buffer
        self.why_unreachable = why_unreachable
        self.device = device


_U64_LIMIT = 1 << 64


class GuestMemory:
    """The client's DMA mappings, looked up by guest physical address.

    Every access goes through the C helper (csrc/vmem_guest.h): it honours
    each mapping's protection (a read-only mapping is never written, an
    unreachable one never touched) and runs under the SIGBUS guard, so
    that no mapping a client sets up, and nothing it does to the file
    behind it afterwards, can kill the process.  The same table serves the
    C request path (``c_memory``).
    """

    def __init__(self) -> None:
        self._mappings: list[_Mapping] = []  # sorted by iova
        self._starts: list[int] = []
        #: The mappings for the C helper (csrc/vmem_guest.h), rebuilt on
        #: every change (a handful per boot).
        self.c_memory = _ffi.new("struct vmem_guest_memory *")
        self._c_maps: object = None
        self._c_buffers: list[object] = []
        self._bad = _ffi.new("uint64_t *")
        self._update_c_memory()

    def __len__(self) -> int:
        return len(self._mappings)

    def add(self, iova: int, length: int, buffer: memoryview | None, why_unreachable: str = "", *,
            device: DeviceMemory | None = None) -> None:
        """Register a mapping; ``buffer`` None marks memory the device cannot
        reach, ``why_unreachable`` says why (shown when the guest uses it).
        A read-only ``buffer`` is never written; with ``device`` only the
        plugged blocks of that device memory are touched."""
        if buffer is not None and len(buffer) < length:
            raise ValueError(f"mapping at {iova:#x}: buffer of {len(buffer)} bytes for {length} bytes")
        # Guest addresses are 64-bit, and nothing beyond 2^64 can be
        # addressed; libvfio-user accepts a DMA_MAP that runs past it
        # (lib/dma.c checks no wrap), and its unreachable tail began there.
        # Kept whole, such a mapping did not fit the C table's uint64_t
        # fields: every later table update failed, and the C request path
        # went on using mappings the client had unmapped (SIGSEGV).
        if iova >= _U64_LIMIT:
            return
        length = min(length, _U64_LIMIT - iova)
        saved = self._mappings[:], self._starts[:]
        self._drop(iova, length)
        i = bisect.bisect_right(self._starts, iova)
        self._starts.insert(i, iova)
        self._mappings.insert(i, _Mapping(iova, length, buffer, why_unreachable, device))
        try:
            self._update_c_memory()
        except BaseException:
            # Both tables as they were, without the mapping: the C one was
            # emptied by the failure, and is built again from the old one.
            self._mappings, self._starts = saved
            self._update_c_memory()
            raise

    def remove(self, iova: int, length: int) -> None:
        """Forget the mappings inside [iova, iova + length) (one DMA_UNMAP:
        the server may have registered a region as several pieces)."""
        self._drop(iova, length)
        self._update_c_memory()

    def _drop(self, iova: int, length: int) -> None:
        end = iova + length
        self._mappings = [m for m in self._mappings if not (iova <= m.iova and m.end <= end)]
        self._starts = [m.iova for m in self._mappings]

    def clear(self) -> None:
        self._mappings.clear()
        self._starts.clear()
        self._update_c_memory()

    def _update_c_memory(self) -> None:
        # Pointers into the buffers stay valid while the buffers do: this
        # table holds them (from_buffer) until the next change drops them.
        try:
            self._build_c_memory()
        except BaseException:
            # Never leave the C table as it was: after an unmap it would
            # point into memory no longer mapped.  Empty, the C path finds
            # no guest memory (a driver error), which is safe.
            self.c_memory.nr_maps = 0
            raise

    def _build_c_memory(self) -> None:
        maps = _ffi.new("struct vmem_mapping[]", max(1, len(self._mappings)))
        buffers = []
        for entry, m in zip(maps, self._mappings):
            entry.iova = m.iova
            entry.length = m.end - m.iova
            if m.buffer is not None and len(m.buffer):
                host = _ffi.from_buffer("uint8_t[]", m.buffer)
                buffers.append(host)
                entry.host = host
                entry.writable = 0 if m.buffer.readonly else 1
                if m.device is not None:
                    entry.plugged_words = m.device.bitmap.words
                    entry.nb_blocks = m.device.bitmap.nb_blocks
                    entry.block_size = m.device.block_size_bytes
                    entry.device_offset = m.device.offset_bytes
        self.c_memory.maps = maps
        self.c_memory.nr_maps = len(self._mappings)
        self.c_memory.last = 0
        # New mappings: whatever faulted before is for the old ones.
        self.c_memory.faulted = 0
        self._c_maps, self._c_buffers = maps, buffers

    @property
    def fault_message(self) -> str | None:
        """What the last guarded access that faulted found, or None."""
        if not self.c_memory.faulted:
            return None
        return (f"guest memory at {int(self.c_memory.fault_addr):#x} is no longer backed by the client's "
                "file (it was shrunk under the DMA mapping)")

    def _find(self, addr: int) -> _Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._mappings[i].iova <= addr < self._mappings[i].end:
            return self._mappings[i]
        return None

    def _refused(self, rc: int, bad: int) -> GuestMemoryError:
        if rc == _lib.VMEM_ACCESS_FAULT:
            return GuestMemoryError(self.fault_message or f"guest memory at {bad:#x} faulted")
        if rc == _lib.VMEM_ACCESS_UNPLUGGED:
            return GuestMemoryError(
                f"guest address {bad:#x} lies in device memory the guest has not plugged "
                "(touching it would make the host allocate it)")
        if rc == _lib.VMEM_ACCESS_READ_ONLY:
            return GuestMemoryError(
                f"guest address {bad:#x} is mapped read-only (DMA_MAP without write access): "
                "the device cannot write there")
        m = self._find(bad)
        if m is not None and m.buffer is None:
            return GuestMemoryError(f"guest address {bad:#x}: {m.why_unreachable}")
        return GuestMemoryError(f"guest address {bad:#x} is not in any DMA mapping")

    def _range_ok(self, addr: int, length: int) -> None:
        if addr >= _U64_LIMIT:  # a ring address plus an offset, past 2^64
            raise GuestMemoryError(f"guest address {addr:#x} is not in any DMA mapping")
        if addr < 0 or length < 0 or addr + length > _U64_LIMIT:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} overflows")

    def read(self, addr: int, length: int) -> bytes:
        self._range_ok(addr, length)
        if length == 0:
            return b""
        out = bytearray(length)
        rc = _lib.vmem_guest_read(self.c_memory, addr, _ffi.from_buffer(out), length, self._bad)
        if rc:
            raise self._refused(rc, int(self._bad[0]))
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self._range_ok(addr, len(data))
        if not data:
            return
        rc = _lib.vmem_guest_write(self.c_memory, addr, data, len(data), self._bad)
        if rc:
            raise self._refused(rc, int(self._bad[0]))

    def check(self, addr: int, length: int, *, writable: bool) -> None:
        """Raise GuestMemoryError unless [addr, addr + length) can be read
        (and written, with ``writable``) now; writes nothing."""
        self._range_ok(addr, length)
        if length == 0:
            return
        rc = _lib.vmem_guest_check(self.c_memory, addr, length, 1 if writable else 0, self._bad)
        if rc:
            raise self._refused(rc, int(self._bad[0]))

    def unpack(self, fmt: struct.Struct, addr: int) -> tuple:
        """``fmt.unpack`` of the guest bytes at ``addr``."""
        return fmt.unpack(self.read(addr, fmt.size))

    def pack(self, fmt: struct.Struct, addr: int, *values: object) -> None:
        """``fmt.pack`` into the guest bytes at ``addr``."""
        self.write(addr, fmt.pack(*values))

    def read_u16(self, addr: int) -> int:
        return self.unpack(_U16, addr)[0]


@dataclass
class Chain:
    """One descriptor chain: what the driver wrote, where the device writes."""

    head: int
    readable: bytes
    writable: list[tuple[int, int]]  # (guest address, length)

    @property
    def writable_bytes(self) -> int:
        return sum(length for _, length in self.writable)


class SplitQueue:
    """A split virtqueue (virtio spec 2.7), device side.

    The ring addresses and indices live in the ``struct vmem_vring`` that
    a device's request path in C works on (``c_vring``)."""

    desc_addr = CField("desc_addr")
    driver_addr = CField("driver_addr")
    device_addr = CField("device_addr")
    size = CField("size")
    last_avail_idx = CField("last_avail_idx")
    used_idx = CField("used_idx")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._c = _ffi.new("struct vmem_vring *")
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.msix_vector = 0xFFFF
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.last_avail_idx = 0
        self.used_idx = 0

    def _avail_idx(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.driver_addr + 2)

    def interrupts_suppressed(self, mem: GuestMemory) -> bool:
        return bool(mem.read_u16(self.driver_addr) & VRING_AVAIL_F_NO_INTERRUPT)

    def pop(self, mem: GuestMemory, max_readable: int = 4096) -> Chain | None:
        """The next available chain, or None when the driver offered none."""
        avail_idx = self._avail_idx(mem)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(
                f"avail idx {avail_idx} is {pending} ahead of the device, more than the queue size {self.size}"
            )
        slot = self.last_avail_idx % self.size
        head = mem.read_u16(self.driver_addr + 4 + 2 * slot)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        readable = bytearray()
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise QueueError(f"descriptor index {index} is beyond the queue size {self.size}")
            addr, length, flags, nxt = mem.unpack(_DESC, self.desc_addr + 16 * index)
            if flags & VRING_DESC_F_INDIRECT:
                raise QueueError("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not offered")
            if flags & VRING_DESC_F_WRITE:
                writable.append((addr, length))
            else:
                if writable:
                    raise QueueError("a device-readable descriptor follows a device-writable one")
                if len(readable) < max_readable:
                    readable += mem.read(addr, min(length, max_readable - len(readable)))
            if not flags & VRING_DESC_F_NEXT:
                return Chain(head, bytes(readable), writable)
            index = nxt
        raise QueueError(f"descriptor chain from head {head} is longer than the queue (a loop?)")

    def check_push(self, mem: GuestMemory, chain: Chain, response_bytes: int) -> None:
        """Raise GuestMemoryError unless ``push`` of a ``response_bytes``
        response would succeed: the part of the writable buffers it fills and
        the used ring's element and index are writable now.  Before a request
        takes effect, so that a request that changes state is always answered
        (and one that cannot be answered changes nothing)."""
        pos = 0
        for addr, length in chain.writable:
            if pos >= response_bytes:
                break
            n = min(length, response_bytes - pos)
            mem.check(addr, n, writable=True)
            pos += n
        mem.check(self.device_addr + 4 + 8 * (self.used_idx % self.size), 8, writable=True)
        mem.check(self.device_addr + 2, 2, writable=True)

    def push(self, mem: GuestMemory, chain: Chain, response: bytes) -> None:
        """Write ``response`` into the chain's writable buffers and return it
        to the driver (the used element before the used index: spec 2.7.8)."""
        pos = 0
        for addr, length in chain.writable:
            if pos >= len(response):
                break
            part = response[pos : pos + length]
            mem.write(addr, part)
            pos += len(part)
        slot = self.used_idx % self.size
        mem.pack(_USED_ELEM, self.device_addr + 4 + 8 * slot, chain.head, pos)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.pack(_U16, self.device_addr + 2, self.used_idx)

    @property
    def c_vring(self) -> CData:
        """The queue's ``struct vmem_vring`` (csrc/vmem_queue.h), for a
        device's request path in C; valid as long as the queue."""
        return self._c

    def c_interrupts_suppressed(self) -> bool:
        """``interrupts_suppressed`` as the last C call that served the queue
        to its end (ServeResult.DONE) read it, after its last used index."""
        return bool(self._c.avail_flags & VRING_AVAIL_F_NO_INTERRUPT)
