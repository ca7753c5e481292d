"""The command line: bad flags are refused clearly; serve starts, answers
QMP, refuses bad values without changing anything, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vfiouser_vmem.sizes import format_size, parse_size

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
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.qmp))
        f = s.makefile("r")
        assert "QMP" in json.loads(f.readline())

        def execute(name, **args):
            msg = {"execute": name, **({"arguments": args} if args else {})}
            s.sendall(json.dumps(msg).encode())
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    return reply

        execute("qmp_capabilities")
        return s, execute

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def test_serve_is_ready_before_first_line_and_stops_cleanly(tmp):
    served = Served(tmp, "--size", "8G", "--requested-size", "1G", "--id", "mem1", "--node", "1")
    try:
        assert "ready" in served.first_line and "mem1" in served.first_line
        # Both sockets listen once the first line is out, created 0600.
        for path in (served.sock, served.qmp):
            assert (os.stat(path).st_mode & 0o777) == 0o600
        s, execute = served.qmp_session()
        info = execute("query-memory-devices")["return"]
        assert info == [{"type": "virtio-mem", "data": {
            "id": "mem1", "memaddr": 0, "node": 1, "requested-size": 1 << 30, "size": 0,
            "max-size": 8 << 30, "block-size": 2 << 20, "memdev": "/objects/mem-mem1"}}]
        s.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err
    assert not served.sock.exists() and not served.qmp.exists()


def test_qom_set_bad_values_are_refused_and_change_nothing(tmp):
    served = Served(tmp, "--size", "4G")
    try:
        s, execute = served.qmp_session()
        for value, text in [(3 << 20, "not a multiple of the block-size"), (8 << 30, "above the device's maximum"),
                            ("1G", "expects uint64"), (-1, "expects uint64")]:
            reply = execute("qom-set", path="vmem0", property="requested-size", value=value)
            assert reply["error"]["class"] == "GenericError"
            assert text in reply["error"]["desc"], reply
        for prop in ("size", "block-size", "max-size"):
            reply = execute("qom-set", path="vmem0", property=prop, value=0)
            assert "read-only" in reply["error"]["desc"]
        assert execute("qom-get", path="vmem0", property="requested-size") == {"return": 0}
        assert execute("qom-set", path="vmem0", property="requested-size", value=1 << 30) == {"return": {}}
        assert execute("qom-get", path="vmem0", property="requested-size") == {"return": 1 << 30}
        s.close()
    finally:
        rc, err = served.stop()
    assert rc == 0, err


def test_serve_accepts_a_1t_device_sparsely(tmp):
    served = Served(tmp, "--size", "1T")
    try:
        assert "ready" in served.first_line
        s, execute = served.qmp_session()
        assert execute("qom-get", path="vmem0", property="max-size") == {"return": 1 << 40}
        s.close()
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
        assert "another process is listening on" in second.stderr
        # The refusal did not disturb the first server (no test connection).
        s, execute = first.qmp_session()
        assert execute("qom-get", path="vmem0", property="size") == {"return": 0}
        s.close()
        assert first.proc.poll() is None
    finally:
        rc, err = first.stop()
    assert rc == 0, err
    assert "refused a vfio-user client" not in err
