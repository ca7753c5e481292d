"""One device's settings, in QEMU's vocabulary, checked when made."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.vmem import (
    CONFIG_NAMES,
    MemoryBackend,
    MemoryBackendConfig,
    PlugPolicy,
    check_device_settings,
    default_block_size,
)

__all__ = ["UNPLUGGED_ACCESS_ACTIONS", "DeviceConfig", "check_id"]

#: What a device does when a scrub finds memory in unplugged blocks (docs/scrub.md).
UNPLUGGED_ACCESS_ACTIONS = ("reclaim", "report", "disconnect")

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
    (``vfiouser_vmem.vmem.check_device_settings``), the block size against
    the backend's page size.  With ``block_size_bytes`` 0 (not given) it is QEMU's
    default for the backend (``vfiouser_vmem.vmem.default_block_size``:
    the THP size on ordinary memory, the huge page size on huge pages)."""

    socket: str
    size_bytes: int
    block_size_bytes: int = 0
    requested_size_bytes: int = 0
    id: str = "vmem0"
    node: int | None = None
    memdev: str = ""
    #: The memory backend (QEMU's ``-object memory-backend-...``); default a
    #: memfd of ``size_bytes`` with QEMU's defaults, named ``memdev``.
    memory_backend: MemoryBackendConfig | None = None
    #: Allocate the blocks of every PLUG before acknowledging it (QEMU's
    #: virtio-mem ``prealloc=on``): BUSY when the host has no memory.
    prealloc: bool = False
    #: Seconds between periodic scrub passes (docs/scrub.md); 0: none (the
    #: passes after each resize and reset still run).
    scrub_interval_s: float = 10.0
    #: What a scrub pass that finds host memory in unplugged blocks does:
    #: ``reclaim`` it, only ``report`` it, or ``disconnect`` the vfio-user
    #: client (and reclaim it).
    unplugged_access: str = "reclaim"
    #: A backend of one's own (``vfiouser_vmem.MemoryBackend``), used instead
    #: of a memfd; the device server closes it when it stops.
    backend: MemoryBackend | None = None
    #: A plug policy (``vfiouser_vmem.PlugPolicy``) consulted for every PLUG and UNPLUG.
    policy: PlugPolicy | None = None

    def __post_init__(self) -> None:
        where = f"device {self.id!r}"
        check_id(self.id, "device id")
        if self.backend is not None and self.memory_backend is not None:
            raise ConfigError(f"{where}: give a backend object or a memory_backend configuration, not both")
        if self.memory_backend is not None:
            self.memdev = self.memory_backend.id
            if self.memory_backend.size_bytes != self.size_bytes:
                raise ConfigError(f"{where}: size {self.size_bytes} differs from its memory backend's size "
                                  f"{self.memory_backend.size_bytes}")
        if not self.memdev:
            self.memdev = f"mem-{self.id}"
        if self.memory_backend is None and self.backend is None:
            self.memory_backend = MemoryBackendConfig(id=self.memdev, size_bytes=self.size_bytes)
        page_size = self.page_size_bytes()
        if not self.block_size_bytes:
            # 0 is "not configured", as QEMU's virtio-mem block-size property has it.
            self.block_size_bytes = default_block_size(page_size)
        check_device_settings(size_bytes=self.size_bytes, block_size_bytes=self.block_size_bytes,
                              requested_size_bytes=self.requested_size_bytes, page_size_bytes=page_size,
                              where=where, names=CONFIG_NAMES)
        if self.prealloc and self.backend is not None and not hasattr(self.backend, "populate"):
            raise ConfigError(f"{where}: prealloc=on needs a backend that can allocate ahead "
                              f"({type(self.backend).__name__} has no populate())")
        if self.node is not None and not 0 <= self.node <= 0xFFFF:
            raise ConfigError(f"{where}: node {self.node} is out of range (0-65535)")
        if not 0 <= self.scrub_interval_s < float("inf"):
            raise ConfigError(f"{where}: scrub-interval {self.scrub_interval_s} is not a number of seconds >= 0 "
                              "(0: no periodic scrub)")
        if self.unplugged_access not in UNPLUGGED_ACCESS_ACTIONS:
            raise ConfigError(f"{where}: unplugged-access {self.unplugged_access!r} is not one of "
                              f"{', '.join(UNPLUGGED_ACCESS_ACTIONS)}")

    def page_size_bytes(self) -> int:
        """The backend's page size: the unit block sizes are checked against."""
        if self.backend is not None:
            return self.backend.page_size_bytes
        assert self.memory_backend is not None
        return self.memory_backend.page_size_bytes()
