"""The command line: bad flags are refused clearly; serve starts, answers
QMP, refuses bad values without changing anything, and stops cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from proc_util import terminate
from vfiouser_vmem.control import QmpClient
from vfiouser_vmem.errors import QmpError
from vfiouser_vmem.util.sizes import format_size, parse_size

EXE = [sys.executable, "-m", "vfiouser_vmem.cli"]


@pytest.mark.parametrize(
    "text, value",
    [("0", 0), ("4096", 4096), ("512M", 512 << 20), ("8G", 8 << 30), ("1T", 1 << 40), ("1.5G", 3 << 29),
     ("2m", 2 << 20), ("8GB", 8 << 30), ("8GiB", 8 << 30), ("1k", 1024)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "1X", "1.3B", "0x10", "1 G G", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("value, text", [(1 << 30, "1G"), (1536 << 20, "1536M"), (4097, "4097"), (0, "0")])
def test_format_size(value, text):
    assert format_size(value) == text
    assert parse_size(text) == value


@pytest.fixture
def tmp():
    path = Path(tempfile.mkdtemp(prefix="vmem-", dir="/tmp"))
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


def run_cli(*args, timeout=30):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "3M"], "not a positive multiple of the block size 2M"),
        (["--size", "8G", "--requested-size", "9G"], "above --size 8G"),
        (["--size", "8G", "--requested-size", "3M"], "not a multiple of the block size"),
        (["--size", "lots"], "invalid size 'lots'"),
        (["--size", "8G", "--block-size", "3M"], "not a power of two"),
        (["--size", "8G", "--block-size", "512K"], "below the minimum"),
        (["--size", "2T"], "above the supported maximum of 1T"),
        (["--size", "8G", "--node", "x"], "invalid node 'x'"),
        (["--size", "8G", "--node", "70000"], "expected 0-65535"),
    ],
)
def test_serve_refuses_bad_flags(tmp, flags, message):
    result = run_cli("serve", "--socket", str(tmp / "s"), "--qmp", str(tmp / "q"), *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp / "s").exists() and not (tmp / "q").exists()


def test_serve_requires_socket_size_and_qmp():
    result = run_cli("serve")
    assert result.returncode == 2
    assert "--socket" in result.stderr and "--size" in result.stderr and "--qmp" in result.stderr


class Served:
    def __init__(self, tmp: Path, *flags: str) -> None:
        self.sock = tmp / "vmem0.sock"
        self.qmp = tmp / "vmem0.qmp"
        self.proc = subprocess.Popen(
            [*EXE, "serve", "--socket", str(self.sock), "--qmp", str(self.qmp), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.first_line = self.proc.stdout.readline()

    def qmp_session(self):
        """A QMP client and ``execute(name, **args)`` giving the whole reply,
        ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``."""
        qmp = QmpClient(str(self.qmp), timeout_s=10)

        def execute(name, **args):
            try:
                return {"return": qmp.execute(name, **args)}
            except QmpError as exc:
                assert exc.error_class, exc  # an error reply, not a broken connection
                return {"error": {"class": exc.error_class, "desc": exc.desc}}

        return qmp, execute

    def stop(self) -> tuple[int, str]:
        return terminate(self.proc)


def test_serve_is_ready_before_first_line_and_stops_cleanly(tmp):
    served = Served(tmp, "--size", "8G", "--requested-size", "1G", "--id", "mem1", "--node", "1")
    try:
        assert "ready" in served.first_line and "mem1" in served.first_line
        # Both sockets listen once the first line is out, created 0600.
        for path in (served.sock, served.qmp):
            assert (os.stat(path).st_mode & 0o777) == 0o600
        qmp, execute = served.qmp_session()
        info = execute("query-memory-devices")["return"]
        assert info == [{"type": "virtio-mem", "data": {
            "id": "mem1", "memaddr": 0, "node": 1, "requested-size": 1 << 30, "size": 0,
            "max-size": 8 << 30, "block-size": 2 << 20, "memdev": "/objects/mem-mem1"}}]
        qmp.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err
    assert not served.sock.exists() and not served.qmp.exists()


def test_qom_set_bad_values_are_refused_and_change_nothing(tmp):
    served = Served(tmp, "--size", "4G")
    try:
        qmp, execute = served.qmp_session()
        for value, text in [(3 << 20, "'requested-size' has to be multiples of 'block-size' (0x200000)"),
                            (8 << 30, "'requested-size' cannot exceed the memory backend size(0x100000000)"),
                            ("1G", "expects uint64"), (-1, "expects uint64")]:
            reply = execute("qom-set", path="vmem0", property="requested-size", value=value)
            assert reply["error"]["class"] == "GenericError"
            assert text in reply["error"]["desc"], reply
        for prop in ("size", "block-size", "max-size"):
            reply = execute("qom-set", path="vmem0", property=prop, value=0)
            # QEMU names the alias's target (virtio-mem) for size and block-size.
            owner = "virtio-mem-pci" if prop == "max-size" else "virtio-mem"
            assert reply["error"]["desc"] == f"Property '{owner}.{prop}' is not writable"
        assert execute("qom-get", path="vmem0", property="requested-size") == {"return": 0}
        assert execute("qom-set", path="vmem0", property="requested-size", value=1 << 30) == {"return": {}}
        assert execute("qom-get", path="vmem0", property="requested-size") == {"return": 1 << 30}
        qmp.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err


def test_qom_set_refuses_values_outside_the_property_type_and_names_the_qom_type(tmp):
    """Out of range for the property's QOM type is a type error, as QEMU's
    visitors say it (qapi/qapi-visit-core.c, qobject-input-visitor.c), not a
    device limit; a read-only or unknown property is named TYPE.NAME, as
    qom/object.c does (the device is a virtio-mem-pci)."""
    served = Served(tmp, "--size", "4G")
    try:
        qmp, execute = served.qmp_session()
        uint32 = "Parameter 'x-fail-discards' expects uint32_t (0 to 4294967295), got {}"
        uint64 = "Parameter 'requested-size' expects uint64 (a byte count), got {}"
        cases = [
            ("x-fail-discards", 99999999999999999999, uint32.format(99999999999999999999)),
            ("x-fail-discards", 1 << 32, uint32.format(1 << 32)),
            ("x-fail-discards", -1, uint32.format(-1)),
            ("x-fail-discards", "3", uint32.format("'3'")),
            ("x-fail-discards", True, uint32.format(True)),
            ("requested-size", 1 << 64, uint64.format(1 << 64)),
            ("requested-size", 10 ** 30, uint64.format(10 ** 30)),
            ("size", 0, "Property 'virtio-mem.size' is not writable"),
            ("x-requests-pending", True, "Property 'virtio-mem-pci.x-requests-pending' is not writable"),
            ("nope", 1, "Property 'virtio-mem-pci.nope' not found"),
        ]
        for prop, value, desc in cases:
            reply = execute("qom-set", path="vmem0", property=prop, value=value)
            assert reply == {"error": {"class": "GenericError", "desc": desc}}, (prop, value)
        assert execute("qom-get", path="vmem0", property="nope") == {
            "error": {"class": "GenericError", "desc": "Property 'virtio-mem-pci.nope' not found"}}
        # The ends of the ranges are values like any other.
        assert execute("qom-set", path="vmem0", property="x-fail-discards", value=(1 << 32) - 1) == {"return": {}}
        assert execute("qom-get", path="vmem0", property="x-fail-discards") == {"return": (1 << 32) - 1}
        assert execute("qom-set", path="vmem0", property="x-fail-discards", value=0) == {"return": {}}
        reply = execute("qom-set", path="vmem0", property="requested-size", value=(1 << 64) - 1)
        assert "cannot exceed the memory backend size" in reply["error"]["desc"], reply
        assert execute("qom-get", path="vmem0", property="requested-size") == {"return": 0}
        qmp.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err


def test_serve_accepts_a_1t_device_sparsely(tmp):
    served = Served(tmp, "--size", "1T")
    try:
        assert "ready" in served.first_line
        qmp, execute = served.qmp_session()
        assert execute("qom-get", path="vmem0", property="max-size") == {"return": 1 << 40}
        qmp.close()
        rss_kib = int(next(line for line in Path(f"/proc/{served.proc.pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")).split()[1])
        assert rss_kib < 512 * 1024, "a 1 TiB backend must be sparse"
    finally:
        rc, err = served.stop()
    assert rc == 0, err


def test_serve_refuses_a_path_that_is_not_a_socket(tmp):
    (tmp / "vmem0.sock").write_text("precious")
    served = Served(tmp, "--size", "1G")
    rc, err = served.stop()
    assert rc == 1
    assert "exists and is not a socket" in err
    assert (tmp / "vmem0.sock").read_text() == "precious"


def test_second_server_on_the_same_socket_is_refused_and_the_first_lives_on(tmp):
    first = Served(tmp, "--size", "1G")
    try:
        assert "ready" in first.first_line
        second = subprocess.run([*EXE, "serve", "--socket", str(first.sock), "--qmp", str(tmp / "other.qmp"),
                                 "--size", "1G"], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "another process is already listening on this socket" in second.stderr
        # The refusal did not disturb the first server (no test connection).
        qmp, execute = first.qmp_session()
        assert execute("qom-get", path="vmem0", property="size") == {"return": 0}
        qmp.close()
        assert first.proc.poll() is None
    finally:
        rc, err = first.stop()
    assert rc == 0, err
    assert "refused a vfio-user client" not in err


# ---------------------------------------------------------------------------
# QEMU-style configuration: --object/--device, --config FILE

from vfiouser_vmem import cli  # noqa: E402
from vfiouser_vmem.cli._config import ConfigError, build_configs, device_spec, load_config_file, object_spec, parse_keyval  # noqa: E402


@pytest.mark.parametrize(
    "text, implied, expected",
    [
        ("id=mem0,size=8G", "qom-type", {"id": "mem0", "size": "8G"}),
        ("memory-backend-memfd,id=mem0", "qom-type", {"qom-type": "memory-backend-memfd", "id": "mem0"}),
        ("virtio-mem,id=vm0", "driver", {"driver": "virtio-mem", "id": "vm0"}),
        ("id=vm0,socket=/tmp/a,,b", "driver", {"id": "vm0", "socket": "/tmp/a,b"}),
        ("socket=/x,,,,y,id=a", None, {"socket": "/x,,y", "id": "a"}),
        ("key=a=b", None, {"key": "a=b"}),
        ("key=", None, {"key": ""}),
        ("id=a,,", None, {"id": "a,"}),  # ",," is an escaped comma, not an empty item
    ],
)
def test_parse_keyval(text, implied, expected):
    assert parse_keyval(text, implied) == expected


@pytest.mark.parametrize(
    "text, implied, message",
    [
        ("", "driver", "empty"),
        ("id=a,", None, "empty item"),
        (",id=a", "driver", "empty item"),
        ("id=a,b", "driver", "expected key=value, got 'b'"),
        ("bare", None, "expected key=value, got 'bare'"),
        ("id=a,id=b", None, "key 'id' given twice"),
        ("=x", None, "empty key"),
        ("virtio-mem,driver=virtio-mem", "driver", "key 'driver' given twice"),
    ],
)
def test_parse_keyval_refuses(text, implied, message):
    with pytest.raises(ConfigError, match=message):
        parse_keyval(text, implied)


def _configs(objects, devices, qmp=None):
    return build_configs([object_spec(t) for t in objects], [device_spec(t) for t in devices], qmp_path=qmp,
                         need_directories=True)


def test_build_configs_two_devices():
    configs = _configs(
        ["memory-backend-memfd,id=mem0,size=8G", "id=mem1,size=4G,share=on"],
        ["id=vm0,memdev=mem0,socket=/tmp/vm0.sock,requested-size=1G,node=0",
         "virtio-mem-pci,id=vm1,memdev=mem1,socket=/tmp/vm1.sock,block-size=4M"],
    )
    assert [(c.id, c.memdev, c.socket, c.size_bytes, c.block_size_bytes, c.requested_size_bytes, c.node)
            for c in configs] == [
        ("vm0", "mem0", "/tmp/vm0.sock", 8 << 30, 2 << 20, 1 << 30, 0),
        ("vm1", "mem1", "/tmp/vm1.sock", 4 << 30, 4 << 20, 0, None),
    ]


OK_OBJ = "memory-backend-memfd,id=mem0,size=1G"
OK_DEV = "id=vm0,memdev=mem0,socket=/tmp/vm0.sock"


@pytest.mark.parametrize(
    "objects, devices, message",
    [
        ([OK_OBJ], [], "no device configured"),
        ([OK_OBJ], [OK_DEV + ",bogus=1"], "unknown key 'bogus'"),
        ([OK_OBJ + ",bogus=1"], [OK_DEV], "unknown key 'bogus'"),
        ([OK_OBJ], [OK_DEV + ",size=1G"], "size= is not accepted: the device's maximum size is its memdev's size"),
        (["memory-backend-ram,id=mem0,size=1G"], [OK_DEV], "memory-backend-ram is not possible: QEMU maps the device's memory from the server.*write memory-backend-memfd"),
        (["memory-backend-file,id=mem0,size=1G,mem-path=/tmp"], [OK_DEV], "share=off \\(memory-backend-file's default\\) is not possible.*write share=on"),
        (["memory-backend-file,id=mem0,size=1G,share=on"], [OK_DEV], "mem-path= is required"),
        (["memory-backend-file,id=mem0,size=1G,share=on,mem-path=/nonexistent/dir/f"], [OK_DEV], "mem-path '/nonexistent/dir/f': the directory '/nonexistent/dir' does not exist"),
        (["memory-backend-file,id=mem0,size=1G,share=on,mem-path=/tmp,readonly=on"], [OK_DEV], "readonly= is not accepted: the guest plugs and writes"),
        (["memory-backend-file,id=mem0,size=1G,share=on,mem-path=/tmp,pmem=on"], [OK_DEV], "pmem= is not accepted"),
        (["memory-backend-file,id=mem0,size=1G,share=on,mem-path=/tmp,align=2M"], [OK_DEV], "align= is not accepted"),
        (["memory-backend-file,id=mem0,size=1G,share=on,mem-path=/tmp,hugetlb=on"], [OK_DEV], "unknown key 'hugetlb'"),
        (["memory-backend-memfd,id=mem0,size=1G,mem-path=/tmp"], [OK_DEV], "unknown key 'mem-path'"),
        ([OK_OBJ + ",prealloc=on"], [OK_DEV], "prealloc=on is not accepted: .*specify 'prealloc=on' for the virtio-mem device"),
        ([OK_OBJ + ",merge=on"], [OK_DEV], "merge=on is not possible: KSM merges private anonymous memory only"),
        ([OK_OBJ + ",policy=bind"], [OK_DEV], "host-nodes must be set for policy bind"),
        ([OK_OBJ + ",host-nodes=0"], [OK_DEV], "host-nodes must be empty for policy default"),
        ([OK_OBJ + ",policy=sometimes,host-nodes=0"], [OK_DEV], "policy 'sometimes' is not one of default, preferred, bind, interleave"),
        ([OK_OBJ + ",policy=bind,host-nodes=x"], [OK_DEV], "host-nodes: expected node numbers"),
        ([OK_OBJ + ",policy=bind,host-nodes=200"], [OK_DEV], "Invalid host-nodes value: 200"),
        ([OK_OBJ + ",policy=bind,host-nodes=0-100"], [OK_DEV], "host-nodes 1,2,.*this host has no such NUMA node \\(it has 0"),
        ([OK_OBJ + ",seal=perhaps"], [OK_DEV], "seal: expected on or off"),
        ([OK_OBJ], [OK_DEV + ",prealloc=yes please"], "prealloc: expected on or off"),
        ([OK_OBJ], [OK_DEV + ",unplugged-access=kill"], "unplugged-access 'kill' is not one of reclaim, report, disconnect"),
        ([OK_OBJ], [OK_DEV + ",scrub-interval=-1"], "scrub-interval: expected a number of seconds >= 0, got '-1'"),
        ([OK_OBJ], [OK_DEV + ",scrub-interval=soon"], "scrub-interval: expected a number of seconds"),
        ([OK_OBJ], ["virtio-net,id=vm0,memdev=mem0,socket=/tmp/s"], "driver 'virtio-net' is not supported"),
        ([OK_OBJ], ["id=vm0,socket=/tmp/vm0.sock"], "memdev= is required"),
        ([OK_OBJ], ["id=vm0,memdev=nope,socket=/tmp/vm0.sock"], "memdev 'nope' is not an object id \\(objects: mem0\\)"),
        ([OK_OBJ], [OK_DEV, "id=vm1,memdev=mem0,socket=/tmp/vm1.sock"], "memdev 'mem0' is already used by --device 'id=vm0"),
        ([OK_OBJ, "id=mem1,size=1G"], [OK_DEV, "id=vm0,memdev=mem1,socket=/tmp/vm1.sock"], "duplicate device id 'vm0'"),
        ([OK_OBJ, "id=mem0,size=2G"], [OK_DEV], "duplicate object id 'mem0'"),
        ([OK_OBJ, "id=mem1,size=1G"], [OK_DEV, "id=vm1,memdev=mem1,socket=/tmp/../tmp/vm0.sock"], "socket '/tmp/../tmp/vm0.sock' is already used"),
        ([OK_OBJ, "id=mem1,size=1G"], [OK_DEV], "object 'mem1' is not used by any device"),
        ([OK_OBJ], ["memdev=mem0,socket=/tmp/vm0.sock"], "id= is required \\(the name used over QMP\\)"),
        ([OK_OBJ], ["id=0bad,memdev=mem0,socket=/tmp/s"], "id '0bad' is not a valid QEMU id"),
        (["size=1G"], [OK_DEV], "id= is required"),
        (["id=mem0"], [OK_DEV], "size= is required"),
        (["id=mem0,size=0"], [OK_DEV], "size must be positive"),
        (["id=mem0,size=lots"], [OK_DEV], "size: invalid size 'lots'"),
        (["id=mem0,size=2T"], [OK_DEV], "above the supported maximum of 1T"),
        (["id=mem0,size=3M"], [OK_DEV], "size 3M is not a positive multiple of the block size 2M"),
        ([OK_OBJ], [OK_DEV + ",requested-size=3M"], "requested-size 3M is not a multiple of the block size 2M"),
        ([OK_OBJ], [OK_DEV + ",requested-size=2G"], "requested-size 2G is above the size 1G"),
        ([OK_OBJ], [OK_DEV + ",block-size=3M"], "not a power of two"),
        ([OK_OBJ], [OK_DEV + ",block-size=512K"], "below the minimum"),
        ([OK_OBJ], [OK_DEV + ",node=x"], "node: expected a NUMA node number 0-65535, got 'x'"),
        ([OK_OBJ], [OK_DEV + ",node=65536"], "node: expected a NUMA node number"),
        ([OK_OBJ + ",share=off"], [OK_DEV], "share=off is not possible"),
        ([OK_OBJ + ",share=maybe"], [OK_DEV], "share: expected on or off"),
        ([OK_OBJ + ",hugetlbsize=2M"], [OK_DEV], "hugetlbsize= needs hugetlb=on"),
        ([OK_OBJ + ",hugetlb=on,hugetlbsize=1K"], [OK_DEV], "hugetlbsize 1K is not a huge page size of this host \\(it has 2M, 1G"),
        ([OK_OBJ], ["id=vm0,memdev=mem0,socket=/tmp/" + "x" * 120], "longer than the 107 bytes"),
        ([OK_OBJ], [OK_DEV], "is the QMP socket too"),
    ],
)
def test_build_configs_refuses(objects, devices, message):
    with pytest.raises(ConfigError, match=message) as info:
        _configs(objects, devices, qmp="/tmp/vm0.sock" if message == "is the QMP socket too" else None)
    # The message names the option it is about.
    assert str(info.value).startswith(("--object", "--device", "no device"))


def test_hugetlb_defaults_the_block_size_to_the_huge_page_size():
    from vfiouser_vmem.util.hostmem import default_huge_page_size, huge_page_sizes

    huge = default_huge_page_size()
    assert huge is not None, "these machines have huge pages (/sys/kernel/mm/hugepages)"
    (config,) = _configs([OK_OBJ + ",hugetlb=on"], [OK_DEV])
    assert config.memory_backend.hugetlb and config.block_size_bytes == max(huge, 2 << 20)
    # QEMU's virtio_mem_default_block_size: the page size of a huge page backend.
    (config,) = _configs([OK_OBJ + ",hugetlb=on,hugetlbsize=1G"], [OK_DEV])
    assert 1 << 30 in huge_page_sizes() and config.block_size_bytes == 1 << 30


def run_main(capsys, *args):
    """cli.main in this process: (exit code, stdout, stderr)."""
    try:
        rc = cli.main(list(args))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--object", OK_OBJ, "--device", OK_DEV, "--socket", "/tmp/x"], "--socket (one device) cannot be combined"),
        (["--object", OK_OBJ, "--device", OK_DEV, "--config", "/nonexistent.toml"], "--config cannot be combined"),
        (["--object", OK_OBJ], "--object given without any --device"),
        (["--object", OK_OBJ, "--device", "id=vm0,memdev=mem1,socket=/tmp/s"], "memdev 'mem1' is not an object id"),
        (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
        (["--socket", "/tmp/s", "--size", "1G", "--metrics", "0.0.0.0:9100"], "--metrics: 0.0.0.0 is not a loopback address"),
        (["--socket", "/tmp/s", "--size", "1G", "--metrics", "9100"], "--metrics: invalid address '9100'"),
        (["--socket", "/tmp/s", "--size", "1G", "--metrics", ":99999"], "invalid port 99999"),
        (["--socket", "/tmp/s", "--size", "1G", "--metrics-allow-remote"], "--metrics-allow-remote needs --metrics"),
        (["--socket", "/tmp/s", "--size", "1G", "--socket-group", "no-such-group-here"], "no group named 'no-such-group-here'"),
    ],
)
def test_serve_refuses_bad_configuration(tmp, capsys, flags, message):
    rc, out, err = run_main(capsys, "serve", "--qmp", str(tmp / "q"), *flags)
    assert rc == 2
    assert message in err
    assert out == ""
    assert list(tmp.iterdir()) == []


def test_serve_refuses_bad_devices_end_to_end_with_exit_2(tmp):
    result = run_cli("serve", "--qmp", str(tmp / "q"), "--object", "memory-backend-memfd,id=mem0,size=1G",
                     "--device", f"id=vm0,memdev=mem0,socket={tmp}/a.sock",
                     "--object", "memory-backend-memfd,id=mem1,size=1G",
                     "--device", f"id=vm0,memdev=mem1,socket={tmp}/b.sock")
    assert result.returncode == 2
    assert "duplicate device id 'vm0'" in result.stderr
    assert list(tmp.iterdir()) == []


TOML = """\
qmp = "{qmp}"

