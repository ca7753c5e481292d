"""Thin binding to libvfio-user (cffi API mode, module ``_vfu``).

One ``VfuContext`` is one vfio-user server endpoint (a UNIX socket) serving
one PCI function.  The binding adds no policy: it turns C callbacks into
Python callables, C error returns into exceptions with the errno and the
call that failed, and the library's log into the ``logging`` module.

Callbacks run synchronously inside ``run()`` (in ``vfu_run_ctx``), on the
caller's thread.  They must be quick and must not touch guest memory for
long: a region access keeps QEMU's vCPU waiting for the reply (docs/design.md,
"Memory through the BAR": never process the virtqueue inside a region callback; the one
exception is the device's C notify serve below, which never blocks and
needs nothing from the client, docs/request-path.md).

One region may have a notify window (``setup_region(fast_notify=...)``):
writes there are answered in C, without entering Python, and counted;
``take_kicks()`` reads the count after ``run()``.  A device may also give a
C function that serves a notify inside the write (``set_notify_serve``):
while ``notify_armed``, the next notify write calls it instead of counting
a kick (unless it asks for Python).  The binding disarms it after that call
and before every Python callback, so the device re-arms it only when it
knows its state.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vfiouser_vmem._vfu import ffi, lib
from vfiouser_vmem.errors import ConnectionLost, VfuError
from vfiouser_vmem.util.logtext import printable
from vfiouser_vmem.util.sockets import PeerCredentials, peer_credentials

log = logging.getLogger("vfiouser_vmem.vfu")

# syslog levels (libvfio-user logs with them) -> logging levels.
_SYSLOG_TO_LOGGING = {
    0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
    4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG,
}
_LOGGING_TO_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Region(enum.IntEnum):
    BAR0 = lib.VFU_PCI_DEV_BAR0_REGION_IDX
    BAR1 = lib.VFU_PCI_DEV_BAR1_REGION_IDX
    BAR2 = lib.VFU_PCI_DEV_BAR2_REGION_IDX
    BAR3 = lib.VFU_PCI_DEV_BAR3_REGION_IDX
    BAR4 = lib.VFU_PCI_DEV_BAR4_REGION_IDX
    BAR5 = lib.VFU_PCI_DEV_BAR5_REGION_IDX
    ROM = lib.VFU_PCI_DEV_ROM_REGION_IDX
    CONFIG = lib.VFU_PCI_DEV_CFG_REGION_IDX
    VGA = lib.VFU_PCI_DEV_VGA_REGION_IDX
    MIGRATION = lib.VFU_PCI_DEV_MIGR_REGION_IDX


class RegionFlag(enum.IntFlag):
    READ = lib.VFU_REGION_FLAG_READ
    WRITE = lib.VFU_REGION_FLAG_WRITE
    RW = lib.VFU_REGION_FLAG_RW
    MEM = lib.VFU_REGION_FLAG_MEM
    ALWAYS_CB = lib.VFU_REGION_FLAG_ALWAYS_CB


class IrqType(enum.IntEnum):
    INTX = lib.VFU_DEV_INTX_IRQ
    MSI = lib.VFU_DEV_MSI_IRQ
    MSIX = lib.VFU_DEV_MSIX_IRQ
    ERR = lib.VFU_DEV_ERR_IRQ
    REQ = lib.VFU_DEV_REQ_IRQ


class MessageState(enum.IntEnum):
    """What ``VfuContext.next_message`` found on the client's connection."""

    #: All of the next message has arrived (or the connection is at its end)
    #: and its reply can be sent: ``run()`` will not block.
    READY = lib.VMEM_MSG_READY
    #: Part of the next message is still to come.
    PARTIAL = lib.VMEM_MSG_PARTIAL
    #: The client has not read the replies it has: a reply would block.
    NO_ROOM = lib.VMEM_MSG_NO_ROOM


class ResetType(enum.IntEnum):
    #: The client asked for a device reset (QEMU: at start, on guest reboot).
    DEVICE = lib.VFU_RESET_DEVICE
    #: The client's connection is gone (QEMU exited or was killed).
    LOST_CONN = lib.VFU_RESET_LOST_CONN
    #: Function level reset.
    PCI_FLR = lib.VFU_RESET_PCI_FLR


class PciType(enum.IntEnum):
    CONVENTIONAL = lib.VFU_PCI_TYPE_CONVENTIONAL
    EXPRESS = lib.VFU_PCI_TYPE_EXPRESS


