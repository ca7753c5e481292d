"""The process-level server: devices, QMP and metrics run together.

``open_server`` starts devices in-process and hands back a ``Server`` to
hold them; ``serve`` is what ``vfiouser-vmem serve`` runs (open_server
until SIGTERM or SIGINT).  docs/api.md shows both in use.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from vfiouser_vmem import __version__
from vfiouser_vmem.control import QEMU_VERSION, MetricsExporter, MonitorServer, QmpServer
from vfiouser_vmem.server._config import DeviceConfig
from vfiouser_vmem.server._device_server import DeviceServer
from vfiouser_vmem.server._qom import ControlledVmem
from vfiouser_vmem.util.sdnotify import Notifier
from vfiouser_vmem.util.sockets import check_socket_directory
from vfiouser_vmem.vmem import ClientConnected, ClientDisconnected, DeviceEvent, PlugPolicy, VirtioMemDevice

__all__ = ["STOP_SIGNALS", "Device", "Server", "open_server", "serve", "service_status", "share_socket_with_group"]

log = logging.getLogger("vfiouser_vmem.server")

E = TypeVar("E", bound=DeviceEvent)


class Device:
    """A running device, as a program that embeds the server holds it.

    Reads are the device's state now; ``resize`` is QMP's ``qom-set ID
    requested-size``; ``subscribe`` hears the device's events
    (``vfiouser_vmem.DeviceEvent``) on the server's trio thread, after the
    guest got its answers."""

    def __init__(self, server: DeviceServer) -> None:
        self._server = server
        self.id = server.config.id
        self.config = server.config

    def __repr__(self) -> str:
        return (f"<Device {self.id}: plugged {self.plugged_size} of requested {self.requested_size} "
                f"(max {self.max_size}, block {self.block_size})>")

    @property
    def model(self) -> VirtioMemDevice:
        """The device model (read it; change it through this class)."""
        return self._server.model

    @property
    def requested_size(self) -> int:
        return self.model.requested_size

    @property
    def plugged_size(self) -> int:
        return self.model.plugged_size

    @property
    def block_size(self) -> int:
        return self.model.block_size

    @property
    def max_size(self) -> int:
        return self.model.region_size

    @property
    def usable_region_size(self) -> int:
        return self.model.usable_region_size

    @property
    def memaddr(self) -> int:
        """The memory BAR's guest physical address (0 until the guest assigns it)."""
        return self._server.transport.memory_bar_addr

    @property
    def connected(self) -> bool:
        """Whether a vfio-user client (QEMU) is attached."""
        return self._server.connected

    @property
    def discard_pending_bytes(self) -> int:
        """Unplugged, not yet given back to the host (docs/discard.md)."""
        return self._server.discards.pending_bytes

    @property
    def backend_allocated_bytes(self) -> int:
        """Host memory the backend holds now."""
        return self._server.backend.allocated_bytes()

    @property
    def policy(self) -> PlugPolicy | None:
        return self.model.policy

    @policy.setter
    def policy(self, policy: PlugPolicy | None) -> None:
        self._server.set_policy(policy)

    def resize(self, requested_size_bytes: int) -> None:
        """Ask the guest to plug or unplug up to ``requested_size_bytes``."""
        self._server.resize(requested_size_bytes)

    def notify_config_change(self) -> None:
        """Send the guest a configuration-change interrupt without changing
        anything: Linux's driver then looks at the device at once, which
        cancels its retry timer (drivers/virtio/virtio_mem.c,
        virtio_mem_config_changed), e.g. once a policy stops answering BUSY."""
        self._server.transport.notify_config()

    def subscribe(self, callback: Callable[[E], None], *kinds: type[E]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event of ``kinds`` (all without);
        returns the function that unsubscribes it."""
        return self.model.observers.subscribe(callback, *kinds)

    async def wait_until(self, predicate: Callable[[Device], bool]) -> None:
        """Return once ``predicate(self)`` holds, looking again after each of
        the device's events (wrap it in ``trio.fail_after`` for a deadline)."""
        if predicate(self):
            return
        done = trio.Event()

        def check(event: DeviceEvent) -> None:
            if predicate(self):
                done.set()

        unsubscribe = self.subscribe(check)
        try:
            await done.wait()
        finally:
            unsubscribe()

    async def wait_for_plugged_size(self, size_bytes: int) -> None:
        """Return once the guest has plugged exactly ``size_bytes``."""
        await self.wait_until(lambda device: device.plugged_size == size_bytes)


class Server:
    """The devices of one ``open_server``, by id, and its control plane."""

    def __init__(self, servers: list[DeviceServer], qmp_path: str | None, metrics: MetricsExporter | None,
                 monitor_path: str | None = None) -> None:
        self.devices: Mapping[str, Device] = {s.config.id: Device(s) for s in servers}
        self.qmp_path = qmp_path
        #: The human monitor's socket (QEMU's -mon ...,mode=readline), if any.
        self.monitor_path = monitor_path
        self.metrics = metrics
        self._servers = servers

    def __getitem__(self, device_id: str) -> Device:
        return self.devices[device_id]


def share_socket_with_group(path: str, gid: int) -> None:
    """Make a socket file 0660 and owned by group ``gid`` (``--socket-group``)."""
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)


