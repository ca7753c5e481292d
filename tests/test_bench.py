"""The benchmark's pure parts and tiny runs of its microbenchmarks.

Structure and correctness only: no timing is asserted anywhere (bench/README.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))

from proc_util import terminate  # noqa: E402

from bench import micro, report  # noqa: E402
from bench.procinfo import add_rss, cpu_seconds, memfd_allocated_bytes, proc_rss  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


# -- report ---------------------------------------------------------------------

def test_percentile_interpolates_like_numpy():
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile([4, 1, 3, 2], 0) == 1
    assert report.percentile([4, 1, 3, 2], 100) == 4
    assert report.percentile([10], 99) == 10
    assert report.percentile(list(range(101)), 99) == pytest.approx(99)
    with pytest.raises(ValueError):
        report.percentile([], 50)
    with pytest.raises(ValueError):
        report.percentile([1], 101)


def test_summary_of_values_ignores_missing():
    s = report.Summary.of([3.0, None, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    assert report.Summary.of([]) is None
    assert report.Summary.of([None]) is None


def test_histogram_buckets_and_labels():
    edges = (10, 100, math.inf)
    assert report.histogram([1, 10, 11, 100, 5000], edges) == [2, 2, 1]
    assert sum(report.histogram([0.5, 7, 70, 700, 7e6])) == 5
    assert report.bucket_label(0, edges) == "<= 10 us"
    assert report.bucket_label(1, edges) == "10 us - 100 us"
    assert report.bucket_label(2, edges) == "> 100 us"
    assert report.bucket_label(1, (500, 2000, math.inf)) == "500 us - 2 ms"


def test_ratio_and_formatting():
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(None, 4.0) is None
    assert report.ratio(1.0, 0) is None
    assert report.fmt_ratio(None) == "-"
    assert report.fmt_ratio(1.234) == "1.23"
    assert report.fmt_seconds(2.5) == "2.50 s"
    assert report.fmt_seconds(0.0123) == "12.3 ms"
    assert report.fmt_seconds(42e-6) == "42.0 us"
    assert report.fmt_seconds(5e-9) == "5 ns"
    assert report.fmt_bytes(3 * GIB) == "3.00 GiB"
    assert report.fmt_bytes(5 * MIB) == "5 MiB"
    assert report.fmt_bytes(0) == "0 B"
    assert report.fmt_percent(1.0) == "100.0 %"
    assert report.fmt_summary(None, "s") == "-"
    assert report.fmt_summary(report.Summary(1.0, 1.0, 1.0, 3), "s") == "1.00 s"
    assert report.fmt_summary(report.Summary(1.0, 0.5, 2.0, 3), "s") == "1.00 s (500.0 ms - 2.00 s)"


def _table_cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]


def test_markdown_table_is_well_formed():
    table = report.markdown_table(["a", "bb"], [["x", "1"], ["yyy", "22"]])
    lines = table.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # columns aligned
    assert re.fullmatch(r"\|:-+\|-+:\|", lines[1])
    assert _table_cells(table)[2] == ["x", "1"]
    with pytest.raises(ValueError):
        report.markdown_table(["a", "b"], [["only one"]])


def test_comparison_table_has_ratio_of_medians():
    rows = [
        report.Row("grow", "s", report.Summary.of([0.1, 0.2, 0.3]), report.Summary.of([0.2, 0.4, 0.6])),
        report.Row("p99 (ours only)", "s", None, report.Summary.of([5e-5])),
    ]
    cells = _table_cells(report.comparison_table(rows))
    assert cells[0] == ["measure (median, min - max)", "QEMU virtio-mem-pci", "vfiouser-vmem", "ours / QEMU"]
    assert cells[2][0] == "grow" and cells[2][3] == "2.00"
    assert cells[3][1] == "-" and cells[3][3] == "-"


def test_service_time_tables():
    records = [[0.0, 0, 0, 50e-6], [0.1, 0, 0, 70e-6], [0.2, 1, 0, 0.03], [0.3, 3, 0, 10e-6]]
    cells = _table_cells(report.service_time_table(records))
    names = [row[0] for row in cells[2:]]
    assert names == ["PLUG", "UNPLUG", "STATE", "all"]
    assert cells[2][1] == "2" and cells[-1][1] == "4"
    hist = _table_cells(report.histogram_table(records))
    assert sum(int(row[1]) for row in hist[2:]) == 4


def test_service_time_table_splits_by_request_path():
    # bench/served.py's records: [time, type, code, seconds, path].
    records = [[0.0, 0, 0, 5e-6, "c"], [0.1, 0, 0, 40e-6, "python"], [0.2, 1, 0, 6e-6, "c"],
               [0.3, 0, 0, 7e-6, "c"], [0.4, 2, 0, 1e-3, "python"]]
    cells = _table_cells(report.service_time_table(records))
    assert [row[0] for row in cells[2:]] == ["PLUG (c)", "PLUG (python)", "UNPLUG (c)", "UNPLUG_ALL (python)", "all"]
    assert [row[1] for row in cells[2:]] == ["2", "1", "1", "1", "5"]
    assert cells[3][2] == "40.0 us"


# -- host-side views ----------------------------------------------------------------

def _burn_cpu(seconds: float) -> None:
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def test_cpu_seconds_resolves_below_a_clock_tick_and_counts_ended_threads():
    before = cpu_seconds(os.getpid())
    _burn_cpu(0.003)
    mid = cpu_seconds(os.getpid())
    # Clock ticks (10 ms) would say 0 or 0.01.
    assert 0.0025 <= mid - before < 0.009
    worker = threading.Thread(target=_burn_cpu, args=(0.03,))
    worker.start()
    worker.join()  # ended: only the process total (in ticks) still has it
    assert cpu_seconds(os.getpid()) - mid >= 0.02


def test_procinfo_reads_own_process():
    rss = proc_rss(os.getpid())
    assert rss["VmRSS"] > 0 and set(rss) == {"VmRSS", "RssAnon", "RssFile", "RssShmem"}
    assert add_rss(rss, rss)["VmRSS"] == 2 * rss["VmRSS"]
    assert cpu_seconds(os.getpid()) >= 0
    fd = os.memfd_create("bench-test:a", os.MFD_CLOEXEC)
    dup = os.dup(fd)  # the same file twice: counted once
    try:
        os.ftruncate(fd, 8 * MIB)
        os.pwrite(fd, b"x" * MIB, 0)
        got = memfd_allocated_bytes(os.getpid(), name_prefix="bench-test:a", size_bytes=8 * MIB)
        assert MIB <= got < 2 * MIB
        with pytest.raises(LookupError):
            memfd_allocated_bytes(os.getpid(), name_prefix="bench-test:nothing-like-this")
    finally:
        os.close(dup)
        os.close(fd)


# -- microbenchmarks, tiny -----------------------------------------------------------

@pytest.mark.parametrize("touch", [False, True])
def test_discard_benchmark_discards_the_same_ranges(touch):
    out = micro.bench_discard(16 * MIB, 2 * MIB, touch=touch, reps=1)
    assert out["ranges"] == 4  # every other block of 8
    assert len(out["times"]["c"]) == len(out["times"]["python"]) == 1
    expected = 4 * 2 * MIB if touch else 0
    assert out["freed_bytes"]["c"] == out["freed_bytes"]["python"] == [expected]


def test_unplug_all_benchmark_unplugs_everything():
    out = micro.bench_unplug_all(16 * MIB, 2 * MIB, reps=1)
    assert out["ranges"] == 4
    assert len(out["times"]["unplug_all"]) == len(out["times"]["give_back"]) == len(out["times"]["c"]) == 1


def test_python_discard_loop_reports_errors():
    with pytest.raises(OSError):
        micro.python_discard_loop(-1, [(0, 4096)])


def test_bitmap_benchmark_covers_the_operations():
    out = micro.bench_bitmap(256, 64, min_total_s=0.0005)
    assert out["_alternating_runs"] == 128
    ops = [k for k in out if not k.startswith("_")]
    for word in ("set_range", "range_state", "count_plugged", "runs()"):
        assert any(word in k for k in ops), word
    assert all(out[k] > 0 for k in ops)


def test_startup_benchmark_one_device():
    out = micro.bench_startup(size="256M", reps=1)
    assert out["devices"] == 1 and len(out["ready_s"]) == 1
    assert out["rss"][0]["VmRSS"] > 0


def test_startup_benchmark_several_devices_in_one_process():
    out = micro.bench_startup(devices=2, device_size="256M", reps=1)
    assert out["how"] == "cli" and out["devices"] == 2
    assert out["rss"][0]["VmRSS"] > 0


# -- bench/served.py -------------------------------------------------------------------

def _served(tmp_path: Path, d: str, *flags: str) -> subprocess.Popen:
    """bench/served.py with ``flags``, one 256M device in ``d``, started as
    bench/run.py starts it (its "ready" line read)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "served.py"), *flags, "serve",
                             "--qmp", os.path.join(d, "q.qmp"), "--socket", os.path.join(d, "v.sock"),
                             "--size", "256M", "--requested-size", "256M"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "server.log", "wb"), text=True)
    line = proc.stdout.readline()
    if "ready" not in line:
        terminate(proc, timeout_s=30)
        raise AssertionError(f"no ready line: {line!r}\n{(tmp_path / 'server.log').read_text()[-3000:]}")
    return proc


