"""QEMU's trace output (the ``log`` backend with ``-msg timestamp=on``): the
arguments that turn it on and the parser, for bench/run.py and
bench/latency.py.  Timestamps are wall clock (CLOCK_REALTIME), seconds since
the epoch."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

#: ``-msg timestamp=on``: "2026-11-26T07:47:09.185203Z vfio_user_region_rw  region 0 offset 0x3000 count 2"
TRACE_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z (\w+)\s*(.*)$")
TRACE_FILE = re.compile(r"-(\d+)\.log$")


def parse_trace_line(line: str) -> tuple[float, str, str] | None:
    """(seconds since the epoch, event, arguments) of one trace line, or
    None for anything else (QEMU's other messages in the same log)."""
    m = TRACE_LINE.match(line)
    if not m:
        return None
    t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.UTC).timestamp()
    return t, m.group(2), m.group(3).strip()


def load_trace(files) -> list[tuple[float, int, str, str]]:
    """[(t, thread id, event, arguments)] of ``-d tid`` logs (``NAME-TID.log``),
    sorted by time."""
    out = []
    for f in files:
        m = TRACE_FILE.search(str(f))
        tid = int(m.group(1)) if m else 0
        with open(f, errors="replace") as fh:
            for line in fh:
                p = parse_trace_line(line)
                if p:
                    out.append((p[0], tid, p[1], p[2]))
    out.sort(key=lambda e: e[0])
    return out



def trace_args(events: list[str], tdir: Path, *, per_thread: bool = False) -> list[str]:
    """QEMU arguments that log ``events`` with timestamps into ``tdir``
    (``trace.log``, or ``trace-TID.log`` per thread with ``per_thread``)."""
    tdir.mkdir(parents=True, exist_ok=True)
    events_file = tdir / "trace-events"
    events_file.write_text("\n".join(events) + "\n")
    log = ["-d", "tid", "-D", str(tdir / "trace-%d.log")] if per_thread else ["-D", str(tdir / "trace.log")]
    return ["-msg", "timestamp=on", *log, "-trace", f"events={events_file}"]
