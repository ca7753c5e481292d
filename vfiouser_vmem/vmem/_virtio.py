"""virtio-mem behind the virtio transport: its queue handler and its C paths.

The transport (``vfiouser_vmem.virtio``) runs a device's request path in C
first and hands Python what it leaves (``NativeQueue``, ``QueueHandler``).
For virtio-mem the C side is csrc/vmem_queue.h (serving the queue, in the
notify write or after a message) and csrc/vmem_config.h (answering reads of
the device configuration); both work on the model's own
``struct vmem_device_state``, so nothing is copied around a call.  Which
path serves what, and why, is in docs/request-path.md and
docs/architecture.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vfiouser_vmem._blocks import ffi as _ffi, lib as _lib
from vfiouser_vmem.errors import DriverError
from vfiouser_vmem.util.native import CData, CField, c_address
from vfiouser_vmem.virtio import GuestMemory, ServeResult, SplitQueue
from vfiouser_vmem.vmem._events import RequestServed
from vfiouser_vmem.vmem._spec import PACKED_RESPONSES, RESPONSE_SIZE, Request, Response

if TYPE_CHECKING:
    from vfiouser_vmem.vmem._model import VirtioMemDevice

__all__ = ["VirtioMemConfigReads", "VirtioMemQueue"]

log = logging.getLogger("vfiouser_vmem.virtio_pci")

_BUSY = PACKED_RESPONSES[Response.BUSY]
_SERVE_RESULTS = {int(r): r for r in ServeResult}


class VirtioMemQueue:
    """The handler of a virtio-mem device's virtqueue (``QueueHandler``)."""

    response_size = RESPONSE_SIZE

    def __init__(self, device: VirtioMemDevice, queue: SplitQueue, memory: GuestMemory) -> None:
        self.device = device
        self.native = NativeVirtioMemQueue(self, queue, memory)
        # Requests answered since the last done(), for the observers.
        self._served: list[RequestServed] = []

    def handle(self, request: bytes) -> bytes:
        try:
            return self.device.handle_request(request)
        except DriverError:
            raise
        except Exception:
            # A bug of the host's side (the model, or what it calls): BUSY,
            # which the driver retries later; ERROR would make Linux mark the
            # device broken, and the request must be answered all the same.
            # The model changes state only after everything that can fail,
            # so nothing changed.
            log.exception("%s: request answered BUSY: the device failed while serving it", self.device.name)
            return _BUSY

    def record(self, request: bytes, response: bytes, service_s: float) -> None:
        if self.device.observers:
            self._served.append(RequestServed(self.device.name, Request.parse(request),
                                              Response(int.from_bytes(response[:2], "little")), service_s, "python"))

    def record_c(self, results: CData, count: int, extra_s: float) -> None:
        """The first ``count`` answers of the C path in ``results``; each
        request's service time is its own time in C plus ``extra_s`` (its
        share of the Python around the call, which the guest waited for too)."""
        name = self.device.name
        for i in range(count):
            r = results[i]
            self._served.append(RequestServed(name, Request(r.type, r.addr, r.nb_blocks), Response(r.response),
                                              r.elapsed_ns * 1e-9 + extra_s, "c"))

    def done(self) -> None:
        self.device.flush_size_events()
        if self._served:
            served, self._served = self._served, []
            emit = self.device.observers.emit
            for event in served:
                emit(event)


class NativeVirtioMemQueue:
    """The virtio-mem request path in C (csrc/vmem_queue.h) as the transport
    runs it (``NativeQueue``): after a vfio-user message (``serve``) and
    inside the guest's notify write (``struct vmem_notify_serve``)."""

    def __init__(self, handler: VirtioMemQueue, queue: SplitQueue, memory: GuestMemory) -> None:
        self._handler = handler
        self._device = handler.device
        self._vring = queue.c_vring
        self._memory = memory.c_memory
        max_served = queue.max_size
        self._served = _ffi.new("struct vmem_served[]", max_served)
        self._nr_served = _ffi.new("uint32_t *")
        self._notify = _ffi.new("struct vmem_notify_serve *")
        self._notify.vq = self._vring
        self._notify.mem = self._memory
        self._notify_served = _ffi.new("struct vmem_served[]", max_served)
        self._notify.served = self._notify_served
        self._notify.max_served = max_served
        self._notify.irq_vector = -1
        self.notify_fn_address = c_address("vmem_serve_on_notify")
        self.notify_arg_address = c_address(self._notify)

    def serve(self) -> tuple[ServeResult, int]:
        rc = _lib.vmem_serve_queue(self._vring, self._memory, self._device.arm_c_state(), self._served,
                                   len(self._served), self._nr_served)
        return _SERVE_RESULTS[rc], self._nr_served[0]

    def book(self, count: int, waited_s: float) -> None:
        self._book(self._served, count, waited_s)

    def _book(self, results: CData, count: int, waited_s: float) -> None:
        self._device.c_requests_served(results, count)
        if self._device.observers:
            in_c_s = sum(results[i].elapsed_ns for i in range(count)) * 1e-9
            self._handler.record_c(results, count, max(0.0, waited_s - in_c_s) / count)

    def prepare_notify(self, irq_vector: int) -> None:
        self._notify.dev = self._device.arm_c_state()
        self._notify.irq_vector = irq_vector

    def take_notify(self) -> tuple[int, bool, bool]:
        c = self._notify
        count = int(c.nr_served)
        if not count and not c.need_python:
            return 0, False, False
        result = count, bool(c.interrupt_due), bool(c.need_python)
        self.drop_notify()
        if count:
            # No Python around the call: the requests' own time in C is what
            # the guest waited for (after the vfio-user message arrived).
            self._book(self._notify_served, count, 0.0)
        return result

    def drop_notify(self) -> None:
        c = self._notify
        c.nr_served = 0
        c.interrupt_due = 0
        c.need_python = 0

    @property
    def notify_state(self) -> CData:
        """The ``struct vmem_notify_serve`` (tests and bench/ read its figures)."""
        return self._notify

    @property
    def notify_results(self) -> CData:
        return self._notify_served


class VirtioMemConfigReads:
    """The C answer to reads of a virtio-mem device's configuration and of
    ``config_generation`` (csrc/vmem_config.h, ``struct vmem_bar0_reads``):
    the driver reads them after every resize, and each read is a vfio-user
    round trip the vCPU waits for (docs/request-path.md)."""

    config_generation = CField("config_generation")

    def __init__(self, device: VirtioMemDevice, device_cfg_offset: int, generation_offset: int) -> None:
        self._c = _ffi.new("struct vmem_bar0_reads *")
        self._c.dev = device.c_state
        self._c.region_size = device.region_size
        self._c.node_id = device.node_id or 0
        self._c.device_cfg_offset = device_cfg_offset
        self._c.generation_offset = generation_offset
        self.fn_address = c_address("vmem_bar0_fast_read")
        self.arg_address = c_address(self._c)
