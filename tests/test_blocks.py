"""Unit tests of vfiouser_vmem.blocks: the block bitmap and the discard loop (C helper)."""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

from vfiouser_vmem.vmem._bitmap import (
    BlockBitmap,
    DiscardFailed,
    RangeState,
    allocated_bytes,
    discard,
    discard_runs,
)

MiB = 1 << 20
BLOCK = 2 * MiB
U64_MAX = (1 << 64) - 1


def plugged_blocks(bitmap: BlockBitmap) -> list[int]:
    """Indices of plugged blocks, read one block at a time (independent of runs())."""
    return [i for i in range(bitmap.nb_blocks) if bitmap.range_state(i, 1) == RangeState.PLUGGED]


# --- set / clear / state ------------------------------------------------------


def test_new_bitmap_is_all_unplugged():
    bitmap = BlockBitmap(100)
    assert bitmap.nb_blocks == 100
    assert bitmap.count_plugged() == 0
    assert bitmap.range_state(0, 100) == RangeState.UNPLUGGED
    assert list(bitmap.runs()) == []
    assert list(bitmap.runs(plugged=False)) == [(0, 100)]


def test_range_state_values_are_virtio_mem_state_values():
    assert (RangeState.PLUGGED, RangeState.UNPLUGGED, RangeState.MIXED) == (0, 1, 2)


def test_set_and_clear_overlapping_ranges():
    bitmap = BlockBitmap(64)
    bitmap.set_range(10, 10)  # 10..19
    bitmap.set_range(15, 10)  # 15..24, overlaps
    assert plugged_blocks(bitmap) == list(range(10, 25))
    assert bitmap.count_plugged() == 15
    bitmap.clear_range(12, 3)  # 12..14
    assert plugged_blocks(bitmap) == [10, 11, *range(15, 25)]
    # Clearing what is already clear and setting what is set are no-ops.
    bitmap.clear_range(0, 10)
    bitmap.set_range(20, 5)
    assert plugged_blocks(bitmap) == [10, 11, *range(15, 25)]
    assert bitmap.range_state(10, 2) == RangeState.PLUGGED
    assert bitmap.range_state(12, 3) == RangeState.UNPLUGGED
    assert bitmap.range_state(10, 3) == RangeState.MIXED
    assert bitmap.range_state(11, 5) == RangeState.MIXED
    assert bitmap.range_state(0, 64) == RangeState.MIXED


def test_first_and_last_block():
    bitmap = BlockBitmap(130)
    bitmap.set_range(0, 1)
    bitmap.set_range(129, 1)
    assert plugged_blocks(bitmap) == [0, 129]
    assert bitmap.range_state(0, 1) == RangeState.PLUGGED
    assert bitmap.range_state(129, 1) == RangeState.PLUGGED
    assert bitmap.range_state(1, 128) == RangeState.UNPLUGGED
    assert bitmap.range_state(0, 130) == RangeState.MIXED
    assert list(bitmap.runs()) == [(0, 1), (129, 1)]
    assert list(bitmap.runs(plugged=False)) == [(1, 128)]
    bitmap.clear_range(129, 1)
    assert plugged_blocks(bitmap) == [0]


@pytest.mark.parametrize("nb_blocks", [1, 2, 63, 64, 65, 127, 128, 129, 1000])
def test_whole_bitmap_of_any_size(nb_blocks):
    bitmap = BlockBitmap(nb_blocks)
    bitmap.set_range(0, nb_blocks)
    assert bitmap.count_plugged() == nb_blocks
    assert bitmap.range_state(0, nb_blocks) == RangeState.PLUGGED
    assert list(bitmap.runs()) == [(0, nb_blocks)]
    assert list(bitmap.runs(plugged=False)) == []
    # Bits beyond nb_blocks in the last word are never written.
    if nb_blocks % 64:
        assert bitmap.words[len(bitmap.words) - 1] == (1 << (nb_blocks % 64)) - 1
    bitmap.clear_range(0, nb_blocks)
    assert bitmap.count_plugged() == 0
    assert all(word == 0 for word in bitmap.words)


def test_ranges_crossing_word_boundaries():
    bitmap = BlockBitmap(300)
    bitmap.set_range(60, 10)  # 60..69: words 0 and 1
    assert list(bitmap.words)[:2] == [0xF << 60, 0x3F]
    bitmap.set_range(100, 150)  # 100..249: words 1 (part), 2 (whole), 3 (part)
    assert list(bitmap.runs()) == [(60, 10), (100, 150)]
    assert bitmap.count_plugged() == 160
    assert bitmap.words[2] == U64_MAX
    bitmap.clear_range(127, 2)  # 127, 128: straddles words 1 and 2
    assert list(bitmap.runs()) == [(60, 10), (100, 27), (129, 121)]
    assert bitmap.range_state(129, 121) == RangeState.PLUGGED
    assert bitmap.range_state(126, 3) == RangeState.MIXED
    assert bitmap.range_state(127, 2) == RangeState.UNPLUGGED
    assert bitmap.range_state(250, 50) == RangeState.UNPLUGGED


