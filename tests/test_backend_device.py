"""A device and its memory backend over vfio-user (the project's own
protocol client): preallocation answered BUSY and retried, the BAR's part
past the device's size, QEMU's block size warning, the settings that need
the device and the backend together (docs/backends.md)."""

from __future__ import annotations

import logging
import os

import pytest

from host_setup import huge_pages, mount, remount
from test_protocol import BAR_ADDR, BLOCK, Vmem, VmemFactory, vmem_factory  # noqa: F401 (fixtures)
from vfio_user_client import VFIO_REGION_INFO_FLAG_MMAP
from virtio_driver import ACK, BUSY
from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.server import DeviceConfig, DeviceServer
from vfiouser_vmem.vmem import MemoryBackendConfig

MiB = 1 << 20
GiB = 1 << 30
BAR2 = 2


def allocated(v: Vmem) -> int:
    return v.server.backend.allocated_bytes()


def collected(v: Vmem, family: str) -> float:
    """The device's sample of a metric family, as a scrape would collect it."""
    from vfiouser_vmem.control._metrics import _DeviceCollector

    for metric in _DeviceCollector([v.server]).collect():
        if metric.name == family:
            return next(s.value for s in metric.samples if s.labels.get("id") == v.server.config.id)
    raise AssertionError(f"no metric family {family}")


async def test_prealloc_allocates_before_the_ack(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=256 * MiB, requested=256 * MiB, prealloc=True)
    assert await v.driver.plug(BAR_ADDR, 8) == ACK
    # Allocated by the server, before the guest touched a byte.
    assert allocated(v) == 8 * BLOCK
    assert await v.driver.unplug(BAR_ADDR, 8) == ACK
    await v.discarded()
    assert allocated(v) == 0


async def test_prealloc_on_a_full_tmpfs_is_busy_until_there_is_room(
        vmem_factory: VmemFactory, caplog: pytest.LogCaptureFixture) -> None:
    with mount("tmpfs", "size=16M") as directory:
        backend = MemoryBackendConfig(id="f", size_bytes=64 * MiB, qom_type="memory-backend-file",
                                      mem_path=directory)
        v = await vmem_factory.start(memory_backend=backend, requested=64 * MiB, prealloc=True)
        d = v.driver
        assert await d.plug(BAR_ADDR, 4) == ACK  # 8M of the 16M
        with caplog.at_level(logging.INFO, logger="vfiouser_vmem.server"):
            for _ in range(3):
                # 16M more does not fit: BUSY (not ERROR: the host's problem), nothing kept.
                assert await d.plug(BAR_ADDR + 4 * BLOCK, 8) == BUSY
                assert allocated(v) == 4 * BLOCK
                assert v.server.model.plugged_size == 4 * BLOCK
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "prealloc=on" in r.getMessage()]
        assert len(warnings) == 1, "one warning per episode, not per request"
        assert "No space left on device" in warnings[0].getMessage()
        assert v.server.prealloc_failures_total == 3
        assert collected(v, "vfiouser_vmem_prealloc_failures") == 3
        # The memory plugged so far is the guest's.
        v.server.backend.view[0:4096] = b"\x07" * 4096
        remount(directory, "size=128M")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vfiouser_vmem.server"):
            assert await d.plug(BAR_ADDR + 4 * BLOCK, 8) == ACK
        assert "PLUGs are allocated again (3 answered BUSY so far)" in caplog.text
        assert allocated(v) == 12 * BLOCK
        assert v.server.backend.view[0:4096] == b"\x07" * 4096


async def test_device_past_its_size_is_not_host_memory(vmem_factory: VmemFactory) -> None:
    size = 3 * GiB  # a 4 GiB BAR
    v = await vmem_factory.start(size=size, requested=size)
    info = await v.client.region_info(BAR2)
    assert info.size == 4 * GiB and info.flags & VFIO_REGION_INFO_FLAG_MMAP
    assert [(a.offset, a.size) for a in info.sparse_areas] == [(0, size)]
    assert os.fstat(info.fd).st_size == size
    for offset in (size, size + 123 * MiB, 4 * GiB - 8):
        await v.client.bar_write(BAR2, offset, b"\xee" * 8)
        assert await v.client.bar_read(BAR2, offset, 8) == bytes(8)
    assert allocated(v) == 0
    assert await v.driver.plug(BAR_ADDR + size - BLOCK, 1) == ACK
    await v.assert_alive()


async def test_block_size_below_the_thp_size_warns_as_qemu(
        vmem_factory: VmemFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vfiouser_vmem.server"):
        await vmem_factory.start(size=256 * MiB, block_size=MiB, requested=0)
    assert "'block-size' property is smaller than the default block size (2 MiB)" in caplog.text
    assert "vmem1: " in caplog.text  # the device is named


def test_policy_on_huge_pages_needs_prealloc(tmp_path) -> None:
    with huge_pages(8):
        backend = MemoryBackendConfig(id="h", size_bytes=16 * MiB, hugetlb=True, policy="bind", host_nodes=(0,))
        config = DeviceConfig(socket=str(tmp_path / "s.sock"), size_bytes=16 * MiB, memory_backend=backend)
        with pytest.raises(ConfigError, match="policy bind on the huge pages of memory backend 'h' needs "
                                              "prealloc=on on the device"):
            DeviceServer(config)
        assert not os.path.exists(config.socket)


async def test_backend_properties_over_qom(vmem_factory: VmemFactory, tmp_path) -> None:
    """``qom-get``/``qom-list`` of /objects/ID: QEMU 11.1's property lists
    (order and types, taken from its qom-list), with this server's values."""
    from vfiouser_vmem.server import ControlledVmem

    file_backend = MemoryBackendConfig(id="f0", size_bytes=64 * MiB, qom_type="memory-backend-file",
                                       mem_path=str(tmp_path), discard_data=True, policy="bind", host_nodes=(0,))
    with pytest.raises(ConfigError, match="needs a mem-path on tmpfs or hugetlbfs"):
        await vmem_factory.start(memory_backend=file_backend, requested=0)
    with mount("tmpfs", "size=128M") as directory:
        file_backend.mem_path = directory
        v = await vmem_factory.start(memory_backend=file_backend, requested=0)
        props = ControlledVmem(v.server).memory_backend()
        assert props.qom_type == "memory-backend-file"
        assert [p["name"] for p in props.qom_list()] == [
            "share", "size", "dump", "prealloc-threads", "x-use-canonical-path-for-ramblock-id", "policy",
            "prealloc-context", "prealloc", "reserve", "host-nodes", "merge", "pmem", "align", "offset", "mem-path",
            "rom", "discard-data", "readonly"]
        assert {p: props.qom_get(p) for p in ("mem-path", "discard-data", "policy", "host-nodes", "dump", "share",
                                               "size")} == {
            "mem-path": directory, "discard-data": True, "policy": "bind", "host-nodes": [0], "dump": False,
            "share": True, "size": 64 * MiB}
    memfd = MemoryBackendConfig(id="m0", size_bytes=64 * MiB, seal=False, dump=True, reserve=False)
    v = await vmem_factory.start(memory_backend=memfd, requested=0)
    props = ControlledVmem(v.server).memory_backend()
    assert [p["name"] for p in props.qom_list()][-3:] == ["hugetlb", "seal", "hugetlbsize"]
    assert (props.qom_get("seal"), props.qom_get("dump"), props.qom_get("reserve"), props.qom_get("hugetlb")) == (
        False, True, False, False)
    with pytest.raises(ValueError, match="cannot change property value"):
        props.qom_set("dump", False)
