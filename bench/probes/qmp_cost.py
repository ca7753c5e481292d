"""Server CPU time per QMP command: what one ``qom-get`` costs the server.

bench/run.py polls ``qom-get size`` every 10 ms during each resize, so the
server's cost per QMP command is CPU taken from the device it serves.  This
script starts ``vfiouser-vmem serve`` (the real command line, no QEMU: the
QMP socket answers without a vfio-user client), opens one QMP session on its
``--qmp`` socket, and for each command measured sends it ``--count`` times
(default 300), one at a time, each after the previous reply arrived:

- **back-to-back**: the next request as soon as the reply is in (warm
  caches, the server's best case);
- **10 ms apart** (``--interval-ms``): one request per interval, as the
  bench's poll does (the server sleeps between requests: cold caches, plus
  the cost of waking up its trio loop).

The server's CPU time (its process CPU-time clock, ``clock_getcpuclockid``:
all threads, in ns) is read before and after each series.  The spaced series
also includes what the server burns while idle over the same wall time, so
an idle series of the same length with no requests is measured first and its
rate subtracted; the raw figure is printed too.  Each series runs
``--rounds`` times (default 3) and the median per command is printed, in
microseconds of server CPU per command.  Commands measured: ``qom-get``
``size`` (path ``/machine/peripheral/vmem0``) and ``query-memory-devices``.
Timings are reported, never asserted.

Run it (about 30 s; needs the package in ``.venv``, no QEMU)::

    .venv/bin/python bench/probes/qmp_cost.py
    .venv/bin/python bench/probes/qmp_cost.py --count 1000 --rounds 5 --log-level info
    .venv/bin/python bench/probes/qmp_cost.py --cprofile /tmp/qmp.prof   # the server under cProfile

Before/after a change, in one run: ``--repo DIR`` (repeatable) serves from
another checkout instead of this one (``DIR/vfiouser_vmem``, put first on
``PYTHONPATH``; a ``git archive`` of a commit needs the built ``*.so`` copied
in).  All servers start together and idle at (next to) no CPU cost; each round measures
every series on each server in turn, so that drift of a shared machine's
load lands on all of them alike::

    mkdir /tmp/old && git archive HEAD | tar -x -C /tmp/old && cp vfiouser_vmem/*.so /tmp/old/vfiouser_vmem/
    .venv/bin/python bench/probes/qmp_cost.py --repo /tmp/old --repo . --rounds 5

With ``--cprofile`` the figures include the profiler's overhead; they are for
finding where the time goes, not for comparing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

COMMANDS = {
    "qom-get size": {"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vmem0", "property": "size"}},
    "query-memory-devices": {"execute": "query-memory-devices"},
}


def _process_cpu_clock(pid: int) -> int:
    # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), include/linux/posix-timers.h.
    return ((~pid) << 3) | 2


def server_cpu_ns(pid: int) -> int:
    """CPU time of process ``pid`` so far, in ns (all threads)."""
    try:
        return time.clock_gettime_ns(_process_cpu_clock(pid))
    except OSError:
        # utime + stime, in clock ticks: coarse, but better than nothing.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class Qmp:
    """A minimal blocking QMP client: one request, one reply line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        greeting = self.read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting!r}")
        self.execute({"execute": "qmp_capabilities"})

    def read(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the server closed the QMP connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, request: dict) -> object:
        return self.roundtrip(json.dumps(request).encode())

    def roundtrip(self, raw: bytes) -> object:
        self.sock.sendall(raw)
        while True:
            reply = self.read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP error: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self.sock.close()


def start_server(workdir: str, repo: Path, args: argparse.Namespace) -> subprocess.Popen:
    """``vfiouser-vmem serve`` from ``repo``, its sockets in ``workdir``."""
    qmp_path = os.path.join(workdir, "vmem0.qmp")
    serve = ["serve", "--socket", os.path.join(workdir, "vmem0.sock"), "--size", args.size,
             "--id", "vmem0", "--qmp", qmp_path, "--log-level", args.log_level]
    if args.cprofile:
        cmd = [sys.executable, "-m", "cProfile", "-o", args.cprofile, "-m", "vfiouser_vmem.cli", *serve]
    else:
        cmd = [sys.executable, "-m", "vfiouser_vmem.cli", *serve]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=log)
    line = proc.stdout.readline().decode()
    if "ready" not in line:
        stop_server(proc)
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the server from {repo} did not start: {line!r}\n{tail}")
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def run_series(qmp: Qmp, pid: int, raw: bytes | None, count: int, interval_s: float) -> tuple[int, float]:
    """``count`` requests (``raw``; None: none at all, an idle series),
    ``interval_s`` apart (0: back to back). Returns (server CPU ns, wall s)."""
    wall0 = time.monotonic()
    cpu0 = server_cpu_ns(pid)
    for i in range(count):
        if interval_s:
            delay = wall0 + i * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if raw is not None:
            qmp.roundtrip(raw)
    if interval_s:  # the last interval too, so that idle and busy series match
        delay = wall0 + count * interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    cpu1 = server_cpu_ns(pid)
    return cpu1 - cpu0, time.monotonic() - wall0


