"""An independent reference model of one virtio-mem device, for the fuzzers.

Written from the virtio spec, "Memory Device" (virtio 1.2 section 5.15,
1.3 section 5.15) and from how QEMU answers (hw/virtio/virtio-mem.c:
``virtio_mem_valid_range``, ``virtio_mem_state_change_request``,
``virtio_mem_unplug_all``, ``virtio_mem_resize_usable_region``,
``virtio_mem_handle_request``), not from the product's model
(vfiouser_vmem/vmem/_model.py), so that the two can disagree.  Where the spec
leaves a choice, the model takes the one docs/conformance.md ("Choices where
the spec leaves one") documents, and says so where it does.

It knows nothing of transports: ``answer(request_bytes)`` is what the device
must write back for a request it accepted, ``system_reset()`` is a vfio-user
DEVICE_RESET or a lost connection, ``set_requested_size`` a ``qom-set``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# Request and response types, states (virtio spec 5.15.6).
REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, REQ_STATE = range(4)
RESP_ACK, RESP_NACK, RESP_BUSY, RESP_ERROR = range(4)
STATE_PLUGGED, STATE_UNPLUGGED, STATE_MIXED = range(3)

#: struct virtio_mem_req: le16 type, 6 bytes padding, then the union
#: (le64 addr, le16 nb_blocks, 6 bytes padding): 24 bytes.
REQUEST_BYTES = 24
#: struct virtio_mem_resp: le16 type, 6 bytes padding, le16 state: 10 bytes.
RESPONSE_BYTES = 10
_U64 = 1 << 64

#: QEMU's VIRTIO_MEM_USABLE_EXTENT on x86 (hw/virtio/virtio-mem.c): the
#: usable region reaches this far beyond requested_size, so that a guest can
#: plug around the blocks it could not unplug.
USABLE_EXTENT_BYTES = 256 << 20


class ProtocolViolation(Exception):
    """A request the device must not answer: QEMU's ``virtio_error()``
    (the queue stops, DEVICE_NEEDS_RESET, virtio spec 2.1.1)."""


class RequestedSizeRefused(Exception):
    """A requested size the device refuses; nothing changes."""


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def response_bytes(type_: int, state: int = 0) -> bytes:
    """The 10 bytes of a response: padding zero, ``state`` only in STATE's
    answer (QEMU's virtio_mem_send_response_simple zeroes the rest)."""
    return struct.pack("<H6xH", type_, state)


@dataclass
class ReferenceVmem:
    """Device state: the fields of struct virtio_mem_config the driver sees,
    and one plugged flag per block."""

    block_size: int
    region_size: int
    addr: int
    requested_size: int = 0
    usable_region_size: int = 0
    plugged: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if self.region_size % self.block_size:
            raise ValueError("the region is not a multiple of the block size")
        self.plugged = bytearray(self.region_size // self.block_size)
        # QEMU's realize: the usable region from the initial requested size.
        self._resize_usable_region(can_shrink=True)

    # -- what the driver reads ------------------------------------------------------
    @property
    def plugged_size(self) -> int:
        return sum(self.plugged) * self.block_size

    def config(self) -> dict[str, int]:
        return {"block_size": self.block_size, "addr": self.addr, "region_size": self.region_size,
                "usable_region_size": self.usable_region_size, "plugged_size": self.plugged_size,
                "requested_size": self.requested_size}

    def plugged_blocks(self) -> set[int]:
        return {i for i, p in enumerate(self.plugged) if p}

    # -- the host side -----------------------------------------------------------------
    def _resize_usable_region(self, *, can_shrink: bool) -> None:
        # virtio spec 5.15.4: usable_region_size may grow when requested_size
        # changes; QEMU grows it to requested_size + the extent (at most the
        # region), rounded up to the block size, 0 when nothing is requested,
        # and shrinks it only on UNPLUG_ALL and resets (when nothing is plugged).
        new_size = _align_up(min(self.region_size, self.requested_size + USABLE_EXTENT_BYTES), self.block_size)
        if not self.requested_size:
            new_size = 0
        if new_size < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = new_size

    def set_requested_size(self, size_bytes: int) -> None:
        # QEMU's virtio_mem_set_requested_size: a multiple of the block size,
        # at most the region; anything else refused with nothing changed.
        if size_bytes < 0 or size_bytes % self.block_size or size_bytes > self.region_size:
            raise RequestedSizeRefused(size_bytes)
        self.requested_size = size_bytes
        self._resize_usable_region(can_shrink=False)

    def system_reset(self) -> None:
        # A system reset (QEMU's virtio_mem_system_reset) unplugs everything,
        # as UNPLUG_ALL does; docs/scrub.md, "Reset means empty": so do a
        # vfio-user DEVICE_RESET and a lost connection.
        self._unplug_all()

    def virtio_reset(self) -> None:
        """A driver's reset through device_status (virtio spec 2.1, 3.1.1):
        nothing changes.  The spec does not say what a reset does to plugged
        memory; QEMU keeps it (hw/virtio/virtio-mem.c: a device reset must
        not change the state of plugged blocks, only the system reset object
        that qemu_devices_reset() calls unplugs them), and so does the
        product (docs/conformance.md, "virtio status reset keeps block
        state").  A driver that wants an empty device sends UNPLUG_ALL, as
        Linux does when it probes."""

    # -- requests -------------------------------------------------------------------------
    def _valid_range(self, gpa: int, size: int) -> bool:
        # virtio spec 5.15.6 (the device requirements of PLUG, UNPLUG and STATE): an addr not aligned to
        # block_size, a range outside the usable region, nb_blocks 0 -> ERROR.
        # gpa + size is 64-bit arithmetic in QEMU: a range that wraps is
        # invalid, not one that ends low.
        if gpa % self.block_size:
            return False
        end = gpa + size
        if size == 0 or end >= _U64:
            return False
        usable_end = self.addr + self.usable_region_size
        return self.addr <= gpa < usable_end and end <= usable_end

    def _blocks(self, gpa: int, size: int) -> range:
        first = (gpa - self.addr) // self.block_size
        return range(first, first + size // self.block_size)

    def _state_change(self, gpa: int, nb_blocks: int, plug: bool) -> int:
        size = nb_blocks * self.block_size
        if not self._valid_range(gpa, size):
            return RESP_ERROR
        # 5.15.6 (device requirements): PLUG beyond requested_size -> NACK (checked after the
        # range, before the block state, as QEMU does).  UNPLUG is never
        # NACKed: QEMU lets a guest unplug whatever requested_size says.
        if plug and self.plugged_size + size > self.requested_size:
            return RESP_NACK
        blocks = self._blocks(gpa, size)
        want = 0 if plug else 1
        # 5.15.6 (device requirements): PLUG of a block that is plugged, UNPLUG of one that is
        # not -> ERROR (all blocks must be in the opposite state).
        if any(self.plugged[i] != want for i in blocks):
            return RESP_ERROR
        for i in blocks:
            self.plugged[i] = 1 - want
        return RESP_ACK

    def _unplug_all(self) -> None:
        for i in range(len(self.plugged)):
            self.plugged[i] = 0
        self._resize_usable_region(can_shrink=True)

    def _state(self, gpa: int, nb_blocks: int) -> tuple[int, int]:
        size = nb_blocks * self.block_size
        if not self._valid_range(gpa, size):
            return RESP_ERROR, 0
        states = {self.plugged[i] for i in self._blocks(gpa, size)}
        if states == {1}:
            return RESP_ACK, STATE_PLUGGED
        if states == {0}:
            return RESP_ACK, STATE_UNPLUGGED
        return RESP_ACK, STATE_MIXED

    def answer(self, request: bytes) -> bytes:
        """The response to one request (its first 24 bytes; padding is
        ignored, as QEMU reads only type, addr and nb_blocks), applied to
        the state; ProtocolViolation for a type the spec does not define."""
        if len(request) < REQUEST_BYTES:
            raise ProtocolViolation(f"request of {len(request)} bytes")
        type_, gpa, nb_blocks = struct.unpack_from("<H6xQH", request)
        if type_ == REQ_PLUG:
            return response_bytes(self._state_change(gpa, nb_blocks, plug=True))
        if type_ == REQ_UNPLUG:
            return response_bytes(self._state_change(gpa, nb_blocks, plug=False))
        if type_ == REQ_UNPLUG_ALL:
            # 5.15.6 (device requirements): UNPLUG_ALL -> ACK, plugged_size 0 (BUSY only for host
            # trouble, which the fuzzers do not inject).
            self._unplug_all()
            return response_bytes(RESP_ACK)
        if type_ == REQ_STATE:
            return response_bytes(*self._state(gpa, nb_blocks))
        # The spec defines no answer to an unknown type; QEMU calls
        # virtio_error() ("protocol violation: unknown request type") and so
        # does the product (docs/conformance.md, "Malformed chains").
        raise ProtocolViolation(f"unknown request type {type_}")


# -- descriptor chains ---------------------------------------------------------------

#: The device reads at most this much of a chain's device-readable buffers
#: (csrc/vmem_queue.c MAX_READABLE, the Python path's ``max_readable``).
MAX_READABLE_BYTES = 4096


@dataclass(frozen=True)
class Desc:
    """One split-ring descriptor (virtio spec 2.7.5)."""

    addr: int
    length: int
    flags: int
    next: int


DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4


def walk_chain(table: dict[int, Desc], head: int, queue_size: int,
               reachable: Callable[[int, int], bool]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The device's reading of one chain: (readable, writable) buffers as
    (address, length), or ProtocolViolation.

    From the spec, 2.7.5 and 2.7.4.2: a descriptor index beyond the queue,
    a chain longer than the queue (a loop), a device-readable descriptor
    after a device-writable one, VIRTQ_DESC_F_INDIRECT without
    VIRTIO_F_INDIRECT_DESC negotiated (the device does not offer it) are
    driver errors; QEMU's virtqueue_pop calls virtio_error() for each, and
    so does the product (docs/conformance.md).

    What must be reachable is a choice the spec leaves: QEMU maps every
    descriptor whole (and refuses zero-length ones); the product touches
    only what it uses: the first MAX_READABLE_BYTES of the readable
    buffers, the first RESPONSE_BYTES of the writable ones, so that a huge
    length whose used part lies in guest memory is served, and a
    zero-length descriptor is nothing at all.  This model follows the
    product, the choice docs/robustness.md ("a buffer the device cannot
    reach") describes.
    """
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    read_bytes = 0
    written_bytes = 0
    index = head
    for _ in range(queue_size):
        if index >= queue_size or index not in table:
            raise ProtocolViolation(f"descriptor index {index}")
        d = table[index]
        if d.flags & DESC_F_INDIRECT:
            raise ProtocolViolation("indirect descriptor")
        if d.flags & DESC_F_WRITE:
            n = min(d.length, max(0, RESPONSE_BYTES - written_bytes))
            if n and not reachable(d.addr, n):
                raise ProtocolViolation(f"response buffer {d.addr:#x}+{n} unreachable")
            written_bytes += n
            writable.append((d.addr, d.length))
        else:
            if writable:
                raise ProtocolViolation("readable after writable")
            n = min(d.length, MAX_READABLE_BYTES - read_bytes)
            if n and not reachable(d.addr, n):
                raise ProtocolViolation(f"request buffer {d.addr:#x}+{n} unreachable")
            read_bytes += n
            readable.append((d.addr, d.length))
        if not d.flags & DESC_F_NEXT:
            # QEMU's virtio_mem_handle_request: fewer than 24 readable or 10
            # writable bytes is a protocol violation.
            if sum(n for _, n in readable) < REQUEST_BYTES:
                raise ProtocolViolation("request shorter than 24 bytes")
            if sum(n for _, n in writable) < RESPONSE_BYTES:
                raise ProtocolViolation("response buffer shorter than 10 bytes")
            return readable, writable
        index = d.next
    raise ProtocolViolation("chain longer than the queue (a loop)")
