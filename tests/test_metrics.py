"""vfiouser_vmem.metrics: the Prometheus endpoint, scraped over HTTP.

A real DeviceServer and the MetricsExporter run in the test's trio loop;
the test's virtio-mem driver (tests/virtio_driver.py) makes requests over
vfio-user; a plain urllib request (in a worker thread, so that the server
keeps running) scrapes the endpoint; the text is parsed with
prometheus_client's own parser.  Nothing sleeps.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from contextlib import ExitStack

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from vfio_user_client import BAR2, VfioUserClient
from virtio_driver import ACK, BUSY, ERROR, NACK, PLUGGED, UNPLUGGED, VirtioMemDriver
from vfiouser_vmem.control._metrics import MetricsAddressError, MetricsExporter, parse_metrics_address
from vfiouser_vmem.server import DeviceConfig, DeviceServer

MiB = 1 << 20
BLOCK = 2 * MiB
TIMEOUT = 10


@pytest.mark.parametrize(
    "text, allow_remote, expected",
    [
        (":9100", False, ("127.0.0.1", 9100)),
        ("127.0.0.1:0", False, ("127.0.0.1", 0)),
        ("127.1.2.3:80", False, ("127.1.2.3", 80)),
        ("localhost:9100", False, ("localhost", 9100)),
        ("[::1]:9100", False, ("::1", 9100)),
        ("0.0.0.0:9100", True, ("0.0.0.0", 9100)),
        ("[::]:9100", True, ("::", 9100)),
    ],
)
def test_parse_metrics_address(text, allow_remote, expected):
    assert parse_metrics_address(text, allow_remote=allow_remote) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("9100", "expected HOST:PORT or :PORT"),
        (":x", "invalid port 'x'"),
        (":70000", "expected 0-65535"),
        ("0.0.0.0:9100", "0.0.0.0 is not a loopback address"),
        ("192.0.2.1:9100", "--metrics-allow-remote"),
        ("example.com:9100", "not a loopback address"),
        ("::1:9100", "in brackets"),
    ],
)
def test_parse_metrics_address_refuses(text, message):
    with pytest.raises(MetricsAddressError, match=message):
        parse_metrics_address(text)


def fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    status, content_type, body = await trio.to_thread.run_sync(fetch, url)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


@pytest.fixture
async def exported():
    """Two in-process devices (d0: 256 MiB requested, d1: idle) and their exporter."""
    sock_dir = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")
    servers = []
    try:
        for i, requested in enumerate((256 * MiB, 0)):
            servers.append(DeviceServer(DeviceConfig(socket=f"{sock_dir}/d{i}.sock", size_bytes=1 << 30,
                                                     requested_size_bytes=requested, id=f"d{i}", memdev=f"m{i}")))
        exporter = MetricsExporter("127.0.0.1", 0)
        for s in servers:
            exporter.add_device(s)
        async with trio.open_nursery() as nursery:
            for s in servers:
                nursery.start_soon(s.run)
            await nursery.start(exporter.serve)
            yield exporter, servers
            nursery.cancel_scope.cancel()
    finally:
        for s in servers:
            s.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def attach(stack: ExitStack, server: DeviceServer) -> tuple[VfioUserClient, VirtioMemDriver, int]:
    """A client and an initialised driver on ``server`` (closed by ``stack``),
    and the device region's guest address."""
    with trio.fail_after(TIMEOUT):
        client = await VfioUserClient.connect(server.config.socket)
    stack.callback(client.close)
    driver = VirtioMemDriver(client)
    stack.callback(driver.close)
    with trio.fail_after(TIMEOUT):
        await driver.initialize()
        addr = (await driver.read_config()).addr
    return client, driver, addr


