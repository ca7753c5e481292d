"""A pure-Python vfio-user client for tests (QEMU docs/devel/vfio-user.rst).

It speaks the wire protocol to a vfio-user server over a UNIX stream socket,
passing file descriptors with SCM_RIGHTS, the way QEMU's ``vfio-user-pci``
does; it is asynchronous (trio) so that the server can run in the same trio
loop as the test.

Every message is one header (16 bytes: msg_id u16, cmd u16, size u32 = the
whole message, flags u32 = type in bits 0-3 (0 command, 1 reply), bit 4
no_reply, bit 5 error; error_no u32) followed by a command-specific payload.
The client sends each message with one ``sendmsg`` (libvfio-user 0b28d20
reads the payload with a single ``recv`` and takes a short read for an
error) and waits for the reply before it sends the next command.

A reply with the error flag raises :class:`VfioUserError` carrying the
server's errno.

File descriptors the server sends (the memory BAR's fd with its region info)
belong to the client and are closed by :meth:`VfioUserClient.close`; a test
that mmaps one keeps the mapping (``mmap`` holds its own reference).
"""

from __future__ import annotations

import array
import errno as _errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Sequence

import trio

# -- protocol constants (libvfio-user include/vfio-user.h, linux/vfio.h) -------

VFIO_USER_VERSION = 1
VFIO_USER_DMA_MAP = 2
VFIO_USER_DMA_UNMAP = 3
VFIO_USER_DEVICE_GET_INFO = 4
VFIO_USER_DEVICE_GET_REGION_INFO = 5
VFIO_USER_DEVICE_GET_REGION_IO_FDS = 6
VFIO_USER_DEVICE_GET_IRQ_INFO = 7
VFIO_USER_DEVICE_SET_IRQS = 8
VFIO_USER_REGION_READ = 9
VFIO_USER_REGION_WRITE = 10
VFIO_USER_DMA_READ = 11
VFIO_USER_DMA_WRITE = 12
VFIO_USER_DEVICE_RESET = 13
VFIO_USER_DIRTY_PAGES = 14

COMMAND_NAMES = {
    value: name[len("VFIO_USER_"):]
    for name, value in globals().items()
    if name.startswith("VFIO_USER_") and isinstance(value, int)
}

FLAG_TYPE_COMMAND = 0
FLAG_TYPE_REPLY = 1
FLAG_TYPE_MASK = 0xF
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

HEADER = struct.Struct("<HHIII")  # msg_id, cmd, size, flags, error_no
HEADER_SIZE = HEADER.size  # 16

VERSION_MAJOR = 0
VERSION_MINOR = 1

# DMA_MAP flags (struct vfio_user_dma_map)
DMA_READ = 1 << 0
DMA_WRITE = 1 << 1
DMA_RW = DMA_READ | DMA_WRITE
# DMA_UNMAP flags
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# struct vfio_device_info flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# struct vfio_region_info flags and capabilities
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2

# Region indices of a PCI device (libvfio-user VFU_PCI_DEV_*_REGION_IDX)
BAR0, BAR1, BAR2, BAR3, BAR4, BAR5 = range(6)
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
MIGRATION_REGION = 9

# IRQ indices (VFIO_PCI_*_IRQ_INDEX) and VFIO_IRQ_SET_* flags
INTX_IRQ, MSI_IRQ, MSIX_IRQ, ERR_IRQ, REQ_IRQ = range(5)
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

_DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
_REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_CAP_HEADER = struct.Struct("<HHI")  # id, version, next
_SPARSE_MMAP = struct.Struct("<II")  # nr_areas, reserved (after the header)
_SPARSE_AREA = struct.Struct("<QQ")  # offset, size
_IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
_IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, addr, size
_DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, addr, size
_REGION_ACCESS = struct.Struct("<QII")  # offset, region, count

MAX_FDS_PER_MESSAGE = 16
DEFAULT_CAPABILITIES = {
    "capabilities": {"max_msg_fds": MAX_FDS_PER_MESSAGE, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}
}
_INT_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


class VfioUserError(OSError):
    """The server answered a command with an error reply; ``errno`` is its
    ``error_no``, ``command`` the command's number."""

    def __init__(self, err: int, command: int, detail: str = "") -> None:
        name = COMMAND_NAMES.get(command, str(command))
        message = f"vfio-user {name} failed: {os.strerror(err) if err else 'error without errno'}"
        if detail:
            message += f" ({detail})"
        super().__init__(err, message)
        self.command = command


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""


@dataclass
class Reply:
    msg_id: int
    command: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceInfo:
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class SparseArea:
    offset: int
    size: int


