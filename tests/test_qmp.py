"""Tests of vfiouser_vmem.qmp: the QMP server (docs/design.md, "The interface contract").

Driven three ways: a raw socket client (framing, exact error texts), the real
``qemu.qmp`` library (asyncio, in a worker thread) and ``qmp-shell``.  The
server runs in the test's own trio loop, so ``wait_all_tasks_blocked`` tells
when it has consumed what a client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from fake_device import GiB, MiB, FakeDevice
from vfiouser_vmem import __version__
from vfiouser_vmem.errors import PropertyReadOnly
from vfiouser_vmem.control import QmpServer
from vfiouser_vmem.control._framing import JsonStreamSplitter, Oversize, ParseError
from vfiouser_vmem.util.sockets import SocketPathInUse

TIMEOUT = 10  # generous bound for things that should take milliseconds

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 11, "minor": 1, "micro": 0}, "package": f"vfiouser-vmem {__version__}"},
        "capabilities": [],
    }
}


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def sock_dir() -> Any:
    # UNIX socket paths are limited to 107 bytes: stay out of deep tmp_paths.
    path = tempfile.mkdtemp(dir="/tmp", prefix="qmpt")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running(server: QmpServer, path: str) -> AsyncIterator[QmpServer]:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, path)
        yield server
        nursery.cancel_scope.cancel()


class RawClient:
    """A QMP client on a bare socket that checks the server's framing."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str, *, negotiate: bool = True) -> "RawClient":
        client = cls(await trio.open_unix_socket(path))
        assert await client.recv() == GREETING
        if negotiate:
            assert await client.command("qmp_capabilities") == {"return": {}}
        return client

    async def send(self, data: bytes | str) -> None:
        await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def recv(self) -> dict[str, Any]:
        """Next message; every message must be exactly one line."""
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                assert data, f"server closed the connection; unterminated data: {self.buffer!r}"
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def reply(self) -> dict[str, Any]:
        """Next reply, setting aside events that come before it."""
        while True:
            message = await self.recv()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    async def event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        message = await self.recv()
        assert "event" in message, message
        return message

    async def command(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            request["arguments"] = arguments
        await self.send(json.dumps(request))  # no newline, like qemu.qmp
        return await self.reply()

    async def assert_nothing_pending(self) -> None:
        """The server has run to quiescence and sent us nothing more."""
        await trio.testing.wait_all_tasks_blocked()
        readable, _, _ = select.select([self.stream.socket.fileno()], [], [], 0)
        assert not readable and not self.buffer, f"unexpected data: {self.buffer!r}"

    async def read_to_eof(self) -> bytes:
        data = self.buffer
        with trio.fail_after(TIMEOUT):
            while chunk := await self.stream.receive_some(65536):
                data += chunk
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the code under test if it is still running after
    ``seconds`` (a generous bound), instead of hanging the test run: SIGALRM
    interrupts even a loop that never returns to trio."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error(desc: str, error_class: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}, **extra}


def size_event(device: FakeDevice, size: int) -> dict[str, Any]:
    return {"id": device.id, "size": size, "qom-path": device.qom_path}


# ---------------------------------------------------------------------------
# session and framing


async def test_greeting_and_capabilities_negotiation(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path, negotiate=False)
        for name in ("query-version", "qom-get", "no-such-command"):
            assert await client.command(name, id=name) == error(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", id=name
            )
        assert await client.command("qmp_capabilities", {"enable": ["oob"]}) == error("Capability oob not available")
        assert await client.command("qmp_capabilities", {"enable": ["foo"]}) == error(
            "Parameter 'enable[0]' does not accept value 'foo'"
        )
        assert await client.command("qmp_capabilities", {"enable": []}, id=1) == {"return": {}, "id": 1}
        assert await client.command("qmp_capabilities") == error(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )
        assert await client.command("query-version") == {"return": GREETING["QMP"]["version"]}
        await client.aclose()


async def test_version_parameter_goes_into_package(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}, version="9.8.7"), path):
        async with await trio.open_unix_socket(path) as stream:
            client = RawClient(stream)
            greeting = await client.recv()
            assert greeting["QMP"]["version"]["package"] == "vfiouser-vmem 9.8.7"


async def test_stream_without_newlines_two_commands_in_one_send(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice(size=4 * MiB)}), path):
        client = await RawClient.connect(path)
        await client.send(
            '{"execute":"query-status","id":"a"}{"execute": "qom-get", "id": {"n": [1, 2]},'
            ' "arguments": {"path": "vmem0", "property": "size"}}{"execute":"nope","id":3}'
        )
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": "a"}
        assert await client.reply() == {"return": 4 * MiB, "id": {"n": [1, 2]}}
        assert await client.reply() == error("The command nope has not been found", "CommandNotFound", id=3)
        await client.assert_nothing_pending()


async def test_command_split_across_sends(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        # Split inside a key, inside a string holding braces and an escaped
        # quote, and between a backslash and the character it escapes.
        request = b'{"execute": "qom-get", "id": "x}{\\"y\\\\", "arguments": {"path": "vmem0", "property": "node"}}'
        cut_points = [5, 24, 31, 32, len(request) - 1]
        start = 0
        for cut in cut_points:
            await client.send(request[start:cut])
            start = cut
            await client.assert_nothing_pending()  # the server consumed it and is waiting for more
        await client.send(request[start:])
        assert await client.reply() == {"return": 0, "id": 'x}{"y\\'}


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b'{"execute": }', "JSON parse error, expecting value at line 1 column 13"),
        (b'{"execute" "x"}', "JSON parse error, expecting ':' delimiter at line 1 column 12"),
        (b'{"execute": "query-status", "execute": "x"}', "JSON parse error, duplicate key 'execute'"),
        (b'{"execute": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b"foo ", "JSON parse error, invalid keyword 'foo'"),
        (b"}", "JSON parse error, stray '}'"),
        (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8 sequence at byte 13"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42 ", "QMP input must be a JSON object"),
        (b'"query-status"', "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-status", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "query-status", "foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"exec-oob": "query-status"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
async def test_bad_input_gets_an_error_and_the_connection_stays_usable(sock_dir: str, raw: bytes, desc: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        await client.send(raw + b'{"execute": "query-status", "id": 7}')
        assert await client.reply() == error(desc)
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": 7}
        await client.assert_nothing_pending()


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b'{"execute": "query-version", "id": 1e999}', "JSON parse error, number 1e999 is out of range"),
        (b'{"execute": "query-version", "id": -1E+400}', "JSON parse error, number -1E+400 is out of range"),
        (b'{"execute": "qom-set", "id": 1, "arguments": {"path": "vmem0", "property": "requested-size",'
         b' "value": 2.5e308}}', "JSON parse error, number 2.5e308 is out of range"),
        (b"1e999 ", "JSON parse error, number 1e999 is out of range"),
    ],
)
async def test_numbers_json_cannot_carry_back_are_refused_and_the_connection_stays(
    sock_dir: str, raw: bytes, desc: str
) -> None:
    """Python reads 1e999 as inf, which no JSON reply can carry: echoing it as
    the id made the encoding of the error reply raise, and the connection
    was closed.  It is refused where it is read, like NaN."""
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        await client.send(raw)
        assert await client.reply() == error(desc)
        assert await client.command("query-status", id=2) == {"return": {"status": "running", "running": True}, "id": 2}
        await client.assert_nothing_pending()


