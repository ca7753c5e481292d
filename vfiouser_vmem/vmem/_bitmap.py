"""Block-state bitmap and discard loop: a thin wrapper over the C helper of csrc/.

The state of a virtio-mem device's blocks lives in a :class:`BlockBitmap` (bit
i = block i, set = plugged), in C so that a 1 TiB device with 2 MiB blocks
(524288 blocks) is scanned a 64-bit word at a time.  :func:`discard` and
:func:`discard_runs` give a backend's memory back to the host by punching
holes, one ``fallocate`` per run of blocks.  The C functions release the GIL
(cffi does that for every call), so a long discard may run in a worker thread.
"""

from __future__ import annotations

import enum
import errno as _errno
import operator
import os
from collections.abc import Iterator

from vfiouser_vmem._blocks import ffi, lib
from vfiouser_vmem.errors import DiscardFailed

__all__ = [
    "BlockBitmap",
    "DiscardFailed",
    "RangeState",
    "allocated_bytes",
    "discard",
    "discard_runs",
]

_U64_MAX = (1 << 64) - 1
_OFF_MAX = (1 << 63) - 1  # off_t: the largest file offset fallocate accepts


class RangeState(enum.IntEnum):
    """State of a block range; the values are virtio-mem's STATE response values."""

    PLUGGED = lib.VMEM_RANGE_ALL_SET
    UNPLUGGED = lib.VMEM_RANGE_ALL_CLEAR
    MIXED = lib.VMEM_RANGE_MIXED


_RANGE_STATES = {state.value: state for state in RangeState}


def _u64(value: int, what: str) -> int:
    """``value`` as an int that fits C's uint64_t, else ValueError naming ``what``.

    cffi would raise OverflowError/TypeError; callers get one exception type for
    every bad argument.
    """
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {type(value).__name__}") from None
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} {value} is outside 0..2**64-1")
    return value