async def test_metrics_after_requests(exported) -> None:
    exporter, (d0, d1) = exported
    before = await scrape(exporter.url)
    assert before[key("vfiouser_vmem_client_connected", id="d0")] == 0
    assert before[key("vfiouser_vmem_requested_size_bytes", id="d0")] == 256 * MiB
    assert before[key("vfiouser_vmem_max_size_bytes", id="d1")] == 1 << 30
    assert not any(name == "vfiouser_vmem_requests_total" for name, _ in before)

    with ExitStack() as stack:
        client, driver, addr = await attach(stack, d0)
        with trio.fail_after(TIMEOUT):
            assert await driver.plug(addr, 4) == ACK               # 8 MiB
            assert await driver.plug(addr + 4 * BLOCK, 64) == ACK  # 128 MiB more
            assert await driver.plug(addr, 1) == ERROR             # already plugged
            assert await driver.plug(addr + 68 * BLOCK, 100) == NACK  # beyond requested-size
            assert await driver.state(addr, 68) == (ACK, PLUGGED)
            assert await driver.unplug(addr + 64 * BLOCK, 4) == ACK
            assert await driver.state(addr + 64 * BLOCK, 4) == (ACK, UNPLUGGED)
        # The guest writes 16 MiB of plugged memory: the backend holds it.
        info = await client.region_info(BAR2)
        import mmap

        bar = mmap.mmap(info.fd, 16 * MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        stack.callback(bar.close)
        bar[:] = b"\x5a" * (16 * MiB)

        s = await scrape(exporter.url)
        assert s[key("vfiouser_vmem_requests_total", id="d0", type="plug", response="ack")] == 2
        assert s[key("vfiouser_vmem_requests_total", id="d0", type="plug", response="error")] == 1
        assert s[key("vfiouser_vmem_requests_total", id="d0", type="plug", response="nack")] == 1
        assert s[key("vfiouser_vmem_requests_total", id="d0", type="state", response="ack")] == 2
        assert s[key("vfiouser_vmem_requests_total", id="d0", type="unplug", response="ack")] == 1
        assert s[key("vfiouser_vmem_request_duration_seconds_count", id="d0", type="plug")] == 4
        assert s[key("vfiouser_vmem_request_duration_seconds_bucket", id="d0", type="plug", le="+Inf")] == 4
        assert 0 < s[key("vfiouser_vmem_request_duration_seconds_sum", id="d0", type="plug")] < 4 * 1.0
        # Buckets from microseconds up.
        assert key("vfiouser_vmem_request_duration_seconds_bucket", id="d0", type="plug", le="5e-06") in s
        assert s[key("vfiouser_vmem_plugged_size_bytes", id="d0")] == 128 * MiB
        assert s[key("vfiouser_vmem_requested_size_bytes", id="d0")] == 256 * MiB
        assert s[key("vfiouser_vmem_block_size_bytes", id="d0")] == BLOCK
        assert s[key("vfiouser_vmem_usable_region_size_bytes", id="d0")] == 512 * MiB
        assert 16 * MiB <= s[key("vfiouser_vmem_backend_allocated_bytes", id="d0")] <= 17 * MiB
        assert s[key("vfiouser_vmem_client_connected", id="d0")] == 1
        assert s[key("vfiouser_vmem_client_connections_total", id="d0")] == 1
        assert s[key("vfiouser_vmem_device_info", id="d0", memdev="m0", socket=d0.config.socket, node="",
                     backend="memory-backend-memfd", page_size="4096", prealloc="off")] == 1
        assert s[key("vfiouser_vmem_prealloc_failures_total", id="d0")] == 0
        # The other device is untouched.
        assert s[key("vfiouser_vmem_plugged_size_bytes", id="d1")] == 0
        assert s[key("vfiouser_vmem_client_connections_total", id="d1")] == 0
        assert not any(name == "vfiouser_vmem_requests_total" and ("id", "d1") in labels for name, labels in s)

        with trio.fail_after(TIMEOUT):
            await client.reset()  # DEVICE_RESET: everything unplugged and discarded
            await d0.discards.wait_idle()  # discards run after the answer (discard.py)
        s = await scrape(exporter.url)
        assert s[key("vfiouser_vmem_resets_total", id="d0", kind="device")] == 1
        assert s[key("vfiouser_vmem_resets_total", id="d0", kind="lost_conn")] == 0
        assert s[key("vfiouser_vmem_plugged_size_bytes", id="d0")] == 0
        assert s[key("vfiouser_vmem_backend_allocated_bytes", id="d0")] == 0
        assert s[key("vfiouser_vmem_discard_pending_bytes", id="d0")] == 0
        # The UNPLUG of 8 MiB, then the reset's discard of the whole 1 GiB
        # device (reset means empty: docs/scrub.md).
        assert s[key("vfiouser_vmem_discarded_bytes_total", id="d0")] == 8 * MiB + d0.config.size_bytes
        assert s[key("vfiouser_vmem_discard_failures_total", id="d0")] == 0


async def test_a_failing_policy_is_answered_busy_and_counted(exported) -> None:
    exporter, (d0, d1) = exported

    class Broken:
        def decide(self, device, request):
            raise RuntimeError("policy bug")

    d0.set_policy(Broken())
    s = await scrape(exporter.url)
    assert s[key("vfiouser_vmem_hook_errors_total", id="d0", hook="policy")] == 0
    with ExitStack() as stack:
        _, driver, addr = await attach(stack, d0)
        with trio.fail_after(TIMEOUT):
            assert await driver.plug(addr, 1) == BUSY
            assert await driver.state(addr, 1) == (ACK, UNPLUGGED)
            d0.set_policy(None)
            assert await driver.plug(addr, 1) == ACK
    s = await scrape(exporter.url)
    assert s[key("vfiouser_vmem_hook_errors_total", id="d0", hook="policy")] == 1
    assert s[key("vfiouser_vmem_hook_errors_total", id="d0", hook="observer")] == 0
    assert s[key("vfiouser_vmem_requests_total", id="d0", type="plug", response="busy")] == 1
    assert s[key("vfiouser_vmem_hook_errors_total", id="d1", hook="policy")] == 0


async def test_http_details(exported) -> None:
    exporter, _ = exported
    base = exporter.url.rsplit("/", 1)[0]
    status, _, body = await trio.to_thread.run_sync(fetch, base + "/")
    assert status == 404 and b"/metrics" in body
    status, _, _ = await trio.to_thread.run_sync(lambda: fetch(exporter.url, "POST"))
    assert status == 405
    status, content_type, body = await trio.to_thread.run_sync(
        lambda: fetch(exporter.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}))
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, _, body = await trio.to_thread.run_sync(lambda: fetch(exporter.url, "HEAD"))
    assert status == 200 and body == b""

    def garbage() -> bytes:
        host, port = exporter.address
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(b"nonsense\r\n\r\n")
            return s.recv(100)

    assert (await trio.to_thread.run_sync(garbage)).startswith(b"HTTP/1.0 400")

    def oversize() -> int:
        conn = http.client.HTTPConnection(*exporter.address, timeout=TIMEOUT)
        try:
            conn.putrequest("GET", "/metrics")
            conn.putheader("X-Big", "x" * (20 << 10))
            conn.endheaders()
            return conn.getresponse().status
        finally:
            conn.close()

    assert await trio.to_thread.run_sync(oversize) == 431
    # Still serving after all that.
    assert (await scrape(exporter.url))[key("vfiouser_vmem_client_connected", id="d1")] == 0


