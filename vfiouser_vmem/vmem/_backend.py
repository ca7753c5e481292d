"""Memory backends: the host memory behind the device's memory BAR.

``MemoryBackend`` is what the server needs of one.  The built-in ones are
QEMU's: ``memory-backend-memfd`` (``MemfdBackend``) and
``memory-backend-file`` (``FileBackend``), configured with QEMU's properties
in a ``MemoryBackendConfig`` and opened with ``open_backend``.  A backend of
one's own is passed in ``DeviceConfig.backend`` (docs/api.md).

The server owns the backend; its fd is exported to QEMU as the mmap-able BAR,
so punching a hole frees the pages in both processes at once
(docs/backends.md).  The backend holds exactly the device's size: the BAR is
a power of two, and its part past the device is not mmap-able (the server
answers it, docs/backends.md, "Sized to the device").  It is sparse: nothing
is allocated until the guest touches plugged memory, or, with the device's
``prealloc=on``, until the PLUG (``populate``).
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import mmap
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Protocol

from vfiouser_vmem._blocks import ffi, lib
from vfiouser_vmem.errors import BackendError, ConfigError, PreallocFailed
from vfiouser_vmem.util import hostmem
from vfiouser_vmem.util.sizes import format_size
from vfiouser_vmem.vmem import _bitmap as blocks

__all__ = [
    "BACKEND_TYPES",
    "HOST_MEM_POLICIES",
    "FileBackend",
    "MemfdBackend",
    "MemoryBackend",
    "MemoryBackendConfig",
    "open_backend",
]

log = logging.getLogger("vfiouser_vmem.server")

#: The qom-types of the built-in backends.
BACKEND_TYPES = ("memory-backend-memfd", "memory-backend-file")
#: QEMU's HostMemPolicy (qapi/machine.json) -> the kernel's MPOL_* mode.
HOST_MEM_POLICIES = {"default": 0, "preferred": 1, "bind": 2, "interleave": 3}
_MPOL_PREFERRED_MANY = 5  # linux/mempolicy.h, since 5.15
#: The most host nodes a policy names (QEMU's MAX_NODES, include/system/numa.h).
MAX_HOST_NODES = 128
_MAP_NORESERVE = 0x4000  # asm-generic/mman-common.h; the mmap module lacks it


class MemoryBackend(Protocol):
    """The host memory of one device.

    ``fd`` is exported to every vfio-user client as the mmap-able memory
    BAR, so it must be a shared mapping's file (memfd, tmpfs, hugetlbfs);
    ``view`` is this process's own shared mapping of it, ``size_bytes``
    long (the device's size; the BAR's part beyond it is not mapped).
    ``discard`` gives a range back to the host (it runs on the discard
    worker thread, and raises ``DiscardFailed``); ``allocated_bytes`` is
    the host memory it holds now (metrics, tests); ``close`` frees it all.
    ``page_size_bytes`` is the unit it allocates in (block sizes below it
    are refused).

    A backend may also have ``populate(offset_bytes, length_bytes)``, which
    allocates a range before a PLUG is acknowledged (the device's
    ``prealloc=on``) and raises ``PreallocFailed`` when the host has no
    memory for it; a backend without it cannot serve a prealloc device."""

    fd: int
    size_bytes: int
    view: memoryview

    @property
    def page_size_bytes(self) -> int: ...

    def discard(self, offset_bytes: int, length_bytes: int) -> None: ...

    def allocated_bytes(self) -> int: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------
# Configuration: QEMU's properties of a memory backend


@dataclass
class MemoryBackendConfig:
    """A memory backend in QEMU's vocabulary (``-object memory-backend-memfd,...``
    or ``memory-backend-file``; backends/hostmem.c, hostmem-memfd.c,
    hostmem-file.c), with QEMU's defaults where this server can follow them.

    Made, it is checked (ConfigError naming ``where``) for what does not
    depend on the host; ``check_host`` checks the rest (the huge page sizes,
    NUMA nodes and paths this host has), and ``open_backend`` makes it.
    The table of what each property does here is docs/backends.md."""

    id: str
    size_bytes: int
    qom_type: str = "memory-backend-memfd"
    #: Always on: QEMU maps the server's memory (share=off has no meaning here).
    share: bool = True
    #: memory-backend-memfd: huge pages, of ``hugetlbsize_bytes`` (0: the
    #: kernel's default huge page size).
    hugetlb: bool = False
    hugetlbsize_bytes: int = 0
    #: memory-backend-memfd: F_SEAL_GROW | F_SEAL_SHRINK, so that no client
    #: can change the size under the server's mapping (a SIGBUS here).
    seal: bool = True
    #: Reserve swap space / huge pages for the whole backend (off: MAP_NORESERVE).
    reserve: bool = True
    #: Include the server's mapping in its core dumps.  Off by default here
    #: (QEMU's default is the machine's dump-guest-core, on): a crash dump of
    #: the device server should not carry the guest's memory.
    dump: bool = False
    #: KSM: refused (on), because KSM merges private anonymous memory only.
    merge: bool = False
    policy: str = "default"
    host_nodes: tuple[int, ...] = ()
    #: memory-backend-file: the file, or a directory to create (and unlink) one in.
    mem_path: str | None = None
    #: memory-backend-file: punch the whole file when the server stops.
    discard_data: bool = False
    #: How messages refer to it ("--object '...'", a TOML table); default "memory backend 'ID'".
    where: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.where:
            self.where = f"memory backend {self.id!r}"
        where = self.where
        if self.qom_type == "memory-backend-ram":
            raise ConfigError(
                f"{where}: memory-backend-ram is not possible: QEMU maps the device's memory from the server, "
                "so it must be a shared file; write memory-backend-memfd (shared memory, as QEMU's default "
                "memory-backend-ram would be), or memory-backend-file with share=on")
        if self.qom_type not in BACKEND_TYPES:
            raise ConfigError(f"{where}: qom-type {self.qom_type!r} is not a memory backend this server has "
                              f"(known: {', '.join(BACKEND_TYPES)})")
        if self.size_bytes <= 0:
            raise ConfigError(f"{where}: size must be positive")
        if not self.share:
            default = " (memory-backend-file's default)" if self.qom_type == "memory-backend-file" else ""
            raise ConfigError(
                f"{where}: share=off{default} is not possible: QEMU maps the server's memory, so it is always "
                "shared; write share=on")
        if self.merge:
            raise ConfigError(f"{where}: merge=on is not possible: KSM merges private anonymous memory only, "
                              "and the device's memory is a shared file")
        is_file = self.qom_type == "memory-backend-file"
        if is_file:
            if not self.mem_path:
                raise ConfigError(f"{where}: mem-path= is required (a file, or a directory to create one in)")
            if self.hugetlb or self.hugetlbsize_bytes:
                raise ConfigError(f"{where}: hugetlb= is a property of memory-backend-memfd; for huge pages "
                                  "give a mem-path on a hugetlbfs mount")
        else:
            if self.mem_path is not None:
                raise ConfigError(f"{where}: mem-path= is a property of memory-backend-file")
            if self.discard_data:
                raise ConfigError(f"{where}: discard-data= is a property of memory-backend-file "
                                  "(a memfd's memory is freed when the server exits anyway)")
            if self.hugetlbsize_bytes and not self.hugetlb:
                raise ConfigError(f"{where}: hugetlbsize= needs hugetlb=on")
        if self.policy not in HOST_MEM_POLICIES:
            raise ConfigError(f"{where}: policy {self.policy!r} is not one of {', '.join(HOST_MEM_POLICIES)}")
        self.host_nodes = tuple(sorted(set(self.host_nodes)))
        for node in self.host_nodes:
            if not 0 <= node < MAX_HOST_NODES:
                raise ConfigError(f"{where}: Invalid host-nodes value: {node} (0-{MAX_HOST_NODES - 1})")
        # backends/hostmem.c, host_memory_backend_memory_complete: QEMU's words.
        if self.host_nodes and self.policy == "default":
            raise ConfigError(f"{where}: host-nodes must be empty for policy default, or you should explicitly "
                              "specify a policy other than default")
        if not self.host_nodes and self.policy != "default":
            raise ConfigError(f"{where}: host-nodes must be set for policy {self.policy}")

    # -- what the host says -------------------------------------------------
    def page_size_bytes(self) -> int:
        """The page size the backend will allocate in; ConfigError if the
        host cannot say (hugetlb=on on a kernel without huge pages)."""
        if self.qom_type == "memory-backend-file":
            probe = self._mem_path_probe()
            try:
                if hostmem.filesystem_type(probe) == hostmem.HUGETLBFS_MAGIC:
                    # hugetlbfs: the mount's page size (QEMU's qemu_fd_getpagesize).
                    return os.statvfs(probe).f_bsize
            except OSError:
                pass  # check_host names the path
            return hostmem.base_page_size()
        if not self.hugetlb:
            return hostmem.base_page_size()
        if self.hugetlbsize_bytes:
            return self.hugetlbsize_bytes
        default = hostmem.default_huge_page_size()
        if default is None:
            raise ConfigError(f"{self.where}: hugetlb=on, but this kernel has no huge pages")
        return default

    def _mem_path_probe(self) -> str:
        """What to statfs for mem-path: the file, or the directory it will be made in."""
        assert self.mem_path is not None
        path = self.mem_path
        return path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))

    @property
    def is_hugetlb(self) -> bool:
        """Huge pages from a pool: a hugetlb memfd, or a file on hugetlbfs."""
        return self.page_size_bytes() != hostmem.base_page_size()

    def check_host(self) -> None:
        """What the host must have for this backend (ConfigError naming it):
        the huge page size, the NUMA nodes, the mem-path's directory."""
        where = self.where
        if self.hugetlb:
            sizes = hostmem.huge_page_sizes()
            if not sizes:
                raise ConfigError(f"{where}: hugetlb=on, but this kernel has no huge pages")
            if self.hugetlbsize_bytes and self.hugetlbsize_bytes not in sizes:
                raise ConfigError(f"{where}: hugetlbsize {format_size(self.hugetlbsize_bytes)} is not a huge page "
                                  f"size of this host (it has {', '.join(format_size(s) for s in sizes)}: "
                                  "/sys/kernel/mm/hugepages)")
        if self.host_nodes:
            have = hostmem.numa_nodes()
            missing = [n for n in self.host_nodes if n not in have]
            if missing:
                raise ConfigError(f"{where}: host-nodes {','.join(map(str, missing))}: this host has no such NUMA "
                                  f"node (it has {','.join(map(str, have))})")
        if self.mem_path is not None:
            path = self.mem_path
            if not os.path.exists(path):
                directory = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(directory):
                    raise ConfigError(f"{where}: mem-path {path!r}: the directory {directory!r} does not exist")
            elif not (os.path.isdir(path) or os.path.isfile(path)):
                raise ConfigError(f"{where}: mem-path {path!r} is neither a regular file nor a directory")
        page = self.page_size_bytes()
        if self.size_bytes % page:
            raise ConfigError(f"{where}: size {format_size(self.size_bytes)} is not a multiple of the page size "
                              f"{format_size(page)}")
        if self.policy != "default" and self.qom_type == "memory-backend-file" and not self.is_hugetlb:
            probe = self._mem_path_probe()
            if hostmem.filesystem_type(probe) != hostmem.TMPFS_MAGIC:
                raise ConfigError(
                    f"{where}: policy {self.policy} needs a mem-path on tmpfs or hugetlbfs: the page cache of "
                    f"other filesystems is placed by whichever process faults it in (QEMU), not by a policy "
                    f"on the file")

    def mpol(self) -> tuple[int, list[int], int]:
        """(mode, nodemask words, maxnode) for mbind/set_mempolicy, as QEMU
        passes them (backends/hostmem.c): maxnode one past the highest node
        plus one (the kernel drops the last bit), preferred with several
        nodes is MPOL_PREFERRED_MANY."""
        mode = HOST_MEM_POLICIES[self.policy]
        if not self.host_nodes:
            return mode, [0], 0
        if self.policy == "preferred" and len(self.host_nodes) > 1:
            mode = _MPOL_PREFERRED_MANY
        words = [0] * ((MAX_HOST_NODES + 63) // 64)
        for node in self.host_nodes:
            words[node // 64] |= 1 << (node % 64)
        return mode, words, self.host_nodes[-1] + 2


# ---------------------------------------------------------------------------
# The backends


class _FileBackedMemory:
    """What both built-in backends share: a shared file (memfd or a real
    one) of ``size_bytes``, mapped shared in this process too, with QEMU's
    backend properties applied to the mapping and the file."""

    def __init__(self, fd: int, config: MemoryBackendConfig, *, device: str = "",
                 description: str = "") -> None:
        self.fd = fd
        self.config = config
        self.size_bytes = config.size_bytes
        self._device = device
        self._what = description
        self._page_size = self._probe_page_size()
        self.hugetlb = self._page_size != hostmem.base_page_size()
        self._reserve_failed = False
        self._addr = None
        self._map: mmap.mmap | None = None
        self._check_reservation()
        flags = mmap.MAP_SHARED
        if not config.reserve:
            flags |= _MAP_NORESERVE
        try:
            self._map = mmap.mmap(fd, self.size_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if exc.errno == _errno.ENOMEM and self.hugetlb:
                raise BackendError(exc.errno, self._huge_pages_short("reserve=on reserves")) from None
            raise BackendError(exc.errno, f"{self._name()}: cannot map {format_size(self.size_bytes)}: "
                                          f"{exc.strerror}") from None
        self.view = memoryview(self._map)
        self._addr = ffi.from_buffer(self._map)
        if not config.dump:
            self._map.madvise(mmap.MADV_DONTDUMP)
        if config.policy != "default":
            mode, words, maxnode = config.mpol()
            mask = ffi.new("unsigned long[]", words)
            # MPOL_MF_STRICT as QEMU: pages already there on other nodes are an error.
            rc = lib.vmem_mbind(self._addr, self.size_bytes, mode, mask, maxnode, 1)
            if rc < 0:
                raise BackendError(-rc, f"{self._name()}: cannot bind memory to host NUMA nodes "
                                        f"{','.join(map(str, config.host_nodes))}: {os.strerror(-rc)}")
        # Start empty, as QEMU's virtio-mem realize does (ram_block_discard_range
        # of the whole block): a reused file may hold memory.  It also shows
        # now, not at the first UNPLUG, whether the filesystem punches holes.
        try:
            self.discard(0, self.size_bytes)
        except OSError as exc:
            if exc.errno in (_errno.EOPNOTSUPP, _errno.ENOSYS):
                raise BackendError(exc.errno, f"{self._name()}: the filesystem cannot punch holes "
                                              f"(FALLOC_FL_PUNCH_HOLE: {os.strerror(exc.errno)}), so unplugged "
                                              "memory could never be given back; use tmpfs, hugetlbfs or a "
                                              "filesystem that punches holes (ext4, xfs, btrfs)") from None
            raise BackendError(exc.errno or _errno.EIO, f"{self._name()}: cannot discard: {exc}") from None
        #: Whether lseek(SEEK_DATA) tells holes from memory here (shmem and
        #: disk filesystems do; hugetlbfs does not: it reports the whole file
        #: as data).  The scrubber needs it to locate memory (docs/scrub.md).
        self.extents_exact = _seek_data_works(fd)

    # -- naming -----------------------------------------------------------
    def _name(self) -> str:
        parts = [f"device {self._device!r}"] if self._device else []
        parts.append(f"{self.config.qom_type} {self.config.id!r}" + (f" ({self._what})" if self._what else ""))
        return ": ".join(parts)

    def _probe_page_size(self) -> int:
        if hostmem.filesystem_type(self.fd) == hostmem.HUGETLBFS_MAGIC:
            return os.fstatvfs(self.fd).f_bsize
        return hostmem.base_page_size()

    def _huge_pages_short(self, who: str) -> str:
        pool = hostmem.huge_page_pool(self._page_size)
        needed = self.size_bytes // self._page_size
        return (f"{self._name()}: {who} {needed} huge pages of {format_size(self._page_size)} for "
                f"{format_size(self.size_bytes)}, and the host has {pool.describe()}; add huge pages "
                f"(/sys/kernel/mm/hugepages/hugepages-{self._page_size // 1024}kB/nr_hugepages) or make the "
                "backend smaller")

    def _check_reservation(self) -> None:
        """Huge pages are reserved when a shared mapping is made without
        MAP_NORESERVE, for the whole mapping, and kept on the file until it
        is closed.  This process maps the backend with reserve=on; QEMU maps
        the BAR (hw/vfio/region.c, vfio_region_mmap: MAP_SHARED, no
        MAP_NORESERVE) whatever reserve says, so with reserve=off the
        reservation happens when QEMU attaches, and QEMU's mmap fails
        (QEMU falls back to trapping every access) when the pool is short.
        Refuse now rather than then (docs/backends.md, "reserve")."""
        if not self.hugetlb:
            return
        pool = hostmem.huge_page_pool(self._page_size)
        needed = self.size_bytes // self._page_size
        if pool.available < needed:
            who = "reserve=on reserves" if self.config.reserve else "QEMU's mmap of the BAR will reserve"
            raise BackendError(_errno.ENOMEM, self._huge_pages_short(who))

    # -- MemoryBackend ------------------------------------------------------
    @property
    def page_size_bytes(self) -> int:
        """The smallest unit the backend allocates and a discard frees: the
        huge page size for hugetlb, the base page size otherwise."""
        return self._page_size

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        blocks.discard(self.fd, offset_bytes, length_bytes)
        if self.hugetlb and self.config.reserve:
            self._reserve_again(offset_bytes, length_bytes)

    def _reserve_again(self, offset_bytes: int, length_bytes: int) -> None:
        """Punching a hole in hugetlbfs drops the reservations of the pages
        it frees (mm/hugetlb.c, hugetlb_unreserve_pages), so after a few
        plug and unplug cycles a reserve=on backend would have no
        reservation left and a guest touching a plugged block when the pool
        is empty would kill QEMU with SIGBUS.  A new shared mapping of the
        range reserves it again (the reservation stays with the file when
        the mapping goes): measured in docs/backends.md."""
        try:
            mmap.mmap(self.fd, length_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=offset_bytes).close()
        except OSError as exc:
            if not self._reserve_failed:
                self._reserve_failed = True
                log.warning("%s: could not reserve huge pages again for %s at offset %#x after a discard (%s); "
                            "a guest touching it when the pool is empty would get SIGBUS in QEMU",
                            self._name(), format_size(length_bytes), offset_bytes, exc.strerror)
            return
        self._reserve_failed = False

    def populate(self, offset_bytes: int, length_bytes: int) -> None:
        """Allocate the range now (the device's prealloc=on); PreallocFailed
        when the host has no memory for it, with the range given back."""
        policy = None
        if self.hugetlb and self.config.policy != "default":
            # hugetlbfs keeps no policy of mbind's on the file: allocate
            # under this thread's policy instead (csrc/vmem_hostmem.h).
            mode, words, maxnode = self.config.mpol()
            policy = ffi.new("unsigned long[]", words)
            rc = lib.vmem_set_mempolicy(mode, policy, maxnode)
            if rc < 0:
                raise PreallocFailed(-rc, f"{self._name()}: set_mempolicy: {os.strerror(-rc)}")
        try:
            rc = lib.vmem_populate(self.fd, self._addr, offset_bytes, length_bytes)
        finally:
            if policy is not None:
                lib.vmem_set_mempolicy(0, ffi.NULL, 0)
        if rc < 0:
            try:
                self.discard(offset_bytes, length_bytes)
            except OSError as exc:
                log.error("%s: could not give back %s at offset %#x after a failed preallocation: %s",
                          self._name(), format_size(length_bytes), offset_bytes, exc)
            raise PreallocFailed(-rc, f"{self._name()}: cannot allocate {format_size(length_bytes)} at offset "
                                      f"{offset_bytes:#x}: {os.strerror(-rc)}")

    def allocated_bytes(self) -> int:
        """Host memory in use: the honest measure (st_blocks * 512)."""
        return blocks.allocated_bytes(self.fd)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._map is not None:
            if self._addr is not None:
                ffi.release(self._addr)
            self.view.release()
            self._map.close()
        self._close_file()
        self.fd = -1

    def _close_file(self) -> None:
        os.close(self.fd)


def _seek_data_works(fd: int) -> bool:
    """On a file known to be all holes: SEEK_DATA says so (ENXIO)."""
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == _errno.ENXIO
    return False


class MemfdBackend(_FileBackedMemory):
    """``memory-backend-memfd``: a sparse memfd of the device's size (huge
    pages with ``hugetlb``), mapped shared in this process too (for guest
    buffers that lie in the device's own memory)."""

    def __init__(self, config: MemoryBackendConfig | int, *, name: str = "vfiouser-vmem", hugetlb: bool = False,
                 device: str = "") -> None:
        if isinstance(config, int):
            # MemfdBackend(size_bytes[, hugetlb=]): the short form of docs/api.md.
            config = MemoryBackendConfig(id=name, size_bytes=config, hugetlb=hugetlb)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if config.hugetlb:
            flags |= os.MFD_HUGETLB
            if config.hugetlbsize_bytes:
                flags |= (config.hugetlbsize_bytes.bit_length() - 1) << os.MFD_HUGE_SHIFT
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, config.size_bytes)
            if config.seal:
                # The fd goes to every client (the mmap-able BAR): sealed so
                # that none can shrink it under this process's own mapping
                # (touching it would then be SIGBUS here) or grow it.
                # Punching holes stays allowed (F_SEAL_WRITE is not set).
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            super().__init__(fd, config, device=device)
        except BaseException:
            if getattr(self, "_map", None) is not None:
                self.close()
            else:
                os.close(fd)
            raise


class FileBackend(_FileBackedMemory):
    """``memory-backend-file``: ``mem-path`` is a file (used, created if
    missing, and kept), or a directory in which a file is created and
    unlinked at once (as QEMU's file_ram_open does), on tmpfs, hugetlbfs or
    any filesystem that punches holes."""

    def __init__(self, config: MemoryBackendConfig, *, device: str = "") -> None:
        path = config.mem_path
        assert path is not None
        self.path = path
        self.created = False
        where = f"{config.where}: mem-path {path!r}"
        try:
            if os.path.isdir(path):
                fd, created_at = tempfile.mkstemp(prefix=f"vfiouser-vmem.{config.id}.", dir=path)
                os.unlink(created_at)
                description = f"an unlinked file in {path}"
            else:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    self.created = True
                description = path
        except OSError as exc:
            raise BackendError(exc.errno or _errno.EIO, f"{where}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackendError(_errno.EINVAL, f"{where} is not a regular file")
            # hostmem-file.c / file_ram_alloc: a file smaller than size is
            # QEMU's "backing store size ... does not match 'size' option";
            # an empty one is grown; a larger one is used from offset 0.
            if 0 < st.st_size < config.size_bytes:
                raise BackendError(_errno.EINVAL, f"{where}: the file holds {format_size(st.st_size)}, less than "
                                                  f"size {format_size(config.size_bytes)}")
            if st.st_size == 0:
                os.ftruncate(fd, config.size_bytes)
            super().__init__(fd, config, device=device, description=description)
        except OSError as exc:
            if getattr(self, "_map", None) is not None:
                self.close()
            else:
                os.close(fd)
                self._remove_created()
            if isinstance(exc, BackendError):
                raise
            raise BackendError(exc.errno or _errno.EIO, f"{where}: {exc.strerror or exc}") from None

    def _remove_created(self) -> None:
        if self.created:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _close_file(self) -> None:
        if self.config.discard_data:
            # hostmem-file.c: discard-data lets the contents go instead of
            # being written back; the file stays, empty of data.
            try:
                blocks.discard(self.fd, 0, self.size_bytes)
            except OSError as exc:
                log.warning("%s: discard-data: %s", self._name(), exc)
        os.close(self.fd)


def open_backend(config: MemoryBackendConfig, *, device: str = "") -> MemoryBackend:
    """Make the backend ``config`` describes, for ``device`` (named in errors):
    BackendError when the host cannot (huge pages short, no hole punching)."""
    config.check_host()
    if config.qom_type == "memory-backend-file":
        return FileBackend(config, device=device)
    return MemfdBackend(config, name=f"vfiouser-vmem:{device or config.id}", device=device)
