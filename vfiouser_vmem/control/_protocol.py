"""What the control plane (QMP, CLI) needs from a device, and nothing more.

The server adapts each running device to ``ControlledDevice``; the QMP server
(``control/_qmp.py``) only talks to this protocol, so that it can be tested with a fake
and never reaches into the device model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class ControlledDevice(Protocol):
    #: The device's id, as given by ``--id`` (QEMU's ``-device ...,id=``).
    id: str
    #: QOM path used in MEMORY_DEVICE_SIZE_CHANGE events, like QEMU's
    #: ``/machine/peripheral/<id>/virtio-backend``.
    qom_path: str

    def qom_get(self, prop: str) -> Any:
        """Value of a QOM property; raises PropertyNotFound."""

    def qom_set(self, prop: str, value: Any) -> None:
        """Set a QOM property; raises PropertyNotFound, PropertyReadOnly, or
        ValueError/TypeError whose message is the QMP error description."""

    def qom_list(self) -> list[dict[str, str]]:
        """``[{"name": ..., "type": ...}, ...]`` as qom-list returns it."""

    def memory_device_info(self) -> dict[str, Any]:
        """The ``data`` member of this device's query-memory-devices entry."""

    def add_size_listener(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call ``listener(size_bytes)`` whenever the plugged size changes;
        returns a function that removes the listener."""
