"""The process-level server: devices, QMP and metrics run together.

``open_server`` starts devices in-process and hands back a ``Server`` to
hold them; ``serve`` is what ``vfiouser-vmem serve`` runs (open_server
until SIGTERM or SIGINT).  docs/api.md shows both in use.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from vfiouser_vmem import __version__
from vfiouser_vmem.control import QEMU_VERSION, MetricsExporter, MonitorServer, QmpServer
from vfiouser_vmem.server._config import DeviceConfig
from vfiouser_vmem.server._device_server import DeviceServer
from vfiouser_vmem.server._qom import ControlledVmem
from vfiouser_vmem.vmem import DeviceEvent, PlugPolicy, VirtioMemDevice

__all__ = ["Device", "Server", "open_server", "serve", "share_socket_with_group"]

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
                      monitor_path: str | None = None) -> AsyncIterator[Server]:
    """Start the devices (each listening on its vfio-user socket), QMP on
    ``qmp_path`` if given, the human monitor (HMP, docs/monitor.md) on
    ``monitor_path`` if given and ``metrics`` if given; stop them all on exit.

    ``socket_group``: a gid; the vfio-user, QMP and monitor sockets are then
    0660 and owned by that group instead of 0600.  ``qmp_max_clients``: at
    most this many QMP connections, and as many monitor connections
    (QmpServer's default otherwise)."""
    servers: list[DeviceServer] = []
    try:
        for config in configs:
            servers.append(DeviceServer(config))
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


async def serve(configs: list[DeviceConfig], qmp_path: str, *, ready: Callable[[], None] | None = None,
                metrics: Any = None, socket_group: int | None = None,
                qmp_max_clients: int | None = None, monitor_path: str | None = None) -> None:
    """Run the devices, the QMP server and the monitor (if ``monitor_path``)
    until SIGTERM/SIGINT; ``ready()`` once every socket listens."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_server(configs, qmp_path, metrics=metrics, socket_group=socket_group,
                               qmp_max_clients=qmp_max_clients, monitor_path=monitor_path):
            if ready is not None:
                ready()
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                break
