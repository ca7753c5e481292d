"""The device server: vfio-user endpoints, memory backends, control plane.

One trio task per device waits on its vfio-user socket, lets libvfio-user
handle the client's messages (``VfuContext.run``), then processes the
virtqueue; the QMP server runs beside them.  All of that runs on the trio
thread, so guest-memory views are never used across a DMA unmap.  The one
exception is the hole punching of unplugged memory: a second task per device
hands it to a worker thread after the UNPLUG is answered (vmem/_discard.py); that
thread touches only the backend's fd, never guest memory.
"""

from __future__ import annotations

import logging
import os

import trio

from vfiouser_vmem.errors import ConfigError, DiscardFailed, PreallocFailed
from vfiouser_vmem.server._config import DeviceConfig
from vfiouser_vmem.util.sizes import format_size
from vfiouser_vmem.util.sockets import claim_socket_path, uid_allowed
from vfiouser_vmem.vfio_user import (
    CAP_FLAG_READONLY,
    PROT_READ,
    ConnectionLost,
    DmaRegion,
    IrqType,
    MessageState,
    PciType,
    Region,
    RegionFlag,
    ResetType,
    VfuContext,
    VfuError,
)
from vfiouser_vmem.virtio import DeviceMemory, _pci as vp
from vfiouser_vmem.vmem import (
    ClientConnected,
    ClientDisconnected,
    DiscardQueue,
    HostMemory,
    MemoryBackend,
    MemoryBackendConfig,
    PlugPolicy,
    RangeState,
    Reset,
    Scrubber,
    ScrubFinding,
    UnpluggedMemoryFound,
    VirtioMemDevice,
    allocated_extents,
    open_backend,
    small_block_size_warning,
)

log = logging.getLogger("vfiouser_vmem.server")

#: Deferred discards run in chunks of this much (or of the backend's page size
#: if larger): a PLUG racing a discard of the same range waits for at most one
#: chunk, about 6 ms for touched memory here (docs/discard.md).
DISCARD_CHUNK_BYTES = 32 << 20


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the parenthesised command name
    (state first), None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_identity(pid: int | None, fields: list[str] | None = None) -> tuple[int, str] | None:
    """(pid, start time from /proc/PID/stat, field 22): a process, not just a
    pid that may be reused; None when it does not exist.  ``fields``: that
    file's fields, already read (_process_stat)."""
    if not pid:
        return None
    fields = _process_stat(pid) if fields is None else fields
    return None if fields is None else (pid, fields[19])


class DeviceLog(logging.LoggerAdapter):
    """A device's log: every record carries ``device`` (its id) and
    ``client`` (the number of the vfio-user client it serves, or None), for
    the structured log formats (cli/_logging.py)."""

    def __init__(self, logger: logging.Logger, server: DeviceServer) -> None:
        super().__init__(logger, {})
        self._server = server

    def process(self, msg, kwargs):
        server = self._server
        fields = {"device": server.config.id, "client": server.clients_total if server.connected else None}
        kwargs["extra"] = {**fields, **(kwargs.get("extra") or {})}
        return msg, kwargs


