"""The virtio-mem device model, driven without sockets (docs/design.md, "virtio-mem rules")."""

from __future__ import annotations

import re

import pytest

from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.vmem import (
    MIB,
    USABLE_EXTENT_BYTES,
    DiscardFailed,
    ProtocolViolation,
    Request,
    RequestType,
    Response,
    VirtioMemDevice,
    HostMemory,
    check_block_size,
    unpack_response,
)

GIB = 1 << 30
BASE = 0x10_0000_0000
BS = 2 * MIB


class Recorder(HostMemory):
    def __init__(self) -> None:
        self.discards: list[tuple[int, int]] = []
        self.config_changes = 0
        self.sizes: list[int] = []
        self.fail = False

    def discard(self, offset: int, length: int) -> None:
        if self.fail:
            raise DiscardFailed("fallocate: EIO")
        self.discards.append((offset, length))

    def config_changed(self) -> None:
        self.config_changes += 1


def make(size=4 * GIB, block=BS, requested=0, node=None):
    rec = Recorder()
    dev = VirtioMemDevice(region_size_bytes=size, block_size_bytes=block, requested_size_bytes=requested,
                          node_id=node, host_memory=rec)
    dev.set_config_notifier(rec.config_changed)
    dev.addr = BASE
    dev.size_listeners.append(rec.sizes.append)
    return dev, rec


def req(dev, type_, addr, nb_blocks) -> tuple[Response, int]:
    response, state = unpack_response(dev.handle_request(Request(type_, addr, nb_blocks).pack()))
    return Response(response), state


def plug(dev, block, n=1):
    return req(dev, RequestType.PLUG, BASE + block * dev.block_size, n)[0]


def unplug(dev, block, n=1):
    return req(dev, RequestType.UNPLUG, BASE + block * dev.block_size, n)[0]


def state(dev, block, n=1):
    return req(dev, RequestType.STATE, BASE + block * dev.block_size, n)


def test_config_layout_is_56_bytes_little_endian():
    dev, _ = make(requested=1 * GIB, node=3)
    cfg = dev.config_bytes()
    assert len(cfg) == 56
    assert int.from_bytes(cfg[0:8], "little") == BS
    assert int.from_bytes(cfg[8:10], "little") == 3
    assert cfg[10:16] == bytes(6)
    assert int.from_bytes(cfg[16:24], "little") == BASE
    assert int.from_bytes(cfg[24:32], "little") == 4 * GIB
    assert int.from_bytes(cfg[32:40], "little") == 1 * GIB + USABLE_EXTENT_BYTES
    assert int.from_bytes(cfg[40:48], "little") == 0
    assert int.from_bytes(cfg[48:56], "little") == 1 * GIB


def test_plug_ack_updates_plugged_size_without_config_change():
    dev, rec = make(requested=1 * GIB)
    changes = rec.config_changes
    assert plug(dev, 0, 64) == Response.ACK
    assert dev.plugged_size == 64 * BS
    assert rec.sizes == [64 * BS]
    assert rec.config_changes == changes  # no config interrupt for plugged_size


