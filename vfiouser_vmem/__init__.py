"""vfiouser-vmem: an out-of-process virtio-mem PCI device for QEMU's vfio-user-pci.

The public API (docs/api.md) is what this module exports: start devices
in-process with ``open_server`` and hold them (``Server``, ``Device``),
plug a ``PlugPolicy`` into a device, observe its events, configure its
memory backend as QEMU's (``MemoryBackendConfig``) or bring a
``MemoryBackend`` of one's own, catch ``VmemError``.

The layers (docs/architecture.md), each importing only the ones before it:

- ``errors``, ``util``: the error tree and shared utilities;
- ``vfio_user``: thin cffi binding to libvfio-user (vfio-user protocol);
- ``virtio``: the virtio 1.x PCI transport and split virtqueue, for any
  ``VirtioDevice``;
- ``vmem``: the virtio-mem device (spec, model, bitmap, discards, backends);
- ``control``: QMP and metrics;
- ``server``: the device server and the process that runs devices;
- ``cli``: the command line.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

# The version is written once, in pyproject.toml; an installed package (a
# wheel, or the editable install of scripts/setup.sh) has it in its metadata.
__version__: str
try:
    __version__ = _version("vfiouser-vmem")
except _PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
del _PackageNotFoundError, _version

from vfiouser_vmem.errors import (  # noqa: E402  (after __version__, which the layers read)
    BackendError,
    ConfigError,
    DiscardFailed,
    DriverError,
    PreallocFailed,
    SocketPathInUse,
    UnsafeSocketPath,
    VmemError,
)
from vfiouser_vmem.server import Device, DeviceConfig, Server, open_server, serve  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402
from vfiouser_vmem.vmem import (  # noqa: E402
    ClientConnected,
    ClientDisconnected,
    DeviceEvent,
    FileBackend,
    HostMemory,
    MemfdBackend,
    MemoryBackend,
    MemoryBackendConfig,
    PluggedSizeChanged,
    PlugPolicy,
    Request,
    RequestedSizeChanged,
    RequestServed,
    RequestType,
    Reset,
    Response,
    UnpluggedMemoryFound,
    VirtioMemDevice,
    open_backend,
)

__all__ = [
    "BackendError",
    "ClientConnected",
    "ClientDisconnected",
    "ConfigError",
    "Device",
    "DeviceConfig",
    "DeviceEvent",
    "DiscardFailed",
    "DriverError",
    "FileBackend",
    "HostMemory",
    "MemfdBackend",
    "MemoryBackend",
    "MemoryBackendConfig",
    "PlugPolicy",
    "PluggedSizeChanged",
    "PreallocFailed",
    "Request",
    "RequestServed",
    "RequestType",
    "RequestedSizeChanged",
    "Reset",
    "Response",
    "Server",
    "SocketPathInUse",
    "UnsafeSocketPath",
    "UnpluggedMemoryFound",
    "VirtioMemDevice",
    "VmemError",
    "__version__",
    "format_size",
    "open_backend",
    "open_server",
    "parse_size",
    "serve",
]