[[object]]
qom-type = "memory-backend-memfd"
id = "mem0"
size = "1G"

[[object]]
id = "mem1"
size = 536870912

[[device]]
driver = "virtio-mem"
id = "vm0"
memdev = "mem0"
socket = "{dir}/vm0.sock"
requested-size = "256M"
node = 0

[[device]]
id = "vm1"
memdev = "mem1"
socket = "{dir}/vm1.sock"
block-size = "4M"
"""


def test_config_file(tmp):
    path = tmp / "vmem.toml"
    path.write_text(TOML.format(qmp=tmp / "q", dir=tmp))
    file_config = load_config_file(str(path))
    assert file_config.qmp == str(tmp / "q")
    configs = build_configs(file_config.objects, file_config.devices)
    assert [(c.id, c.memdev, c.size_bytes, c.block_size_bytes, c.requested_size_bytes, c.node) for c in configs] == [
        ("vm0", "mem0", 1 << 30, 2 << 20, 256 << 20, 0), ("vm1", "mem1", 512 << 20, 4 << 20, 0, None)]


def test_config_file_backend_keys(tmp):
    """QEMU's backend keys in TOML: booleans or "on"/"off", host-nodes as a
    list or QEMU's string, the device's prealloc (docs/backends.md)."""
    path = tmp / "vmem.toml"
    path.write_text(f"""
