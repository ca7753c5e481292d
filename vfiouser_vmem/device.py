"""The virtio-mem device model: pure logic, no sockets, no PCI.

It owns the device configuration (virtio spec "Memory Device", device
configuration layout), the per-block plugged state and the request rules of
docs/design.md ("virtio-mem rules"), in QEMU's validation order (hw/virtio/virtio-mem.c).
Host memory is given back through an injected ``discard`` function so that
unit tests can drive the model without a backend.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable
from typing import NamedTuple

from vfiouser_vmem._blocks import ffi as _ffi
from vfiouser_vmem.blocks import BlockBitmap, CData, CField, RangeState
from vfiouser_vmem.errors import DiscardFailed, ProtocolViolation
from vfiouser_vmem.sizes import format_size

log = logging.getLogger("vfiouser_vmem.device")

VIRTIO_ID_MEM = 24

# Feature bits (virtio spec 5.15.3; VIRTIO_F_VERSION_1 is bit 32).
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2
VIRTIO_F_VERSION_1 = 32

MIB = 1 << 20
MIN_BLOCK_SIZE_BYTES = 1 * MIB
# QEMU keeps usable_region_size ahead of requested_size by this much on x86
# (VIRTIO_MEM_USABLE_EXTENT in hw/virtio/virtio-mem.c) so that the guest can
# plug in memory blocks it has already added.
USABLE_EXTENT_BYTES = 256 * MIB
# The driver sends at most 65535 blocks per request (nb_blocks is a u16).
MAX_NB_BLOCKS = 0xFFFF

REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56
_REQUEST = struct.Struct("<H6xQH6x")
_RESPONSE = struct.Struct("<H6xH")
_CONFIG = struct.Struct("<QH6xQQQQQ")


class RequestType(enum.IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class Response(enum.IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class Request(NamedTuple):
    """A virtio-mem request (virtio spec 5.15.6.1).  A named tuple: one is
    parsed per request, and a frozen dataclass costs several times more."""

    type: int
    addr: int
    nb_blocks: int

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Request:
        if len(data) < REQUEST_SIZE:
            raise ProtocolViolation(f"request of {len(data)} bytes, virtio-mem requests are {REQUEST_SIZE}")
        return cls(*_REQUEST.unpack_from(data))

    def pack(self) -> bytes:
        return _REQUEST.pack(self.type, self.addr, self.nb_blocks)


def pack_response(response: Response, state: int = 0) -> bytes:
    return _RESPONSE.pack(response, state)


_PLUG, _UNPLUG, _UNPLUG_ALL, _STATE = (int(t) for t in RequestType)
#: The answers without a state, packed once.
_PACKED = {response: pack_response(response) for response in Response}


def unpack_response(data: bytes) -> tuple[int, int]:
    return _RESPONSE.unpack_from(data)


def validate_block_size(block_size_bytes: int, *, page_size_bytes: int = 4096) -> None:
    """A power of two, >= 1 MiB, >= the backend's page size (the huge page
    size for hugetlb).  QEMU takes the THP size (2 MiB) as the *default*
    block size but accepts any block size >= the RAM page size
    (hw/virtio/virtio-mem.c, virtio_mem_device_realize); so do we, so
    that 1 MiB blocks work on ordinary memory."""
    if block_size_bytes <= 0 or block_size_bytes & (block_size_bytes - 1):
        raise ValueError(f"block-size {block_size_bytes} is not a power of two")
    if block_size_bytes < max(MIN_BLOCK_SIZE_BYTES, page_size_bytes):
        raise ValueError(
            f"block-size {format_size(block_size_bytes)} is below the minimum "
            f"{format_size(max(MIN_BLOCK_SIZE_BYTES, page_size_bytes))} (the backend's page size)"
        )


class VirtioMemDevice:
    """One virtio-mem device: configuration, block state, requests.

    ``discard(offset_bytes, length_bytes)`` gives a range of the device's
    memory (offsets relative to the start of the device region) back to the
    host, now or later, and raises ``DiscardFailed`` when it cannot (the
    request is then answered BUSY and the blocks stay plugged).
    ``before_plug(offset_bytes, length_bytes)`` is called before blocks are
    marked plugged, once the request is known to be accepted: a deferred
    discard of that range must be dropped or finished by then.
    ``on_config_change()`` is called whenever ``requested_size`` or
    ``usable_region_size`` changed (the transport sends a config interrupt).

    The transport serves most requests through the C request path
    (csrc/vmem_queue.h, ``c_request_state`` / ``c_requests_served``); it
    answers only what these rules accept, and leaves to Python a PLUG while
    ``before_plug_due()`` says a ``before_plug`` call may have work to do,
    and an UNPLUG while ``discard_refused()`` says ``discard`` would raise
    DiscardFailed.  Without those two functions, a device given
    ``before_plug`` (``discard``) serves every PLUG (UNPLUG) in Python.
    """

    # The numbers the C request path reads and changes live in its
    # ``struct vmem_device_state`` (csrc/vmem_queue.h).
    addr = CField("addr")
    requested_size = CField("requested_size")
    usable_region_size = CField("usable_region_size")
    _plugged_blocks = CField("plugged_blocks")

    def __init__(
        self,
        *,
        region_size_bytes: int,
        block_size_bytes: int = 2 * MIB,
        requested_size_bytes: int = 0,
        node_id: int | None = None,
        page_size_bytes: int = 4096,
        discard: Callable[[int, int], None] | None = None,
        before_plug: Callable[[int, int], None] | None = None,
        on_config_change: Callable[[], None] | None = None,
        name: str = "vmem0",
        before_plug_due: Callable[[], bool] | None = None,
        discard_refused: Callable[[], bool] | None = None,
    ) -> None:
        validate_block_size(block_size_bytes, page_size_bytes=page_size_bytes)
        if region_size_bytes <= 0 or region_size_bytes % block_size_bytes:
            raise ValueError(
                f"size {format_size(region_size_bytes)} is not a positive multiple of the "
                f"block-size {format_size(block_size_bytes)}"
            )
        if node_id is not None and not 0 <= node_id <= 0xFFFF:
            raise ValueError(f"node {node_id} is out of range (0-65535)")
        self.name = name
        self.block_size = block_size_bytes
        self.region_size = region_size_bytes
        self.node_id = node_id
        self.bitmap = BlockBitmap(region_size_bytes // block_size_bytes)
        self._c = _ffi.new("struct vmem_device_state *")  # zeroed: addr, sizes, plugged blocks
        self._c.words = self.bitmap.words
        self._c.nb_blocks = self.bitmap.nb_blocks
        self._c.block_size = block_size_bytes
        # _plugged_blocks is kept beside the bitmap (changed only where the
        # bitmap is) rather than counted: a popcount of a 1 TiB device's
        # bitmap costs 14 us and plugged_size is read several times per
        # request and by every query.
        self._discard = discard or (lambda offset, length: None)
        self._before_plug = before_plug
        self._before_plug_due = before_plug_due or ((lambda: True) if before_plug is not None else (lambda: False))
        self._discard_refused = discard_refused or ((lambda: True) if discard is not None else (lambda: False))
        self.on_config_change = on_config_change
        # A listener per change of plugged_size (the control plane's
        # MEMORY_DEVICE_SIZE_CHANGE); called after the change.
        self.size_listeners: list[Callable[[int], None]] = []
        #: The transport sets this: listeners then hear of PLUG/UNPLUG
        #: answers at flush_size_events(), after the guest got its
        #: interrupt, not while the guest waits (QMP events, metrics).
        self.defer_size_events = False
        self._size_event_due = False
        self.set_requested_size(requested_size_bytes)

    # -- configuration -------------------------------------------------
    @property
    def plugged_size(self) -> int:
        return self._plugged_blocks * self.block_size


    @property
    def features(self) -> int:
        """Device features offered (docs/design.md, "virtio-mem rules")."""
        bits = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        if self.node_id is not None:
            bits |= 1 << VIRTIO_MEM_F_ACPI_PXM
        return bits

    @staticmethod
    def features_refusal(driver_features: int) -> str | None:
        """Why the driver's feature set is not acceptable, or None.

        QEMU's x86 default is unplugged-inaccessible=on, and then it fails
        feature negotiation with a driver that does not accept
        VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (virtio_mem_validate_features):
        such a driver may read unplugged memory (e.g. kdump), which would
        make the host allocate it again.  We do the same.
        """
        if not driver_features >> VIRTIO_F_VERSION_1 & 1:
            return "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        if not driver_features >> VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE & 1:
            return "the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (Linux >= 5.16 does)"
        return None

    def config_bytes(self) -> bytes:
        """The 56-byte device configuration (little endian)."""
        return _CONFIG.pack(
            self.block_size,
            self.node_id or 0,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )

    def check_requested_size(self, size_bytes: int) -> None:
        if not isinstance(size_bytes, int) or isinstance(size_bytes, bool):
            raise TypeError(f"requested-size must be an integer, not {type(size_bytes).__name__}")
        if size_bytes < 0:
            raise ValueError(f"requested-size {size_bytes} is negative")
        if size_bytes > self.region_size:
            raise ValueError(
                f"requested-size {format_size(size_bytes)} is above the device's maximum "
                f"size {format_size(self.region_size)}"
            )
        if size_bytes % self.block_size:
            raise ValueError(
                f"requested-size {format_size(size_bytes)} is not a multiple of the "
                f"block-size {format_size(self.block_size)}"
            )

    def set_requested_size(self, size_bytes: int) -> None:
        """Ask the guest for a new size (QEMU: qom-set requested-size)."""
        self.check_requested_size(size_bytes)
        before = (self.requested_size, self.usable_region_size)
        self.requested_size = size_bytes
        self._resize_usable_region(can_shrink=False)
        if (self.requested_size, self.usable_region_size) != before:
            self._config_changed()

    def _resize_usable_region(self, *, can_shrink: bool) -> None:
        # QEMU virtio_mem_resize_usable_region(): grows on resize, shrinks
        # only on UNPLUG_ALL, system reset and start.
        if self.requested_size == 0:
            new_size = 0
        else:
            new_size = min(self.region_size, self.requested_size + USABLE_EXTENT_BYTES)
            new_size = -(-new_size // self.block_size) * self.block_size
        if new_size < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = new_size

    def _config_changed(self) -> None:
        if self.on_config_change is not None:
            self.on_config_change()

    def _size_changed(self) -> None:
        size = self.plugged_size
        for listener in list(self.size_listeners):
            listener(size)

    def _request_changed_size(self) -> None:
        if self.defer_size_events:
            self._size_event_due = True
        else:
            self._size_changed()

    def flush_size_events(self) -> None:
        """Tell the size listeners about requests served since the last
        call (with ``defer_size_events``): once, with the current size."""
        if self._size_event_due:
            self._size_event_due = False
            self._size_changed()

    # -- requests ------------------------------------------------------
    def handle_request(self, data: bytes | memoryview) -> bytes:
        """Handle one request; returns the 10-byte response.

        Raises ProtocolViolation for requests no driver may send.
        """
        # The hot path of the device (one call per guest request): plain
        # int comparisons and pre-packed answers.
        request = Request.parse(data)
        kind = request.type
        if kind == _PLUG:
            return _PACKED[self._plug(request)]
        if kind == _UNPLUG:
            return _PACKED[self._unplug(request)]
        if kind == _UNPLUG_ALL:
            return _PACKED[self._unplug_all()]
        if kind == _STATE:
            return pack_response(*self._state(request))
        raise ProtocolViolation(f"unknown request type {kind}")

    # -- the C request path (csrc/vmem_queue.h) -------------------------
    @property
    def c_state(self) -> CData:
        """The model's ``struct vmem_device_state`` (csrc/vmem_queue.h), for
        C code that reads it between requests (csrc/vmem_config.h)."""
        return self._c

    def c_request_state(self) -> CData:
        """The ``struct vmem_device_state`` for one ``vmem_serve_queue``
        call, with what it may serve decided now; ``c_requests_served``
        must follow before anything else uses the model."""
        state = self._c
        state.plug_allowed = not self._before_plug_due()
        state.unplug_allowed = not self._discard_refused()
        return state

    def c_requests_served(self, served: CData, count: int) -> None:
        """Finish the ``count`` requests of ``served`` that the C path
        answered (the bitmap and the plugged count already say so): queue
        the discards of the UNPLUGs and tell the size listeners."""
        size_changed = False
        for i in range(count):
            request = served[i]
            if request.type == _UNPLUG:
                offset = request.addr - self.addr
                try:
                    self._discard(offset, request.nb_blocks * self.block_size)
                except DiscardFailed as exc:
                    # A broken contract (discard_refused() said it would
                    # not fail): the guest has its ACK and the blocks are
                    # unplugged, but this memory stays allocated.  Say so.
                    log.error("%s: %s at offset %#x unplugged but not given back to the host "
                              "(discard_refused() said the discard would work): %s",
                              self.name, format_size(request.nb_blocks * self.block_size), offset, exc)
                size_changed = True
            elif request.type == _PLUG:
                size_changed = True
        if size_changed:
            self._request_changed_size()

    def _range_error(self, request: Request) -> str | None:
        """Rule 2 of docs/design.md, "virtio-mem rules": why the range is invalid, or None."""
        addr, nb_blocks = request.addr, request.nb_blocks
        block_size = self.block_size
        if addr % block_size:
            return f"addr {addr:#x} is not aligned to the block size {block_size:#x}"
        if nb_blocks == 0:
            return "nb_blocks is 0"
        end = addr + nb_blocks * block_size
        start = self.addr
        if addr >= start and end <= start + self.usable_region_size:
            return None
        if end > (1 << 64) - 1:
            return f"range {addr:#x}+{end - addr:#x} overflows"
        return (
            f"range {addr:#x}-{end:#x} is outside the usable region "
            f"{start:#x}-{start + self.usable_region_size:#x}"
        )

    def _refuse(self, request: Request, response: Response, why: str) -> Response:
        log.warning(
            "%s: %s of %d block(s) at %#x answered %s: %s",
            self.name,
            RequestType(request.type).name,
            request.nb_blocks,
            request.addr,
            response.name,
            why,
        )
        return response

    def _first_block(self, request: Request) -> int:
        return (request.addr - self.addr) // self.block_size

    def _plug(self, request: Request) -> Response:
        if why := self._range_error(request):
            return self._refuse(request, Response.ERROR, why)
        size = request.nb_blocks * self.block_size
        if self.plugged_size + size > self.requested_size:
            # Not an error: the guest asked for more than is requested now
            # (requested_size dropped while it was growing); it retries later.
            log.info(
                "%s: PLUG of %d block(s) at %#x answered NACK: plugged %s + %s > requested %s",
                self.name, request.nb_blocks, request.addr,
                format_size(self.plugged_size), format_size(size), format_size(self.requested_size),
            )
            return Response.NACK
        first = self._first_block(request)
        if self.bitmap.range_state(first, request.nb_blocks) != RangeState.UNPLUGGED:
            return self._refuse(request, Response.ERROR, "some of the blocks are already plugged")
        if self._before_plug is not None:
            self._before_plug(first * self.block_size, size)
        # Plugging is lazy: the host allocates on first guest touch.
        self.bitmap.set_range(first, request.nb_blocks)
        self._plugged_blocks += request.nb_blocks
        self._request_changed_size()
        return Response.ACK

    def _unplug(self, request: Request) -> Response:
        if why := self._range_error(request):
            return self._refuse(request, Response.ERROR, why)
        first = self._first_block(request)
        if self.bitmap.range_state(first, request.nb_blocks) != RangeState.PLUGGED:
            return self._refuse(request, Response.ERROR, "some of the blocks are not plugged")
        try:
            self._discard(first * self.block_size, request.nb_blocks * self.block_size)
        except DiscardFailed as exc:
            # A host-side problem: BUSY makes the guest retry; ERROR would
            # make Linux mark the device broken.
            return self._refuse(request, Response.BUSY, str(exc))
        self.bitmap.clear_range(first, request.nb_blocks)
        self._plugged_blocks -= request.nb_blocks
        self._request_changed_size()
        return Response.ACK

    def _unplug_all(self) -> Response:
        try:
            self._unplug_all_blocks(self._request_changed_size)
        except DiscardFailed as exc:
            log.warning("%s: UNPLUG_ALL answered BUSY: %s", self.name, exc)
            return Response.BUSY
        before = self.usable_region_size
        self._resize_usable_region(can_shrink=True)
        if self.usable_region_size != before:
            self._config_changed()
        return Response.ACK

    def _state(self, request: Request) -> tuple[Response, int]:
        if why := self._range_error(request):
            return self._refuse(request, Response.ERROR, why), 0
        return Response.ACK, int(self.bitmap.range_state(self._first_block(request), request.nb_blocks))

    # -- host side -----------------------------------------------------
    def unplug_all(self) -> None:
        """Discard every plugged run and mark everything unplugged.

        On a discard failure the blocks discarded so far are unplugged and
        the rest stay plugged, so the state always matches the host.
        """
        self._unplug_all_blocks(self._size_changed)

    def _unplug_all_blocks(self, size_changed: Callable[[], None]) -> None:
        changed = False
        try:
            for first, count in list(self.bitmap.runs(plugged=True)):
                self._discard(first * self.block_size, count * self.block_size)
                self.bitmap.clear_range(first, count)
                self._plugged_blocks -= count
                changed = True
        finally:
            if changed:
                size_changed()

    def system_reset(self) -> None:
        """System reset (vfio-user DEVICE_RESET, lost connection): QEMU
        unplugs all memory only on system reset (virtio_mem_system_reset)."""
        try:
            self.unplug_all()
        except DiscardFailed:
            log.error("%s: could not discard all memory on reset; plugged blocks stay plugged", self.name)
            raise
        finally:
            self._resize_usable_region(can_shrink=True)