def test_stray_bits_beyond_the_end_are_ignored():
    # The C helper must not trust the caller's last word beyond nb_blocks.
    bitmap = BlockBitmap(70)
    bitmap.words[1] = (U64_MAX << 6) & U64_MAX  # only bits >= 70 set
    assert bitmap.count_plugged() == 0
    assert list(bitmap.runs()) == []
    assert list(bitmap.runs(plugged=False)) == [(0, 70)]
    assert bitmap.range_state(0, 70) == RangeState.UNPLUGGED
    bitmap.words[1] = 0
    bitmap.set_range(0, 70)
    bitmap.words[1] = U64_MAX  # stray bits set too
    assert bitmap.count_plugged() == 70
    assert list(bitmap.runs()) == [(0, 70)]
    assert list(bitmap.runs(plugged=False)) == []
    assert bitmap.range_state(64, 6) == RangeState.PLUGGED


def test_clear_all():
    bitmap = BlockBitmap(200)
    bitmap.set_range(3, 190)
    bitmap.clear_all()
    assert bitmap.count_plugged() == 0
    assert all(word == 0 for word in bitmap.words)
    BlockBitmap(0).clear_all()  # an empty bitmap has nothing to clear, no error


def test_runs_at_both_ends_and_across_words():
    bitmap = BlockBitmap(200)
    bitmap.set_range(0, 70)
    bitmap.set_range(120, 10)
    bitmap.set_range(190, 10)
    assert list(bitmap.runs()) == [(0, 70), (120, 10), (190, 10)]
    assert list(bitmap.runs(plugged=False)) == [(70, 50), (130, 60)]
    bitmap.set_range(63, 2)
    bitmap.clear_range(64, 1)
    assert list(bitmap.runs()) == [(0, 64), (65, 5), (120, 10), (190, 10)]


def test_alternating_blocks_make_single_block_runs():
    bitmap = BlockBitmap(129)
    for i in range(0, 129, 2):
        bitmap.set_range(i, 1)
    assert list(bitmap.runs()) == [(i, 1) for i in range(0, 129, 2)]
    assert list(bitmap.runs(plugged=False)) == [(i, 1) for i in range(1, 129, 2)]
    assert bitmap.count_plugged() == 65


# --- bad ranges ---------------------------------------------------------------


@pytest.mark.parametrize(
    "first, count",
    [
        (0, 0),  # empty
        (99, 0),
        (100, 1),  # starts at the end
        (99, 2),  # ends one beyond
        (0, 101),
        (U64_MAX, 1),  # start near 2**64
        (U64_MAX, 2),  # end wraps past 2**64 to 0
        (1, U64_MAX),  # end wraps past 2**64 to 0
        (2**63, 2**63),  # end is exactly 2**64, i.e. 0 when wrapped
        (-1, 1),
        (0, -1),
        (2**64, 1),
        (0, 2**64),
    ],
)
def test_bad_ranges_raise_value_error_and_change_nothing(first, count):
    bitmap = BlockBitmap(100)
    bitmap.set_range(10, 5)
    before = list(bitmap.words)
    for method in (bitmap.set_range, bitmap.clear_range, bitmap.range_state):
        with pytest.raises(ValueError) as excinfo:
            method(first, count)
        assert str(first) in str(excinfo.value)
        assert str(count) in str(excinfo.value)
    assert list(bitmap.words) == before


def test_bad_range_message_names_range_and_size():
    bitmap = BlockBitmap(100)
    with pytest.raises(ValueError, match=r"first block 98, 5 blocks \(bitmap of 100 blocks\)"):
        bitmap.set_range(98, 5)
    with pytest.raises(ValueError, match="empty range"):
        bitmap.clear_range(3, 0)


def test_empty_bitmap_refuses_every_range():
    bitmap = BlockBitmap(0)
    assert bitmap.count_plugged() == 0
    assert list(bitmap.runs()) == []
    assert list(bitmap.runs(plugged=False)) == []
    with pytest.raises(ValueError):
        bitmap.set_range(0, 1)


def test_non_integer_arguments_raise_value_error():
    bitmap = BlockBitmap(10)
    with pytest.raises(ValueError):
        bitmap.set_range(1.5, 1)
    with pytest.raises(ValueError):
        BlockBitmap(-1)
    with pytest.raises(ValueError):
        BlockBitmap(2**63)


# --- large bitmap -------------------------------------------------------------


