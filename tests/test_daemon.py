"""``serve`` as a daemon (docs/operating.md): readiness and status for the
service manager, signals, log formats, quiet stops.

The service manager is played by a datagram socket the test listens on
(``NOTIFY_SOCKET``), as systemd's sd_notify(3) protocol is; the real
systemd runs the unit in integration/test_systemd.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from proc_util import EXE, terminate
from test_cli import tmp  # noqa: F401 (fixture: a short directory for socket paths)
from vfio_user_client import VfioUserClient
from vfiouser_vmem.cli._logging import JournalFormatter, JsonFormatter, TextFormatter, journald_stream
from vfiouser_vmem.server import DeviceConfig, serve
from vfiouser_vmem.util.sdnotify import Notifier
from vfiouser_vmem.vmem import MemfdBackend

MiB = 1 << 20


class ServiceManager:
    """The manager's end of ``NOTIFY_SOCKET``: a datagram socket in ``tmp``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def message(self) -> dict[str, str]:
        """The next datagram as its assignments (a timeout fails the test)."""
        data = self.sock.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def until(self, key: str, value_pattern: str = ".*") -> dict[str, str]:
        while True:
            msg = self.message()
            if key in msg and re.fullmatch(value_pattern, msg[key]):
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp):
    m = ServiceManager(tmp / "notify")
    yield m
    m.close()


def spawn(tmp: Path, *flags: str, env: dict[str, str] | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([*EXE, "serve", "--socket", str(tmp / "v.sock"), "--qmp", str(tmp / "q.qmp"),
                             "--size", "64M", *flags], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})})


# -- the notification protocol ---------------------------------------------------


def test_notifier_sends_one_datagram_per_state_and_keeps_status_on_one_line(manager):
    n = Notifier({"NOTIFY_SOCKET": str(manager.path)})
    assert n.enabled
    assert n.ready("serving\nREADY=1 forged")
    msg = manager.message()
    assert msg["READY"] == "1" and msg["MAINPID"] == str(os.getpid())
    # A newline in the text would have been a second assignment.
    assert msg["STATUS"] == "serving READY=1 forged" and len(msg) == 3
    assert n.stopping("bye") and manager.message() == {"STOPPING": "1", "STATUS": "bye"}


def test_notifier_reaches_an_abstract_socket():
    name = f"vmem-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("abstract")
        assert sock.recv(100) == b"STATUS=abstract"


def test_notifier_without_a_socket_does_nothing_and_a_dead_one_is_logged_once(tmp, caplog):
    assert not Notifier({}).enabled and not Notifier({}).ready("x")
    dead = Notifier({"NOTIFY_SOCKET": str(tmp / "nobody")})
    with caplog.at_level(logging.WARNING, logger="vfiouser_vmem.systemd"):
        assert not dead.ready("x") and not dead.status("y")
    lines = [r.getMessage() for r in caplog.records if r.name == "vfiouser_vmem.systemd"]
    assert len(lines) == 1 and str(tmp / "nobody") in lines[0]


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "2000000"}, 2000000),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_period_is_read_as_sd_watchdog_enabled_reads_it(env, expected):
    if "WATCHDOG_PID" in env and env["WATCHDOG_PID"] == str(os.getpid()):
        pytest.skip("the test runs as pid 1")
    assert Notifier({"NOTIFY_SOCKET": "/x", **env}).watchdog_usec == expected


# -- serve under a service manager ----------------------------------------------------


async def test_serve_notifies_ready_after_its_sockets_listen_then_status_per_client_then_stopping(tmp, manager):
    proc = spawn(tmp, env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "400000"})
    try:
        ready = manager.until("READY", "1")
        # READY=1 means every socket listens: both are there, and QMP answers.
        assert (tmp / "v.sock").exists() and (tmp / "q.qmp").exists()
        assert ready["STATUS"] == "serving 1 device: vmem0 waiting for a client"
        assert ready["MAINPID"] == str(proc.pid)
        # The watchdog is fed from the trio thread: twice a period.
        manager.until("WATCHDOG", "1")
        client = await VfioUserClient.connect(str(tmp / "v.sock"))
        assert manager.until("STATUS", ".*connected.*")["STATUS"] == "serving 1 device: vmem0 client 1 connected"
        client.close()
        assert manager.until("STATUS", ".*waiting.*")["STATUS"] == "serving 1 device: vmem0 waiting for a client"
        proc.send_signal(signal.SIGTERM)
        assert manager.until("STOPPING", "1")["STATUS"] == "stopping (SIGTERM)"
    finally:
        rc, err = terminate(proc)
    assert rc == 0, err
    assert not (tmp / "v.sock").exists() and not (tmp / "q.qmp").exists()


# -- signals ---------------------------------------------------------------------------


def _toml(tmp: Path, level: str) -> Path:
    path = tmp / "vmem.toml"
    path.write_text(f'qmp = "{tmp}/q.qmp"\nlog-level = "{level}"\n[[object]]\nid = "mem0"\nsize = "64M"\n'
                    f'[[device]]\nid = "vm0"\nmemdev = "mem0"\nsocket = "{tmp}/v.sock"\n')
    return path


