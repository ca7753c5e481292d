"""What the virtio PCI transport needs of a device: the ``VirtioDevice`` protocol.

The transport (``_pci.py``) knows the virtio 1.x PCI rules (spec 4.1) and
the split virtqueue (spec 2.7) and nothing of any device type; a device
type (the virtio-mem model of ``vfiouser_vmem.vmem``) implements these
protocols.  As in cloud-hypervisor's ``VirtioDevice`` trait, the transport
never names a device: its PCI device id, features, configuration and
request handling all come from here.

A device has one virtqueue.  Its requests are served by the device's
``QueueHandler``: in Python one chain at a time (``handle``), and, where the
device has one, by a request path in C (``NativeQueue``) that the transport
runs first and that hands back to Python whatever it cannot answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from vfiouser_vmem._blocks import lib as _lib
from vfiouser_vmem.virtio._virtqueue import GuestMemory, SplitQueue

__all__ = ["NativeConfigReads", "NativeQueue", "QueueHandler", "ServeResult", "VirtioDevice"]


class ServeResult(enum.IntEnum):
    """How a ``NativeQueue.serve`` call ended (csrc/vmem_queue.h, VMEM_SERVE_*)."""

    #: No request is left in the queue.
    DONE = _lib.VMEM_SERVE_DONE
    #: The next chain is for ``QueueHandler.handle``; none of it was consumed.
    SLOW = _lib.VMEM_SERVE_SLOW
    #: The call's room for answers is full: call again.
    FULL = _lib.VMEM_SERVE_FULL
    #: Guest memory faulted (``GuestMemory.fault_message``): the queue must stop.
    FAULT = _lib.VMEM_SERVE_FAULT


class NativeQueue(Protocol):
    """A device's request path in C, run by the transport before Python's.

    It must decide exactly as ``QueueHandler.handle`` would, and leave to
    it (``ServeResult.SLOW``, nothing consumed) every chain it is not sure
    of.  What it serves is booked in two steps: the C call answers the
    guest, ``book`` does the Python side (after the answer)."""

    def serve(self) -> tuple[ServeResult, int]:
        """Serve what it can of the queue; (how it ended, how many served)."""

    def book(self, count: int, waited_s: float) -> None:
        """The Python side of the ``count`` requests the last ``serve`` answered,
        in a call of ``waited_s`` seconds."""

    @property
    def notify_fn_address(self) -> int:
        """``int (*)(void *arg, int *need_python)`` to run inside the guest's
        notify write (``VfuContext.set_notify_serve``); ``notify_arg_address`` is its argument."""

    @property
    def notify_arg_address(self) -> int:
        """Valid as long as the object."""

    def prepare_notify(self, irq_vector: int) -> None:
        """Get the notify serve ready for the next notify write; ``irq_vector``
        is the MSI-X vector to raise for its answers, -1 when none may be."""

    def take_notify(self) -> tuple[int, bool, bool]:
        """Book what the last notify serve answered: (how many, interrupt due
        for them, Python must look at the queue)."""

    def drop_notify(self) -> None:
        """Forget what the last notify serve answered, unbooked: a system
        reset undoes it anyway."""


class QueueHandler(Protocol):
    """A device's handler of its virtqueue's requests."""

    @property
    def response_size(self) -> int:
        """Device-writable bytes every request needs for its answer."""

    @property
    def native(self) -> NativeQueue | None:
        """The request path in C, or None (every chain goes to ``handle``)."""

    def handle(self, request: bytes) -> bytes:
        """Answer one request (the chain's device-readable bytes).

        Raises a ``DriverError`` for what no driver may send (the transport
        then stops the queue, as QEMU's virtio_error() does); anything else
        must be answered, not raised."""

    def record(self, request: bytes, response: bytes, service_s: float) -> None:
        """``handle``'s answer went to the guest in ``service_s``: for observers,
        told at ``done``."""

    def done(self) -> None:
        """After the interrupt that answered the requests served since the
        last call: what may wait until the guest is no longer waiting
        (events, observers, metrics)."""


class NativeConfigReads(Protocol):
    """A device's answer in C to reads of its configuration and of
    ``config_generation`` (``VfuContext.set_fast_read``): the C struct is
    the home of the transport's ``config_generation``."""

    @property
    def fn_address(self) -> int:
        """``int (*)(void *arg, char *buf, size_t count, uint64_t offset)``."""

    @property
    def arg_address(self) -> int:
        """Valid as long as the object."""

    config_generation: int
    """Read and written by the transport."""


class VirtioDevice(Protocol):
    """A virtio device type as the PCI transport sees it."""

    @property
    def name(self) -> str:
        """For log lines."""

    @property
    def device_id(self) -> int:
        """The virtio device id (spec 5): the PCI device id is 0x1040 + it."""

    @property
    def config_size(self) -> int:
        """Bytes of the device configuration (the DEVICE_CFG capability)."""

    @property
    def memory_size(self) -> int:
        """Bytes of device memory exposed in a 64-bit memory BAR (0: none)."""

    @property
    def features(self) -> int:
        """The features offered (VIRTIO_F_VERSION_1 is bit 32)."""

    def features_refusal(self, driver_features: int) -> str | None:
        """Why the driver's features cannot be accepted (FEATURES_OK stays clear), or None."""

    def config_bytes(self) -> bytes:
        """The device configuration, ``config_size`` bytes, little endian."""

    def set_memory_address(self, addr: int) -> None:
        """The memory BAR's guest physical address (0: not assigned)."""

    def set_config_notifier(self, notify: Callable[[], None]) -> None:
        """``notify()`` is to be called whenever the configuration changes."""

    def queue_handler(self, queue: SplitQueue, memory: GuestMemory) -> QueueHandler:
        """The handler of the device's virtqueue (called once)."""

    def native_config_reads(self, device_cfg_offset: int, generation_offset: int) -> NativeConfigReads | None:
        """The C answer to configuration reads at those BAR0 offsets, or None."""

    def virtio_reset(self) -> None:
        """The driver reset the device (device_status written 0)."""

    def system_reset(self) -> None:
        """A system reset (vfio-user DEVICE_RESET, a lost connection)."""

