"""The memory backends (vmem/_backend.py) on the real kernel: memfds and files
on tmpfs, hugetlbfs and ramfs, real huge pages, NUMA policy, core dump flags,
preallocation (docs/backends.md).  No sockets: the backends alone; the
device's use of them over vfio-user is in test_backend_device.py, with real
guests in integration/test_memory_backends.py."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import sys

import pytest

from host_setup import huge_pages, mount, pool, remount
from vfiouser_vmem import DeviceConfig
from vfiouser_vmem.errors import BackendError, ConfigError, PreallocFailed
from vfiouser_vmem.vmem import MemfdBackend, MemoryBackendConfig, open_backend

MiB = 1 << 20
GiB = 1 << 30
HUGE = 2 * MiB


def mapping_flags(pid: int, fd_target: str) -> list[str]:
    """VmFlags of the mapping of ``fd_target`` (a /proc/PID/fd link's text) in /proc/PID/smaps."""
    lines = open(f"/proc/{pid}/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if fd_target in line:
            for following in lines[i + 1:]:
                if following.startswith("VmFlags:"):
                    return following.split()[1:]
    raise AssertionError(f"no mapping of {fd_target} in /proc/{pid}/smaps")


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def numa_policy_seen_by_another_process(fd: int, size: int) -> str:
    """The policy column of /proc/PID/numa_maps for a child's own shared
    mapping of ``fd`` (as QEMU maps the BAR), after it touched one page."""
    code = (f"import mmap; m = mmap.mmap({fd}, {size}, mmap.MAP_SHARED); m[0:1] = b'x'; "
            f"print([l for l in open('/proc/self/numa_maps') if {fd_target(fd).split(' ')[0]!r} in l][0])")
    out = subprocess.run([sys.executable, "-c", code], pass_fds=(fd,), capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


# ---------------------------------------------------------------------------
# memory-backend-memfd


def test_memfd_is_sized_to_the_device_and_sealed():
    backend = open_backend(MemoryBackendConfig(id="m", size_bytes=3 * GiB), device="vm0")
    try:
        assert os.fstat(backend.fd).st_size == 3 * GiB  # not the 4 GiB BAR
        assert backend.allocated_bytes() == 0
        seals = fcntl.fcntl(backend.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK and not seals & fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.ftruncate(backend.fd, 4 * GiB)
    finally:
        backend.close()


def test_memfd_seal_off_leaves_it_unsealed():
    backend = open_backend(MemoryBackendConfig(id="m", size_bytes=64 * MiB, seal=False))
    try:
        assert fcntl.fcntl(backend.fd, fcntl.F_GET_SEALS) & (fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK) == 0
    finally:
        backend.close()


@pytest.mark.parametrize("dump", [False, True])
def test_dump_sets_the_core_dump_flag_of_the_servers_mapping(dump):
    backend = open_backend(MemoryBackendConfig(id="m", size_bytes=64 * MiB, dump=dump))
    try:
        # "dd": VM_DONTDUMP (fs/proc/task_mmu.c), set by MADV_DONTDUMP.
        assert ("dd" in mapping_flags(os.getpid(), fd_target(backend.fd))) == (not dump)
    finally:
        backend.close()


def test_bind_policy_is_kept_on_the_file_for_other_processes():
    """shmem keeps an mbind policy on the file (a shared policy): the pages
    another process faults in through its own mapping, as QEMU does through
    the BAR, follow it."""
    size = 16 * MiB
    bound = open_backend(MemoryBackendConfig(id="m", size_bytes=size, policy="bind", host_nodes=(0,)))
    plain = open_backend(MemoryBackendConfig(id="p", size_bytes=size))
    try:
        assert numa_policy_seen_by_another_process(bound.fd, size) == "bind:0"
        assert numa_policy_seen_by_another_process(plain.fd, size) == "default"
    finally:
        bound.close()
        plain.close()


def test_populate_allocates_and_discard_gives_back():
    backend = open_backend(MemoryBackendConfig(id="m", size_bytes=64 * MiB))
    try:
        backend.populate(8 * MiB, 16 * MiB)
        assert backend.allocated_bytes() == 16 * MiB
        assert backend.view[8 * MiB:8 * MiB + 4096] == bytes(4096)  # allocated, and zero
        backend.discard(0, 64 * MiB)
        assert backend.allocated_bytes() == 0
    finally:
        backend.close()


def test_memfd_short_form_of_the_api():
    backend = MemfdBackend(32 * MiB, name="short")
    try:
        assert backend.size_bytes == 32 * MiB and backend.page_size_bytes == 4096
    finally:
        backend.close()


# ---------------------------------------------------------------------------
# Huge pages (real 2 MiB pages from the kernel's pool)


def test_hugetlb_reserve_on_reserves_the_device_and_keeps_it_reserved():
    size = 32 * MiB
    pages = size // HUGE
    with huge_pages(pages + 4):
        resv0, free0 = pool("resv_hugepages"), pool("free_hugepages")
        backend = open_backend(MemoryBackendConfig(id="h", size_bytes=size, hugetlb=True), device="vm0")
        try:
            assert backend.page_size_bytes == HUGE
            assert pool("resv_hugepages") == resv0 + pages  # reserve=on: the whole device, at start
            backend.view[0:1] = b"x"
            backend.view[4 * MiB:4 * MiB + 1] = b"y"
            assert pool("free_hugepages") == free0 - 2
            assert pool("resv_hugepages") == resv0 + pages - 2  # faulting consumed two reservations
            backend.discard(0, 8 * MiB)
            # Punching dropped the reservations of the freed pages; the
            # backend reserved them again (_reserve_again).
            assert pool("free_hugepages") == free0
            assert pool("resv_hugepages") == resv0 + pages
        finally:
            backend.close()
        assert pool("resv_hugepages") == resv0 and pool("free_hugepages") == free0


def test_hugetlb_reserve_off_reserves_nothing_here():
    size = 32 * MiB
    with huge_pages(size // HUGE):
        resv0 = pool("resv_hugepages")
        backend = open_backend(MemoryBackendConfig(id="h", size_bytes=size, hugetlb=True, reserve=False))
        try:
            assert pool("resv_hugepages") == resv0
            # QEMU's mmap of the BAR (MAP_SHARED, no MAP_NORESERVE) reserves:
            # what the start-up check allows for.
            m = mmap.mmap(backend.fd, size, mmap.MAP_SHARED)
            assert pool("resv_hugepages") == resv0 + size // HUGE
            m.close()
        finally:
            backend.close()
        assert pool("resv_hugepages") == resv0


@pytest.mark.parametrize("reserve, who", [(True, "reserve=on reserves"),
                                          (False, "QEMU's mmap of the BAR will reserve")])
def test_hugetlb_refused_when_the_pool_is_short(reserve, who):
    with huge_pages(4):
        free = pool("free_hugepages")
        with pytest.raises(BackendError) as info:
            open_backend(MemoryBackendConfig(id="h", size_bytes=64 * MiB, hugetlb=True, reserve=reserve),
                         device="vm0")
        message = str(info.value)
        assert message.startswith("device 'vm0': memory-backend-memfd 'h': " + who + " 32 huge pages of 2M")
        assert f"{free} of {pool('nr_hugepages')} 2M huge pages free" in message
        assert info.value.errno == errno.ENOMEM


def test_hugetlb_populate_fails_when_the_pool_runs_out_and_gives_back():
    size = 32 * MiB
    with huge_pages(size // HUGE):
        backend = open_backend(MemoryBackendConfig(id="h", size_bytes=size, hugetlb=True, reserve=False))
        try:
            free0 = pool("free_hugepages")
            # Someone else takes all but 4 pages.
            other = mmap.mmap(-1, (free0 - 4) * HUGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)  # MAP_HUGETLB
            try:
                other.write(b"x" * len(other))
                backend.populate(0, 4 * HUGE)
                with pytest.raises(PreallocFailed) as info:
                    backend.populate(4 * HUGE, 8 * HUGE)
                assert info.value.errno in (errno.ENOSPC, errno.ENOMEM)
                assert "cannot allocate 16M at offset 0x800000" in str(info.value)
                # What the failed call allocated was given back.
                assert backend.allocated_bytes() == 4 * HUGE
            finally:
                other.close()
        finally:
            backend.close()


# ---------------------------------------------------------------------------
# memory-backend-file


def file_config(path: str, size: int = 64 * MiB, **kw) -> MemoryBackendConfig:
    return MemoryBackendConfig(id="f", size_bytes=size, qom_type="memory-backend-file", mem_path=path, **kw)


def test_file_in_a_directory_is_created_unlinked(tmp_path):
    backend = open_backend(file_config(str(tmp_path)), device="vm0")
    try:
        assert os.listdir(tmp_path) == []
        assert fd_target(backend.fd).endswith("(deleted)")
        assert os.fstat(backend.fd).st_size == 64 * MiB
        backend.view[0:4096] = b"\x01" * 4096
        assert backend.allocated_bytes() >= 4096
    finally:
        backend.close()


def test_file_path_is_created_and_kept_and_emptied_at_start(tmp_path):
    path = str(tmp_path / "mem")
    backend = open_backend(file_config(path))
    backend.view[0:4096] = b"\x02" * 4096
    backend.close()
    assert os.path.getsize(path) == 64 * MiB
    # A reused file starts empty, as QEMU's virtio-mem discards the whole
    # RAM block at realize: no old data reaches the guest's next plug.
    backend = open_backend(file_config(path))
    try:
        assert backend.allocated_bytes() == 0 and backend.view[0:4096] == bytes(4096)
    finally:
        backend.close()


def test_discard_data_punches_the_file_at_close(tmp_path):
    path = str(tmp_path / "mem")
    backend = open_backend(file_config(path, discard_data=True))
    backend.view[0:MiB] = b"\x03" * MiB
    assert os.stat(path).st_blocks * 512 >= MiB
    backend.close()
    assert os.stat(path).st_blocks == 0 and os.path.getsize(path) == 64 * MiB


def test_smaller_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(b"\0" * MiB)
    with pytest.raises(BackendError, match=f"mem-path '{path}': the file holds 1M, less than size 64M"):
        open_backend(file_config(str(path)))


def test_file_on_tmpfs_and_populate_on_a_full_tmpfs():
    with mount("tmpfs", "size=8M") as directory:
        backend = open_backend(file_config(directory, size=32 * MiB), device="vm0")
        try:
            assert backend.page_size_bytes == 4096
            backend.populate(0, 4 * MiB)
            with pytest.raises(PreallocFailed) as info:
                backend.populate(4 * MiB, 8 * MiB)
            assert info.value.errno == errno.ENOSPC
            assert backend.allocated_bytes() == 4 * MiB  # the failed part was given back
            remount(directory, "size=64M")
            backend.populate(4 * MiB, 8 * MiB)
            assert backend.allocated_bytes() == 12 * MiB
        finally:
            backend.close()


def test_file_on_hugetlbfs_takes_the_mounts_page_size():
    with huge_pages(16), mount("hugetlbfs", "pagesize=2M") as directory:
        config = file_config(directory, size=16 * MiB)
        assert config.page_size_bytes() == HUGE
        free0 = pool("free_hugepages")
        backend = open_backend(config)
        try:
            assert backend.page_size_bytes == HUGE
            backend.view[0:1] = b"x"
            assert pool("free_hugepages") == free0 - 1
            backend.discard(0, 16 * MiB)
            assert pool("free_hugepages") == free0
        finally:
            backend.close()
        # DeviceConfig takes QEMU's default block size for it: the page size.
        assert DeviceConfig(socket="/tmp/x.sock", size_bytes=16 * MiB, memory_backend=config).block_size_bytes == HUGE


def test_filesystem_that_cannot_punch_holes_is_refused_at_start():
    with mount("ramfs") as directory:
        with pytest.raises(BackendError) as info:
            open_backend(file_config(directory), device="vm0")
        assert str(info.value).startswith("device 'vm0': memory-backend-file 'f' (an unlinked file in "
                                          f"{directory}): the filesystem cannot punch holes")
        assert os.listdir(directory) == []


def test_policy_on_a_disk_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="policy bind needs a mem-path on tmpfs or hugetlbfs"):
        file_config(str(tmp_path), policy="bind", host_nodes=(0,)).check_host()


# ---------------------------------------------------------------------------
# DeviceConfig with a backend configuration


def test_device_config_checks_block_size_against_the_backend():
    huge = MemoryBackendConfig(id="h", size_bytes=2 * GiB, hugetlb=True, hugetlbsize_bytes=GiB)
    assert DeviceConfig(socket="/tmp/x.sock", size_bytes=2 * GiB, memory_backend=huge).block_size_bytes == GiB
    with pytest.raises(ConfigError, match="block-size 2M is below the backend's page size 1G"):
        DeviceConfig(socket="/tmp/x.sock", size_bytes=2 * GiB, block_size_bytes=2 * MiB, memory_backend=huge)
    with pytest.raises(ConfigError, match="block-size 3M is not a power of two"):
        DeviceConfig(socket="/tmp/x.sock", size_bytes=3 * GiB, block_size_bytes=3 * MiB)
    with pytest.raises(ConfigError, match="differs from its memory backend's size"):
        DeviceConfig(socket="/tmp/x.sock", size_bytes=GiB, memory_backend=huge)


def test_prealloc_needs_a_backend_that_can_populate():
    class NoPopulate:
        fd, size_bytes, view, page_size_bytes = -1, GiB, memoryview(b""), 4096

    with pytest.raises(ConfigError, match="prealloc=on needs a backend that can allocate ahead"):
        DeviceConfig(socket="/tmp/x.sock", size_bytes=GiB, backend=NoPopulate(), prealloc=True)


def test_populate_falls_back_to_populate_write_where_fallocate_cannot():
    """ramfs has no fallocate: vmem_populate faults the range in through the
    mapping (MADV_POPULATE_WRITE) instead, as QEMU's qemu_prealloc_mem does."""
    from vfiouser_vmem._blocks import ffi, lib

    with mount("ramfs") as directory:
        fd = os.open(os.path.join(directory, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 8 * MiB)
            m = mmap.mmap(fd, 8 * MiB, mmap.MAP_SHARED)
            addr = ffi.from_buffer(m)
            try:
                assert lib.vmem_populate(fd, ffi.NULL, 0, 4 * MiB) == -errno.EOPNOTSUPP  # no mapping: no fallback
                assert lib.vmem_populate(fd, addr, 2 * MiB, 4 * MiB) == 0
                resident = [int(line.split()[1]) for line in open("/proc/self/smaps").read().split(
                    f"{os.path.join(directory, 'f')}\n", 1)[1].splitlines() if line.startswith("Rss:")][0]
                assert resident == 4 * 1024  # KiB: exactly the populated range
            finally:
                ffi.release(addr)
                m.close()
        finally:
            os.close(fd)