@asynccontextmanager
async def open_server(configs: list[DeviceConfig], qmp_path: str | None = None, *,
                      metrics: MetricsExporter | None = None, socket_group: int | None = None,
                      qmp_max_clients: int | None = None,
                      monitor_path: str | None = None,
                      allowed_uids: Collection[int] | None = None) -> AsyncIterator[Server]:
    """Start the devices (each listening on its vfio-user socket), QMP on
    ``qmp_path`` if given, the human monitor (HMP, docs/monitor.md) on
    ``monitor_path`` if given and ``metrics`` if given; stop them all on exit.

    ``socket_group``: a gid; the vfio-user, QMP and monitor sockets are then
    0660 and owned by that group instead of 0600.  ``qmp_max_clients``: at
    most this many QMP connections, and as many monitor connections
    (QmpServer's default otherwise).  ``allowed_uids``: only clients of
    these uids (and root and the server's own user) may connect to any of
    the sockets; the others are logged and disconnected (docs/security.md)."""
    allowed = None if allowed_uids is None else frozenset(allowed_uids)
    # Judged again when each socket is taken; here first, so that a refusal
    # comes before any device took its socket and backend.
    for path in (qmp_path, monitor_path, *(c.socket for c in configs)):
        if path is not None:
            check_socket_directory(path)
    servers: list[DeviceServer] = []
    try:
        for config in configs:
            servers.append(DeviceServer(config))
            servers[-1].allowed_uids = allowed
            if socket_group is not None:
                share_socket_with_group(config.socket, socket_group)
        for s in servers:
            # A QEMU with several devices DMA-maps each one's memory BAR to all.
            s.siblings = [other for other in servers if other is not s]
        qmp = None
        if qmp_path is not None or monitor_path is not None:
            controlled = {s.config.id: ControlledVmem(s) for s in servers}
            qmp = QmpServer(controlled, version=__version__,
                            **({} if qmp_max_clients is None else {"max_clients": qmp_max_clients}))
            qmp.allowed_uids = allowed
        if metrics is not None:
            for s in servers:
                metrics.add_device(s)
        async with trio.open_nursery() as nursery:
            if qmp is not None and qmp_path is not None:
                await nursery.start(qmp.serve, qmp_path)
                if socket_group is not None:
                    share_socket_with_group(qmp_path, socket_group)
            if qmp is not None and monitor_path is not None:
                # The monitor runs its commands through QMP's tree and devices.
                monitor = MonitorServer(qmp.hmp, qemu_version=QEMU_VERSION,
                                        **({} if qmp_max_clients is None else {"max_clients": qmp_max_clients}))
                monitor.allowed_uids = allowed
                await nursery.start(monitor.serve, monitor_path)
                if socket_group is not None:
                    share_socket_with_group(monitor_path, socket_group)
            if metrics is not None:
                await nursery.start(metrics.serve)
            for s in servers:
                nursery.start_soon(s.run)
            try:
                yield Server(servers, qmp_path, metrics, monitor_path)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # A device's guest-memory map may hold views of a sibling's backend:
        # drop them all before any backend is closed.
        for s in servers:
            transport = getattr(s, "transport", None)
            if transport is not None:
                transport.memory.clear()
        for s in servers:
            s.close()


