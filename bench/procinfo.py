"""Host-side views of a process: its memfds' allocated bytes and its RSS."""

from __future__ import annotations

import os
import sys
import time
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


def _process_cpu_clock(pid: int) -> int:
    # Linux's CPU-time clock of another process (clock_getcpuclockid(3)):
    # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) in include/linux/posix-timers.h.
    return ((~pid) << 3) | 2


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` so far, all its threads, ended ones included; 0
    when it is gone.

    From the process's CPU-time clock, in nanoseconds: utime + stime come in
    clock ticks (10 ms here), too coarse for a 50 ms grow.  Ticks only where
    the clock cannot be read."""
    try:
        return time.clock_gettime(_process_cpu_clock(pid))
    except OSError:
        pass
    try:
        return _stat_ticks(f"/proc/{pid}/stat") / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0
