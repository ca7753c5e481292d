"""The QOM tree QMP and the HMP share: ``/``, ``/machine``,
``/machine/peripheral``, each device, its ``virtio-backend`` and each
device's memory backend under ``/objects``.

QEMU's tree (qom/object.c) has far more in it; this one holds what a
management tool looks at for a virtio-mem device, in QEMU's shapes:

- every object lists ``type`` (``string``) first, as QEMU's
  object_class_init adds it to every class before anything else; its value
  is the object's QOM type (``container`` for the containers);
- children are listed as ``child<TYPE>``, links as ``link<TYPE>``;
- paths resolve as object_resolve_path does: absolute paths component by
  component (empty components, ``//`` or a trailing ``/``, are skipped;
  links are followed), and a path not starting with ``/`` is a *partial*
  path: the one object from which those components lead somewhere, links
  followed as in an absolute path (object_resolve_partial_path tries each
  object, descending through children only: ``vm0/memdev`` is the backend),
  or nothing when several do (ambiguous).

Errors are QEMU's (qom/qom-qmp-cmds.c): a path naming nothing is class
``DeviceNotFound`` "Device 'X' not found"; qom-list of an ambiguous partial
path says "Path 'X' is ambiguous" (GenericError), and qom-get and qom-set
call an ambiguous path not found, as QEMU does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from vfiouser_vmem.control._arguments import CommandError
from vfiouser_vmem.control._protocol import ControlledDevice
from vfiouser_vmem.errors import PropertyNotFound, PropertyReadOnly

__all__ = ["QomBackend", "QomNode", "QomTree", "memdev_info", "property_error"]


class QomBackend(Protocol):
    """A memory backend (``/objects/ID``) as the tree needs it: what a
    device's optional ``memory_backend()`` returns."""

    #: The backend's id (the device's ``memdev``) and QOM type
    #: (``memory-backend-memfd``).
    id: str
    qom_type: str

    def qom_get(self, prop: str) -> Any: ...

    def qom_set(self, prop: str, value: Any) -> None: ...

    def qom_list(self) -> list[dict[str, str]]:
        """The properties but ``type``, in QEMU's order."""


def memdev_info(backend: QomBackend) -> dict[str, Any]:
    """A backend's query-memdev entry (hw/core/machine-qmp-cmds.c, query_memdev:
    Memdev in qapi/machine.json), read from its QOM properties; the keys in
    the order QEMU 11.1 sends them."""
    get = backend.qom_get
    return {"share": get("share"), "reserve": get("reserve"), "prealloc": get("prealloc"),
            "host-nodes": list(get("host-nodes")), "size": get("size"), "merge": get("merge"), "dump": get("dump"),
            "policy": get("policy"), "id": backend.id}


class QomNode:
    """One object of the tree: its type, its properties, its children and links."""

    def __init__(self, qom_type: str, *, props: Any = None,
                 children: Callable[[], Iterable[tuple[str, QomNode]]] | None = None,
                 links: Callable[[], dict[str, str]] | None = None, owner: str | None = None) -> None:
        self.qom_type = qom_type
        #: Who an error without a message names ("Property 'OWNER.x' ..."):
        #: a device's id, as QMP always said, else the type.
        self.owner = owner or qom_type
        #: An object with qom_get/qom_set/qom_list (a device, a backend), or None.
        self._props = props
        self._children = children
        self._links = links

    def children(self) -> list[tuple[str, QomNode]]:
        return list(self._children()) if self._children is not None else []

    def links(self) -> dict[str, str]:
        """Link property -> the path it points to (followed by absolute paths)."""
        return self._links() if self._links is not None else {}

    def qom_list(self) -> list[dict[str, str]]:
        entries = [{"name": "type", "type": "string"}]
        if self._props is not None:
            entries += [e for e in self._props.qom_list() if e.get("name") != "type"]
        entries += [{"name": name, "type": f"child<{child.qom_type}>"} for name, child in self.children()]
        return entries

    def qom_get(self, prop: str) -> Any:
        if prop == "type":
            return self.qom_type
        if self._props is not None:
            return self._props.qom_get(prop)
        # QEMU reads a child property as the child's canonical path; this tree
        # does not (docs/monitor.md).
        raise PropertyNotFound(f"Property '{self.qom_type}.{prop}' not found")

    def qom_set(self, prop: str, value: Any) -> None:
        if self._props is not None:
            if prop == "type":
                raise PropertyReadOnly(f"Property '{self.qom_type}.type' is not writable")
            self._props.qom_set(prop, value)
            return
        if prop == "type" or any(name == prop for name, _ in self.children()):
            raise PropertyReadOnly(f"Property '{self.qom_type}.{prop}' is not writable")
        raise PropertyNotFound(f"Property '{self.qom_type}.{prop}' not found")

    def property_type(self, prop: str) -> str | None:
        for entry in self.qom_list():
            if entry["name"] == prop:
                return entry["type"]
        return None