def _stop_served(proc: subprocess.Popen, tmp_path: Path) -> None:
    """SIGTERM; it must exit 0 (it writes its files at exit)."""
    code, _ = terminate(proc, timeout_s=30)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]


def test_served_writes_empty_records_without_a_client(tmp_path):
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")
    try:
        _stop_served(_served(tmp_path, d, "--stats", str(tmp_path / "s.json"), "--events", str(tmp_path / "e.json")),
                     tmp_path)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert json.loads((tmp_path / "s.json").read_text()) == {"hook": "RequestServed", "devices": {"vmem0": []}}
    assert json.loads((tmp_path / "e.json").read_text()) == {"events": []}  # no client, no request


def test_served_records_every_request_and_the_notify_serve(tmp_path):
    """A vfio-user client (the tests' own, no QEMU) plugs, unplugs and asks
    the state: served.py's records are the device's RequestServed events,
    and its events the notify writes served in C."""
    import shutil
    import tempfile

    import trio
    from vfio_user_client import VfioUserClient
    from virtio_driver import ACK, VirtioMemDriver

    bar = 0x40_0000_0000

    async def drive(sock: str) -> None:
        with trio.fail_after(30):
            client = await VfioUserClient.connect(sock)
            driver = VirtioMemDriver(client, bar_addr=bar)
            try:
                await driver.initialize()
                for i in range(3):
                    assert await driver.plug(bar + i * (2 << 20), 1) == ACK
                assert await driver.unplug(bar, 1) == ACK
                await driver.state(bar, 4)
            finally:
                driver.close()
                client.close()

    d = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")
    stats, events = tmp_path / "s.json", tmp_path / "e.json"
    try:
        proc = _served(tmp_path, d, "--stats", str(stats), "--events", str(events))
        try:
            trio.run(drive, os.path.join(d, "v.sock"))
        finally:
            _stop_served(proc, tmp_path)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    records = json.loads(stats.read_text())["devices"]["vmem0"]
    # [monotonic time, type, response, seconds, path]; the lost connection's reset serves no request.
    assert [r[1] for r in records] == [0, 0, 0, 1, 3]
    assert all(r[2] == 0 and r[3] > 0 and r[4] in ("c", "python") for r in records)
    assert [r[0] for r in records] == sorted(r[0] for r in records)
    evs = json.loads(events.read_text())["events"]
    kinds = {e[0] for e in evs}
    assert kinds <= {"ntf", "req", "trig", "nq", "srv"}
    # Every request is in the events once: inside a notify write (req) or elsewhere (srv).
    served = sorted([e[2] for e in evs if e[0] == "req"] + [e[2] for e in evs if e[0] == "srv"])
    assert served == [0, 0, 0, 1, 3]
    # The first PLUG at least is served in C inside its notify write (the
    # server arms that path after the driver's set-up); each such write has
    # its requests, its interrupt and its totals at the C call's clock.
    notifies = [e for e in evs if e[0] == "ntf"]
    assert notifies and evs[:3] == [notifies[0], ["req", notifies[0][1], 0], ["trig", notifies[0][1], 1]]
    for e in evs:
        if e[0] == "nq":
            assert e[2] == sum(1 for r in evs if r[0] == "req" and r[1] == e[1]) and e[3] > 0
    assert len([e for e in evs if e[0] == "req"]) <= len([r for r in records if r[4] == "c"])