@dataclass
class RegionInfo:
    """struct vfio_region_info plus what came with it.  ``fd`` is the fd the
    server sent for an mmap-able region (owned by the client), or -1."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    sparse_areas: list[SparseArea]
    fd: int = -1

    @property
    def mmap(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    argsz: int
    flags: int
    index: int
    count: int


def _ancillary_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    return fds


class VfioUserClient:
    """An asynchronous vfio-user client on one connection.

    Create it with :meth:`connect`; commands are serialised (one in flight).
    """

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self._sock = sock
        self.path = path
        self._lock = trio.Lock()
        self._next_id = 0
        self._owned_fds: list[int] = []
        self.server_version: tuple[int, int] | None = None
        self.server_capabilities: dict = {}
        self.closed = False

    # -- connection ------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        capabilities: dict | None = None,
        major: int = VERSION_MAJOR,
        minor: int = VERSION_MINOR,
    ) -> "VfioUserClient":
        """Connect and negotiate the version.

        libvfio-user (0b28d20) accepts a connection and then reads the
        client's VERSION with a *blocking* recv; its listen backlog is 0, so
        a connect can also block until the server accepts the previous
        connection.  With the server running on this trio thread, either
        would hang the test, so the connect and the VERSION send happen
        together in a worker thread; only the reply is awaited here.
        """
        caps = DEFAULT_CAPABILITIES if capabilities is None else capabilities
        payload = struct.pack("<HH", major, minor)
        if caps is not None:
            payload += json.dumps(caps, separators=(",", ":")).encode() + b"\0"
        msg_id = 0
        message = HEADER.pack(msg_id, VFIO_USER_VERSION, HEADER_SIZE + len(payload), FLAG_TYPE_COMMAND, 0) + payload
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

        def connect_and_send() -> None:
            raw.connect(path)
            raw.sendall(message)

        try:
            await trio.to_thread.run_sync(connect_and_send, abandon_on_cancel=True)
            client = cls(trio.socket.from_stdlib_socket(raw), path)
        except BaseException:
            raw.close()
            raise
        client._next_id = msg_id + 1
        try:
            reply = await client._receive_reply(msg_id, VFIO_USER_VERSION)
            client._version_reply(reply)
        except BaseException:
            client.close()
            raise
        return client

    def _version_reply(self, reply: Reply) -> None:
        self._close_fds(reply.fds)
        if len(reply.payload) < 4:
            raise ProtocolError(f"VERSION reply of {len(reply.payload)} bytes")
        self.server_version = struct.unpack_from("<HH", reply.payload)
        text = reply.payload[4:]
        if text:
            if not text.endswith(b"\0"):
                raise ProtocolError("VERSION reply JSON is not NUL-terminated")
            self.server_capabilities = json.loads(text[:-1])

    def close(self) -> None:
        """Close the connection and every fd the server sent.  Idempotent."""
        if not self.closed:
            self.closed = True
            self._sock.close()
        fds, self._owned_fds = self._owned_fds, []
        self._close_fds(fds)

    async def __aenter__(self) -> "VfioUserClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _close_fds(fds: Sequence[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- framing ---------------------------------------------------------------
    def _new_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return msg_id

    async def _send_all(self, data: bytes, fds: Sequence[int]) -> None:
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self._sock.sendmsg([data], ancdata)
        else:
            sent = await self._sock.send(data)
        if sent != len(data):
            # The server reads a payload with one recv(): a split message
            # would be taken for a short read.
            raise ProtocolError(f"only {sent} of {len(data)} bytes sent in one sendmsg")

    async def _recv_exactly(self, n: int, fds: list[int]) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk, ancdata, msg_flags, _ = await self._sock.recvmsg(
                n - len(data), socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
            )
            fds.extend(_ancillary_fds(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError("file descriptors were truncated (MSG_CTRUNC)")
            if not chunk:
                raise ConnectionResetError(_errno.ECONNRESET, "the vfio-user server closed the connection")
            data += chunk
        return bytes(data)

    async def _receive_reply(self, msg_id: int, command: int) -> Reply:
        fds: list[int] = []
        try:
            header = await self._recv_exactly(HEADER_SIZE, fds)
            rid, rcmd, size, flags, error_no = HEADER.unpack(header)
            if size < HEADER_SIZE:
                raise ProtocolError(f"reply size {size} is below the header size")
            payload = await self._recv_exactly(size - HEADER_SIZE, fds) if size > HEADER_SIZE else b""
            if flags & FLAG_TYPE_MASK != FLAG_TYPE_REPLY:
                raise ProtocolError(f"expected a reply, got message type {flags & FLAG_TYPE_MASK}")
            if rid != msg_id:
                raise ProtocolError(f"reply to message {rid}, expected {msg_id}")
            if rcmd != command:
                raise ProtocolError(f"reply for command {rcmd}, expected {command}")
        except BaseException:
            self._close_fds(fds)
            raise
        if flags & FLAG_ERROR:
            self._close_fds(fds)
            raise VfioUserError(error_no, command)
        return Reply(rid, rcmd, flags, error_no, payload, fds)

    async def request(self, command: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                      flags: int = FLAG_TYPE_COMMAND, size: int | None = None) -> Reply:
        """Send one command and return its reply (raises VfioUserError on an
        error reply).  ``size`` overrides the header's size field (to send
        malformed messages).  The fds of the reply are the caller's."""
        if self.closed:
            raise ProtocolError("the client is closed")
        async with self._lock:
            msg_id = self._new_id()
            total = HEADER_SIZE + len(payload) if size is None else size
            await self._send_all(HEADER.pack(msg_id, command, total, flags, 0) + payload, fds)
            return await self._receive_reply(msg_id, command)

    # -- raw bytes, for clients that misbehave ------------------------------------
    def fileno(self) -> int:
        return self._sock.fileno()

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (a partial message, a message in pieces)."""
        view = memoryview(data)
        while view:
            view = view[await self._sock.send(view):]

    async def receive_raw(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` of whatever the server sends next; b"" when it
        closed the connection."""
        try:
            return await self._sock.recv(max_bytes)
        except ConnectionResetError:
            return b""

    async def send_until_full(self, message: bytes, count: int) -> int:
        """Send ``message`` up to ``count`` times without reading a reply,
        until the socket takes no more; returns how many went out (the last
        one begun is finished, so that every message is whole)."""
        raw = socket.socket(fileno=os.dup(self._sock.fileno()))
        try:
            raw.setblocking(False)
            sent = 0
            while sent < count:
                view = memoryview(message)
                try:
                    n = raw.send(view)
                except BlockingIOError:
                    break
                view = view[n:]
                while view:  # a message begun is finished
                    await trio.lowlevel.wait_writable(self._sock)
                    try:
                        view = view[raw.send(view):]
                    except BlockingIOError:
                        continue
                sent += 1
                if sent % 256 == 0:
                    await trio.lowlevel.checkpoint()
            return sent
        finally:
            raw.close()  # the dup only; trio's socket is non-blocking already

    async def _simple(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        reply = await self.request(command, payload, fds)
        if reply.fds:
            self._close_fds(reply.fds)
            raise ProtocolError(f"{COMMAND_NAMES[command]} reply came with {len(reply.fds)} unexpected fds")
        return reply.payload

    # -- device information ------------------------------------------------------
    async def device_info(self) -> DeviceInfo:
        payload = await self._simple(VFIO_USER_DEVICE_GET_INFO, _DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0))
        return DeviceInfo(*_DEVICE_INFO.unpack_from(payload))

    async def region_info(self, index: int, *, argsz: int = 512) -> RegionInfo:
        """DEVICE_GET_REGION_INFO; ``argsz`` large enough for the capability
        chain (the server sends the region's fd only with it)."""
        reply = await self.request(
            VFIO_USER_DEVICE_GET_REGION_INFO, _REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
        )
        self._owned_fds.extend(reply.fds)
        payload = reply.payload
        if len(payload) < _REGION_INFO.size:
            raise ProtocolError(f"region info reply of {len(payload)} bytes")
        r_argsz, flags, r_index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        areas: list[SparseArea] = []
        if flags & VFIO_REGION_INFO_FLAG_CAPS:
            at = cap_offset
            seen = set()
            while at and at not in seen:
                seen.add(at)
                cap_id, _version, nxt = _CAP_HEADER.unpack_from(payload, at)
                if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    nr_areas, _ = _SPARSE_MMAP.unpack_from(payload, at + _CAP_HEADER.size)
                    base = at + _CAP_HEADER.size + _SPARSE_MMAP.size
                    for i in range(nr_areas):
                        areas.append(SparseArea(*_SPARSE_AREA.unpack_from(payload, base + i * _SPARSE_AREA.size)))
                at = nxt
        if len(reply.fds) > 1:
            raise ProtocolError(f"region {index}: {len(reply.fds)} fds for one region")
        return RegionInfo(r_argsz, flags, r_index, cap_offset, size, offset, areas,
                          reply.fds[0] if reply.fds else -1)

    async def irq_info(self, index: int) -> IrqInfo:
        payload = await self._simple(VFIO_USER_DEVICE_GET_IRQ_INFO, _IRQ_INFO.pack(_IRQ_INFO.size, 0, index, 0))
        return IrqInfo(*_IRQ_INFO.unpack_from(payload))

    # -- interrupts ----------------------------------------------------------------
    async def set_irqs(self, index: int, start: int, count: int, flags: int,
                       fds: Sequence[int] = (), data: bytes = b"") -> None:
        argsz = _IRQ_SET.size + len(data) + 4 * len(fds)
        await self._simple(VFIO_USER_DEVICE_SET_IRQS, _IRQ_SET.pack(argsz, flags, index, start, count) + data, fds)

    async def set_msix_eventfds(self, fds: Sequence[int], start: int = 0) -> None:
        """Give the server one eventfd per MSI-X vector, from ``start``."""
        await self.set_irqs(MSIX_IRQ, start, len(fds),
                            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, fds)

    async def disable_msix(self) -> None:
        """Take every MSI-X eventfd back (QEMU does this when the guest
        disables MSI-X)."""
        await self.set_irqs(MSIX_IRQ, 0, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER)

    # -- regions ---------------------------------------------------------------
    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        payload = await self._simple(VFIO_USER_REGION_READ, _REGION_ACCESS.pack(offset, region, count))
        r_offset, r_region, r_count = _REGION_ACCESS.unpack_from(payload)
        data = payload[_REGION_ACCESS.size:]
        if (r_offset, r_region, r_count) != (offset, region, count) or len(data) != count:
            raise ProtocolError(
                f"REGION_READ reply ({r_region}, {r_offset:#x}, {r_count}, {len(data)} bytes) "
                f"for ({region}, {offset:#x}, {count})"
            )
        return data

    async def region_write(self, region: int, offset: int, data: bytes) -> None:
        payload = await self._simple(VFIO_USER_REGION_WRITE, _REGION_ACCESS.pack(offset, region, len(data)) + bytes(data))
        r_offset, r_region, r_count = _REGION_ACCESS.unpack_from(payload)
        if (r_offset, r_region, r_count) != (offset, region, len(data)):
            raise ProtocolError(f"REGION_WRITE reply ({r_region}, {r_offset:#x}, {r_count})")

    async def region_read_int(self, region: int, offset: int, size: int) -> int:
        return struct.unpack(_INT_FORMATS[size], await self.region_read(region, offset, size))[0]

    async def region_write_int(self, region: int, offset: int, size: int, value: int) -> None:
        await self.region_write(region, offset, struct.pack(_INT_FORMATS[size], value))

    async def config_read(self, offset: int, count: int) -> bytes:
        return await self.region_read(CONFIG_REGION, offset, count)

    async def config_write(self, offset: int, data: bytes) -> None:
        await self.region_write(CONFIG_REGION, offset, data)

    async def config_read_int(self, offset: int, size: int) -> int:
        return await self.region_read_int(CONFIG_REGION, offset, size)

    async def config_write_int(self, offset: int, size: int, value: int) -> None:
        await self.region_write_int(CONFIG_REGION, offset, size, value)

    async def bar_read(self, bar: int, offset: int, count: int) -> bytes:
        return await self.region_read(bar, offset, count)

    async def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        await self.region_write(bar, offset, data)

    async def bar_read_int(self, bar: int, offset: int, size: int) -> int:
        return await self.region_read_int(bar, offset, size)

    async def bar_write_int(self, bar: int, offset: int, size: int, value: int) -> None:
        await self.region_write_int(bar, offset, size, value)

    # -- DMA ---------------------------------------------------------------------
    async def dma_map(self, iova: int, size: int, fd: int, offset: int = 0, prot: int = DMA_RW) -> None:
        """Map ``size`` bytes of ``fd`` from ``offset`` at guest address
        ``iova`` (QEMU: shared guest RAM).  The fd stays the caller's."""
        await self._simple(VFIO_USER_DMA_MAP, _DMA_MAP.pack(_DMA_MAP.size, prot, offset, iova, size), [fd])

    async def dma_map_no_fd(self, iova: int, size: int, prot: int = DMA_RW) -> None:
        """A mapping without an fd (QEMU: guest RAM without share=on, ROMs,
        the device's own BARs): the server must use DMA_READ/WRITE or know
        the memory some other way."""
        await self._simple(VFIO_USER_DMA_MAP, _DMA_MAP.pack(_DMA_MAP.size, prot, 0, iova, size))

    async def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        payload = await self._simple(VFIO_USER_DMA_UNMAP, _DMA_UNMAP.pack(_DMA_UNMAP.size, flags, iova, size))
        if len(payload) < _DMA_UNMAP.size:
            raise ProtocolError(f"DMA_UNMAP reply of {len(payload)} bytes")

    async def dma_unmap_all(self) -> None:
        await self.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL)

    # -- reset -----------------------------------------------------------------
    async def reset(self) -> None:
        """DEVICE_RESET (QEMU sends it at start and on guest reboot)."""
        await self._simple(VFIO_USER_DEVICE_RESET)
