"""One device's settings, in QEMU's vocabulary, checked when made."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.vmem import CONFIG_NAMES, MemoryBackend, PlugPolicy, check_device_settings

__all__ = ["DeviceConfig", "check_id"]

# QEMU's id_wellformed() (util/id.c).
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_ID_RULE = "(a letter, then letters, digits, '-', '.' or '_')"


def check_id(value: str, where: str) -> str:
    """An object or device id, as QEMU's id_wellformed() takes it; ConfigError
    naming ``where`` (``--id``, ``--device '...'``, a TOML table)."""
    if value == "":
        raise ConfigError(f"{where}: the id must not be empty {_ID_RULE}")
    if not _ID_RE.fullmatch(value):
        raise ConfigError(f"{where}: id {value!r} is not a valid QEMU id {_ID_RULE}")
    return value


@dataclass
class DeviceConfig:
    """One device, in QEMU's vocabulary (``-device virtio-mem-pci,...``).

    Made, it is checked (ConfigError naming the device): the id as QEMU
    takes it, the sizes by the rules every entry point shares
    (``vfiouser_vmem.vmem.check_device_settings``).  The backend's page size
    is checked when the device starts."""

    socket: str
    size_bytes: int
    block_size_bytes: int = 2 << 20
    requested_size_bytes: int = 0
    id: str = "vmem0"
    node: int | None = None
    memdev: str = ""
    #: The memfd uses huge pages (``memory-backend-memfd,hugetlb=on``).
    hugetlb: bool = False
    #: A backend of one's own (``vfiouser_vmem.MemoryBackend``), used instead
    #: of a memfd; the device server closes it when it stops.
    backend: MemoryBackend | None = None
    #: A plug policy (``vfiouser_vmem.PlugPolicy``) consulted for every PLUG and UNPLUG.
    policy: PlugPolicy | None = None

    def __post_init__(self) -> None:
        where = f"device {self.id!r}"
        check_id(self.id, "device id")
        if not self.memdev:
            self.memdev = f"mem-{self.id}"
        check_device_settings(size_bytes=self.size_bytes, block_size_bytes=self.block_size_bytes,
                              requested_size_bytes=self.requested_size_bytes, where=where,
                              names=CONFIG_NAMES)
        if self.node is not None and not 0 <= self.node <= 0xFFFF:
            raise ConfigError(f"{where}: node {self.node} is out of range (0-65535)")
