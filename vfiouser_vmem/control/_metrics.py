"""Prometheus metrics for ``serve --metrics HOST:PORT``.

The exporter has its own ``prometheus_client`` registry (never the global
one) and a small HTTP/1.0 server on the trio thread, beside the devices and
QMP: a scrape reads the devices' state directly, with no lock and no thread,
and stopping the server is cancelling its task.  ``GET /metrics`` answers
the Prometheus text format (or OpenMetrics when the scraper asks for it);
any other path is 404, any other method 405.

Metrics (every series has the label ``id``, the device id):

Read from the devices at scrape time:
    ``vfiouser_vmem_requested_size_bytes``, ``vfiouser_vmem_plugged_size_bytes``,
    ``vfiouser_vmem_max_size_bytes``, ``vfiouser_vmem_block_size_bytes``,
    ``vfiouser_vmem_usable_region_size_bytes`` (gauges, from the device model);
    ``vfiouser_vmem_backend_allocated_bytes`` (gauge: host memory the memfd
    holds, ``st_blocks * 512``); ``vfiouser_vmem_discard_pending_bytes``
    (gauge: unplugged, not yet given back, docs/discard.md);
    ``vfiouser_vmem_discarded_bytes_total`` and
    ``vfiouser_vmem_discard_failures_total`` (counters: the bytes of the
    deferred discards done, a reset's being the whole device, and the
    discards that failed); ``vfiouser_vmem_resets_total{kind}`` (counter;
    kind ``device``, ``lost_conn``, ``pci_flr``);
    ``vfiouser_vmem_hook_errors_total{hook}`` (counter: exceptions of the
    plug policy, hook ``policy``, and of observers, ``observer``);
    ``vfiouser_vmem_unplugged_found_bytes_total``,
    ``vfiouser_vmem_unplugged_reclaimed_bytes_total``,
    ``vfiouser_vmem_unplugged_episodes_total`` (counters: host memory the
    scrubber found in unplugged blocks, what of it was given back, and the
    passes that found some; docs/scrub.md);
    ``vfiouser_vmem_scrub_passes_total`` (counter) and
    ``vfiouser_vmem_scrub_last_pass_seconds`` (gauge);
    ``vfiouser_vmem_prealloc_failures_total`` (counter: PLUGs answered BUSY
    because the backend had no memory for them, with the device's
    ``prealloc=on``);
    ``vfiouser_vmem_client_connections_total`` (counter: vfio-user clients
    accepted); ``vfiouser_vmem_client_connected`` (gauge, 0 or 1);
    ``vfiouser_vmem_device_info{memdev,socket,node,backend,page_size,prealloc}``
    (always 1; ``backend`` is the qom-type, ``page_size`` the backend's page
    size in bytes, ``prealloc`` ``on`` or ``off``).
Counted as requests are served (a ``RequestServed`` observer of each device):
    ``vfiouser_vmem_requests_total{type,response}`` (counter; type ``plug``,
    ``unplug``, ``unplug_all``, ``state``; response ``ack``, ``nack``,
    ``busy``, ``error``); ``vfiouser_vmem_request_duration_seconds{type}``
    (histogram from 5 us to 1 s: parsing, bitmap, queueing the discard and
    the response).

The listen address: ``HOST:PORT``, ``:PORT`` (host 127.0.0.1) or
``[IPV6]:PORT``.  Only loopback hosts (``127.0.0.0/8``, ``::1``,
``localhost``) are accepted unless remote access is allowed explicitly: the
metrics are not secret, but nothing authenticates the scraper.  Port 0 picks
a free port (the server reports the one it got).

Limits (no input can freeze the server or make it grow without bound): a
request head may be at most ``MAX_REQUEST_HEAD_BYTES`` (16 KiB; 431 beyond);
reading it and writing the response each have ``REQUEST_TIMEOUT_S`` (10 s;
a head not complete by then gets 408, a response not taken by then is
dropped with the connection); at most ``MAX_CONNECTIONS`` (32) connections
are open: a new one closes the oldest (a WARNING names its peer), so that a
scraper always gets through.  A malformed ``Accept`` header gets the default
text format.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from vfiouser_vmem.errors import MetricsAddressError
from vfiouser_vmem.vmem import RequestServed

log = logging.getLogger("vfiouser_vmem.metrics")

REQUEST_TYPES = {0: "plug", 1: "unplug", 2: "unplug_all", 3: "state"}
RESPONSES = {0: "ack", 1: "nack", 2: "busy", 3: "error"}
#: Request service time buckets: microseconds (a STATE) to milliseconds (a
#: discard of a 2 MiB block), with room for a slow host.
DURATION_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                    0.1, 0.25, 1.0, float("inf"))

MAX_REQUEST_HEAD_BYTES = 16 << 10
#: For reading a request head, and again for writing the response.
REQUEST_TIMEOUT_S = 10.0
#: Open connections at most; the oldest is closed for a new one.
MAX_CONNECTIONS = 32


def parse_metrics_address(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise MetricsAddressError(f"invalid address {text!r}: expected HOST:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise MetricsAddressError(f"invalid address {text!r}: write an IPv6 host in brackets, e.g. [::1]:9100")
    host = host or "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        raise MetricsAddressError(f"invalid port {port_text!r} in {text!r}") from None
    if not 0 <= port <= 65535:
        raise MetricsAddressError(f"invalid port {port} in {text!r}: expected 0-65535")
    if not allow_remote and not is_loopback(host):
        raise MetricsAddressError(
            f"{host} is not a loopback address: the metrics endpoint has no authentication; "
            "add --metrics-allow-remote to serve it on other interfaces"
        )
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _DeviceCollector:
    """Reads the devices' state when scraped."""

    def __init__(self, servers: list[Any]) -> None:
        self.servers = servers

    def collect(self) -> Iterator[Metric]:
        labels = ["id"]
        requested = GaugeMetricFamily("vfiouser_vmem_requested_size_bytes",
                                      "The size the guest is asked to plug (requested-size).", labels=labels)
        plugged = GaugeMetricFamily("vfiouser_vmem_plugged_size_bytes",
                                    "The size the guest has plugged (QMP size).", labels=labels)
        maximum = GaugeMetricFamily("vfiouser_vmem_max_size_bytes", "The device's maximum size.", labels=labels)
        block = GaugeMetricFamily("vfiouser_vmem_block_size_bytes", "The device's block size.", labels=labels)
        usable = GaugeMetricFamily("vfiouser_vmem_usable_region_size_bytes",
                                   "The part of the device region the guest may plug in.", labels=labels)
        allocated = GaugeMetricFamily("vfiouser_vmem_backend_allocated_bytes",
                                      "Host memory the device's memory backend holds.", labels=labels)
        pending = GaugeMetricFamily("vfiouser_vmem_discard_pending_bytes",
                                    "Unplugged memory not yet given back to the host.", labels=labels)
        discarded = CounterMetricFamily("vfiouser_vmem_discarded_bytes",
                                        "Backend ranges discarded after the UNPLUG was answered (a reset "
                                        "discards the whole device).",
                                        labels=labels)
        discard_failures = CounterMetricFamily("vfiouser_vmem_discard_failures",
                                               "Discards that failed (and are retried).", labels=labels)
        resets = CounterMetricFamily("vfiouser_vmem_resets", "Device resets, by kind.", labels=["id", "kind"])
        hook_errors = CounterMetricFamily("vfiouser_vmem_hook_errors",
                                          "Exceptions raised by a plug policy or an observer (docs/api.md).",
                                          labels=["id", "hook"])
        unplugged_found = CounterMetricFamily(
            "vfiouser_vmem_unplugged_found_bytes",
            "Host memory found in unplugged blocks by the scrubber (docs/scrub.md).", labels=labels)
        unplugged_reclaimed = CounterMetricFamily(
            "vfiouser_vmem_unplugged_reclaimed_bytes",
            "Host memory found in unplugged blocks and given back.", labels=labels)
        unplugged_episodes = CounterMetricFamily(
            "vfiouser_vmem_unplugged_episodes", "Scrub passes that found memory in unplugged blocks.",
            labels=labels)
        scrub_passes = CounterMetricFamily("vfiouser_vmem_scrub_passes", "Scrub passes done.", labels=labels)
        scrub_seconds = GaugeMetricFamily("vfiouser_vmem_scrub_last_pass_seconds",
                                          "Wall time of the last scrub pass.", labels=labels)
        prealloc_failures = CounterMetricFamily(
            "vfiouser_vmem_prealloc_failures",
            "PLUGs answered BUSY because the backend had no memory for them (prealloc=on).", labels=labels)
        connections = CounterMetricFamily("vfiouser_vmem_client_connections",
                                          "vfio-user clients (QEMU) accepted.", labels=labels)
        connected = GaugeMetricFamily("vfiouser_vmem_client_connected",
                                      "1 while a vfio-user client (QEMU) is connected.", labels=labels)
        info = GaugeMetricFamily("vfiouser_vmem_device_info", "The device's configuration (always 1).",
                                 labels=["id", "memdev", "socket", "node", "backend", "page_size", "prealloc"])
        for server in self.servers:
            cid = server.config.id
            model = server.model
            requested.add_metric([cid], model.requested_size)
            plugged.add_metric([cid], model.plugged_size)
            maximum.add_metric([cid], model.region_size)
            block.add_metric([cid], model.block_size)
            usable.add_metric([cid], model.usable_region_size)
            if server.backend.fd >= 0:
                allocated.add_metric([cid], server.backend.allocated_bytes())
            pending.add_metric([cid], server.discards.pending_bytes)
            discarded.add_metric([cid], server.discards.discarded_bytes_total)
            discard_failures.add_metric([cid], server.discards.failures_total)
            for kind, count in server.resets_total.items():
                resets.add_metric([cid, kind.lower()], count)
            for hook in ("policy", "observer"):
                hook_errors.add_metric([cid, hook], model.hook_errors[hook])
            prealloc_failures.add_metric([cid], server.prealloc_failures_total)
            unplugged_found.add_metric([cid], server.unplugged_found_bytes_total)
            unplugged_reclaimed.add_metric([cid], server.unplugged_reclaimed_bytes_total)
            unplugged_episodes.add_metric([cid], server.unplugged_episodes_total)
            scrub_passes.add_metric([cid], server.scrubber.passes_total)
            scrub_seconds.add_metric([cid], server.scrubber.last_pass_s)
            connections.add_metric([cid], server.clients_total)
            connected.add_metric([cid], 1 if server.connected else 0)
            node = "" if server.config.node is None else str(server.config.node)
            backend = server.config.memory_backend
            info.add_metric([cid, server.config.memdev, server.config.socket, node,
                             backend.qom_type if backend is not None else type(server.backend).__name__,
                             str(server.backend.page_size_bytes), "on" if server.config.prealloc else "off"], 1)
        yield from (requested, plugged, maximum, block, usable, allocated, pending, discarded, discard_failures,
                    resets, hook_errors, prealloc_failures, unplugged_found, unplugged_reclaimed, unplugged_episodes,
                    scrub_passes, scrub_seconds, connections, connected, info)


