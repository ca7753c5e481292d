"""The vfio-user binding: libvfio-user through cffi (csrc/ffi_vfu.py).

Thin on purpose: one ``VfuContext`` per device socket, its regions, DMA
mappings, interrupts and resets as Python objects and callbacks, and the
C hooks (notify serve, fast reads) that let a device answer inside a
region access.  It imports nothing of the layers above
(docs/architecture.md).
"""

from vfiouser_vmem.errors import ConnectionLost, VfuError
from vfiouser_vmem.vfio_user._context import (
    CAP_FLAG_READONLY,
    PROT_READ,
    PROT_WRITE,
    DmaRegion,
    IrqType,
    MessageState,
    PciType,
    Region,
    RegionFlag,
    ResetType,
    VfuContext,
)

__all__ = [
    "CAP_FLAG_READONLY",
    "PROT_READ",
    "PROT_WRITE",
    "ConnectionLost",
    "DmaRegion",
    "IrqType",
    "MessageState",
    "PciType",
    "Region",
    "RegionFlag",
    "ResetType",
    "VfuContext",
    "VfuError",
]
