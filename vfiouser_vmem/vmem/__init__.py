"""The virtio-mem device: spec, model, block bitmap, discards, backends.

``VirtioMemDevice`` is pure logic (no sockets): the device configuration,
the block state and the request rules of the virtio spec (5.15) in QEMU's
validation order.  It implements the transport's ``VirtioDevice``; its C
request path is ``_virtio.py``.  A ``PlugPolicy`` has its say over PLUGs
and UNPLUGs, observers hear its events, ``HostMemory`` is where unplugged
memory goes and ``MemoryBackend`` where it comes from.  This layer may
import the transport, the vfio-user binding and the shared utilities
(docs/architecture.md).
"""

from vfiouser_vmem.errors import DiscardFailed, ProtocolViolation
from vfiouser_vmem.vmem._backend import (
    BACKEND_TYPES,
    HOST_MEM_POLICIES,
    FileBackend,
    MemfdBackend,
    MemoryBackend,
    MemoryBackendConfig,
    open_backend,
)
from vfiouser_vmem.vmem._bitmap import BlockBitmap, RangeState
from vfiouser_vmem.vmem._discard import DiscardQueue
from vfiouser_vmem.vmem._events import (
    ClientConnected,
    ClientDisconnected,
    DeviceEvent,
    HookErrors,
    Observers,
    PluggedSizeChanged,
    RequestedSizeChanged,
    RequestServed,
    Reset,
    UnpluggedMemoryFound,
)
from vfiouser_vmem.vmem._model import HostMemory, VirtioMemDevice
from vfiouser_vmem.vmem._policy import PlugPolicy
from vfiouser_vmem.vmem._scrub import Scrubber, ScrubFinding, allocated_extents, unplugged_parts
from vfiouser_vmem.vmem._settings import (
    CLI_NAMES,
    CONFIG_NAMES,
    MAX_DEVICE_SIZE_BYTES,
    SettingNames,
    check_block_size,
    check_device_settings,
    check_requested_size,
    check_size,
    default_block_size,
    small_block_size_warning,
)
from vfiouser_vmem.vmem._spec import (
    CONFIG_SIZE,
    MIB,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    USABLE_EXTENT_BYTES,
    VIRTIO_ID_MEM,
    Request,
    RequestType,
    Response,
    pack_response,
    unpack_response,
)

__all__ = [
    "BACKEND_TYPES",
    "HOST_MEM_POLICIES",
    "CLI_NAMES",
    "CONFIG_NAMES",
    "CONFIG_SIZE",
    "MAX_DEVICE_SIZE_BYTES",
    "SettingNames",
    "MIB",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "USABLE_EXTENT_BYTES",
    "VIRTIO_ID_MEM",
    "BlockBitmap",
    "ClientConnected",
    "ClientDisconnected",
    "DeviceEvent",
    "DiscardFailed",
    "DiscardQueue",
    "HookErrors",
    "HostMemory",
    "FileBackend",
    "MemfdBackend",
    "MemoryBackendConfig",
    "MemoryBackend",
    "Observers",
    "PlugPolicy",
    "PluggedSizeChanged",
    "ProtocolViolation",
    "RangeState",
    "Request",
    "RequestServed",
    "RequestType",
    "RequestedSizeChanged",
    "Reset",
    "Response",
    "ScrubFinding",
    "Scrubber",
    "UnpluggedMemoryFound",
    "VirtioMemDevice",
    "pack_response",
    "unpack_response",
    "check_block_size",
    "check_device_settings",
    "check_requested_size",
    "allocated_extents",
    "check_size",
    "default_block_size",
    "open_backend",
    "small_block_size_warning",
    "unplugged_parts",
]
