"""``vfiouser-vmem ctl`` (and ``serve`` with several devices), end to end.

``serve`` runs as a subprocess with two devices on two sockets in one
process, with metrics.  The test plays the guests: for each device a
``VfioUserClient`` + ``VirtioMemDriver`` (tests/vfio_user_client.py,
tests/virtio_driver.py) plug and unplug what the device asks for, as
Linux's virtio_mem driver would.  ``ctl`` runs as a subprocess too, from
the test's trio loop, so the "guest" acts while ``ctl`` waits.

Synchronisation: a resize is seen by the driver as a config interrupt (its
eventfd is awaited); ``ctl watch`` says on stderr when it is subscribed;
every wait is bounded by ``trio.fail_after``.  Nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proc_util import start_serve, terminate
from vfio_user_client import VfioUserClient
from virtio_driver import ACK, DEFAULT_BAR_ADDR, VirtioMemDriver

EXE = [sys.executable, "-m", "vfiouser_vmem.cli"]
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 2 * MiB
TIMEOUT = 30  # generous: a subprocess starts in well under a second


class ServedDevices:
    """``serve`` with vm0 (1 GiB) and vm1 (512 MiB) in one process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.qmp = str(tmp / "q")
        self.sockets = {"vm0": str(tmp / "vm0.sock"), "vm1": str(tmp / "vm1.sock")}
        self.proc, self.first_line = start_serve(
            "--qmp", self.qmp, "--metrics", "127.0.0.1:0",
            "--object", "memory-backend-memfd,id=mem0,size=1G",
            "--device", f"virtio-mem,id=vm0,memdev=mem0,socket={self.sockets['vm0']}",
            "--object", "memory-backend-memfd,id=mem1,size=512M",
            "--device", f"driver=virtio-mem,id=vm1,memdev=mem1,socket={self.sockets['vm1']},node=1")
        m = re.search(r"metrics on (http://\S+)", self.first_line)
        if not m:
            rc, err = self.stop()
            raise AssertionError(f"serve did not say where its metrics are ({rc}): {self.first_line!r}\n{err}")
        self.metrics_url = m.group(1)

    def stop(self) -> tuple[int, str]:
        return terminate(self.proc)


@pytest.fixture
def served():
    tmp = Path(tempfile.mkdtemp(prefix="vmem-", dir="/tmp"))
    server = None
    try:
        server = ServedDevices(tmp)
        yield server
        rc, err = server.stop()
        assert rc == 0, err
        assert list(tmp.iterdir()) == [], "serve left files behind"
    finally:
        if server is not None:
            server.stop()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


class Guest:
    """One device's guest driver, plugging from the start of the region."""

    def __init__(self, client: VfioUserClient, driver: VirtioMemDriver) -> None:
        self.client = client
        self.driver = driver
        self.plugged_blocks = 0

    async def config_changed(self) -> int:
        """Wait for a config interrupt; returns the requested size."""
        await self.driver.config_irq.wait(TIMEOUT)
        return (await self.driver.read_config()).requested_size

    async def plug_blocks(self, count: int) -> None:
        cfg = await self.driver.read_config()
        assert await self.driver.plug(cfg.addr + self.plugged_blocks * BLOCK, count) == ACK
        self.plugged_blocks += count

    async def unplug_blocks(self, count: int) -> None:
        cfg = await self.driver.read_config()
        self.plugged_blocks -= count
        assert await self.driver.unplug(cfg.addr + self.plugged_blocks * BLOCK, count) == ACK

    async def follow(self) -> None:
        """Do what Linux does on a config interrupt: reach the requested size."""
        requested = await self.config_changed()
        target = requested // BLOCK
        if target > self.plugged_blocks:
            await self.plug_blocks(target - self.plugged_blocks)
        elif target < self.plugged_blocks:
            await self.unplug_blocks(self.plugged_blocks - target)