PROT_READ, PROT_WRITE = 1, 2  # DMA protections (as mmap's)
CAP_FLAG_READONLY = lib.VFU_CAP_FLAG_READONLY
CAP_FLAG_CALLBACK = lib.VFU_CAP_FLAG_CALLBACK
CAP_FLAG_EXTENDED = lib.VFU_CAP_FLAG_EXTENDED


@dataclass(frozen=True)
class DmaRegion:
    """A DMA mapping the client (QEMU) registered: guest memory at ``iova``.

    ``vaddr`` is where libvfio-user mapped the client's fd in this process,
    or 0 when the client sent no fd (QEMU does that for memory it cannot
    share: guest RAM without ``share=on``, and the device's own BARs).
    ``mapping_start``/``mapping_length`` is the mmap libvfio-user made
    (lib/dma.c dma_map_region: ``round_up(length)`` bytes from the page
    below the file offset), and ``prot`` the client's protection, which
    that mmap has too.
    """

    iova: int
    length: int
    vaddr: int
    prot: int
    mapping_start: int = 0
    mapping_length: int = 0

    @property
    def reachable_bytes(self) -> int:
        """How much of the region, from ``iova`` on, this process has mapped.
        Less than ``length`` when the client's file offset is not page
        aligned: libvfio-user maps ``round_up(length)`` bytes from
        ``round_down(offset)``, so the region's tail is left out."""
        if not self.vaddr:
            return 0
        end = self.mapping_start + self.mapping_length
        return max(0, min(self.length, end - self.vaddr))

    def view(self) -> memoryview | None:
        """The mapped guest memory (``reachable_bytes`` of it), valid until the
        region is unregistered; read-only without PROT_WRITE, None without
        PROT_READ or an fd.  Touching more, or writing a read-only one, is
        SIGSEGV."""
        if not self.vaddr or not self.prot & PROT_READ or not self.reachable_bytes:
            return None
        view = memoryview(ffi.buffer(ffi.cast("char *", self.vaddr), self.reachable_bytes))
        return view if self.prot & PROT_WRITE else view.toreadonly()


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ffi.errno
        raise VfuError(err, f"{what}: {os.strerror(err)}")
    return ret


# A region access callback gets (offset, buffer, is_write); it fills the
# buffer on reads and raises to refuse the access.
RegionAccess = Callable[[int, memoryview, bool], None]


