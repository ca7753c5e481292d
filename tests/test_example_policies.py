"""The examples' policies (examples/*.py), without a guest: their decisions
against files and clocks the test controls, alone and behind the device
model's policy hook, and the scripts started and stopped as a user would."""

from __future__ import annotations

import importlib.util
import logging
import os
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vfiouser_vmem import Request, RequestType, Response, VirtioMemDevice

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
MIB = 1 << 20
GIB = 1 << 30
ADDR = 4 * GIB


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hp = load("host_pressure")
fi = load("fault_injection")


def plug(nb_blocks: int = 1, block: int = 0) -> Request:
    return Request(RequestType.PLUG, ADDR + block * 2 * MIB, nb_blocks)


def unplug(nb_blocks: int = 1, block: int = 0) -> Request:
    return Request(RequestType.UNPLUG, ADDR + block * 2 * MIB, nb_blocks)


UNPLUG_ALL = Request(RequestType.UNPLUG_ALL, ADDR, 0)


def device(policy, requested: int = 64 * MIB) -> VirtioMemDevice:
    d = VirtioMemDevice(region_size_bytes=1 * GIB, block_size_bytes=2 * MIB, policy=policy)
    d.set_memory_address(ADDR)
    d.set_requested_size(requested)
    return d


def answer(d: VirtioMemDevice, request: Request) -> Response:
    """The device model's answer (policy included), as the guest reads it."""
    return Response(struct.unpack_from("<H", d.handle_request(request.pack()))[0])


def write_meminfo(path: Path, available_kib: int | None) -> None:
    lines = ["MemTotal:       16318508 kB", "MemFree:         1048576 kB"]
    if available_kib is not None:
        lines.append(f"MemAvailable:   {available_kib:8d} kB")
    path.write_text("\n".join(lines + ["Buffers:          123456 kB", ""]))


def write_psi(path: Path, some_avg10: float) -> None:
    path.write_text(f"some avg10={some_avg10:.2f} avg60=1.00 avg300=0.50 total=12345\n"
                    "full avg10=99.00 avg60=0.00 avg300=0.00 total=678\n")