async def test_own_registry_not_the_global_one(exported) -> None:
    from prometheus_client import REGISTRY

    exporter, _ = exported
    assert exporter.registry is not REGISTRY
    assert REGISTRY.get_sample_value("vfiouser_vmem_plugged_size_bytes", {"id": "d0"}) is None
    assert exporter.registry.get_sample_value("vfiouser_vmem_plugged_size_bytes", {"id": "d0"}) == 0


# ---------------------------------------------------------------------------
# No input on the metrics socket freezes the server or grows it without bound


async def _wait_until(condition, what: str) -> None:
    """Wait for ``condition()`` (server state), polling, bounded by 3 * TIMEOUT."""
    with trio.move_on_after(3 * TIMEOUT):
        while not condition():
            await trio.sleep(0.01)
        return
    pytest.fail(f"timed out waiting until {what}")


async def test_connections_are_bounded_and_a_scraper_still_gets_through(exported, caplog) -> None:
    """Idle connections (nothing sent) beyond the limit: the oldest are
    closed at once, without a response, with a WARNING; a scrape works."""
    from vfiouser_vmem.control import _metrics as metrics

    exporter, _ = exported
    host, port = exporter.address
    idle = []
    try:
        for _ in range(metrics.MAX_CONNECTIONS + 10):
            idle.append(await trio.open_tcp_stream(host, port))
            await trio.testing.wait_all_tasks_blocked()  # the server has taken it: connections age in this order
        for stream in idle[:10]:  # closed by the server, long before its request deadline
            with trio.fail_after(TIMEOUT):
                assert await stream.receive_some(100) == b""
        assert (await scrape(exporter.url))[key("vfiouser_vmem_client_connected", id="d0")] == 0
        assert exporter.open_connections <= metrics.MAX_CONNECTIONS
    finally:
        for stream in idle:
            await stream.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "vfiouser_vmem.metrics"
                and r.levelno == logging.WARNING]
    assert len(warnings) >= 10 and all("closing the oldest" in w for w in warnings), warnings


