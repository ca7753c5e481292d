"""What the host has to give: huge page pools, NUMA nodes, THP, filesystems.

Read from sysfs and procfs each time they are asked (a pool changes while the
server runs: an operator writes ``/proc/sys/vm/nr_hugepages``).  Nothing here
knows about virtio-mem; the memory backends (vmem/_backend.py) and the
device settings (vmem/_settings.py) decide what to do with the answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vfiouser_vmem._blocks import lib
from vfiouser_vmem.util.sizes import format_size

__all__ = [
    "HUGETLBFS_MAGIC",
    "TMPFS_MAGIC",
    "HugePagePool",
    "base_page_size",
    "default_huge_page_size",
    "filesystem_type",
    "huge_page_pool",
    "huge_page_sizes",
    "numa_nodes",
    "thp_size",
]

HUGEPAGES_SYSFS = "/sys/kernel/mm/hugepages"
NODES_SYSFS = "/sys/devices/system/node"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"
#: statfs(2) f_type of hugetlbfs and tmpfs (linux/magic.h).
HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994
#: The fallback and minimum when the kernel does not say (QEMU's
#: VIRTIO_MEM_MIN_BLOCK_SIZE, hw/virtio/virtio-mem.c: no THP, no restriction).
_NO_THP_BYTES = 1 << 20


def base_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def huge_page_sizes() -> list[int]:
    """Every huge page size this kernel has a pool for, smallest first
    (``/sys/kernel/mm/hugepages/hugepages-<N>kB``)."""
    try:
        names = os.listdir(HUGEPAGES_SYSFS)
    except OSError:
        return []
    sizes = []
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            try:
                sizes.append(int(name[len("hugepages-"):-2]) * 1024)
            except ValueError:
                continue
    return sorted(sizes)


def default_huge_page_size() -> int | None:
    """The kernel's default huge page size (``Hugepagesize`` in /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class HugePagePool:
    """One huge page size's pool, as the kernel counts it now."""

    page_size_bytes: int
    total: int
    free: int
    #: Promised to mappings but not yet faulted in: free pages others cannot take.
    reserved: int

    @property
    def available(self) -> int:
        """Pages a new reservation or fault can still get."""
        return max(0, self.free - self.reserved)

    def describe(self) -> str:
        return (f"{self.available} of {self.total} {format_size(self.page_size_bytes)} huge pages free "
                f"({self.free} free, {self.reserved} of them reserved)")


def huge_page_pool(page_size_bytes: int) -> HugePagePool:
    """The pool of ``page_size_bytes`` pages; all zero if the kernel has none."""
    directory = os.path.join(HUGEPAGES_SYSFS, f"hugepages-{page_size_bytes // 1024}kB")

    def read(name: str) -> int:
        try:
            with open(os.path.join(directory, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    return HugePagePool(page_size_bytes, read("nr_hugepages"), read("free_hugepages"), read("resv_hugepages"))


def numa_nodes() -> list[int]:
    """The host's NUMA nodes that exist now (``/sys/devices/system/node/nodeN``);
    a kernel without NUMA has node 0 only."""
    try:
        names = os.listdir(NODES_SYSFS)
    except OSError:
        return [0]
    nodes = sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())
    return nodes or [0]


def thp_size() -> int:
    """The size of a transparent huge page, as QEMU's virtio-mem probes it
    (hw/virtio/virtio-mem.c, virtio_mem_thp_size): 1 MiB when the kernel
    has no THP, else ``hpage_pmd_size``, else 2 MiB (x86-64)."""
    if not os.path.exists(THP_SYSFS):
        return _NO_THP_BYTES
    try:
        with open(os.path.join(THP_SYSFS, "hpage_pmd_size")) as f:
            value = int(f.read())
        if value > 0 and value & (value - 1) == 0:
            return value
    except (OSError, ValueError):
        pass
    return 2 << 20


def filesystem_type(path_or_fd: str | int) -> int:
    """statfs(2) ``f_type`` of a path or an open fd (``HUGETLBFS_MAGIC``, ...).
    os.statvfs does not report it; the C helper does (csrc/vmem_hostmem.c)."""
    if isinstance(path_or_fd, int):
        fd, close = path_or_fd, False
    else:
        fd, close = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC | os.O_PATH), True
    try:
        magic = lib.vmem_fs_magic(fd)
    finally:
        if close:
            os.close(fd)
    if magic < 0:
        raise OSError(-magic, os.strerror(-magic), path_or_fd if isinstance(path_or_fd, str) else None)
    return magic
