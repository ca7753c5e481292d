"""Deferred discard: memory of unplugged blocks goes back to the host after
the UNPLUG was answered, in a worker thread.

Why (docs/discard.md): punching a hole into touched memory costs the kernel
about 0.2 ms per MiB (25 ms for a 128 MiB UNPLUG here).  QEMU's virtio-mem
does it inside the request (virtio_mem_set_block_state ->
ram_block_discard_range), so the guest waits for it and, in QEMU, so does
every vCPU that needs the BQL.  Here the device answers as soon as the
bitmap says "unplugged" and a worker gives the memory back meanwhile.  Two
rules keep that safe:

- A PLUG of a range whose discard is still queued takes the range out of the
  queue first, and waits if a worker is discarding part of it right now
  (``claim``): a hole punched after the guest plugged and wrote the block
  again would lose the guest's data.  Work is done in chunks of
  ``chunk_bytes``, so that wait is short.
- A discard that fails is kept and retried with back-off; while one is
  failing, the server answers new UNPLUG requests BUSY (``failure``), as
  QEMU answers a failed discard, so unplugged-but-not-returned memory cannot
  pile up behind the guest's back.

Queued ranges are byte ranges of the backend, kept as a sorted set of
disjoint intervals (:class:`RangeSet`), shared under a lock with the worker
thread; the device model's side (``submit``, ``claim``) and the task that
drives the worker run on the trio thread.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Awaitable, Callable

import trio

from vfiouser_vmem.errors import DiscardFailed
from vfiouser_vmem.util.sizes import format_size

log = logging.getLogger("vfiouser_vmem.discard")


class RangeSet:
    """A set of bytes kept as sorted, disjoint, non-adjacent [start, end) intervals."""

    __slots__ = ("_starts", "_ends", "total_bytes")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends))

    def add(self, start: int, end: int) -> None:
        """Add [start, end), merging with the intervals it overlaps or touches."""
        if start >= end:
            return
        if not self._ends or start > self._ends[-1]:
            # Beyond the last interval: the common case (UNPLUG_ALL and resets
            # queue runs in ascending order), O(1).
            self._starts.append(start)
            self._ends.append(end)
            self.total_bytes += end - start
            return
        # Every interval with end >= start and start <= end merges.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
            self.total_bytes -= sum(e - s for s, e in zip(self._starts[lo:hi], self._ends[lo:hi]))
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self.total_bytes += end - start

    def remove(self, start: int, end: int) -> int:
        """Remove [start, end); returns how many bytes were in the set."""
        if start >= end:
            return 0
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return 0
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        removed = 0
        for s, e in zip(self._starts[lo:hi], self._ends[lo:hi]):
            removed += min(e, end) - max(s, start)
            if s < start:
                keep_starts.append(s)
                keep_ends.append(start)
            if e > end:
                keep_starts.append(end)
                keep_ends.append(e)
        self._starts[lo:hi] = keep_starts
        self._ends[lo:hi] = keep_ends
        self.total_bytes -= removed
        return removed

    def last(self, max_bytes: int) -> tuple[int, int]:
        """The highest [end - n, end) with n <= max_bytes (not removed)."""
        start, end = self._starts[-1], self._ends[-1]
        return max(start, end - max_bytes), end

    def take_last(self, max_bytes: int) -> tuple[int, int]:
        """Remove and return the highest [end - n, end), n <= max_bytes.
        From the end of the lists: O(1) however many intervals there are."""
        start, end = self.last(max_bytes)
        if start == self._starts[-1]:
            self._starts.pop()
            self._ends.pop()
        else:
            self._ends[-1] = start
        self.total_bytes -= end - start
        return start, end - start


class DiscardQueue:
    """Ranges of one backend waiting to be discarded, and the task that does it.

    ``discard(offset_bytes, length_bytes)`` runs in a worker thread and
    raises DiscardFailed when the memory could not be given back.

    The queue and the chunk in flight are shared with the worker thread
    under ``_lock``.  One ``run_in_thread`` call drains the queue chunk after
    chunk (including ranges submitted meanwhile), so the trio thread is
    woken once per burst of unplugs, not once per chunk.
    """

    def __init__(
        self,
        discard: Callable[[int, int], None],
        *,
        chunk_bytes: int,
        name: str = "vmem0",
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        run_in_thread: Callable[[Callable[[], DiscardFailed | None]], Awaitable[DiscardFailed | None]] | None = None,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk size {chunk_bytes} must be positive")
        self._discard = discard
        self.chunk_bytes = chunk_bytes
        self.name = name
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        # Tests run the discard inline to keep virtual time exact.
        self._run_in_thread = run_in_thread or trio.to_thread.run_sync
        self._lock = threading.Lock()
        self._chunk_done = threading.Condition(self._lock)
        # Under _lock:
        self._pending = RangeSet()
        self._in_flight: tuple[int, int] | None = None
        self._claimed_in_flight = RangeSet()  # parts of the chunk in flight plugged again
        self.discarded_bytes_total = 0
        # Trio thread only:
        self._draining = False
        self._work = trio.Event()
        self._wake_due = False
        #: Set when the queue goes idle; made only while someone waits.
        self._idle_event: trio.Event | None = None
        self._retry_delay_s = retry_initial_s
        self._retry_at: float | None = None
        #: Why the last discard failed, while its range waits for a retry.
        self.failure: str | None = None
        self.failures_total = 0
        self.claimed_bytes_total = 0
        #: Called (trio thread) when the worker sets or clears ``failure``:
        #: the server's C request path answers UNPLUG only while it is None.
        self.on_failure_change: Callable[[], None] | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes unplugged but not yet given back (queued or being discarded)."""
        with self._lock:
            busy = self._in_flight
            return self._pending.total_bytes + (busy[1] - busy[0] if busy is not None else 0)

    def _is_idle(self) -> bool:
        with self._lock:
            return not self._pending and not self._draining

    def _update_idle(self) -> None:
        if self._idle_event is not None and self._is_idle():
            self._idle_event.set()
            self._idle_event = None

    # -- the device model's side (trio thread) ---------------------------------
    def submit(self, offset_bytes: int, length_bytes: int, *, wake: bool = True) -> None:
        """Queue [offset, offset + length) for discarding.  Never blocks.

        ``wake=False``: the worker is woken by the next ``wake()`` instead.
        The server passes it while a request is being answered: waking the
        worker task costs ~10 us of the guest's wait, and the worker could
        not start before the answer anyway (it needs the trio thread)."""
        if length_bytes <= 0:
            return
        with self._lock:
            self._pending.add(offset_bytes, offset_bytes + length_bytes)
        if wake:
            self._work.set()
        else:
            self._wake_due = True

    def wake(self) -> None:
        """Wake the worker for ranges submitted with ``wake=False``."""
        if self._wake_due:
            self._wake_due = False
            self._work.set()

    def claim_due(self) -> bool:
        """Whether a ``claim`` may have work to do: something is queued or
        being discarded.  False is final until the next ``submit`` (trio
        thread): the worker only ever takes work away.

        Read without the lock: _drain makes a chunk visible in _in_flight
        before it leaves _pending, and back in _pending before _in_flight is
        cleared, so a range being discarded is always seen."""
        return bool(self._pending) or self._in_flight is not None

    def claim(self, offset_bytes: int, length_bytes: int) -> None:
        """The range is about to be plugged: it must not be discarded from
        now on.  Drops its queued part; waits (one chunk at most) while the
        worker is discarding part of it."""
        if not self.claim_due():
            return  # nothing queued, nothing in flight: the usual case
        end = offset_bytes + length_bytes
        with self._lock:
            claimed = self._pending.remove(offset_bytes, end)
            busy = self._in_flight
            if busy is not None and busy[0] < end and offset_bytes < busy[1]:
                # Never queued again if this chunk fails; and the request must
                # not be answered before the hole is punched.  Blocks the trio
                # thread, on purpose and briefly: the worker needs nothing
                # from it to finish the chunk.
                self._claimed_in_flight.add(max(offset_bytes, busy[0]), min(end, busy[1]))
                while self._in_flight == busy:
                    self._chunk_done.wait()
            nothing_left = not self._pending and self._in_flight is None
        if claimed:
            self.claimed_bytes_total += claimed
            if nothing_left and self.failure is not None:
                # The range that kept failing was plugged again: nothing to retry.
                log.info("%s: the range whose discard failed was plugged again; nothing left to retry", self.name)
                self._recovered()
            self._update_idle()

    def retry_now(self) -> None:
        """End the back-off: the worker retries the failed range at once."""
        if self._retry_at is not None:
            self._retry_at = None
            self._retry_delay_s = self.retry_initial_s
            self._work.set()

    def _failure_changed(self) -> None:
        if self.on_failure_change is not None:
            self.on_failure_change()

    def _recovered(self) -> None:
        self.failure = None
        self._retry_at = None
        self._retry_delay_s = self.retry_initial_s

    async def wait_idle(self) -> None:
        """Until nothing is queued or being discarded."""
        while not self._is_idle():
            if self._idle_event is None:
                self._idle_event = trio.Event()
            await self._idle_event.wait()

    # -- the worker ----------------------------------------------------------
    async def run(self) -> None:
        """Discard queued ranges until cancelled."""
        while True:
            with self._lock:
                has_work = bool(self._pending)
            if not has_work:
                self._work = trio.Event()
                await self._work.wait()
                continue
            if self._retry_at is not None and trio.current_time() < self._retry_at:
                # Back-off after a failure.  Woken early only to re-check: a
                # claim may have taken the failing range, or retry_now().
                self._work = trio.Event()
                with trio.move_on_at(self._retry_at):
                    await self._work.wait()
                continue
            await self._drain_in_thread()

    async def _drain_in_thread(self) -> None:
        self._draining = True
        try:
            # Not abandoned on cancellation: the thread finishes the queue
            # (as drain_now would at shutdown), then the task ends.
            error = await self._run_in_thread(self._drain)
        finally:
            self._draining = False
            self._update_idle()
        if error is None:
            if self.failure is not None:
                log.warning("%s: discards work again (the failed range was given back)", self.name)
                self._recovered()
                self._failure_changed()
            return
        self.failures_total += 1
        self.failure = str(error)
        self._failure_changed()
        self._retry_at = trio.current_time() + self._retry_delay_s
        log.warning(
            "%s: could not give memory back to the host: %s; retrying in %.0f s, "
            "UNPLUG requests are answered BUSY until then",
            self.name, error, self._retry_delay_s,
        )
        self._retry_delay_s = min(self._retry_delay_s * 2, self.retry_max_s)

    def _drain(self, *, give_up_on_failure: bool = False,
               stop: Callable[[], bool] | None = None) -> DiscardFailed | None:
        """Discard chunk after chunk until the queue is empty (the worker
        thread; also drain_now).  Stops at the first failure: the chunk goes
        back to the queue, minus what was plugged again meanwhile; or, with
        ``give_up_on_failure``, is logged and dropped and the rest goes on.
        Stops also before a chunk when ``stop()`` is true, leaving the rest queued."""
        while True:
            with self._lock:
                if not self._pending or (stop is not None and stop()):
                    return None
                # Order matters for claim()'s unlocked check: in flight first,
                # then out of the queue.
                self._claimed_in_flight = RangeSet()
                self._in_flight = self._pending.last(self.chunk_bytes)
                start, n = self._pending.take_last(self.chunk_bytes)
            error = None
            try:
                self._discard(start, n)
            except DiscardFailed as exc:
                error = exc
            except Exception as exc:
                # A bug rather than a host condition; still, the range stays
                # queued and _in_flight is cleared below, or a PLUG of this
                # range would wait for the chunk forever.
                log.exception("%s: discarding %s at offset %#x raised", self.name, format_size(n), start)
                error = DiscardFailed(f"unexpected {type(exc).__name__}: {exc}")
            with self._lock:
                # Back in the queue (on failure) before out of flight.
                if error is None:
                    self.discarded_bytes_total += n
                elif not give_up_on_failure:
                    self._pending.add(start, start + n)
                    for s, e in self._claimed_in_flight.intervals():
                        self._pending.remove(s, e)
                self._in_flight = None
                self._chunk_done.notify_all()
            if error is not None:
                if not give_up_on_failure:
                    return error
                self.failures_total += 1
                log.warning("%s: could not give back %s at offset %#x at shutdown: %s",
                            self.name, format_size(n), start, error)

    def drain_now(self, stop: Callable[[], bool] | None = None) -> None:
        """Discard everything still queued, in this thread, each chunk once
        (shutdown: the backend is about to be closed; failures are logged);
        before each chunk, give up if ``stop()`` is true (a second signal:
        the operator wants the process gone now)."""
        self._drain(give_up_on_failure=True, stop=stop)
        self._update_idle()