def test_large_bitmap_one_tib_of_two_mib_blocks():
    nb_blocks = (1 << 40) // BLOCK
    assert nb_blocks == 524288
    bitmap = BlockBitmap(nb_blocks)
    assert list(bitmap.runs(plugged=False)) == [(0, nb_blocks)]
    bitmap.set_range(nb_blocks - 1, 1)  # a lone block at the very end
    assert list(bitmap.runs()) == [(nb_blocks - 1, 1)]
    bitmap.set_range(0, 64 * 1000 + 3)
    bitmap.set_range(300_000, 100_000)
    assert bitmap.count_plugged() == 64_003 + 100_000 + 1
    assert list(bitmap.runs()) == [(0, 64_003), (300_000, 100_000), (nb_blocks - 1, 1)]
    assert list(bitmap.runs(plugged=False)) == [(64_003, 300_000 - 64_003), (400_000, nb_blocks - 1 - 400_000)]
    assert bitmap.range_state(300_000, 100_000) == RangeState.PLUGGED
    assert bitmap.range_state(0, nb_blocks) == RangeState.MIXED
    bitmap.clear_all()
    assert bitmap.count_plugged() == 0
    bitmap.set_range(0, nb_blocks)
    assert bitmap.count_plugged() == nb_blocks
    assert bitmap.range_state(0, nb_blocks) == RangeState.PLUGGED


# --- randomized comparison with a list-of-bools model -------------------------


@pytest.mark.parametrize("nb_blocks", [1, 63, 64, 65, 191, 256, 1000])
def test_random_operations_match_a_python_model(nb_blocks):
    rng = random.Random(0x5EED + nb_blocks)
    bitmap = BlockBitmap(nb_blocks)
    model = [False] * nb_blocks
    for _ in range(1500):
        # Mostly valid ranges, some out of bounds or empty.
        first = rng.randrange(nb_blocks + 2)
        count = rng.randrange(nb_blocks + 2) if rng.random() < 0.3 else rng.randrange(min(nb_blocks, 80) + 1)
        valid = count > 0 and first + count <= nb_blocks
        op = rng.choice(("set", "clear", "state"))
        if not valid:
            with pytest.raises(ValueError):
                {"set": bitmap.set_range, "clear": bitmap.clear_range, "state": bitmap.range_state}[op](first, count)
        elif op == "set":
            bitmap.set_range(first, count)
            model[first : first + count] = [True] * count
        elif op == "clear":
            bitmap.clear_range(first, count)
            model[first : first + count] = [False] * count
        else:
            part = model[first : first + count]
            expected = RangeState.PLUGGED if all(part) else RangeState.UNPLUGGED if not any(part) else RangeState.MIXED
            assert bitmap.range_state(first, count) == expected
        assert bitmap.count_plugged() == sum(model)
        for plugged in (True, False):
            expected_runs = []
            for i, state in enumerate(model):
                if state == plugged:
                    if expected_runs and sum(expected_runs[-1]) == i:
                        expected_runs[-1] = (expected_runs[-1][0], expected_runs[-1][1] + 1)
                    else:
                        expected_runs.append((i, 1))
            assert list(bitmap.runs(plugged=plugged)) == expected_runs


# --- discard ------------------------------------------------------------------


@pytest.fixture
def backend():
    """A 64 MiB memfd backend (32 blocks of 2 MiB), nothing allocated yet."""
    fd = os.memfd_create("test-vmem-backend", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * MiB)
    try:
        yield fd
    finally:
        os.close(fd)


def fill_block(fd: int, block: int, fd_offset: int = 0) -> None:
    # Whole blocks, so that the allocation is exact whatever the page size.
    os.pwrite(fd, bytes([block + 1]) * BLOCK, fd_offset + block * BLOCK)


def block_data(fd: int, block: int, fd_offset: int = 0) -> bytes:
    return os.pread(fd, BLOCK, fd_offset + block * BLOCK)


def test_discard_runs_gives_exactly_the_plugged_blocks_back(backend):
    assert allocated_bytes(backend) == 0
    written = [0, 1, 2, 5, 10, 11, 30, 31]
    for block in written:
        fill_block(backend, block)
    assert allocated_bytes(backend) == len(written) * BLOCK

    bitmap = BlockBitmap(32)
    bitmap.set_range(1, 2)  # blocks 1, 2
    bitmap.set_range(10, 1)  # block 10
    bitmap.set_range(28, 4)  # blocks 28..31 (28, 29 hold no data)
    discard_runs(backend, bitmap, BLOCK)

    discarded = [1, 2, 10, 30, 31]
    assert allocated_bytes(backend) == (len(written) - len(discarded)) * BLOCK
    for block in written:
        expected = bytes(BLOCK) if block in discarded else bytes([block + 1]) * BLOCK
        assert block_data(backend, block) == expected, f"block {block}"
    # KEEP_SIZE: the backend still spans the device maximum.
    assert os.fstat(backend).st_size == 64 * MiB