class DeviceServer(HostMemory):
    """One virtio-mem PCI function on one vfio-user socket.

    It is the model's ``HostMemory``: discards are queued on the backend
    and done after the answer (DiscardQueue)."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.clients_total = 0
        self.connected = False
        self.client_at_stop = False
        #: Set when the operator asks a stopping server to stop at once (a
        #: second SIGTERM/SIGINT): close() then skips the discards left.
        self.hurry = False
        self.log = DeviceLog(log, self)
        self.bar_size = vp.memory_bar_size(config.size_bytes)
        self.backend: MemoryBackend
        if config.backend is not None:
            self.backend = config.backend
            if self.backend.size_bytes < config.size_bytes:
                raise ConfigError(f"{config.id}: the backend holds {format_size(self.backend.size_bytes)}, "
                                  f"the device needs {format_size(config.size_bytes)}")
        else:
            assert config.memory_backend is not None
            self._check_backend_settings(config.memory_backend)
            self.backend = open_backend(config.memory_backend, device=config.id)
        if (warning := small_block_size_warning(config.block_size_bytes, self.backend.page_size_bytes)):
            self.log.warning("%s: %s", config.id, warning)
        #: prealloc=on: PLUGs answered BUSY because the backend had no memory
        #: (metrics), and whether that is happening now (one log line per episode).
        self.prealloc_failures_total = 0
        self._prealloc_failing = False
        #: Accesses to the BAR past the device's size (not host-backed): logged once per client.
        self._tail_access_logged = False
        #: Fault injection (QOM property x-fail-discards): this many of the
        #: next discards fail, so that the guest's BUSY path can be tested.
        self.fail_discards = 0
        #: Resets seen, by kind (DEVICE, LOST_CONN, PCI_FLR): metrics.
        self.resets_total: dict[str, int] = {t.name: 0 for t in ResetType}
        #: The other devices of this process (serve() sets it): a QEMU with
        #: several of them DMA-maps each one's memory BAR to all of them.
        self.siblings: list[DeviceServer] = []
        #: uids besides root's and the server's own that may connect
        #: (``--allow-uid``; serve() sets it); None: whoever the socket's
        #: mode lets in.
        self.allowed_uids: frozenset[int] | None = None
        #: True while a system reset unplugs everything: its discards are
        #: queued even while earlier ones fail (a reset cannot answer BUSY).
        self._resetting = False
        self.discards = DiscardQueue(
            self._discard_now,
            chunk_bytes=max(DISCARD_CHUNK_BYTES, self.backend.page_size_bytes),
            name=config.id,
        )
        #: Moves whenever the host side changes the backend on the trio
        #: thread (a PLUG's claim, an UNPLUG's discard, a preallocation): a
        #: scrub scan that ran across a change is not trusted (vmem/_scrub.py).
        self._host_epoch = 0
        #: Host memory found in unplugged blocks (docs/scrub.md): bytes, episodes.
        self.unplugged_found_bytes_total = 0
        self.unplugged_reclaimed_bytes_total = 0
        self.unplugged_episodes_total = 0
        self._reported: tuple[tuple[tuple[int, int], ...], int] = ((), 0)
        self._disconnect_reason: str | None = None
        #: (pid, start time) of a client disconnected for unplugged access
        #: while it may still run and map the backend; None: no quarantine.
        #: QOM ``unplugged-quarantine`` shows the pid; setting it to 0 lifts it.
        self.quarantine: tuple[int, str] | None = None
        #: The attached client's pid (SO_PEERCRED at connect), for the hold below.
        self._client_pid: int | None = None
        #: A lost connection's reset waits (the client still maps the
        #: device's memory, _hold_lost_connection): done when it exits,
        #: unmaps, or the quarantine is lifted.
        self._reset_held = False
        self._nursery: trio.Nursery | None = None
        try:
            self.model = VirtioMemDevice(
                region_size_bytes=config.size_bytes,
                block_size_bytes=config.block_size_bytes,
                requested_size_bytes=config.requested_size_bytes,
                node_id=config.node,
                page_size_bytes=self.backend.page_size_bytes,
                name=config.id,
                host_memory=self,
                policy=config.policy,
            )
            self.scrubber = Scrubber(
                name=config.id,
                scan=lambda: allocated_extents(self.backend.fd, 0, config.size_bytes),
                bitmap=self.model.bitmap,
                block_size_bytes=self.model.block_size,
                idle=self.discards.wait_idle,
                epoch=lambda: self._host_epoch,
                found=self._unplugged_memory_found,
                interval_s=config.scrub_interval_s,
                allocated=None if getattr(self.backend, "extents_exact", True) else self.backend.allocated_bytes,
            )
            self.model.size_listeners.append(lambda _size: self.scrubber.size_changed())
            claim_socket_path(config.socket)
            vfu_log = DeviceLog(logging.getLogger(f"vfiouser_vmem.vfu.{config.id}"), self)
            try:
                self.ctx = VfuContext(config.socket, logger=vfu_log)
            except VfuError as exc:
                raise VfuError(exc.errno, f"{config.id}: {exc.strerror}") from None
        except BaseException:
            self.backend.close()
            raise
        try:
            os.chmod(config.socket, 0o600)
            self._setup_pci()
        except BaseException:
            self.close()
            raise

    def _check_backend_settings(self, backend: MemoryBackendConfig) -> None:
        """Rules that need the device and its backend together."""
        if self.config.prealloc or backend.policy == "default":
            return
        if backend.is_hugetlb:
            raise ConfigError(
                f"device {self.config.id!r}: policy {backend.policy} on the huge pages of {backend.where} needs "
                "prealloc=on on the device: hugetlbfs keeps no NUMA policy on the file, so pages QEMU faults "
                "in would ignore it; with prealloc=on the server allocates every plugged block under it")

    def _setup_pci(self) -> None:
        ctx = self.ctx
        ctx.pci_init(PciType.CONVENTIONAL, vp.PCI_REVISION_MODERN)
        ctx.set_pci_id(vp.PCI_VENDOR_ID_REDHAT_QUMRANET, vp.pci_device_id(self.model),
                       vp.PCI_VENDOR_ID_REDHAT_QUMRANET, vp.PCI_SUBSYSTEM_ID_QEMU)
        ctx.set_pci_class(vp.PCI_CLASS_OTHERS, 0, 0)
        cfg = ctx.config_space()
        # BAR2 is a 64-bit prefetchable memory BAR; BAR3 is its upper half
        # (libvfio-user patch 0002 keeps these type bits).
        bar2 = vp.PCI_BASE_ADDRESS_0 + 4 * Region.BAR2
        cfg[bar2:bar2 + 4] = (vp.PCI_BASE_ADDRESS_MEM_TYPE_64 | vp.PCI_BASE_ADDRESS_MEM_PREFETCH).to_bytes(4, "little")
        ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, self._bar0_access, RegionFlag.RW | RegionFlag.MEM,
                         fast_notify=(vp.NOTIFY_OFFSET, vp.NOTIFY_OFF_MULTIPLIER * vp.NUM_QUEUES))
        ctx.setup_region(Region.BAR1, vp.BAR1_SIZE, self._bar1_access, RegionFlag.RW | RegionFlag.MEM)
        # Only the device's size is mmap-able (VFIO_REGION_INFO_CAP_SPARSE_MMAP):
        # the power-of-two BAR's part past it is not host-backed, and a
        # guest's access there traps to _bar2_access instead of finding
        # host memory, or a SIGBUS past the end of the file (docs/backends.md).
        ctx.setup_region(Region.BAR2, self.bar_size, self._bar2_access, RegionFlag.RW | RegionFlag.MEM,
                         fd=self.backend.fd, mmap_areas=[(0, self.config.size_bytes)])
        msix_at = ctx.add_capability(
            vp.msix_cap(vp.MSIX_VECTORS, Region.BAR1, vp.MSIX_TABLE_OFFSET, Region.BAR1, vp.MSIX_PBA_OFFSET)
        )
        for cap in (
            vp.virtio_pci_cap(vp.VIRTIO_PCI_CAP_COMMON_CFG, 0, vp.COMMON_CFG_OFFSET, vp.COMMON_CFG_SIZE),
            vp.virtio_pci_cap(vp.VIRTIO_PCI_CAP_ISR_CFG, 0, vp.ISR_OFFSET, vp.ISR_SIZE),
            vp.virtio_pci_cap(vp.VIRTIO_PCI_CAP_DEVICE_CFG, 0, vp.DEVICE_CFG_OFFSET, self.model.config_size),
            vp.virtio_pci_cap(vp.VIRTIO_PCI_CAP_NOTIFY_CFG, 0, vp.NOTIFY_OFFSET,
                              vp.NOTIFY_OFF_MULTIPLIER * vp.NUM_QUEUES,
                              vp.NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little")),
        ):
            ctx.add_capability(cap, flags=CAP_FLAG_READONLY)
        ctx.setup_irqs(IrqType.MSIX, vp.MSIX_VECTORS)
        self.transport = vp.VirtioPciTransport(
            self.model,
            config_space=ctx.config_space,
            trigger=ctx.irq_trigger,
            memory_bar_index=Region.BAR2,
            msix_cap_offset=msix_at,
            name=self.config.id,
        )
        # The guest's notify write is served in C inside the write, with its
        # interrupt raised before the reply, while the transport arms it
        # (docs/request-path.md).
        if (notify_serve := self.transport.notify_serve_address) is not None:
            ctx.set_notify_serve(*notify_serve)
        # And the device configuration reads the driver makes after each
        # resize (csrc/vmem_config.h), while the transport says so.
        if (fast_read := self.transport.fast_read_address) is not None:
            ctx.set_fast_read(*fast_read)
        ctx.on_reset = self._reset
        ctx.on_dma_register = self._dma_register
        ctx.on_dma_unregister = self._dma_unregister
        ctx.realize()
        # A discard failing (or working again) changes whether an UNPLUG
        # may be answered ACK in C.
        self.discards.on_failure_change = self.update_notify_serve

    def resize(self, requested_size_bytes: int) -> None:
        """Ask the guest for a new size (QMP ``qom-set ... requested-size``,
        ``Device.resize``): refused with TypeError or ConfigError as QEMU
        would, else the guest gets a config interrupt."""
        old = self.model.requested_size
        self.model.set_requested_size(requested_size_bytes)
        self.log.info("%s: requested-size %s -> %s", self.config.id, format_size(old),
                      format_size(requested_size_bytes))

    def set_policy(self, policy: PlugPolicy | None) -> None:
        """Install (or, with None, remove) the device's plug policy; the C
        request paths are re-armed for it at once."""
        self.model.policy = policy
        self.update_notify_serve()

    # -- the model's HostMemory ---------------------------------------------
    def discard_refused(self) -> bool:
        # Like QEMU answering a failed discard BUSY: the guest retries later,
        # and unreturned memory does not pile up meanwhile.  A reset cannot
        # answer BUSY: its discards are queued anyway.
        return self.discards.failure is not None and not self._resetting

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        """Queued, done after the answer (vmem/_discard.py)."""
        self._host_epoch += 1
        if self.discard_refused():
            raise DiscardFailed(f"an earlier discard failed and is being retried ({self.discards.failure})")
        # The worker is woken after the answer: serve_requests().
        self.discards.submit(offset_bytes, length_bytes, wake=False)

    def claim(self, offset_bytes: int, length_bytes: int) -> None:
        self._host_epoch += 1
        self.discards.claim(offset_bytes, length_bytes)
        if self.config.prealloc:
            self._populate(offset_bytes, length_bytes)

    def claim_due(self) -> bool:
        # prealloc=on: every PLUG allocates, in Python (the C request path
        # leaves PLUGs alone while this is True).
        return self.config.prealloc or self.discards.claim_due()

    def _populate(self, offset_bytes: int, length_bytes: int) -> None:
        """Allocate a PLUG's blocks before its ACK (QEMU's virtio_mem_set_block_state
        with prealloc): on the trio thread, as QEMU does it under its lock;
        a failure is BUSY for the guest and one WARNING per episode."""
        try:
            self.backend.populate(offset_bytes, length_bytes)  # type: ignore[attr-defined]
        except PreallocFailed as exc:
            self.prealloc_failures_total += 1
            if not self._prealloc_failing:
                self._prealloc_failing = True
                self.log.warning("%s: prealloc=on: %s; PLUGs are answered BUSY until the host has the memory "
                                 "(the guest retries)", self.config.id, exc)
            raise
        if self._prealloc_failing:
            self._prealloc_failing = False
            self.log.info("%s: prealloc=on: PLUGs are allocated again (%d answered BUSY so far)",
                          self.config.id, self.prealloc_failures_total)

    def _discard_now(self, offset_bytes: int, length_bytes: int) -> None:
        """Punch the hole (a worker thread of the DiscardQueue)."""
        if self.fail_discards > 0:
            self.fail_discards -= 1
            raise DiscardFailed(f"injected discard failure (x-fail-discards, {self.fail_discards} left)")
        self.backend.discard(offset_bytes, length_bytes)

    # -- scrubbing (docs/scrub.md) ---------------------------------------
    def _unplugged_memory_found(self, finding: ScrubFinding) -> None:
        """A scrub pass found host memory in unplugged blocks: one episode,
        handled as ``unplugged-access`` says."""
        action = self.config.unplugged_access
        if action == "report" and (finding.ranges, finding.bytes) == self._reported:
            return  # the same memory, already reported: not a new episode
        self._reported = (finding.ranges, finding.bytes)
        self.unplugged_episodes_total += 1
        self.unplugged_found_bytes_total += finding.bytes
        bar = self.transport.memory_bar_addr
        ranges = tuple((bar + offset, length) for offset, length in finding.ranges)
        shown = ", ".join(f"{format_size(n)} at {gpa:#x}-{gpa + n:#x}" for gpa, n in ranges[:8])
        more = f" and {len(ranges) - 8} more range(s)" if len(ranges) > 8 else ""
        where = "guest physical" if bar else "BAR offsets (no BAR address yet)"
        then = {"reclaim": "given back to the host",
                "report": "left as it is (unplugged-access=report)",
                "disconnect": "given back to the host; the vfio-user client is disconnected "
                              "(unplugged-access=disconnect)" if self.connected else
                              "given back to the host (unplugged-access=disconnect; no client connected)"}[action]
        if finding.located:
            self.log.warning("%s: host memory in unplugged blocks: %s in %d range(s) (%s: %s%s); %s",
                             self.config.id, format_size(finding.bytes), len(ranges), where, shown, more, then)
        else:
            self.log.warning("%s: host memory in unplugged blocks: %s more than the plugged size, somewhere in "
                             "the %d unplugged range(s) (%s: %s%s; this backend cannot say where: "
                             "docs/scrub.md); %s", self.config.id, format_size(finding.bytes), len(ranges), where,
                             shown, more, then)
        if action in ("reclaim", "disconnect"):
            for offset, length in finding.ranges:
                self.discards.submit(offset, length)
            self.unplugged_reclaimed_bytes_total += finding.bytes
            # Discards are queued now: the C request path must leave PLUGs
            # to Python (claim) until they are done, or a PLUG of these
            # blocks would be answered and then punched under the guest.
            self.update_notify_serve()
        if self.model.observers:
            self.model.observers.emit(UnpluggedMemoryFound(self.config.id, ranges, finding.bytes, action,
                                                           finding.located))
        if action == "disconnect" and self.connected:
            # The server cannot take QEMU's mapping of the BAR away: a QEMU
            # that lives on after the disconnect still maps this backend.
            # Until it exits, no new client is served, or the old guest could
            # reach the next guest's memory (docs/scrub.md).
            creds = self.ctx.client_credentials()
            self.quarantine = _process_identity(creds.pid if creds is not None else None)
            self._disconnect("it put memory into unplugged blocks (unplugged-access=disconnect)")

    def _disconnect(self, why: str) -> None:
        """End the client's connection from another task of this device (the
        scrubber): the task serving it is woken (notify_closing) and drops it
        (_drop_stuck_client), with the lost-connection reset."""
        self._disconnect_reason = why
        trio.lowlevel.notify_closing(self._conn_fd)

    # -- region callbacks (quick: the vCPU waits for the reply) -------------
    def _bar0_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        self.transport.bar0_access(offset, buf, is_write)

    def _bar1_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        self.transport.bar1_access(offset, buf, is_write)

    def _bar2_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        # QEMU's slow path (the BAR not mmap'd, or a QEMU-emulated device
        # reaching into it).  Only plugged memory may be written: a write to
        # unplugged memory would make the host allocate it again.
        end = offset + len(buf)
        size = self.config.size_bytes
        if end > size:
            # The BAR past the device's size: not host memory (not mmap-able,
            # setup_region): reads are zeros and writes are dropped, as for
            # memory that is not there, and the client carries on.
            if not self._tail_access_logged:
                self._tail_access_logged = True
                self.log.warning("%s: %s of %d byte(s) at BAR offset %#x, past the device's %s: %s "
                                 "(logged once per client)", self.config.id, "write" if is_write else "read",
                                 len(buf), offset, format_size(size),
                                 "dropped" if is_write else "reads as zeros")
            inside = max(0, size - offset)
            if inside:
                self._bar2_access(offset, buf[:inside], is_write)
            if not is_write:
                buf[inside:] = bytes(len(buf) - inside)
            return
        bs = self.model.block_size
        first = offset // bs
        if is_write:
            if self.model.bitmap.range_state(first, (end - 1) // bs - first + 1) != RangeState.PLUGGED:
                raise PermissionError(f"write to unplugged memory at offset {offset:#x}")
            self.backend.view[offset:end] = buf
            return
        # Unplugged memory reads as zeros without touching the backend: a
        # read fault on a shmem hole allocates a page, so reading through
        # the backend would let a client make the host allocate the whole
        # device with reads (and it would stay allocated).
        pos = offset
        while pos < end:
            block = pos // bs
            block_end = min(end, (block + 1) * bs)
            if self.model.bitmap.range_state(block, 1) == RangeState.PLUGGED:
                buf[pos - offset:block_end - offset] = self.backend.view[pos:block_end]
            else:
                buf[pos - offset:block_end - offset] = bytes(block_end - pos)
            pos = block_end

    # -- DMA ------------------------------------------------------------
    def _dma_register(self, region: DmaRegion) -> None:
        memory = self.transport.memory
        if region.vaddr:
            # Only what libvfio-user mapped, with the client's protection
            # (vfio_user DmaRegion): touching more, or writing a read-only
            # mapping, would be SIGSEGV for every device of this process.
            view = region.view()
            reachable = len(view) if view is not None else 0
            if view is not None:
                memory.add(region.iova, reachable, view)
            if reachable < region.length:
                why = ("mapped without read access (DMA_MAP prot 0)" if not region.prot & PROT_READ else
                       "not mapped by this server: the DMA_MAP file offset is not page aligned, so "
                       "libvfio-user mapped only whole pages from below it")
                self.log.warning("%s: guest memory %#x-%#x: %s", self.config.id, region.iova + reachable,
                                 region.iova + region.length, why)
                memory.add(region.iova + reachable, region.length - reachable, None, why)
            return
        # QEMU maps the device's own BAR back to us without an fd (docs/design.md,
        # "Memory through the BAR"), and the memory BARs of the other devices of this
        # process too; reach them through our own mapping of their backend.
        for server in (self, *self.siblings):
            bar_addr = server.transport.memory_bar_addr
            # The mmap-able part of the BAR, the device's size (setup_region):
            # what QEMU maps back as guest RAM.
            mapped_end = bar_addr + server.config.size_bytes
            if bar_addr and bar_addr <= region.iova and region.iova + region.length <= mapped_end:
                start = region.iova - bar_addr
                # Only its plugged blocks are touched (csrc/vmem_guest.h).
                device = DeviceMemory(server.model.bitmap, server.model.block_size, start)
                self.transport.memory.add(region.iova, region.length,
                                          server.backend.view[start:start + region.length], device=device)
                return
        why = (f"guest memory {region.iova:#x}-{region.iova + region.length:#x} was mapped without a file "
               "descriptor, so this server cannot reach it: start QEMU with shared guest RAM "
               "(-object memory-backend-memfd,id=ram0,size=...,share=on -machine memory-backend=ram0)")
        # Not an error yet: QEMU also maps its ROMs and the BARs of devices
        # served by other processes without an fd.  Unshared guest RAM is
        # reported when the driver puts its virtqueue there (at DRIVER_OK) or
        # a request lies there, with this message.
        self.log.debug("%s: %s", self.config.id, why)
        self.transport.memory.add(region.iova, region.length, None, why)

    def _dma_unregister(self, region: DmaRegion) -> None:
        self.transport.memory.remove(region.iova, region.length)

    # -- resets ---------------------------------------------------------
    def _reset(self, reset_type: ResetType) -> None:
        if reset_type == ResetType.LOST_CONN and not self.ctx.closing:
            # A client refused while a reset is held (below) ends its
            # connection too: that is not the held guest's reset.
            if self._reset_held or self._hold_lost_connection():
                return
        self.resets_total[reset_type.name] += 1
        if reset_type == ResetType.LOST_CONN:
            self._tail_access_logged = False
        plugged = self.model.plugged_size
        if reset_type == ResetType.LOST_CONN:
            self.transport.memory.clear()
        self._resetting = True
        try:
            self.transport.system_reset()
        finally:
            self._resetting = False
        # libvfio-user's vfu_destroy_ctx (VfuContext.close, which sets
        # ctx.closing) resets the device as a lost connection whether or not
        # a client is there: at stop, only a reset that took a connected
        # client's memory is news.
        at_stop = self.ctx.closing
        if not at_stop or self.client_at_stop:
            self.log.info("%s: %s reset%s: unplugged and discarded %s (the whole %s device is discarded)",
                          self.config.id, reset_type.name, " at stop" if at_stop else "",
                          format_size(plugged) if plugged else "nothing", format_size(self.config.size_bytes))
        # Reset means empty: what the bitmap did not know of (memory the
        # guest put into unplugged blocks) goes too, once the reset's own
        # discards are done.
        self.scrubber.request()
        if self.model.observers:
            self.model.observers.emit(Reset(self.config.id, reset_type.name, plugged))

    def _hold_lost_connection(self) -> bool:
        """Whether a lost connection's reset must wait, and if so, hold it.

        A connection can end while its QEMU runs on: QEMU's vfio-user client
        gives a reply up after ``x-msg-timeout`` and then drops the stream
        when the late reply comes (hw/vfio-user/proxy.c), and a device_del
        closes it too.  That QEMU still maps the memory BAR from the
        backend's fd, and its guest still uses the plugged memory: the reset
        would punch holes under a running guest (measured: its init
        segfaulted and the kernel panicked).  So while the client process
        runs and maps the backend (or its mappings cannot be read, another
        user's process), the device keeps its blocks and takes no new
        client (the quarantine), and the reset runs when that process exits
        or unmaps (``_release_held_reset``).  A QEMU that was killed has
        released its memory before its sockets close (the kernel's do_exit:
        exit_mm before exit_files): its reset is not held."""
        pid = self._client_pid
        if (self.ctx.closing or self.quarantine is not None or pid is None or pid == os.getpid()
                or self.model.plugged_size == 0 or self._nursery is None):
            return False
        fields = _process_stat(pid)
        if fields is None or fields[0] in ("Z", "X") or not self._maps_backend(pid):
            return False
        identity = _process_identity(pid, fields)
        assert identity is not None  # fields were read
        self.quarantine = identity
        self._reset_held = True
        # The connection is gone, and with it every DMA mapping.
        self.transport.memory.clear()
        self.log.warning("%s: vfio-user client %d (pid %d) is gone but its process still runs and maps this "
                         "device's memory: its %s plugged are kept, and the device is reset (and takes a new "
                         "client) once that process exits or unmaps it, or on qom-set unplugged-quarantine 0 "
                         "(docs/reliability.md)", self.config.id, self.clients_total, pid,
                         format_size(self.model.plugged_size))
        self._nursery.start_soon(self._release_when_gone, identity)
        return True

    def _maps_backend(self, pid: int) -> bool:
        """Whether process ``pid`` maps this device's backend (/proc/PID/maps:
        its device and inode); True when that cannot be read."""
        st = os.fstat(self.backend.fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        ino = str(st.st_ino)
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) >= 5 and fields[4] == ino and fields[3] == dev:
                        return True
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return False

    async def _release_when_gone(self, identity: tuple[int, str]) -> None:
        pid = identity[0]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        try:
            while self.quarantine == identity:
                if pidfd is not None:
                    with trio.move_on_after(self.HOLD_RECHECK_S):
                        await trio.lowlevel.wait_readable(pidfd)
                        break  # it exited
                else:
                    await trio.sleep(self.HOLD_RECHECK_S)
                if _process_identity(pid) != identity or not self._maps_backend(pid):
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if self.quarantine == identity:
            self.quarantine = None
            self.log.info("%s: the vfio-user client's process (pid %d) has exited or unmapped this device's "
                          "memory: resetting the device now", self.config.id, pid)
        self._release_held_reset()

    #: How often a held reset looks whether its client unmapped the backend
    #: (its exit is seen at once, through a pidfd).
    HOLD_RECHECK_S = 1.0

    def _release_held_reset(self) -> None:
        """Run the lost connection's reset that ``_hold_lost_connection`` held."""
        if self._reset_held:
            self._reset_held = False
            # Not held again: the operator may lift it while the process runs.
            self._client_pid = None
            self._reset(ResetType.LOST_CONN)
            self.update_notify_serve()
            self.discards.wake()

    def lift_quarantine(self) -> None:
        """``qom-set unplugged-quarantine 0``: serve new clients again; a held
        reset runs now."""
        if self.quarantine is not None:
            self.log.warning("%s: quarantine of the disconnected client (pid %d) lifted (unplugged-quarantine)",
                             self.config.id, self.quarantine[0])
        self.quarantine = None
        self._release_held_reset()

    # -- main loop --------------------------------------------------------
    #: Consecutive failed vfu_run_ctx() calls after which a client is
    #: dropped: its byte stream is most likely out of step with the protocol.
    MAX_CONSECUTIVE_RUN_ERRORS = 8

    async def _accept(self) -> None:
        """Wait for the next client that completes the VERSION handshake."""
        cid = self.config.id
        while True:
            await trio.lowlevel.wait_readable(self.ctx.poll_fd)
            # A connection is pending.  libvfio-user then reads the client's
            # VERSION on a blocking socket (up to 5 s, libvfio-user patch
            # 0005): do that off the trio thread, so that a silent client
            # never holds QMP or the other devices.
            try:
                if await trio.to_thread.run_sync(self.ctx.attach):
                    return
            except VfuError as exc:
                self.log.warning("%s: refused a vfio-user client on %s: %s", cid, self.config.socket, exc)

    #: How long a client may take to send the rest of a message it began,
    #: or to read the replies it has, before it is dropped: QEMU's own
    #: vfio-user client gives up on a reply after 5 s (x-msg-timeout).
    MESSAGE_DEADLINE_S = 5.0
    #: While a message is incomplete, how often to look again (doubling up
    #: to the second figure).  Readiness cannot say it: the socket is
    #: readable as soon as any of it is there.
    _PARTIAL_POLL_S = (0.001, 0.05)

    async def _until_next_message(self, state: MessageState) -> MessageState:
        """Wait, without holding the thread, until ``run()`` may handle the
        next message (MessageState.READY), or the deadline passes (then the
        state the client left it in)."""
        delay_s, max_delay_s = self._PARTIAL_POLL_S
        with trio.move_on_after(self.MESSAGE_DEADLINE_S):
            while state != MessageState.READY:
                if state == MessageState.NO_ROOM:
                    await trio.lowlevel.wait_writable(self.ctx.poll_fd)
                else:
                    await trio.sleep(delay_s)
                    delay_s = min(delay_s * 2, max_delay_s)
                state = self.ctx.next_message()
        return state

    def _end_client(self) -> None:
        """Make sure the client's connection is gone (after an internal
        error): shut it down, let libvfio-user see it (lost-connection reset)."""
        if getattr(self, "_conn_fd", None) is None or self.ctx.poll_fd != self._conn_fd:
            return
        try:
            self._drop_stuck_client("after an internal error")  # wakes the discard worker
        except ConnectionLost:
            pass
        except Exception:
            self.log.exception("%s: could not drop vfio-user client %d", self.config.id, self.clients_total)
            self.discards.wake()

    def _drop_stuck_client(self, why: str) -> None:
        """Drop a client that holds its connection in the middle of a message
        or does not read its replies; libvfio-user then sees a lost
        connection (the lost-connection reset runs, as if it had gone)."""
        self.log.error("%s: dropping vfio-user client %d: %s", self.config.id, self.clients_total, why)
        self._end_connection()
        raise ConnectionLost(why)

    def _end_connection(self) -> None:
        """End the attached client's connection now, whatever it left queued
        (VfuContext.drop_client), and let libvfio-user see it lost."""
        conn_fd = self.ctx.poll_fd
        self.ctx.drop_client()
        # libvfio-user reads end-of-file at once and resets the connection
        # (lost-connection reset: everything unplugged and discarded).
        for _ in range(self.MAX_CONSECUTIVE_RUN_ERRORS):
            if self.ctx.poll_fd != conn_fd:
                break
            try:
                self.ctx.run()
            except ConnectionLost:
                break
            except VfuError:
                continue
        self.discards.wake()

    async def _serve_client(self) -> None:
        cid = self.config.id
        failures = 0
        # The backstop: no blocking read or write of libvfio-user's can
        # take longer than the deadline (it is not expected to block at all).
        self.ctx.bound_io(self.MESSAGE_DEADLINE_S)
        conn_fd = self._conn_fd = self.ctx.poll_fd
        self._disconnect_reason = None
        while True:
            try:
                await trio.lowlevel.wait_readable(conn_fd)
            except trio.ClosedResourceError:
                pass  # _disconnect(): another task of this device ends the client
            if self._disconnect_reason is not None:
                self._drop_stuck_client(self._disconnect_reason)
            # libvfio-user reads a message and sends its reply with blocking
            # calls on this thread, which serves every device and QMP: it
            # gets a message only when all of it has arrived and the reply
            # can go out without waiting (docs/robustness.md).
            state = self.ctx.next_message()
            if state != MessageState.READY:
                state = await self._until_next_message(state)
                if state == MessageState.PARTIAL:
                    self._drop_stuck_client(f"it sent part of a message and not the rest within "
                                            f"{self.MESSAGE_DEADLINE_S:g} s")
                elif state == MessageState.NO_ROOM:
                    self._drop_stuck_client(f"it has not read its replies for {self.MESSAGE_DEADLINE_S:g} s")
            try:
                self.ctx.run()
                failures = 0
            except VfuError as exc:
                # libvfio-user answered the bad message with an error (or could
                # not); the client stays attached unless this keeps happening.
                failures += 1
                self.log.warning("%s: vfio-user message from client %d failed: %s", cid, self.clients_total, exc)
                if failures >= self.MAX_CONSECUTIVE_RUN_ERRORS:
                    self.log.error("%s: dropping client %d after %d failed messages in a row",
                                   cid, self.clients_total, failures)
                    self.ctx.drop_client()
            except ConnectionLost:
                # The lost-connection reset queued the discard of everything.
                self.discards.wake()
                raise
            if self.ctx.poll_fd != conn_fd:
                # libvfio-user closed the connection itself (a stream out of
                # step, a reply it could not send) and said so only as an
                # error, or not at all: the poll fd is the listening one now.
                self.discards.wake()
                raise ConnectionLost("libvfio-user closed the connection")
            self.serve_requests()

    def serve_requests(self) -> None:
        """Answer the requests in the virtqueue, then wake the discard
        worker for what they unplugged (and a reset before them queued).

        Notify writes are answered in C (VfuContext fast_notify: the vCPU
        waits for that reply, and entering Python would cost 20-40 us).
        While armed, the C request path served the queue inside the write
        (the bookkeeping is done here); otherwise, or where it stopped for
        Python, the write counted a kick, taken here; a kick taken while
        requests are held stays pending in the transport until they are
        released."""
        try:
            failed = self.ctx.take_notify_irq_error()
            if failed is not None:
                vector, err = failed
                self.transport.interrupt_lost(vector, VfuError(err, f"vfu_irq_trigger({vector}): {os.strerror(err)}"))
            self.transport.serve_kicks(self.ctx.take_kicks() > 0)
        finally:
            self.discards.wake()
        self.update_notify_serve()

    def update_notify_serve(self) -> None:
        """Arm the notify serve and the C answer to device-configuration
        reads for the state the device is in now, or disarm them
        (VirtioPciTransport.arm_c_paths): after each
        vfio-user message, and after anything on this thread that changes
        what they rely on (control commands, the discard worker's failures)."""
        if self.connected:
            self.ctx.notify_armed, self.ctx.reads_armed = self.transport.arm_c_paths()
        else:
            self.ctx.notify_armed = self.ctx.reads_armed = False

    async def run(self) -> None:
        """Serve clients one after the other, and give unplugged memory back
        meanwhile, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.discards.run)
            nursery.start_soon(self.scrubber.run)
            try:
                await self._serve_clients()
            finally:
                self._nursery = None

    def quarantined(self) -> bool:
        """Whether the client disconnected for unplugged access still runs
        (the same process: its pid and start time)."""
        if self.quarantine is None:
            return False
        if _process_identity(self.quarantine[0]) == self.quarantine:
            return True
        self.log.info("%s: the disconnected vfio-user client (pid %d) has exited: new clients are served again",
                      self.config.id, self.quarantine[0])
        self.quarantine = None
        self._release_held_reset()
        return False

    async def _serve_clients(self) -> None:
        cid = self.config.id
        while True:
            await self._accept()
            if self.quarantined() and (quarantine := self.quarantine) is not None:
                why = ("still maps the plugged memory of its guest (docs/reliability.md)" if self._reset_held
                       else "was disconnected for unplugged access and still runs and maps this device's memory "
                       "(docs/scrub.md)")
                self.log.warning("%s: refusing a vfio-user client: the previous client (pid %d) %s; stop it, or "
                                 "qom-set unplugged-quarantine 0", cid, quarantine[0], why)
                self._end_connection()
                continue
            creds = self.ctx.client_credentials()
            if not uid_allowed(creds, self.allowed_uids):
                # Checked once libvfio-user has accepted the connection and
                # read its VERSION (it accepts inside vfu_attach_ctx): the
                # client has learnt the protocol version and nothing else.
                self.log.warning("%s: refusing a vfio-user client on %s (%s): its uid is not allowed "
                                 "(--allow-uid)", cid, self.config.socket, creds or "credentials unknown")
                self._end_connection()
                continue
            self.clients_total += 1
            self.connected = True
            pid = self._client_pid = creds.pid if creds is not None else None
            self.log.info("%s: vfio-user client %d (%s) connected on %s", cid, self.clients_total,
                          creds or "credentials unknown", self.config.socket)
            observers = self.model.observers
            if observers:
                observers.emit(ClientConnected(cid, self.clients_total, pid))
            reason = "the server stopped"
            try:
                await self._serve_client()
            except ConnectionLost as exc:
                reason = str(exc)
                self.log.info("%s: vfio-user client %d disconnected (%s); waiting for the next one",
                              cid, self.clients_total, exc)
            except Exception:
                # A bug, or a state of libvfio-user's not foreseen: it must
                # not take every other device down with this one.  The
                # client goes; the device waits for the next.
                reason = "internal error"
                self.log.exception("%s: internal error serving vfio-user client %d; dropping it",
                                   cid, self.clients_total)
                self._end_client()
            finally:
                self.connected = False
                # Cancelled (the server stops) with the client still there:
                # close()'s reset is the one that takes its memory.
                self.client_at_stop = reason == "the server stopped"
                if observers:
                    observers.emit(ClientDisconnected(cid, self.clients_total, reason))

    def close(self) -> None:
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.close()
        if self.discards.pending_bytes:
            # QEMU may still map the BAR: give the memory back now rather than
            # when the last mapping goes.
            self.discards.drain_now(stop=lambda: self.hurry)
            if self.discards.pending_bytes:
                # Most of a reset's whole-device discard is holes already:
                # what matters is what the backend still holds.
                held = self.backend.allocated_bytes()
                if held:
                    self.log.warning("%s: stopping at once: %s of the backend not given back to the host; it "
                                     "is freed when the last mapping of it goes (QEMU's, when it exits)",
                                     self.config.id, format_size(held))
                else:
                    self.log.info("%s: stopping at once: the discards left were skipped (the backend holds "
                                  "nothing)", self.config.id)
        self.backend.close()
