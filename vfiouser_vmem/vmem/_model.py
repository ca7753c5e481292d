"""The virtio-mem device model: pure logic, no sockets, no PCI.

It owns the device configuration (virtio spec "Memory Device", device
configuration layout), the per-block plugged state and the request rules of
docs/design.md ("virtio-mem rules"), in QEMU's validation order (hw/virtio/virtio-mem.c).
Host memory is given back through its ``HostMemory`` (the server's queues
discards on the backend), so that unit tests can drive the model without one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from vfiouser_vmem._blocks import ffi as _ffi
from vfiouser_vmem.errors import DiscardFailed, PreallocFailed, ProtocolViolation
from vfiouser_vmem.util.logtext import LogBudget
from vfiouser_vmem.util.native import CData, CField
from vfiouser_vmem.util.sizes import format_size
from vfiouser_vmem.vmem._bitmap import BlockBitmap, RangeState
from vfiouser_vmem.vmem._events import HookErrors, Observers, PluggedSizeChanged, RequestedSizeChanged
from vfiouser_vmem.vmem._policy import PlugPolicy, allowed_answers
from vfiouser_vmem.vmem._settings import MODEL_NAMES, check_block_size, check_requested_size, check_size
from vfiouser_vmem.vmem._spec import (
    CONFIG_SIZE,
    CONFIG_STRUCT,
    MIB,
    PACKED_RESPONSES,
    USABLE_EXTENT_BYTES,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    Request,
    RequestType,
    Response,
    pack_response,
)
from vfiouser_vmem.vmem._virtio import VirtioMemConfigReads, VirtioMemQueue

if TYPE_CHECKING:
    from vfiouser_vmem.virtio import GuestMemory, SplitQueue

_PLUG, _UNPLUG, _UNPLUG_ALL, _STATE = (int(t) for t in RequestType)
_PACKED = PACKED_RESPONSES

log = logging.getLogger("vfiouser_vmem.device")

#: Refused requests (ERROR, NACK, BUSY) are logged at most _LOG_BURST times
#: per device per _LOG_WINDOW_S, the others counted (util/logtext.py
#: LogBudget, as QMP's refused inputs): the guest chooses how many it sends,
#: and a line per request let one guest write ~100 bytes of log per request
#: on the only thread, which blocks every device once the log's reader falls
#: behind.
_LOG_BURST = 10
_LOG_WINDOW_S = 10.0


class HostMemory:
    """Where a device's memory comes from and goes back to: what the model
    asks of the host around a request (offsets relative to the start of the
    device region).  This base class has nothing to give back; the server's
    (DeviceServer) queues discards on the backend.

    ``discard`` gives a range back to the host, now or later, and raises
    ``DiscardFailed`` when it cannot (the UNPLUG is then answered BUSY and
    the blocks stay plugged); ``discard_refused`` says beforehand that it
    would.  ``claim`` runs before blocks are marked plugged, once the PLUG
    is known to be accepted: it makes the range the guest's again (a
    deferred discard of it is dropped or finished; with the device's
    ``prealloc=on`` its memory is allocated) and raises ``PreallocFailed``
    when the host cannot provide it (the PLUG is then answered BUSY and the
    blocks stay unplugged); ``claim_due`` says whether a claim has anything
    to do at all.  The C request path relies on the two predicates: it
    serves an UNPLUG only while ``discard_refused()`` is False and a PLUG
    only while ``claim_due()`` is False, and leaves the others to Python.
    """

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        pass

    def discard_refused(self) -> bool:
        return False

    def claim(self, offset_bytes: int, length_bytes: int) -> None:
        pass

    def claim_due(self) -> bool:
        return False


class VirtioMemDevice:
    """One virtio-mem device: configuration, block state, requests.

    It is the device type behind the virtio PCI transport (it implements
    ``vfiouser_vmem.virtio.VirtioDevice``); unit tests drive it alone,
    through ``handle_request`` and ``set_requested_size``.

    ``host_memory`` is where unplugged memory goes (``HostMemory``);
    ``policy`` (``PlugPolicy``), if set, has its say over every PLUG and
    UNPLUG the rules accept.  The transport serves most requests through the
    C request path (csrc/vmem_queue.h, ``_virtio.py``): it answers only what
    these rules accept, and leaves to Python what ``HostMemory`` or a policy
    must see.
    """

    # The numbers the C request path reads and changes live in its
    # ``struct vmem_device_state`` (csrc/vmem_queue.h).
    addr = CField("addr")
    requested_size = CField("requested_size")
    usable_region_size = CField("usable_region_size")
    _plugged_blocks = CField("plugged_blocks")

    device_id = VIRTIO_ID_MEM
    config_size = CONFIG_SIZE

    def __init__(
        self,
        *,
        region_size_bytes: int,
        block_size_bytes: int = 2 * MIB,
        requested_size_bytes: int = 0,
        node_id: int | None = None,
        page_size_bytes: int = 4096,
        name: str = "vmem0",
        host_memory: HostMemory | None = None,
        policy: PlugPolicy | None = None,
    ) -> None:
        check_block_size(block_size_bytes, page_size_bytes=page_size_bytes)
        # No maximum here: the server's is a property of its BAR layout.
        check_size(region_size_bytes, block_size_bytes, maximum_bytes=None)
        if node_id is not None and not 0 <= node_id <= 0xFFFF:
            raise ValueError(f"node {node_id} is out of range (0-65535)")
        self.name = name
        self._refusal_log = LogBudget(self._report_unlogged_refusals, burst=_LOG_BURST, window_s=_LOG_WINDOW_S)
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
        self.host_memory = host_memory or HostMemory()
        self.policy = policy
        self.on_config_change: Callable[[], None] | None = None
        #: Exceptions of policies and observers, by hook (metrics).
        self.hook_errors = HookErrors()
        self.observers = Observers(name, self.hook_errors)
        # A listener per change of plugged_size (the control plane's
        # MEMORY_DEVICE_SIZE_CHANGE); called after the change.
        self.size_listeners: list[Callable[[int], None]] = []
        #: The transport sets this: listeners then hear of PLUG/UNPLUG
        #: answers at flush_size_events(), after the guest got its
        #: interrupt, not while the guest waits (QMP events, metrics).
        self.defer_size_events = False
        self._size_event_due = False
        self.set_requested_size(requested_size_bytes)

    # -- the virtio device (vfiouser_vmem.virtio.VirtioDevice) ------------
    @property
    def memory_size(self) -> int:
        return self.region_size

    def set_memory_address(self, addr: int) -> None:
        self.addr = addr

    def set_config_notifier(self, notify: Callable[[], None]) -> None:
        self.on_config_change = notify

    def queue_handler(self, queue: SplitQueue, memory: GuestMemory) -> VirtioMemQueue:
        # Behind a transport, listeners hear of requests after the interrupt.
        self.defer_size_events = True
        return VirtioMemQueue(self, queue, memory)

    def native_config_reads(self, device_cfg_offset: int, generation_offset: int) -> VirtioMemConfigReads:
        return VirtioMemConfigReads(self, device_cfg_offset, generation_offset)

    def virtio_reset(self) -> None:
        # The block state stays (docs/design.md, "virtio-mem rules"): the
        # driver unplugs all on probe if it needs to.
        log.debug("%s: virtio reset (block state kept: %s plugged)", self.name, format_size(self.plugged_size))

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
        return CONFIG_STRUCT.pack(
            self.block_size,
            self.node_id or 0,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )

    def check_requested_size(self, size_bytes: int) -> None:
        check_requested_size(size_bytes, self.region_size, self.block_size, names=MODEL_NAMES)

    def set_requested_size(self, size_bytes: int) -> None:
        """Ask the guest for a new size (QEMU: qom-set requested-size)."""
        self.check_requested_size(size_bytes)
        before = (self.requested_size, self.usable_region_size)
        self.requested_size = size_bytes
        self._resize_usable_region(can_shrink=False)
        # A configuration change even when nothing changed, as QEMU's
        # virtio_mem_set_requested_size ("We trigger even if the size didn't
        # change"): an operator's nudge makes the driver retry a BUSY plug at
        # once instead of on its retry timer (Linux: 50 s, doubling).
        self._config_changed()
        if before[0] != size_bytes and self.observers:
            self.observers.emit(RequestedSizeChanged(self.name, before[0], size_bytes))

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
        if self.observers:
            self.observers.emit(PluggedSizeChanged(self.name, size))

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

    def arm_c_state(self) -> CData:
        """Decide what the next ``vmem_serve_queue`` call may serve and
        return the ``struct vmem_device_state`` for it; ``c_requests_served``
        must follow before anything else uses the model.  PLUGs and UNPLUGs
        go to Python while a policy is installed, or while ``host_memory``
        must see them."""
        state = self._c
        policy_free = self.policy is None
        state.plug_allowed = policy_free and not self.host_memory.claim_due()
        state.unplug_allowed = policy_free and not self.host_memory.discard_refused()
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
                    self.host_memory.discard(offset, request.nb_blocks * self.block_size)
                except DiscardFailed as exc:
                    # A broken contract (discard_refused() said it would
                    # not fail): the guest has its ACK and the blocks are
                    # unplugged, but this memory stays allocated.  Say so.
                    log.error("%s: %s at offset %#x unplugged but not given back to the host "
                              "(HostMemory.discard_refused() said the discard would work): %s",
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

    def _report_unlogged_refusals(self, count: int) -> None:
        log.warning("%s: %d more refused request(s) in %.0f s were not logged", self.name, count, _LOG_WINDOW_S)

    def _refuse(self, request: Request, response: Response, why: str) -> Response:
        if not self._refusal_log.allow():
            return response
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

    def _policy_refusal(self, request: Request) -> Response | None:
        """The policy's answer when it is not ACK (docs: ``_policy.py``)."""
        policy = self.policy
        if policy is None:
            return None
        try:
            answer = policy.decide(self, request)
            if answer not in allowed_answers(request.type):
                raise ValueError(f"{policy!r} answered {answer!r} to {RequestType(request.type).name}; "
                                 f"a policy answers one of {[a.name for a in allowed_answers(request.type)]}")
        except Exception:
            self.hook_errors.failed("policy", self.name,
                                    f"{RequestType(request.type).name} of {request.nb_blocks} block(s) at "
                                    f"{request.addr:#x} answered BUSY")
            return Response.BUSY
        if answer == Response.ACK:
            return None
        log.info("%s: %s of %d block(s) at %#x answered %s by the plug policy", self.name,
                 RequestType(request.type).name, request.nb_blocks, request.addr, Response(answer).name)
        return Response(answer)

    def _plug(self, request: Request) -> Response:
        if why := self._range_error(request):
            return self._refuse(request, Response.ERROR, why)
        size = request.nb_blocks * self.block_size
        if self.plugged_size + size > self.requested_size:
            # Not an error: the guest asked for more than is requested now
            # (requested_size dropped while it was growing); it retries later.
            if self._refusal_log.allow():
                log.info(
                    "%s: PLUG of %d block(s) at %#x answered NACK: plugged %s + %s > requested %s",
                    self.name, request.nb_blocks, request.addr,
                    format_size(self.plugged_size), format_size(size), format_size(self.requested_size),
                )
            return Response.NACK
        first = self._first_block(request)
        if self.bitmap.range_state(first, request.nb_blocks) != RangeState.UNPLUGGED:
            return self._refuse(request, Response.ERROR, "some of the blocks are already plugged")
        if self.policy is not None and (refusal := self._policy_refusal(request)) is not None:
            return refusal
        try:
            self.host_memory.claim(first * self.block_size, size)
        except PreallocFailed as exc:
            # A host-side problem (virtio_mem_set_block_state answers -EBUSY):
            # the guest retries later.  HostMemory logs the episode, not
            # every request.
            log.debug("%s: PLUG of %d block(s) at %#x answered BUSY: %s", self.name, request.nb_blocks,
                      request.addr, exc)
            return Response.BUSY
        # Plugging is lazy (without prealloc): the host allocates on first guest touch.
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
        if self.policy is not None and (refusal := self._policy_refusal(request)) is not None:
            return refusal
        try:
            self.host_memory.discard(first * self.block_size, request.nb_blocks * self.block_size)
        except DiscardFailed as exc:
            # A host-side problem: BUSY makes the guest retry; ERROR would
            # make Linux mark the device broken.
            return self._refuse(request, Response.BUSY, str(exc))
        self.bitmap.clear_range(first, request.nb_blocks)
        self._plugged_blocks -= request.nb_blocks
        self._request_changed_size()
        return Response.ACK

    def _unplug_all(self) -> Response:
        if self.policy is not None:
            refusal = self._policy_refusal(Request(_UNPLUG_ALL, self.addr, 0))
            if refusal is not None:
                return refusal
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
        """Discard the whole device and mark everything unplugged.

        The whole region, not only the plugged runs: memory a guest put into
        unplugged blocks goes too (as QEMU's virtio_mem_unplug_all discards
        the whole RAM block), and one range costs the host one hole to punch
        (holes cost nothing to punch again) where a fragmented device would
        cost one call per run (docs/scrub.md, "Reset means empty").  On a
        discard failure nothing changes, so the state always matches the host.
        """
        self._unplug_all_blocks(self._size_changed)

    def _unplug_all_blocks(self, size_changed: Callable[[], None]) -> None:
        self.host_memory.discard(0, self.region_size)
        if self._plugged_blocks:
            self.bitmap.clear_all()
            self._plugged_blocks = 0
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
