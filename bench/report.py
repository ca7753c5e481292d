"""Pure parts of the benchmark report: statistics, histograms, markdown tables.

No timing, no processes: everything here is checked by tests/test_bench.py.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Bucket upper edges of the service-time histogram, in microseconds.
HIST_EDGES_US: tuple[float, ...] = (5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
                                    100_000, math.inf)

REQUEST_TYPES = {0: "PLUG", 1: "UNPLUG", 2: "UNPLUG_ALL", 3: "STATE"}
RESPONSE_CODES = {0: "ACK", 1: "NACK", 2: "BUSY", 3: "ERROR"}


@dataclass(frozen=True)
class Summary:
    """Median, min, max of N repetitions."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary | None:
        vals = sorted(v for v in values if v is not None)
        if not vals:
            return None
        return cls(percentile(vals, 50), vals[0], vals[-1], len(vals))


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between ranks
    (numpy's default); ``values`` need not be sorted."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    vals = sorted(values)
    rank = (len(vals) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (rank - lo)


def histogram(values_us: Iterable[float], edges: Sequence[float] = HIST_EDGES_US) -> list[int]:
    """Counts per bucket: bucket i holds edges[i-1] < v <= edges[i] (bucket 0: v <= edges[0])."""
    counts = [0] * len(edges)
    for v in values_us:
        for i, edge in enumerate(edges):
            if v <= edge:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    return counts


def bucket_label(i: int, edges: Sequence[float] = HIST_EDGES_US) -> str:
    def us(x: float) -> str:
        if math.isinf(x):
            return "inf"
        return f"{x / 1000:g} ms" if x >= 1000 else f"{x:g} us"

    if i == 0:
        return f"<= {us(edges[0])}"
    if math.isinf(edges[i]):
        return f"> {us(edges[i - 1])}"
    return f"{us(edges[i - 1])} - {us(edges[i])}"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, None when either is missing or theirs is 0."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e9:.0f} ns"


def fmt_bytes(b: float) -> str:
    if abs(b) >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    if abs(b) >= 1 << 20:
        return f"{b / (1 << 20):.0f} MiB"
    if abs(b) >= 1 << 10:
        return f"{b / (1 << 10):.0f} KiB"
    return f"{b:.0f} B"


def fmt_percent(x: float) -> str:
    return f"{x * 100:.1f} %"


FORMATTERS = {"s": fmt_seconds, "bytes": fmt_bytes, "fraction": fmt_percent, "count": lambda x: f"{x:.0f}"}


def fmt_summary(s: Summary | None, unit: str) -> str:
    if s is None:
        return "-"
    f = FORMATTERS[unit]
    if s.n == 1 or s.min == s.max:
        return f(s.median)
    return f"{f(s.median)} ({f(s.min)} - {f(s.max)})"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


@dataclass
class Row:
    """One line of the comparison table."""

    what: str
    unit: str  # a key of FORMATTERS
    qemu: Summary | None
    ours: Summary | None

    @property
    def ratio(self) -> float | None:
        return ratio(self.ours.median if self.ours else None, self.qemu.median if self.qemu else None)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right."""
    widths = [len(h) for h in headers]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row {r!r} has {len(r)} cells, the table {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def comparison_table(rows: Sequence[Row]) -> str:
    """The main table: QEMU's device, ours, ratio ours / QEMU's (medians)."""
    return markdown_table(
        ["measure (median, min - max)", "QEMU virtio-mem-pci", "vfiouser-vmem", "ours / QEMU"],
        [[r.what, fmt_summary(r.qemu, r.unit), fmt_summary(r.ours, r.unit), fmt_ratio(r.ratio)] for r in rows],
    )


def service_time_rows(records: Sequence[Sequence[float]]) -> list[list[str]]:
    """Per request type (and all): count, p50, p99, max of the service times.

    ``records`` are [time, request type, response code, seconds]."""
    by_type: dict[str, list[float]] = {}
    for _, rtype, _, secs in records:
        by_type.setdefault(REQUEST_TYPES.get(int(rtype), str(int(rtype))), []).append(secs)
    rows = []
    order = [*(t for t in REQUEST_TYPES.values() if t in by_type), *(t for t in by_type if t not in REQUEST_TYPES.values())]
    groups = [(t, by_type[t]) for t in order] + ([("all", [s for v in by_type.values() for s in v])] if by_type else [])
    for name, vals in groups:
        rows.append([name, str(len(vals)), fmt_seconds(percentile(vals, 50)), fmt_seconds(percentile(vals, 99)),
                     fmt_seconds(max(vals))])
    return rows


def service_time_table(records: Sequence[Sequence[float]]) -> str:
    return markdown_table(["request", "count", "p50", "p99", "max"], service_time_rows(records))


def histogram_table(records: Sequence[Sequence[float]]) -> str:
    counts = histogram(r[3] * 1e6 for r in records)
    return markdown_table(["service time", "requests"],
                          [[bucket_label(i), str(c)] for i, c in enumerate(counts)])


def preemption_note(records: Sequence[Sequence[float]], queue_runs: Sequence[Sequence[float]],
                    slow_s: float = 100e-6) -> str:
    """How many requests took longer than ``slow_s``, and in how many of
    those the server thread was off the CPU for over half of the
    ``process_queue`` call that served them (preempted, not working).

    ``records`` are [time, type, code, seconds] (the observer runs inside
    process_queue); ``queue_runs`` [end time, requests, wall, CPU]."""
    slow = [r for r in records if r[3] > slow_s]
    if not slow or not queue_runs:
        return ""
    runs = sorted(queue_runs)
    ends = [run[0] for run in runs]
    preempted = 0
    for r in slow:
        i = bisect.bisect_left(ends, r[0])
        if i < len(runs) and runs[i][0] - runs[i][2] <= r[0]:
            _, _, wall, cpu = runs[i]
            if wall - cpu > wall / 2:
                preempted += 1
    return (f"{len(slow)} of {len(records)} requests took longer than {fmt_seconds(slow_s)}; in {preempted} of them "
            f"the server thread was off the CPU for more than half of the process_queue call that served them "
            f"(preempted: wall time against the thread's CPU time).")


def model_time_table(records: Sequence[Sequence[float]]) -> str:
    """Per request type: p50/p99 of wall and thread-CPU time.

    ``records`` are [time, request type, wall seconds, CPU seconds]."""
    by_type: dict[str, list[tuple[float, float]]] = {}
    for _, rtype, wall, cpu in records:
        by_type.setdefault(REQUEST_TYPES.get(int(rtype), str(int(rtype))), []).append((wall, cpu))
    rows = []
    for name, vals in by_type.items():
        walls = [w for w, _ in vals]
        cpus = [c for _, c in vals]
        rows.append([name, str(len(vals)), fmt_seconds(percentile(walls, 50)), fmt_seconds(percentile(walls, 99)),
                     fmt_seconds(percentile(cpus, 50)), fmt_seconds(percentile(cpus, 99))])
    return markdown_table(["request", "count", "wall p50", "wall p99", "CPU p50", "CPU p99"], rows)
