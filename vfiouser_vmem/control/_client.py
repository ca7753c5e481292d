"""A small synchronous QMP client, for this server's socket or a QEMU's.

The one client of the project: ``vfiouser-vmem ctl``, the tests and the
integration harness use it.  It needs nothing but the standard library and
does not depend on this package's server (``qemu.qmp`` is the independent
client the tests also drive the server with).  Against QEMU, start it with
``-qmp unix:PATH,server=on,wait=off``.

::

    from vfiouser_vmem.control import QmpClient
    from vfiouser_vmem.errors import QmpError

    with QmpClient("/run/vmem.qmp", timeout_s=10) as qmp:   # greeting + qmp_capabilities
        qmp.execute("qom-set", path="vmem0", property="requested-size", value=1 << 30)
        size = qmp.execute("qom-get", path="vmem0", property="size")
        qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": "m1", "size": 1 << 30})
        event = qmp.next_event(5.0)            # the next event, or None after 5 s
        event = qmp.wait_event("MEMORY_DEVICE_SIZE_CHANGE", 5.0, data={"id": "vmem0"})

``execute(command, **arguments)`` returns the reply's ``return`` value.  An
error reply raises :class:`~vfiouser_vmem.errors.QmpError` with the QMP
``desc`` (its ``str()`` too) and ``error_class`` (``GenericError``,
``DeviceNotFound``, ...).  Every failure of the connection raises QmpError
as well, with ``error_class`` empty and a message naming the socket: it
cannot connect (the ``OSError`` is the ``__cause__``: FileNotFoundError or
ConnectionRefusedError while the peer has not created or opened its socket
yet), no greeting or no reply within ``timeout_s``, the peer closed the
connection or sent something that is not QMP.  The connection is not
usable after such a failure.

Events (messages with an ``event`` member) that arrive while a command waits
for its reply are kept, in order, in ``events`` (the oldest go first beyond
``MAX_QUEUED_EVENTS``, so that a peer flooding events cannot make a client
grow without bound); :meth:`QmpClient.next_event` and
:meth:`QmpClient.wait_event` take from there before reading more.

Every message from the peer is one line of JSON (QEMU and this server both
end each with a newline; QEMU's ``\\r\\n`` is whitespace to JSON).  Commands
carry an ``id`` (``<id_prefix>-1``, ``-2``, ...) and replies are matched
by it.  Not thread-safe: one thread per client.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from vfiouser_vmem.errors import QmpError
from vfiouser_vmem.util.logtext import printable

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_LINE_BYTES", "MAX_QUEUED_EVENTS", "QmpClient", "QmpError"]

DEFAULT_TIMEOUT_S = 10.0
#: A longer message is refused (no reply of these commands comes near it).
MAX_LINE_BYTES = 16 << 20
#: Events kept while nobody takes them (the oldest go first).
MAX_QUEUED_EVENTS = 10_000
_READ_SIZE = 65536


class QmpClient:
    """A synchronous QMP connection: commands with ids, events queued.

    Connects to the UNIX socket ``path``, reads the greeting (kept in
    ``greeting``) and negotiates capabilities (none are enabled).
    ``timeout_s`` bounds the connect, the wait for the greeting and the
    wait for each reply.  Replies are matched by ``id``; events that arrive
    meanwhile are kept in ``events`` for :meth:`next_event`.
    """

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, id_prefix: str = "qmp") -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self.id_prefix = id_prefix
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"cannot connect to the QMP socket {self.path}: {exc.strerror or exc}") from exc
        self._buf = bytearray()
        self._next_id = 1
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_EVENTS)
        self.greeting: dict[str, Any] = {}
        try:
            try:
                greeting = self._read(time.monotonic() + timeout_s)
            except TimeoutError:
                raise QmpError(f"no QMP greeting from {self.path} within {timeout_s:g} s") from None
            if "QMP" not in greeting:
                raise QmpError(f"{self.path} does not speak QMP (first message: "
                               f"{printable(json.dumps(greeting), 200)})")
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------

    def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or QmpError with the
        error's desc and class.  Arguments whose names are not Python
        identifiers go in as ``**{"qom-type": ...}``."""
        msg_id = f"{self.id_prefix}-{self._next_id}"
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP connection to {self.path} failed: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                reply = self._read(deadline)
            except TimeoutError:
                raise QmpError(f"no reply to {command} from the QMP server at {self.path} "
                               f"within {self.timeout_s:g} s") from None
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue  # not ours (cannot happen on a connection of our own)
            if "error" in reply:
                error = reply["error"]
                if not isinstance(error, dict):
                    raise QmpError(f"the QMP server at {self.path} sent a malformed error reply: "
                                   f"{printable(json.dumps(reply), 200)}")
                raise QmpError(str(error.get("desc", error)), str(error.get("class", "")))
            return reply.get("return")

    # -- events --------------------------------------------------------------

    def next_event(self, timeout_s: float | None) -> dict[str, Any] | None:
        """The next event, or None after ``timeout_s`` (None: wait forever)."""
        if self.events:
            return self.events.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                message = self._read(deadline)
            except TimeoutError:
                return None
            if "event" in message:
                return message

    def wait_event(self, name: str, timeout_s: float | None, *,
                   data: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The first event called ``name`` whose ``data`` holds the items of
        ``data`` (if given), or None after ``timeout_s`` (None: wait
        forever).  The other events stay in ``events``, in order."""
        def matches(event: dict[str, Any]) -> bool:
            if event.get("event") != name:
                return False
            if not data:
                return True
            got = event.get("data")
            return isinstance(got, dict) and all(k in got and got[k] == v for k, v in data.items())

        for i, event in enumerate(self.events):
            if matches(event):
                del self.events[i]
                return event
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                message = self._read(deadline)
            except TimeoutError:
                return None
            if "event" not in message:
                continue  # a late reply to a command that timed out
            if matches(message):
                return message
            self.events.append(message)

    # -- reading -------------------------------------------------------------

    def _read(self, deadline: float | None) -> dict[str, Any]:
        """The next message; TimeoutError at ``deadline`` (None: wait forever)."""
        while True:
            line = self._read_line(deadline)
            if line.strip():  # blank lines are skipped (in a loop: there may be many)
                break
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise QmpError(f"the QMP server at {self.path} sent something that is not JSON: "
                           f"{printable(line, 200)}") from None
        if not isinstance(message, dict):
            raise QmpError(f"the QMP server at {self.path} sent something that is not a JSON object: "
                           f"{printable(line, 200)}")
        return message

    def _read_line(self, deadline: float | None) -> bytes:
        buf = self._buf
        scanned = 0
        while (end := buf.find(b"\n", scanned)) < 0:
            scanned = len(buf)  # look at each byte once, however the line arrives
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                ready, _, _ = select.select([self.sock], [], [], remaining)
                if not ready:
                    raise TimeoutError
            else:
                select.select([self.sock], [], [])
            try:
                data = self.sock.recv(_READ_SIZE)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QmpError(f"QMP connection to {self.path} failed: {exc.strerror or exc}") from None
            if not data:
                raise QmpError(f"the QMP server at {self.path} closed the connection")
            buf += data
            if len(buf) > MAX_LINE_BYTES:
                raise QmpError(f"the QMP server at {self.path} sent a message longer than {MAX_LINE_BYTES} bytes")
        line = bytes(buf[:end])
        del buf[:end + 1]
        return line
