"""Benchmarks without a guest: the discard loop, the block bitmap, scrub
passes and resets, and the server's start-up time and RSS.

Each function returns plain data (seconds, bytes) for bench/run.py's report;
sizes are parameters so that tests/test_bench.py can run them tiny.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))

from harness import ServerProcess, VmemServer, short_tmpdir  # noqa: E402

from bench.procinfo import proc_rss  # noqa: E402
from vfiouser_vmem.vmem._bitmap import BlockBitmap, allocated_bytes, discard_runs  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def python_discard_loop(fd: int, ranges: list[tuple[int, int]]) -> None:
    """The plain Python/ctypes loop: one fallocate(PUNCH_HOLE|KEEP_SIZE) per (offset, length)."""
    fallocate = _libc.fallocate
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    for offset, length in ranges:
        if fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate at {offset}: {os.strerror(err)}")


def alternating_bitmap(nb_blocks: int, stride: int = 2) -> BlockBitmap:
    """Every ``stride``-th block plugged: the most runs a bitmap can have (stride 2)."""
    bitmap = BlockBitmap(nb_blocks)
    for i in range(0, nb_blocks, stride):
        bitmap.set_range(i, 1)
    return bitmap


def _touch(view: memoryview, ranges: list[tuple[int, int]], page: int) -> None:
    for offset, length in ranges:
        for p in range(offset, offset + length, page):
            view[p] = 1


def bench_discard(device_bytes: int, block_bytes: int = 2 * MIB, *, touch: bool = False, reps: int = 3,
                  stride: int = 2) -> dict:
    """The C ``discard_runs`` against ``python_discard_loop`` over the same
    ranges (every ``stride``-th block of a ``device_bytes`` memfd).

    Untouched (sparse) memory measures the loop's own cost per fallocate;
    ``touch=True`` writes every page of the ranges first (outside the
    timing), so the kernel's freeing of pages is included."""
    nb_blocks = device_bytes // block_bytes
    bitmap = alternating_bitmap(nb_blocks, stride)
    ranges = [(first * block_bytes, count * block_bytes) for first, count in bitmap.runs()]
    fd = os.memfd_create("vfiouser-vmem-bench", os.MFD_CLOEXEC)
    page = os.sysconf("SC_PAGE_SIZE")
    times: dict[str, list[float]] = {"c": [], "python": []}
    freed: dict[str, list[int]] = {"c": [], "python": []}
    try:
        os.ftruncate(fd, device_bytes)
        mm = mmap.mmap(fd, device_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if touch else None
        view = memoryview(mm) if mm is not None else None
        try:
            for _ in range(reps):
                for kind in ("c", "python"):
                    if view is not None:
                        _touch(view, ranges, page)
                    before = allocated_bytes(fd)
                    started = time.perf_counter()
                    if kind == "c":
                        discard_runs(fd, bitmap, block_bytes)
                    else:
                        python_discard_loop(fd, ranges)
                    times[kind].append(time.perf_counter() - started)
                    after = allocated_bytes(fd)
                    if after != 0:
                        raise AssertionError(f"{kind} discard left {after} bytes allocated")
                    freed[kind].append(before - after)
        finally:
            if view is not None:
                view.release()
                mm.close()
    finally:
        os.close(fd)
    return {"device_bytes": device_bytes, "block_bytes": block_bytes, "ranges": len(ranges), "touch": touch,
            "times": times, "freed_bytes": freed}


def _queued_device(device_bytes: int, block_bytes: int):
    """A memfd backend, a ``DiscardQueue`` over it and a ``VirtioMemDevice``
    whose HostMemory queues its discards on it (as the server's does:
    ``DeviceServer.discard``/``claim``); the caller closes the backend."""
    from vfiouser_vmem.vmem import HostMemory, VirtioMemDevice
    from vfiouser_vmem.vmem._backend import MemfdBackend
    from vfiouser_vmem.vmem._discard import DiscardQueue

    backend = MemfdBackend(device_bytes, name="vfiouser-vmem-bench")
    try:
        queue = DiscardQueue(backend.discard, chunk_bytes=32 * MIB)

        class QueuedDiscards(HostMemory):
            discard = staticmethod(queue.submit)
            claim = staticmethod(queue.claim)

        model = VirtioMemDevice(region_size_bytes=device_bytes, block_size_bytes=block_bytes,
                                host_memory=QueuedDiscards(), page_size_bytes=backend.page_size_bytes)
    except BaseException:
        backend.close()
        raise
    return backend, queue, model


def _plug_behind(model, nb_blocks: int, stride: int) -> None:
    """Every ``stride``-th block plugged behind the model's back (262144
    PLUG requests would take longer than what is measured); it is told its
    plugged count."""
    for i in range(0, nb_blocks, stride):
        model.bitmap.set_range(i, 1)
    model._plugged_blocks = model.bitmap.count_plugged()


def bench_unplug_all(device_bytes: int, block_bytes: int = 2 * MIB, *, reps: int = 3, stride: int = 2) -> dict:
    """The server's own path for UNPLUG_ALL and system reset: the answer
    (``VirtioMemDevice.unplug_all()`` queueing every plugged run on a
    ``DiscardQueue``) and then the worker's loop that gives the memory back
    (``DiscardQueue.drain_now``, one fallocate per run: what the worker
    thread runs), against the C ``discard_runs`` over the same bitmap:
    every ``stride``-th block plugged, untouched (the loops' own cost)."""
    nb_blocks = device_bytes // block_bytes
    backend, queue, model = _queued_device(device_bytes, block_bytes)
    times: dict[str, list[float]] = {"unplug_all": [], "give_back": [], "c": []}
    try:
        for _ in range(reps):
            _plug_behind(model, nb_blocks, stride)
            started = time.perf_counter()
            model.unplug_all()
            times["unplug_all"].append(time.perf_counter() - started)
            if model.plugged_size:
                raise AssertionError(f"unplug_all left {model.plugged_size} bytes plugged")
            started = time.perf_counter()
            queue.drain_now()
            times["give_back"].append(time.perf_counter() - started)
            if queue.pending_bytes or queue.failures_total:
                raise AssertionError(f"the discard queue kept {queue.pending_bytes} bytes")
            bitmap = alternating_bitmap(nb_blocks, stride)
            started = time.perf_counter()
            discard_runs(backend.fd, bitmap, block_bytes)
            times["c"].append(time.perf_counter() - started)
    finally:
        backend.close()
    return {"device_bytes": device_bytes, "block_bytes": block_bytes, "ranges": (nb_blocks + stride - 1) // stride,
            "times": times}


# -- scrubbing (vmem/_scrub.py, docs/scrub.md) ---------------------------------------

def _scrub_pass(fd: int, device_bytes: int, bitmap: BlockBitmap, block_bytes: int
                ) -> tuple[dict[str, float], list[tuple[int, int]], int]:
    """One scrub pass as the server's ``Scrubber`` runs it: the scan
    (``allocated_extents`` over the whole device; a worker thread in the
    server) and the intersection with the unplugged blocks
    (``unplugged_parts``; the trio thread).  Wall and CPU time (this
    thread's, ``time.thread_time``) of each part; the parts found; the
    extents seen."""
    from vfiouser_vmem.vmem._scrub import allocated_extents, unplugged_parts

    wall0, cpu0 = time.perf_counter(), time.thread_time()
    extents = allocated_extents(fd, 0, device_bytes)
    wall1, cpu1 = time.perf_counter(), time.thread_time()
    parts = unplugged_parts(extents, bitmap, block_bytes)
    wall2, cpu2 = time.perf_counter(), time.thread_time()
    return ({"scan_wall": wall1 - wall0, "scan_cpu": cpu1 - cpu0, "parts_wall": wall2 - wall1,
             "parts_cpu": cpu2 - cpu1, "wall": wall2 - wall0, "cpu": cpu2 - cpu0}, parts, len(extents))


def _write_pages(fd: int, offsets: list[int]) -> None:
    """One byte written at each offset: one page of the memfd allocated there."""
    for offset in offsets:
        os.pwrite(fd, b"\x01", offset)


def bench_scrub_pass(device_bytes: int, block_bytes: int = 2 * MIB, *, extents: int = 0, stride: int = 0,
                     reps: int = 5) -> dict:
    """One scrub pass over a ``device_bytes`` memfd with ``extents``
    single pages written, evenly spread (``extents=0``: an idle device,
    nothing allocated), every ``stride``-th block plugged (0: none).  The
    pages are written once; each repetition scans the same backend."""
    nb_blocks = device_bytes // block_bytes
    bitmap = alternating_bitmap(nb_blocks, stride) if stride else BlockBitmap(nb_blocks)
    page = os.sysconf("SC_PAGE_SIZE")
    spacing = (device_bytes // extents) // page * page if extents else 0
    fd = os.memfd_create("vfiouser-vmem-bench", os.MFD_CLOEXEC)
    times: dict[str, list[float]] = {}
    try:
        os.ftruncate(fd, device_bytes)
        _write_pages(fd, [i * spacing for i in range(extents)])
        seen = found = 0
        for _ in range(reps):
            t, parts, seen = _scrub_pass(fd, device_bytes, bitmap, block_bytes)
            found = sum(n for _, n in parts)
            for k, v in t.items():
                times.setdefault(k, []).append(v)
    finally:
        os.close(fd)
    return {"device_bytes": device_bytes, "block_bytes": block_bytes, "extents": seen, "spacing_bytes": spacing,
            "plugged_blocks": bitmap.count_plugged(), "found_bytes": found, "times": times}


def bench_reset(device_bytes: int, block_bytes: int = 2 * MIB, *, stride: int = 2, touch_pages: int = 16,
                reps: int = 3) -> dict:
    """What a DEVICE_RESET of a fragmented device costs until the backend
    is empty: ``VirtioMemDevice.system_reset()`` (the trio thread's cost:
    it queues the whole device as one range, docs/scrub.md), the discard
    worker giving it back (``DiscardQueue.drain_now``), then one scrub pass
    (the reset's ``scrubber.request()``: the server waits for the discards
    first) and the discard of what it found.  Every ``stride``-th block
    plugged; ``touch_pages`` pages written, half in plugged blocks, half in
    unplugged ones (the guest's writes the bitmap does not know of).
    "before" is the reset without the scrub pass, "after" with it."""
    nb_blocks = device_bytes // block_bytes
    page = os.sysconf("SC_PAGE_SIZE")
    step = max(1, nb_blocks // max(1, touch_pages))
    touched = [((i * step) + (i % 2)) % nb_blocks * block_bytes + page for i in range(touch_pages)]
    backend, queue, model = _queued_device(device_bytes, block_bytes)
    times: dict[str, list[float]] = {"system_reset": [], "discards": [], "scrub": [], "scrub_cpu": [],
                                     "before": [], "after": []}
    found: list[int] = []
    try:
        for _ in range(reps):
            _plug_behind(model, nb_blocks, stride)
            _write_pages(backend.fd, touched)
            started = time.perf_counter()
            model.system_reset()
            reset_s = time.perf_counter() - started
            started = time.perf_counter()
            queue.drain_now()
            discards_s = time.perf_counter() - started
            if model.plugged_size or queue.pending_bytes or queue.failures_total:
                raise AssertionError(f"reset left {model.plugged_size} bytes plugged, {queue.pending_bytes} queued")
            started = time.perf_counter()
            t, parts, _ = _scrub_pass(backend.fd, device_bytes, model.bitmap, block_bytes)
            for offset, length in parts:
                queue.submit(offset, length)
            queue.drain_now()
            scrub_s = time.perf_counter() - started
            if allocated_bytes(backend.fd) != 0:
                raise AssertionError(f"the backend kept {allocated_bytes(backend.fd)} bytes after the scrub")
            found.append(sum(n for _, n in parts))
            for k, v in (("system_reset", reset_s), ("discards", discards_s), ("scrub", scrub_s),
                         ("scrub_cpu", t["cpu"]), ("before", reset_s + discards_s),
                         ("after", reset_s + discards_s + scrub_s)):
                times[k].append(v)
    finally:
        backend.close()
    return {"device_bytes": device_bytes, "block_bytes": block_bytes, "ranges": (nb_blocks + stride - 1) // stride,
            "touch_pages": touch_pages, "found_bytes": found, "times": times}


def bench_scrub(device_bytes: int = TIB, busy_bytes: int = 64 * GIB, *, extents: int = 10_000, reps: int = 5,
                reset_reps: int = 3) -> dict:
    """The "Scrubbing and resets" rows: a pass over an idle ``device_bytes``
    device, over a ``busy_bytes`` one with ``extents`` pages written and
    every other block plugged, and the reset of a fragmented
    ``device_bytes`` device before/after the reset's scrub pass."""
    return {"passes": [bench_scrub_pass(device_bytes, reps=reps),
                       bench_scrub_pass(busy_bytes, extents=extents, stride=2, reps=reps)],
            "reset": bench_reset(device_bytes, reps=reset_reps)}


def scrub_tables(out: dict) -> str:
    """Markdown tables of ``bench_scrub``'s result."""
    from bench import report
    from vfiouser_vmem.util.sizes import format_size

    def s(values: list[float]) -> str:
        return report.fmt_summary(report.Summary.of(values), "s")

    rows = []
    for p in out.get("passes", []):
        t = p["times"]
        what = (f"{format_size(p['device_bytes'])} device, idle (nothing allocated)" if not p["extents"] else
                f"{format_size(p['device_bytes'])} device, {p['extents']} extents (a page every "
                f"{format_size(p['spacing_bytes'])}), {p['plugged_blocks']} of "
                f"{p['device_bytes'] // p['block_bytes']} blocks plugged (every other)")
        rows.append([what, s(t["wall"]), s(t["cpu"]), s(t["scan_wall"]), s(t["parts_wall"]),
                     report.fmt_bytes(p["found_bytes"])])
    parts = ["Scrub pass (allocated_extents over the device + unplugged_parts; CPU = the thread's)\n\n"
             + report.markdown_table(["device", "pass wall", "pass CPU", "scan (wall)", "unplugged_parts (wall)",
                                      "found in unplugged blocks"], rows)]
    r = out.get("reset")
    if r:
        t = r["times"]
        before = report.Summary.of(t["before"])
        after = report.Summary.of(t["after"])
        label = f"{format_size(r['device_bytes'])} device, {r['ranges']} runs plugged, {r['touch_pages']} pages touched"
        rows = [[label + ": system_reset() (trio thread)", s(t["system_reset"])],
                [label + ": + the discard worker (before: the backend empty of plugged memory)", s(t["before"])],
                [label + ": + one scrub pass and its discards (after)", s(t["after"])],
                ["the scrub pass alone (wall; CPU " + s(t["scrub_cpu"]) + ")", s(t["scrub"])],
                ["after / before", report.fmt_ratio(report.ratio(after.median, before.median))
                 if before and after else "-"]]
        parts.append("Reset until the backend is empty\n\n" + report.markdown_table(["reset", "time"], rows))
    return "\n\n".join(parts)


def _time_op(fn: Callable[[], object], *, min_total_s: float = 0.05, max_calls: int = 10_000) -> float:
    """Seconds per call of ``fn``: the best of 3 batches sized to take ~min_total_s."""
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= min_total_s or calls >= max_calls:
            break
        calls = min(max_calls, calls * max(2, int(min_total_s / max(elapsed, 1e-9))))
    best = elapsed / calls
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def bench_bitmap(nb_blocks: int = 524288, request_blocks: int = 64, *, min_total_s: float = 0.05) -> dict[str, float]:
    """Seconds per call of the bitmap operations on ``nb_blocks`` blocks
    (524288 = 1 TiB in 2 MiB blocks).  "request" rows are the size of one
    Linux request (64 blocks = one 128 MiB memory block) in the middle."""
    full = BlockBitmap(nb_blocks)
    full.set_range(0, nb_blocks)
    empty = BlockBitmap(nb_blocks)
    alt = alternating_bitmap(nb_blocks)
    mid = max(0, nb_blocks // 2 - request_blocks // 2)
    req = min(request_blocks, nb_blocks)

    def set_clear_request() -> None:
        empty.set_range(mid, req)
        empty.clear_range(mid, req)

    def set_clear_all() -> None:
        empty.set_range(0, nb_blocks)
        empty.clear_range(0, nb_blocks)

    ops: dict[str, Callable[[], object]] = {
        "set_range + clear_range, one request": set_clear_request,
        "range_state, one request": lambda: full.range_state(mid, req),
        "set_range + clear_range, whole device": set_clear_all,
        "range_state, whole device (all plugged)": lambda: full.range_state(0, nb_blocks),
        "count_plugged, whole device": full.count_plugged,
        "runs(), whole device plugged (1 run)": lambda: list(full.runs()),
        "runs(), every other block plugged": lambda: list(alt.runs()),
    }
    out = {name: _time_op(fn, min_total_s=min_total_s) for name, fn in ops.items()}
    out["_alternating_runs"] = sum(1 for _ in alt.runs())
    return out


# -- the server's start-up ------------------------------------------------------

def bench_startup(*, size: str = "1T", devices: int = 1, device_size: str = "8G", reps: int = 3) -> dict:
    """Spawn -> "ready" line and QMP connected, and VmRSS then, of one
    ``size`` device or of ``devices`` devices of ``device_size`` in one
    process (``--object``/``--device``), started as the integration tests
    start it (``harness.VmemServer``, ``harness.ServerProcess``)."""
    results: list[dict] = []
    for _ in range(reps):
        tmp = short_tmpdir()
        server = None
        try:
            started = time.monotonic()
            if devices == 1:
                server = VmemServer(tmp, size=size)
            else:
                argv: list[str] = []
                for i in range(devices):
                    argv += ["--object", f"memory-backend-memfd,id=mem{i},size={device_size}",
                             "--device", f"id=vm{i},memdev=mem{i},socket={tmp / f'vm{i}.sock'}"]
                server = ServerProcess(tmp, "many", argv)
            ready_s = time.monotonic() - started
            results.append({"ready_s": ready_s, "rss": proc_rss(server.proc.pid)})
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    return {"size": size if devices == 1 else device_size, "devices": devices, "how": "cli",
            "ready_s": [r["ready_s"] for r in results], "rss": [r["rss"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    """``bench/micro.py scrub``: the "Scrubbing and resets" rows alone."""
    import argparse

    p = argparse.ArgumentParser(description="Microbenchmarks without a guest (bench/README.md)")
    p.add_argument("rows", choices=["scrub"], help="which rows: scrub = scrub passes and resets")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each scrub pass (default 5)")
    p.add_argument("--reset-reps", type=int, default=3, help="repetitions of the reset (default 3)")
    args = p.parse_args(argv)
    print(scrub_tables(bench_scrub(reps=args.reps, reset_reps=args.reset_reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
