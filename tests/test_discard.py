"""The deferred discard queue (vfiouser_vmem/discard.py): the range set it
keeps, and the rules that make answering UNPLUG before the hole is punched
safe (a PLUG never races a discard of its range; failures are retried)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import trio
import trio.testing

from vfiouser_vmem.vmem import DiscardFailed
from vfiouser_vmem.vmem._discard import DiscardQueue, RangeSet

MiB = 1 << 20
TIMEOUT = 5


# -- RangeSet -------------------------------------------------------------------

def _as_units(rs: RangeSet) -> set[int]:
    return {u for s, e in rs.intervals() for u in range(s, e)}


def test_rangeset_matches_a_plain_set_under_random_operations() -> None:
    rng = random.Random(5)
    rs, model = RangeSet(), set()
    for _ in range(3000):
        start = rng.randrange(0, 200)
        end = start + rng.randrange(0, 20)
        op = rng.random()
        if op < 0.45:
            rs.add(start, end)
            model |= set(range(start, end))
        elif op < 0.85:
            removed = rs.remove(start, end)
            assert removed == len(model & set(range(start, end)))
            model -= set(range(start, end))
        elif model:
            last = max(model)
            got_start, n = rs.take_last(7)
            assert got_start + n - 1 == last and 1 <= n <= 7
            assert set(range(got_start, got_start + n)) <= model
            model -= set(range(got_start, got_start + n))
        assert _as_units(rs) == model
        assert rs.total_bytes == len(model)
        assert bool(rs) == bool(model)
        # Disjoint, sorted and never adjacent (adjacent intervals are merged).
        ivs = rs.intervals()
        assert all(s < e for s, e in ivs)
        assert all(a[1] < b[0] for a, b in zip(ivs, ivs[1:]))


def test_rangeset_empty_ranges_change_nothing() -> None:
    rs = RangeSet()
    rs.add(5, 5)
    rs.add(7, 3)
    assert not rs and rs.total_bytes == 0
    rs.add(0, 10)
    assert rs.remove(4, 4) == 0
    assert rs.intervals() == [(0, 10)]


# -- DiscardQueue ---------------------------------------------------------------

class FakeBackend:
    """Records discards (from the worker thread); can fail or be slow."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.failures_left = 0
        self.events: list[str] = []
        self.started = threading.Event()
        self.release: threading.Event | None = None
        self.slow_s = 0.0

    def discard(self, offset: int, length: int) -> None:
        self.calls.append((offset, length))
        self.started.set()
        if self.release is not None:
            self.release.wait(TIMEOUT)
        if self.slow_s:
            # Widens the window in which a claim overlaps this discard (the
            # kernel's fallocate of touched memory takes milliseconds).
            time.sleep(self.slow_s)
        self.events.append(f"end {offset}")
        if self.failures_left:
            self.failures_left -= 1
            raise DiscardFailed("fallocate: EIO")


def make(chunk: int = 4 * MiB, **kwargs) -> tuple[DiscardQueue, FakeBackend]:
    backend = FakeBackend()
    return DiscardQueue(backend.discard, chunk_bytes=chunk, retry_initial_s=0.01, **kwargs), backend


async def test_queued_ranges_are_discarded_in_chunks_after_submit() -> None:
    queue, backend = make(chunk=4 * MiB)
    queue.submit(0, 10 * MiB)
    queue.submit(32 * MiB, 2 * MiB)
    assert queue.pending_bytes == 12 * MiB
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    # Highest first (the queue is taken from its end: O(1) per chunk).
    assert backend.calls == [(32 * MiB, 2 * MiB), (6 * MiB, 4 * MiB), (2 * MiB, 4 * MiB), (0, 2 * MiB)]
    assert queue.pending_bytes == 0 and queue.discarded_bytes_total == 12 * MiB
    assert queue.failure is None


async def test_claim_drops_the_queued_part_of_a_range() -> None:
    queue, backend = make(chunk=64 * MiB)
    queue.submit(0, 8 * MiB)
    queue.claim(2 * MiB, 4 * MiB)  # plugged again before the worker got to it
    assert queue.pending_bytes == 4 * MiB and queue.claimed_bytes_total == 4 * MiB
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    assert backend.calls == [(6 * MiB, 2 * MiB), (0, 2 * MiB)]


