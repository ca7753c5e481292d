"""The QMP control plane: QEMU's Machine Protocol on a UNIX socket, on trio.

Speaks the same JSON as QEMU (docs/interop/qmp-spec.rst) for the things this
device does, so that QEMU's own tools (``qemu.qmp``'s ``QMPClient``,
``qmp-shell``) drive it unchanged (docs/design.md, "The interface contract").
This module holds :class:`QmpServer`: accepting clients, dispatching their
requests and the commands themselves.  The parts it is made of:

- ``_framing``: the input stream split into JSON messages and parsed, the
  size and nesting limits, the parse errors; replies encoded as lines;
- ``_arguments``: what a request and each command's arguments must hold;
- ``_connection``: one client's outgoing queue and its rate-limited log lines;
- ``_events``: MEMORY_DEVICE_SIZE_CHANGE and its rate limiting;
- ``_client``: :class:`QmpClient`, the synchronous client of ``ctl`` and
  the tests (for this server or a QEMU).

Session
    On connect the server sends a greeting ``{"QMP": {"version": {"qemu":
    {"major": 11, "minor": 1, "micro": 0}, "package": "vfiouser-vmem X.Y.Z"},
    "capabilities": []}}``.  The QEMU version numbers are the QEMU release
    whose QMP this mimics; our own version is in ``package``.  The session
    starts in capabilities negotiation mode, where only ``qmp_capabilities``
    is accepted (anything else gets class ``CommandNotFound``, desc
    "Expecting capabilities negotiation with 'qmp_capabilities'", as QEMU
    says); after it, command mode.  No capability is offered (no ``oob``).

Commands (command mode)
    ``qmp_capabilities`` (refused once negotiated, as QEMU does),
    ``query-version``, ``query-commands``, ``query-status`` (always
    ``{"status": "running", "running": true}``), ``qom-get``, ``qom-set``,
    ``qom-list``, ``query-memory-devices``, ``query-memory-size-summary``
    (``base-memory`` is 0: this process owns no boot memory), ``query-memdev``
    (the devices' memory backends, docs/backends.md), ``x-query-numa``
    and ``human-monitor-command`` (the human monitor, control/_hmp.py;
    docs/monitor.md).  There is no
    ``quit``: the server stops on SIGTERM/SIGINT.

    The qom- commands walk one QOM tree (control/_qom.py): ``/``,
    ``/machine``, ``/machine/peripheral``, ``/objects``, each device, named by
    its id (``vmem0``), by QEMU's ``/machine/peripheral/<id>``, or by its
    ``qom_path`` (``.../virtio-backend``, the path its
    MEMORY_DEVICE_SIZE_CHANGE events carry), and each device's memory
    backend ``/objects/<memdev>``.  Devices are looked up when each command
    runs, so devices added to the mapping later are found.

    A reply carries the ``id`` member of the command it answers whenever the
    command had one (any JSON value).  A request whose ``id`` cannot be
    encoded after all is refused before its command runs ("QMP input member
    'id' cannot be sent back in a reply: ...", without the id): nothing a
    client sends can make the encoding of a reply fail.

Errors
    Every error is ``{"error": {"class": ..., "desc": ...}}`` (plus ``id``)
    and leaves the connection usable.  The texts are QEMU's where QEMU has
    one: the parse errors ("JSON parse error, ...": _framing), the request
    and argument errors ("QMP input lacks member 'execute'", "Parameter 'x'
    is missing", ...: _arguments), "The command x has not been found" (class
    ``CommandNotFound``), "Device 'x' not found" (class ``DeviceNotFound``).
    Errors the device raises map to ``GenericError`` with the exception's
    message as desc: ``control.PropertyNotFound`` (default text "Property
    '<id>.<prop>' not found"), ``control.PropertyReadOnly`` (default
    "Property '<id>.<prop>' is not writable"), ``ValueError``, ``TypeError``.
    The server's devices (server.ControlledVmem) give QEMU's own texts,
    which name the QOM type: "Property 'virtio-mem-pci.<prop>' not found" /
    "... is not writable" (qom/object.c), "Parameter '<prop>' expects
    uint64" (out of a uint64's range, qobject-input-visitor.c) and
    "Parameter '<prop>' expects uint32_t" (qapi-visit-core.c).
    Any other exception from a device is a bug: it is logged with its
    traceback and answered with a GenericError "Internal error: ...".

Limits
    The size and nesting of a message (_framing); each client's queue of
    outgoing messages and its log lines (_connection).

    At most ``max_clients`` connections (default 64, ``serve
    --qmp-max-clients N``, TOML ``qmp-max-clients``).  A new client is still
    greeted at once: to make room the server disconnects the client idle
    the longest (no input for the longest time), one still in capabilities
    negotiation first, with a WARNING naming it.

    Many commands in one read do not hold up the other clients: the server
    lets them run between the messages of a read.

Socket
    ``serve(path)`` creates the socket with mode 0600.  If ``path`` exists it
    refuses to start with ``sockets.SocketPathInUse`` (a ``FileExistsError``)
    unless it is a stale socket nobody listens on, which it removes (the one
    policy of the vfio-user sockets too: vfiouser_vmem/util/sockets.py).  On
    exit (cancellation included) it removes the socket file, if that is still
    the one it created.

Logging goes to the ``vfiouser_vmem.qmp`` logger: INFO for each refused
command (what and why; rate-limited per client), WARNING for clients
disconnected for not reading or to make room for a new client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio

from vfiouser_vmem import __version__
from vfiouser_vmem.control._arguments import COMMAND_ARGS, CommandError, check_arguments, check_request
from vfiouser_vmem.control._connection import DEFAULT_MAX_QUEUED_MESSAGES, Client, ConnectionServer
from vfiouser_vmem.control._events import SizeChangeEvents
from vfiouser_vmem.control._framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    JsonStreamSplitter,
    Oversize,
    ParseError,
    encode,
    encode_return,
    encode_value,
)
from vfiouser_vmem.control._hmp import HumanMonitor, numa_text
from vfiouser_vmem.control._protocol import ControlledDevice
from vfiouser_vmem.control._qom import QomTree, memdev_info
from vfiouser_vmem.util.logtext import printable

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "QEMU_VERSION",
    "QmpServer",
]

log = logging.getLogger("vfiouser_vmem.qmp")

#: The QEMU release whose QMP we mimic, reported in the greeting and
#: ``query-version`` (tools gate features on it).
QEMU_VERSION = (11, 1, 0)

DEFAULT_MAX_CLIENTS = 64
_READ_SIZE = 65536


class QmpServer(ConnectionServer):
    """QMP server for a set of devices; run it with :meth:`serve` (listening
    and the connections: ConnectionServer).

    ``devices`` maps device id to device; it is read at every command, so the
    caller may add devices to it later (call :meth:`add_device` so that their
    size changes become events).
    """

    def __init__(
        self,
        devices: Mapping[str, ControlledDevice],
        *,
        version: str = __version__,
        event_interval_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        if event_interval_s < 0:
            raise ValueError("event_interval_s must be >= 0")
        if max_message_bytes < 1 or max_queued_messages < 1 or max_clients < 1:
            raise ValueError("max_message_bytes, max_queued_messages and max_clients must be >= 1")
        super().__init__(max_clients=max_clients, max_queued_messages=max_queued_messages)
        self._devices = devices
        self._extra_devices: dict[str, ControlledDevice] = {}
        self.version = version
        self.max_message_bytes = max_message_bytes

        self._events = SizeChangeEvents(event_interval_s, self._broadcast)
        self._clients: set[Client] = set()  # clients in command mode
        #: Command name -> handler(client, checked arguments); the keys are COMMAND_ARGS's.
        self._handlers: dict[str, Callable[[Client, dict[str, Any]], Any]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-status": self._query_status,
            "qom-get": self._qom_get,
            "qom-set": self._qom_set,
            "qom-list": self._qom_list,
            "query-memory-devices": self._query_memory_devices,
            "query-memory-size-summary": self._query_memory_size_summary,
            "query-memdev": self._query_memdev,
            "x-query-numa": self._x_query_numa,
            "human-monitor-command": self._human_monitor_command,
        }
        #: The QOM tree qom-list/get/set walk, shared with the human monitor.
        self.qom = QomTree(self._iter_devices)
        #: The human monitor (HMP) over the same devices and tree.
        self.hmp = HumanMonitor(self._iter_devices, self.qom)
        assert self._handlers.keys() == COMMAND_ARGS.keys()

    @property
    def event_interval_s(self) -> float:
        """At most one MEMORY_DEVICE_SIZE_CHANGE per device this often (0: no limit)."""
        return self._events.interval_s

    @event_interval_s.setter
    def event_interval_s(self, value: float) -> None:
        self._events.interval_s = value

    # -- devices ------------------------------------------------------------

    def _iter_devices(self) -> Iterator[ControlledDevice]:
        yield from self._devices.values()
        for dev_id, device in list(self._extra_devices.items()):
            if dev_id not in self._devices:
                yield device

    def _find_by_id(self, dev_id: str) -> ControlledDevice | None:
        device = self._devices.get(dev_id)
        return device if device is not None else self._extra_devices.get(dev_id)

    def add_device(self, device: ControlledDevice) -> None:
        """Make ``device`` known (if the mapping lacks it) and turn its size
        changes into events, now if serving or else when ``serve`` starts."""
        known = self._find_by_id(device.id)
        if known is not None and known is not device:
            raise ValueError(f"Duplicate ID '{device.id}' for device")
        if known is None:
            self._extra_devices[device.id] = device
        if self._serving:
            self._events.subscribe(device)

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        data = encode(message)
        for client in list(self._clients):
            if not client.queue_nowait(data):
                log.warning(
                    "QMP client %d is not reading (%d messages queued): disconnecting it",
                    client.number,
                    self.max_queued_messages,
                )
                self._clients.discard(client)
                client.cancel_scope.cancel()

    # -- serving -------------------------------------------------------------

    kind = "QMP"
    log = log

    def _serving_started(self, nursery: trio.Nursery) -> None:
        self._events.start(nursery)
        for device in list(self._iter_devices()):
            self._events.subscribe(device)

    def _serving_stopped(self) -> None:
        self._events.stop()
        self._clients.clear()

    async def _session(self, client: Client) -> None:
        client.queue_nowait(encode(self._greeting()))
        await self._read_loop(client)
        # The client closed its side: no more events for it.
        self._clients.discard(client)

    def _client_gone(self, client: Client) -> None:
        self._clients.discard(client)

    def _client_closed(self, client: Client) -> None:
        client.log_dropped()
        log.debug("QMP client %d disconnected", client.number)

    def _evict(self) -> None:
        """Make room for a new client: close the one idle the longest,
        preferring one still negotiating capabilities (a connection that
        never became a session).  Its task ends at its next checkpoint; it
        no longer counts at once."""
        victim = min(self._connections, key=lambda c: (c.command_mode, c.last_input, c.number))
        log.warning(
            "QMP: %d clients connected, the limit (--qmp-max-clients): disconnecting client %d "
            "(%sidle %.1f s) to serve a new one",
            len(self._connections), victim.number,
            "" if victim.command_mode else "still negotiating capabilities, ",
            trio.current_time() - victim.last_input,
        )
        self._connections.discard(victim)
        self._clients.discard(victim)
        victim.broken()

    async def _read_loop(self, client: Client) -> None:
        splitter = JsonStreamSplitter(self.max_message_bytes)
        while data := await client.receive(_READ_SIZE):
            first = True
            for item in splitter.feed(data):
                if first:
                    first = False
                else:  # many commands in one read: let the devices run between them
                    await trio.lowlevel.checkpoint()
                if isinstance(item, (ParseError, Oversize)):
                    desc = item.desc
                    client.log_refused("refused input: %s", printable(desc))
                    reply = encode({"error": {"class": "GenericError", "desc": desc}})
                else:
                    reply = self._dispatch(client, item)
                if not client.queue_nowait(reply):
                    await client.send(reply)

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self, client: Client, request: Any) -> bytes:
        """Run one request; return its encoded reply (with the request's id)."""
        id_json = None
        if type(request) is dict and "id" in request:
            # Encoded first and once: every reply can then carry it (the
            # encoder is ASCII-only, so lone surrogates are escapes, and the
            # parser refused non-finite numbers); one it cannot encode after
            # all is refused before the command runs.
            try:
                id_json = encode_value(request["id"])
            except (ValueError, TypeError, RecursionError) as exc:
                client.log_refused("refused %s: its id cannot be sent back: %s", _describe_request(request), exc)
                return encode({"error": {"class": "GenericError",
                                          "desc": f"QMP input member 'id' cannot be sent back in a reply: {exc}"}})
        try:
            name, arguments = check_request(request)
            if not client.command_mode and name != "qmp_capabilities":
                raise CommandError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(f"The command {name} has not been found", "CommandNotFound")
            result = handler(client, check_arguments(name, arguments))
            if id_json is not None:
                return encode({"return": result}, id_json)
            return encode_return(result)  # raises if a device returned something JSON cannot carry
        except CommandError as exc:
            client.log_refused("refused %s: %s", _describe_request(request), printable(exc.desc))
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Exception as exc:
            client.log_refused("%s failed", _describe_request(request), level=logging.ERROR, exc_info=True)
            reply = {"error": {"class": "GenericError", "desc": f"Internal error: {exc}"}}
        return encode(reply, id_json)

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._version_info(), "capabilities": []}}

    def _version_info(self) -> dict[str, Any]:
        major, minor, micro = QEMU_VERSION
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"vfiouser-vmem {self.version}",
        }

    def _qmp_capabilities(self, client: Client, args: dict[str, Any]) -> Any:
        if client.command_mode:
            raise CommandError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        if args.get("enable"):
            raise CommandError(f"Capability {', '.join(args['enable'])} not available")
        client.command_mode = True
        self._clients.add(client)
        return {}

    def _query_version(self, client: Client, args: dict[str, Any]) -> Any:
        return self._version_info()

    def _query_commands(self, client: Client, args: dict[str, Any]) -> Any:
        return [{"name": command} for command in COMMAND_ARGS]

    def _query_status(self, client: Client, args: dict[str, Any]) -> Any:
        return {"status": "running", "running": True}

    def _query_memory_devices(self, client: Client, args: dict[str, Any]) -> Any:
        return [{"type": "virtio-mem", "data": device.memory_device_info()} for device in self._iter_devices()]

    def _query_memory_size_summary(self, client: Client, args: dict[str, Any]) -> Any:
        plugged = sum(int(device.memory_device_info()["size"]) for device in self._iter_devices())
        return {"base-memory": 0, "plugged-memory": plugged}

    def _query_memdev(self, client: Client, args: dict[str, Any]) -> Any:
        # QEMU lists /objects' children in the order of its hash table
        # (object_child_foreach_recursive); here: the devices' order.
        return [memdev_info(backend) for backend in self.qom.backends()]

    def _qom_list(self, client: Client, args: dict[str, Any]) -> Any:
        return self.qom.qom_list(args["path"])

    def _qom_get(self, client: Client, args: dict[str, Any]) -> Any:
        return self.qom.qom_get(args["path"], args["property"])

    def _qom_set(self, client: Client, args: dict[str, Any]) -> Any:
        self.qom.qom_set(args["path"], args["property"], args["value"])
        return {}

    def _x_query_numa(self, client: Client, args: dict[str, Any]) -> Any:
        # QEMU 11's x-query-numa is HumanReadableText (qapi/machine.json).
        return {"human-readable-text": numa_text(self._iter_devices())}

    def _human_monitor_command(self, client: Client, args: dict[str, Any]) -> Any:
        if "cpu-index" in args:
            # qmp_human_monitor_command (monitor/qmp-cmds.c): monitor_set_cpu
            # fails, and there are no CPUs here.
            raise CommandError("Parameter 'cpu-index' expects a CPU number")
        return self.hmp.execute(args["command-line"])


def _describe_request(request: Any) -> str:
    """How log lines name a request (the name escaped: it is client text)."""
    execute = request.get("execute") if isinstance(request, dict) else None
    return f"command '{printable(execute)}'" if isinstance(execute, str) else "a malformed request"
