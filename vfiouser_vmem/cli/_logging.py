"""Where ``serve``'s log lines go and how they look (docs/operating.md, "Logs").

Three formats, one line per record:

- ``text``: ``TIME LEVEL LOGGER: MESSAGE``, for a terminal or a file;
- ``journal``: ``<PRIORITY>LOGGER: MESSAGE``, without a time of our own.
  journald stamps each line itself, and reads a leading ``<N>`` as the
  line's syslog priority (sd-daemon(3)), so ``journalctl -p err`` finds the
  server's errors; every line of a multi-line record (a traceback) carries
  the prefix, since journald reads each line of a stream as an entry;
- ``json``: one object per line with ``time`` (RFC 3339, UTC), ``level``,
  ``logger``, ``device``, ``client``, ``message`` (and ``exception``), for
  log shippers.

``auto`` (the default) is ``journal`` when stderr is the stream journald
gave the service (``$JOURNAL_STREAM`` holds the device and inode of that
stream, systemd.exec(5): stderr redirected elsewhere by the unit or a shell
is not journald's), else ``text``.

Text that clients send is escaped where it is put into a message
(util.logtext.printable); a message is escaped again here only for what
the format itself would misread: a line break in the text and journal
formats (it would start a forged line), nothing in JSON (json.dumps
escapes it).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import TextIO

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JournalFormatter", "JsonFormatter", "TextFormatter", "configure_logging",
           "journald_stream", "resolve_format"]

LOG_FORMATS = ("auto", "text", "journal", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: syslog(3) priorities of the logging levels.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def _lines(text: str) -> list[str]:
    return text.splitlines() or [""]


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``; the lines after the first of a
    record (a traceback) are indented, so no line of it reads as a record
    of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return "\n    ".join(_lines(super().format(record)))


class JournalFormatter(logging.Formatter):
    """``<PRIORITY>LOGGER: MESSAGE``, the prefix on every line."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in _lines(super().format(record)))


class JsonFormatter(logging.Formatter):
    """One JSON object per record.  ``device``: the record's ``device``
    attribute (``extra=``), else the device id the message starts with
    (``"vmem0: ..."``, the convention of every device's lines) when it is
    one of ``device_ids``; ``client``: the record's ``client`` attribute
    (the device's vfio-user client number), else null."""

    def __init__(self, device_ids: Iterable[str] = ()) -> None:
        super().__init__()
        ids = sorted(set(device_ids), key=len, reverse=True)
        self._id_prefix = re.compile("(" + "|".join(map(re.escape, ids)) + "): ") if ids else None

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        device = getattr(record, "device", None)
        if device is None and self._id_prefix is not None and (m := self._id_prefix.match(message)):
            device = m.group(1)
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "device": device,
            "client": getattr(record, "client", None),
            "message": message,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def journald_stream(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the one journald connected (``$JOURNAL_STREAM``
    is ``DEVICE:INODE`` of it, systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def resolve_format(name: str, stream: TextIO, environ: dict[str, str] | None = None) -> str:
    """``auto`` made concrete for ``stream``."""
    if name != "auto":
        return name
    return "journal" if journald_stream(stream, environ) else "text"


def configure_logging(level: str, fmt: str = "auto", *, device_ids: Iterable[str] = (),
                      stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) at ``level`` in
    ``fmt``; replaces a handler this function installed before.  Returns
    the handler."""
    stream = sys.stderr if stream is None else stream
    concrete = resolve_format(fmt, stream)
    formatter: logging.Formatter
    if concrete == "json":
        formatter = JsonFormatter(device_ids)
    elif concrete == "journal":
        formatter = JournalFormatter()
    else:
        formatter = TextFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler._vfiouser_vmem = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_vfiouser_vmem", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
