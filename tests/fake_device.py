"""A stand-in for a running virtio-mem device, implementing
``vfiouser_vmem.control.ControlledDevice`` without any device model.

Only ``requested-size`` is writable (a multiple of ``block-size``, at most
``max-size``), as on a realized QEMU virtio-mem device.  The plugged ``size``
changes only when the test says the guest (un)plugged memory:
``set_plugged_size(n)`` updates it and calls the size listeners, like the
real device does when the driver's requests succeed.
"""

from __future__ import annotations

from typing import Any, Callable

from vfiouser_vmem.errors import PropertyNotFound, PropertyReadOnly

MiB = 1 << 20
GiB = 1 << 30

_PROPERTY_TYPES = {
    "size": "size",
    "requested-size": "size",
    "block-size": "size",
    "max-size": "size",
    "memaddr": "uint64",
    "node": "uint32",
    "memdev": "link<memory-backend>",
}


class FakeDevice:
    def __init__(
        self,
        id: str = "vmem0",
        *,
        max_size: int = 8 * GiB,
        block_size: int = 2 * MiB,
        requested_size: int = 0,
        size: int = 0,
        memaddr: int = 0x140000000,
        node: int = 0,
        memdev: str | None = None,
    ) -> None:
        self.id = id
        self.qom_path = f"/machine/peripheral/{id}/virtio-backend"
        self.values: dict[str, Any] = {
            "size": size,
            "requested-size": requested_size,
            "block-size": block_size,
            "max-size": max_size,
            "memaddr": memaddr,
            "node": node,
            "memdev": memdev if memdev is not None else f"/objects/mem-{id}",
        }
        self._listeners: list[Callable[[int], None]] = []

    # -- ControlledDevice ----------------------------------------------------

    def qom_get(self, prop: str) -> Any:
        if prop not in self.values:
            raise PropertyNotFound(f"Property '{self.id}.{prop}' not found")
        return self.values[prop]

    def qom_set(self, prop: str, value: Any) -> None:
        if prop not in self.values:
            raise PropertyNotFound(f"Property '{self.id}.{prop}' not found")
        if prop != "requested-size":
            raise PropertyReadOnly(f"Property '{self.id}.{prop}' is not writable")
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Parameter '{prop}' expects uint64")
        if value < 0:
            raise ValueError(f"'{prop}' must not be negative")
        block_size = self.values["block-size"]
        max_size = self.values["max-size"]
        if value % block_size:
            raise ValueError(f"'{prop}' has to be multiples of 'block-size' (0x{block_size:x})")
        if value > max_size:
            raise ValueError(f"'{prop}' cannot exceed the memory backend size (0x{max_size:x})")
        self.values[prop] = value

    def qom_list(self) -> list[dict[str, str]]:
        return [{"name": "type", "type": "string"}] + [
            {"name": name, "type": kind} for name, kind in _PROPERTY_TYPES.items()
        ]

    def memory_device_info(self) -> dict[str, Any]:
        return {"id": self.id, **{name: self.values[name] for name in _PROPERTY_TYPES}}

    def add_size_listener(self, listener: Callable[[int], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            self._listeners.remove(listener)

        return remove

    # -- test controls -------------------------------------------------------

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def set_plugged_size(self, size: int) -> None:
        """Simulate the guest having (un)plugged memory: ``size`` is the new
        plugged size; listeners are called as the real device calls them."""
        self.values["size"] = size
        for listener in list(self._listeners):
            listener(size)
