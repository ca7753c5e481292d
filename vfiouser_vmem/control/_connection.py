"""One QMP or monitor client connection: its outgoing queue and its share of
the log; and ConnectionServer, the clients of one UNIX socket.

Queue
    Each client has a bounded queue of outgoing messages
    (``max_queued_messages``, default 256, and ``DEFAULT_MAX_QUEUED_BYTES``,
    4 MiB, besides the message that passes it).  Replies wait for room (the
    client that does not read its replies only stalls itself: the server
    stops reading it); an event that finds a client's queue full disconnects
    that client, with a WARNING log line, so that a stuck client never
    delays anyone else.

Log
    Refused inputs and commands are logged at most 10 times per client per
    10 s; the rest are counted, and the count is logged.  Text from clients
    (command names, paths, quoted input) is escaped and cut in log lines
    (logtext.printable) by the callers; the replies keep it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import deque
from typing import Any

import trio

from vfiouser_vmem.util.logtext import LogBudget
from vfiouser_vmem.util.sockets import (
    SocketPathInUse,
    claim_socket_path,
    peer_credentials,
    remove_socket_if_same,
    uid_allowed,
)

__all__ = ["DEFAULT_MAX_QUEUED_BYTES", "DEFAULT_MAX_QUEUED_MESSAGES", "DRAIN_TIMEOUT_S", "Client", "ConnectionServer"]

log = logging.getLogger("vfiouser_vmem.qmp")

DEFAULT_MAX_QUEUED_MESSAGES = 256
#: What may wait for one client in bytes (besides the message that passes
#: it): replies can quote a request of up to max_message_bytes.
DEFAULT_MAX_QUEUED_BYTES = 4 << 20
#: Refused inputs and commands are logged at most _LOG_BURST times per client
#: per _LOG_WINDOW_S (util/logtext.py LogBudget); the others are counted, and
#: the count is logged when a later line may go out or the client leaves:
#: one client sending bad requests cannot flood the log.
_LOG_BURST = 10
_LOG_WINDOW_S = 10.0


class Client:
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

    __slots__ = ("_log_budget", "_room_lot", "_writer_lot", "cancel_scope", "closed", "command_mode",
                 "last_input", "max_queued", "max_queued_bytes", "number", "out", "queued_bytes", "sock")

    def __init__(self, number: int, sock: socket.socket, max_queued: int,
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
        self._log_budget = LogBudget(self._report_dropped, burst=_LOG_BURST, window_s=_LOG_WINDOW_S)

    # -- the log -------------------------------------------------------------

    def may_log(self) -> bool:
        """Whether a refused input or command of this client may be logged
        now (_LOG_BURST per _LOG_WINDOW_S); if not, it is counted."""
        return self._log_budget.allow()

    def log_refused(self, what: str, *args: object, level: int = logging.INFO, exc_info: bool = False) -> None:
        """Log ``"QMP client N: " + what % args``, if :meth:`may_log` lets it
        out.  ``args`` are built before the call: keep them cheap (printable
        cuts client text first)."""
        if self.may_log():
            log.log(level, "QMP client %d: " + what, self.number, *args, exc_info=exc_info)

    def log_dropped(self) -> None:
        """Log how many lines may_log held back, if any."""
        self._log_budget.flush()

    def _report_dropped(self, count: int) -> None:
        log.info("QMP client %d: %d more refused inputs or commands were not logged", self.number, count)

    # -- the queue -----------------------------------------------------------

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

    async def receive(self, size: int) -> bytes:
        """The client's next bytes, at most ``size``; b"" once it closed its
        side or its socket failed.  Input counts for ``last_input``."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return b""
            if data:
                self.last_input = trio.current_time()
            return data


async def listen_unix(path: str, what: str) -> tuple[trio.SocketListener, tuple[int, int]]:
    """Listen on the UNIX socket ``path`` for the ``what`` server (QMP, the
    monitor): claimed as util/sockets.py says, mode 0600 from the start;
    returns the listener and the socket file's identity, for
    ``remove_socket_if_same`` when it stops."""
    claim_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
            raise OSError(exc.errno, f"cannot listen on the {what} socket {path}: {exc.strerror or exc}") from None
        st = os.lstat(path)
        identity = (st.st_dev, st.st_ino)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        if identity is not None:
            remove_socket_if_same(path, identity)
        raise
    return trio.SocketListener(sock), identity


