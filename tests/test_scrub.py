"""Unplugged memory stays unplugged (docs/scrub.md): host memory that a
client puts into unplugged blocks through the BAR's mmap is found, reported
and given back; UNPLUG_ALL and resets leave the backend empty; plugged
memory is never touched, however scrub passes race plugs and unplugs.
Over vfio-user with the project's own client (QEMU maps the BAR the same
way); with a real guest in integration/test_memory_backends.py."""

from __future__ import annotations

import logging
import os
import random

import pytest
import trio
import trio.testing

from test_protocol import BAR_ADDR, BLOCK, TIMEOUT, Vmem, VmemFactory, vmem_factory  # noqa: F401 (fixtures)
from virtio_driver import ACK
from vfiouser_vmem.vmem import BlockBitmap, UnpluggedMemoryFound, allocated_extents, unplugged_parts

MiB = 1 << 20
GiB = 1 << 30


async def scrub(v: Vmem) -> None:
    """One scrub pass, now, and until it is done."""
    before = v.server.scrubber.passes_total
    v.server.scrubber.request()
    with trio.fail_after(TIMEOUT):
        await v.server.scrubber.wait_for_pass(before)


async def settled(v: Vmem) -> int:
    """The backend's allocated bytes once the deferred discards are done."""
    await v.discarded()
    return v.server.backend.allocated_bytes()


# -- the pieces ----------------------------------------------------------------


def test_unplugged_parts_of_extents():
    bs = 2 * MiB
    bitmap = BlockBitmap(16)
    bitmap.set_range(2, 3)  # blocks 2-4 plugged
    extents = [(0, 3 * MiB), (5 * MiB, 11 * MiB), (20 * MiB, 20 * MiB + 4096)]
    assert unplugged_parts(extents, bitmap, bs) == [(0, 3 * MiB), (10 * MiB, MiB), (20 * MiB, 4096)]
    assert unplugged_parts([(4 * MiB, 10 * MiB)], bitmap, bs) == []


def test_allocated_extents_cost_follows_the_extents(tmp_path):
    fd = os.memfd_create("extents")
    try:
        os.ftruncate(fd, 1 << 40)  # 1 TiB, sparse
        assert allocated_extents(fd, 0, 1 << 40) == []
        for offset in (0, 5 * GiB, (1 << 40) - 4096):
            os.pwrite(fd, b"x", offset)
        assert allocated_extents(fd, 0, 1 << 40) == [(0, 4096), (5 * GiB, 5 * GiB + 4096),
                                                      ((1 << 40) - 4096, 1 << 40)]
        assert allocated_extents(fd, 4096, 5 * GiB + 1) == [(5 * GiB, 5 * GiB + 1)]  # clipped to the range
    finally:
        os.close(fd)


# -- over vfio-user --------------------------------------------------------------


async def test_writes_into_unplugged_blocks_are_reclaimed_and_reported(
        vmem_factory: VmemFactory, caplog: pytest.LogCaptureFixture) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=256 * MiB)
    bar = await v.memory_bar()
    seen: list[UnpluggedMemoryFound] = []
    v.server.model.observers.subscribe(seen.append, UnpluggedMemoryFound)
    assert await v.driver.plug(BAR_ADDR, 4) == ACK
    bar.fill(0, 4 * BLOCK, 0x5A)  # plugged: the guest's
    bar.fill(64 * MiB, 64 * MiB, 0xEE)  # unplugged: not the guest's
    assert bar.allocated() == 8 * MiB + 64 * MiB
    with caplog.at_level(logging.WARNING, logger="vfiouser_vmem.server"):
        await scrub(v)
    assert await settled(v) == 8 * MiB
    assert bar.map[0:4 * BLOCK] == b"\x5a" * (4 * BLOCK)
    assert bar.pread(64 * MiB, 4096) == bytes(4096)
    s = v.server
    assert (s.unplugged_found_bytes_total, s.unplugged_reclaimed_bytes_total, s.unplugged_episodes_total) == (
        64 * MiB, 64 * MiB, 1)
    assert seen == [UnpluggedMemoryFound(s.config.id, ((BAR_ADDR + 64 * MiB, 64 * MiB),), 64 * MiB, "reclaim")]
    assert f"64M at {BAR_ADDR + 64 * MiB:#x}-{BAR_ADDR + 128 * MiB:#x}" in caplog.text
    assert "given back to the host" in caplog.text
    # A clean pass: no new episode.
    await scrub(v)
    assert s.unplugged_episodes_total == 1