async def test_claim_waits_for_a_discard_of_its_range_in_progress() -> None:
    queue, backend = make(chunk=8 * MiB)
    backend.release = threading.Event()
    backend.slow_s = 0.05
    queue.submit(0, 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(backend.started.wait)
        assert queue.pending_bytes == 8 * MiB  # in flight counts as pending
        backend.release.set()
        queue.claim(2 * MiB, 2 * MiB)
        backend.events.append("claimed")
        assert backend.events == ["end 0", "claimed"], "the PLUG would race the hole punch"
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()


async def test_claim_while_the_worker_thread_is_still_to_start_does_not_wait() -> None:
    """The worker thread may start only when the trio thread runs again: a
    claim meanwhile must cut the range out without waiting for it (waiting
    would be forever)."""
    gate = trio.Event()

    async def late_thread(work):
        await gate.wait()
        return await trio.to_thread.run_sync(work)

    backend = FakeBackend()
    queue = DiscardQueue(backend.discard, chunk_bytes=8 * MiB, run_in_thread=late_thread)
    queue.submit(0, 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        await trio.testing.wait_all_tasks_blocked()
        rescued = []

        def rescue() -> None:  # a watchdog, so that a regression fails instead of hanging
            rescued.append(True)
            with queue._lock:
                queue._in_flight = None
                queue._chunk_done.notify_all()

        watchdog = threading.Timer(TIMEOUT, rescue)
        watchdog.start()
        try:
            queue.claim(2 * MiB, 2 * MiB)
        finally:
            watchdog.cancel()
        assert not rescued, "claim waited for a thread that could not start"
        gate.set()
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    assert backend.calls == [(4 * MiB, 4 * MiB), (0, 2 * MiB)]
    assert queue.discarded_bytes_total == 6 * MiB


async def test_a_chunk_cancelled_before_its_thread_started_goes_back_to_the_queue() -> None:
    async def never(work):
        await trio.sleep_forever()

    backend = FakeBackend()
    queue = DiscardQueue(backend.discard, chunk_bytes=8 * MiB, run_in_thread=never)
    queue.submit(0, 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert queue.pending_bytes == 8 * MiB
    queue.drain_now()  # shutdown: still discarded
    assert backend.calls == [(0, 8 * MiB)]


async def test_claim_of_another_range_does_not_wait() -> None:
    queue, backend = make(chunk=8 * MiB)
    backend.release = threading.Event()
    queue.submit(0, 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(backend.started.wait)
        queue.claim(8 * MiB, 2 * MiB)  # would hang until TIMEOUT if it waited
        assert backend.events == []
        backend.release.set()
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()


async def test_a_failed_discard_is_kept_retried_and_reported() -> None:
    queue, backend = make(chunk=64 * MiB)
    backend.failures_left = 2
    queue.submit(16 * MiB, 2 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    assert backend.calls == [(16 * MiB, 2 * MiB)] * 3
    assert queue.failures_total == 2 and queue.failure is None
    assert queue.discarded_bytes_total == 2 * MiB and queue.pending_bytes == 0


async def test_failed_discards_are_retried_with_capped_exponential_back_off(autojump_clock) -> None:
    def always_fails(offset: int, length: int) -> None:
        raise DiscardFailed("EIO")

    async def inline(work):
        # In the trio thread, so that virtual time is exact.
        return work()

    queue = DiscardQueue(always_fails, chunk_bytes=MiB, retry_initial_s=1.0, retry_max_s=4.0, run_in_thread=inline)
    queue.submit(0, MiB)
    failed_at: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        while len(failed_at) < 5:
            if queue.failures_total > len(failed_at):
                failed_at.append(trio.current_time())
                assert queue.failure == "EIO" and queue.pending_bytes == MiB
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    # Back-off 1, 2, 4, then capped at 4 s (observed within one 1 ms poll).
    assert [round(t - failed_at[0], 2) for t in failed_at] == [0, 1, 3, 7, 11]


async def test_claiming_the_failing_range_ends_the_failure() -> None:
    queue, backend = make(chunk=64 * MiB)
    queue.retry_initial_s = 3600  # no retry within the test
    backend.failures_left = 1
    queue.submit(0, 2 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            while queue.failure is None:
                await trio.sleep(0.001)
        queue.claim(0, 2 * MiB)  # the guest plugged it again: nothing to retry
        assert queue.failure is None and queue.pending_bytes == 0
        queue.submit(4 * MiB, 2 * MiB)  # and the worker is not held by the old back-off
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    assert backend.calls == [(0, 2 * MiB), (4 * MiB, 2 * MiB)]


async def test_a_failed_chunk_is_not_requeued_over_a_range_claimed_meanwhile() -> None:
    queue, backend = make(chunk=8 * MiB)
    queue.retry_initial_s = 3600
    backend.release = threading.Event()
    backend.failures_left = 1
    queue.submit(0, 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(backend.started.wait)
        backend.release.set()
        queue.claim(2 * MiB, 2 * MiB)  # waits for the (failing) chunk
        with trio.fail_after(TIMEOUT):
            while queue.failure is None:
                await trio.sleep(0.001)
        # Retried later: everything but the claimed blocks, which now hold guest data.
        assert queue._pending.intervals() == [(0, 2 * MiB), (4 * MiB, 8 * MiB)]
        nursery.cancel_scope.cancel()


def test_drain_now_discards_everything_left_in_the_calling_thread() -> None:
    queue, backend = make(chunk=4 * MiB)
    queue.submit(0, 6 * MiB)
    backend.failures_left = 1
    queue.drain_now()
    assert backend.calls == [(2 * MiB, 4 * MiB), (0, 2 * MiB)]
    assert queue.pending_bytes == 0 and queue.failures_total == 1
    assert queue.discarded_bytes_total == 2 * MiB


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        DiscardQueue(lambda o, n: None, chunk_bytes=0)


async def test_an_unexpected_error_in_the_discard_keeps_the_range_and_frees_plugs() -> None:
    """A bug in the discard function must neither lose the range nor leave
    a chunk marked in flight (a PLUG of it would then wait forever)."""
    calls = []

    def buggy(offset: int, length: int) -> None:
        calls.append((offset, length))
        if len(calls) == 1:
            raise RuntimeError("bug")

    queue = DiscardQueue(buggy, chunk_bytes=8 * MiB, retry_initial_s=0.01)
    queue.submit(0, 2 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        with trio.fail_after(TIMEOUT):
            await queue.wait_idle()
        nursery.cancel_scope.cancel()
    assert calls == [(0, 2 * MiB), (0, 2 * MiB)]  # failed, then retried
    assert queue.failures_total == 1 and queue.failure is None
    assert queue._in_flight is None