@pytest.mark.parametrize(
    "addr_delta, nb_blocks, why",
    [
        (1, 1, "unaligned"),
        (BS // 2, 1, "unaligned by half a block"),
        (0, 0, "nb_blocks 0"),
        (-BS, 1, "before the region"),
    ],
)
def test_range_errors(addr_delta, nb_blocks, why):
    dev, _ = make(requested=1 * GIB)
    for type_ in (RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE):
        assert req(dev, type_, BASE + addr_delta, nb_blocks)[0] == Response.ERROR, (type_, why)
    assert dev.plugged_size == 0


def test_range_outside_usable_region_is_error_even_inside_region():
    dev, _ = make(size=4 * GIB, requested=1 * GIB)
    usable_blocks = dev.usable_region_size // BS
    assert plug(dev, usable_blocks - 1) == Response.ACK
    assert plug(dev, usable_blocks) == Response.ERROR
    assert plug(dev, usable_blocks - 1 - 1, 2) == Response.ERROR  # one plugged, checked later; range first
    assert req(dev, RequestType.PLUG, BASE + (usable_blocks - 2) * BS, 3)[0] == Response.ERROR


def test_range_overflow_is_error():
    dev, _ = make(requested=1 * GIB)
    top = (1 << 64) - BS
    assert req(dev, RequestType.PLUG, top - (top % BS), 0xFFFF)[0] == Response.ERROR


def test_plug_beyond_requested_size_is_nack_and_changes_nothing():
    dev, rec = make(requested=4 * BS)
    assert plug(dev, 0, 3) == Response.ACK
    assert plug(dev, 3, 2) == Response.NACK
    assert dev.plugged_size == 3 * BS
    assert plug(dev, 3, 1) == Response.ACK


def test_validation_order_range_before_nack_before_state():
    dev, _ = make(requested=2 * BS)
    # Outside the usable region AND beyond requested: ERROR (rule 2 first).
    far = dev.usable_region_size // BS
    assert plug(dev, far, 1) == Response.ERROR
    assert plug(dev, 0, 2) == Response.ACK
    # Already plugged AND beyond requested: NACK (rule 3 before rule 4).
    assert plug(dev, 0, 1) == Response.NACK


def test_double_plug_and_unplug_of_unplugged_are_errors():
    dev, _ = make(requested=1 * GIB)
    assert plug(dev, 10, 4) == Response.ACK
    assert plug(dev, 12, 4) == Response.ERROR  # overlaps plugged blocks
    assert dev.plugged_size == 4 * BS
    assert unplug(dev, 8, 4) == Response.ERROR  # partly unplugged
    assert unplug(dev, 20, 1) == Response.ERROR
    assert unplug(dev, 10, 4) == Response.ACK
    assert dev.plugged_size == 0


def test_unplug_discards_exactly_the_range():
    dev, rec = make(requested=1 * GIB)
    plug(dev, 5, 3)
    assert unplug(dev, 5, 3) == Response.ACK
    assert rec.discards == [(5 * BS, 3 * BS)]


def test_discard_failure_answers_busy_and_keeps_state():
    dev, rec = make(requested=1 * GIB)
    plug(dev, 0, 2)
    rec.fail = True
    assert unplug(dev, 0, 2) == Response.BUSY  # never ERROR for host trouble
    assert dev.plugged_size == 2 * BS
    assert req(dev, RequestType.UNPLUG_ALL, 0, 0)[0] == Response.BUSY
    assert dev.plugged_size == 2 * BS
    rec.fail = False
    assert unplug(dev, 0, 2) == Response.ACK


def test_state_plugged_unplugged_mixed():
    dev, _ = make(requested=1 * GIB)
    plug(dev, 4, 4)
    assert state(dev, 4, 4) == (Response.ACK, 0)
    assert state(dev, 0, 4) == (Response.ACK, 1)
    assert state(dev, 2, 4) == (Response.ACK, 2)
    assert state(dev, 0, 0)[0] == Response.ERROR


def test_unplug_all_discards_runs_and_shrinks_usable_region():
    dev, rec = make(size=4 * GIB, requested=1 * GIB)
    plug(dev, 0, 2)
    plug(dev, 10, 3)
    dev.set_requested_size(0)
    assert dev.usable_region_size == 1 * GIB + USABLE_EXTENT_BYTES  # does not shrink on resize
    changes = rec.config_changes
    assert req(dev, RequestType.UNPLUG_ALL, 0, 0)[0] == Response.ACK
    # The whole device, not only the plugged runs: reset means empty (docs/scrub.md).
    assert rec.discards == [(0, 4 * GIB)]
    assert dev.plugged_size == 0
    assert dev.usable_region_size == 0
    assert rec.config_changes == changes + 1  # usable_region_size changed


def test_usable_region_follows_qemu_rule():
    dev, rec = make(size=4 * GIB, block=128 * MIB)
    assert dev.usable_region_size == 0
    dev.set_requested_size(128 * MIB)
    assert dev.usable_region_size == 384 * MIB
    dev.set_requested_size(4 * GIB - 128 * MIB)
    assert dev.usable_region_size == 4 * GIB  # capped at the region size
    dev.set_requested_size(128 * MIB)
    assert dev.usable_region_size == 4 * GIB  # only grows on resize


def test_usable_region_rounds_up_to_large_blocks():
    dev, _ = make(size=8 * GIB, block=1 * GIB)
    dev.set_requested_size(1 * GIB)
    assert dev.usable_region_size == 2 * GIB  # 1G + 256M rounded up to 1G blocks


def test_config_change_on_every_requested_size_set():
    # QEMU's virtio_mem_set_requested_size notifies "even if the size didn't
    # change": the operator's nudge that makes a guest retry a BUSY plug.
    dev, rec = make(size=4 * GIB)
    dev.set_requested_size(1 * GIB)
    assert rec.config_changes == 1
    dev.set_requested_size(1 * GIB)
    assert rec.config_changes == 2  # nothing changed: notified all the same
    dev.set_requested_size(512 * MIB)
    assert rec.config_changes == 3  # requested changed, usable did not
    with pytest.raises(ConfigError):
        dev.set_requested_size(3 * MIB)
    assert rec.config_changes == 3  # a refused value changes nothing, notifies nothing


@pytest.mark.parametrize(
    "value, message",
    [
        (3 * MIB, "'requested-size' has to be multiples of 'block-size' (0x200000)"),
        (8 * GIB, "'requested-size' cannot exceed the memory backend size(0x100000000)"),
        (-2 * MIB, "negative"),
        ("1G", "must be an integer"),
        (True, "must be an integer"),
    ],
)
def test_bad_requested_size_is_refused_and_changes_nothing(value, message):
    dev, rec = make(size=4 * GIB, requested=1 * GIB)
    before = dev.config_bytes()
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        dev.set_requested_size(value)
    assert dev.config_bytes() == before


def test_system_reset_unplugs_discards_and_shrinks():
    dev, rec = make(size=4 * GIB, requested=1 * GIB)
    plug(dev, 0, 64)
    dev.set_requested_size(2 * MIB)
    dev.system_reset()
    assert dev.plugged_size == 0
    assert rec.discards == [(0, 4 * GIB)]  # the whole device: reset means empty
    assert dev.usable_region_size == 2 * MIB + USABLE_EXTENT_BYTES
    assert dev.requested_size == 2 * MIB  # the request outlives the reset
    dev.system_reset()  # idempotent (QEMU sometimes resets twice): holes punched again cost nothing
    assert rec.discards == [(0, 4 * GIB), (0, 4 * GIB)] and dev.plugged_size == 0


def test_unknown_type_and_short_request_are_protocol_violations():
    dev, _ = make(requested=1 * GIB)
    with pytest.raises(ProtocolViolation, match="unknown request type 7"):
        dev.handle_request(Request(7, BASE, 1).pack())
    with pytest.raises(ProtocolViolation, match="request of 10 bytes"):
        dev.handle_request(bytes(10))
    assert dev.plugged_size == 0


def test_features_offer_acpi_pxm_only_with_a_node():
    assert not make()[0].features & 1
    assert make(node=0)[0].features & 1
    for dev in (make()[0], make(node=1)[0]):
        assert dev.features & (1 << 32) and dev.features & 2


def test_feature_refusals():
    ok = (1 << 32) | 2
    assert VirtioMemDevice.features_refusal(ok) is None
    assert "UNPLUGGED_INACCESSIBLE" in VirtioMemDevice.features_refusal(1 << 32)
    assert "VERSION_1" in VirtioMemDevice.features_refusal(2)


@pytest.mark.parametrize("block", [1 * MIB, 2 * MIB, 4 * MIB, 128 * MIB, 256 * MIB, 1 * GIB])
def test_block_sizes_from_1m_to_1g(block):
    dev, _ = make(size=8 * GIB, block=block, requested=2 * GIB)
    assert plug(dev, 0, 1) == Response.ACK
    assert dev.plugged_size == block
    assert unplug(dev, 0, 1) == Response.ACK


@pytest.mark.parametrize(
    "block, page, message",
    [(3 * MIB, 2 * MIB, "power of two"), (512 << 10, 4096, "below the minimum"), (2 * MIB, 1 * GIB, "below")],
)
def test_bad_block_sizes(block, page, message):
    with pytest.raises(ValueError, match=message):
        check_block_size(block, page_size_bytes=page)


def test_region_size_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ValueError, match="not a positive multiple"):
        VirtioMemDevice(region_size_bytes=3 * MIB, block_size_bytes=2 * MIB)