#: The signals that stop ``serve``; a second one while it stops makes it stop at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def service_status(server: Server) -> str:
    """The one-line state ``serve`` reports to the service manager
    (``STATUS=``, what ``systemctl status`` shows)."""
    parts = []
    for ds in server._servers:
        parts.append(f"{ds.config.id} client {ds.clients_total} connected" if ds.connected
                     else f"{ds.config.id} waiting for a client")
    n = len(parts)
    return f"serving {n} device{'s' if n != 1 else ''}: " + ", ".join(parts)


async def serve(configs: list[DeviceConfig], qmp_path: str, *, ready: Callable[[], None] | None = None,
                metrics: Any = None, socket_group: int | None = None,
                qmp_max_clients: int | None = None, monitor_path: str | None = None,
                on_hangup: Callable[[], None] | None = None, notifier: Notifier | None = None,
                allowed_uids: Collection[int] | None = None) -> None:
    """Run the devices, the QMP server and the monitor (if ``monitor_path``)
    until SIGTERM/SIGINT; ``ready()`` once every socket listens.

    Under a service manager (``$NOTIFY_SOCKET``, or ``notifier``): READY=1
    then, a STATUS= line whenever a client comes or goes, STOPPING=1 at the
    stop signal, and WATCHDOG=1 at half the ``WatchdogSec=`` period from the
    trio thread (a loop that hangs stops sending it).  SIGHUP calls
    ``on_hangup`` (the CLI rereads its configuration file's log level),
    and is logged and ignored without one.  A second stop signal while the
    devices close skips the discards still queued (DeviceServer.close)."""
    notifier = Notifier() if notifier is None else notifier
    # The receiver first: a stop signal during start-up stops the server
    # right after it started.  It restores the handlers it replaced when it
    # closes, after the devices have closed.
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        async with open_server(configs, qmp_path, metrics=metrics, socket_group=socket_group,
                               qmp_max_clients=qmp_max_clients, monitor_path=monitor_path,
                               allowed_uids=allowed_uids) as server:
            # Everything made so far (modules, the devices' tables) lives as
            # long as the process: out of the collector's generations, a
            # full collection walks only what came after.  Such a pass holds
            # the one thread every device and QMP share; it took 35-74 ms
            # before, 6-13 ms after (bench/many_guests.py, qom-get stalls).
            gc.freeze()
            if ready is not None:
                ready()
            notifier.ready(service_status(server))

            def report_clients(_event: DeviceEvent) -> None:
                notifier.status(service_status(server))

            unsubscribe = [d.subscribe(report_clients, ClientConnected, ClientDisconnected)
                           for d in server.devices.values()] if notifier.enabled else []
            async with trio.open_nursery() as nursery:
                if notifier.watchdog_usec is not None:
                    nursery.start_soon(_watchdog, notifier, notifier.watchdog_usec / 2e6)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        if on_hangup is None:
                            log.info("SIGHUP: no configuration file to reread; ignored")
                        else:
                            on_hangup()
                        continue
                    log.info("%s: stopping (send it again to stop at once)", name)
                    notifier.stopping(f"stopping ({name})")
                    break
                nursery.cancel_scope.cancel()
            for undo in unsubscribe:
                undo()
            # While the devices close (open_server's exit), a second stop
            # signal hurries them: a plain handler, since no task reads the
            # receiver any more.
            servers = server._servers

            def stop_at_once(signum: int, _frame: object) -> None:
                for s in servers:
                    s.hurry = True

            for sig in STOP_SIGNALS:
                signal.signal(sig, stop_at_once)


async def _watchdog(notifier: Notifier, period_s: float) -> None:
    while True:
        notifier.watchdog()
        await trio.sleep(period_s)