# -- the per-request cost of a plug policy ---------------------------------------------

def test_policy_cost_serves_the_stream_in_every_setting():
    from bench import policy_cost

    out = policy_cost.bench_policy_cost(requests=6, rounds=2, blocks=4)
    assert set(out["times"]) == {"c", "python", "ack_policy", "meminfo_policy"}
    for per_type in out["times"].values():
        assert len(per_type["PLUG"]) == len(per_type["UNPLUG"]) == 6
    rows = policy_cost.summary(out)
    assert rows[0]["key"] == "c" and rows[0]["ratio"] == 1.0
    cells = _table_cells(policy_cost.table(out).split("\n\n", 1)[1])
    assert [row[0] for row in cells[2:]] == [label for _, label, _ in policy_cost.SETTINGS]
    assert cells[2][-1] == "1.00"


def test_policy_cost_settings_take_the_paths_they_name():
    from bench import policy_cost
    from vfiouser_vmem import RequestServed

    want = {"c": "c", "python": "python", "ack_policy": "python", "meminfo_policy": "python"}
    for key, _, make in policy_cost.SETTINGS:
        guest = make(4)
        paths = []
        guest.device.observers.subscribe(lambda e, paths=paths: paths.append(e.path), RequestServed)
        for _ in range(4):
            guest.post_next()
            assert guest.serve() == 1 and guest.last_response() == 0
        assert paths == [want[key]] * 4, key
        assert guest.interrupts == 4 and guest.device.plugged_size == 0


def test_meminfo_policy_refuses_plugs_below_its_floor():
    from bench.policy_cost import MemAvailablePolicy
    from vfiouser_vmem import Request, Response

    assert MemAvailablePolicy(0).decide(None, Request(0, 0, 1)) == Response.ACK
    assert MemAvailablePolicy(1 << 60).decide(None, Request(0, 0, 1)) == Response.NACK
    assert MemAvailablePolicy(1 << 60).decide(None, Request(1, 0, 1)) == Response.ACK


# -- the guest-side measuring, against a fake guest and device -------------------------

class FakeGuest:
    """The guest's end of the command channel: runs the MemTotal loop of
    bench/run.py's GuestMemWatch (one "@@M kB" line every ~5 ms, ended by
    any line) and answers other commands with "@@RC 0"."""

    def __init__(self, base_kib: int) -> None:
        from harness import Guest

        self.kib = base_kib
        self.host, self.far = socket.socketpair()
        # A harness.Guest without QEMU: the methods GuestMemWatch uses.
        self.guest = Guest.__new__(Guest)
        self.guest.conn = self.host
        self.guest._buf = b""
        self.guest.proc = type("P", (), {"poll": staticmethod(lambda: None), "returncode": None})()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buf = b""
        self.far.settimeout(0.005)
        looping = False
        while not self.stop.is_set():
            try:
                data = self.far.recv(4096)
                if not data:
                    return
                buf += data
            except TimeoutError:
                pass
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if looping:
                    looping = False
                    self.far.sendall(b"@@RC 0\n")
                elif line.startswith(b"while ! read -t"):
                    looping = True
                else:
                    self.far.sendall(b"@@RC 0\n")
            if looping:
                self.far.sendall(b"@@M %d\n" % self.kib)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.host.close()
        self.far.close()


