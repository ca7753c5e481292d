"""Text from clients in log lines (and on a terminal): escaped and bounded.

A QMP command name, a device path, the input a JSON parse error quotes, a
metrics request, a QMP reply ``ctl`` prints: whatever a peer sends may hold
NUL, ANSI escape sequences (which a terminal or a log viewer obeys), a BOM,
lone surrogates, line breaks (a forged second log line) or megabytes.
:func:`printable` is the one place that makes such text safe to show; the
replies themselves keep the text (JSON escapes it).

A peer also chooses how many lines it causes: :class:`LogBudget` bounds the
lines of one source (a QMP client, a guest's refused requests) and counts
the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MAX_SHOWN_CHARS", "LogBudget", "printable"]

#: Longer text is cut to this many characters (or bytes), with a marker.
MAX_SHOWN_CHARS = 512


def printable(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as a log line may show it.

    Characters that are not printable (``str.isprintable``: control
    characters, line breaks, format characters such as the BOM, lone
    surrogates, unassigned code points) are escaped as ``repr`` escapes them,
    without its quotes, and so are backslashes once anything is; bytes (input
    that is not UTF-8) are shown as ``repr`` shows bytes, without the
    ``b''``.  Text longer than ``limit`` is cut there and ends with
    ``...[N more characters]`` (or bytes).
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        shown = _unquoted(repr(data[:limit])[1:])
        rest, unit = len(data) - limit, "bytes"
    else:
        text = str(text)
        head = text[:limit]  # cut first: the cost is bounded whatever the length
        shown = head if head.isprintable() else _unquoted(repr(head))
        rest, unit = len(text) - limit, "characters"
    if rest > 0:
        shown += f"...[{rest} more {unit}]"
    return shown


def _unquoted(quoted: str) -> str:
    """The inside of a ``repr`` string: with single quotes, repr escaped the
    single quotes inside; undo that (a backslash before them is doubled, so
    ``\\'`` is always that escape)."""
    body = quoted[1:-1]
    return body.replace("\\'", "'") if quoted[0] == "'" else body


class LogBudget:
    """At most ``burst`` log lines per ``window_s`` seconds for one source;
    the lines held back are counted, and ``report(count)`` is called with
    the count when the next window opens or at ``flush()``.  A peer that
    makes a line per input would otherwise write the log as fast as it
    sends, on the thread every device shares, and block it all once the
    log's reader falls behind."""

    __slots__ = ("_count", "_window_end", "burst", "dropped", "report", "window_s")

    def __init__(self, report: Callable[[int], None], *, burst: int = 10, window_s: float = 10.0) -> None:
        self.report = report
        self.burst = burst
        self.window_s = window_s
        self.dropped = 0
        self._count = 0
        self._window_end = 0.0

    def allow(self) -> bool:
        """Whether a line may go out now; if not, it is counted."""
        now = time.monotonic()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self.window_s
            self._count = 0
        if self._count < self.burst:
            self._count += 1
            return True
        self.dropped += 1
        return False

    def flush(self) -> None:
        """Report the lines held back, if any."""
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self.report(dropped)
