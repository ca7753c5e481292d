"""Host-side views of a process: its memfds' allocated bytes and its RSS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# One implementation for the tests and the bench.
from harness import memfd_allocated_bytes  # noqa: E402,F401


def proc_rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of ``pid`` in bytes (0 when gone)."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = int(rest.split()[0]) * 1024
    return out


def add_rss(*rss: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rss:
        for k, v in r.items():
            total[k] = total.get(k, 0) + v
    return total


def _stat_ticks(path: str) -> int:
    # After "pid (comm)": utime is field 14 and stime 15 (1-based).
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` (all its threads) so far, 0 when gone.

    utime + stime come in clock ticks (10 ms here), too coarse for a 50 ms
    grow.  Each live thread's time on the CPU comes from its schedstat, in
    nanoseconds; only threads that have already ended are counted in ticks
    (the process total less its live threads' ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        total_ticks = _stat_ticks(f"/proc/{pid}/stat")
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    live_ns = live_ticks = 0
    for tid in tasks:
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            ticks = _stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile: it is in the total's ticks
        live_ns += ns
        live_ticks += ticks
    return live_ns / 1e9 + max(0, total_ticks - live_ticks) / tick