class BlockBitmap:
    """Plugged/unplugged state of ``nb_blocks`` blocks, all unplugged at first."""

    __slots__ = ("nb_blocks", "words")

    def __init__(self, nb_blocks: int) -> None:
        nb_blocks = _u64(nb_blocks, "number of blocks")
        if nb_blocks > _OFF_MAX:
            raise ValueError(f"number of blocks {nb_blocks} is larger than 2**63-1")
        self.nb_blocks = nb_blocks
        # Owned here and zeroed by cffi; handed to vmem_discard_runs as is.
        self.words = ffi.new("uint64_t[]", (nb_blocks + 63) // 64)

    def __repr__(self) -> str:
        return f"BlockBitmap(nb_blocks={self.nb_blocks}, plugged={self.count_plugged()})"

    # set_range, clear_range and range_state run once or twice per guest
    # request: arguments go to cffi as they are, and are validated (for a
    # precise message) only when cffi or the C helper refuses them.
    def _refused(self, first_block: int, nb_blocks: int, rc: int | None = None) -> ValueError:
        first_block, nb_blocks = _u64(first_block, "first block"), _u64(nb_blocks, "number of blocks")
        if rc is None:  # cffi refused a value that _u64 accepts: cannot happen
            return ValueError(f"bad block range: first block {first_block}, {nb_blocks} blocks")
        if rc == -_errno.EINVAL:
            reason = "empty range"
        elif rc == -_errno.ERANGE:
            reason = "range ends beyond the bitmap"
        else:
            reason = os.strerror(-rc)
        return ValueError(
            f"bad block range: first block {first_block}, {nb_blocks} blocks "
            f"(bitmap of {self.nb_blocks} blocks): {reason}"
        )

    def _range_call(self, fn, first_block: int, nb_blocks: int) -> int:
        try:
            rc = fn(self.words, self.nb_blocks, first_block, nb_blocks)
        except (TypeError, OverflowError):
            raise self._refused(first_block, nb_blocks) from None
        if rc < 0:
            raise self._refused(first_block, nb_blocks, rc)
        return rc

    def set_range(self, first_block: int, nb_blocks: int) -> None:
        """Mark blocks [first_block, first_block + nb_blocks) plugged."""
        self._range_call(lib.vmem_bitmap_set, first_block, nb_blocks)

    def clear_range(self, first_block: int, nb_blocks: int) -> None:
        """Mark blocks [first_block, first_block + nb_blocks) unplugged."""
        self._range_call(lib.vmem_bitmap_clear, first_block, nb_blocks)

    def range_state(self, first_block: int, nb_blocks: int) -> RangeState:
        """Whether blocks [first_block, first_block + nb_blocks) are all plugged, all unplugged or mixed."""
        return _RANGE_STATES[self._range_call(lib.vmem_bitmap_range_state, first_block, nb_blocks)]

    def count_plugged(self) -> int:
        """Number of plugged blocks."""
        return lib.vmem_bitmap_count_set(self.words, self.nb_blocks)

    def clear_all(self) -> None:
        """Mark every block unplugged."""
        if self.nb_blocks:
            lib.vmem_bitmap_clear(self.words, self.nb_blocks, 0, self.nb_blocks)

    def runs(self, plugged: bool = True, first_block: int = 0, end_block: int | None = None
             ) -> Iterator[tuple[int, int]]:
        """Yield (first_block, nb_blocks) of every maximal run of plugged (or
        unplugged) blocks within [first_block, end_block) (default: all), in
        order, clipped to that range.

        The bitmap is read as the iteration goes: change it between steps only
        if the iteration need not see a consistent snapshot.
        """
        find_start = lib.vmem_bitmap_find_next_set if plugged else lib.vmem_bitmap_find_next_clear
        find_end = lib.vmem_bitmap_find_next_clear if plugged else lib.vmem_bitmap_find_next_set
        limit = self.nb_blocks if end_block is None else min(end_block, self.nb_blocks)
        pos = first_block
        while pos < limit:
            start = find_start(self.words, self.nb_blocks, pos)
            if start >= limit:
                return
            end = min(find_end(self.words, self.nb_blocks, start), limit)
            yield start, end - start
            pos = end


def _discard_error(rc: int, failed: int, what: str) -> DiscardFailed:
    err = -rc
    return DiscardFailed(err, f"{what} failed at offset {failed}: {os.strerror(err)}", offset=failed)


def discard(fd: int, offset_bytes: int, length_bytes: int) -> None:
    """Give [offset_bytes, offset_bytes + length_bytes) of ``fd`` back to the host.

    Raises DiscardFailed (an OSError with the C errno) when the hole cannot be
    punched, ValueError for an empty or impossible range.
    """
    offset_bytes, length_bytes = _u64(offset_bytes, "offset"), _u64(length_bytes, "length")
    if length_bytes == 0 or offset_bytes + length_bytes > _OFF_MAX:
        raise ValueError(
            f"bad discard range: {length_bytes} bytes at offset {offset_bytes} "
            f"(must be non-empty and end at most at 2**63-1)"
        )
    failed = ffi.new("uint64_t *")
    rc = lib.vmem_discard(fd, offset_bytes, length_bytes, failed)
    if rc < 0:
        raise _discard_error(rc, failed[0], f"discard of {length_bytes} bytes at offset {offset_bytes} of fd {fd}")


def discard_runs(
    fd: int,
    bitmap: BlockBitmap,
    block_size_bytes: int,
    fd_offset_bytes: int = 0,
    plugged: bool = True,
) -> None:
    """Discard every run of plugged (or, with ``plugged=False``, unplugged) blocks of ``bitmap``.

    Block i lives at ``fd_offset_bytes + i * block_size_bytes`` of ``fd``; each
    run is one fallocate.  Stops at the first failure with DiscardFailed, whose
    ``offset`` is the start of the run that failed.
    """
    block_size_bytes = _u64(block_size_bytes, "block size")
    fd_offset_bytes = _u64(fd_offset_bytes, "backend offset")
    if block_size_bytes == 0:
        raise ValueError("block size must not be 0")
    if fd_offset_bytes + bitmap.nb_blocks * block_size_bytes > _OFF_MAX:
        raise ValueError(
            f"{bitmap.nb_blocks} blocks of {block_size_bytes} bytes at offset {fd_offset_bytes} "
            f"end beyond the largest file offset (2**63-1)"
        )
    failed = ffi.new("uint64_t *")
    rc = lib.vmem_discard_runs(
        fd, bitmap.words, bitmap.nb_blocks, block_size_bytes, fd_offset_bytes, 1 if plugged else 0, failed
    )
    if rc < 0:
        kind = "plugged" if plugged else "unplugged"
        raise _discard_error(rc, failed[0], f"discard of the {kind} blocks of fd {fd}")


def allocated_bytes(fd: int) -> int:
    """Bytes of host memory (or disk) that ``fd``'s file holds now: the honest measure for a memfd backend."""
    return os.fstat(fd).st_blocks * 512
