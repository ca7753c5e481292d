"""vfiouser_vmem.control.QmpClient: the project's synchronous QMP client.

Against the real QmpServer (run by trio in a thread) and against scripted
peers on a plain socket that behave like a QEMU (``\\r\\n`` line ends, an
``oob`` capability offered, events interleaved with replies) or misbehave.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from fake_device import MiB, FakeDevice
from vfiouser_vmem.control import QmpClient, QmpServer
from vfiouser_vmem.errors import QmpError

QEMU_GREETING = {"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "v9.2.0"},
                         "capabilities": ["oob"]}}


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="qmpc")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def real_server(path: str, devices: dict[str, FakeDevice]) -> Iterator[trio.lowlevel.TrioToken]:
    """A QmpServer on ``path``, run by trio in a thread; yields its token."""
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = threading.Event()

    async def main() -> None:
        server = QmpServer(devices, event_interval_s=0)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, path)
            token.append(trio.lowlevel.current_trio_token())
            started.set()
            while not stop.is_set():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield token[0]
    finally:
        stop.set()
        thread.join(10)


class Peer:
    """A scripted QMP peer: ``script(conn, requests)`` runs in a thread on
    the accepted connection; ``requests()`` reads the client's next request."""

    def __init__(self, path: str, script: Callable[[socket.socket, Callable[[], dict[str, Any]]], None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.script = script
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        reader = conn.makefile("rb")

        def next_request() -> dict[str, Any]:
            return json.loads(reader.readline())

        try:
            self.script(conn, next_request)
            self.done.wait(10)  # keep the connection open until the test is done
        finally:
            reader.close()
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.listener.close()


def send(conn: socket.socket, *messages: dict[str, Any], end: bytes = b"\r\n") -> None:
    conn.sendall(b"".join(json.dumps(m).encode() + end for m in messages))


def qemu_like(conn: socket.socket, next_request: Callable[[], dict[str, Any]]) -> None:
    """Greets like QEMU and answers qmp_capabilities."""
    send(conn, QEMU_GREETING)
    request = next_request()
    assert request["execute"] == "qmp_capabilities" and "arguments" not in request
    send(conn, {"return": {}, "id": request["id"]})


def test_execute_returns_the_return_value_and_an_error_reply_raises_with_class_and_desc(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    device = FakeDevice(size=4 * MiB)
    with real_server(path, {"vmem0": device}), QmpClient(path, timeout_s=10) as qmp:
        assert qmp.greeting["QMP"]["version"]["qemu"] == {"major": 11, "minor": 1, "micro": 0}
        assert qmp.execute("qom-get", path="vmem0", property="size") == 4 * MiB
        assert qmp.execute("qom-set", path="vmem0", property="requested-size", value=2 * MiB) == {}
        assert device.values["requested-size"] == 2 * MiB
        with pytest.raises(QmpError) as info:
            qmp.execute("qom-get", path="nope", property="size")
        assert info.value.error_class == "DeviceNotFound"
        assert info.value.desc == str(info.value) == "Device 'nope' not found"
        with pytest.raises(QmpError) as info:
            qmp.execute("no-such-command")
        assert (info.value.error_class, info.value.desc) == ("CommandNotFound",
                                                             "The command no-such-command has not been found")
        # The connection stays usable after an error reply.
        assert qmp.execute("query-status") == {"status": "running", "running": True}


def test_events_from_the_real_server_are_waited_for(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    a, b = FakeDevice("vmem0"), FakeDevice("vmem1")
    with real_server(path, {"vmem0": a, "vmem1": b}) as token, QmpClient(path, timeout_s=10) as qmp:
        trio.from_thread.run_sync(b.set_plugged_size, 4 * MiB, trio_token=token)
        trio.from_thread.run_sync(a.set_plugged_size, 2 * MiB, trio_token=token)
        event = qmp.wait_event("MEMORY_DEVICE_SIZE_CHANGE", 10, data={"id": "vmem0"})
        assert event is not None and event["data"] == {"id": "vmem0", "size": 2 * MiB, "qom-path": a.qom_path}
        # vmem1's event came first: it was kept for the next reader.
        other = qmp.next_event(10)
        assert other is not None and other["data"]["id"] == "vmem1"
        assert qmp.next_event(0.2) is None


def test_events_before_a_reply_are_kept_in_order_and_qemu_line_ends_work(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")

    def script(conn: socket.socket, next_request: Callable[[], dict[str, Any]]) -> None:
        qemu_like(conn, next_request)
        request = next_request()
        assert request["execute"] == "query-status"
        # Two events, a blank line and a reply to someone else before ours.
        send(conn, {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}},
             {"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}})
        conn.sendall(b"\r\n")
        send(conn, {"return": "not ours", "id": "other-1"}, {"return": {"running": True}, "id": request["id"]})

    peer = Peer(path, script)
    try:
        with QmpClient(path, timeout_s=10) as qmp:
            assert qmp.greeting == QEMU_GREETING
            assert qmp.execute("query-status") == {"running": True}
            assert [e["event"] for e in qmp.events] == ["STOP", "RESUME"]
            assert qmp.next_event(1)["event"] == "STOP"  # type: ignore[index]
            assert qmp.next_event(1)["event"] == "RESUME"  # type: ignore[index]
            assert qmp.next_event(0.1) is None
    finally:
        peer.close()


def test_hyphenated_arguments_go_through(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    seen: list[dict[str, Any]] = []

    def script(conn: socket.socket, next_request: Callable[[], dict[str, Any]]) -> None:
        qemu_like(conn, next_request)
        request = next_request()
        seen.append(request)
        send(conn, {"return": {}, "id": request["id"]})

    peer = Peer(path, script)
    try:
        with QmpClient(path, timeout_s=10, id_prefix="t") as qmp:
            qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": "m1", "size": 1 << 30})
    finally:
        peer.close()
    assert seen == [{"execute": "object-add", "id": "t-2",
                     "arguments": {"qom-type": "memory-backend-ram", "id": "m1", "size": 1 << 30}}]


def test_a_peer_that_does_not_answer_is_a_timeout_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")

    def script(conn: socket.socket, next_request: Callable[[], dict[str, Any]]) -> None:
        qemu_like(conn, next_request)
        next_request()  # and never answers it

    peer = Peer(path, script)
    try:
        with QmpClient(path, timeout_s=0.3) as qmp:
            start = time.monotonic()
            with pytest.raises(QmpError, match=f"no reply to query-status from the QMP server at {path} within 0.3 s"):
                qmp.execute("query-status")
            assert 0.25 <= time.monotonic() - start < 5
    finally:
        peer.close()


def test_no_greeting_is_a_timeout_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")
    peer = Peer(path, lambda conn, next_request: None)
    try:
        with pytest.raises(QmpError, match=f"no QMP greeting from {path} within 0.2 s"):
            QmpClient(path, timeout_s=0.2)
    finally:
        peer.close()


@pytest.mark.parametrize(("first", "message"), [
    (b'{"hello": 1}\n', "does not speak QMP"),
    (b"\x1b[2J not json\n", "sent something that is not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
])
def test_a_peer_that_is_not_qmp_is_refused(sock_dir: str, first: bytes, message: str) -> None:
    path = os.path.join(sock_dir, "q")
    peer = Peer(path, lambda conn, next_request: conn.sendall(first))
    try:
        with pytest.raises(QmpError, match=message) as info:
            QmpClient(path, timeout_s=5)
        assert info.value.error_class == ""
        assert path in info.value.desc and info.value.desc.isprintable()
    finally:
        peer.close()


def test_cannot_connect_names_the_socket_and_keeps_the_os_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "none")
    with pytest.raises(QmpError, match=f"cannot connect to the QMP socket {path}") as info:
        QmpClient(path, timeout_s=1)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_peer_that_closes_mid_reply(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "q")

    def script(conn: socket.socket, next_request: Callable[[], dict[str, Any]]) -> None:
        qemu_like(conn, next_request)
        next_request()
        conn.sendall(b'{"return": {}, "id": "qm')
        conn.shutdown(socket.SHUT_WR)

    peer = Peer(path, script)
    try:
        with QmpClient(path, timeout_s=5) as qmp:
            with pytest.raises(QmpError, match="closed the connection"):
                qmp.execute("query-status")
    finally:
        peer.close()
