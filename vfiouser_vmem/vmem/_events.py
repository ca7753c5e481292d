"""What a device tells its observers, and how it tells them.

Observers are plain callables taking one event; each event is a frozen
dataclass naming the device (``device_id``).  They are called on the
server's trio thread, after the guest got its answer (never while its vCPU
waits), in the order the events happened.  An observer that raises is
logged with its traceback and counted (``HookErrors``, exported as
``vfiouser_vmem_hook_errors_total``); the device and the other observers
carry on.  docs/api.md shows them in use.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vfiouser_vmem.vmem._spec import Request, RequestType, Response

__all__ = [
    "ClientConnected",
    "ClientDisconnected",
    "DeviceEvent",
    "HookErrors",
    "Observers",
    "PluggedSizeChanged",
    "RequestServed",
    "RequestedSizeChanged",
    "Reset",
    "UnpluggedMemoryFound",
]

log = logging.getLogger("vfiouser_vmem.events")


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    device_id: str


@dataclass(frozen=True, slots=True)
class RequestServed(DeviceEvent):
    """A guest request was answered (``path``: "c" or "python", the request path that served it)."""

    request: Request
    response: Response
    #: From the request read to the answer written (docs/request-path.md).
    service_s: float
    path: str

    @property
    def type(self) -> RequestType:
        return RequestType(self.request.type)


@dataclass(frozen=True, slots=True)
class PluggedSizeChanged(DeviceEvent):
    """The plugged size changed (after the requests that changed it were answered)."""

    plugged_size_bytes: int


@dataclass(frozen=True, slots=True)
class RequestedSizeChanged(DeviceEvent):
    """The host asked the guest for a new size (QMP qom-set, ``Device.resize``)."""

    old_bytes: int
    new_bytes: int


@dataclass(frozen=True, slots=True)
class UnpluggedMemoryFound(DeviceEvent):
    """A scrub pass found host memory in unplugged blocks (docs/scrub.md):
    ``ranges`` are (guest physical address, length) pairs (the BAR offset
    when the BAR has no address yet), ``size_bytes`` their total, ``action``
    what the device did (``reclaim``, ``report``, ``disconnect``)."""

    ranges: tuple[tuple[int, int], ...]
    size_bytes: int
    action: str
    #: False: the backend cannot say where (hugetlbfs); ``ranges`` are then
    #: every unplugged range, somewhere in which ``size_bytes`` are.
    located: bool = True


@dataclass(frozen=True, slots=True)
class Reset(DeviceEvent):
    """A system reset: ``kind`` is libvfio-user's (DEVICE, LOST_CONN, PCI_FLR)."""

    kind: str
    unplugged_bytes: int


@dataclass(frozen=True, slots=True)
class ClientConnected(DeviceEvent):
    """A vfio-user client completed the handshake (``client``: 1, 2, ... per device)."""

    client: int
    pid: int | None


@dataclass(frozen=True, slots=True)
class ClientDisconnected(DeviceEvent):
    client: int
    reason: str


class HookErrors(Counter[str]):
    """Exceptions raised by code plugged into a device, by hook ("policy",
    "observer"): a policy's exception answers the request BUSY, an
    observer's is skipped; both are counted here and logged."""

    def failed(self, hook: str, device_id: str, what: str) -> None:
        self[hook] += 1
        log.exception("%s: %s raised; %s", device_id, hook, what)


E = TypeVar("E", bound=DeviceEvent)


class Observers:
    """The observers of one device."""

    def __init__(self, device_id: str, errors: HookErrors) -> None:
        self.device_id = device_id
        self.errors = errors
        self._callbacks: list[tuple[Callable[[DeviceEvent], None], tuple[type[DeviceEvent], ...]]] = []

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def subscribe(self, callback: Callable[[E], None], *kinds: type[E]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of the ``kinds`` given
        (all events without any); returns the function that unsubscribes it."""
        entry = (callback, tuple(kinds) or (DeviceEvent,))
        self._callbacks.append(entry)  # type: ignore[arg-type]

        def unsubscribe() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)

        return unsubscribe

    def emit(self, event: DeviceEvent) -> None:
        for callback, kinds in list(self._callbacks):
            if isinstance(event, kinds):
                try:
                    callback(event)
                except Exception:
                    self.errors.failed("observer", self.device_id,
                                       f"{type(event).__name__} not delivered to {callback!r}")
