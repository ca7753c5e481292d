"""Reads of the virtio-mem device configuration answered in C
(csrc/vmem_config.c ``vmem_bar0_fast_read``) against Python's answer
(VirtioPciTransport.bar0_access): same bytes for every read the C side
takes, and the C side takes only what it should.  Then the server over a
real vfio-user socket: the driver's config reads after a resize never reach
Python, and a Python callback disarms the C answer until the server arms it
again."""

from __future__ import annotations

import struct

import pytest

from test_protocol import BAR_ADDR, BLOCK, Vmem, vmem, vmem_factory  # noqa: F401 (fixtures)
from test_vfu_notify import Bar0Spy, spy  # noqa: F401 (fixture)
from vfiouser_vmem._blocks import ffi as blocks_ffi, lib as blocks_lib
from vfiouser_vmem.vmem import CONFIG_SIZE, MIB, VirtioMemDevice
from vfiouser_vmem.server import ControlledVmem
from vfiouser_vmem.virtio._pci import COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, PCI_MSIX_FLAGS_ENABLE, VirtioPciTransport

BS = 2 * MIB
GEN = COMMON_CFG_OFFSET + 0x15  # config_generation (virtio spec 4.1.4.3)


def transport(*, bar_addr: int = 0x40_0000_0000, node: int | None = 3) -> VirtioPciTransport:
    device = VirtioMemDevice(region_size_bytes=256 * BS, block_size_bytes=BS, requested_size_bytes=64 * BS,
                             node_id=node)
    cfg = bytearray(256)
    struct.pack_into("<II", cfg, 0x10 + 4 * 2, bar_addr & 0xFFFFFFFF | 0xC, bar_addr >> 32)
    struct.pack_into("<H", cfg, 0x40 + 2, PCI_MSIX_FLAGS_ENABLE)
    return VirtioPciTransport(device, config_space=lambda: memoryview(cfg), trigger=lambda v: None,
                              msix_cap_offset=0x40)


def c_read(t: VirtioPciTransport, offset: int, count: int) -> bytes | None:
    """What the binding gets from the C side: the bytes, or None (Python's)."""
    buf = blocks_ffi.new("char[]", max(count, 1))
    if blocks_lib.vmem_bar0_fast_read(blocks_ffi.cast("void *", t.fast_read_address[1]), buf, count, offset):
        return blocks_ffi.buffer(buf, count)[:]
    return None


def py_read(t: VirtioPciTransport, offset: int, count: int) -> bytes:
    buf = bytearray(count)
    t.bar0_access(offset, memoryview(buf), False)
    return bytes(buf)


def states(t: VirtioPciTransport):
    """The same transport in several device states."""
    d = t.device
    yield "fresh"
    assert d.handle_request(struct.pack("<H6xQH6x", 0, BAR_ADDR_T, 5))[:2] == b"\0\0"  # PLUG 5 blocks
    yield "plugged"
    d.set_requested_size(200 * BS)
    yield "resized"
    t.config_generation = 0xFE
    yield "generation"


BAR_ADDR_T = 0x40_0000_0000


def test_every_device_config_read_is_answered_alike():
    t = transport()
    assert t.arm_c_paths()[1]
    for state in states(t):
        for offset in range(DEVICE_CFG_OFFSET - 8, DEVICE_CFG_OFFSET + CONFIG_SIZE + 8):
            for count in (1, 2, 4, 8):
                c = c_read(t, offset, count)
                inside = DEVICE_CFG_OFFSET <= offset and offset + count <= DEVICE_CFG_OFFSET + CONFIG_SIZE
                if not inside:
                    assert c is None, (state, offset, count)
                    continue
                assert c == py_read(t, offset, count), (state, hex(offset), count)
        # The whole structure at once, too.
        assert c_read(t, DEVICE_CFG_OFFSET, CONFIG_SIZE) == t.device.config_bytes()


def test_the_values_are_the_models():
    t = transport(node=7)
    t.arm_c_paths()[1]
    d = t.device
    d.handle_request(struct.pack("<H6xQH6x", 0, BAR_ADDR_T + 4 * BS, 3))
    block_size, node, addr, region, usable, plugged, requested = struct.unpack(
        "<QH6xQQQQQ", c_read(t, DEVICE_CFG_OFFSET, CONFIG_SIZE))
    assert (block_size, node, addr, region) == (BS, 7, BAR_ADDR_T, 256 * BS)
    assert (usable, plugged, requested) == (d.usable_region_size, 3 * BS, 64 * BS)


def test_config_generation_is_answered_and_only_as_one_byte():
    t = transport()
    for generation in (0, 1, 0x80, 0xFF):
        t.config_generation = generation
        assert c_read(t, GEN, 1) == bytes([generation]) == py_read(t, GEN, 1)
    t.notify_config()  # a resize bumps it: C sees the one home
    assert c_read(t, GEN, 1) == bytes([0])
    for offset, count in ((GEN, 2), (GEN - 1, 2), (GEN - 1, 1), (GEN + 1, 1), (COMMON_CFG_OFFSET, 4)):
        assert c_read(t, offset, count) is None


def test_an_unassigned_bar_is_left_to_python_which_warns(caplog: pytest.LogCaptureFixture):
    t = transport(bar_addr=0)
    assert not t.arm_c_paths()[1]
    assert c_read(t, DEVICE_CFG_OFFSET, 8) is None  # even if it were armed
    py_read(t, DEVICE_CFG_OFFSET, 8)
    assert "has no guest address" in caplog.text


def test_empty_reads_are_pythons():
    t = transport()
    t.arm_c_paths()[1]
    assert c_read(t, DEVICE_CFG_OFFSET, 0) is None


# -- the server, over a real vfio-user socket -------------------------------------


async def test_config_reads_after_a_resize_never_reach_python(vmem: Vmem, spy: Bar0Spy) -> None:  # noqa: F811
    d = vmem.driver
    ControlledVmem(vmem.server).qom_set("requested-size", 512 * BLOCK)
    assert await d.plug(BAR_ADDR, 3) == 0
    config = await d.read_config()
    assert (config.requested_size, config.plugged_size) == (512 * BLOCK, 3 * BLOCK)
    assert config.addr == BAR_ADDR
    generation = await d.config_generation()
    assert generation == vmem.server.transport.config_generation
    assert spy.calls == [], "a config read reached Python"
    # A register Python answers (device status) disarms the C answer for
    # the rest of that message only: the server arms it again after it.
    await d.status()
    assert spy.calls and vmem.server.ctx.reads_armed
    spy.calls.clear()
    assert (await d.read_config()).plugged_size == 3 * BLOCK
    assert spy.calls == []


async def test_a_python_callback_disarms_the_config_reads(vmem: Vmem) -> None:  # noqa: F811
    ctx = vmem.server.ctx
    assert ctx.reads_armed
    buf = blocks_ffi.new("char[]", 4)
    from vfiouser_vmem._vfu import lib as vfu_lib
    assert vfu_lib.vfu_py_region1(ctx._ctx, buf, 4, 0, False) == 4  # BAR1 (MSI-X PBA/table): Python
    assert not ctx.reads_armed
    await vmem.sync()  # a message: armed again after it
    assert ctx.reads_armed
