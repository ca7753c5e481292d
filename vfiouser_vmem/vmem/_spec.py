"""The virtio-mem device type as the virtio spec defines it (5.15): ids,
feature bits, the request and response layouts and the device configuration.

QEMU's numbers where the spec leaves a choice to the device
(hw/virtio/virtio-mem.c) are here too, each saying so.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from vfiouser_vmem.errors import ProtocolViolation

__all__ = [
    "CONFIG_SIZE", "CONFIG_STRUCT", "MAX_NB_BLOCKS", "MIB", "MIN_BLOCK_SIZE_BYTES", "REQUEST_SIZE", "RESPONSE_SIZE",
    "USABLE_EXTENT_BYTES", "VIRTIO_F_VERSION_1", "VIRTIO_ID_MEM", "VIRTIO_MEM_F_ACPI_PXM",
    "VIRTIO_MEM_F_PERSISTENT_SUSPEND", "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
    "Request", "RequestType", "Response", "pack_response", "unpack_response",
]

VIRTIO_ID_MEM = 24

# Feature bits (virtio spec 5.15.3; VIRTIO_F_VERSION_1 is bit 32).
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2
VIRTIO_F_VERSION_1 = 32

MIB = 1 << 20
MIN_BLOCK_SIZE_BYTES = 1 * MIB
# QEMU keeps usable_region_size ahead of requested_size by this much on x86
# (VIRTIO_MEM_USABLE_EXTENT in hw/virtio/virtio-mem.c) so that the guest can
# plug in memory blocks it has already added.
USABLE_EXTENT_BYTES = 256 * MIB
# The driver sends at most 65535 blocks per request (nb_blocks is a u16).
MAX_NB_BLOCKS = 0xFFFF

REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56
_REQUEST = struct.Struct("<H6xQH6x")
_RESPONSE = struct.Struct("<H6xH")
CONFIG_STRUCT = struct.Struct("<QH6xQQQQQ")


class RequestType(enum.IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class Response(enum.IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class Request(NamedTuple):
    """A virtio-mem request (virtio spec 5.15.6.1).  A named tuple: one is
    parsed per request, and a frozen dataclass costs several times more."""

    type: int
    addr: int
    nb_blocks: int

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Request:
        if len(data) < REQUEST_SIZE:
            raise ProtocolViolation(f"request of {len(data)} bytes, virtio-mem requests are {REQUEST_SIZE}")
        return cls(*_REQUEST.unpack_from(data))

    def pack(self) -> bytes:
        return _REQUEST.pack(self.type, self.addr, self.nb_blocks)


def pack_response(response: Response, state: int = 0) -> bytes:
    return _RESPONSE.pack(response, state)


#: The answers without a state, packed once.
PACKED_RESPONSES = {response: pack_response(response) for response in Response}


def unpack_response(data: bytes) -> tuple[int, int]:
    return _RESPONSE.unpack_from(data)
