"""QMP framing: the JSON stream a client sends, split into messages and
parsed; the one-line JSON messages the server sends back.

Framing
    Input is a JSON *stream*: objects may follow each other with or without
    whitespace, and one may arrive split over many reads; the server splits
    the stream on JSON structure, never on lines.  Every message the server
    sends is one line of JSON ending with ``"\\n"``.  Numbers out of a
    double's range (``1e999``, which Python reads as inf) are refused where
    they are read, like ``NaN`` ("JSON parse error, number 1e999 is out of
    range"): no reply could carry them back.  Lone surrogates (``"\\ud800"``)
    are taken and sent back as escapes (replies are ASCII).

Parse errors
    "JSON parse error, ..." with the ``json`` module's text and the line and
    column in the message ("expecting value at line 1 column 13"), or
    "invalid keyword 'x'" (a bare word), "stray '}'", "duplicate key 'x'",
    "invalid UTF-8 sequence at byte N", "number X is out of range",
    "JSON nesting depth limit exceeded", "JSON message size limit exceeded
    (N bytes)".  Consecutive parse errors in one read are one reply: the
    first error's text, then "(and N more JSON parse errors after it)".

Limits
    A single input message may be at most ``max_message_bytes`` (default 1
    MiB) and nest at most 1024 levels.  When a message grows past the size
    limit the server answers at once with the error "JSON message size limit
    exceeded (1048576 bytes)", drops what it buffered and discards the rest
    of that message as it arrives (it keeps following the JSON structure, so
    it resynchronises on the next message); the connection stays open.
    Memory per client is therefore bounded by the limit plus one read.

    Input is consumed in time linear in its size whatever it holds: the
    splitter never deletes from the front of its buffer per message, makes
    progress on every byte, and the server lets other clients run between
    the messages of a read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_NESTING",
    "JsonStreamSplitter",
    "Oversize",
    "ParseError",
    "encode",
    "encode_return",
    "encode_value",
]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 1024


class Oversize:
    """Marker the splitter yields for a message it had to discard."""

    def __init__(self, desc: str) -> None:
        self.desc = desc


class ParseError:
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
    if type(item) is ParseError and out and type(out[-1]) is ParseError:
        out[-1].more += 1 + item.more
    else:
        out.append(item)


# JSON's whitespace is these four bytes only (RFC 8259), in all of these:
# with ``\s`` (which adds \x0b and \x0c) a token ended on the byte that began it.
#: Inside a message, outside strings: everything up to the next bracket or
#: unterminated string, whole strings included.  One match per bracket, not
#: one per quote and escape, keeps the scan of a usual command to a few
#: matches.  A string that has not ended yet stops the match at its quote.
_SKIP_RE = re.compile(rb'(?:[^"{}\[\]]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
#: Inside a string: up to its closing quote, or to a backslash whose escaped
#: character has not arrived, or to the end.
_STRING_BODY_RE = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_TOKEN_END_RE = re.compile(rb'[ \t\r\n{}\[\]",:]')
_NON_WS_RE = re.compile(rb"[^ \t\r\n]")
#: A run of stray characters (and whitespace) at top level: one match, one error.
_STRAY_RUN_RE = re.compile(rb"[}\],: \t\r\n]*")
#: What a bare token must look like to be JSON (a number, true, false, null);
#: anything else is an error, without asking the decoder (see _complete).
_SCALAR_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")

_IDLE, _STRUCT, _TOKEN = 0, 1, 2
_QUOTE, _OPENERS = 0x22, (0x7B, 0x5B)  # '"', '{' and '['


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


def _bounded_int(text: str) -> int:
    # int() refuses more than 4300 digits (sys.get_int_max_str_digits) with
    # a text about the interpreter; such a number is far beyond a double,
    # refused as 1e999 is.
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"number {text[:40]}... is out of range") from None


#: What ``json.loads(text, object_pairs_hook=..., parse_constant=...,
#: parse_float=..., parse_int=...)`` would build at every call, built once.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_finite_float, parse_int=_bounded_int)


def _parse_message(segment: bytes | bytearray, bare_token: bool) -> Any:
    """Parse one complete JSON text (at most max_bytes: the splitter cut it
    out); returns the value or a ParseError."""
    try:
        text = segment.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParseError(f"JSON parse error, invalid UTF-8 sequence at byte {exc.start}")
    try:
        # The splitter cut the text at the end of its value and it starts
        # with no whitespace: raw_decode reads all of it, or it is not one
        # JSON value (what json.loads calls "Extra data").  A text starting
        # with a BOM is always a bare token, hence an invalid keyword: no
        # need for json.loads's own BOM check.
        value, end = _DECODER.raw_decode(text)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        return value
    except json.JSONDecodeError as exc:
        if bare_token:
            shown = text if len(text) <= 40 else text[:40] + "..."
            return ParseError(f"JSON parse error, invalid keyword '{shown}'")
        msg = exc.msg[:1].lower() + exc.msg[1:]
        return ParseError(f"JSON parse error, {msg} at line {exc.lineno} column {exc.colno}")
    except (ValueError, RecursionError) as exc:  # the hooks' refusals; nested deeper than the stack
        return ParseError(f"JSON parse error, {exc}")


class JsonStreamSplitter:
    """Split a byte stream into JSON texts by following their structure.

    Like QEMU's json-streamer: brace/bracket nesting and strings are tracked
    so that a message is complete when its outermost value closes, whatever
    whitespace (or none) surrounds it; the size and nesting limits are
    applied while it arrives.  Each complete text, at most ``max_bytes``
    long, is then parsed once by ``json.JSONDecoder.raw_decode`` (refusing
    duplicate keys, NaN/Infinity and numbers out of a double's range).
    ``feed`` returns parsed values, ParseError or Oversize items, in stream
    order.
    """

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

    def _oversize(self) -> Oversize:
        return Oversize(f"JSON message size limit exceeded ({self.max_bytes} bytes)")

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
        if bare and out and type(out[-1]) is ParseError and not _SCALAR_RE.fullmatch(self._buf, start, end):
            out[-1].more += 1  # coalesced: its text is never shown, do not build it
            return
        _add_item(out, _parse_message(self._buf[start:end], bare))

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        buf = self._buf
        buf += data
        # Input is consumed by moving ``start`` (where the current message
        # begins) and ``self._scan`` (how far it has been followed), never by
        # deleting from the front of the buffer per message: that made a read
        # of many small bad messages quadratic.  The buffer is compacted once,
        # at the end.  Every turn of the loop moves one of them forward.
        start = 0
        size = len(buf)
        while True:
            if self._mode == _IDLE:
                m = _NON_WS_RE.search(buf, start)
                if m is None:
                    start = size
                    break
                start = m.start()
                c = buf[start]
                if c in _OPENERS:
                    self._mode, self._depth, self._scan = _STRUCT, 1, start + 1
                elif c == _QUOTE:
                    self._mode, self._depth, self._scan = _STRUCT, 0, start + 1
                    self._in_string = True
                elif c in b"}],:":
                    stray = _STRAY_RUN_RE.match(buf, start)
                    assert stray is not None  # the pattern matches the empty string too
                    end = stray.end()
                    error = ParseError(f"JSON parse error, stray '{chr(c)}'")
                    error.more = len(buf[start:end].translate(None, b" \t\r\n")) - 1
                    _add_item(out, error)
                    start = end
                    continue
                else:  # a bare token: at least this byte, whatever it is
                    self._mode, self._scan = _TOKEN, start + 1
            if self._mode == _STRUCT:
                if self._in_string:
                    m = _STRING_BODY_RE.match(buf, self._scan)
                    assert m is not None  # matches the empty string too
                    pos = m.end()
                    if pos == size or buf[pos] != _QUOTE:
                        # Out of data, or a backslash whose escaped character
                        # has not arrived: resume there.
                        self._scan = pos
                        break
                    self._in_string = False
                    self._scan = pos + 1
                    if self._depth == 0:  # a string at top level
                        self._complete(start, self._scan, out)
                        start = self._scan
                    continue
                m = _SKIP_RE.match(buf, self._scan)
                assert m is not None
                pos = m.end()
                if pos == size:
                    self._scan = pos
                    break
                self._scan = pos + 1
                c = buf[pos]
                if c == _QUOTE:  # a string that has not ended in what arrived
                    self._in_string = True
                elif c in _OPENERS:
                    self._depth += 1
                    if self._depth > MAX_NESTING and not self._skipping:
                        _add_item(out, ParseError("JSON nesting depth limit exceeded"))
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
                self._scan = size
                break
            self._complete(start, m.start(), out)
            start = m.start()
        # Out of data, possibly in the middle of a message.
        if self._mode != _IDLE:
            if self._skipping:
                start = self._scan
            elif size - start > self.max_bytes:
                out.append(self._oversize())
                # Drop what is buffered of the message; keep following its
                # structure so that its remainder is discarded as it arrives.
                self._skipping = True
                start = self._scan
        del buf[:start]
        self._scan -= start
        return out


#: ``json.dumps(message, allow_nan=False)`` builds this encoder at every call;
#: it writes ASCII only, so lone surrogates go out as escapes.
_ENCODER = json.JSONEncoder(allow_nan=False)
_EMPTY_RETURN = b'{"return": {}}\n'


def encode_value(value: Any) -> str:
    """``value`` as JSON text; ValueError, TypeError or RecursionError if JSON
    cannot carry it."""
    return _ENCODER.encode(value)


def encode(message: Mapping[str, Any], id_json: str | None = None) -> bytes:
    """One line of JSON; ``id_json``: the encoded ``id`` to add as the last
    member (what encoding the message with it would write)."""
    text = _ENCODER.encode(message)
    if id_json is not None:
        text = f'{text[:-1]}, "id": {id_json}}}'
    return (text + "\n").encode("utf-8")


def encode_return(result: Any) -> bytes:
    """``encode({"return": result})``; the common results without the encoder."""
    kind = type(result)
    if kind is int:  # qom-get of a size: json.dumps writes an int as int.__repr__
        return b'{"return": %d}\n' % result
    if kind is dict and not result:
        return _EMPTY_RETURN
    return encode({"return": result})
