"""The human monitor: the executor's texts (QEMU 11.1's, recorded from the
kit's qemu-system-x86_64; docs/monitor.md), the QOM tree over QMP, and the
monitor socket (banner, prompt, echo, a client closing its sending side)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

import pytest
import trio
from fake_device import FakeDevice, GiB, MiB

from vfiouser_vmem import DeviceConfig, open_server
from vfiouser_vmem.control import QEMU_VERSION, MonitorServer, QmpServer
from vfiouser_vmem.control._hmp import parse_size, to_json_pretty
from vfiouser_vmem.control._monitor import Readline


def hmp(*devices: FakeDevice) -> Any:
    return QmpServer({d.id: d for d in devices}).hmp


def test_info_memory_devices_is_qemus_text() -> None:
    out = hmp(FakeDevice(max_size=GiB, memaddr=0x100000000, memdev="/objects/mem0")).execute("info memory-devices")
    assert out == ('Memory device [virtio-mem]: "vmem0"\r\n  memaddr: 0x100000000\r\n  node: 0\r\n'
                   "  requested-size: 0\r\n  size: 0\r\n  max-size: 1073741824\r\n  block-size: 2097152\r\n"
                   "  memdev: /objects/mem0\r\n")


def test_summary_numa_and_help() -> None:
    m = hmp(FakeDevice(size=4 * MiB))
    assert m.execute("info memory_size_summary") == "base memory: 0\r\nplugged memory: 4194304\r\n"
    assert m.run("info numa") == "1 nodes\nnode 0 cpus:\nnode 0 size: 4 MB\nnode 0 plugged: 4 MB\n"
    assert m.execute("help qom-get") == "qom-get path property -- print QOM property\r\n"
    assert m.execute("help qom-set") == ("qom-set [-j] path property value -- set QOM property.\r\n"
                                         "\t\t\t-j: the value is specified in json format.\r\n")
    assert m.execute("? info numa") == "info numa  -- show NUMA information\r\n"
    assert m.execute("help qom-get x") == "qom-get path property -- print QOM property\r\n"
    assert m.run("info").startswith("info memdev  -- show memory backends\ninfo memory-devices  -- show memory devices\n"
                                    "info memory_size_summary  -- ")
    assert m.run("help").splitlines()[0] == "help|? [cmd] -- show the help"


@pytest.mark.parametrize(("line", "text"), [
    ("xyz", "unknown command: 'xyz'\n"),
    ("  nope x", "unknown command: '  nope'\n"),
    ("  info  nope", "unknown command: '  info  nope'\n"),
    ("help nope", "unknown command: 'nope'\n"),
    ("help info nope", "unknown command: 'info nope'\n"),
    ("\xffab", "unknown command: '\xffab'\n"),
    ("info numa x", 'numa: extraneous characters at the end of line\nTry "help info numa" for more information\n'),
    ("  info  numa  x",
     'numa: extraneous characters at the end of line\nTry "help   info  numa" for more information\n'),
    ("qom-get", 'qom-get: string expected\nTry "help qom-get" for more information\n'),
    ("  qom-get", 'qom-get: string expected\nTry "help   qom-get" for more information\n'),
    ('qom-get "/obj', 'qom-get: string expected\nTry "help qom-get" for more information\n'),
    ("qom-set vmem0 requested-size", 'qom-set: string expected\nTry "help qom-set" for more information\n'),
    ("qom-set -x vmem0 requested-size 1",
     'qom-set: unsupported option -x\nTry "help qom-set" for more information\n'),
    ("qom-list", "/\n"),
    ("qom-list /nope", "Error: Device '/nope' not found\n"),
    ("qom-get /nope size", "Error: Device '/nope' not found\n"),
    ("qom-set vmem0 requested-size foo",
     "Error: Parameter 'requested-size' expects a non-negative number below 2^64\n"
     "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n"),
    ("qom-set vmem0 requested-size -1", "Error: Value '-1' is out of range for parameter 'requested-size'\n"),
    ("qom-set vmem0 requested-size 18446744073709551616",
     "Error: Value '18446744073709551616' is out of range for parameter 'requested-size'\n"),
    ("", ""),
])
def test_errors_are_qemus_text(line: str, text: str) -> None:
    assert hmp(FakeDevice()).run(line) == text


def test_qom_set_parses_sizes_and_json() -> None:
    dev = FakeDevice()
    m = hmp(dev)
    assert m.run("qom-set vmem0 requested-size 300M") == ""
    assert m.run("qom-get vmem0 requested-size") == "314572800\n"
    assert m.run("qom-set /machine/peripheral/vmem0 requested-size 0x200000") == ""
    assert dev.values["requested-size"] == 2 * MiB
    assert m.run("qom-set -j vmem0 requested-size 4194304") == ""
    assert dev.values["requested-size"] == 4 * MiB
    assert m.run('qom-get vmem0 "memdev"') == '"/objects/mem-vmem0"\n'
    assert m.run("qom-set -j vmem0 requested-size {").startswith("Error: 1:2: JSON parse error")


def test_parse_size_and_pretty_json() -> None:
    assert parse_size("x", "4G") == 4 << 30
    assert parse_size("x", "1.5G") == 1610612736
    assert parse_size("x", "1k") == 1024
    with pytest.raises(ValueError):
        parse_size("x", "1.5")
    assert to_json_pretty([]) == "[\n]"
    assert to_json_pretty([1, 2]) == "[\n    1,\n    2\n]"
    assert to_json_pretty("a\u00e9") == '"a\\u00E9"'


def test_readline_echo_is_qemus() -> None:
    rl = Readline()
    out = rl.show_prompt()
    for ch in b"ab\x1b[Dc":
        out += rl.feed(ch)[0]
    echo, line = rl.feed(10)
    assert out + echo == "(qemu) a\x1b[K\x1b[Dab\x1b[K\x1b[D\x1b[Dacb\x1b[K\x1b[D\n" and line == "acb"
    rl = Readline()
    rl.show_prompt()
    assert [rl.feed(c)[0] for c in b"in\x7f"] == ["i\x1b[K", "\x1b[Din\x1b[K", "\x1b[D\x1b[Di\x1b[K"]


# -- the QOM tree over QMP ---------------------------------------------------------


def qmp_call(server: QmpServer, name: str, **args: Any) -> Any:
    try:
        return {"return": server._handlers[name](None, args)}  # type: ignore[arg-type]
    except Exception as exc:
        return {"error": {"class": getattr(exc, "error_class", "?"), "desc": str(exc)}}


def test_qom_tree_paths() -> None:
    qmp = QmpServer({"vmem0": FakeDevice()})
    assert qmp_call(qmp, "qom-list", path="/")["return"] == [
        {"name": "type", "type": "string"}, {"name": "machine", "type": "child<container>"},
        {"name": "objects", "type": "child<container>"}]
    assert qmp_call(qmp, "qom-list", path="/machine/peripheral")["return"] == [
        {"name": "type", "type": "string"}, {"name": "vmem0", "type": "child<virtio-mem-pci>"}]
    for path in ("vmem0", "/machine/peripheral/vmem0", "/machine/peripheral/vmem0/virtio-backend",
                 "//machine/peripheral/vmem0/", "peripheral/vmem0"):
        assert qmp_call(qmp, "qom-get", path=path, property="size") == {"return": 0}, path
    assert qmp_call(qmp, "qom-get", path="/machine/peripheral/vmem0", property="type") == {"return": "virtio-mem-pci"}
    assert qmp_call(qmp, "qom-get", path="vmem0/virtio-backend", property="type") == {"return": "virtio-mem"}
    assert qmp_call(qmp, "qom-get", path="/objects", property="type") == {"return": "container"}
    assert qmp_call(qmp, "qom-list", path="/nope") == {
        "error": {"class": "DeviceNotFound", "desc": "Device '/nope' not found"}}
    assert qmp_call(qmp, "qom-list", path="")["error"]["desc"] == "Path '' is ambiguous"
    assert qmp_call(qmp, "x-query-numa") == {"return": {"human-readable-text": (
        "1 nodes\nnode 0 cpus:\nnode 0 size: 0 MB\nnode 0 plugged: 0 MB\n")}}
    assert qmp_call(qmp, "human-monitor-command", **{"command-line": "nope"}) == {
        "return": "unknown command: 'nope'\r\n"}


async def test_real_device_backend_in_the_tree() -> None:
    d = tempfile.mkdtemp(dir="/tmp", prefix="hmpt")
    try:
        cfg = DeviceConfig(socket=os.path.join(d, "v.sock"), size_bytes=GiB, id="vmem0", memdev="mem0", node=1)
        async with open_server([cfg], os.path.join(d, "qmp.sock")) as server:
            assert server.qmp_path
            from vfiouser_vmem.control._client import QmpClient

            def session() -> list[Any]:
                client = QmpClient(os.path.join(d, "qmp.sock"))
                try:
                    return [client.execute("qom-list", path="/objects"),
                            client.execute("qom-get", path="/objects/mem0", property="size"),
                            client.execute("qom-get", path="/objects/mem0", property="hugetlb"),
                            client.execute("qom-get", path="/machine/peripheral/vmem0/memdev", property="type"),
                            client.execute("x-query-numa"),
                            client.execute("human-monitor-command",
                                           **{"command-line": "qom-set /objects/mem0 size 2G"})]
                finally:
                    client.close()

            replies = await trio.to_thread.run_sync(session)
        assert replies[0] == [{"name": "type", "type": "string"}, {"name": "mem0", "type": "child<memory-backend-memfd>"}]
        assert replies[1:4] == [GiB, False, "memory-backend-memfd"]
        assert replies[4]["human-readable-text"].startswith("2 nodes\nnode 0 cpus:\nnode 0 size: 0 MB\n")
        assert replies[5] == "Error: cannot change property size of memory-backend-memfd \r\n"
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the socket ----------------------------------------------------------------------


def talk(path: str, data: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


BANNER = b"QEMU %d.%d.%d monitor - type 'help' for more information\r\n(qemu) " % QEMU_VERSION


async def test_monitor_socket_banner_prompt_and_half_close() -> None:
    d = tempfile.mkdtemp(dir="/tmp", prefix="hmpt")
    path = os.path.join(d, "mon.sock")
    try:
        server = MonitorServer(hmp(FakeDevice()), qemu_version=QEMU_VERSION, max_clients=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, path)
            assert os.stat(path).st_mode & 0o777 == 0o600
            out = await trio.to_thread.run_sync(talk, path, b"xyz\n\r\n")
            assert out == BANNER + b"x\x1b[K\x1b[Dxy\x1b[K\x1b[D\x1b[Dxyz\x1b[K\r\nunknown command: 'xyz'\r\n(qemu) " \
                + b"\r\n(qemu) \r\n(qemu) "
            out = await trio.to_thread.run_sync(talk, path, b"")
            assert out == BANNER
            # More clients than the limit: each is still served.
            outs = await trio.to_thread.run_sync(lambda: [talk(path, b"info numa\n") for _ in range(3)])
            assert all(o.endswith(b"\r\nnode 0 plugged: 0 MB\r\n(qemu) ") for o in outs)
            if shutil.which("nc"):
                proc = await trio.run_process(["nc", "-U", "-N", path], stdin=b"info memory-devices\n",
                                              capture_stdout=True, check=False)
                assert b'Memory device [virtio-mem]: "vmem0"\r\n' in proc.stdout
            nursery.cancel_scope.cancel()
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_monitor_socket_long_line_and_a_client_that_does_not_read() -> None:
    d = tempfile.mkdtemp(dir="/tmp", prefix="hmpt")
    path = os.path.join(d, "mon.sock")
    try:
        server = MonitorServer(hmp(FakeDevice()), qemu_version=QEMU_VERSION)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, path)
            stuck = socket.socket(socket.AF_UNIX)
            stuck.connect(path)
            stuck.sendall(b"a" * 5000 + b"\n")  # a quadratic echo it never reads
            out = await trio.to_thread.run_sync(talk, path, b"help qom-list\n")
            assert out.endswith(b"\r\nqom-list path -- list QOM properties\r\n(qemu) ")
            stuck.close()
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_query_memdev_and_info_memdev_show_the_backends() -> None:
    """QEMU 11.1's shapes (query_memdev, hmp_info_memdev), in the devices'
    order, each with this server's values (docs/backends.md)."""
    from vfiouser_vmem.control._client import QmpClient
    from vfiouser_vmem.vmem import MemoryBackendConfig

    d = tempfile.mkdtemp(dir="/tmp", prefix="hmpt")
    try:
        memfd = MemoryBackendConfig(id="mem0", size_bytes=GiB, policy="bind", host_nodes=(0,))
        file = MemoryBackendConfig(id="file1", size_bytes=GiB // 2, qom_type="memory-backend-file", mem_path=d,
                                   dump=True)
        configs = [DeviceConfig(socket=os.path.join(d, "v0.sock"), size_bytes=GiB, id="vm0", memory_backend=memfd),
                   DeviceConfig(socket=os.path.join(d, "v1.sock"), size_bytes=GiB // 2, id="vm1",
                                memory_backend=file)]
        async with open_server(configs, os.path.join(d, "qmp.sock")):
            def session() -> list[Any]:
                client = QmpClient(os.path.join(d, "qmp.sock"))
                try:
                    return [client.execute("query-memdev"),
                            client.execute("human-monitor-command", **{"command-line": "info memdev"})]
                finally:
                    client.close()

            memdevs, text = await trio.to_thread.run_sync(session)
        assert memdevs == [
            {"share": True, "reserve": True, "prealloc": False, "host-nodes": [0], "size": GiB, "merge": False,
             "dump": False, "policy": "bind", "id": "mem0"},
            {"share": True, "reserve": True, "prealloc": False, "host-nodes": [], "size": GiB // 2, "merge": False,
             "dump": True, "policy": "default", "id": "file1"}]
        assert text == ("memory backend: mem0\r\n  size:  1073741824\r\n  merge: false\r\n  dump: false\r\n"
                        "  prealloc: false\r\n  share: true\r\n  reserve: true\r\n  policy: bind\r\n"
                        "  host nodes: 0\r\n"
                        "memory backend: file1\r\n  size:  536870912\r\n  merge: false\r\n  dump: true\r\n"
                        "  prealloc: false\r\n  share: true\r\n  reserve: true\r\n  policy: default\r\n"
                        "  host nodes: \r\n\r\n")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("text, value", [
    ("017", 15), ("0x1f", 31), ("0X1F", 31), ("10", 10), ("0", 0), (" \t5", 5),
    # Python's int(text, 0) forms strtoull(3) does not read:
    ("0b11", -1), ("1_0", -1), ("08", -1), ("-1", -1), ("", -1), ("\u0661", -1), ("1" * 70, -1),
])
def test_hmp_integers_are_read_as_strtoull_with_base_0(text: str, value: int) -> None:
    from vfiouser_vmem.control._hmp import _strtou64
    assert _strtou64(text) == value