@asynccontextmanager
async def guest(path: str, bar_addr: int = DEFAULT_BAR_ADDR) -> AsyncIterator[Guest]:
    with trio.fail_after(TIMEOUT):
        client = await VfioUserClient.connect(path)
    driver = VirtioMemDriver(client, bar_addr=bar_addr)
    try:
        with trio.fail_after(TIMEOUT):
            await driver.initialize()
        yield Guest(client, driver)
    finally:
        driver.close()
        client.close()


async def ctl(served: ServedDevices, *args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process([*EXE, "ctl", "--qmp", served.qmp, *args],
                                      capture_stdout=True, capture_stderr=True, check=False)


def text(result: subprocess.CompletedProcess) -> tuple[str, str]:
    return result.stdout.decode(), result.stderr.decode()


async def resize_and_follow(served: ServedDevices, g: Guest, dev_id: str, size: str) -> tuple[str, str]:
    """``ctl resize ID SIZE --wait`` while the guest follows; its output."""
    async with trio.open_nursery() as nursery:
        results = []

        async def run_ctl() -> None:
            results.append(await ctl(served, "resize", dev_id, size, "--wait", "--timeout", str(TIMEOUT)))

        nursery.start_soon(run_ctl)
        with trio.fail_after(TIMEOUT):
            await g.follow()
    (result,) = results
    out, err = text(result)
    assert result.returncode == 0, (out, err)
    return out, err


async def qmp_sizes(served: ServedDevices) -> dict[str, tuple[int, int]]:
    """{id: (size, requested-size)} from ``ctl info --json``."""
    result = await ctl(served, "info", "--json")
    assert result.returncode == 0, text(result)
    return {d["data"]["id"]: (d["data"]["size"], d["data"]["requested-size"]) for d in json.loads(result.stdout)}


# ---------------------------------------------------------------------------


async def test_two_devices_in_one_process_resized_independently(served: ServedDevices) -> None:
    assert "vm0 on" in served.first_line and "vm1 on" in served.first_line
    async with guest(served.sockets["vm0"]) as g0, guest(served.sockets["vm1"]) as g1:
        out, _ = await resize_and_follow(served, g0, "vm0", "64M")
        assert re.fullmatch(r"vm0: size 64 MiB reached after \d+\.\d\d s\n", out), out
        assert await qmp_sizes(served) == {"vm0": (64 * MiB, 64 * MiB), "vm1": (0, 0)}
        # vm1 saw nothing of it: no config interrupt, nothing requested.
        assert (await g1.driver.read_config()).requested_size == 0
        assert not g1.driver.config_irq.pending()

        out, _ = await resize_and_follow(served, g1, "vm1", "32M")
        assert out.startswith("vm1: size 32 MiB reached")
        assert await qmp_sizes(served) == {"vm0": (64 * MiB, 64 * MiB), "vm1": (32 * MiB, 32 * MiB)}
        assert not g0.driver.config_irq.pending()

        # Shrinking waits for the guest's unplugs in the same way.
        out, _ = await resize_and_follow(served, g0, "vm0", "0")
        assert out.startswith("vm0: size 0 B reached")
        assert await qmp_sizes(served) == {"vm0": (0, 0), "vm1": (32 * MiB, 32 * MiB)}


async def test_resize_without_wait_returns_at_once(served: ServedDevices) -> None:
    result = await ctl(served, "resize", "vm1", "16M")
    assert result.returncode == 0, text(result)
    assert text(result)[0] == "vm1: requested-size 16 MiB (size now 0 B)\n"
    assert await qmp_sizes(served) == {"vm0": (0, 0), "vm1": (0, 16 * MiB)}


async def test_resize_wait_times_out_with_exit_3_when_nobody_plugs(served: ServedDevices) -> None:
    result = await ctl(served, "resize", "vm1", "64M", "--wait", "--timeout", "0.5")
    out, err = text(result)
    assert result.returncode == 3, (out, err)
    assert out == ""
    assert "vm1: timed out after 0.5 s: size is 0 B (0), requested 64 MiB (67108864)" in err
    assert "the guest plugged nothing" in err


async def test_resize_wait_reports_where_the_guest_got_stuck(served: ServedDevices) -> None:
    async with guest(served.sockets["vm0"]) as g0:
        results = []

        async def run_ctl() -> None:
            results.append(await ctl(served, "resize", "vm0", "64M", "--wait", "--timeout", "1"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_ctl)
            assert await g0.config_changed() == 64 * MiB
            await g0.plug_blocks(8)  # 16 MiB of 64, then the guest stops
    out, err = text(results[0])
    assert results[0].returncode == 3, (out, err)
    assert "vm0: timed out after 1 s: size is 16 MiB (16777216), requested 64 MiB (67108864)" in err
    assert "still plugging (48 MiB to go)" in err


async def test_info_table(served: ServedDevices) -> None:
    async with guest(served.sockets["vm0"]) as g0:
        await resize_and_follow(served, g0, "vm0", "1G")
        assert (await ctl(served, "resize", "vm1", "128M")).returncode == 0
        result = await ctl(served, "info")
    out, err = text(result)
    assert result.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "SIZE", "REQUESTED", "MAX", "BLOCK", "NODE", "MEMADDR", "MEMDEV", "STATE"]
    assert re.fullmatch(r"vm0 +virtio-mem +1 GiB +1 GiB +1 GiB +2 MiB +0 +0x1000000000 +/objects/mem0 +ok", lines[1]), lines[1]
    assert re.fullmatch(r"vm1 +virtio-mem +0 B +128 MiB +512 MiB +2 MiB +1 +- +/objects/mem1 +growing", lines[2]), lines[2]
    assert lines[3] == "plugged in total: 1 GiB"
    assert len(lines) == 4


async def test_watch_count_streams_size_changes_of_the_chosen_device(served: ServedDevices) -> None:
    async with guest(served.sockets["vm0"]) as g0, guest(served.sockets["vm1"]) as g1:
        proc = await trio.lowlevel.open_process([*EXE, "ctl", "--qmp", served.qmp, "watch", "vm0", "--count", "2"],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(TIMEOUT):
                err = b""
                while b"watching" not in err:
                    chunk = await proc.stderr.receive_some()
                    assert chunk, f"ctl watch exited: {err!r}"
                    err += chunk
            assert (await ctl(served, "resize", "vm0", "8M")).returncode == 0
            assert (await ctl(served, "resize", "vm1", "8M")).returncode == 0
            assert await g0.config_changed() == 8 * MiB
            assert await g1.config_changed() == 8 * MiB
            await g0.plug_blocks(1)  # an event at once: 2 MiB
            await g1.plug_blocks(4)  # vm1's: not shown
            await g0.plug_blocks(3)  # inside vm0's rate-limit window: delivered at its end, 8 MiB
            out = b""
            with trio.fail_after(TIMEOUT):
                while True:
                    chunk = await proc.stdout.receive_some()
                    if not chunk:
                        break
                    out += chunk
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    lines = out.decode().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} vm0 size 2 MiB \(2097152\)", lines[0]), lines
    assert lines[1].endswith(" vm0 size 8 MiB (8388608)"), lines


async def test_ctl_errors(served: ServedDevices) -> None:
    cases = [
        (("resize", "nope", "1G"), 1, "vfiouser-vmem ctl: Device 'nope' not found"),
        (("resize", "vm0", "3M"), 1, "vfiouser-vmem ctl: 'requested-size' has to be multiples of 'block-size' (0x200000)"),
        (("resize", "vm0", "2G"), 1, "'requested-size' cannot exceed the memory backend size"),
        (("resize", "vm0", "1X"), 2, "invalid size '1X'"),
        (("resize", "vm0", "1G", "--timeout", "0"), 2, "not a positive number of seconds"),
        (("watch", "vm0", "--count", "0"), 2, "not a positive count"),
        (("watch", "nope"), 1, "Device 'nope' not found"),
        (("frobnicate",), 2, "invalid choice"),
    ]
    for args, rc, message in cases:
        result = await ctl(served, *args)
        out, err = text(result)
        assert result.returncode == rc, (args, out, err)
        assert message in err, (args, err)
    # Nothing was changed by the refused commands.
    assert await qmp_sizes(served) == {"vm0": (0, 0), "vm1": (0, 0)}
    # --qmp after the subcommand, or from the environment, works too.
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process([*EXE, "ctl", "info", "--qmp", served.qmp, "--json"],
                                        capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0 and len(json.loads(result.stdout)) == 2, result.stderr
        result = await trio.run_process([*EXE, "ctl", "resize", "vm1", "2M"], capture_stdout=True,
                                        capture_stderr=True, check=False,
                                        env={**os.environ, "VFIOUSER_VMEM_QMP": served.qmp})
        assert result.returncode == 0, result.stderr
    assert await qmp_sizes(served) == {"vm0": (0, 0), "vm1": (0, 2 * MiB)}


async def test_ctl_without_a_server() -> None:
    path = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")
    try:
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process([*EXE, "ctl", "--qmp", f"{path}/none", "info"],
                                            capture_stdout=True, capture_stderr=True, check=False)
            assert result.returncode == 1
            assert f"cannot connect to the QMP socket {path}/none" in result.stderr.decode()
            env = {k: v for k, v in os.environ.items() if k != "VFIOUSER_VMEM_QMP"}
            result = await trio.run_process([*EXE, "ctl", "info"], capture_stdout=True, capture_stderr=True,
                                            check=False, env=env)
            assert result.returncode == 2 and "--qmp PATH is required" in result.stderr.decode()
    finally:
        os.rmdir(path)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_one_device_losing_its_client_does_not_disturb_the_other(served: ServedDevices) -> None:
    async with guest(served.sockets["vm1"]) as g1:
        async with guest(served.sockets["vm0"]) as g0:
            await resize_and_follow(served, g0, "vm0", "16M")
        # vm0's "QEMU" is gone (its memory was unplugged with it); vm1 goes on.
        out, _ = await resize_and_follow(served, g1, "vm1", "32M")
        assert out.startswith("vm1: size 32 MiB reached")
        sizes = await qmp_sizes(served)
        assert sizes == {"vm0": (0, 16 * MiB), "vm1": (32 * MiB, 32 * MiB)}
        samples = await trio.to_thread.run_sync(scrape, served.metrics_url)
    assert samples[("vfiouser_vmem_resets_total", (("id", "vm0"), ("kind", "lost_conn")))] >= 1
    assert samples[("vfiouser_vmem_resets_total", (("id", "vm1"), ("kind", "lost_conn")))] == 0
    assert samples[("vfiouser_vmem_client_connected", (("id", "vm0"),))] == 0
    assert samples[("vfiouser_vmem_client_connected", (("id", "vm1"),))] == 1
    assert samples[("vfiouser_vmem_plugged_size_bytes", (("id", "vm1"),))] == 32 * MiB
    assert samples[("vfiouser_vmem_requests_total", (("id", "vm1"), ("response", "ack"), ("type", "plug")))] == 1
    assert samples[("vfiouser_vmem_requests_total", (("id", "vm0"), ("response", "ack"), ("type", "plug")))] == 1


async def test_sibling_memory_bars_are_reachable_and_shutdown_is_clean() -> None:
    """QEMU DMA-maps every device's memory BAR (without an fd) to every
    vfio-user device: a sibling's BAR is recognised like the device's own,
    and stopping the server with such mappings in place is clean."""
    tmp = Path(tempfile.mkdtemp(prefix="vmem-", dir="/tmp"))
    served = ServedDevices(tmp)
    try:
        vm1_bar = DEFAULT_BAR_ADDR + 4 * GiB
        async with guest(served.sockets["vm0"]) as g0, guest(served.sockets["vm1"], bar_addr=vm1_bar) as g1:
            await resize_and_follow(served, g1, "vm1", "16M")
            with trio.fail_after(TIMEOUT):
                # vm1's 512 MiB BAR, mapped to vm0 as QEMU does; and vm0's own.
                await g0.client.dma_map_no_fd(vm1_bar, 512 * MiB)
                await g0.client.dma_map_no_fd(DEFAULT_BAR_ADDR, GiB)
                await g1.client.dma_map_no_fd(DEFAULT_BAR_ADDR, GiB)  # and vm0's to vm1
            # Both devices still serve their guests.
            await resize_and_follow(served, g0, "vm0", "8M")
            rc, err = served.stop()  # with both clients still connected
    finally:
        served.stop()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    assert rc == 0, err
    assert "Traceback" not in err, err
    assert "without a file descriptor" not in err, err


# ---------------------------------------------------------------------------
# ctl against a QMP peer that misbehaves

_GREETING = b'{"QMP": {"version": {"qemu": {"major": 11, "minor": 1, "micro": 0}, "package": ""}, "capabilities": []}}\n'

#: What the fake peer does once it has accepted ctl's connection.
_PEERS = {
    "silent": [],  # accepts, never writes
    "garbage": [b"\x00\xffnot json\x1b[2J\n"],
    "closes mid-greeting": [b'{"QMP": {"vers', None],
    "greets, then silent": [_GREETING],
    "greets, then garbage": [_GREETING, b"]]]\n"],
    "greets, then closes mid-reply": [_GREETING, b'{"return": {}, "id": "ct', None],
    "greets, then an error that is not an object": [_GREETING, b'{"error": "boom", "id": "ctl-1"}\n'],
    "greets, then nesting too deep to parse": [_GREETING, b"[" * 200_000 + b"\n"],
    "a greeting that is not an object": [b'["QMP"]\n'],
}


@pytest.mark.parametrize("peer", list(_PEERS))
async def test_ctl_names_the_socket_when_the_qmp_peer_misbehaves(peer: str) -> None:
    """No traceback, whatever the peer does: a message naming the socket,
    exit 1, within --qmp-timeout when the peer says nothing."""
    tmp = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")
    path = f"{tmp}/peer.qmp"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await listener.bind(path)
        listener.listen()

        async def serve_one() -> None:
            conn, _ = await listener.accept()
            with conn:
                for chunk in _PEERS[peer]:
                    if chunk is None:
                        return  # closes
                    await trio.SocketStream(conn).send_all(chunk)
                    if chunk is _GREETING:  # wait for qmp_capabilities before the next message
                        await conn.recv(65536)
                await trio.sleep_forever()  # keeps the connection open, says nothing more

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            with trio.fail_after(TIMEOUT):
                result = await trio.run_process([*EXE, "ctl", "--qmp", path, "--qmp-timeout", "0.5", "info"],
                                                capture_stdout=True, capture_stderr=True, check=False)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out, err = text(result)
    assert result.returncode == 1, (out, err)
    assert "Traceback" not in err, err
    assert err.startswith("vfiouser-vmem ctl: ") and path in err, err
    assert len(err.splitlines()) == 1 and err.rstrip("\n").isprintable(), err  # peer bytes escaped
    assert out == ""


def test_ctl_help_documents_the_qmp_timeout(capsys) -> None:
    from vfiouser_vmem.cli import _main as cli
    from vfiouser_vmem.cli import _ctl as ctl

    for args in (["ctl", "--help"], ["ctl", "info", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(args)
        assert "--qmp-timeout S" in capsys.readouterr().out
    assert "--qmp-timeout S" in ctl.__doc__
