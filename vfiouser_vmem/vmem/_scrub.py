"""Scrubbing: host memory found in unplugged blocks, reported and given back.

QEMU maps the device's memory BAR straight into the guest, so nothing can
stop a guest from writing to blocks it has not plugged (or has unplugged):
the host allocates memory there as for any shared file.  QEMU's own
virtio-mem lists it as a limitation ("no protection of unplugged memory").
The server owns the backend and can see which of its pages hold memory, so
it looks (docs/scrub.md):

- the allocated extents of the backend (``lseek(SEEK_DATA/SEEK_HOLE)``, one
  pair of calls per extent, whatever the size of the holes:
  ``allocated_extents``), scanned in a worker thread;
- intersected, on the trio thread, with the unplugged blocks of the bitmap
  as it is then (``unplugged_parts``): plugged memory is never a finding and
  never touched;
- given back through the device's ``DiscardQueue``, so that a PLUG of the
  same blocks takes the discard back or waits for it (the claim rule of
  deferred discards, vmem/_discard.py).

A scan is valid only if nothing on the host side changed the backend while
it ran: it starts when the discard queue is idle, and its result is dropped
(and the scan repeated) when the device's host epoch moved meanwhile (a PLUG
claimed memory, an UNPLUG queued a discard, a preallocation ran).  So a
discard that finished during the scan, or a preallocation given back, is
never mistaken for the guest's doing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vfiouser_vmem._blocks import ffi, lib
from vfiouser_vmem.vmem._bitmap import BlockBitmap

__all__ = ["ScrubFinding", "Scrubber", "allocated_extents", "unplugged_parts"]

#: Extents fetched from the C helper per call.
_BATCH = 4096


def allocated_extents(fd: int, start_bytes: int, end_bytes: int) -> list[tuple[int, int]]:
    """The [start, end) extents of ``fd`` within the range that hold memory
    (csrc/vmem_hostmem.h, vmem_data_extents); OSError when lseek fails."""
    out = ffi.new("uint64_t[]", 2 * _BATCH)
    extents: list[tuple[int, int]] = []
    pos = start_bytes
    while pos < end_bytes:
        n = lib.vmem_data_extents(fd, pos, end_bytes, out, _BATCH)
        if n < 0:
            raise OSError(-n, f"lseek(SEEK_DATA) on the backend: {os.strerror(-n)}")
        extents.extend((out[2 * i], out[2 * i + 1]) for i in range(n))
        if n < _BATCH:
            break
        pos = out[2 * _BATCH - 1]
    return extents


def unplugged_parts(extents: list[tuple[int, int]], bitmap: BlockBitmap, block_size_bytes: int
                    ) -> list[tuple[int, int]]:
    """The parts of ``extents`` (byte ranges of the backend, in order) that
    lie in unplugged blocks, as (offset, length) pairs in order.  In C
    (csrc/vmem_hostmem.h, vmem_unplugged_parts): it runs on the trio thread,
    where the bitmap cannot change under it, and costs ~3 us per extent in
    Python."""
    if not extents:
        return []
    flat = ffi.new("uint64_t[]", [x for extent in extents for x in extent])
    parts: list[tuple[int, int]] = []
    out = ffi.new("uint64_t[]", 2 * _BATCH)
    first = 0
    while first < len(extents):
        n = lib.vmem_unplugged_parts(bitmap.words, bitmap.nb_blocks, block_size_bytes, flat + 2 * first,
                                     len(extents) - first, out, _BATCH)
        if n < 0:
            raise ValueError(f"vmem_unplugged_parts: {os.strerror(-n)}")
        for i in range(n):
            start, end = out[2 * i], out[2 * i + 1]
            if parts and parts[-1][0] + parts[-1][1] == start:
                parts[-1] = (parts[-1][0], end - parts[-1][0])
            else:
                parts.append((start, end - start))
        if n < _BATCH:
            break
        # Full: go on from the extent that holds the last part's end.
        resume = parts[-1][0] + parts[-1][1]
        while first < len(extents) and extents[first][1] <= resume:
            first += 1
        if first < len(extents) and extents[first][0] < resume:
            extents = list(extents)
            extents[first] = (resume, extents[first][1])
            flat[2 * first] = resume
    return parts


@dataclass(frozen=True)
class ScrubFinding:
    """What one pass found: byte ranges of the backend in unplugged blocks
    that hold host memory, and their total.  ``located`` False: the backend
    cannot tell where (no exact extents); ``ranges`` are then every
    unplugged run, somewhere in which ``bytes`` of memory are."""

    ranges: tuple[tuple[int, int], ...]
    bytes: int
    located: bool = True


class Scrubber:
    """One device's scrub passes: after each resize settles (``settle_s``
    after the last change of the plugged size), after resets, and every
    ``interval_s`` (0: only on those occasions... and never periodically).

    ``scan()`` returns the backend's allocated extents (run in a worker
    thread); ``bitmap`` and ``block_size_bytes`` say which blocks are
    unplugged; ``idle()`` waits until no discard is queued or running;
    ``epoch()`` is the device's host epoch (see the module docstring);
    ``found(finding)`` is called on the trio thread with what a valid pass
    found in unplugged blocks (nothing is called for a clean pass).
    """

    #: How long after a change of the plugged size a pass runs.
    SETTLE_S = 1.0
    #: A scan invalidated by host activity is retried after this long.
    RETRY_S = 0.2

    def __init__(self, *, name: str, scan: Callable[[], list[tuple[int, int]]], bitmap: BlockBitmap,
                 block_size_bytes: int, idle: Callable[[], Awaitable[None]], epoch: Callable[[], int],
                 found: Callable[[ScrubFinding], None], interval_s: float = 10.0,
                 allocated: Callable[[], int] | None = None) -> None:
        self.name = name
        self._scan = scan
        #: Without exact extents (hugetlbfs: SEEK_DATA reports the whole file
        #: as data), ``allocated()`` (the backend's allocated bytes) is what
        #: the scrubber has: more than the plugged size means memory in
        #: unplugged blocks, somewhere in them (docs/scrub.md).
        self._allocated = allocated
        self._bitmap = bitmap
        self._block_size = block_size_bytes
        self._idle = idle
        self._epoch = epoch
        self._found = found
        self.interval_s = interval_s
        self._due_at: float | None = None
        self._wakeup = trio.Event()
        #: Passes completed (valid scans), and the last one's wall time.
        self.passes_total = 0
        self.last_pass_s = 0.0
        self.last_pass_extents = 0
        #: Scans dropped because the host side changed the backend meanwhile.
        self.retries_total = 0
        self._passes_changed = trio.Event()

    # -- trio thread -----------------------------------------------------
    def request(self, delay_s: float = 0.0) -> None:
        """A pass ``delay_s`` from now (an earlier one already due stays)."""
        at = trio.current_time() + delay_s
        if self._due_at is None or at < self._due_at:
            self._due_at = at
            self._wakeup.set()

    def size_changed(self) -> None:
        """The plugged size changed: a pass once it has settled."""
        self._due_at = trio.current_time() + self.SETTLE_S
        self._wakeup.set()

    async def wait_for_pass(self, after: int) -> None:
        """Until more than ``after`` passes have completed (tests)."""
        while self.passes_total <= after:
            await self._passes_changed.wait()

    async def run(self) -> None:
        """Scrub when due, until cancelled."""
        if self.interval_s > 0:
            self.request(self.interval_s)
        while True:
            if self._due_at is None:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if trio.current_time() < self._due_at:
                self._wakeup = trio.Event()
                with trio.move_on_at(self._due_at):
                    await self._wakeup.wait()
                continue
            self._due_at = None
            await self._pass()
            if self.interval_s > 0:
                self.request(self.interval_s)

    async def _pass(self) -> None:
        while True:
            await self._idle()
            epoch = self._epoch()
            started = time.monotonic()
            if self._allocated is None:
                extents = await trio.to_thread.run_sync(self._scan)
            else:
                allocated = self._allocated()
            if self._epoch() != epoch:
                # A PLUG, an UNPLUG or a preallocation changed the backend
                # while the scan ran: what it saw may be theirs.
                self.retries_total += 1
                await trio.sleep(self.RETRY_S)
                continue
            if self._allocated is None:
                parts = unplugged_parts(extents, self._bitmap, self._block_size)
                found_bytes = sum(n for _, n in parts)
                self.last_pass_extents = len(extents)
            else:
                plugged_bytes = self._bitmap.count_plugged() * self._block_size
                found_bytes = max(0, allocated - plugged_bytes)
                parts = [(first * self._block_size, count * self._block_size)
                         for first, count in self._bitmap.runs(plugged=False)] if found_bytes else []
            self.last_pass_s = time.monotonic() - started
            self.passes_total += 1
            self._passes_changed.set()
            self._passes_changed = trio.Event()
            if parts:
                self._found(ScrubFinding(tuple(parts), found_bytes, located=self._allocated is None))
            return