def adopt_connection(stream: trio.SocketStream, what: str) -> socket.socket | None:
    """The connection's socket out of its trio wrapper (see Client), or None
    (logged) if that fails."""
    fd = stream.socket.detach()
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    except OSError:
        os.close(fd)
        log.exception("%s: could not take a new connection", what)
        return None


#: A client that closed its side may take this long to read what is still
#: queued for it (replies, the monitor's last output) before it is dropped.
DRAIN_TIMEOUT_S = 5.0


class ConnectionServer:
    """The clients of one UNIX socket, for the QMP server and the human
    monitor: listening and the socket file's removal, each connection's
    setup, the client limit and the teardown.  A subclass sets ``kind``
    (its name in log lines) and ``log``, and says what a session is
    (``_session``) and whom the limit disconnects (``_evict``)."""

    kind = "connection"
    log = log

    def __init__(self, *, max_clients: int, max_queued_messages: int) -> None:
        self.max_clients = max_clients
        self.max_queued_messages = max_queued_messages
        self._connections: set[Client] = set()  # every client, at most max_clients
        self._next_client = 1
        self._serving = False
        #: uids besides root's and the server's own that may connect
        #: (``--allow-uid``, util/sockets.py ``uid_allowed``); None: whoever
        #: the socket's mode lets in.
        self.allowed_uids: frozenset[int] | None = None

    async def serve(self, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``path`` (mode 0600; a stale socket is removed, one in
        use refused: util/sockets.py) and serve clients until cancelled;
        ``task_status.started()`` once connections are accepted.  The socket
        file is removed on exit."""
        if self._serving:
            raise RuntimeError(f"this {type(self).__name__} is already serving")
        path = os.fspath(path)
        listener, identity = await listen_unix(path, self.kind)
        sock = listener.socket
        self._serving = True
        self.log.info("%s listening on %s", self.kind, path)
        try:
            async with trio.open_nursery() as nursery:
                self._serving_started(nursery)
                task_status.started()
                await trio.serve_listeners(self._handle_client, [listener], handler_nursery=nursery)
        finally:
            self._serving = False
            self._serving_stopped()
            self._connections.clear()
            sock.close()
            remove_socket_if_same(path, identity)
            self.log.info("%s stopped listening on %s", self.kind, path)

    async def _handle_client(self, stream: trio.SocketStream) -> None:
        sock = adopt_connection(stream, self.kind)
        if sock is None:
            return
        creds = peer_credentials(sock.fileno())
        if not uid_allowed(creds, self.allowed_uids):
            self.log.warning("%s: refusing a client (%s): its uid is not allowed (--allow-uid)", self.kind,
                             creds or "credentials unknown")
            sock.close()
            return
        client = Client(self._next_client, sock, self.max_queued_messages)
        client.last_input = trio.current_time()
        self._next_client += 1
        self.log.info("%s client %d connected (%s)", self.kind, client.number, creds or "credentials unknown")
        self._client_connected(client)
        if len(self._connections) >= self.max_clients:
            self._evict()
        self._connections.add(client)
        try:
            sock.setblocking(False)
            with client.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.write_queued)
                    await self._session(client)
                    # The client closed its side: give what is still queued
                    # for it a chance to go out.
                    client.close_queue()
                    nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT_S
        except Exception:
            # A bug must not take the server down with it (serve_listeners
            # would propagate it): log it and drop this client only.
            self.log.exception("%s client %d: internal error, closing the connection", self.kind, client.number)
        finally:
            self._connections.discard(client)
            self._client_gone(client)
            client.closed = True
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._client_closed(client)

    # -- what a subclass says ---------------------------------------------------

    async def _session(self, client: Client) -> None:
        """Serve ``client`` until it closes its side."""
        raise NotImplementedError

    def _evict(self) -> None:
        """Make room for a new client (the limit is reached)."""
        raise NotImplementedError

    def _serving_started(self, nursery: trio.Nursery) -> None:
        """``serve`` listens: start what runs beside the clients."""

    def _serving_stopped(self) -> None:
        """``serve`` stops."""

    def _client_connected(self, client: Client) -> None:
        """A new client, before the limit is applied."""

    def _client_gone(self, client: Client) -> None:
        """``client`` is no longer served (before its socket closes)."""

    def _client_closed(self, client: Client) -> None:
        """``client``'s socket is closed."""