def test_plugged_size_always_matches_the_bitmap():
    """plugged_size is kept beside the bitmap: after any mix of requests and
    resets it equals the bitmap's own count."""
    import random

    dev, rec = make(size=1 * GIB, requested=1 * GIB)
    rng = random.Random(7)
    for _ in range(2000):
        block, n = rng.randrange(0, 520), rng.randrange(0, 8)
        op = rng.choice([RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE])
        req(dev, op, BASE + block * BS, n)
        if rng.random() < 0.01:
            rec.fail = rng.random() < 0.5
            try:
                dev.system_reset()
            except DiscardFailed:
                pass
            rec.fail = False
        assert dev.plugged_size == dev.bitmap.count_plugged() * BS


def test_deferred_size_events_are_sent_once_at_flush_with_the_final_size():
    """The transport defers size listeners until the guest has its answer
    (defer_size_events): a batch of requests makes one call, final size."""
    dev, rec = make(requested=1 * GIB)
    dev.defer_size_events = True
    assert plug(dev, 0, 4) == Response.ACK
    assert plug(dev, 8, 2) == Response.ACK
    assert unplug(dev, 0, 1) == Response.ACK
    assert plug(dev, 1, 1) == Response.ERROR  # a refusal changes nothing
    assert rec.sizes == []
    dev.flush_size_events()
    assert rec.sizes == [5 * BS]
    dev.flush_size_events()  # nothing new: no call
    assert rec.sizes == [5 * BS]
    assert state(dev, 0, 1) == (Response.ACK, 1)
    dev.flush_size_events()  # STATE changes no size
    assert rec.sizes == [5 * BS]
    dev.defer_size_events = False
    assert unplug(dev, 8, 2) == Response.ACK
    assert rec.sizes == [5 * BS, 3 * BS]
