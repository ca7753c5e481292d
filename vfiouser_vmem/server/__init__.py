"""The device server: one vfio-user endpoint per device, and the process
that runs them with their control plane.

This layer may import every layer below it (control, the virtio-mem
device, the transport, the binding) and nothing above (docs/architecture.md).
"""

from vfiouser_vmem.server._app import (
    STOP_SIGNALS,
    Device,
    Server,
    open_server,
    serve,
    service_status,
    share_socket_with_group,
)
from vfiouser_vmem.server._config import UNPLUGGED_ACCESS_ACTIONS, DeviceConfig, check_id
from vfiouser_vmem.server._device_server import DISCARD_CHUNK_BYTES, DeviceServer
from vfiouser_vmem.server._qom import ControlledVmem

__all__ = [
    "DISCARD_CHUNK_BYTES",
    "STOP_SIGNALS",
    "UNPLUGGED_ACCESS_ACTIONS",
    "ControlledVmem",
    "Device",
    "DeviceConfig",
    "DeviceServer",
    "Server",
    "check_id",
    "open_server",
    "serve",
    "service_status",
    "share_socket_with_group",
]
