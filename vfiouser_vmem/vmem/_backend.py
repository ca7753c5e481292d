"""Memory backends: the host memory behind the device's memory BAR.

``MemoryBackend`` is what the server needs of one; ``MemfdBackend`` is the
built-in one (QEMU's ``memory-backend-memfd``).  A backend of one's own is
passed in ``DeviceConfig.backend`` (docs/api.md).

The memfd (or a hugetlb memfd) is owned by the server, sized to the whole BAR and
sparse: nothing is allocated until the guest touches plugged memory (docs/design.md,
"Memory through the BAR", "Plug is lazy").  The same fd is exported to QEMU as the mmap-able
BAR, so punching a hole frees the pages in both processes at once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Protocol

from vfiouser_vmem.vmem import _bitmap as blocks

__all__ = ["MemfdBackend", "MemoryBackend"]


class MemoryBackend(Protocol):
    """The host memory of one device.

    ``fd`` is exported to every vfio-user client as the mmap-able memory
    BAR, so it must be a shared mapping's file (memfd, tmpfs, hugetlbfs);
    ``view`` is this process's own shared mapping of it, ``size_bytes``
    long (at least the memory BAR: ``vfiouser_vmem.virtio.memory_bar_size``
    of the device size).  ``discard`` gives a range back to the host (it
    runs on the discard worker thread, and raises ``DiscardFailed``);
    ``allocated_bytes`` is the host memory it holds now (metrics, tests);
    ``close`` frees it all.  ``page_size_bytes`` is the unit it allocates in
    (block sizes below it are refused)."""

    fd: int
    size_bytes: int
    view: memoryview

    @property
    def page_size_bytes(self) -> int: ...

    def discard(self, offset_bytes: int, length_bytes: int) -> None: ...

    def allocated_bytes(self) -> int: ...

    def close(self) -> None: ...


class MemfdBackend:
    """A sparse memfd of ``size_bytes``, mapped shared in this process too
    (for guest buffers that lie in the device's own memory)."""

    def __init__(self, size_bytes: int, *, name: str = "vfiouser-vmem", hugetlb: bool = False) -> None:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if hugetlb:
            flags |= os.MFD_HUGETLB
        self.size_bytes = size_bytes
        self.hugetlb = hugetlb
        self.fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self.fd, size_bytes)
            # The fd goes to every client (the mmap-able BAR): sealed so that
            # none can shrink it under this process's own mapping (touching
            # it would then be SIGBUS here) or grow it.  Punching holes stays
            # allowed (F_SEAL_WRITE is not set).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)

    @property
    def page_size_bytes(self) -> int:
        """The smallest unit the backend allocates and a discard frees: the
        huge page size for hugetlb, the base page size otherwise."""
        if self.hugetlb:
            return os.fstatvfs(self.fd).f_bsize
        return os.sysconf("SC_PAGE_SIZE")

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        blocks.discard(self.fd, offset_bytes, length_bytes)

    def allocated_bytes(self) -> int:
        """Host memory in use: the honest measure (st_blocks * 512)."""
        return blocks.allocated_bytes(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            self.view.release()
            self._map.close()
            os.close(self.fd)
            self.fd = -1