def test_sighup_rereads_the_log_level_and_keeps_serving(tmp, manager):
    config = _toml(tmp, "warning")
    proc = subprocess.Popen([*EXE, "serve", "--config", str(config), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": str(manager.path)})
    records: list[dict] = []

    def next_record(pattern: str, level: str | None = None) -> dict:
        # stderr read line by line: each awaited line is the synchronisation.
        while True:
            line = proc.stderr.readline()
            assert line, f"the server ended its log before {pattern!r}: {records}"
            records.append(json.loads(line))
            if re.search(pattern, records[-1]["message"]) and level in (None, records[-1]["level"]):
                return records[-1]

    try:
        manager.until("READY", "1")
        config.write_text('monitor = "/tmp/x"\n' + config.read_text().replace('"warning"', '"debug"'))
        proc.send_signal(signal.SIGHUP)
        next_record(re.escape(f"SIGHUP: {config} reread: log level debug"))
        assert next_record("take effect at the next start")["message"] == (
            f"SIGHUP: {config}: changes to monitor take effect at the next start (only log-level is reread)")
        # At debug now: a QMP client's departure is logged (its arrival is
        # info, with its credentials).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(tmp / "q.qmp"))
            s.recv(4096)  # the greeting
            next_record("QMP client 1 connected", "info")
        next_record("QMP client 1 disconnected", "debug")
        config.write_text("not toml")
        proc.send_signal(signal.SIGHUP)
        bad = next_record("SIGHUP: --config")
        assert bad["level"] == "error" and "not valid TOML" in bad["message"]
        assert "running configuration is kept" in bad["message"]
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING", "1")
    finally:
        rc, err = terminate(proc)
    assert rc == 0, err
    # Before the SIGHUP the level was warning: no debug or info line until the reread.
    first_reread = next(i for i, r in enumerate(records) if "reread" in r["message"])
    assert all(r["level"] in ("warning", "error") for r in records[:first_reread])


def test_sighup_without_a_configuration_file_is_logged_and_ignored(tmp, manager):
    proc = spawn(tmp, env={"NOTIFY_SOCKET": str(manager.path)})
    try:
        manager.until("READY", "1")
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING", "1")
    finally:
        rc, err = terminate(proc)
    assert rc == 0, err
    assert "SIGHUP: no configuration file to reread; ignored" in err
    assert not (tmp / "v.sock").exists() and not (tmp / "q.qmp").exists()


class _SignalOnMainThreadDiscard(MemfdBackend):
    """A memfd backend whose first discard on the main thread (where
    DeviceServer.close drains the queue) sends this process ``signum``: the
    second stop signal arrives while the devices close."""

    def __init__(self, size: int, signum: int) -> None:
        self.signum = signum
        self.main_thread_discards = 0
        self.armed = False  # the backend punches itself empty when made
        super().__init__(size, name="hurry")
        self.armed = True

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        super().discard(offset_bytes, length_bytes)
        if self.armed and threading.current_thread() is threading.main_thread():
            self.main_thread_discards += 1
            if self.main_thread_discards == 1:
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_stop_signal_while_stopping_skips_the_discards_left(tmp, caplog, signum):
    size = 256 * MiB
    backend = _SignalOnMainThreadDiscard(size, signum)
    # Memory the backend still holds at the stop (as after a guest's
    # writes): the device's reset at close queues the whole device.
    backend.view[:MiB] = b"\xaa" * MiB
    config = DeviceConfig(socket=str(tmp / "v.sock"), size_bytes=size, id="vm0", backend=backend)
    ready = trio.Event()
    caplog.set_level(logging.INFO, logger="vfiouser_vmem")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve([config], str(tmp / "q.qmp"), ready=ready.set))
        await ready.wait()
        os.kill(os.getpid(), signum)
    # serve returned (no KeyboardInterrupt, no exit): stopped cleanly.
    assert backend.main_thread_discards == 1  # the second signal stopped the drain after one chunk
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("vm0: stopping at once:") and "not given back" in m for m in messages), messages
    assert not (tmp / "v.sock").exists() and not (tmp / "q.qmp").exists()
    # The handlers of the stop are gone with it.
    assert {s: signal.getsignal(s) for s in before} == before


def test_two_sigterms_in_a_row_still_end_the_server_cleanly(tmp, manager):
    proc = spawn(tmp, env={"NOTIFY_SOCKET": str(manager.path)})
    try:
        manager.until("READY", "1")
        proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING", "1")
        proc.send_signal(signal.SIGTERM)
    finally:
        rc, err = terminate(proc)
    # 0, not 143 (killed by the signal): the second one was handled.
    assert rc == 0, err
    assert not (tmp / "v.sock").exists() and not (tmp / "q.qmp").exists()


# -- logs ------------------------------------------------------------------------------


