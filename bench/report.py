"""Pure parts of the benchmark report: statistics, histograms, markdown tables.

No timing, no processes: everything here is checked by tests/test_bench.py.
"""

from __future__ import annotations

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


def service_time_rows(records: Sequence[Sequence]) -> list[list[str]]:
    """Per request type and path (and all): count, p50, p99, max of the
    service times.

    ``records`` are [time, request type, response code, seconds(, path)]:
    path "c" or "python" (bench/served.py), none in older files."""
    groups: dict[str, list[float]] = {}
    names = list(REQUEST_TYPES.values())
    for r in records:
        rtype = REQUEST_TYPES.get(int(r[1]), str(int(r[1])))
        key = f"{rtype} ({r[4]})" if len(r) > 4 else rtype
        groups.setdefault(key, []).append(r[3])

    def order(key: str) -> tuple[int, str]:
        base = key.split(" ", 1)[0]
        return (names.index(base) if base in names else len(names), key)

    rows = []
    every = [s for v in groups.values() for s in v]
    for name, vals in [*((k, groups[k]) for k in sorted(groups, key=order)), *([("all", every)] if every else [])]:
        rows.append([name, str(len(vals)), fmt_seconds(percentile(vals, 50)), fmt_seconds(percentile(vals, 99)),
                     fmt_seconds(max(vals))])
    return rows


def service_time_table(records: Sequence[Sequence[float]]) -> str:
    return markdown_table(["request", "count", "p50", "p99", "max"], service_time_rows(records))


def histogram_table(records: Sequence[Sequence[float]]) -> str:
    counts = histogram(r[3] * 1e6 for r in records)
    return markdown_table(["service time", "requests"],
                          [[bucket_label(i), str(c)] for i, c in enumerate(counts)])
