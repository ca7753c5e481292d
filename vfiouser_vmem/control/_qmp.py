"""The QMP control plane: QEMU's Machine Protocol on a UNIX socket, on trio.

Speaks the same JSON as QEMU (docs/interop/qmp-spec.rst) for the things this
device does, so that QEMU's own tools (``qemu.qmp``'s ``QMPClient``,
``qmp-shell``) drive it unchanged (docs/design.md, "The interface contract").

Session
    On connect the server sends a greeting ``{"QMP": {"version": {"qemu":
    {"major": 11, "minor": 1, "micro": 0}, "package": "vfiouser-vmem X.Y.Z"},
    "capabilities": []}}``.  The QEMU version numbers are the QEMU release
    whose QMP this mimics; our own version is in ``package``.  The session
    starts in capabilities negotiation mode, where only ``qmp_capabilities``
    is accepted (anything else gets class ``CommandNotFound``, desc
    "Expecting capabilities negotiation with 'qmp_capabilities'", as QEMU
    says); after it, command mode.  No capability is offered (no ``oob``).

Commands (command mode)
    ``qmp_capabilities`` (refused once negotiated, as QEMU does),
    ``query-version``, ``query-commands``, ``query-status`` (always
    ``{"status": "running", "running": true}``), ``qom-get``, ``qom-set``,
    ``qom-list``, ``query-memory-devices``, ``query-memory-size-summary``
    (``base-memory`` is 0: this process owns no boot memory).  There is no
    ``quit``: the server stops on SIGTERM/SIGINT.

    A device is named, in ``path``, by its id (``vmem0``), by QEMU's
    ``/machine/peripheral/<id>``, or by its ``qom_path`` (the path its
    MEMORY_DEVICE_SIZE_CHANGE events carry).  Devices are looked up when each
    command runs, so devices added to the mapping later are found.

Framing
    Input is a JSON *stream*: objects may follow each other with or without
    whitespace, and one may arrive split over many reads; the server splits
    the stream on JSON structure, never on lines.  Every message the server
    sends is one line of JSON ending with ``"\\n"``.  A reply carries the
    ``id`` member of the command it answers whenever the command had one
    (any JSON value).  Numbers out of a double's range (``1e999``, which
    Python reads as inf) are refused where they are read, like ``NaN``
    ("JSON parse error, number 1e999 is out of range"): no reply could carry
    them back.  Lone surrogates (``"\\ud800"``) are taken and sent back as
    escapes (replies are ASCII).  A request whose ``id`` cannot be encoded
    after all is refused before its command runs ("QMP input member 'id'
    cannot be sent back in a reply: ...", without the id): nothing a client
    sends can make the encoding of a reply fail.

Errors
    Every error is ``{"error": {"class": ..., "desc": ...}}`` (plus ``id``)
    and leaves the connection usable.  The texts are QEMU's where QEMU has
    one: "JSON parse error, ...", "QMP input must be a JSON object", "QMP
    input lacks member 'execute'", "QMP input member 'execute' must be a
    string", "QMP input member 'x' is unexpected", "The command x has not
    been found" (class ``CommandNotFound``), "Parameter 'x' is missing",
    "Parameter 'x' is unexpected", "Invalid parameter type for 'x',
    expected: string", "Device 'x' not found" (class ``DeviceNotFound``).
    Errors the device raises map to ``GenericError`` with the exception's
    message as desc: ``control.PropertyNotFound`` (default text "Property
    '<id>.<prop>' not found"), ``control.PropertyReadOnly`` (default
    "Property '<id>.<prop>' is not writable"), ``ValueError``, ``TypeError``.
    The server's devices (server.ControlledVmem) give QEMU's own texts,
    which name the QOM type: "Property 'virtio-mem-pci.<prop>' not found" /
    "... is not writable" (qom/object.c), "Parameter '<prop>' expects
    uint64" (out of a uint64's range, qobject-input-visitor.c) and
    "Parameter '<prop>' expects uint32_t" (qapi-visit-core.c).
    Any other exception from a device is a bug: it is logged with its
    traceback and answered with a GenericError "Internal error: ...".
    Consecutive parse errors in one read are one reply: the first error's
    text, then "(and N more JSON parse errors after it)".

Limits
    A single input message may be at most ``max_message_bytes`` (default 1
    MiB) and nest at most 1024 levels.  When a message grows past the size
    limit the server answers at once with the error "JSON message size limit
    exceeded (1048576 bytes)", drops what it buffered and discards the rest
    of that message as it arrives (it keeps following the JSON structure, so
    it resynchronises on the next message); the connection stays open.
    Memory per client is therefore bounded by the limit plus one read.

    Each client has a bounded queue of outgoing messages
    (``max_queued_messages``, default 256, and ``DEFAULT_MAX_QUEUED_BYTES``,
    4 MiB, besides the message that passes it).  Replies wait for room (the
    client that does not read its replies only stalls itself: the server
    stops reading it); an event that finds a client's queue full disconnects
    that client, with a WARNING log line, so that a stuck client never
    delays anyone else.

    At most ``max_clients`` connections (default 64, ``serve
    --qmp-max-clients N``, TOML ``qmp-max-clients``).  A new client is still
    greeted at once: to make room the server disconnects the client idle
    the longest (no input for the longest time), one still in capabilities
    negotiation first, with a WARNING naming it.

    Input is consumed in time linear in its size whatever it holds: the
    splitter never deletes from the front of its buffer per message, makes
    progress on every byte, and lets other clients run between the messages
    of a read.  Refused inputs and commands are logged at most 10 times per
    client per 10 s; the rest are counted, and the count is logged.  Text
    from clients (command names, paths, quoted input) is escaped and cut in
    log lines (logtext.printable); the replies keep it.

Events
    ``MEMORY_DEVICE_SIZE_CHANGE`` ``{"id", "size", "qom-path"}`` with a
    ``{"seconds", "microseconds"}`` timestamp (the time of the change), sent
    to every client in command mode.  The server subscribes to each device's
    ``add_size_listener`` when ``serve`` starts, and to devices given to
    :meth:`QmpServer.add_device` later.  A listener call may come from the
    trio thread running ``serve`` or from any other thread (it is then handed
    to the trio thread with ``TrioToken.run_sync_soon``); it never blocks.
    Changes reported while ``serve`` is not running are dropped (there is no
    client to tell).  ``add_device`` itself must be called from the trio
    thread.

    Rate limiting follows QEMU's monitor (monitor/monitor.c): at most one
    event per ``event_interval_s`` (default 1 s) per device.  The first event
    goes out at once and opens a window; changes inside the window are
    coalesced, and when the window ends the latest of them is sent (opening
    a new window).  The final size is therefore always delivered, at most
    one interval late.  QEMU keys the limiter on ``qom-path``; we key it on
    the device id, which is the same thing here since ids are unique.
    ``event_interval_s=0`` disables the limiter.

Socket
    ``serve(path)`` creates the socket with mode 0600.  If ``path`` exists it
    refuses to start with ``sockets.SocketPathInUse`` (a ``FileExistsError``)
    unless it is a stale socket nobody listens on, which it removes (the one
    policy of the vfio-user sockets too: vfiouser_vmem/sockets.py).  On exit
    (cancellation included) it removes the socket file, if that is still the
    one it created.

Logging goes to the ``vfiouser_vmem.qmp`` logger: INFO for each refused
command (what and why; rate-limited per client), WARNING for clients
disconnected for not reading or to make room for a new client.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import socket as _stdlib_socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from vfiouser_vmem import __version__
from vfiouser_vmem.control._protocol import ControlledDevice
from vfiouser_vmem.errors import PropertyNotFound, PropertyReadOnly
from vfiouser_vmem.util.logtext import printable
from vfiouser_vmem.util.sockets import SocketPathInUse, claim_socket_path, remove_socket_if_same

__all__ = [
    "QEMU_VERSION",
    "QmpServer",
]

log = logging.getLogger("vfiouser_vmem.qmp")

#: The QEMU release whose QMP we mimic, reported in the greeting and
#: ``query-version`` (tools gate features on it).
QEMU_VERSION = (11, 1, 0)

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 1024
DEFAULT_MAX_QUEUED_MESSAGES = 256
#: What may wait for one client in bytes (besides the message that passes
#: it): replies can quote a request of up to max_message_bytes.
DEFAULT_MAX_QUEUED_BYTES = 4 << 20
DEFAULT_MAX_CLIENTS = 64
#: After a client closed its sending side, how long we keep trying to deliver
#: replies still queued for it.
_DRAIN_TIMEOUT_S = 5.0
_READ_SIZE = 65536
#: Refused inputs and commands are logged at most _LOG_BURST times per client
#: per _LOG_WINDOW_S; the others are counted, and the count is logged when a
#: later line may go out or the client leaves: one client sending bad
#: requests cannot flood the log.
_LOG_BURST = 10
_LOG_WINDOW_S = 10.0
_SIZE_CHANGE_EVENT = "MEMORY_DEVICE_SIZE_CHANGE"
_PERIPHERAL = "/machine/peripheral/"


class _QmpError(Exception):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# ---------------------------------------------------------------------------
# Incremental JSON stream splitting


class _Oversize:
    """Marker the splitter yields for a message it had to discard."""

    def __init__(self, desc: str) -> None:
        self.desc = desc


class _ParseError:
    """Input that is not JSON; ``more`` counts the errors right after it in
    the same read, coalesced into this one (one reply, one log line): a
    stream of garbage costs a reply per read, not one per byte."""

    __slots__ = ("first", "more")

    def __init__(self, desc: str) -> None:
        self.first = desc
        self.more = 0

    @property
    def desc(self) -> str:
        if not self.more:
            return self.first
        return f"{self.first} (and {self.more} more JSON parse error{'s' if self.more > 1 else ''} after it)"


def _add_item(out: list[Any], item: Any) -> None:
    """Append a splitter result, coalescing a parse error into the one before it."""
    if type(item) is _ParseError and out and type(out[-1]) is _ParseError:
        out[-1].more += 1 + item.more
    else:
        out.append(item)


# JSON's whitespace is these four bytes only (RFC 8259), in all three: with
# ``\s`` (which adds \x0b and \x0c) a token ended on the byte that began it.
_STRUCT_RE = re.compile(rb'[{}\[\]"]')
_STRING_RE = re.compile(rb'["\\]')
_TOKEN_END_RE = re.compile(rb'[ \t\r\n{}\[\]",:]')
_NON_WS_RE = re.compile(rb"[^ \t\r\n]")
#: A run of stray characters (and whitespace) at top level: one match, one error.
_STRAY_RUN_RE = re.compile(rb"[}\],: \t\r\n]*")
#: What a bare token must look like to be JSON (a number, true, false, null);
#: anything else is an error, without asking the decoder (see _complete).
_SCALAR_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")

_IDLE, _STRUCT, _TOKEN = 0, 1, 2


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # name the first key seen twice
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key '{key}'")
            seen.add(key)
    return result


def _finite_float(text: str) -> float:
    # Python reads 1e999 as inf, which JSON cannot carry back (the encoder
    # refuses it): refuse it here, like NaN, so that no request holds a value
    # whose reply (an echoed id, a desc quoting it) cannot be encoded.
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(f"number {shown} is out of range")
    return value


#: What ``json.loads(text, object_pairs_hook=..., parse_constant=...,
#: parse_float=...)`` would build at every call, built once.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_finite_float)
#: Its scanner: ``(value, end)`` of the JSON value at an index, as ``raw_decode``
#: (which raises JSONDecodeError where this raises StopIteration).
#: JSONDecoder.__init__ sets it, but typeshed does not declare it: hence the ignore.
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_NON_WS_TEXT_RE = re.compile(r"[^ \t\r\n]")


def _parse_message(segment: bytes | bytearray, bare_token: bool) -> Any:
    """Parse one complete JSON text; returns the value or a _ParseError."""
    try:
        text = segment.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _ParseError(f"JSON parse error, invalid UTF-8 sequence at byte {exc.start}")
    try:
        if text.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        if bare_token:
            shown = text if len(text) <= 40 else text[:40] + "..."
            return _ParseError(f"JSON parse error, invalid keyword '{shown}'")
        msg = exc.msg[:1].lower() + exc.msg[1:]
        return _ParseError(f"JSON parse error, {msg} at line {exc.lineno} column {exc.colno}")
    except (ValueError, RecursionError) as exc:
        return _ParseError(f"JSON parse error, {exc}")


class _JsonStreamSplitter:
    """Split a byte stream into JSON texts by following their structure.

    Like QEMU's json-streamer: brace/bracket nesting and strings are tracked
    so that a message is complete when its outermost value closes, whatever
    whitespace (or none) surrounds it.  Each complete text is then parsed
    with the ``json`` module.  ``feed`` returns parsed values, _ParseError or
    _Oversize items, in stream order.

    A read usually holds whole, valid, ASCII objects (one command each).
    When a read starts at a message boundary, ``feed`` first lets the
    ``json`` module's scanner parse the objects at its head and say where
    each ends (what ``raw_decode`` does): for valid JSON that is where the
    structure closes, so the values are those the structural path would
    give, at a fraction of the cost.  The first message that is anything
    else (incomplete, invalid, non-ASCII, not an object, over a limit) and
    everything after it in that read take the structural path, which
    reports it.
    """

    #: Off: every message takes the structural path (the tests compare the two).
    _fast_path = True

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        #: Unconsumed input: the current message (or what is left of it while
        #: skipping) starts at offset 0 between feeds.
        self._buf = bytearray()
        self._scan = 0
        self._mode = _IDLE
        self._depth = 0
        self._in_string = False
        self._skipping = False

    def _reset(self) -> None:
        self._mode = _IDLE
        self._depth = 0
        self._in_string = False

    def _oversize(self) -> _Oversize:
        return _Oversize(f"JSON message size limit exceeded ({self.max_bytes} bytes)")

    def _complete(self, start: int, end: int, out: list[Any]) -> None:
        """The message in ``_buf[start:end]`` is complete."""
        bare = self._mode == _TOKEN
        self._reset()
        if self._skipping:
            self._skipping = False
            return
        if end - start > self.max_bytes:
            out.append(self._oversize())
            return
        if bare and out and type(out[-1]) is _ParseError and not _SCALAR_RE.fullmatch(self._buf, start, end):
            out[-1].more += 1  # coalesced: its text is never shown, do not build it
            return
        _add_item(out, _parse_message(self._buf[start:end], bare))

    def _parse_whole_objects(self, data: bytes, out: list[Any]) -> int:
        """The fast path, at a message boundary with nothing buffered: parse
        the complete objects at the head of ``data``; stop at the first thing
        that is not one, or that the structural path would treat differently
        (over a limit).  Returns how many bytes were consumed."""
        try:
            text = data.decode("ascii")  # so that character offsets are byte offsets
        except UnicodeDecodeError:
            return 0
        pos, end = 0, len(text)
        while pos < end:
            if text[pos] != "{":
                m = _NON_WS_TEXT_RE.search(text, pos)
                if m is None:
                    return end
                pos = m.start()
                if text[pos] != "{":
                    return pos
            try:
                value, stop = _SCAN_ONCE(text, pos)
            except (StopIteration, ValueError, RecursionError):  # incomplete, or an error to report
                return pos
            length = stop - pos
            # Deeper than MAX_NESTING takes more than 2 * MAX_NESTING brackets.
            if length > self.max_bytes or (
                length > 2 * MAX_NESTING and text.count("{", pos, stop) + text.count("[", pos, stop) > MAX_NESTING
            ):
                return pos
            out.append(value)
            pos = stop
        return pos

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        buf = self._buf
        if self._fast_path and self._mode == _IDLE and not buf and not self._skipping:
            consumed = self._parse_whole_objects(data, out)
            if consumed == len(data):
                return out
            if consumed:
                data = data[consumed:]
        buf += data
        # Input is consumed by moving ``start`` (where the current message
        # begins) and ``self._scan`` (how far it has been followed), never by
        # deleting from the front of the buffer per message: that made a read
        # of many small bad messages quadratic.  The buffer is compacted once,
        # at the end.  Every turn of the loop moves one of them forward.
        start = 0
        while True:
            if self._mode == _IDLE:
                m = _NON_WS_RE.search(buf, start)
                if m is None:
                    start = len(buf)
                    break
                start = m.start()
                c = buf[start]
                if c == 0x7B or c == 0x5B:  # { [
                    self._mode, self._depth, self._scan = _STRUCT, 1, start + 1
                elif c == 0x22:  # "
                    self._mode, self._depth, self._scan = _STRUCT, 0, start + 1
                    self._in_string = True
                elif c in b"}],:":
                    stray = _STRAY_RUN_RE.match(buf, start)
                    assert stray is not None  # the pattern matches the empty string too
                    end = stray.end()
                    error = _ParseError(f"JSON parse error, stray '{chr(c)}'")
                    error.more = len(buf[start:end].translate(None, b" \t\r\n")) - 1
                    _add_item(out, error)
                    start = end
                    continue
                else:  # a bare token: at least this byte, whatever it is
                    self._mode, self._scan = _TOKEN, start + 1
            if self._in_string:
                m = _STRING_RE.search(buf, self._scan)
                if m is None:
                    self._scan = len(buf)
                    break
                if m.group() == b"\\":
                    if m.end() >= len(buf):  # the escaped character has not arrived
                        self._scan = m.start()
                        break
                    self._scan = m.end() + 1
                    continue
                self._in_string = False
                self._scan = m.end()
                if self._depth == 0:
                    self._complete(start, self._scan, out)
                    start = self._scan
                continue
            if self._mode == _STRUCT:
                m = _STRUCT_RE.search(buf, self._scan)
                if m is None:
                    self._scan = len(buf)
                    break
                self._scan = m.end()
                token = m.group()
                if token == b'"':
                    self._in_string = True
                elif token in (b"{", b"["):
                    self._depth += 1
                    if self._depth > MAX_NESTING and not self._skipping:
                        _add_item(out, _ParseError("JSON nesting depth limit exceeded"))
                        self._skipping = True
                        start = self._scan  # drop what is buffered of it
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._complete(start, self._scan, out)
                        start = self._scan
                continue
            # _TOKEN: a bare scalar at top level, ends at a delimiter.
            m = _TOKEN_END_RE.search(buf, self._scan)
            if m is None:
                self._scan = len(buf)
                break
            self._complete(start, m.start(), out)
            start = m.start()
        # Out of data, possibly in the middle of a message.
        if self._mode != _IDLE:
            if self._skipping:
                start = self._scan
            elif len(buf) - start > self.max_bytes:
                out.append(self._oversize())
                # Drop what is buffered of the message; keep following its
                # structure so that its remainder is discarded as it arrives.
                self._skipping = True
                start = self._scan
        del buf[:start]
        self._scan -= start
        return out


# ---------------------------------------------------------------------------
# Argument checking, with QEMU's error texts


@dataclass(frozen=True)
class _Arg:
    name: str
    kind: str  # "str", "any" or "capabilities"
    required: bool = True


_COMMAND_ARGS: dict[str, tuple[_Arg, ...]] = {
    "qmp_capabilities": (_Arg("enable", "capabilities", required=False),),
    "query-version": (),
    "query-commands": (),
    "query-status": (),
    "qom-get": (_Arg("path", "str"), _Arg("property", "str")),
    "qom-set": (_Arg("path", "str"), _Arg("property", "str"), _Arg("value", "any")),
    "qom-list": (_Arg("path", "str"),),
    "query-memory-devices": (),
    "query-memory-size-summary": (),
}

#: The capabilities QEMU knows (QMPCapability); we offer none of them.
_KNOWN_CAPABILITIES = ("oob",)


def _check_arguments(command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Validate like QEMU's generated marshallers: members in schema order
    (missing, then wrong type), then members nobody asked for."""
    checked: dict[str, Any] = {}
    for arg in _COMMAND_ARGS[command]:
        name = arg.name
        if name not in arguments:
            if arg.required:
                raise _QmpError(f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        kind = arg.kind
        if kind == "str":
            if not isinstance(value, str):
                raise _QmpError(f"Invalid parameter type for '{name}', expected: string")
        elif kind == "capabilities":
            if not isinstance(value, list):
                raise _QmpError(f"Invalid parameter type for '{name}', expected: array")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise _QmpError(f"Invalid parameter type for '{name}[{i}]', expected: string")
                if item not in _KNOWN_CAPABILITIES:
                    raise _QmpError(f"Parameter '{name}[{i}]' does not accept value '{item}'")
        checked[name] = value
    if len(checked) != len(arguments):  # checked holds only members of arguments
        for name in arguments:
            if name not in checked:
                raise _QmpError(f"Parameter '{name}' is unexpected")
    return checked


# ---------------------------------------------------------------------------
# Server


class _Client:
    """One connection: its socket and its bounded queue of outgoing messages.

    The socket is driven with trio's low-level waits (``wait_readable``,
    ``wait_writable``) and non-blocking ``recv``/``send``, not through a
    ``trio.SocketStream``: a command then costs one wake-up, one ``recv``,
    one ``send`` and the re-arming of the wait, where the stream's
    ``receive_some``/``send_all`` and a memory channel to a writer task add
    a failed ``recv``, scheduler rounds and a task switch per command.

    A message is written at once when nothing is queued before it; what the
    socket does not take waits in ``out`` (at most ``max_queued`` messages
    and ``max_queued_bytes`` bytes besides the one being written) for the
    writer task.
    """

    __slots__ = ("_log_count", "_log_dropped", "_log_window_end", "_room_lot", "_writer_lot", "cancel_scope",
                 "closed", "command_mode", "last_input", "max_queued", "max_queued_bytes", "number", "out",
                 "queued_bytes", "sock")

    def __init__(self, number: int, sock: _stdlib_socket.socket, max_queued: int,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        self.number = number
        self.sock = sock
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.cancel_scope = trio.CancelScope()
        self.command_mode = False
        #: When input last came (trio time; the server sets it at accept):
        #: who is idle the longest.
        self.last_input = 0.0
        #: Messages not yet (entirely) written, oldest first, and their size.
        self.out: deque[bytes | memoryview] = deque()
        self.queued_bytes = 0
        #: No more messages are taken (the session is ending, or the socket broke).
        self.closed = False
        self._writer_lot = trio.lowlevel.ParkingLot()  # the writer waits for messages
        self._room_lot = trio.lowlevel.ParkingLot()  # replies wait for room
        self._log_window_end = 0.0
        self._log_count = 0
        self._log_dropped = 0

    def may_log(self) -> bool:
        """Whether a refused input or command of this client may be logged
        now (_LOG_BURST per _LOG_WINDOW_S); if not, it is counted."""
        now = time.monotonic()
        if now >= self._log_window_end:
            self.log_dropped()
            self._log_window_end = now + _LOG_WINDOW_S
            self._log_count = 0
        if self._log_count < _LOG_BURST:
            self._log_count += 1
            return True
        self._log_dropped += 1
        return False

    def log_dropped(self) -> None:
        """Log how many lines may_log held back, if any."""
        if self._log_dropped:
            log.info("QMP client %d: %d more refused inputs or commands were not logged", self.number,
                     self._log_dropped)
            self._log_dropped = 0

    def queue_nowait(self, data: bytes) -> bool:
        """Write or queue without waiting; False when the queue is full."""
        if self.closed:
            return True
        out = self.out
        if out:
            if len(out) > self.max_queued or self.queued_bytes > self.max_queued_bytes:
                return False
            out.append(data)
            self.queued_bytes += len(data)
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.broken()
            return True
        if sent < len(data):
            out.append(memoryview(data)[sent:])
            self.queued_bytes += len(data) - sent
            self._writer_lot.unpark()
        return True

    async def send(self, data: bytes) -> None:
        """Write or queue, waiting for room in the queue."""
        while not self.queue_nowait(data):
            await self._room_lot.park()

    def close_queue(self) -> None:
        """Take no more messages; the writer ends once the queue is written."""
        self.closed = True
        self._writer_lot.unpark_all()

    def broken(self) -> None:
        """The socket failed: drop what is queued, end the session."""
        self.closed = True
        self.out.clear()
        self.queued_bytes = 0
        self.cancel_scope.cancel()
        self._writer_lot.unpark_all()
        self._room_lot.unpark_all()

    async def write_queued(self) -> None:
        """The writer task: write what ``queue_nowait`` could not."""
        sock, out = self.sock, self.out
        while True:
            if not out:
                if self.closed:
                    return
                await self._writer_lot.park()
                continue
            await trio.lowlevel.wait_writable(sock)
            while out:
                head = out[0]
                try:
                    sent = sock.send(head)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self.broken()
                    return
                self.queued_bytes -= sent
                if sent < len(head):
                    out[0] = memoryview(head)[sent:]
                    break
                out.popleft()
            self._room_lot.unpark_all()


@dataclass
class _Throttle:
    """One device's rate-limit window (QEMU's MonitorQAPIEventState)."""

    deadline: float
    pending: dict[str, Any] | None = None


#: ``json.dumps(message, allow_nan=False)`` builds this encoder at every call.
_ENCODER = json.JSONEncoder(allow_nan=False)
_EMPTY_RETURN = b'{"return": {}}\n'


def _encode(message: Mapping[str, Any], id_json: str | None = None) -> bytes:
    """One line of JSON; ``id_json``: the encoded ``id`` to add as the last
    member (what encoding the message with it would write)."""
    text = _ENCODER.encode(message)
    if id_json is not None:
        text = f'{text[:-1]}, "id": {id_json}}}'
    return (text + "\n").encode("utf-8")


def _encode_return(result: Any) -> bytes:
    """``_encode({"return": result})``; the common results without the encoder."""
    kind = type(result)
    if kind is int:  # qom-get of a size: json.dumps writes an int as int.__repr__
        return b'{"return": %d}\n' % result
    if kind is dict and not result:
        return _EMPTY_RETURN
    return _encode({"return": result})


def _timestamp() -> dict[str, int]:
    now_us = time.time_ns() // 1000
    return {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}


class QmpServer:
    """QMP server for a set of devices; run it with :meth:`serve`.

    ``devices`` maps device id to device; it is read at every command, so the
    caller may add devices to it later (call :meth:`add_device` so that their
    size changes become events).
    """

    def __init__(
        self,
        devices: Mapping[str, ControlledDevice],
        *,
        version: str = __version__,
        event_interval_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        if event_interval_s < 0:
            raise ValueError("event_interval_s must be >= 0")
        if max_message_bytes < 1 or max_queued_messages < 1 or max_clients < 1:
            raise ValueError("max_message_bytes, max_queued_messages and max_clients must be >= 1")
        self._devices = devices
        self._extra_devices: dict[str, ControlledDevice] = {}
        self.version = version
        self.event_interval_s = event_interval_s
        self.max_message_bytes = max_message_bytes
        self.max_queued_messages = max_queued_messages
        self.max_clients = max_clients

        self._serving = False
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._unsubscribe: dict[str, Callable[[], None]] = {}
        self._throttles: dict[str, _Throttle] = {}
        self._clients: set[_Client] = set()  # clients in command mode
        self._connections: set[_Client] = set()  # every client, at most max_clients
        self._next_client = 1
        #: Command name -> handler(client, checked arguments); the keys are _COMMAND_ARGS's.
        self._handlers: dict[str, Callable[[_Client, dict[str, Any]], Any]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-status": self._query_status,
            "qom-get": self._qom_get,
            "qom-set": self._qom_set,
            "qom-list": self._qom_list,
            "query-memory-devices": self._query_memory_devices,
            "query-memory-size-summary": self._query_memory_size_summary,
        }
        assert self._handlers.keys() == _COMMAND_ARGS.keys()

    # -- devices ------------------------------------------------------------

    def _iter_devices(self) -> Iterator[ControlledDevice]:
        yield from self._devices.values()
        for dev_id, device in list(self._extra_devices.items()):
            if dev_id not in self._devices:
                yield device

    def _find_by_id(self, dev_id: str) -> ControlledDevice | None:
        device = self._devices.get(dev_id)
        return device if device is not None else self._extra_devices.get(dev_id)

    def _resolve(self, path: str) -> ControlledDevice:
        # The first device that path names, by id, /machine/peripheral/<id> or qom_path.
        peripheral = path[len(_PERIPHERAL):] if path.startswith(_PERIPHERAL) else None
        for device in self._iter_devices():
            dev_id = device.id
            if path == dev_id or peripheral == dev_id or path == device.qom_path:
                return device
        raise _QmpError(f"Device '{path}' not found", "DeviceNotFound")

    def add_device(self, device: ControlledDevice) -> None:
        """Make ``device`` known (if the mapping lacks it) and turn its size
        changes into events, now if serving or else when ``serve`` starts."""
        known = self._find_by_id(device.id)
        if known is not None and known is not device:
            raise ValueError(f"Duplicate ID '{device.id}' for device")
        if known is None:
            self._extra_devices[device.id] = device
        if self._serving:
            self._subscribe(device)

    def _subscribe(self, device: ControlledDevice) -> None:
        if device.id in self._unsubscribe:
            return

        def listener(size: int) -> None:
            self._size_changed_from_any_thread(device, size)

        self._unsubscribe[device.id] = device.add_size_listener(listener)

    def _unsubscribe_all(self) -> None:
        for dev_id, remove in list(self._unsubscribe.items()):
            try:
                remove()
            except Exception:
                log.exception("removing the size listener of device %s failed", dev_id)
        self._unsubscribe.clear()

    # -- events ------------------------------------------------------------

    def _size_changed_from_any_thread(self, device: ControlledDevice, size: int) -> None:
        if not self._serving or self._trio_token is None:
            return
        if threading.get_ident() == self._trio_thread:
            # The transport calls size listeners after the guest has its
            # interrupt (VirtioMemDevice.defer_size_events): send now.
            self._size_changed(device, size, _timestamp())
            return
        try:
            self._trio_token.run_sync_soon(self._size_changed, device, size, _timestamp())
        except trio.RunFinishedError:
            pass

    def _size_changed(self, device: ControlledDevice, size: int, timestamp: dict[str, int]) -> None:
        if not self._serving or self._nursery is None:
            return
        event = {
            "event": _SIZE_CHANGE_EVENT,
            "data": {"id": device.id, "size": size, "qom-path": device.qom_path},
            "timestamp": timestamp,
        }
        if self.event_interval_s <= 0:
            self._broadcast(event)
            return
        throttle = self._throttles.get(device.id)
        if throttle is not None:
            throttle.pending = event  # coalesce: only the latest survives
            return
        self._broadcast(event)
        throttle = _Throttle(deadline=trio.current_time() + self.event_interval_s)
        self._throttles[device.id] = throttle
        self._nursery.start_soon(self._throttle_window, device.id, throttle)

    async def _throttle_window(self, dev_id: str, throttle: _Throttle) -> None:
        """End of a rate-limit window: send the pending event and open a new
        window, or close the window when nothing is pending."""
        try:
            while True:
                await trio.sleep_until(throttle.deadline)
                if throttle.pending is None:
                    return
                event, throttle.pending = throttle.pending, None
                self._broadcast(event)
                throttle.deadline = trio.current_time() + self.event_interval_s
        finally:
            if self._throttles.get(dev_id) is throttle:
                del self._throttles[dev_id]

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        data = _encode(message)
        for client in list(self._clients):
            if not client.queue_nowait(data):
                log.warning(
                    "QMP client %d is not reading (%d messages queued): disconnecting it",
                    client.number,
                    self.max_queued_messages,
                )
                self._clients.discard(client)
                client.cancel_scope.cancel()

    # -- serving -------------------------------------------------------------

    async def serve(self, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the UNIX socket ``path`` and serve clients until
        cancelled; ``task_status.started()`` once connections are accepted."""
        if self._serving:
            raise RuntimeError("this QmpServer is already serving")
        path = os.fspath(path)
        claim_socket_path(path)
        sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
        identity: tuple[int, int] | None = None
        try:
            # On Linux, bind() gives the new inode the socket's own mode (less
            # the umask): no window where the socket file is world-accessible.
            os.fchmod(sock.fileno(), 0o600)
            try:
                await sock.bind(path)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SocketPathInUse(path, "another process is already listening on this socket") from exc
                # bind()'s errors do not name the path: say which socket failed.
                raise OSError(exc.errno, f"cannot listen on the QMP socket {path}: {exc.strerror or exc}") from None
            st = os.lstat(path)
            identity = (st.st_dev, st.st_ino)
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            if identity is not None:
                remove_socket_if_same(path, identity)
            raise

        listener = trio.SocketListener(sock)
        self._serving = True
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        log.info("QMP listening on %s", path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for device in list(self._iter_devices()):
                    self._subscribe(device)
                task_status.started()
                await trio.serve_listeners(self._handle_client, [listener], handler_nursery=nursery)
        finally:
            self._serving = False
            self._nursery = None
            self._unsubscribe_all()
            self._throttles.clear()
            self._clients.clear()
            self._connections.clear()
            sock.close()
            remove_socket_if_same(path, identity)
            log.info("QMP stopped listening on %s", path)

    async def _handle_client(self, stream: trio.SocketStream) -> None:
        # The connection's socket, out of its trio wrapper (see _Client).
        fd = stream.socket.detach()
        try:
            sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM, fileno=fd)
        except OSError:
            os.close(fd)
            log.exception("QMP: could not take a new connection")
            return
        client = _Client(self._next_client, sock, self.max_queued_messages)
        client.last_input = trio.current_time()
        self._next_client += 1
        log.debug("QMP client %d connected", client.number)
        if len(self._connections) >= self.max_clients:
            self._evict()
        self._connections.add(client)
        try:
            sock.setblocking(False)
            with client.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.write_queued)
                    client.queue_nowait(_encode(self._greeting()))
                    await self._read_loop(client)
                    # The client closed its side: no more events for it;
                    # give the replies still queued a chance to go out.
                    self._clients.discard(client)
                    client.close_queue()
                    nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_TIMEOUT_S
        except Exception:
            # A bug must not take the server down with it (serve_listeners
            # would propagate it): log it and drop this client only.
            log.exception("QMP client %d: internal error, closing the connection", client.number)
        finally:
            self._clients.discard(client)
            self._connections.discard(client)
            client.closed = True
            trio.lowlevel.notify_closing(sock)
            sock.close()
            client.log_dropped()
            log.debug("QMP client %d disconnected", client.number)

    def _evict(self) -> None:
        """Make room for a new client: close the one idle the longest,
        preferring one still negotiating capabilities (a connection that
        never became a session).  Its task ends at its next checkpoint; it
        no longer counts at once."""
        victim = min(self._connections, key=lambda c: (c.command_mode, c.last_input, c.number))
        log.warning(
            "QMP: %d clients connected, the limit (--qmp-max-clients): disconnecting client %d "
            "(%sidle %.1f s) to serve a new one",
            len(self._connections), victim.number,
            "" if victim.command_mode else "still negotiating capabilities, ",
            trio.current_time() - victim.last_input,
        )
        self._connections.discard(victim)
        self._clients.discard(victim)
        victim.broken()

    async def _read_loop(self, client: _Client) -> None:
        splitter = _JsonStreamSplitter(self.max_message_bytes)
        sock = client.sock
        fd = sock.fileno()
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(fd)
            try:
                data = sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not data:
                return
            client.last_input = trio.current_time()
            first = True
            for item in splitter.feed(data):
                if first:
                    first = False
                else:  # many commands in one read: let the devices run between them
                    await trio.lowlevel.checkpoint()
                if isinstance(item, (_ParseError, _Oversize)):
                    desc = item.desc
                    if client.may_log():
                        log.info("QMP client %d: refused input: %s", client.number, printable(desc))
                    reply = _encode({"error": {"class": "GenericError", "desc": desc}})
                else:
                    reply = self._dispatch(client, item)
                if not client.queue_nowait(reply):
                    await client.send(reply)

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self, client: _Client, request: Any) -> bytes:
        """Run one request; return its encoded reply (with the request's id)."""
        id_json = None
        if type(request) is dict and "id" in request:
            # Encoded first and once: every reply can then carry it (the
            # encoder is ASCII-only, so lone surrogates are escapes, and the
            # parser refused non-finite numbers); one it cannot encode after
            # all is refused before the command runs.
            try:
                id_json = _ENCODER.encode(request["id"])
            except (ValueError, TypeError, RecursionError) as exc:
                if client.may_log():
                    log.info("QMP client %d: refused %s: its id cannot be sent back: %s", client.number,
                             _describe_request(request), exc)
                return _encode({"error": {"class": "GenericError",
                                          "desc": f"QMP input member 'id' cannot be sent back in a reply: {exc}"}})
        try:
            name, arguments = self._check_request(request)
            if not client.command_mode and name != "qmp_capabilities":
                raise _QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            handler = self._handlers.get(name)
            if handler is None:
                raise _QmpError(f"The command {name} has not been found", "CommandNotFound")
            result = handler(client, _check_arguments(name, arguments))
            if id_json is not None:
                return _encode({"return": result}, id_json)
            return _encode_return(result)  # raises if a device returned something JSON cannot carry
        except _QmpError as exc:
            if client.may_log():
                log.info("QMP client %d: refused %s: %s", client.number, _describe_request(request),
                         printable(exc.desc))
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Exception as exc:
            if client.may_log():
                log.exception("QMP client %d: %s failed", client.number, _describe_request(request))
            reply = {"error": {"class": "GenericError", "desc": f"Internal error: {exc}"}}
        return _encode(reply, id_json)

    @staticmethod
    def _check_request(request: Any) -> tuple[str, dict[str, Any]]:
        """QEMU's qmp_dispatch_check_obj, in its order."""
        if not isinstance(request, dict):
            raise _QmpError("QMP input must be a JSON object")
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise _QmpError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise _QmpError("QMP input lacks member 'execute'")
        return request["execute"], request.get("arguments", {})

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._version_info(), "capabilities": []}}

    def _version_info(self) -> dict[str, Any]:
        major, minor, micro = QEMU_VERSION
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"vfiouser-vmem {self.version}",
        }

    def _qmp_capabilities(self, client: _Client, args: dict[str, Any]) -> Any:
        if client.command_mode:
            raise _QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        if args.get("enable"):
            raise _QmpError(f"Capability {', '.join(args['enable'])} not available")
        client.command_mode = True
        self._clients.add(client)
        return {}

    def _query_version(self, client: _Client, args: dict[str, Any]) -> Any:
        return self._version_info()

    def _query_commands(self, client: _Client, args: dict[str, Any]) -> Any:
        return [{"name": command} for command in _COMMAND_ARGS]

    def _query_status(self, client: _Client, args: dict[str, Any]) -> Any:
        return {"status": "running", "running": True}

    def _query_memory_devices(self, client: _Client, args: dict[str, Any]) -> Any:
        return [{"type": "virtio-mem", "data": device.memory_device_info()} for device in self._iter_devices()]

    def _query_memory_size_summary(self, client: _Client, args: dict[str, Any]) -> Any:
        plugged = sum(int(device.memory_device_info()["size"]) for device in self._iter_devices())
        return {"base-memory": 0, "plugged-memory": plugged}

    def _qom_list(self, client: _Client, args: dict[str, Any]) -> Any:
        return self._resolve(args["path"]).qom_list()

    def _qom_get(self, client: _Client, args: dict[str, Any]) -> Any:
        device = self._resolve(args["path"])
        prop = args["property"]
        try:
            return device.qom_get(prop)
        except (PropertyNotFound, PropertyReadOnly, ValueError, TypeError) as exc:
            raise _property_error(exc, device, prop) from exc

    def _qom_set(self, client: _Client, args: dict[str, Any]) -> Any:
        device = self._resolve(args["path"])
        prop = args["property"]
        try:
            device.qom_set(prop, args["value"])
        except (PropertyNotFound, PropertyReadOnly, ValueError, TypeError) as exc:
            raise _property_error(exc, device, prop) from exc
        return {}


def _property_error(exc: Exception, device: ControlledDevice, prop: str) -> _QmpError:
    """The QMP error for what a device's qom_get/qom_set raised."""
    if isinstance(exc, PropertyNotFound):
        return _QmpError(str(exc) or f"Property '{device.id}.{prop}' not found")
    if isinstance(exc, PropertyReadOnly):
        return _QmpError(str(exc) or f"Property '{device.id}.{prop}' is not writable")
    return _QmpError(str(exc) or f"Invalid value for property '{device.id}.{prop}'")


def _describe_request(request: Any) -> str:
    """How log lines name a request (the name escaped: it is client text)."""
    execute = request.get("execute") if isinstance(request, dict) else None
    return f"command '{printable(execute)}'" if isinstance(execute, str) else "a malformed request"