class VfuContext:
    """A libvfio-user context: one socket, one PCI function."""

    def __init__(self, socket_path: str, *, logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.socket_path = socket_path
        self.log = logger or log
        #: Set by close(): libvfio-user's lines from then on are expected noise.
        self.closing = False
        self._handle = ffi.new_handle(self)
        # The context's private pointer: the handle (for the Python
        # callbacks) and the notify fast path's window and kick count (for
        # the C callback, csrc/ffi_vfu.py).  Kept alive as long as self.
        self._private = ffi.new("struct vmem_vfu_private *")
        self._private.handle = self._handle
        self._private.notify_region = -1
        self._region_access: dict[int, RegionAccess] = {}
        self._keepalive: list[object] = []
        self.on_reset: Callable[[ResetType], None] | None = None
        self.on_dma_register: Callable[[DmaRegion], None] | None = None
        self.on_dma_unregister: Callable[[DmaRegion], None] | None = None
        self._config_view: memoryview | None = None
        ctx = lib.vfu_create_ctx(
            lib.VFU_TRANS_SOCK, socket_path.encode(), lib.LIBVFIO_USER_FLAG_ATTACH_NB, self._private,
            lib.VFU_DEV_TYPE_PCI,
        )
        if ctx == ffi.NULL:
            err = ffi.errno
            raise VfuError(err, f"cannot create a vfio-user context on {socket_path}: {os.strerror(err)}")
        self._ctx = ctx
        level = _LOGGING_TO_SYSLOG.get(self.log.getEffectiveLevel(), 6)
        _check(lib.vfu_setup_log(ctx, lib.vfu_py_log, level), "vfu_setup_log")
        _check(lib.vfu_setup_device_reset_cb(ctx, lib.vfu_py_reset), "vfu_setup_device_reset_cb")
        _check(
            lib.vfu_setup_device_dma(ctx, lib.vfu_py_dma_register, lib.vfu_py_dma_unregister), "vfu_setup_device_dma"
        )

    # -- PCI -------------------------------------------------------------
    def pci_init(self, pci_type: PciType = PciType.CONVENTIONAL, revision: int = 0) -> None:
        _check(lib.vfu_pci_init(self._ctx, pci_type, lib.PCI_HEADER_TYPE_NORMAL, revision), "vfu_pci_init")
        self._config_size = 256 if pci_type == PciType.CONVENTIONAL else 4096

    def set_pci_id(self, vendor_id: int, device_id: int, subsys_vendor_id: int, subsys_id: int) -> None:
        lib.vfu_pci_set_id(self._ctx, vendor_id, device_id, subsys_vendor_id, subsys_id)

    def set_pci_class(self, base: int, sub: int, prog_if: int) -> None:
        lib.vfu_pci_set_class(self._ctx, base, sub, prog_if)

    def config_space(self) -> memoryview:
        """The library's copy of config space; QEMU's config reads are served
        from it, and its writes land in it.  Allocated once by vfu_pci_init
        (lib/pci.c), so the view is made once: the device reads it on every
        request (BAR address, MSI-X enable)."""
        if self._config_view is None:
            if self._ctx is None:
                raise VfuError(errno.EBADF, "config_space: the context is closed")
            ptr = ffi.cast("char *", lib.vfu_pci_get_config_space(self._ctx))
            self._config_view = memoryview(ffi.buffer(ptr, self._config_size))
        return self._config_view

    def add_capability(self, data: bytes, *, pos: int = 0, flags: int = 0) -> int:
        """Add a PCI capability (the library links it in); returns its offset."""
        buf = ffi.from_buffer(bytearray(data))
        return _check(lib.vfu_pci_add_capability(self._ctx, pos, flags, buf), "vfu_pci_add_capability")

    # -- regions ---------------------------------------------------------
    def setup_region(
        self,
        region: Region,
        size_bytes: int,
        access: RegionAccess | None,
        flags: RegionFlag,
        *,
        fd: int = -1,
        fd_offset: int = 0,
        mmap_areas: list[tuple[int, int]] | None = None,
        fast_notify: tuple[int, int] | None = None,
    ) -> None:
        """Declare a region; with ``fd`` the whole region is mmap-able by the
        client, or only ``mmap_areas`` ((offset, length) pairs within the
        region, sent as VFIO_REGION_INFO_CAP_SPARSE_MMAP): the client's
        accesses elsewhere come to ``access``.

        ``fast_notify=(offset, length)``: a window of the region (BAR0 only)
        whose writes of 1, 2 or 4 bytes are answered in C and counted for
        ``take_kicks()``, never reaching ``access``; every other access
        (reads, other sizes, writes straddling the window) still goes to
        ``access``.  For the virtio notify register: QEMU's vfio-user client
        sends region writes synchronously, so the guest's vCPU waits for the
        reply, and entering Python costs 20-40 us per write.
        """
        cb = ffi.NULL
        if fast_notify is not None:
            notify_offset, notify_length = fast_notify
            if region != Region.BAR0:
                # The C callback forwards to vfu_py_region0: libvfio-user does
                # not tell a region callback which region it serves.
                raise ValueError(f"fast_notify is supported on BAR0 only, not {region.name}")
            if self._private.notify_region >= 0:
                raise ValueError(
                    f"fast_notify is already set up on {Region(self._private.notify_region).name}: one window only")
            if access is None:
                raise ValueError("fast_notify needs an access callback for the rest of the region")
            if notify_length <= 0 or notify_offset < 0 or notify_offset + notify_length > size_bytes:
                raise ValueError(
                    f"fast_notify window {notify_offset:#x}+{notify_length:#x} is empty or not inside "
                    f"{region.name}'s {size_bytes:#x} bytes")
        if access is not None:
            self._region_access[int(region)] = access
            cb = getattr(lib, f"vfu_py_region{int(region)}")
            if fast_notify is not None:
                cb = ffi.addressof(lib, "vmem_region_fast_notify")
        areas, nr_areas = ffi.NULL, 0
        if mmap_areas is not None:
            if fd < 0 or not mmap_areas:
                raise ValueError("mmap_areas need an fd and at least one area")
            areas = ffi.new("struct iovec[]", len(mmap_areas))
            for i, (area_offset, area_length) in enumerate(mmap_areas):
                if area_offset < 0 or area_length <= 0 or area_offset + area_length > size_bytes:
                    raise ValueError(f"mmap area {area_offset:#x}+{area_length:#x} is empty or not inside "
                                     f"{region.name}'s {size_bytes:#x} bytes")
                areas[i].iov_base = ffi.cast("void *", area_offset)
                areas[i].iov_len = area_length
            nr_areas = len(mmap_areas)
        _check(
            lib.vfu_setup_region(self._ctx, region, size_bytes, cb, int(flags), areas, nr_areas, fd, fd_offset),
            f"vfu_setup_region({region.name}, {size_bytes:#x})",
        )
        if fast_notify is not None:
            # Only now that the C callback is the region's.
            self._private.notify_offset = notify_offset
            self._private.notify_length = notify_length
            self._private.notify_region = int(region)
        elif self._private.notify_region == int(region):
            # The region was declared again without the window: forget it.
            self._private.notify_region = -1
            self._private.notify_length = 0
            self._private.notify_armed = 0
            self._private.notify_serve = ffi.NULL
            self._private.reads_armed = 0
            self._private.fast_read = ffi.NULL

    def take_kicks(self) -> int:
        """Notify writes answered by the fast path since the last call (the
        count is then 0 again).  Call it on the thread that calls ``run()``:
        the C callback counts inside ``vfu_run_ctx``, on that thread, so the
        two never overlap and the counter needs no atomics."""
        kicks = int(self._private.kicks)
        self._private.kicks = 0
        return kicks

    def set_notify_serve(self, fn_address: int, arg_address: int) -> None:
        """The C function (``int fn(void *arg, int *need_python)``, see
        csrc/ffi_vfu.py) that serves a notify write while ``notify_armed``,
        and its argument.  Both are addresses: the caller keeps them valid
        until the context is closed or ``set_notify_serve(0, 0)``.  The
        function returns an MSI-X vector that is then triggered (before the
        reply to the write), or -1."""
        self._set_c_hook("set_notify_serve", "notify_serve", "vmem_notify_serve_fn *", "notify_armed",
                         fn_address, arg_address)

    @property
    def notify_armed(self) -> bool:
        return bool(self._private.notify_armed)

    @notify_armed.setter
    def notify_armed(self, armed: bool) -> None:
        self._arm_c_hook("notify_serve", "notify_armed", armed)

    def set_fast_read(self, fn_address: int, arg_address: int) -> None:
        """The C function (``int fn(void *arg, char *buf, size_t count,
        uint64_t offset)``) tried for every read of the fast_notify region
        while ``reads_armed``: it returns 1 when it answered the read into
        ``buf``, 0 to leave it to the region's Python callback.  Addresses,
        kept valid by the caller as for ``set_notify_serve``."""
        self._set_c_hook("set_fast_read", "fast_read", "vmem_fast_read_fn *", "reads_armed",
                         fn_address, arg_address)

    @property
    def reads_armed(self) -> bool:
        return bool(self._private.reads_armed)

    @reads_armed.setter
    def reads_armed(self, armed: bool) -> None:
        self._arm_c_hook("fast_read", "reads_armed", armed)

    def _set_c_hook(self, what: str, fn_field: str, fn_type: str, armed_field: str,
                    fn_address: int, arg_address: int) -> None:
        """Install a C hook of the fast_notify region (``fn_field`` and its
        ``_arg``), disarmed."""
        if self._private.notify_region < 0:
            raise ValueError(f"{what} needs a fast_notify window (setup_region)")
        setattr(self._private, armed_field, 0)
        setattr(self._private, fn_field, ffi.cast(fn_type, fn_address))
        setattr(self._private, f"{fn_field}_arg", ffi.cast("void *", arg_address))

    def _arm_c_hook(self, fn_field: str, armed_field: str, armed: bool) -> None:
        # Only on the thread that calls run(), between two run() calls; never
        # armed without a function.
        setattr(self._private, armed_field, 1 if armed and getattr(self._private, fn_field) != ffi.NULL else 0)

    def take_notify_irq_error(self) -> tuple[int, int] | None:
        """(vector, errno) of the last interrupt a served notify could not
        trigger since the last call, or None."""
        err = int(self._private.irq_errno)
        if not err:
            return None
        self._private.irq_errno = 0
        return int(self._private.irq_failed_vector), err

    # -- interrupts ------------------------------------------------------
    def setup_irqs(self, irq_type: IrqType, count: int) -> None:
        _check(lib.vfu_setup_device_nr_irqs(self._ctx, irq_type, count), f"vfu_setup_device_nr_irqs({irq_type.name})")

    def irq_trigger(self, vector: int) -> None:
        _check(lib.vfu_irq_trigger(self._ctx, vector), f"vfu_irq_trigger({vector})")

    # -- DMA ---------------------------------------------------------------
    def dma_view(self, iova: int, length: int, *, writable: bool = False) -> memoryview:
        """Guest memory at ``iova`` through libvfio-user's own translation
        (vfu_addr_to_sgl + vfu_sgl_get): a view into the client's mapping,
        valid until the mapping is unregistered.  Raises VfuError when the
        range is not inside one mapping that has an fd."""
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        sg = ffi.new("char[]", lib.dma_sg_size())
        sgl = ffi.cast("dma_sg_t *", sg)
        _check(lib.vfu_addr_to_sgl(self._ctx, ffi.cast("void *", iova), length, sgl, 1, prot),
               f"vfu_addr_to_sgl({iova:#x}, {length:#x})")
        iov = ffi.new("struct iovec *")
        _check(lib.vfu_sgl_get(self._ctx, sgl, iov, 1, 0), f"vfu_sgl_get({iova:#x}, {length:#x})")
        # No dirty-page tracking (no migration): give the sg back at once.
        lib.vfu_sgl_put(self._ctx, sgl, iov, 1)
        return memoryview(ffi.buffer(iov.iov_base, iov.iov_len))

    # -- life cycle ------------------------------------------------------
    def realize(self) -> None:
        _check(lib.vfu_realize_ctx(self._ctx), "vfu_realize_ctx")

    def attach(self) -> bool:
        """Accept a client if one is waiting; False when none is (yet)."""
        if lib.vfu_attach_ctx(self._ctx) == 0:
            return True
        err = ffi.errno
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return False
        raise VfuError(err, f"vfu_attach_ctx: {os.strerror(err)}")

    @property
    def poll_fd(self) -> int:
        """The fd to wait on: the listening socket before ``attach()``, the
        client's connection after."""
        return _check(lib.vfu_get_poll_fd(self._ctx), "vfu_get_poll_fd")

    def run(self) -> int:
        """Handle every message the client has sent; returns how many."""
        ret = lib.vfu_run_ctx(self._ctx)
        if ret >= 0:
            return ret
        err = ffi.errno
        if err in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
            raise ConnectionLost(os.strerror(err))
        raise VfuError(err, f"vfu_run_ctx: {os.strerror(err)}")

    def next_message(self) -> MessageState:
        """Whether ``run()`` may handle the client's next message now: only
        when all of it has arrived and its reply can go out at once, or
        libvfio-user's blocking reads and sends would wait for the client
        on the thread that serves every device (csrc/ffi_vfu.py)."""
        state = lib.vmem_vfu_next_message(self.poll_fd)
        if state < 0:
            raise VfuError(-state, f"cannot look at the next message: {os.strerror(-state)}")
        if state == lib.VMEM_MSG_HUNG_UP:
            # The client hung up part way through a message: the rest never
            # comes, so the deadline would only keep the device's next client
            # out.  Its connection ends here, unread (libvfio-user leaves the
            # fds of a header cut short open), and run() sees it lost at once.
            self.log.info("the vfio-user client hung up in the middle of a message: connection ended")
            self.drop_client()
            return MessageState.READY
        return MessageState(state)

    def bound_io(self, timeout_s: float) -> None:
        """A blocking receive or send on the client's connection gives up
        after ``timeout_s`` (SO_RCVTIMEO/SO_SNDTIMEO): the backstop behind
        ``next_message``, so that nothing can hold the
        thread longer (libvfio-user then drops the client)."""
        conn = socket.socket(fileno=os.dup(self.poll_fd))
        try:
            tv = struct.pack("ll", int(timeout_s), int((timeout_s % 1) * 1_000_000))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        finally:
            conn.close()

    def client_credentials(self) -> PeerCredentials | None:
        """Who the attached client is (SO_PEERCRED), for log lines and
        ``--allow-uid``."""
        return peer_credentials(self.poll_fd)

    def drop_client(self) -> None:
        """End the client's connection now: the next ``run()`` sees it lost
        (reset callback with LOST_CONN, ``ConnectionLost``), as if the client
        had gone away by itself, whatever the client left in the socket.

        The connection's fd is replaced (dup2) by a socket whose peer is
        already closed: libvfio-user's next read gets end-of-file at once,
        however many messages the client had queued, and the client's
        connection is closed with it."""
        conn_fd = self.poll_fd
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            peer.close()
            os.dup2(ours.fileno(), conn_fd, inheritable=False)
        finally:
            ours.close()

    def close(self) -> None:
        if self._config_view is not None:
            try:
                # A use after close then fails in Python, not in freed C memory.
                self._config_view.release()
            except BufferError:
                pass
            self._config_view = None
        if self._ctx is not None:
            # vfu_destroy_ctx resets the device (VFU_RESET_LOST_CONN) and tries
            # to tell a client that is gone or never came ("vfu_reset_ctx:
            # Cannot send after transport endpoint shutdown"): expected at
            # close, so its lines go to debug.
            self.closing = True
            lib.vfu_destroy_ctx(self._ctx)
            self._ctx = None
            # libvfio-user (0b28d20) leaves its socket file behind.
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> VfuContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _context(vfu_ctx) -> VfuContext:
    private = ffi.cast("struct vmem_vfu_private *", lib.vfu_get_private(vfu_ctx))
    return ffi.from_handle(private.handle)


@ffi.def_extern()
def vfu_py_log(vfu_ctx, level, msg):
    try:
        # libvfio-user quotes what the client sent (version strings, JSON):
        # escaped, so that no client can forge or colour a log line.
        text = printable(ffi.string(msg).decode(errors="replace").rstrip())
        ctx = _context(vfu_ctx)
        ctx.log.log(logging.DEBUG if ctx.closing else _SYSLOG_TO_LOGGING.get(level, logging.INFO),
                    "libvfio-user: %s", text)
    except Exception:  # never let a log line take the server down
        log.exception("libvfio-user log callback failed")


@ffi.def_extern()
def vfu_py_reset(vfu_ctx, reset_type):
    ctx = _context(vfu_ctx)
    ctx._private.notify_armed = ctx._private.reads_armed = 0
    # Kicks counted before a reset belong to the virtio state it discards
    # (as transport.kick_pending, which the reset clears); kicks after it,
    # in the same run(), are counted anew.
    ctx._private.kicks = 0
    try:
        if ctx.on_reset is not None:
            ctx.on_reset(ResetType(reset_type))
        return 0
    except Exception:
        ctx.log.exception("reset (%s) failed", ResetType(reset_type).name)
        ffi.errno = errno.EIO
        return -1


def _dma_region(info) -> DmaRegion:
    return DmaRegion(
        iova=int(ffi.cast("uintptr_t", info.iova.iov_base)),
        length=int(info.iova.iov_len),
        vaddr=int(ffi.cast("uintptr_t", info.vaddr)),
        prot=int(info.prot),
        mapping_start=int(ffi.cast("uintptr_t", info.mapping.iov_base)),
        mapping_length=int(info.mapping.iov_len),
    )


@ffi.def_extern()
def vfu_py_dma_register(vfu_ctx, info):
    ctx = _context(vfu_ctx)
    ctx._private.notify_armed = ctx._private.reads_armed = 0
    try:
        if ctx.on_dma_register is not None:
            ctx.on_dma_register(_dma_region(info))
    except Exception:
        ctx.log.exception("DMA register callback failed")


@ffi.def_extern()
def vfu_py_dma_unregister(vfu_ctx, info):
    ctx = _context(vfu_ctx)
    ctx._private.notify_armed = ctx._private.reads_armed = 0
    try:
        if ctx.on_dma_unregister is not None:
            ctx.on_dma_unregister(_dma_region(info))
    except Exception:
        ctx.log.exception("DMA unregister callback failed")




def _make_region_callback(index: int):
    def callback(vfu_ctx, buf, count, offset, is_write):
        ctx = _context(vfu_ctx)
        # Whatever the access changes, a served notify must not rely on the
        # state it was armed with (set_notify_serve).
        ctx._private.notify_armed = ctx._private.reads_armed = 0
        access = ctx._region_access.get(index)
        try:
            if access is None:
                raise ValueError("no handler")
            access(int(offset), memoryview(ffi.buffer(buf, count)), bool(is_write))
            return count
        except Exception as exc:
            # A refused access: the client gets an error reply, nothing changes.
            level = logging.WARNING if isinstance(exc, (ValueError, PermissionError)) else logging.ERROR
            ctx.log.log(
                level,
                "refused %s of %d bytes at %s+%#x: %s",
                "write" if is_write else "read",
                count,
                Region(index).name,
                offset,
                exc,
                exc_info=level == logging.ERROR,
            )
            ffi.errno = errno.EINVAL
            return -1

    callback.__name__ = f"vfu_py_region{index}"
    ffi.def_extern(name=callback.__name__)(callback)


for _index in range(lib.VFU_PCI_DEV_NUM_REGIONS):
    _make_region_callback(_index)