async def test_a_client_that_does_not_read_its_response_is_cut_off(exported, monkeypatch) -> None:
    """The response is sent under a deadline too: a client that never reads
    a large body does not hold its connection (and the body) forever."""
    from vfiouser_vmem.control import _metrics as metrics

    exporter, _ = exported
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.5)
    body = b"x" * (64 << 20)
    monkeypatch.setattr(exporter, "render", lambda accept="": (body, "text/plain"))
    host, port = exporter.address
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the server took it and waits for room to write
        await _wait_until(lambda: exporter.open_connections == 0, "the server gives up the connection")
        received = 0
        with trio.fail_after(TIMEOUT):
            try:
                while chunk := await stream.receive_some(1 << 20):
                    received += len(chunk)
            except trio.BrokenResourceError:
                pass
        assert received < len(body)
    finally:
        await stream.aclose()


async def test_a_request_that_trickles_in_gets_408_at_the_deadline(exported, monkeypatch) -> None:
    from vfiouser_vmem.control import _metrics as metrics

    exporter, _ = exported
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.5)
    host, port = exporter.address
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        answer = b""
        with trio.fail_after(TIMEOUT):
            while not answer.endswith(b"\r\n\r\n"):
                with trio.move_on_after(0.05):  # one more byte of the header every 50 ms, forever
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    answer += chunk
                    continue
                await stream.send_all(b"x")
        assert answer.startswith(b"HTTP/1.0 408 Request Timeout\r\n"), answer
    finally:
        await stream.aclose()


@pytest.mark.parametrize("seed", range(4))
async def test_garbage_requests_get_an_answer_and_no_traceback(exported, caplog, seed) -> None:
    import random

    exporter, _ = exported
    host, port = exporter.address
    rng = random.Random(seed)
    heads = [
        b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=abc\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\x00\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\nAccept: text/plain; version=" + bytes(range(256)) + b"\r\n\r\n",
        b"\x00\xff\x1b[2J\r\n\r\n",
        b"GET " + b"/" * 15000 + b" HTTP/1.0\r\n\r\n",
        rng.randbytes(rng.randint(1, 20000)) + b"\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\n" + rng.randbytes(2000).replace(b"\n", b"") + b"\r\n\r\n",
    ]

    def ask(head: bytes) -> bytes:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(head)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    for head in heads:
        answer = await trio.to_thread.run_sync(ask, head)
        assert answer.startswith(b"HTTP/1.0 "), (head[:80], answer[:80])
    status, _, body = await trio.to_thread.run_sync(
        lambda: fetch(exporter.url, headers={"Accept": "application/openmetrics-text; version=abc"}))
    assert status == 200 and b"vfiouser_vmem_plugged_size_bytes" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