[[object]]
qom-type = "memory-backend-file"
id = "mem0"
size = "1G"
mem-path = "/dev/shm"
share = true
discard-data = "on"
policy = "bind"
host-nodes = [0]
dump = "on"

[[object]]
id = "mem1"
size = "1G"
seal = false
reserve = "off"
policy = "preferred"
host-nodes = "0"

[[device]]
id = "vm0"
memdev = "mem0"
socket = "{tmp}/vm0.sock"
prealloc = true

[[device]]
id = "vm1"
memdev = "mem1"
socket = "{tmp}/vm1.sock"
""")
    file_config = load_config_file(str(path))
    vm0, vm1 = build_configs(file_config.objects, file_config.devices, need_directories=True)
    m0, m1 = vm0.memory_backend, vm1.memory_backend
    assert (m0.qom_type, m0.mem_path, m0.discard_data, m0.policy, m0.host_nodes, m0.dump) == (
        "memory-backend-file", "/dev/shm", True, "bind", (0,), True)
    assert (m1.qom_type, m1.seal, m1.reserve, m1.policy, m1.host_nodes, m1.dump) == (
        "memory-backend-memfd", False, False, "preferred", (0,), False)
    assert vm0.prealloc and not vm1.prealloc
    assert (vm0.scrub_interval_s, vm0.unplugged_access) == (10.0, "reclaim")


def test_scrub_keys():
    (config,) = _configs([OK_OBJ], [OK_DEV + ",scrub-interval=0.5,unplugged-access=disconnect"])
    assert (config.scrub_interval_s, config.unplugged_access) == (0.5, "disconnect")


def test_host_nodes_forms():
    (config,) = _configs([OK_OBJ + ",policy=interleave,host-nodes=0,host-nodes=0-0"], [OK_DEV])
    assert config.memory_backend.host_nodes == (0,)
    assert config.memory_backend.mpol() == (3, [1, 0], 2)  # MPOL_INTERLEAVE, node 0, maxnode one past it + 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[object]\n", "not valid TOML"),
        ("qmpp = 'x'\n", "unknown top-level key 'qmpp'"),
        ("[object]\nid = 'a'\n", "'object' must be an array of tables, written \\[\\[object\\]\\]"),
        ("qmp = 3\n", "qmp must be a string"),
        ("[[object]]\nid='mem0'\nsize=true\n[[device]]\nid='vm0'\nmemdev='mem0'\nsocket='/tmp/s'\n",
         r"\[\[object\]\] #1: size: expected a size"),
        ("[[object]]\nid='mem0'\nsize='1G'\n[[device]]\nid='vm0'\nmemdev='mem0'\nsocket='/tmp/s'\nnode='x'\n",
         r"\[\[device\]\] #1: node: expected a NUMA node number"),
        ("[[object]]\nid='mem0'\nsize='1G'\n[[device]]\nid='vm0'\nmemdev='mem0'\nsocket=5\n",
         r"\[\[device\]\] #1: socket must be a string"),
    ],
)
def test_config_file_refuses(tmp, text, message):
    path = tmp / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        f = load_config_file(str(path))
        build_configs(f.objects, f.devices)


def test_serve_config_file_runs_two_devices(tmp):
    path = tmp / "vmem.toml"
    path.write_text(TOML.format(qmp=tmp / "q", dir=tmp))
    proc = subprocess.Popen([*EXE, "serve", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "ready: vm0 on" in line and "vm1 on" in line, proc.stderr.read() if proc.poll() is not None else line
        with QmpClient(str(tmp / "q"), timeout_s=10) as qmp:
            devices = qmp.execute("query-memory-devices")
        assert [(d["data"]["id"], d["data"]["memdev"], d["data"]["max-size"]) for d in devices] == [
            ("vm0", "/objects/mem0", 1 << 30), ("vm1", "/objects/mem1", 512 << 20)]
        for name in ("vm0.sock", "vm1.sock", "q"):
            assert (os.stat(tmp / name).st_mode & 0o777) == 0o600
    finally:
        terminate(proc)
    assert proc.returncode == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["vmem.toml"]


def test_serve_socket_group_makes_sockets_0660(tmp):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    served = Served(tmp, "--size", "1G", "--socket-group", group)
    try:
        assert "ready" in served.first_line
        for path in (served.sock, served.qmp):
            st = os.stat(path)
            assert (st.st_mode & 0o777) == 0o660 and st.st_gid == os.getgid()
    finally:
        rc, err = served.stop()
    assert rc == 0, err


# ---------------------------------------------------------------------------
# qemu-args


def sh_words(text: str) -> list[str]:
    """What sh makes of ``text`` as arguments (the real shell's quoting)."""
    out = subprocess.run(["sh", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "sh", text],
                         capture_output=True, check=True).stdout.decode()
    return out.split("\0")[:-1]


def test_qemu_args_single_device_shell_and_json(capsys):
    rc, out, err = run_main(capsys, "qemu-args", "--socket", "/tmp/it's here.sock", "--size", "8G", "--ram", "2G")
    assert rc == 0 and err == ""
    expected = ["-machine", "q35,memory-backend=ram0", "-m", "2G",
                "-object", "memory-backend-memfd,id=ram0,size=2G,share=on",
                "-device", '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/tmp/it\'s here.sock"}}']
    assert sh_words(out) == expected
    rc, out, err = run_main(capsys, "qemu-args", "--socket", "/tmp/it's here.sock", "--size", "8G", "--ram", "2G",
                            "--format", "json", "--qmp", "/tmp/ignored.qmp")
    assert rc == 0 and json.loads(out) == expected


def test_qemu_args_several_devices_in_order(capsys, tmp):
    rc, out, _ = run_main(capsys, "qemu-args", "--format", "json",
                          "--object", "id=mem0,size=1G", "--device", "id=vm0,memdev=mem0,socket=/tmp/b.sock",
                          "--object", "id=mem1,size=1G", "--device", "id=vm1,memdev=mem1,socket=/tmp/a.sock")
    argv = json.loads(out)
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    assert [d["socket"]["path"] for d in devices] == ["/tmp/b.sock", "/tmp/a.sock"]
    assert all(d["driver"] == "vfio-user-pci" and d["socket"]["type"] == "unix" for d in devices)
    assert "-cpu" not in argv and "-numa" not in argv
    assert argv[argv.index("-m") + 1] == "1G"


@pytest.mark.parametrize(
    "sizes, phys_bits",
    [
        (["256G"], False),     # a 256 GiB BAR: placed with the default 40 bits
        (["257G"], True),      # a 512 GiB BAR
        (["1T"], True),
        (["128G", "64G"], False),
        (["256G", "2G"], True),  # BARs of 258 GiB together
    ],
)
def test_qemu_args_phys_bits_rule(capsys, sizes, phys_bits):
    flags = []
    for i, size in enumerate(sizes):
        flags += ["--object", f"id=mem{i},size={size}", "--device", f"id=vm{i},memdev=mem{i},socket=/tmp/{i}.sock"]
    rc, out, err = run_main(capsys, "qemu-args", "--format", "json", *flags)
    argv = json.loads(out)
    assert rc == 0
    if phys_bits:
        assert argv[argv.index("-cpu") + 1] == "qemu64,phys-bits=46"
        assert "phys-bits" in err
    else:
        assert "-cpu" not in argv and err == ""


def test_qemu_args_numa_nodes(capsys):
    rc, out, err = run_main(capsys, "qemu-args", "--format", "json", "--ram", "1G",
                            "--object", "id=mem0,size=1G", "--device", "id=vm0,memdev=mem0,socket=/tmp/0.sock,node=2")
    argv = json.loads(out)
    assert rc == 0
    # No memory-backend= on -machine: QEMU refuses it together with -numa memdev.
    assert argv[:4] == ["-machine", "q35", "-m", "1G"]
    assert argv[4:16] == [
        "-object", "memory-backend-memfd,id=ram0,size=344M,share=on", "-numa", "node,nodeid=0,memdev=ram0",
        "-object", "memory-backend-memfd,id=ram1,size=340M,share=on", "-numa", "node,nodeid=1,memdev=ram1",
        "-object", "memory-backend-memfd,id=ram2,size=340M,share=on", "-numa", "node,nodeid=2,memdev=ram2",
    ]
    assert "split over NUMA nodes 0-2" in err
    rc, out, err = run_main(capsys, "qemu-args", "--socket", "/tmp/s", "--size", "1G", "--node", "0", "--format", "json")
    assert json.loads(out)[:8] == ["-machine", "q35", "-m", "1G", "-object", "memory-backend-memfd,id=ram0,size=1G,share=on",
                                   "-numa", "node,nodeid=0,memdev=ram0"]
    assert err == ""
    rc, out, err = run_main(capsys, "qemu-args", "--socket", "/tmp/s", "--size", "1G", "--node", "3", "--ram", "6M")
    assert rc == 2 and "--ram 6M is too small to give each of 4 NUMA nodes 2M" in err


def test_qemu_args_refuses_like_serve(capsys):
    rc, _, err = run_main(capsys, "qemu-args", "--object", "id=mem0,size=1G",
                          "--device", "id=vm0,memdev=mem0,socket=/tmp/s,block-size=3M")
    assert rc == 2 and "not a power of two" in err
    rc, _, err = run_main(capsys, "qemu-args", "--socket", "/tmp/s", "--size", "1G", "--ram", "0")
    assert rc == 2 and "--ram must be positive" in err


def test_help_documents_exit_codes(capsys):
    for args in (["--help"], ["serve", "--help"], ["ctl", "--help"], ["ctl", "resize", "--help"], ["qemu-args", "--help"]):
        rc, out, _ = run_main(capsys, *args)
        assert rc == 0
        assert "3  ctl resize --wait" in out or "exit codes" in out, args
    rc, out, _ = run_main(capsys, "serve", "--help")
    assert "--object" in out and "memory-backend-memfd" in out and "--metrics" in out and "--socket-group" in out


def test_serve_metrics_port_in_use_exits_1_and_cleans_up(tmp):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--socket", str(tmp / "s"), "--size", "1G", "--qmp", str(tmp / "q"),
                         "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp.iterdir()) == []


# ---------------------------------------------------------------------------
# Checked before anything starts: ids, socket paths, the QMP client limit


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--id", "0bad"], "--id: id '0bad' is not a valid QEMU id (a letter, then letters, digits, '-', '.' or '_')"),
        (["--id", "vm 0"], "--id: id 'vm 0' is not a valid QEMU id"),
        (["--id", ""], "--id: the id must not be empty (a letter, then letters, digits, '-', '.' or '_')"),
        (["--qmp-max-clients", "0"], "--qmp-max-clients: 0 is not a positive count"),
        (["--qmp-max-clients", "lots"], "--qmp-max-clients: invalid count 'lots'"),
    ],
)
def test_serve_refuses_bad_single_device_values(tmp, flags, message):
    result = run_cli("serve", "--socket", str(tmp / "s"), "--qmp", str(tmp / "q"), "--size", "1G", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list(tmp.iterdir()) == []


def test_serve_refuses_a_device_id_the_same_way_whichever_way_it_is_given(tmp):
    flag = run_cli("serve", "--socket", str(tmp / "s"), "--qmp", str(tmp / "q"), "--size", "1G", "--id", "0bad")
    device = run_cli("serve", "--qmp", str(tmp / "q"), "--object", "id=mem0,size=1G",
                     "--device", f"id=0bad,memdev=mem0,socket={tmp}/s")
    assert flag.returncode == device.returncode == 2
    rule = "is not a valid QEMU id (a letter, then letters, digits, '-', '.' or '_')"
    assert f"--id: id '0bad' {rule}" in flag.stderr
    assert f"id '0bad' {rule}" in device.stderr


@pytest.mark.parametrize("which", ["--qmp", "--socket", "--device", "toml qmp", "toml socket"])
def test_serve_refuses_a_socket_in_a_missing_directory_before_starting(tmp, which):
    missing = "/nonexistent-vmem-dir/sub"
    qmp, sock = str(tmp / "q"), str(tmp / "s")
    if which in ("--qmp", "toml qmp"):
        qmp = f"{missing}/x.qmp"
    else:
        sock = f"{missing}/x.sock"
    if which.startswith("toml"):
        config = tmp / "vmem.toml"
        config.write_text(f'qmp = "{qmp}"\n[[object]]\nid = "mem0"\nsize = "1G"\n'
                          f'[[device]]\nid = "vm0"\nmemdev = "mem0"\nsocket = "{sock}"\n')
        args = ["--config", str(config)]
    elif which == "--device":
        args = ["--qmp", qmp, "--object", "id=mem0,size=1G", "--device", f"id=vm0,memdev=mem0,socket={sock}"]
    else:
        args = ["--qmp", qmp, "--socket", sock, "--size", "1G"]
    result = run_cli("serve", *args)
    assert result.returncode == 2, result.stderr
    path = qmp if "qmp" in which else sock
    assert f"{path!r}: the directory {missing!r} does not exist" in result.stderr, result.stderr
    where = {"--qmp": "--qmp", "--socket": "--socket", "--device": "--device 'id=vm0",
             "toml qmp": f"{config if which.startswith('toml') else ''}: qmp",
             "toml socket": "[[device]] #1: socket"}[which]
    assert where in result.stderr, result.stderr
    assert sorted(p.name for p in tmp.iterdir()) == (["vmem.toml"] if which.startswith("toml") else [])


def test_serve_names_the_qmp_path_when_it_cannot_listen_there(tmp):
    # The directory exists, but no socket can be made in it: found at bind(), exit 1.
    result = run_cli("serve", "--socket", str(tmp / "s"), "--size", "1G", "--qmp", "/proc/vmem-test.qmp")
    assert result.returncode == 1, result.stderr
    assert "cannot listen on the QMP socket /proc/vmem-test.qmp: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("qmp-max-clients = 0\n", "qmp-max-clients must be a positive count"),
        ("qmp-max-clients = '8'\n", "qmp-max-clients must be a positive count"),
        ("qmp-max-clients = true\n", "qmp-max-clients must be a positive count"),
    ],
)
def test_config_file_refuses_a_bad_client_limit(tmp, text, message):
    path = tmp / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(str(path))