def test_discard_runs_of_unplugged_blocks_with_offset(backend):
    fd_offset = 4 * MiB  # blocks start 4 MiB into the backend; 30 blocks fit
    for block in range(30):
        fill_block(backend, block, fd_offset)
    os.pwrite(backend, b"head", 0)  # before fd_offset: must survive
    allocated = allocated_bytes(backend)
    bitmap = BlockBitmap(30)
    bitmap.set_range(5, 20)  # plugged 5..24; unplugged 0..4 and 25..29
    discard_runs(backend, bitmap, BLOCK, fd_offset_bytes=fd_offset, plugged=False)
    assert allocated_bytes(backend) == allocated - 10 * BLOCK
    for block in range(30):
        kept = 5 <= block < 25
        assert (block_data(backend, block, fd_offset) != bytes(BLOCK)) == kept, f"block {block}"
    assert os.pread(backend, 4, 0) == b"head"


def test_discard_through_a_shared_mapping(backend):
    # The server and QEMU see the backend through mmap: a hole must read back
    # as zeros there too.
    with mmap.mmap(backend, 64 * MiB) as mapping:
        mapping[0:BLOCK] = b"\xaa" * BLOCK
        mapping[BLOCK : 2 * BLOCK] = b"\xbb" * BLOCK
        assert allocated_bytes(backend) == 2 * BLOCK
        discard(backend, 0, BLOCK)
        assert allocated_bytes(backend) == BLOCK
        assert mapping[0:BLOCK] == bytes(BLOCK)
        assert mapping[BLOCK : 2 * BLOCK] == b"\xbb" * BLOCK


def test_discard_runs_never_goes_beyond_the_last_block(backend):
    # Stray bits beyond nb_blocks in the last word (set here by hand) must not
    # extend the last run past the bitmap, into memory it does not describe.
    for block in range(14, 21):
        fill_block(backend, block)
    bitmap = BlockBitmap(16)
    bitmap.set_range(14, 2)
    bitmap.words[0] |= 0x1F << 16  # stray bits for "blocks" 16..20
    assert list(bitmap.runs()) == [(14, 2)]
    discard_runs(backend, bitmap, BLOCK)
    assert allocated_bytes(backend) == 5 * BLOCK
    for block in range(16, 21):
        assert block_data(backend, block) == bytes([block + 1]) * BLOCK, f"block {block}"


def test_discard_of_nothing_plugged_makes_no_call():
    # No run, no fallocate: even a closed fd is fine.
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    discard_runs(write_end, BlockBitmap(64), BLOCK)


def test_discard_on_a_closed_fd_raises_ebadf():
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(DiscardFailed) as excinfo:
        discard(write_end, 6 * MiB, BLOCK)
    assert excinfo.value.errno == errno.EBADF
    assert excinfo.value.offset == 6 * MiB
    assert str(6 * MiB) in str(excinfo.value)
    assert isinstance(excinfo.value, OSError)


def test_discard_runs_on_a_pipe_reports_errno_and_first_run():
    read_end, write_end = os.pipe()
    try:
        bitmap = BlockBitmap(16)
        bitmap.set_range(3, 2)
        bitmap.set_range(9, 1)
        with pytest.raises(DiscardFailed) as excinfo:
            discard_runs(write_end, bitmap, BLOCK, fd_offset_bytes=MiB)
        assert excinfo.value.errno == errno.ESPIPE
        assert excinfo.value.offset == MiB + 3 * BLOCK
        assert f"offset {MiB + 3 * BLOCK}" in str(excinfo.value)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_discard_on_a_read_only_fd_raises(backend):
    fd = os.open(f"/proc/self/fd/{backend}", os.O_RDONLY)
    try:
        with pytest.raises(DiscardFailed) as excinfo:
            discard(fd, 0, BLOCK)
        assert excinfo.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "offset, length",
    [(0, 0), (-1, BLOCK), (0, -1), (2**63 - 1, 1), (2**64 - BLOCK, BLOCK), (0, 2**64)],
)
def test_discard_bad_range_raises_value_error(backend, offset, length):
    with pytest.raises(ValueError):
        discard(backend, offset, length)


def test_discard_runs_bad_arguments_raise_value_error(backend):
    bitmap = BlockBitmap(4)
    bitmap.set_range(0, 4)
    with pytest.raises(ValueError, match="block size"):
        discard_runs(backend, bitmap, 0)
    with pytest.raises(ValueError, match="largest file offset"):
        discard_runs(backend, bitmap, 2**62)
    with pytest.raises(ValueError):
        discard_runs(backend, bitmap, BLOCK, fd_offset_bytes=-1)


def test_allocated_bytes_counts_pages_not_size(backend):
    assert os.fstat(backend).st_size == 64 * MiB
    assert allocated_bytes(backend) == 0
    fill_block(backend, 7)
    assert allocated_bytes(backend) == BLOCK