async def test_periodic_scrub_finds_it_within_the_interval(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=256 * MiB, requested=0, scrub_interval_s=0.05)
    bar = await v.memory_bar()
    bar.fill(10 * MiB, MiB, 0x11)
    with trio.fail_after(TIMEOUT):
        while v.server.unplugged_reclaimed_bytes_total < MiB:
            await v.server.scrubber.wait_for_pass(v.server.scrubber.passes_total)
    assert await settled(v) == 0


async def test_report_only_leaves_it_and_counts_one_episode(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=256 * MiB, requested=0, unplugged_access="report")
    bar = await v.memory_bar()
    bar.fill(0, 2 * MiB, 0x22)
    for _ in range(3):
        await scrub(v)
    assert v.server.unplugged_episodes_total == 1  # the same memory again is not a new episode
    assert v.server.unplugged_reclaimed_bytes_total == 0
    assert await settled(v) == 2 * MiB
    bar.fill(8 * MiB, 2 * MiB, 0x22)  # more: a new episode
    await scrub(v)
    assert (v.server.unplugged_episodes_total, v.server.unplugged_found_bytes_total) == (2, 6 * MiB)


async def test_disconnect_ends_the_client_and_the_next_one_is_served(vmem_factory: VmemFactory) -> None:
    v = await vmem_factory.start(size=256 * MiB, requested=64 * MiB, unplugged_access="disconnect")
    bar = await v.memory_bar()
    assert await v.driver.plug(BAR_ADDR, 2) == ACK
    bar.fill(128 * MiB, MiB, 0x33)
    await scrub(v)
    # The server ended the connection: the lost-connection reset unplugged everything.
    with trio.fail_after(TIMEOUT):
        while v.server.connected:
            await trio.sleep(0.01)
    assert v.server.model.plugged_size == 0
    assert await settled(v) == 0
    from vfio_user_client import VfioUserClient
    from virtio_driver import VirtioMemDriver

    from vfiouser_vmem.server import ControlledVmem

    # The disconnected client (this process, as a QEMU that lives on) still
    # maps the backend: a new client is refused while it runs ...
    props = ControlledVmem(v.server)
    assert props.qom_get("unplugged-quarantine") == os.getpid()
    refused = v.server.clients_total
    lost = v.server.resets_total["LOST_CONN"]
    with trio.fail_after(TIMEOUT):
        client = await VfioUserClient.connect(v.server.config.socket)
        while v.server.resets_total["LOST_CONN"] == lost:  # refused: dropped at once
            await trio.testing.wait_all_tasks_blocked()
    client.close()
    assert v.server.clients_total == refused and not v.server.connected
    # ... until the operator lifts the quarantine (or the process exits):
    # the next client (a new QEMU) is served as usual.
    with pytest.raises(TypeError):
        props.qom_set("unplugged-quarantine", 5)
    props.qom_set("unplugged-quarantine", 0)
    assert props.qom_get("unplugged-quarantine") == 0
    with trio.fail_after(TIMEOUT):
        client = await VfioUserClient.connect(v.server.config.socket)
    try:
        driver = VirtioMemDriver(client, bar_addr=BAR_ADDR)
        with trio.fail_after(TIMEOUT):
            await driver.initialize()
        assert await driver.plug(BAR_ADDR, 1) == ACK
        driver.close()
    finally:
        client.close()


@pytest.mark.parametrize("how", ["unplug_all", "device_reset", "lost_connection"])
async def test_unplug_all_and_resets_leave_the_backend_empty(vmem_factory: VmemFactory, how: str) -> None:
    v = await vmem_factory.start(size=1 * GiB, requested=512 * MiB)
    bar = await v.memory_bar(map_bytes=1 * GiB)
    assert await v.driver.plug(BAR_ADDR, 8) == ACK
    bar.fill(0, 8 * BLOCK, 0x44)  # plugged
    bar.fill(600 * MiB, 32 * MiB, 0x55)  # unplugged: the bitmap does not know of it
    passes = v.server.scrubber.passes_total
    if how == "unplug_all":
        assert await v.driver.unplug_all() == ACK
    elif how == "device_reset":
        with trio.fail_after(TIMEOUT):
            await v.client.reset()
    else:
        v.driver.close()
        v.client.close()
        with trio.fail_after(TIMEOUT):
            while not v.server.resets_total["LOST_CONN"]:  # the server reads the end of the connection
                await trio.testing.wait_all_tasks_blocked()
    # The whole device is discarded, the stray memory with the plugged:
    # the reset is the remedy, and no episode (the scrubber reports what it
    # finds between resets).
    assert await settled(v) == 0
    assert v.server.model.plugged_size == 0
    assert bar.pread(600 * MiB, 4096) == bytes(4096)
    with trio.fail_after(TIMEOUT):
        await v.server.scrubber.wait_for_pass(passes)  # the pass after the reset finds nothing left
    assert v.server.unplugged_episodes_total == 0


