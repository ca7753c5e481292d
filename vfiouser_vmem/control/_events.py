"""QMP events: ``MEMORY_DEVICE_SIZE_CHANGE`` and the server's own
``__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND``, rate limited per device.

Events
    ``MEMORY_DEVICE_SIZE_CHANGE`` ``{"id", "size", "qom-path"}`` with a
    ``{"seconds", "microseconds"}`` timestamp (the time of the change), sent
    to every client in command mode.  The server subscribes to each device's
    ``add_size_listener`` when ``serve`` starts, and to devices given to
    ``QmpServer.add_device`` later.

    ``__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND`` ``{"id", "qom-path",
    "size", "ranges": [{"addr", "size"}, ...] (at most 64), "located",
    "action", "total-found"}``: a scrub pass found host memory in the device's
    unplugged blocks (docs/scrub.md).  The name follows QEMU's rule for
    downstream extensions (docs/devel/qapi-code-gen.rst: ``__RFQDN_`` and
    the name), so no client mistakes it for one of QEMU's.  From devices
    with ``add_unplugged_listener``.  A listener call may come from the trio
    thread running ``serve`` or from any other thread (it is then handed to
    the trio thread with ``TrioToken.run_sync_soon``); it never blocks.
    Changes reported while ``serve`` is not running are dropped (there is no
    client to tell).  ``add_device`` itself must be called from the trio
    thread.

Rate limiting
    As QEMU's monitor does (monitor/monitor.c): at most one event per
    ``event_interval_s`` (default 1 s) per device.  The first event goes out
    at once and opens a window; changes inside the window are coalesced, and
    when the window ends the latest of them is sent (opening a new window).
    The final size is therefore always delivered, at most one interval late.
    QEMU keys the limiter on ``qom-path``; we key it on the device id, which
    is the same thing here since ids are unique.  ``event_interval_s=0``
    disables the limiter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from vfiouser_vmem.control._protocol import ControlledDevice

__all__ = ["SIZE_CHANGE_EVENT", "UNPLUGGED_MEMORY_EVENT", "SizeChangeEvents"]

log = logging.getLogger("vfiouser_vmem.qmp")

SIZE_CHANGE_EVENT = "MEMORY_DEVICE_SIZE_CHANGE"
UNPLUGGED_MEMORY_EVENT = "__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND"


@dataclass
class _Throttle:
    """One device's rate-limit window (QEMU's MonitorQAPIEventState)."""

    deadline: float
    pending: dict[str, Any] | None = None


def _timestamp() -> dict[str, int]:
    now_us = time.time_ns() // 1000
    return {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}


class SizeChangeEvents:
    """The size changes of the devices subscribed, as rate-limited events
    handed to ``broadcast``, while started (between :meth:`start` and
    :meth:`stop`, both called on the trio thread)."""

    def __init__(self, interval_s: float, broadcast: Callable[[Mapping[str, Any]], None]) -> None:
        self.interval_s = interval_s
        self._broadcast = broadcast
        self._active = False
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._unsubscribe: dict[str, Callable[[], None]] = {}
        self._throttles: dict[tuple[str, str], _Throttle] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Send events from now on; the rate-limit windows run in ``nursery``."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._nursery = nursery
        self._active = True

    def stop(self) -> None:
        """Unsubscribe from every device and drop what is pending."""
        self._active = False
        self._nursery = None
        for dev_id, remove in list(self._unsubscribe.items()):
            try:
                remove()
            except Exception:
                log.exception("removing the size listener of device %s failed", dev_id)
        self._unsubscribe.clear()
        self._throttles.clear()

    def subscribe(self, device: ControlledDevice) -> None:
        """Listen to ``device``'s size changes (once; until :meth:`stop`)."""
        if device.id in self._unsubscribe:
            return

        def listener(size: int) -> None:
            self._size_changed_from_any_thread(device, size)

        removers = [device.add_size_listener(listener)]
        add_unplugged = getattr(device, "add_unplugged_listener", None)
        if add_unplugged is not None:
            def unplugged(data: dict[str, Any]) -> None:
                self._event_from_any_thread(device, UNPLUGGED_MEMORY_EVENT, data)

            removers.append(add_unplugged(unplugged))

        def remove_all() -> None:
            for remove in removers:
                remove()

        self._unsubscribe[device.id] = remove_all

    def _size_changed_from_any_thread(self, device: ControlledDevice, size: int) -> None:
        self._event_from_any_thread(device, SIZE_CHANGE_EVENT,
                                    {"id": device.id, "size": size, "qom-path": device.qom_path})

    def _event_from_any_thread(self, device: ControlledDevice, name: str, data: dict[str, Any]) -> None:
        if not self._active or self._trio_token is None:
            return
        if threading.get_ident() == self._trio_thread:
            # The transport calls size listeners after the guest has its
            # interrupt (VirtioMemDevice.defer_size_events): send now.
            self._emit(device, name, data, _timestamp())
            return
        try:
            self._trio_token.run_sync_soon(self._emit, device, name, data, _timestamp())
        except trio.RunFinishedError:
            pass

    def _emit(self, device: ControlledDevice, name: str, data: dict[str, Any], timestamp: dict[str, int]) -> None:
        if not self._active or self._nursery is None:
            return
        event = {"event": name, "data": data, "timestamp": timestamp}
        if self.interval_s <= 0:
            self._broadcast(event)
            return
        # One window per event and device, as QEMU's per-event rate limit.
        key = (name, device.id)
        throttle = self._throttles.get(key)
        if throttle is not None:
            throttle.pending = event  # coalesce: only the latest survives
            return
        self._broadcast(event)
        throttle = _Throttle(deadline=trio.current_time() + self.interval_s)
        self._throttles[key] = throttle
        self._nursery.start_soon(self._throttle_window, key, throttle)

    async def _throttle_window(self, key: tuple[str, str], throttle: _Throttle) -> None:
        """End of a rate-limit window: send the pending event and open a new
        window, or close the window when nothing is pending."""
        try:
            while True:
                await trio.sleep_until(throttle.deadline)
                if throttle.pending is None:
                    return
                event, throttle.pending = throttle.pending, None
                self._broadcast(event)
                throttle.deadline = trio.current_time() + self.interval_s
        finally:
            if self._throttles.get(key) is throttle:
                del self._throttles[key]
