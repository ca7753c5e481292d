"""The rules of a device's sizes, in one place: the CLI flags, the TOML and
``--device`` configuration, ``DeviceConfig`` and QMP's ``qom-set
requested-size`` all check them here, each naming the setting as its user
wrote it (``SettingNames``) and prefixing where it came from.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.util import hostmem
from vfiouser_vmem.util.sizes import format_size
from vfiouser_vmem.vmem._spec import MIN_BLOCK_SIZE_BYTES

__all__ = [
    "CLI_NAMES", "CONFIG_NAMES", "MODEL_NAMES", "MAX_DEVICE_SIZE_BYTES", "SettingNames", "check_block_size",
    "check_device_settings", "check_requested_size", "check_size", "default_block_size", "small_block_size_warning",
]

#: The largest device served: a 1 TiB device's bitmap is 64 KiB and its BAR
#: still fits a 46-bit guest physical address space (docs/design.md).
MAX_DEVICE_SIZE_BYTES = 1 << 40


@dataclass(frozen=True)
class SettingNames:
    """How the user spelled each setting."""

    size: str = "size"
    block_size: str = "block-size"
    requested_size: str = "requested-size"
    #: How a message refers to the size and the block size it compares with.
    size_phrase: str = "the device's maximum size"
    block_size_phrase: str = "the block-size"
    #: QEMU's own texts for a refused requested-size (the device model, so
    #: QMP and HMP ``qom-set``): hw/virtio/virtio-mem.c,
    #: virtio_mem_set_requested_size.
    qemu_texts: bool = False


#: The device model, and through it QMP/HMP ``qom-set`` and ``Device.resize``.
MODEL_NAMES = SettingNames(qemu_texts=True)
#: The ``--object``/``--device`` options and the TOML file.
CONFIG_NAMES = SettingNames(size_phrase="the size", block_size_phrase="the block size")
#: The single-device flags of ``serve`` and ``qemu-args``.
CLI_NAMES = SettingNames("--size", "--block-size", "--requested-size", "--size", "the block size")


def _refuse(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}" if where else message)


def default_block_size(page_size_bytes: int) -> int:
    """QEMU's default block size for a backend of this page size
    (hw/virtio/virtio-mem.c, virtio_mem_default_block_size): on ordinary
    memory the THP size, so that unplugging never splits a transparent huge
    page; on huge pages the page size (at least 1 MiB)."""
    if page_size_bytes == hostmem.base_page_size():
        return max(page_size_bytes, hostmem.thp_size())
    return max(page_size_bytes, MIN_BLOCK_SIZE_BYTES)


def small_block_size_warning(block_size_bytes: int, page_size_bytes: int, names: SettingNames = SettingNames()
                             ) -> str | None:
    """QEMU's warning for a block size below the default (virtio_mem_device_realize:
    THPs of plugged blocks would cover unplugged ones, unplugging splits them), or None."""
    default = default_block_size(page_size_bytes)
    if block_size_bytes >= default:
        return None
    return (f"'{names.block_size}' property is smaller than the default block size ({default >> 20} MiB): "
            f"{format_size(block_size_bytes)} blocks split transparent huge pages when unplugged")


def check_block_size(block_size_bytes: int, *, page_size_bytes: int = 4096, where: str = "",
                     names: SettingNames = SettingNames()) -> None:
    """A power of two, >= 1 MiB, >= the backend's page size (the huge page
    size for hugetlb).  QEMU takes the THP size (2 MiB) as the *default*
    block size but accepts any block size >= the RAM page size, with a
    warning (hw/virtio/virtio-mem.c, virtio_mem_device_realize); so do we
    (``small_block_size_warning``), so that 1 MiB blocks work on ordinary
    memory."""
    if block_size_bytes < MIN_BLOCK_SIZE_BYTES:
        raise _refuse(where, f"{names.block_size} {format_size(block_size_bytes)} is below the minimum "
                             f"{format_size(MIN_BLOCK_SIZE_BYTES)}")
    if block_size_bytes & (block_size_bytes - 1):
        raise _refuse(where, f"{names.block_size} {format_size(block_size_bytes)} is not a power of two "
                             "(virtio-mem blocks are: 1M, 2M, 4M, ...)")
    if block_size_bytes < page_size_bytes:
        raise _refuse(where, f"{names.block_size} {format_size(block_size_bytes)} is below the backend's page "
                             f"size {format_size(page_size_bytes)}")


def check_size(size_bytes: int, block_size_bytes: int, *, where: str = "",
               names: SettingNames = SettingNames(), maximum_bytes: int | None = MAX_DEVICE_SIZE_BYTES) -> None:
    if size_bytes <= 0 or size_bytes % block_size_bytes:
        raise _refuse(where, f"{names.size} {format_size(size_bytes)} is not a positive multiple of "
                             f"{names.block_size_phrase} {format_size(block_size_bytes)}")
    if maximum_bytes is not None and size_bytes > maximum_bytes:
        raise _refuse(where, f"{names.size} {format_size(size_bytes)} is above the supported maximum of "
                             f"{format_size(maximum_bytes)}")


def check_requested_size(requested_size_bytes: int, size_bytes: int, block_size_bytes: int, *, where: str = "",
                         names: SettingNames = SettingNames()) -> None:
    """TypeError for a value that is not an integer; ConfigError otherwise."""
    if isinstance(requested_size_bytes, bool):
        raise TypeError(f"{names.requested_size} must be an integer, not bool")
    try:
        operator.index(requested_size_bytes)
    except TypeError:
        raise TypeError(f"{names.requested_size} must be an integer, "
                        f"not {type(requested_size_bytes).__name__}") from None
    if requested_size_bytes < 0:
        raise _refuse(where, f"{names.requested_size} {requested_size_bytes} is negative")
    if names.qemu_texts and requested_size_bytes > size_bytes:
        raise _refuse(where, f"'requested-size' cannot exceed the memory backend size({size_bytes:#x})")
    if names.qemu_texts and requested_size_bytes % block_size_bytes:
        raise _refuse(where, f"'requested-size' has to be multiples of 'block-size' ({block_size_bytes:#x})")
    if requested_size_bytes > size_bytes:
        raise _refuse(where, f"{names.requested_size} {format_size(requested_size_bytes)} is above "
                             f"{names.size_phrase} {format_size(size_bytes)}")
    if requested_size_bytes % block_size_bytes:
        raise _refuse(where, f"{names.requested_size} {format_size(requested_size_bytes)} is not a multiple of "
                             f"{names.block_size_phrase} {format_size(block_size_bytes)}")


def check_device_settings(*, size_bytes: int, block_size_bytes: int, requested_size_bytes: int,
                          page_size_bytes: int = 4096, where: str = "",
                          names: SettingNames = SettingNames()) -> None:
    """All of a device's size rules, in the order QEMU checks them."""
    check_block_size(block_size_bytes, page_size_bytes=page_size_bytes, where=where, names=names)
    check_size(size_bytes, block_size_bytes, where=where, names=names)
    check_requested_size(requested_size_bytes, size_bytes, block_size_bytes, where=where, names=names)