async def test_plugged_patterns_survive_scrub_passes_racing_plugs_and_unplugs(vmem_factory: VmemFactory) -> None:
    """Thousands of passes while blocks are plugged, written, checked and
    unplugged, and unplugged blocks written behind the device's back: every
    plugged block keeps its pattern; the stray writes are reclaimed."""
    nb = 64
    v = await vmem_factory.start(size=nb * BLOCK, requested=nb * BLOCK, scrub_interval_s=0)
    bar = await v.memory_bar()
    scrubber = v.server.scrubber
    scrubber.RETRY_S = 0  # retry an invalidated scan at once: as many passes as possible race the requests
    rng = random.Random(14)
    plugged: dict[int, int] = {}  # block -> pattern byte

    def intact(block: int, pattern: int) -> bool:
        page = bytes([pattern]) * 4096
        return bar.map[block * BLOCK:block * BLOCK + 4096] == page == bar.map[(block + 1) * BLOCK - 4096:
                                                                          (block + 1) * BLOCK]

    with trio.fail_after(120):
        # A scan ends dropped (the host side changed the backend meanwhile)
        # or valid (then its findings are acted on): both race the requests.
        while scrubber.passes_total + scrubber.retries_total < 2000 or scrubber.passes_total < 200:
            scrubber.request()
            block = rng.randrange(nb)
            addr = BAR_ADDR + block * BLOCK
            if block in plugged:
                assert intact(block, plugged[block]), f"block {block} lost its pattern"
                assert await v.driver.unplug(addr, 1) == ACK
                del plugged[block]
            elif rng.random() < 0.5:
                assert await v.driver.plug(addr, 1) == ACK
                plugged[block] = rng.randrange(1, 256)
                bar.fill(block * BLOCK, 4096, plugged[block])  # the first and the last page of the block
                bar.fill((block + 1) * BLOCK - 4096, 4096, plugged[block])
            else:
                bar.fill(block * BLOCK + 4096 * rng.randrange(512), 4096, 0xFF)  # a stray write
            await trio.sleep(0)
    assert [block for block, pattern in plugged.items() if not intact(block, pattern)] == []
    await scrub(v)
    await settled(v)
    # Memory is left only in plugged blocks (stray pages there are the guest's now).
    extents = allocated_extents(v.server.backend.fd, 0, nb * BLOCK)
    assert unplugged_parts(extents, v.server.model.bitmap, BLOCK) == []
    assert v.server.backend.allocated_bytes() >= len(plugged) * 2 * 4096
    assert v.server.unplugged_reclaimed_bytes_total > 0


async def test_a_plug_takes_back_the_reclaim_of_its_blocks(vmem_factory: VmemFactory) -> None:
    """A finding's discards are queued; the PLUG that comes next for those
    blocks must not be answered by the C request path as if nothing were
    queued (it would be punched after the guest wrote it): the claim rule
    of deferred discards (vmem/_discard.py) holds for scrub discards too."""
    from vfiouser_vmem.vmem import ScrubFinding

    v = await vmem_factory.start(size=64 * BLOCK, requested=64 * BLOCK, scrub_interval_s=0)
    bar = await v.memory_bar()
    bar.fill(5 * BLOCK, 4096, 0xFF)  # a stray page in unplugged block 5
    # As a pass would report it, with no chance for the discard worker to run before the PLUG.
    v.server._unplugged_memory_found(ScrubFinding(((5 * BLOCK, 4096),), 4096))
    assert await v.driver.plug(BAR_ADDR + 5 * BLOCK, 1) == ACK
    bar.fill(5 * BLOCK, BLOCK, 0x77)
    await settled(v)
    assert bar.map[5 * BLOCK:6 * BLOCK] == b"\x77" * BLOCK