class MetricsExporter:
    """The registry and its HTTP endpoint; run :meth:`serve` in a nursery."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # No ``*_created`` series (a process-wide switch of prometheus_client;
        # this process has no other metrics).
        disable_created_metrics()
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.servers: list[Any] = []
        self.registry.register(_DeviceCollector(self.servers))
        self.requests = Counter("vfiouser_vmem_requests", "virtio-mem requests served, by type and response.",
                                ["id", "type", "response"], registry=self.registry)
        self.durations = Histogram("vfiouser_vmem_request_duration_seconds",
                                   "Time to serve one virtio-mem request.", ["id", "type"],
                                   buckets=DURATION_BUCKETS, registry=self.registry)
        #: (host, port) actually listened on, once serving.
        self.address: tuple[str, int] | None = None
        #: The open connections, oldest first: their cancel scopes and peers.
        self._connections: dict[trio.CancelScope, Any] = {}

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def add_device(self, server: Any) -> None:
        """Export a DeviceServer (its transport must exist)."""
        cid = server.config.id
        self.servers.append(server)

        def observe(event: RequestServed) -> None:
            request_type, response_code = event.request.type, int(event.response)
            kind = REQUEST_TYPES.get(request_type, str(request_type))
            self.requests.labels(cid, kind, RESPONSES.get(response_code, str(response_code))).inc()
            self.durations.labels(cid, kind).observe(event.service_s)

        server.model.observers.subscribe(observe, RequestServed)

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("not serving")
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def render(self, accept: str = "") -> tuple[bytes, str]:
        try:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        except Exception:
            # prometheus_client fails on some malformed Accept headers (e.g.
            # "application/openmetrics-text; version=abc": TypeError): a
            # client's header must not cost it its answer.
            encoder, content_type = choose_encoder("")
            return encoder(self.registry), content_type

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics: cannot listen on {self.host}:{self.port}: "
                                     f"{exc.strerror or exc}") from None
        try:
            sockname = listeners[0].socket.getsockname()
            self.address = (sockname[0], sockname[1])
            log.info("metrics on %s", self.url)
            task_status.started(self.address)
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                await listener.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        if len(self._connections) >= MAX_CONNECTIONS:
            oldest, peer = next(iter(self._connections.items()))
            log.warning("metrics: %d connections open, the limit: closing the oldest (from %s)",
                        len(self._connections), peer)
            del self._connections[oldest]
            oldest.cancel()
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = "?"
        self._connections[scope] = peer
        try:
            with scope:
                async with stream:
                    await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._connections.pop(scope, None)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        head = bytearray()
        with trio.move_on_after(REQUEST_TIMEOUT_S) as reading:
            while True:
                # Look for the end of the head only where it can be: in the
                # new data and the 3 bytes before it (a slow client sends it
                # byte by byte).
                start = max(0, len(head) - 3)
                data = await stream.receive_some(4096)
                if not data:
                    break
                head += data
                if head.find(b"\r\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0:
                    break
                if len(head) > MAX_REQUEST_HEAD_BYTES:
                    with trio.move_on_after(REQUEST_TIMEOUT_S):
                        await self._reply(stream, 431, b"request head too large\n")
                    return
        with trio.move_on_after(REQUEST_TIMEOUT_S):  # a client that does not read is dropped
            if reading.cancelled_caught:
                await self._reply(stream, 408, b"request not received in time\n")
                return
            status, body, content_type = self._respond(bytes(head))
            await self._reply(stream, status, body, content_type, head_only=head.startswith(b"HEAD "))

    def _respond(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.decode("latin-1").splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", "text/plain"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, b"only GET\n", "text/plain"
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return 404, b"not found: the metrics are at /metrics\n", "text/plain"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        body, content_type = self.render(accept)
        return 200, body, content_type

    @staticmethod
    async def _reply(stream: trio.SocketStream, status: int, body: bytes, content_type: str = "text/plain",
                     *, head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
        headers = [f"HTTP/1.0 {status} {reason}", f"Content-Type: {content_type}",
                   f"Content-Length: {len(body)}", "Connection: close"]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        data = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
        await stream.send_all(data if head_only else data + body)