@pytest.mark.parametrize(
    "request_text",
    [
        '{"execute": "query-version", "id": "\\ud800"}',  # a lone surrogate: ensure_ascii writes it as an escape
        '{"execute": "query-version", "id": {"\\udfff": ["\\ud800\\u0000"]}}',
        '{"execute": "query-version", "id": ' + "9" * 4000 + "}",  # as long as int() reads
        '{"execute": "query-version", "id": ' + "9" * 5000 + "}",  # longer: a parse error
        '{"execute": "query-version", "id": [1, {"x": 1e999}]}',  # inf: once closed the connection
        '{"execute": "query-version", "id": 1e-999}',
        '{"execute": "query-version", "id": -0.0}',
        '{"execute": "\\ud800", "id": 1}',
        '{"execute": "query-version", "id": ' + "[" * 980 + "]" * 980 + "}",  # as deep as the parser goes
        '{"execute": "query-version", "id": ' + "[" * 1100 + "]" * 1100 + "}",
        '{"execute": "qom-get", "id": "\\ud800", "arguments": {"path": "\\udbff", "property": "x"}}',
    ],
)
async def test_no_id_or_text_can_make_a_reply_fail_to_encode(sock_dir: str, request_text: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        await client.send(request_text)
        reply = await client.reply()
        assert set(reply) <= {"return", "error", "id"}, reply
        if "id" in reply:
            assert reply["id"] == json.loads(request_text)["id"]
        assert await client.command("query-status", id=2) == {"return": {"status": "running", "running": True}, "id": 2}
        await client.assert_nothing_pending()


def test_an_id_that_cannot_be_encoded_is_refused_before_the_command_runs() -> None:
    """Defence in depth behind the parser: a request whose id no reply could
    carry (here built directly, a NaN) is refused, without its id, and its
    command does not run."""
    from vfiouser_vmem.control._connection import Client

    device = FakeDevice()
    server = QmpServer({"vmem0": device})
    a, b = socket.socketpair()
    try:
        client = Client(1, a, 8)
        client.command_mode = True
        for bad_id in (float("nan"), [float("inf")], {"k": object()}):
            reply = server._dispatch(client, {"execute": "qom-set", "id": bad_id, "arguments": {
                "path": "vmem0", "property": "requested-size", "value": 2 * MiB}})
            message = json.loads(reply)
            assert set(message) == {"error"}
            assert message["error"]["desc"].startswith("QMP input member 'id' cannot be sent back in a reply: ")
        assert device.values["requested-size"] == 0
    finally:
        a.close()
        b.close()


async def test_errors_carry_the_id_when_the_request_had_one(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}), path):
        client = await RawClient.connect(path)
        await client.send(b'{"execute": 5, "id": "i1"}{"id": null, "arguments": {}}')
        assert await client.reply() == error("QMP input member 'execute' must be a string", id="i1")
        assert await client.reply() == error("QMP input lacks member 'execute'", id=None)


async def test_oversize_message_is_refused_and_the_stream_resyncs(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}, max_message_bytes=4096), path):
        client = await RawClient.connect(path)
        # Arrives in pieces: the error goes out as soon as the limit is passed,
        # before the message is complete.
        await client.send(b'{"execute": "query-status", "arguments": {"pad": "' + b"{[" * 2500)
        assert await client.reply() == error("JSON message size limit exceeded (4096 bytes)")
        await client.send(b"]}" * 3000 + b'\\""}}{"execute": "query-status", "id": 1}')
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": 1}
        # A complete oversize message in a single send, then a good one.
        await client.send(b'{"x": "' + b"a" * 5000 + b'"}{"execute": "query-status", "id": 2}')
        assert await client.reply() == error("JSON message size limit exceeded (4096 bytes)")
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": 2}
        # A bare token that never ends is cut too.
        await client.send(b"1" * 5000)
        assert await client.reply() == error("JSON message size limit exceeded (4096 bytes)")
        await client.send(b' {"execute": "query-status", "id": 3}')
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": 3}
        await client.assert_nothing_pending()