async def test_huge_pages_without_exact_extents(vmem_factory: VmemFactory) -> None:
    """hugetlbfs reports the whole file as data (SEEK_DATA): the scrubber
    goes by the allocated size instead, and punches every unplugged run
    when the backend holds more than the plugged size (docs/scrub.md)."""
    from host_setup import huge_pages
    from vfiouser_vmem.vmem import MemoryBackendConfig

    with huge_pages(32):
        backend = MemoryBackendConfig(id="h", size_bytes=32 * BLOCK, hugetlb=True)
        v = await vmem_factory.start(memory_backend=backend, requested=32 * BLOCK, scrub_interval_s=0)
        assert v.server.backend.extents_exact is False
        seen: list[UnpluggedMemoryFound] = []
        v.server.model.observers.subscribe(seen.append, UnpluggedMemoryFound)
        bar = await v.memory_bar()
        assert await v.driver.plug(BAR_ADDR, 2) == ACK
        bar.fill(0, 2 * BLOCK, 0x66)
        await scrub(v)
        assert seen == []  # the plugged size is all it holds: nothing to say
        bar.fill(20 * BLOCK, 4096, 0x99)  # one huge page in unplugged block 20
        await scrub(v)
        assert await settled(v) == 2 * BLOCK
        assert bar.map[0:2 * BLOCK] == b"\x66" * (2 * BLOCK)
        (event,) = seen
        assert (event.size_bytes, event.located, event.action) == (BLOCK, False, "reclaim")
        assert event.ranges == ((BAR_ADDR + 2 * BLOCK, 30 * BLOCK),)
        v.driver.close()
        v.client.close()
        await v.server.discards.wait_idle()


async def test_the_finding_reaches_qmp_qom_and_metrics(vmem_factory: VmemFactory) -> None:
    """qemu.qmp's client sees the event; qom-get and the metrics the counters."""
    import asyncio

    from qemu.qmp import QMPClient

    from vfiouser_vmem.control._metrics import _DeviceCollector
    from vfiouser_vmem.control._qmp import QmpServer
    from vfiouser_vmem.server import ControlledVmem

    v = await vmem_factory.start(size=256 * MiB, requested=0, scrub_interval_s=0)
    bar = await v.memory_bar()
    dev = v.server.config.id
    path = os.path.join(vmem_factory.sock_dir, "qmp")
    qmp_server = QmpServer({dev: ControlledVmem(v.server)}, event_interval_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(qmp_server.serve, path)

        async def session() -> tuple[dict, list]:
            qmp = QMPClient("scrub-test")
            await qmp.connect(path)
            try:
                with qmp.listener("__org.vfiouser-vmem_UNPLUGGED_MEMORY_FOUND") as listener:
                    trio.from_thread.run(lambda: bar.fill(32 * MiB, 3 * MiB, 0x12) or scrub(v))
                    event = await asyncio.wait_for(listener.get(), TIMEOUT)
                props = [await qmp.execute("qom-get", {"path": dev, "property": p})
                         for p in ("unplugged-found", "unplugged-reclaimed", "unplugged-episodes",
                                   "unplugged-access", "scrub-passes")]
                return dict(event), props
            finally:
                await qmp.disconnect()

        with trio.fail_after(60):
            event, props = await trio.to_thread.run_sync(lambda: asyncio.run(session()))
        nursery.cancel_scope.cancel()
    data = event["data"]
    assert data == {"id": dev, "qom-path": f"/machine/peripheral/{dev}/virtio-backend", "size": 3 * MiB,
                    "ranges": [{"addr": BAR_ADDR + 32 * MiB, "size": 3 * MiB}], "located": True,
                    "action": "reclaim", "total-found": 3 * MiB}
    assert props[:4] == [3 * MiB, 3 * MiB, 1, "reclaim"] and props[4] >= 1
    samples = {m.name: m.samples[0].value for m in _DeviceCollector([v.server]).collect()}
    assert samples["vfiouser_vmem_unplugged_found_bytes"] == 3 * MiB
    assert samples["vfiouser_vmem_unplugged_episodes"] == 1
    assert samples["vfiouser_vmem_scrub_passes"] >= 1


@pytest.mark.parametrize("batch", [1, 2, 4096])
def test_unplugged_parts_in_batches(monkeypatch, batch):
    """The C helper fills a bounded buffer; a call resumes where it stopped."""
    from vfiouser_vmem.vmem import _scrub

    monkeypatch.setattr(_scrub, "_BATCH", batch)
    bs = MiB
    bitmap = BlockBitmap(20)
    for block in range(0, 20, 2):
        bitmap.set_range(block, 1)  # even blocks plugged
    extents = [(0, 10 * MiB), (12 * MiB + 5, 13 * MiB), (15 * MiB, 20 * MiB)]
    expected = [(b * MiB, MiB) for b in (1, 3, 5, 7, 9)] + [(15 * MiB, MiB), (17 * MiB, MiB), (19 * MiB, MiB)]
    assert unplugged_parts(extents, bitmap, bs) == expected