class FakeDevice:
    """A device that reaches a requested size after a short delay, as the
    guest's MemTotal does (the fake guest's) and the backend empties."""

    def __init__(self, fake: FakeGuest, base_kib: int) -> None:
        self.fake = fake
        self.guest = fake.guest
        self.base_kib = base_kib
        self.size = 0
        self.alloc = 64 * MIB
        self.qmp = type("Q", (), {"events": []})()

    def get(self, prop: str) -> int:
        assert prop == "size"
        return self.size

    def set_requested_size(self, size: int) -> None:
        def later():
            time.sleep(0.03)
            self.size = size
            self.fake.kib = self.base_kib + size // 1024
            self.alloc = 0

        threading.Thread(target=later, daemon=True).start()

    def allocated_bytes(self) -> int:
        return self.alloc

    def cpu(self) -> dict[str, float]:
        return {"qemu": 1.0}


def test_track_resize_follows_both_clocks():
    from bench.run import track_resize

    base = 900 * 1024
    fake = FakeGuest(base)
    try:
        dev = FakeDevice(fake, base)
        r = track_resize(dev, 1 * GIB, base, alloc_floor=0, timeout_s=10)
        assert r["size_s"] is not None and r["memtotal_s"] is not None and r["alloc_s"] is not None
        assert r["samples"]["memtotal_kib"][-1][1] == base + GIB // 1024
        assert r["samples"]["size"][-1][1] == GIB
        assert r["cpu_s"] == {"qemu": 0.0}
        # The command channel is usable again afterwards.
        assert fake.guest.run("true", timeout_s=5) == ""
    finally:
        fake.close()


def test_track_resize_times_out_with_the_state_seen():
    from bench.run import track_resize

    base = 900 * 1024
    fake = FakeGuest(base)
    try:
        dev = FakeDevice(fake, base)
        dev.set_requested_size = lambda size: None  # the device never moves
        with pytest.raises(TimeoutError, match="device size 0"):
            track_resize(dev, 1 * GIB, base, timeout_s=0.3)
    finally:
        fake.close()


# -- the report of a whole run, from synthetic results ----------------------------------

