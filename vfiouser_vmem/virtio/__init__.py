"""The virtio 1.x PCI transport and the split virtqueue, for any device type.

Nothing here names a device type: a device implements ``VirtioDevice``
(and its ``QueueHandler``), and the transport does the rest of the virtio
PCI function (spec 4.1, 2.7).  This layer may import the vfio-user binding
and the shared utilities only (docs/architecture.md).
"""

from vfiouser_vmem.virtio._device import NativeConfigReads, NativeQueue, QueueHandler, ServeResult, VirtioDevice
from vfiouser_vmem.virtio._pci import VirtioPciTransport, memory_bar_size, pci_device_id
from vfiouser_vmem.virtio._virtqueue import BlockMap, Chain, DeviceMemory, GuestMemory, SplitQueue

__all__ = [
    "BlockMap",
    "Chain",
    "DeviceMemory",
    "GuestMemory",
    "NativeConfigReads",
    "NativeQueue",
    "QueueHandler",
    "ServeResult",
    "SplitQueue",
    "VirtioDevice",
    "VirtioPciTransport",
    "memory_bar_size",
    "pci_device_id",
]