@pytest.mark.parametrize("kind", ["random", "dense"])
async def test_garbage_on_one_connection_does_not_stop_the_others(
    sock_dir: str, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A megabyte of garbage on one connection (the structural path was
    quadratic, with a reply and a log line per bad token): another connection
    is answered promptly all along, and the garbage costs a bounded number of
    replies and log lines.  "dense" garbage is almost all errors (stray
    brackets, one-byte tokens), random bytes mostly long strings and tokens."""
    import random

    caplog.set_level(logging.INFO, logger="vfiouser_vmem.qmp")
    path = os.path.join(sock_dir, "q")
    rng = random.Random(1)
    if kind == "random":
        garbage = rng.randbytes(1 << 20)
    else:
        garbage = bytes(rng.choice(b"}],:x\x0b\x0c ") for _ in range(1 << 20))
    with no_hang(120):
        async with running(QmpServer({"vmem0": FakeDevice()}), path):
            flooder = await RawClient.connect(path)
            other = await RawClient.connect(path)
            sent = trio.Event()
            replies: list[bytes] = []

            async def flood() -> None:
                for i in range(0, len(garbage), 65536):
                    await flooder.send(garbage[i:i + 65536])
                sent.set()
                await flooder.stream.send_eof()

            async def read_flooder_replies() -> None:  # so that it never stalls on its own queue
                replies.extend((await flooder.read_to_eof()).split(b"\n")[:-1])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(read_flooder_replies)
                answered = 0
                while not sent.is_set() or answered == 0:
                    with trio.fail_after(TIMEOUT):  # answers at once, never stuck behind the garbage
                        reply = await other.command("query-version", id=answered)
                    assert reply == {"return": GREETING["QMP"]["version"], "id": answered}
                    answered += 1
    assert all(json.loads(line)["error"]["class"] == "GenericError" for line in replies)
    assert 0 < len(replies) <= 1024, len(replies)  # about one per read, not one per bad byte
    logged = [r for r in caplog.records if r.name == "vfiouser_vmem.qmp" and r.levelno == logging.INFO
              and "refused" in r.getMessage()]
    assert len(logged) <= 100, len(logged)


async def test_default_limit_is_one_mebibyte(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}), path):
        client = await RawClient.connect(path)
        padding = b"a" * (1 << 20)
        await client.send(b'{"execute": "query-status", "id": 1, "arguments": {"p": "' + padding + b'"}}')
        assert await client.reply() == error("JSON message size limit exceeded (1048576 bytes)")
        # Just under the limit is parsed (and refused for its argument only).
        small = b'{"execute": "query-status", "id": 2, "arguments": {"p": "'
        await client.send(small + b"a" * ((1 << 20) - len(small) - 3) + b'"}}')
        assert await client.reply() == error("Parameter 'p' is unexpected", id=2)


async def test_nesting_limit(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}), path):
        client = await RawClient.connect(path)
        await client.send(b"[" * 5000 + b"]" * 5000 + b'{"execute": "query-status", "id": 1}')
        assert await client.reply() == error("JSON nesting depth limit exceeded")
        assert await client.reply() == {"return": {"status": "running", "running": True}, "id": 1}


def test_splitter_byte_by_byte() -> None:
    stream = b' {"a": "}\\"{"}\n[1,{"b":[]}] "s\\\\" true{"c":1}x,'
    splitter = JsonStreamSplitter(max_bytes=100)
    items: list[Any] = []
    for i in range(len(stream)):
        items += splitter.feed(stream[i : i + 1])
    assert [item.desc if isinstance(item, ParseError) else item for item in items] == [
        {"a": '}"{'},
        [1, {"b": []}],
        "s\\",
        True,
        {"c": 1},
        # The ',' that ends the token x is itself an error, in the same read:
        # consecutive errors of a read are coalesced into one.
        "JSON parse error, invalid keyword 'x' (and 1 more JSON parse error after it)",
    ]


def test_splitter_memory_is_bounded_while_discarding() -> None:
    splitter = JsonStreamSplitter(max_bytes=1000)
    items = splitter.feed(b'{"k": "' + b"x" * 2000)
    assert len(items) == 1 and isinstance(items[0], Oversize)
    for _ in range(100):
        assert splitter.feed(b"y" * 10000) == []
        assert len(splitter._buf) <= 10000
    assert splitter.feed(b'"} {"ok": 1}') == [{"ok": 1}]


def _splitter_items(chunks: list[bytes], *, max_bytes: int) -> list[Any]:
    splitter = JsonStreamSplitter(max_bytes=max_bytes)
    items: list[Any] = []
    for chunk in chunks:
        items += splitter.feed(chunk)
    return [(type(item).__name__, item.desc) if isinstance(item, (ParseError, Oversize)) else item
            for item in items]


def _normalized(items: list[Any]) -> list[Any]:
    """Splitter items with the parse errors counted one by one: what must not
    depend on how the stream was cut into reads (errors are coalesced per
    read, so their texts do)."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, tuple) and item[0] == "ParseError":
            m = re.search(r"\(and (\d+) more JSON parse errors? after it\)$", item[1])
            out += ["parse error"] * (1 + (int(m.group(1)) if m else 0))
        elif isinstance(item, tuple):
            out.append("oversize")
        else:
            out.append(item)
    return out


def _random_chunks(rng: Any, stream: bytes, cut_counts: list[int]) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(rng.choice(cut_counts), len(stream) - 1)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


_ERR, _BIG = "parse error", "oversize"

#: Messages of every kind the splitter meets, each with what it must give
#: (written out, not computed with the json module): good commands, objects
#: the parser refuses (duplicates, constants, syntax, encoding, control
#: characters), non-objects, stray characters, too large, too deep.
_STREAM_PIECES: list[tuple[bytes, list[Any]]] = [
    (b'{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vmem0", "property": "size"}}',
     [{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vmem0", "property": "size"}}]),
    (b'{"execute":"query-status","id":"a"}', [{"execute": "query-status", "id": "a"}]),
    (b'{"a": "}\\"{\\\\", "b": [1, {"c": [], "d": null}], "e": -1.5e3, "f": true}',
     [{"a": '}"{\\', "b": [1, {"c": [], "d": None}], "e": -1500.0, "f": True}]),
    (b'{"dup": 1, "dup": 2}', [_ERR]),
    (b'{"x": [NaN]}', [_ERR]),
    (b'{"x": {"y": -Infinity}}', [_ERR]),
    (b'{"x": 1e999}', [_ERR]),
    (b'{"bad": }', [_ERR]),
    (b'{"a" 1}', [_ERR]),
    (b'{"a": [1}]', [_ERR]),
    (b'{"s": "caf\xc3\xa9"}', [{"s": "caf\u00e9"}]),
    (b'{"s": "\xff"}', [_ERR]),
    (b'{"u": "\\u00e9\\ud800"}', [{"u": "\u00e9\ud800"}]),
    (b'{"t": "tab\there"}', [_ERR]),
    (b'{"n": 123456789012345678901234567890}', [{"n": 123456789012345678901234567890}]),
    (b'{"big": "' + b"a" * 5000 + b'"}', [_BIG]),
    (b'{"deep": ' + b"[" * 1030 + b"]" * 1030 + b"}", [_ERR]),
    (b'{"deepish": ' + b"[" * 600 + b"]" * 600 + b"}", [{"deepish": _nested(599)}]),
    (b"[1, 2]", [[1, 2]]),
    (b'"str"', ["str"]),
    (b"true", [True]),
    (b"123", [123]),
    (b"-0.5e-3", [-0.0005]),
    (b"nul", [_ERR]),
    (b"12x", [_ERR]),
    (b"}", [_ERR]),
    (b",", [_ERR]),
    (b"\xef\xbb\xbf{}", [_ERR, {}]),
    (b"{}", [{}]),
]


@pytest.mark.parametrize("seed", range(40))
def test_splitter_gives_each_message_what_it_must_however_the_stream_is_cut(seed: int) -> None:
    """A stream of the pieces above, separated by whitespace and cut into
    reads anywhere: the values, in order, and as many errors as bad pieces,
    whether it comes whole, in random reads or byte by byte."""
    import random

    rng = random.Random(seed)
    chosen = [rng.choice(_STREAM_PIECES) for _ in range(rng.randint(1, 30))]
    stream = b"".join(piece + rng.choice([b" ", b"\n", b"\r\n\t "]) for piece, _ in chosen)
    expected = [item for _, items in chosen for item in items]
    for chunks in ([stream], _random_chunks(rng, stream, [1, 3, 10, 50]), [stream[i:i + 1] for i in range(len(stream))]):
        assert _normalized(_splitter_items(chunks, max_bytes=4096)) == expected


def test_splitter_error_texts_are_those_of_the_message_alone() -> None:
    """Line and column count from the start of the message, not of the
    read; the byte offset of bad UTF-8 too."""
    splitter = JsonStreamSplitter(max_bytes=4096)
    assert splitter.feed(b'{"ok": 1}\n{"a":\n 1,\n  "b" 2}') == [{"ok": 1}, _parse_error_like(
        "JSON parse error, expecting ':' delimiter at line 3 column 7")]
    items = splitter.feed(b' {"x": 2}  {"s": "\xc3\xa9\xff"}')
    assert items[0] == {"x": 2}
    assert items[1].desc == "JSON parse error, invalid UTF-8 sequence at byte 9"


class _parse_error_like:
    def __init__(self, desc: str) -> None:
        self.desc = desc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParseError) and other.desc == self.desc


#: Bytes that open a message (and so swallow what follows until it closes).
_OPENERS = b'{["'


def test_splitter_makes_progress_on_every_byte_value() -> None:
    """Every byte value, alone, around and inside messages, whole or byte by
    byte: each feed returns (b"\\x0b" and b"\\x0c" once made the splitter
    loop forever: the token start took them for a token, the token end for
    whitespace), both ways of feeding agree, and the stream resynchronises."""
    with no_hang(30):
        for value in range(256):
            byte = bytes([value])
            streams = [byte, byte + b' {"ok": 1}', b'{"ok": 1}' + byte, b'{"s": "' + byte + b'"}', b"[" + byte + b"]",
                       b"x" + byte + b"y ", byte * 3 + b"\n" + b'{"ok": 1}', b'{"a": 1' + byte + b"}",
                       b'{"e": "\\' + byte + b'"}']
            for stream in streams:
                whole = _splitter_items([stream], max_bytes=4096)
                by_byte = _splitter_items([stream[i:i + 1] for i in range(len(stream))], max_bytes=4096)
                assert _normalized(by_byte) == _normalized(whole), (byte, stream)
                assert len(whole) <= len(stream)  # every item consumed input
                if stream.endswith(b'{"ok": 1}') and byte not in _OPENERS:
                    assert whole[-1] == {"ok": 1}, (byte, whole)


@pytest.mark.parametrize("seed", range(20))
def test_splitter_on_random_garbage_is_bounded_and_resynchronises(seed: int) -> None:
    import random

    rng = random.Random(seed)
    garbage = rng.randbytes(rng.choice([10, 1000, 20_000]))
    if seed % 2:  # garbage made of JSON's own characters nests, quotes and escapes
        garbage = bytes(rng.choice(b'{}[]",:\\ \t\n\x0b\x0cax1"') for _ in range(len(garbage)))
    stream = garbage + b' \n"" ]]]]}}}} {"ok": 1}'
    chunks = _random_chunks(rng, stream, [0, 5, 100])
    with no_hang(30):
        whole = _splitter_items([stream], max_bytes=4096)
        assert _normalized(_splitter_items(chunks, max_bytes=4096)) == _normalized(whole)
        assert len(whole) <= len(stream)
        splitter = JsonStreamSplitter(max_bytes=4096)
        for chunk in chunks:
            splitter.feed(chunk)
            assert len(splitter._buf) <= 4096 + len(chunk)


def test_splitter_keeps_the_nesting_limit_when_the_parser_could_go_deeper() -> None:
    # With a recursion limit high enough for the json module to parse it, a
    # message deeper than MAX_NESTING must still be refused as too deep.
    message = b'{"deep": ' + b"[" * 1100 + b"]" * 1100 + b'}{"ok": 1}'
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        items = _splitter_items([message], max_bytes=1 << 20)
    finally:
        sys.setrecursionlimit(limit)
    assert items == [("ParseError", "JSON nesting depth limit exceeded"), {"ok": 1}]


def test_splitter_parses_a_message_with_the_public_json_api_only() -> None:
    """The parser is json.JSONDecoder.raw_decode (the undocumented scan_once
    is not used), on one message at a time."""
    from vfiouser_vmem.control import _framing

    source = Path(_framing.__file__).read_text()
    assert "scan_once" not in source
    assert source.count("raw_decode(") == 1


@pytest.mark.parametrize("result", [0, 1, -7, 1 << 63, True, False, None, {}, {"a": 1}, [], [1], "s", 1.5])
def test_encoded_returns_are_what_json_dumps_writes(result: Any) -> None:
    from vfiouser_vmem.control._framing import encode_return

    assert encode_return(result) == (json.dumps({"return": result}) + "\n").encode()


# ---------------------------------------------------------------------------
# commands


@pytest.mark.parametrize(
    ("name", "arguments", "desc"),
    [
        ("qom-get", {"property": "size"}, "Parameter 'path' is missing"),
        ("qom-get", {"path": "vmem0"}, "Parameter 'property' is missing"),
        ("qom-get", {"path": 1, "property": "size"}, "Invalid parameter type for 'path', expected: string"),
        ("qom-get", {"path": "vmem0", "property": None}, "Invalid parameter type for 'property', expected: string"),
        ("qom-get", {"path": "vmem0", "property": "size", "x": 1}, "Parameter 'x' is unexpected"),
        ("qom-set", {"path": "vmem0", "property": "requested-size"}, "Parameter 'value' is missing"),
        ("qom-list", {"path": ["vmem0"]}, "Invalid parameter type for 'path', expected: string"),
        ("query-memory-devices", {"all": True}, "Parameter 'all' is unexpected"),
        ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ],
)
async def test_argument_errors(sock_dir: str, name: str, arguments: dict[str, Any], desc: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}), path):
        client = await RawClient.connect(path)
        assert await client.command(name, arguments, id=9) == error(desc, id=9)
        assert device.values["requested-size"] == 0
        assert await client.command("query-status") == {"return": {"status": "running", "running": True}}


async def test_qom_get_and_set(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice(max_size=4 * GiB, memaddr=0x240000000, node=1, memdev="/objects/ram1")
    async with running(QmpServer({"vmem0": device}), path):
        client = await RawClient.connect(path)
        args = {"path": "vmem0", "property": "requested-size", "value": GiB}
        assert await client.command("qom-set", args) == {"return": {}}
        assert device.values["requested-size"] == GiB
        for dev_path in ("vmem0", "/machine/peripheral/vmem0", "/machine/peripheral/vmem0/virtio-backend"):
            reply = await client.command("qom-get", {"path": dev_path, "property": "requested-size"})
            assert reply == {"return": GiB}
        expected = {"size": 0, "block-size": 2 * MiB, "max-size": 4 * GiB, "memaddr": 0x240000000, "node": 1}
        for prop, value in expected.items():
            assert await client.command("qom-get", {"path": "vmem0", "property": prop}) == {"return": value}
        assert await client.command("qom-get", {"path": "vmem0", "property": "memdev"}) == {"return": "/objects/ram1"}


@pytest.mark.parametrize(
    ("command", "arguments", "expected"),
    [
        ("qom-get", {"path": "vmem1", "property": "size"}, error("Device 'vmem1' not found", "DeviceNotFound")),
        ("qom-list", {"path": "/machine/peripheral/x"}, error("Device '/machine/peripheral/x' not found", "DeviceNotFound")),
        ("qom-get", {"path": "vmem0", "property": "foo"}, error("Property 'vmem0.foo' not found")),
        ("qom-set", {"path": "vmem0", "property": "foo", "value": 1}, error("Property 'vmem0.foo' not found")),
        ("qom-set", {"path": "vmem0", "property": "size", "value": 0}, error("Property 'vmem0.size' is not writable")),
        (
            "qom-set",
            {"path": "vmem0", "property": "requested-size", "value": 3 * MiB},
            error("'requested-size' has to be multiples of 'block-size' (0x200000)"),
        ),
        (
            "qom-set",
            {"path": "vmem0", "property": "requested-size", "value": 10 * GiB},
            error("'requested-size' cannot exceed the memory backend size (0x200000000)"),
        ),
        (
            "qom-set",
            {"path": "vmem0", "property": "requested-size", "value": "1G"},
            error("Parameter 'requested-size' expects uint64"),
        ),
    ],
)
async def test_device_errors_map_to_qmp_errors(
    sock_dir: str, command: str, arguments: dict[str, Any], expected: dict[str, Any]
) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice(requested_size=2 * MiB)
    async with running(QmpServer({"vmem0": device}), path):
        client = await RawClient.connect(path)
        assert await client.command(command, arguments) == expected
        assert device.values["requested-size"] == 2 * MiB
        assert await client.command("qom-get", {"path": "vmem0", "property": "requested-size"}) == {"return": 2 * MiB}


async def test_property_errors_without_a_message_get_qemu_texts(sock_dir: str) -> None:
    class Terse(FakeDevice):
        def qom_set(self, prop: str, value: Any) -> None:
            raise PropertyReadOnly()

    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": Terse()}), path):
        client = await RawClient.connect(path)
        reply = await client.command("qom-set", {"path": "vmem0", "property": "node", "value": 1})
        assert reply == error("Property 'vmem0.node' is not writable")


async def test_a_device_bug_is_an_internal_error_not_a_crash(sock_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(FakeDevice):
        def qom_get(self, prop: str) -> Any:
            if prop == "node":
                raise RuntimeError("boom")
            if prop == "memdev":
                return object()  # not JSON
            return super().qom_get(prop)

    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": Buggy()}), path):
        client = await RawClient.connect(path)
        assert await client.command("qom-get", {"path": "vmem0", "property": "node"}, id=1) == error(
            "Internal error: boom", id=1
        )
        reply = await client.command("qom-get", {"path": "vmem0", "property": "memdev"}, id=2)
        assert reply["id"] == 2 and reply["error"]["desc"].startswith("Internal error: ")
        assert await client.command("qom-get", {"path": "vmem0", "property": "size"}) == {"return": 0}
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_qom_list(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}), path):
        client = await RawClient.connect(path)
        reply = await client.command("qom-list", {"path": "/machine/peripheral/vmem0"})
        # The device's properties, then its child virtio-backend (the QOM tree, control/_qom.py).
        assert reply == {"return": device.qom_list() + [{"name": "virtio-backend", "type": "child<virtio-mem>"}]}
        names = {p["name"] for p in reply["return"]}
        assert {"size", "requested-size", "block-size", "max-size", "memaddr", "node", "memdev"} <= names


async def test_memory_device_queries_look_devices_up_at_command_time(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    devices: dict[str, FakeDevice] = {"vmem0": FakeDevice("vmem0", size=4 * MiB)}
    async with running(QmpServer(devices), path):
        client = await RawClient.connect(path)
        devices["vmem1"] = FakeDevice("vmem1", size=6 * MiB, memaddr=0x340000000, node=1)
        reply = await client.command("query-memory-devices")
        assert reply == {
            "return": [
                {"type": "virtio-mem", "data": devices["vmem0"].memory_device_info()},
                {"type": "virtio-mem", "data": devices["vmem1"].memory_device_info()},
            ]
        }
        assert reply["return"][1]["data"] == {
            "id": "vmem1",
            "memaddr": 0x340000000,
            "node": 1,
            "requested-size": 0,
            "size": 6 * MiB,
            "max-size": 8 * GiB,
            "block-size": 2 * MiB,
            "memdev": "/objects/mem-vmem1",
        }
        assert await client.command("query-memory-size-summary") == {
            "return": {"base-memory": 0, "plugged-memory": 10 * MiB}
        }
        assert await client.command("qom-get", {"path": "vmem1", "property": "node"}) == {"return": 1}


async def test_query_commands_lists_what_works(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        names = [c["name"] for c in (await client.command("query-commands"))["return"]]
        assert "quit" not in names
        for name in ("qmp_capabilities", "query-version", "query-commands", "qom-get", "qom-set", "qom-list",
                     "query-memory-devices", "query-memory-size-summary", "query-status"):
            assert name in names
        # Every listed command exists (none answers CommandNotFound).
        for name in names:
            reply = await client.command(name)
            assert reply.get("error", {}).get("class") != "CommandNotFound" or name == "qmp_capabilities"


async def test_refused_commands_are_logged(sock_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vfiouser_vmem.qmp")
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        await client.command("qom-get", {"path": "nope", "property": "size"})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("'qom-get'" in line and "Device 'nope' not found" in line for line in lines), lines


#: Client text that must not reach a log line as it is: NUL, an ANSI escape
#: sequence, a BOM, a lone surrogate, a line break.
_NASTY = "\x00\x1b[31m\ufeff\ud800\nX"


async def test_client_text_is_escaped_and_bounded_in_the_log(sock_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """Command names, device paths, property names and the input a parse
    error quotes reach the log escaped (as repr escapes them) and cut to a
    bounded length; the replies keep the text (JSON escapes it)."""
    caplog.set_level(logging.INFO, logger="vfiouser_vmem.qmp")
    path = os.path.join(sock_dir, "q")
    long_name = "y" * 100_000
    async with running(QmpServer({"vmem0": FakeDevice()}), path):
        client = await RawClient.connect(path)
        assert await client.command(_NASTY) == error(f"The command {_NASTY} has not been found", "CommandNotFound")
        assert await client.command("qom-get", {"path": _NASTY, "property": "size"}) == error(
            f"Device '{_NASTY}' not found", "DeviceNotFound")
        assert await client.command("qom-get", {"path": "vmem0", "property": _NASTY}) == error(
            f"Property 'vmem0.{_NASTY}' not found")
        assert await client.command(long_name) == error(f"The command {long_name} has not been found", "CommandNotFound")
        await client.send(b"\x00\x1bc\x07\xef\xbb\xbf\xff ")  # a bare token of control bytes and non-UTF-8
        assert await client.reply() == error("JSON parse error, invalid UTF-8 sequence at byte 7")
        await client.send(b"\x00\x1bc\x07\xef\xbb\xbf ")  # NUL, ESC c (reset the terminal), BEL, BOM
        assert await client.reply() == error("JSON parse error, invalid keyword '\x00\x1bc\x07\ufeff'")
        await client.send(json.dumps({"execute": "query-status", "\x1b[2J": 1}))
        assert await client.reply() == error("QMP input member '\x1b[2J' is unexpected")
    lines = [r.getMessage() for r in caplog.records if r.name == "vfiouser_vmem.qmp"]
    for line in lines:
        assert line.isprintable(), repr(line)
        assert len(line) < 2000, len(line)
    escaped = "\\x00\\x1b[31m\\ufeff\\ud800\\nX"
    assert any(f"refused command '{escaped}': The command {escaped} has not been found" in line for line in lines), lines
    assert any(f"Device '{escaped}' not found" in line for line in lines), lines
    assert any(f"Property 'vmem0.{escaped}' not found" in line for line in lines), lines
    assert any("invalid keyword '\\x00\\x1bc\\x07\\ufeff'" in line for line in lines), lines
    assert any("QMP input member '\\x1b[2J' is unexpected" in line for line in lines), lines
    assert any("yyy...[" in line and "more characters]" in line for line in lines), lines


async def test_refused_input_log_lines_are_rate_limited_per_client(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused input or command is logged, up to a burst per client;
    the rest are counted and the count is logged (no log flood from one
    client sending bad requests one read at a time)."""
    caplog.set_level(logging.INFO, logger="vfiouser_vmem.qmp")
    path = os.path.join(sock_dir, "q")
    sent = 300
    async with running(QmpServer({}), path):
        noisy = await RawClient.connect(path)
        for i in range(sent):
            bad = b"}" if i % 2 else b'{"execute": "nope"}'
            await noisy.send(bad)
            assert "error" in await noisy.reply()
        await noisy.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the server has seen the end of the connection
        other = await RawClient.connect(path)  # another client's lines are not held back by the noisy one's
        await other.command("nope-too")
    lines = [r.getMessage() for r in caplog.records if r.name == "vfiouser_vmem.qmp"]
    refused = [line for line in lines if line.startswith("QMP client 1: refused")]
    not_logged = sum(int(m.group(1)) for line in lines
                     if (m := re.match(r"QMP client 1: (\d+) more refused inputs or commands were not logged", line)))
    assert len(refused) <= 20
    assert len(refused) + not_logged == sent
    assert any(line.startswith("QMP client 2: refused command 'nope-too'") for line in lines), lines


# ---------------------------------------------------------------------------
# events


async def test_size_change_event_shape_and_only_in_command_mode(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}), path):
        ready = await RawClient.connect(path)
        negotiating = await RawClient.connect(path, negotiate=False)
        device.set_plugged_size(2 * MiB)
        event = await ready.event()
        assert event["event"] == "MEMORY_DEVICE_SIZE_CHANGE"
        assert event["data"] == size_event(device, 2 * MiB)
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
        assert abs(event["timestamp"]["seconds"] - time.time()) < 60
        await negotiating.assert_nothing_pending()
        assert await negotiating.command("qmp_capabilities") == {"return": {}}
        await negotiating.assert_nothing_pending()


async def test_rate_limit_first_at_once_then_the_final_size(sock_dir: str) -> None:
    interval = 0.5
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}, event_interval_s=interval), path):
        client = await RawClient.connect(path)
        start = trio.current_time()
        for i in range(1, 51):
            device.set_plugged_size(i * 2 * MiB)
        first = await client.event()
        first_at = trio.current_time()
        assert first["data"]["size"] == 2 * MiB
        assert first_at - start < interval
        second = await client.event()
        second_at = trio.current_time()
        assert second["data"]["size"] == 100 * MiB  # the final size, nothing in between
        assert second_at - start >= interval * 0.9
        # Sending the pending event opened a new window; it closes empty.
        with trio.move_on_after(3 * interval):
            extra = await client.recv()
            pytest.fail(f"unexpected message {extra}")
        # The window is closed: the next change goes out at once.
        sent_at = trio.current_time()
        device.set_plugged_size(0)
        third = await client.event()
        assert third["data"]["size"] == 0
        assert trio.current_time() - sent_at < interval


async def test_rate_limit_window_reopens_after_a_coalesced_event(sock_dir: str) -> None:
    interval = 0.3
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}, event_interval_s=interval), path):
        client = await RawClient.connect(path)
        device.set_plugged_size(2 * MiB)
        device.set_plugged_size(4 * MiB)
        assert (await client.event())["data"]["size"] == 2 * MiB
        assert (await client.event())["data"]["size"] == 4 * MiB
        emitted_at = trio.current_time()
        device.set_plugged_size(6 * MiB)  # inside the window opened at emitted_at
        assert (await client.event())["data"]["size"] == 6 * MiB
        assert trio.current_time() - emitted_at >= interval * 0.9


async def test_rate_limit_is_per_device(sock_dir: str) -> None:
    interval = 1.0
    path = os.path.join(sock_dir, "q")
    a, b = FakeDevice("vmem0"), FakeDevice("vmem1")
    async with running(QmpServer({"vmem0": a, "vmem1": b}, event_interval_s=interval), path):
        client = await RawClient.connect(path)
        start = trio.current_time()
        a.set_plugged_size(2 * MiB)
        b.set_plugged_size(4 * MiB)
        a.set_plugged_size(6 * MiB)
        assert (await client.event())["data"] == size_event(a, 2 * MiB)
        assert (await client.event())["data"] == size_event(b, 4 * MiB)
        assert trio.current_time() - start < interval
        assert (await client.event())["data"] == size_event(a, 6 * MiB)
        assert trio.current_time() - start >= interval * 0.9


async def test_events_from_another_thread(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}, event_interval_s=0), path):
        client = await RawClient.connect(path)
        await trio.to_thread.run_sync(device.set_plugged_size, 8 * MiB)
        assert (await client.event())["data"] == size_event(device, 8 * MiB)


async def test_add_device_subscribes_now_or_at_serve(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    devices: dict[str, FakeDevice] = {}
    server = QmpServer(devices, event_interval_s=0)
    early = FakeDevice("early")
    server.add_device(early)
    assert early.listener_count == 0  # not serving yet
    with pytest.raises(ValueError, match="Duplicate ID 'early'"):
        server.add_device(FakeDevice("early"))
    async with running(server, path):
        assert early.listener_count == 1
        client = await RawClient.connect(path)
        late = FakeDevice("late")
        server.add_device(late)
        assert late.listener_count == 1
        server.add_device(late)  # idempotent
        assert late.listener_count == 1
        late.set_plugged_size(2 * MiB)
        early.set_plugged_size(4 * MiB)
        assert (await client.event())["data"] == size_event(late, 2 * MiB)
        assert (await client.event())["data"] == size_event(early, 4 * MiB)
        ids = [d["data"]["id"] for d in (await client.command("query-memory-devices"))["return"]]
        assert ids == ["early", "late"]
    assert early.listener_count == 0 and late.listener_count == 0


async def test_a_client_that_stops_reading_does_not_block_others(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice(max_size=1 << 50)
    server = QmpServer({"vmem0": device}, event_interval_s=0, max_queued_messages=8)

    def stuck_client_dropped() -> bool:
        return any("not reading" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    async with running(server, path):
        stuck = await RawClient.connect(path)  # never reads again
        reader = await RawClient.connect(path)
        size = 0
        while not stuck_client_dropped():
            size += 1
            assert size < 20_000, "the stuck client was never dropped"
            device.set_plugged_size(size)
            assert (await reader.event())["data"]["size"] == size
        for _ in range(50):  # the others keep getting everything
            size += 1
            device.set_plugged_size(size)
            assert (await reader.event())["data"]["size"] == size
        assert await reader.command("query-status") == {"return": {"status": "running", "running": True}}
        # The stuck client gets what was already sent (the last message may
        # be cut short), then end of file.
        lines = (await stuck.read_to_eof()).split(b"\n")[:-1]
        assert len(lines) > 8
        assert [json.loads(line)["data"]["size"] for line in lines] == list(range(1, len(lines) + 1))


async def test_replies_wait_for_a_client_that_does_not_read_and_arrive_whole_and_in_order(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    big = "/objects/" + "m" * 100_000  # replies larger than a socket buffer holds
    device = FakeDevice(memdev=big)
    async with running(QmpServer({"vmem0": device}, max_queued_messages=4), path):
        slow = await RawClient.connect(path)
        requests = b"".join(
            json.dumps({"execute": "qom-get", "id": i, "arguments": {"path": "vmem0", "property": "memdev"}}).encode()
            for i in range(40)
        )
        await slow.send(requests)
        await trio.testing.wait_all_tasks_blocked()  # the server waits for slow to read
        other = await RawClient.connect(path)
        assert await other.command("query-status") == {"return": {"status": "running", "running": True}}
        assert [await slow.recv() for _ in range(40)] == [{"return": big, "id": i} for i in range(40)]
        await slow.assert_nothing_pending()


async def test_an_event_goes_after_a_reply_still_being_written(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    big = "/objects/" + "m" * 1_000_000
    device = FakeDevice(memdev=big)
    async with running(QmpServer({"vmem0": device}, event_interval_s=0), path):
        client = await RawClient.connect(path)
        await client.send(json.dumps({"execute": "qom-get", "arguments": {"path": "vmem0", "property": "memdev"}}))
        await trio.testing.wait_all_tasks_blocked()  # part of the reply is written, the rest waits
        # Make room in the socket with no checkpoint in between, so that the
        # server's writer has not yet written more: the event must still
        # queue behind the rest of the reply, not go into the room.
        client.buffer += os.read(client.stream.socket.fileno(), 100_000)
        device.set_plugged_size(2 * MiB)
        assert await client.recv() == {"return": big}
        assert (await client.recv())["data"] == size_event(device, 2 * MiB)
        await client.assert_nothing_pending()


async def _closed_by_server(client: RawClient) -> bool:
    """Whether the server has closed this connection (reads what is left)."""
    try:
        await client.read_to_eof()
    except trio.BrokenResourceError:  # closed with unread input: a reset
        pass
    return True


async def test_at_the_client_limit_the_longest_idle_is_evicted_and_a_new_client_is_greeted(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_clients connections at most: a new one is still greeted at once;
    to make room the server closes the connection idle the longest, one
    still negotiating capabilities first, with a WARNING naming it."""
    path = os.path.join(sock_dir, "q")
    limit = 4
    async with running(QmpServer({"vmem0": FakeDevice()}, max_clients=limit), path):
        negotiated = [await RawClient.connect(path) for _ in range(2)]  # clients 1, 2
        negotiating = [await RawClient.connect(path, negotiate=False) for _ in range(2)]  # 3, 4
        extra = [await RawClient.connect(path, negotiate=False) for _ in range(limit + 10)]  # 5 to 18
        # Each newcomer was greeted at once.  Room was made by closing 3 and
        # 4 (negotiating, idle the longest), then newcomers in turn (still
        # negotiating): the negotiated clients stay.
        for gone in [*negotiating, *extra[:-2]]:
            assert await _closed_by_server(gone)
        assert await negotiated[1].command("query-version") == {"return": GREETING["QMP"]["version"]}
        fresh = await RawClient.connect(path)  # client 19: closes 17, the newcomer idle the longest
        assert await _closed_by_server(extra[-2])
        assert await fresh.command("query-version") == {"return": GREETING["QMP"]["version"]}
        assert await extra[-1].command("qmp_capabilities") == {"return": {}}
        # All in command mode now: the one idle the longest goes, whatever its age.
        assert await negotiated[0].command("query-status") == {"return": {"status": "running", "running": True}}
        await RawClient.connect(path)  # client 20 closes client 2
        assert await _closed_by_server(negotiated[1])
        for client in (negotiated[0], fresh, extra[-1]):
            assert await client.command("query-status") == {"return": {"status": "running", "running": True}}
    warnings = [r.getMessage() for r in caplog.records if r.name == "vfiouser_vmem.qmp" and r.levelno == logging.WARNING]
    evicted = [int(m.group(1)) for line in warnings if (m := re.search(r"disconnecting client (\d+)", line))]
    assert evicted == [3, 4, *range(5, 17), 17, 2], warnings
    assert all(f"{limit} clients" in line and "--qmp-max-clients" in line for line in warnings), warnings
    assert "still negotiating capabilities" in warnings[0] and "still negotiating" not in warnings[-1], warnings


async def test_the_default_client_limit(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}), path):
        clients = [await RawClient.connect(path, negotiate=False) for _ in range(64 + 5)]
        for gone in clients[:5]:
            assert await _closed_by_server(gone)
        assert await clients[5].command("qmp_capabilities") == {"return": {}}
        for client in clients:
            await client.aclose()


async def test_replies_queued_for_a_client_are_bounded_in_bytes(sock_dir: str) -> None:
    """A client that sends requests but never reads stalls itself: what the
    server holds for it is bounded in bytes (the replies here quote a 200 KB
    parameter name), not only in messages."""
    from vfiouser_vmem.control._connection import DEFAULT_MAX_QUEUED_BYTES

    path = os.path.join(sock_dir, "q")
    name = "p" * 200_000
    server = QmpServer({}, max_queued_messages=256)
    async with running(server, path):
        stuck = await RawClient.connect(path)

        async def send_requests() -> None:
            for i in range(100):  # 20 MB of replies
                await stuck.send(json.dumps({"execute": "query-status", "id": i, "arguments": {name: 1}}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_requests)
            await trio.testing.wait_all_tasks_blocked()  # the server stopped reading: the sender is stuck too
            (client,) = [c for c in server._connections if c.number == 1]
            assert client.queued_bytes <= DEFAULT_MAX_QUEUED_BYTES + len(name) + 1000
            other = await RawClient.connect(path)  # and the others are served
            assert await other.command("query-status") == {"return": {"status": "running", "running": True}}
            nursery.cancel_scope.cancel()


async def test_client_disconnects_are_harmless(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    async with running(QmpServer({"vmem0": device}, event_interval_s=0), path):
        gone = await RawClient.connect(path)
        await gone.send(b'{"execute": "query-status"}{"execute": "qom-get", "arg')
        await gone.aclose()
        other = await RawClient.connect(path)
        device.set_plugged_size(2 * MiB)
        assert (await other.event())["data"]["size"] == 2 * MiB
        assert await other.command("query-status") == {"return": {"status": "running", "running": True}}


# ---------------------------------------------------------------------------
# the socket


async def test_socket_mode_and_removal_on_cancel(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice()
    server = QmpServer({"vmem0": device})
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, path)
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert device.listener_count == 1
            client = await RawClient.connect(path)
            scope.cancel()
    assert not os.path.lexists(path)
    assert device.listener_count == 0
    assert await client.read_to_eof() == b""
    # And it can serve again on the same path.
    async with running(server, path):
        await RawClient.connect(path)


async def test_refuses_a_path_that_is_not_a_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    Path(path).write_text("precious")
    with pytest.raises(SocketPathInUse, match="not a socket") as info:
        await QmpServer({}).serve(path)
    assert isinstance(info.value, FileExistsError)
    assert Path(path).read_text() == "precious"
    os.unlink(path)
    os.mkdir(path)
    with pytest.raises(SocketPathInUse):
        await QmpServer({}).serve(path)
    assert os.path.isdir(path)


async def test_refuses_a_socket_someone_listens_on(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    async with running(QmpServer({}), path):
        with pytest.raises(SocketPathInUse, match="already listening"):
            await QmpServer({}).serve(path)
        client = await RawClient.connect(path)  # the first server is unharmed
        assert await client.command("query-status") == {"return": {"status": "running", "running": True}}


async def test_replaces_a_stale_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # left behind, nobody listening
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with running(QmpServer({}), path):
        client = await RawClient.connect(path)
        assert await client.command("query-status") == {"return": {"status": "running", "running": True}}


async def test_serve_twice_at_once_is_an_error(sock_dir: str) -> None:
    server = QmpServer({})
    async with running(server, os.path.join(sock_dir, "a")):
        with pytest.raises(RuntimeError, match="already serving"):
            await server.serve(os.path.join(sock_dir, "b"))
    assert not os.path.lexists(os.path.join(sock_dir, "b"))


# ---------------------------------------------------------------------------
# QEMU's own client tools


async def test_qemu_qmp_client(sock_dir: str) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    path = os.path.join(sock_dir, "q")
    device = FakeDevice(max_size=4 * GiB)
    other = FakeDevice("vmem1", size=2 * MiB)
    async with running(QmpServer({"vmem0": device, "vmem1": other}, event_interval_s=1.0), path):

        async def session() -> list[dict[str, Any]]:
            qmp = QMPClient("vfiouser-vmem-test")
            await qmp.connect(path)
            try:
                assert qmp.greeting is not None
                assert qmp.greeting.QMP.version["qemu"] == {"major": 11, "minor": 1, "micro": 0}
                assert await qmp.execute(
                    "qom-set", {"path": "vmem0", "property": "requested-size", "value": GiB}
                ) == {}
                assert await qmp.execute("qom-get", {"path": "vmem0", "property": "requested-size"}) == GiB
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": 3 * MiB})
                assert info.value.error_class == "GenericError"
                assert str(info.value) == "'requested-size' has to be multiples of 'block-size' (0x200000)"
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute("qom-get", {"path": "nope", "property": "size"})
                assert info.value.error_class == "DeviceNotFound"
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute("quit")
                assert info.value.error_class == "CommandNotFound"
                devices = await qmp.execute("query-memory-devices")
                assert [d["data"]["id"] for d in devices] == ["vmem0", "vmem1"]
                assert devices[0]["data"]["requested-size"] == GiB

                received = []
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
                    # The "guest" plugs memory in steps; the trio side runs the device.
                    for step in range(1, 9):
                        trio.from_thread.run_sync(device.set_plugged_size, step * 128 * MiB)
                    while True:
                        event = await asyncio.wait_for(listener.get(), TIMEOUT)
                        received.append(dict(event))
                        if event["data"]["size"] == GiB:
                            break
                summary = await qmp.execute("query-memory-size-summary")
                assert summary == {"base-memory": 0, "plugged-memory": GiB + 2 * MiB}
                return received
            finally:
                await qmp.disconnect()

        events = await trio.to_thread.run_sync(lambda: asyncio.run(session()))
    assert [e["data"]["size"] for e in events] == [128 * MiB, GiB]
    assert events[-1]["data"] == size_event(device, GiB)
    assert set(events[-1]["timestamp"]) == {"seconds", "microseconds"}


async def test_qmp_shell(sock_dir: str) -> None:
    shell = Path(sys.executable).parent / "qmp-shell"
    if not shell.exists():
        pytest.skip("qemu.qmp did not install qmp-shell")
    path = os.path.join(sock_dir, "q")
    device = FakeDevice(size=4 * MiB)
    async with running(QmpServer({"vmem0": device}), path):
        commands = (
            "query-memory-devices\n"
            "qom-set path=vmem0 property=requested-size value=1073741824\n"
            "qom-get path=/machine/peripheral/vmem0 property=requested-size\n"
            "qom-get path=vmem0 property=nope\n"
        )
        env = dict(os.environ, HOME=sock_dir)  # qmp-shell keeps a history file there
        with trio.fail_after(60):
            result = await trio.run_process(
                [str(shell), path], stdin=commands.encode(), capture_stdout=True, capture_stderr=True, env=env
            )
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    assert "Connected to QEMU 11.1.0" in out
    replies = [json.loads(line[line.index("{"):]) for line in out.splitlines() if "{" in line]
    assert replies == [
        {"return": [{"type": "virtio-mem", "data": FakeDevice(size=4 * MiB).memory_device_info()}]},
        {"return": {}},
        {"return": GiB},
        error("Property 'vmem0.nope' not found"),
    ]
    assert device.values["requested-size"] == GiB
