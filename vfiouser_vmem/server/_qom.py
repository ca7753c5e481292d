"""A running device as the control plane sees it (``control.ControlledDevice``):
QOM properties and query-memory-devices in QEMU's shapes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vfiouser_vmem.errors import PropertyNotFound, PropertyReadOnly
from vfiouser_vmem.server._device_server import DeviceServer
from vfiouser_vmem.vmem import MemoryBackendConfig, UnpluggedMemoryFound

__all__ = ["ControlledBackend", "ControlledVmem"]

log = logging.getLogger("vfiouser_vmem.server")


class ControlledVmem:
    """A DeviceServer as the control plane sees it (control.ControlledDevice)."""

    #: The QOM type QEMU's property errors name, "Property 'TYPE.NAME' ..."
    #: (qom/object.c, object_get_typename): the device users add in QEMU.
    QOM_TYPE = "virtio-mem-pci"
    _BACKEND_ALIASES = frozenset({"size", "block-size", "requested-size"})
    _UINT32_MAX = (1 << 32) - 1
    _UINT64_MAX = (1 << 64) - 1

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.id = server.config.id
        self.qom_path = f"/machine/peripheral/{self.id}/virtio-backend"
        #: The NUMA node the device names (None: none given), for info numa.
        self.numa_node: int | None = server.model.node_id
        self._backend = ControlledBackend(server)
        # Built once: management tools and the benchmark poll qom-get every
        # few ms.
        self._prop_table = self._build_props()

    def _props(self) -> dict[str, tuple[str, Callable[[], Any]]]:
        """Property -> (QOM type, getter)."""
        return self._prop_table

    def _build_props(self) -> dict[str, tuple[str, Callable[[], Any]]]:
        s = self.server
        return {
            "size": ("size", lambda: s.model.plugged_size),
            "requested-size": ("size", lambda: s.model.requested_size),
            "block-size": ("size", lambda: s.model.block_size),
            "max-size": ("size", lambda: s.model.region_size),
            "memaddr": ("uint64", lambda: self.server.transport.memory_bar_addr),
            "node": ("uint32", lambda: s.model.node_id or 0),
            "memdev": ("link<memory-backend>", lambda: f"/objects/{self.server.config.memdev}"),
            # Unplugged but not yet given back to the host (docs/discard.md).
            "discard-pending": ("size", lambda: self.server.discards.pending_bytes),
            # Host memory found in unplugged blocks (docs/scrub.md).
            "unplugged-found": ("size", lambda: self.server.unplugged_found_bytes_total),
            "unplugged-reclaimed": ("size", lambda: self.server.unplugged_reclaimed_bytes_total),
            "unplugged-episodes": ("uint64", lambda: self.server.unplugged_episodes_total),
            "unplugged-access": ("string", lambda: self.server.config.unplugged_access),
            "scrub-interval": ("number", lambda: self.server.scrubber.interval_s),
            "scrub-passes": ("uint64", lambda: self.server.scrubber.passes_total),
            # The pid of a client disconnected for unplugged access that still runs (0: none).
            "unplugged-quarantine": ("uint32", lambda: self.server.quarantine[0]
                                     if self.server.quarantined() and self.server.quarantine else 0),
            "x-fail-discards": ("uint32", lambda: self.server.fail_discards),
            "x-hold-requests": ("bool", lambda: self.server.transport.hold_requests),
            # True while a held kick waits (read-only): requests are in the queue.
            "x-requests-pending": ("bool", lambda: self.server.transport.kick_pending),
        }

    def qom_get(self, prop: str) -> Any:
        props = self._props()
        if prop not in props:
            raise PropertyNotFound(f"Property '{self.QOM_TYPE}.{prop}' not found")
        return props[prop][1]()

    def qom_set(self, prop: str, value: Any) -> None:
        if prop == "requested-size":
            # Like QEMU, an integer only: "1G" is the CLI's job; and one a
            # uint64 holds (qobject-input-visitor.c: "Parameter '%s' expects
            # uint64"), not a size the device then calls too large.
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self._UINT64_MAX:
                raise TypeError(f"Parameter 'requested-size' expects uint64 (a byte count), got {value!r}")
            self.server.resize(value)
            return
        if prop == "unplugged-quarantine":
            # Only 0: the operator lifts the quarantine (docs/scrub.md).  An
            # integer, as for every uint32 property: QEMU's visitor refuses a
            # number with a fraction part, 0.0 included (qobject-input-visitor.c).
            if not isinstance(value, int) or isinstance(value, bool) or value != 0:
                raise TypeError(f"Parameter 'unplugged-quarantine' can only be set to 0 (lift it), got {value!r}")
            self.server.lift_quarantine()
            return
        if prop == "x-hold-requests":
            # Testing aid: requests wait in the queue until released, so that
            # a test can change requested-size while a PLUG is in flight.
            if not isinstance(value, bool):
                raise TypeError(f"Parameter 'x-hold-requests' expects bool, got {value!r}")
            transport = self.server.transport
            transport.hold_requests = value
            log.warning("%s: virtio-mem requests %s (x-hold-requests)", self.id, "held" if value else "released")
            if value:
                self.server.update_notify_serve()  # held: no serve inside the notify write either
            else:
                self.server.serve_requests()
            return
        if prop == "x-fail-discards":
            # Like QEMU's x- properties: for testing, not a stable interface.
            # A uint32 property: QEMU's visit_type_uint32 refuses what is
            # outside 0..2^32-1 with "Parameter '%s' expects uint32_t"
            # (qapi/qapi-visit-core.c).
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self._UINT32_MAX:
                raise TypeError(f"Parameter 'x-fail-discards' expects uint32_t (0 to {self._UINT32_MAX}), "
                                f"got {value!r}")
            self.server.fail_discards = value
            log.warning("%s: the next %d discard(s) will fail (x-fail-discards)", self.id, value)
            if value == 0:
                # The injected trouble is over: retry a failed range now.
                self.server.discards.retry_now()
            return
        # qom/object.c (object_property_set, object_property_find_err).  QEMU's
        # virtio-mem-pci has size and block-size as aliases of its
        # virtio-backend child (hw/virtio/virtio-mem-pci.c), so the refusal
        # names that child's type.
        if prop in self._props():
            owner = "virtio-mem" if prop in self._BACKEND_ALIASES else self.QOM_TYPE
            raise PropertyReadOnly(f"Property '{owner}.{prop}' is not writable")
        raise PropertyNotFound(f"Property '{self.QOM_TYPE}.{prop}' not found")

    def qom_list(self) -> list[dict[str, str]]:
        return [{"name": name, "type": typ} for name, (typ, _) in self._props().items()]

    def memory_device_info(self) -> dict[str, Any]:
        m = self.server.model
        return {
            "id": self.id,
            "memaddr": self.server.transport.memory_bar_addr,
            "node": m.node_id or 0,
            "requested-size": m.requested_size,
            "size": m.plugged_size,
            "max-size": m.region_size,
            "block-size": m.block_size,
            "memdev": f"/objects/{self.server.config.memdev}",
        }

    def memory_backend(self) -> ControlledBackend:
        """``/objects/<memdev>`` in the QOM tree (control/_qom.py)."""
        return self._backend

    #: At most this many ranges in one event (the total size covers all).
    MAX_EVENT_RANGES = 64

    def add_unplugged_listener(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """``listener(data)`` for each scrub finding: the QMP event's data
        (control/_events.py, UNPLUGGED_MEMORY_EVENT)."""
        server = self.server

        def on_found(event: UnpluggedMemoryFound) -> None:
            listener({"id": self.id, "qom-path": self.qom_path, "size": event.size_bytes,
                      "ranges": [{"addr": addr, "size": size} for addr, size in event.ranges[:self.MAX_EVENT_RANGES]],
                      "located": event.located, "action": event.action,
                      "total-found": server.unplugged_found_bytes_total})

        return server.model.observers.subscribe(on_found, UnpluggedMemoryFound)

    def add_size_listener(self, listener: Callable[[int], None]) -> Callable[[], None]:
        listeners = self.server.model.size_listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener) if listener in listeners else None


class ControlledBackend:
    """A device's memory backend as QEMU's ``/objects/<memdev>`` shows it:
    ``memory-backend-memfd`` or ``memory-backend-file`` (backends/hostmem.c,
    hostmem-memfd.c, hostmem-file.c), its properties in the order QEMU
    11.1's qom-list gives them, with the values this server uses
    (``MemoryBackendConfig``).  A backend of one's own (``DeviceConfig.backend``)
    shows as a memfd with QEMU's defaults.  QEMU's child ``<id>[0]`` (the
    memory region) is not listed."""

    def __init__(self, server: DeviceServer) -> None:
        config = server.config
        self.id = config.memdev
        mb = config.memory_backend or MemoryBackendConfig(id=config.memdev, size_bytes=config.size_bytes)
        self.qom_type = mb.qom_type
        page_size = server.backend.page_size_bytes
        common: dict[str, tuple[str, Callable[[], Any]]] = {
            "share": ("bool", lambda: mb.share),
            "size": ("int", lambda: mb.size_bytes),
            "dump": ("bool", lambda: mb.dump),
            "prealloc-threads": ("int", lambda: 1),
            "x-use-canonical-path-for-ramblock-id": ("bool", lambda: False),
            "policy": ("HostMemPolicy", lambda: mb.policy),
            "prealloc-context": ("link<thread-context>", lambda: ""),
            # The backend's own prealloc is refused for virtio-mem (the device has it).
            "prealloc": ("bool", lambda: False),
            "reserve": ("bool", lambda: mb.reserve),
            "host-nodes": ("int", lambda: list(mb.host_nodes)),
            "merge": ("bool", lambda: mb.merge),
        }
        if mb.qom_type == "memory-backend-file":
            extra: dict[str, tuple[str, Callable[[], Any]]] = {
                "pmem": ("bool", lambda: False),
                "align": ("int", lambda: page_size),
                "offset": ("int", lambda: 0),
                "mem-path": ("string", lambda: mb.mem_path),
                "rom": ("OnOffAuto", lambda: "auto"),
                "discard-data": ("bool", lambda: mb.discard_data),
                "readonly": ("bool", lambda: False),
            }
        else:
            extra = {
                "hugetlb": ("bool", lambda: mb.hugetlb),
                "seal": ("bool", lambda: mb.seal),
                # QEMU reads back what was set (0: the default huge page size).
                "hugetlbsize": ("int", lambda: mb.hugetlbsize_bytes),
            }
        self._props = {**common, **extra}

    def qom_list(self) -> list[dict[str, str]]:
        return [{"name": name, "type": typ} for name, (typ, _) in self._props.items()]

    def qom_get(self, prop: str) -> Any:
        if prop not in self._props:
            raise PropertyNotFound(f"Property '{self.qom_type}.{prop}' not found")
        return self._props[prop][1]()

    def qom_set(self, prop: str, value: Any) -> None:
        if prop not in self._props:
            raise PropertyNotFound(f"Property '{self.qom_type}.{prop}' not found")
        if prop == "size":
            # backends/hostmem.c host_memory_backend_set_size, its trailing space too.
            raise ValueError(f"cannot change property size of {self.qom_type} ")
        # The other setters of a backend in use (hostmem.c, hostmem-memfd.c).
        raise ValueError("cannot change property value")