def _synthetic_results() -> dict:
    def resize(s):
        return {"size_s": s, "memtotal_s": s + 0.01, "alloc_s": s, "guest_poll_rtt_s": 0.02,
                "cpu_s": {"qemu": s, "server": s / 10}, "window": [0.0, 100.0],
                "samples": {"size": [(s, 0)], "memtotal_kib": [(0.0, 1000), (s, 2000)], "allocated": []}}

    def series(scale):
        rep = {"1G": {"grow": resize(0.1 * scale), "shrink_untouched": resize(1.0 * scale),
                      "grow_again": resize(0.1 * scale), "shrink_touched": resize(2.0 * scale), "touch_s": 3.0,
                      "alloc_before": 0, "alloc_touched": 900 * MIB, "alloc_after": 0, "returned_fraction": 1.0,
                      "rss_before": {"VmRSS": GIB, "RssShmem": GIB // 2},
                      "rss_touched": {"VmRSS": 2 * GIB, "RssShmem": GIB},
                      "rss_after": {"VmRSS": GIB, "RssShmem": GIB // 2}}}
        return {"base_kib": 1000, "reps": [rep, rep]}

    return {
        "env": {"date": "2026-11-26", "host": "test", "accel": "TCG", "qemu": "QEMU 11"},
        "reps": 2, "sizes": [GIB], "touch_fraction": 0.9, "guest_kernel": "6.12",
        "devices": {"qemu": {"boot": {"ready_s": 3.0}, "series": series(1.0)},
                    "ours": {"boot": {"ready_s": 3.3}, "series": series(1.1), "server_ready_s": 0.2}},
        "service_times": {"hook": "RequestServed",
                          "records": [[1.0, 0, 0, 50e-6, "c"], [2.0, 1, 0, 0.02, "python"]],
                          "all_seconds": [50e-6, 0.02]},
        "micro": {
            "discard": [{"device_bytes": GIB, "block_bytes": 2 * MIB, "ranges": 256, "touch": False,
                         "times": {"c": [0.001], "python": [0.002]}}],
            "bitmap": {"nb_blocks": 512, "block_bytes": 2 * MIB, "ops": {"count_plugged, whole device": 1e-7,
                                                                         "_alternating_runs": 256}},
            "policy_cost": {"requests": 1, "rounds": 1, "blocks": 64, "block_bytes": 2 * MIB,
                            "labels": {"c": "C path", "python": "Python path"},
                            "times": {"c": {"PLUG": [5e-6], "UNPLUG": [7e-6]},
                                      "python": {"PLUG": [40e-6], "UNPLUG": [44e-6]}}},
            "startup": [{"size": "1T", "devices": 1, "how": "cli", "ready_s": [0.2],
                         "rss": [{"VmRSS": 30 * MIB}]}],
        },
    }


def test_render_has_every_section_and_ratios():
    from bench.run import render

    text = render(_synthetic_results(), [GIB])
    assert "| grow 0 -> 1G: device size (QMP)" in text
    grow = next(line for line in text.splitlines() if line.startswith("| grow 0 -> 1G: device size"))
    assert _table_cells(grow)[0][-1] == "1.10"
    assert "unplugged memory the host got back" in text and "100.0 %" in text
    for section in ("Device-side service time", "Where the time of a resize goes", "Discard loop",
                    "Block bitmap", "Server start-up", "Per-request cost of a Python plug policy"):
        assert section in text, section
    assert "PLUG (c)" in text and "UNPLUG (python)" in text
    policy = next(line for line in text.splitlines() if line.startswith("| Python path"))
    assert _table_cells(policy)[0][1:2] == ["42.0"] and _table_cells(policy)[0][-1] == "7.00"
    assert "C / Python" in text and "0.50" in text


def test_boot_row_takes_every_boot_of_a_device():
    from bench.run import render

    results = _synthetic_results()
    results["devices"]["qemu"]["boots_s"] = [3.0, 4.0, 3.5]
    results["devices"]["ours"]["boots_s"] = [3.3, 3.4, 5.0]
    row = next(line for line in render(results, [GIB]).splitlines() if line.startswith("| boot:"))
    cells = _table_cells(row)[0]
    assert "3.50 s (3.00 s - 4.00 s)" in cells[1] and "3.40 s (3.30 s - 5.00 s)" in cells[2]
    assert cells[-1] == "0.97"
    # Without extra boots, the series' one.
    results = _synthetic_results()
    row = next(line for line in render(results, [GIB]).splitlines() if line.startswith("| boot:"))
    assert _table_cells(row)[0][-1] == "1.10"


def test_plots_are_written(tmp_path):
    import matplotlib  # noqa: F401  (the bench extra, installed by scripts/setup.sh)

    from bench.run import write_plots

    written = write_plots(_synthetic_results(), [GIB], tmp_path)
    assert {Path(p).name for p in written} == {"timelines.png", "service_times.png"}
    for p in written:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_arguments_default_to_the_documented_run():
    from bench.run import parse_args

    args = parse_args([])
    assert args.reps == 5 and args.sizes == [GIB, 4 * GIB] and args.touch_fraction == 0.9
    assert args.device_size == "8G" and args.block_size == "2M" and args.micro_device == 1 << 40
    assert args.boots == 3


# -- bench/latency.py: per-request segments from QEMU's trace and the server's events ----------

def _trace_line(t: float, event: str, args: str) -> str:
    """One line of QEMU's log trace backend with -msg timestamp=on."""
    import datetime

    stamp = datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"{stamp}Z {event} {args}\n"


T0 = 1_795_680_000.0  # 2026-11-26T08:00:00Z
US = 1e-6


def _write_trace(path: Path, lines: list[tuple[float, str, str]]) -> None:
    path.write_text("".join(_trace_line(T0 + t * US, e, a) for t, e, a in lines))


def test_latency_parses_trace_lines(tmp_path):
    from bench import latency

    t, ev, args = latency.parse_trace_line("2026-11-26T08:00:00.000250Z vfio_user_region_rw  region 0 offset "
                                           "0x3000 count 2\n")
    assert t == pytest.approx(T0 + 250 * US, abs=1e-7)
    assert (ev, args) == ("vfio_user_region_rw", "region 0 offset 0x3000 count 2")
    assert latency.parse_trace_line("qemu-system-x86_64: terminating on signal 15\n") is None
    # One file per thread (-d tid): merged in time order, the thread id from the name.
    _write_trace(tmp_path / "trace-20.log", [(30, "apic_deliver_irq", "vector 35"), (10, "virtio_notify", "vq 0x1")])
    _write_trace(tmp_path / "trace-21.log", [(20, "virtio_queue_notify", "n 0")])
    trace = latency.load_trace(sorted(tmp_path.glob("trace-*.log")))
    assert [(e[1], e[2]) for e in trace] == [(20, "virtio_notify"), (21, "virtio_queue_notify"),
                                            (20, "apic_deliver_irq")]


def _ours_fixture(old_events: bool = False):
    """Two PLUG requests of one grow through our server, in us after T0:
    QEMU's vCPU (tid 2), its iothread (3) and main loop (1), and the
    server's events, plus noise each lookup must skip."""
    vcpu, io, main = 2, 3, 1
    trace = []
    events = []
    for i, base in enumerate((1000, 5000)):
        mid = 0x40 + i
        trace += [
            (base - 300, vcpu, "vfio_user_region_rw", "region 0 offset 0x14 count 2"),  # a BAR0 read: not a notify
            (base - 290, vcpu, "vfio_user_send_write", f"id {mid - 0x10:#x} wrote 0x20"),
            (base, vcpu, "vfio_user_region_rw", "region 0 offset 0x3000 count 2"),
            (base + 5, vcpu, "vfio_user_send_write", f"id {mid:#x} wrote 0x22"),
            (base + 260, io, "vfio_user_recv_hdr", f"(unix:/tmp/s) id {mid:#x} cmd 0x9 size 0x10 flags 0x1"),
            (base + 350, main, "vfio_msi_interrupt", "(vfio-user:/tmp/s) vector 0 0xfee00000/0x22"),  # config
            (base + 400, main, "vfio_msi_interrupt", "(vfio-user:/tmp/s) vector 1 0xfee01000/0x23"),
            (base + 405, vcpu, "apic_deliver_irq", "dest 1 dest_mode 0 delivery_mode 0 vector 35 trigger_mode 0"),
            (base + 408, main, "apic_deliver_irq", "dest 0 dest_mode 0 delivery_mode 0 vector 35 trigger_mode 0"),
            (base + 410, main, "apic_deliver_irq", "dest 1 dest_mode 0 delivery_mode 0 vector 34 trigger_mode 0"),
            (base + 415, main, "apic_deliver_irq", "dest 1 dest_mode 0 delivery_mode 0 vector 35 trigger_mode 0"),
        ]
        if old_events:  # an event file of an earlier served.py: the server's Python around the request
            events += [["run0", base + 100], ["run1", base + 200, 1], ["pq0", base + 201],
                       ["req", base + 300, 0], ["trig", base + 330, 1], ["trig1", base + 340, 1],
                       ["pq1", base + 350, 1]]
        else:  # served in C inside the notify write: one clock for it all
            events += [["ntf", base + 100], ["req", base + 100, 0], ["trig", base + 100, 1],
                       ["nq", base + 100, 1, 20e-6]]
    # A STATE request served after a vfio-user message: not a request of the notify path.
    events.append(["srv", 3000, 3, 30e-6, "python"])
    trace.sort()
    windows = [{"name": "1G#1", "wall0": T0, "wall1": T0 + 9000 * US}]
    return ([(T0 + t * US, tid, e, a) for t, tid, e, a in trace],
            [[e[0], T0 + e[1] * US, *e[2:]] for e in events], windows)


def test_latency_cuts_our_requests_into_segments():
    from bench import latency

    trace, events, windows = _ours_fixture()
    reqs = latency.requests_ours(trace, events, windows)
    assert len(reqs) == 2 and all(r["grow"] == "1G#1" and r["type"] == 0 for r in reqs)
    seg = {(a, b): latency.segment_us(reqs, a, b) for _, a, b in latency.SEGMENTS["ours"]}
    approx = lambda xs: pytest.approx(xs, abs=1)  # noqa: E731
    assert seg[("send", "ntf")] == approx([100, 100])
    assert seg[("ntf", "reply")] == approx([160, 160])
    assert seg[("send", "reply")] == approx([260, 260])
    assert seg[("trig", "msi")] == approx([300, 300])  # vector 1, not the config vector's 0
    assert seg[("msi", "apic")] == approx([15, 15])  # the main loop's delivery of vector 0x23 to APIC 1
    assert seg[("send", "apic")] == approx([415, 415])
    assert seg[("apic", "next")] == approx([4000 - 415])  # the last request of a grow has no next
    assert seg[("send", "next")] == approx([4000])
    assert latency.outside_notify_note(events) == ""  # the request served elsewhere is a STATE
    srv = [*events, [events[0][0].replace("ntf", "srv"), T0 + 6000 * US, 0, 50e-6, "python"]]
    assert latency.outside_notify_note(srv).startswith("vfiouser-vmem: 1 PLUG request(s) were served after")
    # Outside every grow window: not counted.
    assert latency.requests_ours(trace, events, [{"name": "x", "wall0": T0 + 1, "wall1": T0 + 2}]) == []
    # The first request's MSI merged into the next one's (QEMU's main loop
    # read the eventfd once): no MSI before the guest's next notify.
    merged = [e for e in trace if not (e[2] == "vfio_msi_interrupt" and "vector 1 " in e[3] and e[0] < T0 + 2e-3)]
    reqs = latency.requests_ours(merged, events, windows)
    assert (reqs[0]["msi"], reqs[0]["apic"]) == (None, None)
    assert latency.segment_us(reqs, "trig", "msi") == approx([300])
    assert "1 of 2 PLUG requests" in latency.no_msi_note({"ours": reqs})


def test_latency_reads_the_events_of_an_earlier_served_py():
    """Event files of an earlier bench/served.py (its vfu_run_ctx and
    process_queue events, no notify served in C) are still cut: the
    vfu_run_ctx call that returned right before process_queue carried the
    notify."""
    from bench import latency

    trace, events, windows = _ours_fixture(old_events=True)
    reqs = latency.requests_ours(trace, events, windows)
    assert len(reqs) == 2
    approx = lambda xs: pytest.approx(xs, abs=1)  # noqa: E731
    assert latency.segment_us(reqs, "send", "run0") == approx([100, 100])
    assert latency.segment_us(reqs, "run0", "run1") == approx([100, 100])
    assert latency.segment_us(reqs, "send", "reply") == approx([260, 260])
    assert latency.segment_us(reqs, "run0", "ntf") == []


def test_latency_cuts_qemu_requests_into_segments(tmp_path):
    from bench import latency

    vcpu0, vcpu1 = 5, 6
    lines = []
    for base in (1000, 4000):
        lines += [
            (base, vcpu0, "virtio_queue_notify", "vdev 0x1 n 0 vq 0x2"),
            (base + 20, vcpu0, "virtio_mem_plug_request", "addr=0x100000000 nb_blocks=64"),
            (base + 25, vcpu1, "apic_deliver_irq", "vector 236"),  # the other vCPU's timer
            (base + 60, vcpu0, "virtio_mem_send_response", "type=0"),
            (base + 64, vcpu0, "virtio_notify", "vdev 0x1 vq 0x2"),
            (base + 70, vcpu0, "apic_deliver_irq", "vector 35"),
        ]
    trace = sorted((T0 + t * US, tid, e, a) for t, tid, e, a in lines)
    reqs = latency.requests_qemu(trace, [{"name": "4G#2", "wall0": T0, "wall1": T0 + 5000 * US}])
    assert [r["type"] for r in reqs] == [0, 0]
    approx = lambda xs: pytest.approx(xs, abs=1)  # noqa: E731
    assert latency.segment_us(reqs, "send", "plug") == approx([20, 20])
    assert latency.segment_us(reqs, "plug", "resp") == approx([40, 40])
    assert latency.segment_us(reqs, "notify", "apic") == approx([6, 6])
    assert latency.segment_us(reqs, "send", "apic") == approx([70, 70])
    assert latency.segment_us(reqs, "send", "next") == approx([3000])


def test_latency_report_totals_and_difference():
    from bench import latency

    def req(grow, send, apic, nxt, type_=0):
        return {"grow": grow, "type": type_, "send": send, "apic": apic, "next": nxt}

    data = {"ours": [req("1G#1", 0, 500e-6, 4e-3), req("1G#1", 4e-3, 4.3e-3, 8e-3),
                     req("1G#1", 8e-3, 8.1e-3, None, type_=1)],  # an UNPLUG: left out
            "qemu": [req("1G#1", 0, 100e-6, 3e-3), req("1G#1", 3e-3, 3.1e-3, 6e-3)]}
    s = latency.stats(latency.segment_us(latency.plugs(data["ours"]), "send", "apic"))
    assert s["n"] == 2 and s["median"] == pytest.approx(400) and s["mean"] == pytest.approx(400)
    assert s["p90"] == pytest.approx(480)
    assert latency.stats([]) is None
    cells = _table_cells(latency.totals_table(data, ["1G"]))
    assert cells[0][0] == "per PLUG request, us"
    rows = {row[0]: row for row in cells[2:]}
    assert rows["device latency: notify -> MSI delivered"][1:] == ["400 / 480 / 400 (2)", "100 / 100 / 100 (2)",
                                                                   "+300 / +300"]
    assert rows["per request: notify -> next notify"][3] == "+1000 / +1000"  # 4 ms vs 3 ms
    meta = {"reps": 1, "sizes": ["1G"], "device_size": "8G", "block_size": "2M",
            "devices": {"ours": {"grows": [{"size": "1G", "memtotal_s": 0.07}]},
                        "qemu": {"grows": [{"size": "1G", "memtotal_s": 0.06}], "error": "RuntimeError('x')"}}}
    text = latency.render(meta, data)
    assert "vfiouser-vmem, segment by segment" in text and "QEMU virtio-mem-pci, segment by segment" in text
    assert "**qemu: failed:** RuntimeError('x')" in text and "70.0 ms" in text


def test_latency_arguments_default_to_the_documented_run():
    from bench.latency import parse_args

    args = parse_args([])
    assert args.reps == 3 and args.sizes == [GIB, 4 * GIB] and args.only == "both" and args.analyze is None


def test_grows_are_paired_by_repetition():
    from bench import run

    def series(times):
        return {"reps": [{"1G": {"grow": {"memtotal_s": a, "size_s": None}, "grow_again": {"memtotal_s": b}}}
                         for a, b in times]}

    results = {"devices": {"qemu": {"series": series([(0.10, 0.20), (0.10, 0.10)])},
                           "ours": {"series": series([(0.11, 0.20), (0.30, 0.05)])}}}
    assert run.paired_grow_ratios(results, "1G", "memtotal_s") == pytest.approx([1.1, 1.0, 3.0, 0.5])
    assert run.paired_grow_ratios(results, "1G", "size_s") == []  # no clock, no pair
    assert run.paired_grow_ratios(results, "4G", "memtotal_s") == []
    text = run.paired_section(results, [1 << 30])
    assert "| grow 0 -> 1G: guest MemTotal |     4 |         1.05 | 0.50 - 3.00 |" in text
    assert "device size" not in text


def test_the_devices_own_clock_is_the_last_plug_answer_in_each_grow(tmp_path):
    from bench import qemutrace, run

    # QEMU's trace: two PLUGs answered in the grow, a STATE answer (no PLUG
    # pending: not counted), and a PLUG of another grow outside the window.
    lines = [
        "2026-11-26T08:00:00.010000Z virtio_mem_plug_request addr=0x1 nb_blocks=64",
        "2026-11-26T08:00:00.011000Z virtio_mem_send_response type=0",
        "2026-11-26T08:00:00.040000Z virtio_mem_plug_request addr=0x2 nb_blocks=64",
        "2026-11-26T08:00:00.041500Z virtio_mem_send_response type=0",
        "2026-11-26T08:00:00.050000Z virtio_mem_send_response type=0",
        "2026-11-26T08:00:09.000000Z virtio_mem_plug_request addr=0x3 nb_blocks=64",
        "2026-11-26T08:00:09.001000Z virtio_mem_send_response type=0",
    ]
    (tmp_path / "trace.log").write_text("\n".join(lines) + "\n")
    answers = run.qemu_plug_answers(qemutrace.load_trace([tmp_path / "trace.log"]))
    assert len(answers) == 3
    wall0 = answers[0] - 0.011  # the qom-set at 08:00:00.000
    qemu = {"reps": [{"1G": {"grow": {"window": [100.0, 100.5], "wall0": wall0}}}]}
    run.add_answer_clock(qemu, answers, wall=True)
    assert qemu["reps"][0]["1G"]["grow"]["answered_s"] == pytest.approx(0.0415, abs=1e-6)
    # Ours: the server's records, on the bench's own monotonic clock.
    ours = {"reps": [{"1G": {"grow": {"window": [100.0, 100.5]}, "grow_again": {"window": [200.0, 200.5]}}}]}
    run.add_answer_clock(ours, [100.02, 100.03, 150.0], wall=False)
    assert ours["reps"][0]["1G"]["grow"]["answered_s"] == pytest.approx(0.03)
    assert ours["reps"][0]["1G"]["grow_again"]["answered_s"] is None  # no answer in its window


# -- bench/many_guests.py ------------------------------------------------------------

def test_many_guests_answers_every_request_of_every_device(tmp_path):
    """N=2 resizing devices and a small fragmented device for the
    UNPLUG_ALL, briefly: every request a driver sent was ACKed, the server
    served exactly those (its RequestServed records, device by device), the
    QMP client was answered, and the rows and tables have their fields."""
    from bench import many_guests

    raw = many_guests.run_one(2, duration_s=1.0, unplug_window_s=0.6, device_size="64M", big_size="64M",
                              keep=tmp_path)
    sent = {dev: recs for c in raw["clients"] for dev, recs in c["devices"].items()}
    assert set(sent) == {"vm0", "vm1"} and all(sent.values())
    assert all(r[3] == 0 and r[1] > 0 for recs in sent.values() for r in recs)  # [time, seconds, type, ACK]
    served = raw["server_stats"]
    assert {dev: len(recs) for dev, recs in served.items() if dev != "big"} == {d: len(r) for d, r in sent.items()}
    for dev, recs in sent.items():
        assert [r[1] for r in served[dev]] == [r[2] for r in recs]  # the same types, in the same order
    # The big device: 16 fragmenting PLUGs (every other of 32 blocks), then the UNPLUG_ALL, all ACKed.
    assert raw["big"]["runs"] == 16 and raw["big"]["unplug_all"]["response"] == 0
    assert [r[1] for r in served["big"]] == [0] * 16 + [2] and all(r[2] == 0 for r in served["big"])
    assert raw["big"]["unplug_all"]["discards_done"] is not None
    # One page written in each plugged block; the UNPLUG_ALL's discards gave them all back.
    assert raw["big"]["allocated_bytes"] >= 16 * 4096 and raw["big"]["allocated_after_bytes"] == 0
    # Every process keeps the run's schedule (time.monotonic, shared by all):
    # resizing from t0 on, the UNPLUG_ALL in phase B, after t1.
    assert min(r[0] for recs in sent.values() for r in recs) >= raw["t0"]
    assert raw["t1"] <= raw["big"]["unplug_all"]["sent"] <= raw["t_end"]
    assert raw["qmp"] and all(s[1] > 0 for s in raw["qmp"])

    row = many_guests.summarize(raw)
    steady, unplug = row["steady"], row["unplug_all"]
    assert steady["n"] == 2 and steady["devices"] == 3
    assert steady["requests"] == steady["acked"] > 0
    assert steady["requests"] <= sum(len(r) for r in sent.values())
    assert steady["server_paths"]["c"] + steady["server_paths"]["python"] > 0
    for key in ("client_service_s", "server_service_s", "qmp_s"):
        assert steady[key]["n"] > 0 and steady[key]["p50"] <= steady[key]["p99"] <= steady[key]["max"]
    assert 0 < steady["server_trio_cpu"] and set(steady["client_cpu"]) == {"clients0"}
    assert unplug["runs"] == 16 and unplug["answer_s"] > 0 and unplug["discards_done_s"] >= 0
    _, steady_table, _, unplug_table = many_guests.tables([row]).split("\n\n")
    header, _, cells = _table_cells(steady_table)
    assert len(cells) == len(header) and cells[:3] == ["2", "3", f"{steady['req_per_s']:.0f}"]
    header, _, cells = _table_cells(unplug_table)
    assert len(cells) == len(header) and cells[0] == "2" and cells[1].startswith("64M, 16 runs, ")
    assert (tmp_path / "server-n2.log").exists()