class QomTree:
    """The tree over a set of devices, built from them at each lookup (devices
    may come later: QmpServer.add_device)."""

    def __init__(self, devices: Callable[[], Iterator[ControlledDevice]]) -> None:
        self._devices = devices

    # -- the tree --------------------------------------------------------------

    def root(self) -> QomNode:
        return QomNode("container", children=lambda: [
            ("machine", QomNode("container", children=lambda: [
                ("peripheral", QomNode("container", children=self._peripherals)),
            ])),
            ("objects", QomNode("container", children=self._backends)),
        ])

    def _peripherals(self) -> list[tuple[str, QomNode]]:
        nodes = []
        seen: set[str] = set()
        for device in self._devices():
            if device.id in seen:
                continue
            seen.add(device.id)
            nodes.append((device.id, self.device_node(device)))
        return nodes

    @staticmethod
    def _memdev_link(device: ControlledDevice) -> Callable[[], dict[str, str]]:
        def links() -> dict[str, str]:
            try:
                memdev = device.qom_get("memdev")
            except Exception:  # a device without one links nowhere
                return {}
            return {"memdev": memdev} if isinstance(memdev, str) and memdev else {}
        return links

    def device_node(self, device: ControlledDevice) -> QomNode:
        """``/machine/peripheral/ID``: the PCI device (virtio-mem-pci), whose
        child ``virtio-backend`` is the virtio device (virtio-mem).  Both show
        the device's properties, as QEMU's virtio-mem-pci aliases those of
        its backend (hw/virtio/virtio-mem-pci.c)."""
        backend = QomNode("virtio-mem", props=device, links=self._memdev_link(device), owner=device.id)
        return QomNode("virtio-mem-pci", props=device, children=lambda: [("virtio-backend", backend)],
                       links=self._memdev_link(device), owner=device.id)

    def backends(self) -> list[QomBackend]:
        """The devices' memory backends, once each, in the devices' order."""
        found: list[QomBackend] = []
        seen: set[str] = set()
        for device in self._devices():
            get_backend = getattr(device, "memory_backend", None)
            backend = get_backend() if get_backend is not None else None
            if backend is None or backend.id in seen:
                continue
            seen.add(backend.id)
            found.append(backend)
        return found

    def _backends(self) -> list[tuple[str, QomNode]]:
        return [(backend.id, QomNode(backend.qom_type, props=backend)) for backend in self.backends()]

    # -- resolving paths ---------------------------------------------------------

    def resolve(self, path: str) -> tuple[QomNode | None, bool]:
        """(node, ambiguous), as object_resolve_path: the node or None."""
        # A device's bare id and its qom_path (its events' path) name it as
        # they always have, first: QEMU resolves them alike (a partial path,
        # an absolute one), and no backend named like a device hides it.
        for device in self._devices():
            if path == device.id or path == device.qom_path:
                node = self.device_node(device)
                if path == device.qom_path and path.endswith("/virtio-backend"):
                    node = dict(node.children())["virtio-backend"]
                return node, False
        if path.startswith("/"):
            return self._resolve_abs(self.root(), [p for p in path.split("/") if p], depth=0), False
        parts = [p for p in path.split("/") if p]
        if not parts:
            return None, True  # QEMU: "" matches every object
        matches: list[QomNode] = []
        self._partial(self.root(), parts, matches)
        if len(matches) == 1:
            return matches[0], False
        return None, len(matches) > 1

    def _resolve_abs(self, node: QomNode, parts: list[str], depth: int) -> QomNode | None:
        for part in parts:
            child = dict(node.children()).get(part)
            if child is None:
                target = node.links().get(part)
                if target is None or depth > 8:
                    return None
                child = self._resolve_abs(self.root(), [p for p in target.split("/") if p], depth + 1)
                if child is None:
                    return None
            node = child
        return node

    def _partial(self, node: QomNode, parts: list[str], matches: list[QomNode]) -> None:
        # object_resolve_partial_path: try the path from each object with
        # object_resolve_abs_path (which follows links: "vm0/memdev" is the
        # backend), then descend into its children (only children: the
        # objects tried are each object of the tree once).
        found = self._resolve_abs(node, parts, depth=0)
        if found is not None:
            matches.append(found)
        for _, child in node.children():
            self._partial(child, parts, matches)

    def lookup(self, path: str, *, for_list: bool = False) -> QomNode:
        """The node ``path`` names, or CommandError with QEMU's text."""
        node, ambiguous = self.resolve(path)
        if node is None:
            if ambiguous and for_list:
                raise CommandError(f"Path '{path}' is ambiguous")
            raise CommandError(f"Device '{path}' not found", "DeviceNotFound")
        return node

    # -- the commands ------------------------------------------------------------

    def qom_list(self, path: str) -> list[dict[str, str]]:
        return self.lookup(path, for_list=True).qom_list()

    def qom_get(self, path: str, prop: str) -> Any:
        node = self.lookup(path)
        try:
            return node.qom_get(prop)
        except (PropertyNotFound, PropertyReadOnly, ValueError, TypeError) as exc:
            raise property_error(exc, node.owner, prop) from exc

    def qom_set(self, path: str, prop: str, value: Any) -> None:
        node = self.lookup(path)
        try:
            node.qom_set(prop, value)
        except (PropertyNotFound, PropertyReadOnly, ValueError, TypeError) as exc:
            raise property_error(exc, node.owner, prop) from exc


def property_error(exc: Exception, owner: str, prop: str) -> CommandError:
    """The QMP error for what an object's qom_get/qom_set raised."""
    if isinstance(exc, PropertyNotFound):
        return CommandError(str(exc) or f"Property '{owner}.{prop}' not found")
    if isinstance(exc, PropertyReadOnly):
        return CommandError(str(exc) or f"Property '{owner}.{prop}' is not writable")
    return CommandError(str(exc) or f"Invalid value for property '{owner}.{prop}'")