# -- host_pressure ----------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    meminfo, psi = tmp_path / "meminfo", tmp_path / "memory"
    write_meminfo(meminfo, 4 * GIB // 1024)
    write_psi(psi, 0.0)
    return meminfo, psi


def pressure_policy(files, **kw):
    meminfo, psi = files
    kw.setdefault("min_available_bytes", 1 * GIB)
    kw.setdefault("max_psi_some_avg10", 10.0)
    return hp.HostPressurePolicy(meminfo_path=meminfo, psi_path=psi, **kw)


def test_readers_parse_the_kernels_formats(files):
    meminfo, psi = files
    assert hp.read_mem_available(meminfo) == 4 * GIB
    write_psi(psi, 12.34)
    # "some", not "full" (99.00).
    assert hp.read_psi_some_avg10(psi) == 12.34
    write_meminfo(meminfo, None)
    with pytest.raises(ValueError, match="no MemAvailable"):
        hp.read_mem_available(meminfo)


def test_the_hosts_own_files_parse():
    assert hp.read_mem_available("/proc/meminfo") > 0
    if Path("/proc/pressure/memory").exists():
        try:
            assert hp.read_psi_some_avg10("/proc/pressure/memory") >= 0
        except OSError:  # PSI compiled in but disabled (psi=0): the file exists and cannot be read
            pass


def test_no_pressure_acks_plugs(files):
    policy = pressure_policy(files)
    d = device(None)
    assert policy.pressure() is None
    assert policy.decide(d, plug()) == Response.ACK
    assert (policy.granted, policy.refused, policy.refusal_pending) == (1, 0, False)


def test_low_mem_available_refuses_plugs_busy_and_allows_unplugs(files, caplog):
    meminfo, _ = files
    write_meminfo(meminfo, 512 * MIB // 1024)
    policy = pressure_policy(files)
    d = device(None)
    with caplog.at_level(logging.WARNING, logger="host_pressure"):
        assert policy.decide(d, plug(4)) == Response.BUSY
    assert "MemAvailable 512M < 1G" in policy.pressure()
    assert "refused PLUG of 8M" in caplog.text and "MemAvailable 512M < 1G" in caplog.text
    assert (policy.refused, policy.refusal_pending) == (1, True)
    assert policy.decide(d, unplug()) == Response.ACK
    assert policy.decide(d, UNPLUG_ALL) == Response.ACK
    assert policy.refused == 1
    policy.refusal_handled()
    assert not policy.refusal_pending


def test_the_threshold_is_strict(files):
    meminfo, psi = files
    write_meminfo(meminfo, 1 * GIB // 1024)
    write_psi(psi, 10.0)
    assert pressure_policy(files).decide(device(None), plug()) == Response.ACK  # at the thresholds: no pressure
    write_psi(psi, 10.01)
    assert pressure_policy(files).decide(device(None), plug()) == Response.BUSY


def test_high_psi_refuses_plugs(files):
    _, psi = files
    write_psi(psi, 42.0)
    policy = pressure_policy(files)
    assert policy.decide(device(None), plug()) == Response.BUSY
    assert policy.pressure() == f"memory PSI some avg10 42.00% > 10% ({psi})"
    # Either check can be turned off.
    assert pressure_policy(files, max_psi_some_avg10=None).decide(device(None), plug()) == Response.ACK


def test_unreadable_files_count_as_pressure(files):
    meminfo, psi = files
    meminfo.unlink()
    assert "cannot read MemAvailable" in pressure_policy(files).pressure()
    assert pressure_policy(files, min_available_bytes=None).pressure() is None
    psi.write_text("garbage\n")
    assert "cannot read the memory PSI" in pressure_policy(files, min_available_bytes=None).pressure()


def test_bad_thresholds_are_refused(files):
    with pytest.raises(ValueError):
        pressure_policy(files, max_psi_some_avg10=150.0)
    with pytest.raises(ValueError):
        pressure_policy(files, min_available_bytes=-1)


def test_behind_the_device_model_the_pressure_decides_and_the_rules_still_apply(files):
    meminfo, _ = files
    policy = pressure_policy(files)
    d = device(policy, requested=8 * MIB)
    write_meminfo(meminfo, 100 * MIB // 1024)
    assert answer(d, plug(2)) == Response.BUSY
    assert d.plugged_size == 0
    write_meminfo(meminfo, 2 * GIB // 1024)
    assert answer(d, plug(2)) == Response.ACK
    assert d.plugged_size == 4 * MIB
    # More than requested: the rules' NACK, before the policy is asked.
    assert answer(d, plug(4, block=2)) == Response.NACK
    assert policy.granted == 1
    write_meminfo(meminfo, 0)
    assert answer(d, unplug(2)) == Response.ACK
    assert d.plugged_size == 0
    assert not d.hook_errors


class FakeDevice:
    def __init__(self, requested: int, plugged: int, block: int = 2 * MIB) -> None:
        self.requested_size, self.plugged_size, self.block_size = requested, plugged, block
        self.resizes: list[int] = []
        self.notified = 0

    def resize(self, size: int) -> None:
        self.resizes.append(size)
        self.requested_size = size

    def notify_config_change(self) -> None:
        self.notified += 1


def test_nudge_notifies_the_guest_only_for_a_pending_grow():
    for plugged, nudged in ((0, 1), (512 * MIB, 0), (600 * MIB, 0)):  # a grow, nothing, a shrink pending
        d = FakeDevice(requested=512 * MIB, plugged=plugged)
        hp.nudge(d)
        assert d.notified == nudged and d.resizes == []


def test_size_options_parse():
    assert hp.parse_size("4G") == 4 * GIB and hp.parse_size("512m") == 512 * MIB and hp.parse_size("4096") == 4096
    assert fi.parse_size("1T") == 1 << 40 and fi.format_size(3 * MIB) == "3M"
    with pytest.raises(Exception, match="not a size"):
        hp.parse_size("lots")


def test_an_explicit_psi_file_must_exist(tmp_path, files, capsys):
    meminfo, _ = files
    parser = hp.build_parser()
    args = parser.parse_args(["--socket", "s", "--size", "1G", "--meminfo", str(meminfo),
                              "--psi", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        hp.make_policy(parser, args)
    assert "no such file" in capsys.readouterr().err
    args = parser.parse_args(["--socket", "s", "--size", "1G", "--meminfo", str(meminfo), "--psi", "none"])
    policy = hp.make_policy(parser, args)
    assert policy.max_psi_some_avg10 is None and policy.min_available_bytes == 1 * GIB


# -- fault_injection ---------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_busy_every_nth_request_up_to_the_limit():
    policy = fi.FaultInjector(busy_every=3, busy_limit=2)
    d = device(None)
    answers = [policy.decide(d, plug() if i % 2 else unplug()) for i in range(1, 13)]
    busy_at = [i for i, a in enumerate(answers, 1) if a == Response.BUSY]
    assert busy_at == [3, 6]  # then the limit
    assert all(a == Response.ACK for i, a in enumerate(answers, 1) if i not in busy_at)
    assert policy.injected["BUSY"] == 2 and policy.seen == 12


def test_nack_storm_by_count_nacks_plugs_only():
    policy = fi.FaultInjector(nack_storm_requests=4, nack_storm_start=2)
    d = device(None)
    requests = [plug(), plug(), unplug(), plug(), plug(), plug(), plug()]
    answers = [policy.decide(d, r) for r in requests]
    # Requests 2-5 are the storm; the UNPLUG in it passes (NACK is no answer to an UNPLUG).
    assert answers == [Response.ACK, Response.NACK, Response.ACK, Response.NACK, Response.NACK,
                       Response.ACK, Response.ACK]
    assert policy.injected["NACK"] == 3


def test_nack_storm_by_time(caplog):
    clock = Clock()
    policy = fi.FaultInjector(nack_storm_seconds=2.0, clock=clock, sleep=clock.sleep)
    d = device(None)
    with caplog.at_level(logging.INFO, logger="fault_injection"):
        assert policy.decide(d, plug()) == Response.NACK
        clock.now += 1.9
        assert policy.decide(d, plug()) == Response.NACK
        clock.now += 0.1
        assert policy.decide(d, plug()) == Response.ACK
        clock.now += 100
        assert policy.decide(d, plug()) == Response.ACK  # one storm only
    assert "NACK storm begins at request #1 (for 2 s)" in caplog.text
    assert "NACK storm over at request #3 after 2.00 s: 2 PLUG(s) NACKed" in caplog.text
    assert caplog.text.count("injected NACK into PLUG") == 2


def test_storm_ends_at_whichever_limit_comes_first():
    clock = Clock()
    policy = fi.FaultInjector(nack_storm_requests=100, nack_storm_seconds=1.0, clock=clock, sleep=clock.sleep)
    d = device(None)
    assert policy.decide(d, plug()) == Response.NACK
    clock.now += 1.0
    assert policy.decide(d, plug()) == Response.ACK


def test_storm_wins_over_busy_and_busy_counts_all_requests():
    policy = fi.FaultInjector(busy_every=2, nack_storm_requests=2)
    d = device(None)
    answers = [policy.decide(d, plug()) for _ in range(6)]
    assert answers == [Response.NACK, Response.NACK, Response.ACK, Response.BUSY, Response.ACK, Response.BUSY]


def test_delay_before_each_answer_is_bounded():
    clock = Clock()
    policy = fi.FaultInjector(delay_s=0.25, busy_every=2, clock=clock, sleep=clock.sleep)
    d = device(None)
    for r in (plug(), unplug(), UNPLUG_ALL):
        policy.decide(d, r)
    assert clock.slept == [0.25, 0.25, 0.25]
    assert policy.summary() == "3 request(s) seen; injected 0 NACK, 1 BUSY, 3 delay(s) of 250 ms"
    with pytest.raises(ValueError, match="blocks the server"):
        fi.FaultInjector(delay_s=fi.MAX_DELAY_S + 0.001)
    with pytest.raises(ValueError):
        fi.FaultInjector(busy_every=-1)


def test_no_faults_is_a_plain_device():
    policy = fi.FaultInjector()
    assert repr(policy) == "FaultInjector(no faults)"
    d = device(policy, requested=8 * MIB)
    assert answer(d, plug(4)) == Response.ACK
    assert answer(d, unplug(4)) == Response.ACK
    assert policy.seen == 2 and not policy.injected


def test_behind_the_device_model_injected_answers_reach_the_guest():
    policy = fi.FaultInjector(busy_every=3, nack_storm_requests=1)
    d = device(policy, requested=8 * MIB)
    assert answer(d, plug(1, block=0)) == Response.NACK
    assert answer(d, plug(1, block=0)) == Response.ACK
    assert answer(d, plug(1, block=1)) == Response.BUSY
    assert d.plugged_size == 2 * MIB
    # A request the rules refuse never reaches the policy (block 0 is already plugged).
    assert answer(d, plug(1, block=0)) == Response.ERROR
    assert policy.seen == 3
    assert not d.hook_errors


# -- the scripts, as a user runs them ------------------------------------------

def start(tmp_path: Path, script: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(EXAMPLES / script), "--socket", str(tmp_path / "v.sock"),
                             "--size", "1G", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("script", "argv", "summary"), [
    ("fault_injection.py", ["--busy-every", "3", "--delay-ms", "1"], "0 request(s) seen; injected 0 NACK"),
    ("host_pressure.py", ["--psi", "none"], "0 plug(s) granted, 0 refused"),
])
def test_script_starts_serves_qmp_and_stops_on_sigterm(tmp_path, script, argv, summary):
    qmp = tmp_path / "q.qmp"
    proc = start(tmp_path, script, "--qmp", str(qmp), *argv)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if ready else ""
        assert "ready on" in line, line
        assert qmp.is_socket() and (tmp_path / "v.sock").is_socket()
    finally:
        rc, out, err = stop(proc)
    assert rc == 0, err
    assert summary in out, out


def test_script_refuses_a_blocking_delay(tmp_path):
    proc = start(tmp_path, "fault_injection.py", "--delay-ms", "5000")
    try:
        _, err = proc.communicate(timeout=20)  # it exits by itself
    finally:
        stop(proc)
    assert proc.returncode == 2 and "blocks the server" in err.decode()


def test_examples_use_only_the_public_api():
    import vfiouser_vmem

    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            if "import" in line and "vfiouser_vmem" in line:
                assert line.strip() in ("import vfiouser_vmem",) or line.startswith("from vfiouser_vmem import "), \
                    f"{path.name}: {line}"
        names = [n.strip() for line in text.splitlines() if line.startswith("from vfiouser_vmem import ")
                 for n in line.split("import", 1)[1].split(",")]
        assert set(names) <= set(vfiouser_vmem.__all__), path.name
    assert os.access(EXAMPLES / "host_pressure.py", os.R_OK)