@pytest.mark.parametrize("how", ["flag", "toml"])
def test_serve_qmp_max_clients_bounds_the_connections(tmp, how):
    """At the limit, a new QMP client is greeted at once and the one idle the
    longest is closed, with a WARNING naming it."""
    if how == "flag":
        served = Served(tmp, "--size", "1G", "--qmp-max-clients", "2")
    else:
        config = tmp / "vmem.toml"
        config.write_text(f'qmp = "{tmp}/vmem0.qmp"\nqmp-max-clients = 2\n[[object]]\nid = "mem0"\nsize = "1G"\n'
                          f'[[device]]\nid = "vmem0"\nmemdev = "mem0"\nsocket = "{tmp}/vmem0.sock"\n')
        served = Served.__new__(Served)
        served.qmp = tmp / "vmem0.qmp"
        served.proc = subprocess.Popen([*EXE, "serve", "--config", str(config)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        served.first_line = served.proc.stdout.readline()
    try:
        assert "ready" in served.first_line, served.first_line
        first, _ = served.qmp_session()
        second, _ = served.qmp_session()
        third, execute = served.qmp_session()  # greeted, and able to run commands
        assert execute("query-status") == {"return": {"status": "running", "running": True}}
        first.sock.settimeout(30)
        assert first.sock.recv(100) == b""  # closed by the server
        for s in (first, second, third):
            s.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err
    assert "WARNING" in err and "disconnecting client 1" in err, err


def test_serve_monitor_flag_serves_the_human_monitor(tmp):
    mon = tmp / "vmem0.mon"
    mon_stale = socket.socket(socket.AF_UNIX)
    mon_stale.bind(str(mon))  # a stale socket (nobody listens): removed at start
    mon_stale.close()
    served = Served(tmp, "--size", "1G", "--monitor", str(mon))
    try:
        assert f"monitor on {mon}" in served.first_line
        assert (os.stat(mon).st_mode & 0o777) == 0o600
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(mon))
        s.sendall(b"info memory_size_summary\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        assert out.startswith(b"QEMU 11.1.0 monitor - type 'help' for more information\r\n(qemu) i\x1b[K")
        assert out.endswith(b"\x1b[K\r\nbase memory: 0\r\nplugged memory: 0\r\n(qemu) ")
    finally:
        rc, err = served.stop()
    assert rc == 0, err
    assert not mon.exists()


def test_serve_monitor_path_must_differ_from_qmp(tmp):
    result = run_cli("serve", "--socket", str(tmp / "s"), "--size", "1G", "--qmp", str(tmp / "q"),
                     "--monitor", str(tmp / "q"))
    assert result.returncode == 2 and "is the QMP socket too" in result.stderr


def test_toml_monitor_key(tmp):
    path = tmp / "vmem.toml"
    path.write_text('qmp = "/tmp/q"\nmonitor = "/tmp/m"\n')
    assert load_config_file(str(path)).monitor == "/tmp/m"
    path.write_text("monitor = 3\n")
    with pytest.raises(ConfigError, match="monitor must be a string"):
        load_config_file(str(path))