def measure(servers: list[tuple[Qmp, int]], args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    """Every series on every server, round after round; medians per server."""
    interval_s = args.interval_ms / 1000
    for qmp, _pid in servers:
        for request in COMMANDS.values():  # warm up: imports, first-call paths
            for _ in range(50):
                qmp.execute(request)
    idle: list[list[float]] = [[] for _ in servers]
    b2b: list[dict[str, list[float]]] = [{name: [] for name in COMMANDS} for _ in servers]
    spaced: list[dict[str, list[float]]] = [{name: [] for name in COMMANDS} for _ in servers]
    spaced_raw: list[dict[str, list[float]]] = [{name: [] for name in COMMANDS} for _ in servers]
    for _ in range(args.rounds):
        for i, (qmp, pid) in enumerate(servers):
            cpu, wall = run_series(qmp, pid, None, args.count, interval_s)
            idle[i].append(cpu / wall)  # ns of CPU per s of wall, idle
    idle_rate = [statistics.median(rates) for rates in idle]
    for _ in range(args.rounds):
        for name, request in COMMANDS.items():
            raw = json.dumps(request).encode()
            for i, (qmp, pid) in enumerate(servers):
                cpu, _wall = run_series(qmp, pid, raw, args.count, 0)
                b2b[i][name].append(cpu / args.count / 1000)
                cpu, wall = run_series(qmp, pid, raw, args.count, interval_s)
                spaced_raw[i][name].append(cpu / args.count / 1000)
                spaced[i][name].append((cpu - idle_rate[i] * wall) / args.count / 1000)
    results = []
    for i in range(len(servers)):
        r: dict[str, dict[str, float]] = {"idle": {"us_per_interval": idle_rate[i] * interval_s / 1000}}
        for name in COMMANDS:
            r[name] = {
                "back_to_back_us": statistics.median(b2b[i][name]),
                "spaced_us": statistics.median(spaced[i][name]),
                "spaced_raw_us": statistics.median(spaced_raw[i][name]),
            }
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="requests per series (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="series per figure; the median is printed (default 3)")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="spacing of the spaced series (default 10)")
    parser.add_argument("--size", default="8G", help="the device's --size (default 8G)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the server's --log-level (default info, the CLI's default)")
    parser.add_argument("--repo", action="append", type=Path, metavar="DIR",
                        help="serve from this checkout (repeatable: measured interleaved; default this one)")
    parser.add_argument("--cprofile", metavar="OUT", help="run the server under cProfile, pstats written to OUT")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    repos = [repo.resolve() for repo in args.repo] if args.repo else [REPO]
    for repo in repos:
        if not (repo / "vfiouser_vmem" / "__init__.py").is_file():
            parser.error(f"--repo {repo}: no vfiouser_vmem package there")
    if args.cprofile and len(repos) > 1:
        parser.error("--cprofile takes one server (one --repo)")

    procs: list[subprocess.Popen] = []
    clients: list[Qmp] = []
    with tempfile.TemporaryDirectory(prefix="qmp-cost-") as tmp:
        try:
            for i, repo in enumerate(repos):
                workdir = os.path.join(tmp, str(i))
                os.mkdir(workdir)
                procs.append(start_server(workdir, repo, args))
                clients.append(Qmp(os.path.join(workdir, "vmem0.qmp")))
            results = measure([(qmp, proc.pid) for qmp, proc in zip(clients, procs)], args)
        finally:
            for qmp in clients:
                qmp.close()
            for proc in procs:
                stop_server(proc)

    print(f"server CPU per QMP command, us (median of {args.rounds} series of {args.count}; "
          f"server --log-level {args.log_level})")
    for repo, r in zip(repos, results):
        if len(repos) > 1 or repo != REPO:
            print(f"{repo}:")
        print(f"  idle server: {r['idle']['us_per_interval']:.1f} us per {args.interval_ms:g} ms "
              f"(subtracted from the spaced figures)")
        print(f"  {'command':<24} {'back-to-back':>12} {f'{args.interval_ms:g} ms apart':>12} {'(raw)':>10}")
        for name in COMMANDS:
            c = r[name]
            print(f"  {name:<24} {c['back_to_back_us']:>12.1f} {c['spaced_us']:>12.1f} {c['spaced_raw_us']:>10.1f}")
    if args.cprofile:
        print(f"  (under cProfile; pstats in {args.cprofile})")
    if args.json:
        print(json.dumps({str(repo): r for repo, r in zip(repos, results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
