"""Many guests, one process: one server serving N devices to N clients at once.

    .venv/bin/python bench/many_guests.py [--devices 1,8,32] [--duration 10] [--client-procs 1]

For each N: one server process, bench/served.py (so that every request's
server-side service time is recorded from the devices' ``RequestServed``
events; ``--plain-server``: ``vfiouser-vmem serve`` itself, without that
recorder and so without server-side figures), with N devices ``vm0..`` of
``--device-size`` (memfd backends, ``--object``/``--device`` as
``vfiouser-vmem serve`` reads them) and one more device ``big`` of
``--big-size`` (1 TiB, a sparse memfd) that only the UNPLUG_ALL row uses.
The clients are the tests' own vfio-user client and virtio driver
(tests/vfio_user_client.py, tests/virtio_driver.py), no QEMU: each device
gets its own connection, PCI and virtio set-up, queue and DMA-mapped guest
RAM, as QEMU's ``vfio-user-pci`` and Linux would give it.  The N drivers
run as trio tasks in ``--client-procs`` worker processes; ``big``'s driver
and a QMP client run in processes of their own.

Every device's requested size is raised to its whole size over QMP first.
Then each driver loops PLUG/UNPLUG requests of random block runs (1-64
blocks in one state: unplugged ones plugged, plugged ones unplugged, so
every request is ACKed) for ``--duration`` seconds (phase A), while the QMP
client asks ``qom-get size`` (the plugged size) of one device after the
other every ``--qmp-interval`` seconds.  Phase B follows: the drivers go on
for ``--unplug-window`` seconds, and one second into it (or half-way
through a shorter window) ``big`` gets an UNPLUG_ALL.  During the set-up it
had every ``--big-stride``-th block plugged (262144 runs for 1 TiB in 2 MiB
blocks, 64 PLUGs per notify) and one page written in each plugged block;
after the UNPLUG_ALL its driver polls ``qom-get discard-pending`` until the
deferred discards (docs/discard.md) are done.

Measured: requests per second (all devices, answered in phase A); service
time at the client (notify write to used-ring entry seen: this includes the
client's own overhead, its Python and its share of the 2 cores) and at the
server (``RequestServed.service_s``: reading the request to writing the used
entry); the QMP round trip; CPU time of the server process and of its main
(trio) thread against wall time (``/proc/PID/task/PID/stat``), and of the
client processes.  For the UNPLUG_ALL: its answer at the client and at the
server, the time until ``discard-pending`` is 0, and the other devices'
requests that were in flight during it (their client-side p50/p99/max, the
number over 100 ms) against phase A's.

It prints markdown tables and writes ``bench/results/<timestamp>-many/``:
``table.md``, ``results.json`` (summaries and the raw samples) and each
server's log.  Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "integration", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from harness import QmpClient, ServerProcess, short_tmpdir  # noqa: E402

from bench import report  # noqa: E402
from bench.procinfo import _stat_ticks, cpu_seconds  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402

MIB = 1 << 20
#: Where each driver puts the memory BAR: 1 TiB-aligned, so that a 1 TiB
#: BAR is naturally aligned as the PCI spec wants of a BAR (each device has
#: its own connection, hence its own address space).
BAR_ADDR = 1 << 40
#: The device's queue holds 128 descriptors (virtio/_pci.py QUEUE_MAX_SIZE):
#: 64 two-descriptor chains per notify for the fragmenting PLUGs.
QUEUE_SIZE = 128
CHAINS_PER_KICK = QUEUE_SIZE // 2
MAX_RUN_BLOCKS = 64
BIG_ID = "big"
#: A stalled request, for the UNPLUG_ALL row's count.
STALL_S = 0.1
#: Liveness bounds of the bench's waits on its children: the set-up (the
#: 1 TiB device's 4096 notifies of fragmenting PLUGs on 2 shared cores) and
#: the UNPLUG_ALL's discards (1 TiB in 32 MiB chunks, docs/discard.md).
SETUP_TIMEOUT_S = 600
DISCARD_TIMEOUT_S = 120


class ManyServer(ServerProcess):
    """bench/served.py (``--stats``: every request's server-side service time)
    with ``--object``/``--device`` devices, started as ``harness.ServerProcess``
    starts ``vfiouser-vmem serve``."""

    def __init__(self, workdir: Path, argv: list[str], *, plain: bool = False) -> None:
        self.stats_path = workdir / "stats.json"
        self.plain = plain
        super().__init__(workdir, "many", argv)

    def command(self) -> list[str]:
        if self.plain:
            # ``vfiouser-vmem serve`` itself: no recorder, no server-side figures.
            return super().command()
        return [sys.executable, str(REPO / "bench" / "served.py"), "--stats", str(self.stats_path), "serve"]


def server_argv(workdir: Path, n: int, device_size: str, block_size: str, big_size: str | None) -> list[str]:
    argv: list[str] = []
    ids = [f"vm{k}" for k in range(n)] + ([BIG_ID] if big_size else [])
    for dev in ids:
        size = big_size if dev == BIG_ID else device_size
        argv += ["--object", f"memory-backend-memfd,id=mem-{dev},size={size}",
                 "--device", f"id={dev},memdev=mem-{dev},socket={workdir / (dev + '.sock')},"
                             f"block-size={block_size},requested-size=0"]
    return argv


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` so far, by "TID NAME" (ticks)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[f"{tid} {name}"] = _stat_ticks(f"/proc/{pid}/task/{tid}/stat") / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return out


def main_thread_cpu_s(pid: int) -> float:
    """CPU time of ``pid``'s main thread (the server's trio thread), in clock
    ticks: a thread of another process has no CPU-time clock we may read
    (kernel/time/posix-cpu-timers.c, lookup_task: same thread group only)."""
    try:
        return _stat_ticks(f"/proc/{pid}/task/{pid}/stat") / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


# -- the client processes ------------------------------------------------------

async def _open_driver(sock: str, ram_size: int = 1 * MIB):
    from vfio_user_client import VfioUserClient
    from virtio_driver import VirtioMemDriver

    client = await VfioUserClient.connect(sock)
    driver = VirtioMemDriver(client, bar_addr=BAR_ADDR, queue_size=QUEUE_SIZE, ram_size=ram_size, timeout=120)
    try:
        await driver.initialize()
        cfg = await driver.read_config()
    except BaseException:
        driver.close()
        client.close()
        raise
    return client, driver, cfg


def _next_run(rng: random.Random, plugged: bytearray) -> tuple[int, int, bool]:
    """(first block, blocks, plug?): from a random block, the run of blocks
    in the same state (at most MAX_RUN_BLOCKS): a PLUG of unplugged blocks
    or an UNPLUG of plugged ones, so the device ACKs it (virtio spec 5.15.6.2:
    a mixed range is an error)."""
    nb = len(plugged)
    first = rng.randrange(nb)
    want = rng.randint(1, MAX_RUN_BLOCKS)
    state = plugged[first]
    count = 1
    while count < want and first + count < nb and plugged[first + count] == state:
        count += 1
    return first, count, not state


async def _resize_loop(driver, cfg, rng: random.Random, t_end: float, out: list) -> None:
    """PLUG/UNPLUG random runs until ``t_end``: ``[submit time, client
    service seconds, type, response]`` per request in ``out``."""
    from virtio_driver import PLUG, UNPLUG

    nb = cfg.requested_size // cfg.block_size
    plugged = bytearray(nb)
    while time.monotonic() < t_end:
        first, count, plug = _next_run(rng, plugged)
        type_ = PLUG if plug else UNPLUG
        started = time.monotonic()
        code, _ = await driver.call(type_, cfg.addr + first * cfg.block_size, count)
        out.append([started, time.monotonic() - started, type_, code])
        if code == 0:
            plugged[first:first + count] = b"\x01" * count if plug else bytes(count)


async def _fragment(driver, cfg, stride: int, *, touch: bool) -> dict:
    """Every ``stride``-th block of the device plugged, 64 PLUGs per notify
    (AssertionError on a refused one); with ``touch``, one byte written in
    each plugged block through the memory BAR's fd (its first page then
    allocated in the backend: what a guest that used the memory leaves for
    the discard to free).  Returns the runs and the backend's allocated
    bytes."""
    from vfio_user_client import BAR2
    from virtio_driver import ACK, PLUG, request, response

    nb = cfg.requested_size // cfg.block_size
    blocks = range(0, nb, stride)
    for at in range(0, len(blocks), CHAINS_PER_KICK):
        reqs = [request(PLUG, cfg.addr + b * cfg.block_size, 1) for b in blocks[at:at + CHAINS_PER_KICK]]
        for raw in await driver.submit_many(reqs):
            if response(raw)[0] != ACK:
                raise AssertionError(f"fragmenting PLUG answered {response(raw)}")
    info = await driver.client.region_info(BAR2)
    if touch:
        for b in blocks:
            os.pwrite(info.fd, b"\x01", info.offset + b * cfg.block_size)
    return {"runs": len(blocks), "bar_fd": info.fd, "allocated_bytes": os.fstat(info.fd).st_blocks * 512}


async def _sleep_until_monotonic(at: float) -> None:
    """Until ``time.monotonic()`` reaches ``at``, the clock shared by every
    process of the run: trio's own clock has a random offset of its own
    (trio's SystemClock), so ``trio.sleep_until`` cannot take these times."""
    import trio

    await trio.sleep(max(0.0, at - time.monotonic()))


async def _worker(spec: dict) -> None:
    """One client process: ``spec["devices"]`` resizers, or (``role`` big)
    the UNPLUG_ALL device.  Prints "ready" after the set-up, reads "go
    T0 T_UNPLUG T_END" (monotonic times) from stdin, writes its JSON."""
    import trio

    rng = random.Random(spec["seed"])
    opened = []
    try:
        for dev in spec["devices"]:
            opened.append((dev, *await _open_driver(spec["sockets"][dev])))
        result: dict = {"pid": os.getpid(), "devices": {}}
        if spec["role"] == "big":
            fragmented = await _fragment(opened[0][2], opened[0][3], spec["stride"], touch=spec["touch"])
            bar_fd = fragmented.pop("bar_fd")
            result.update(fragmented)
        print("ready", flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        _, t0, t_unplug, t_end = line.split()
        t0, t_unplug, t_end = float(t0), float(t_unplug), float(t_end)
        await _sleep_until_monotonic(t0)
        cpu0 = time.process_time()
        if spec["role"] == "big":
            result["unplug_all"] = await _unplug_all(opened[0][2], spec, t_unplug)
            result["allocated_after_bytes"] = os.fstat(bar_fd).st_blocks * 512
        else:
            async with trio.open_nursery() as nursery:
                for dev, _client, driver, cfg in opened:
                    out = result["devices"].setdefault(dev, [])
                    nursery.start_soon(_resize_loop, driver, cfg, random.Random(rng.random()), t_end, out)
        result["cpu_s"] = time.process_time() - cpu0
        result["wall_s"] = time.monotonic() - t0
        Path(spec["out"]).write_text(json.dumps(result))
        print("done", flush=True)
    finally:
        for _dev, client, driver, _cfg in opened:
            driver.close()
            client.close()


async def _unplug_all(driver, spec: dict, t_unplug: float) -> dict:
    """UNPLUG_ALL at ``t_unplug``, then ``discard-pending`` polled over QMP
    every 10 ms until 0 (or ``spec["discard_timeout_s"]``)."""
    import trio
    from virtio_driver import UNPLUG_ALL

    await _sleep_until_monotonic(t_unplug)
    sent = time.monotonic()
    code, _ = await driver.call(UNPLUG_ALL)
    answered = time.monotonic()
    done = None
    with QmpClient(spec["qmp"], timeout_s=30) as qmp:
        deadline = answered + spec["discard_timeout_s"]
        while time.monotonic() < deadline:
            if qmp.execute("qom-get", path=BIG_ID, property="discard-pending") == 0:
                done = time.monotonic()
                break
            await trio.sleep(0.01)
    return {"sent": sent, "answered": answered, "response": code, "discards_done": done}


def _qmp_poll(spec: dict) -> None:
    """The QMP client: ``qom-get size`` (the plugged size) of each device in turn, one
    every ``interval_s``, ``[time, round trip seconds]`` each."""
    with QmpClient(spec["qmp"], timeout_s=30) as qmp:
        print("ready", flush=True)
        _, t0, _t_unplug, t_end = sys.stdin.readline().split()
        t0, t_end = float(t0), float(t_end)
        samples = []
        devices = spec["devices"]
        next_at = t0
        i = 0
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if now < next_at:
                time.sleep(next_at - now)  # the poll's own pacing, as an operator's monitor would
                continue
            started = time.monotonic()
            # "size" is the plugged size (QEMU's virtio-mem-pci property name).
            qmp.execute("qom-get", path=devices[i % len(devices)], property="size")
            samples.append([started, time.monotonic() - started])
            i += 1
            next_at = started + spec["interval_s"]
    Path(spec["out"]).write_text(json.dumps({"pid": os.getpid(), "samples": samples}))
    print("done", flush=True)


def _child(mode: str, spec: dict, workdir: Path, name: str) -> subprocess.Popen:
    path = workdir / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(workdir / f"{name}.log", "wb"), text=True)
    return proc


def _expect(proc: subprocess.Popen, word: str, workdir: Path, name: str, timeout_s: float) -> None:
    """The child's next line is ``word``, within ``timeout_s`` (each child
    prints one line at a time and waits for the bench before the next, so
    nothing is left in the pipe's buffer that select would not see)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else f"(nothing in {timeout_s:.0f} s)"
    if line.strip() != word:
        raise RuntimeError(f"{name}: {line!r} instead of {word!r}\n"
                           f"{(workdir / f'{name}.log').read_text(errors='replace')[-3000:]}")


# -- one N ------------------------------------------------------------------------

def run_one(n: int, *, duration_s: float, unplug_window_s: float, device_size: str = "1G", block_size: str = "2M",
            big_size: str | None = "1T", big_stride: int = 2, big_touch: bool = True, client_procs: int = 1,
            qmp_interval_s: float = 0.01, plain_server: bool = False,
            seed: int = 1, keep: Path | None = None) -> dict:
    """N devices served by one process to N drivers; returns the raw samples
    and the CPU figures (``summarize`` makes the rows)."""
    workdir = short_tmpdir()
    # The machine is shared: its load is part of the result.
    load_before = os.getloadavg()
    server = None
    children: list[tuple[str, subprocess.Popen]] = []
    try:
        server = ManyServer(workdir, server_argv(workdir, n, device_size, block_size, big_size), plain=plain_server)
        ids = [f"vm{k}" for k in range(n)]
        for dev in ids + ([BIG_ID] if big_size else []):
            size = parse_size(big_size if dev == BIG_ID else device_size)
            server.qmp.execute("qom-set", path=dev, property="requested-size", value=size)
        sockets = {dev: str(workdir / f"{dev}.sock") for dev in ids + [BIG_ID]}
        common = {"sockets": sockets, "qmp": server.qmp_path}
        procs = max(1, min(client_procs, n))
        # The connections are made one process after the other: libvfio-user's
        # listen backlog is 0 (tests/vfio_user_client.py, connect).
        for p in range(procs):
            name = f"clients{p}"
            proc = _child("worker", {**common, "role": "resize", "devices": ids[p::procs], "seed": seed + p,
                                     "out": str(workdir / f"{name}.json")}, workdir, name)
            children.append((name, proc))
            _expect(proc, "ready", workdir, name, SETUP_TIMEOUT_S)
        if big_size:
            proc = _child("worker", {**common, "role": "big", "devices": [BIG_ID], "seed": seed, "stride": big_stride,
                                     "touch": big_touch, "discard_timeout_s": DISCARD_TIMEOUT_S,
                                     "out": str(workdir / "big.json")}, workdir, "big")
            children.append(("big", proc))
            _expect(proc, "ready", workdir, "big", SETUP_TIMEOUT_S)
        proc = _child("qmp-poll", {**common, "devices": ids, "interval_s": qmp_interval_s,
                                   "out": str(workdir / "qmp.json")}, workdir, "qmp")
        children.append(("qmp", proc))
        _expect(proc, "ready", workdir, "qmp", SETUP_TIMEOUT_S)

        t0 = time.monotonic() + 0.5
        t1 = t0 + duration_s
        t_unplug = t1 + min(1.0, unplug_window_s / 2)
        t_end = t1 + (unplug_window_s if big_size else 0)
        for _, proc in children:
            proc.stdin.write(f"go {t0} {t_unplug} {t_end}\n")
            proc.stdin.flush()
        pids = {name: proc.pid for name, proc in children}
        cpu: dict[str, list[tuple[float, float, float]]] = {}
        threads: list[dict[str, float]] = []

        def sample(at: float) -> None:
            time.sleep(max(0.0, at - time.monotonic()))  # the bench's own schedule
            now = time.monotonic()
            cpu.setdefault("server", []).append((now, cpu_seconds(server.proc.pid), main_thread_cpu_s(server.proc.pid)))
            threads.append(thread_cpu_s(server.proc.pid))
            for name, pid in pids.items():
                cpu.setdefault(name, []).append((now, cpu_seconds(pid), 0.0))

        for at in (t0, t1, t_end):
            sample(at)
        for name, proc in children:
            _expect(proc, "done", workdir, name, max(0.0, t_end - time.monotonic()) + DISCARD_TIMEOUT_S + 30)
        clients = [json.loads((workdir / f"clients{p}.json").read_text()) for p in range(procs)]
        big = json.loads((workdir / "big.json").read_text()) if big_size else None
        qmp_samples = json.loads((workdir / "qmp.json").read_text())["samples"]
        code = server.stop()
        if code != 0:
            raise RuntimeError(f"the server exited with {code}:\n{server.log()[-3000:]}")
        stats = {} if plain_server else json.loads(server.stats_path.read_text())["devices"]
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(server.log_path, keep / f"server-n{n}.log")
        return {"n": n, "device_size": parse_size(device_size), "block_size": parse_size(block_size),
                "big_size": parse_size(big_size) if big_size else None, "big_stride": big_stride,
                "big_touch": big_touch, "plain_server": plain_server,
                "client_procs": procs, "duration_s": duration_s, "t0": t0, "t1": t1,
                "t_end": t_end,
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu": cpu,
                "server_threads": threads, "clients": clients, "big": big, "qmp": qmp_samples, "server_stats": stats}
    finally:
        for _, proc in children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- the figures -------------------------------------------------------------------

def _pcts(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": report.percentile(values, 50), "p99": report.percentile(values, 99),
            "max": max(values)}


def _cpu_share(samples: list, i: int, j: int, col: int = 1) -> float | None:
    wall = samples[j][0] - samples[i][0]
    return (samples[j][col] - samples[i][col]) / wall if wall > 0 else None


def summarize(raw: dict) -> dict:
    """Phase A's row and the UNPLUG_ALL row of one ``run_one`` result."""
    t0, t1 = raw["t0"], raw["t1"]
    requests = [r for c in raw["clients"] for recs in c["devices"].values() for r in recs]
    in_a = [r for r in requests if t0 <= r[0] and r[0] + r[1] <= t1]
    server_a = [r[3] for dev, recs in raw["server_stats"].items() if dev != BIG_ID for r in recs if t0 <= r[0] <= t1]
    qmp_a = [s[1] for s in raw["qmp"] if t0 <= s[0] <= t1]
    cpu = raw["cpu"]
    row = {
        "n": raw["n"], "devices": raw["n"] + (1 if raw["big_size"] else 0), "requests": len(in_a),
        "req_per_s": len(in_a) / (t1 - t0),
        "acked": sum(1 for r in in_a if r[3] == 0),
        "client_service_s": _pcts([r[1] for r in in_a]), "server_service_s": _pcts(server_a),
        "server_paths": {p: sum(1 for dev, recs in raw["server_stats"].items() if dev != BIG_ID for r in recs
                                if t0 <= r[0] <= t1 and r[4] == p) for p in ("c", "python")},
        "qmp_s": _pcts(qmp_a),
        "server_cpu": _cpu_share(cpu["server"], 0, 1), "server_trio_cpu": _cpu_share(cpu["server"], 0, 1, 2),
        "client_cpu": {name: _cpu_share(s, 0, 1) for name, s in cpu.items() if name.startswith("clients")},
        "server_threads_cpu": {k: (v - raw["server_threads"][0].get(k, 0.0)) / (t1 - t0)
                               for k, v in raw["server_threads"][1].items()} if raw.get("server_threads") else {},
    }
    # The trio thread's CPU per answered request, and the rate at which it
    # would be busy all the time if that cost stayed the same.
    trio_share = row["server_trio_cpu"]
    row["trio_cpu_per_request_s"] = trio_share * (t1 - t0) / len(in_a) if in_a and trio_share else None
    row["req_per_s_at_full_trio"] = row["req_per_s"] / trio_share if trio_share else None
    client_share = sum(v for v in row["client_cpu"].values() if v)
    row["client_cpu_per_request_s"] = client_share * (t1 - t0) / len(in_a) if in_a else None
    out = {"steady": row}
    big = raw["big"]
    if big:
        u = big["unplug_all"]
        end = u["discards_done"] or u["answered"]
        # The others' requests in flight at any time between the UNPLUG_ALL's
        # send and its discards' end.
        during = [r for r in requests if r[0] <= end and r[0] + r[1] >= u["sent"]]
        big_server = [r for r in raw["server_stats"].get(BIG_ID, []) if r[1] == 2]
        qmp_w = [s[1] for s in raw["qmp"] if s[0] <= end and s[0] + s[1] >= u["sent"]]
        out["unplug_all"] = {
            "n": raw["n"], "big_size": raw["big_size"], "runs": big["runs"], "response": u["response"],
            "allocated_bytes": big["allocated_bytes"], "allocated_after_bytes": big["allocated_after_bytes"],
            "answer_s": u["answered"] - u["sent"],
            "server_service_s": big_server[-1][3] if big_server else None,
            "discards_done_s": (u["discards_done"] - u["sent"]) if u["discards_done"] else None,
            "others_s": _pcts([r[1] for r in during]), "others_stalled": sum(1 for r in during if r[1] > STALL_S),
            "qmp_s": _pcts(qmp_w),
            "server_cpu": _cpu_share(cpu["server"], 1, 2), "server_trio_cpu": _cpu_share(cpu["server"], 1, 2, 2),
        }
    return out


def _s(x: float | None) -> str:
    return "-" if x is None else report.fmt_seconds(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else report.fmt_percent(x)


def tables(rows: list[dict]) -> str:
    """The markdown tables of ``summarize``'s results, one per row kind."""
    steady = [r["steady"] for r in rows]
    headers = ["N", "devices", "req/s total", "server p50", "server p99", "client p50", "client p99",
               "qom-get p50", "qom-get p99", "qom-get max", "server CPU", "trio thread CPU", "trio CPU / request",
               "req/s at 100 % trio", "client CPU", "client CPU / request"]
    body = [[str(r["n"]), str(r["devices"]), f"{r['req_per_s']:.0f}", _s(r["server_service_s"]["p50"]),
             _s(r["server_service_s"]["p99"]), _s(r["client_service_s"]["p50"]), _s(r["client_service_s"]["p99"]),
             _s(r["qmp_s"]["p50"]), _s(r["qmp_s"]["p99"]), _s(r["qmp_s"]["max"]), _pct(r["server_cpu"]),
             _pct(r["server_trio_cpu"]), _s(r["trio_cpu_per_request_s"]),
             "-" if r["req_per_s_at_full_trio"] is None else f"{r['req_per_s_at_full_trio']:.0f}",
             " + ".join(_pct(v) for v in r["client_cpu"].values()), _s(r["client_cpu_per_request_s"])]
            for r in steady]
    parts = ["N devices resizing at once (PLUG/UNPLUG of random runs, 1-64 blocks; service time per request: "
             "server = RequestServed.service_s, client = notify write to used entry seen, with the client's own "
             "overhead; CPU = CPU time / wall time, 100 % = one core)\n\n" + report.markdown_table(headers, body)]
    unplug = [r["unplug_all"] for r in rows if "unplug_all" in r]
    if unplug:
        headers = ["N resizing", "UNPLUG_ALL of (runs, allocated)", "answered (client)", "served (server)",
                   "discards done",
                   "others p50", "others p99", "others max", f"others > {_s(STALL_S)}", "qom-get max",
                   "trio thread CPU"]
        body = [[str(u["n"]),
                 f"{format_size(u['big_size'])}, {u['runs']} runs, {report.fmt_bytes(u['allocated_bytes'])}",
                 _s(u["answer_s"]),
                 _s(u["server_service_s"]), _s(u["discards_done_s"]), _s(u["others_s"]["p50"]),
                 _s(u["others_s"]["p99"]), _s(u["others_s"]["max"]),
                 f"{u['others_stalled']} of {u['others_s']['n']}", _s(u["qmp_s"]["max"]),
                 _pct(u["server_trio_cpu"])] for u in unplug]
        parts.append("One UNPLUG_ALL of a fragmented device while the N others resize (others = their requests in "
                     "flight between the UNPLUG_ALL's send and its discards' end, client-side)\n\n"
                     + report.markdown_table(headers, body))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="1,8,32", help="the N of each row (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of resizing per N, phase A (default 10)")
    p.add_argument("--unplug-window", type=float, default=8.0,
                   help="seconds the drivers go on resizing around the UNPLUG_ALL, phase B (default 8)")
    p.add_argument("--device-size", default="1G", help="each resizing device's size (default 1G)")
    p.add_argument("--block-size", default="2M", help="every device's block size (default 2M)")
    p.add_argument("--big-size", default="1T", help="the UNPLUG_ALL device's size, or none (default 1T)")
    p.add_argument("--big-stride", type=int, default=2, help="every STRIDE-th block of it plugged (default 2)")
    p.add_argument("--no-big-touch", dest="big_touch", action="store_false",
                   help="leave the UNPLUG_ALL device's plugged blocks untouched (default: one page written in each)")
    p.add_argument("--client-procs", type=int, default=1, help="processes the N drivers are spread over (default 1)")
    p.add_argument("--qmp-interval", type=float, default=0.01, help="seconds between qom-gets (default 0.01)")
    p.add_argument("--plain-server", action="store_true",
                   help="run vfiouser-vmem serve itself instead of bench/served.py (no server-side service times)")
    p.add_argument("--analyze", metavar="DIR", help="print the tables of an earlier run's results.json, no run")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>-many)")
    args = p.parse_args(argv)
    args.devices = [int(x) for x in args.devices.split(",") if x]
    args.big_size = None if args.big_size == "none" else args.big_size
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("worker", "qmp-poll"):
        spec = json.loads(Path(argv[1]).read_text())
        if argv[0] == "worker":
            import trio

            trio.run(_worker, spec)
        else:
            _qmp_poll(spec)
        return 0
    args = parse_args(argv)
    if args.analyze:
        # An earlier run's raw samples, summed up again by this version.
        saved = json.loads((Path(args.analyze) / "results.json").read_text())
        print(saved.get("header", "") + tables([summarize(raw) for raw in saved["raw"]]))
        return 0
    # SIGTERM as an exception, so that run_one's finally stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    outdir = Path(args.out) if args.out else REPO / "bench" / "results" / (
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-many")
    raws, rows = [], []
    for n in args.devices:
        raw = run_one(n, duration_s=args.duration, unplug_window_s=args.unplug_window, device_size=args.device_size,
                      block_size=args.block_size, big_size=args.big_size, big_stride=args.big_stride,
                      big_touch=args.big_touch,
                      client_procs=args.client_procs, qmp_interval_s=args.qmp_interval,
                      plain_server=args.plain_server, keep=outdir)
        raws.append(raw)
        rows.append(summarize(raw))
        print(tables(rows[-1:]), flush=True)
    loads = ", ".join(f"N={raw['n']}: {raw['loadavg_before'][0]:.1f}" for raw in raws)
    header = (f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs; "
              f"load average (1 min) before each N: {loads}; {args.duration:g} s per N\n\n")
    text = header + tables(rows)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "table.md").write_text(text + "\n")
    (outdir / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "header": header,
                                                     "rows": rows, "raw": raws}))
    print(text)
    print(f"results: {outdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