def _record(level: int, msg: str, *args, exc: bool = False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    record = logging.LogRecord("vfiouser_vmem.server", level, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("level, prefix", [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>"),
    (logging.CRITICAL, "<2>"),
])
def test_journal_format_has_the_syslog_priority_on_every_line_and_no_time(level, prefix):
    text = JournalFormatter().format(_record(level, "vm0: %s", "two\nlines", exc=True))
    lines = text.split("\n")
    assert lines[0] == f"{prefix}vfiouser_vmem.server: vm0: two"
    assert lines[1] == f"{prefix}lines"
    assert all(line.startswith(prefix) for line in lines) and "ValueError: boom" in text
    assert not re.search(r"\d\d:\d\d:\d\d", text)


def test_text_format_indents_the_lines_after_the_first():
    text = TextFormatter().format(_record(logging.ERROR, "first\nsecond", exc=True))
    first, *rest = text.split("\n")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR vfiouser_vmem.server: first", first)
    assert rest and all(line.startswith("    ") for line in rest)


def test_json_format_has_the_fields_and_takes_the_device_from_the_record_or_the_message():
    f = JsonFormatter(device_ids=["vm0", "vm01"])
    plain = json.loads(f.format(_record(logging.WARNING, "vm01: found %d", 3)))
    assert plain["device"] == "vm01" and plain["client"] is None and plain["message"] == "vm01: found 3"
    assert plain["level"] == "warning" and plain["logger"] == "vfiouser_vmem.server"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", plain["time"])
    tagged = json.loads(f.format(_record(logging.INFO, "connected", device="vm0", client=2, exc=True)))
    assert (tagged["device"], tagged["client"]) == ("vm0", 2) and "ValueError: boom" in tagged["exception"]
    # A line that only looks like a device's: not a known id.
    assert json.loads(f.format(_record(logging.INFO, "vm2: x")))["device"] is None
    # One line per record, whatever the message holds.
    assert "\n" not in f.format(_record(logging.INFO, "a\nb\x1b[31m"))


def test_journald_stream_is_recognised_by_device_and_inode_only(tmp):
    with open(tmp / "stream", "w") as stream, open(tmp / "other", "w") as other:
        st = os.fstat(stream.fileno())
        assert journald_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # The unit redirected stderr elsewhere: not journald's stream any more.
        assert not journald_stream(other, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journald_stream(stream, {})
        assert not journald_stream(stream, {"JOURNAL_STREAM": "garbage"})


def test_serve_under_journald_logs_priorities_without_time_stamps(tmp):
    err_path = tmp / "stderr"
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        proc = spawn(tmp, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=err)
        try:
            assert "ready" in proc.stdout.readline()
        finally:
            rc, _ = terminate(proc)
    lines = err_path.read_text().splitlines()
    assert rc == 0 and lines
    assert "<6>vfiouser_vmem.qmp: QMP listening on " + str(tmp / "q.qmp") in lines
    assert all(re.match(r"<[0-7]>vfiouser_vmem[.\w]*: ", line) for line in lines), lines


def test_serve_json_log_lines_name_the_device_and_the_client(tmp):
    async def connect_and_leave():
        client = await VfioUserClient.connect(str(tmp / "v.sock"))
        client.close()

    proc = spawn(tmp, "--log-format", "json", "--id", "vm7")
    try:
        assert "ready" in proc.stdout.readline()
        trio.run(connect_and_leave)
        proc.send_signal(signal.SIGTERM)
        rc, err = terminate(proc)
    finally:
        terminate(proc)
    assert rc == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    connected = [r for r in records if "connected on" in r["message"]]
    assert len(connected) == 1 and (connected[0]["device"], connected[0]["client"]) == ("vm7", 1)
    assert {"time", "level", "logger", "device", "client", "message"} <= set(connected[0])


def test_a_stop_without_clients_logs_nothing_about_resets_or_libvfio_user(tmp):
    proc = spawn(tmp, "--log-level", "info")
    try:
        assert "ready" in proc.stdout.readline()
    finally:
        rc, err = terminate(proc)
    assert rc == 0, err
    assert "reset" not in err and "libvfio-user" not in err, err
    assert "SIGTERM: stopping" in err


async def test_a_stop_with_a_client_connected_logs_that_reset(tmp):
    proc = spawn(tmp, "--log-level", "info")
    try:
        assert "ready" in proc.stdout.readline()
        client = await VfioUserClient.connect(str(tmp / "v.sock"))
        try:
            proc.send_signal(signal.SIGTERM)
            rc, err = terminate(proc)
        finally:
            client.close()
    finally:
        terminate(proc)
    assert rc == 0, err
    assert "vmem0: LOST_CONN reset at stop: unplugged and discarded nothing" in err
    assert "libvfio-user: vfu_reset_ctx" not in err


def test_a_failure_to_start_names_the_device_and_the_path_without_errno_noise(tmp):
    # /proc takes no socket: libvfio-user's bind fails after every check passed.
    result = subprocess.run([*EXE, "serve", "--socket", "/proc/vmem-x.sock", "--size", "64M", "--id", "vm3",
                             "--qmp", str(tmp / "q.qmp")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith("ERROR vfiouser_vmem: vm3: cannot create a vfio-user context on /proc/vmem-x.sock: "
                         "No such file or directory"), result.stderr
    assert "[Errno" not in result.stderr
    assert not (tmp / "q.qmp").exists()
