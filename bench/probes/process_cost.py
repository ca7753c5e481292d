"""What a server process costs per host: one process serving N devices
(``--object``/``--device`` pairs of 8G memfd backends) against N processes
of one device each (docs/deploy.md, "One host").

For N = 1, 8, 32 it starts ``vfiouser-vmem serve`` (the venv's) with N
devices, waits for its "ready" line and reads /proc: RSS and PSS
(smaps_rollup), open fds and threads; then N servers of one device each,
all at once, and sums their PSS (which splits the pages the processes share,
the interpreter's and libraries', among them) and RSS.  Each is stopped with
SIGTERM.  No guest: this is the idle cost of serving.

    .venv/bin/python bench/probes/process_cost.py [--sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

EXE = os.path.join(os.path.dirname(sys.executable), "vfiouser-vmem")


def _field(text: str, key: str) -> int:
    return int(next(line for line in text.splitlines() if line.startswith(key + ":")).split()[1])


def _start(n: int, workdir: str, tag: str) -> tuple[subprocess.Popen, float]:
    argv = [EXE, "serve", "--qmp", os.path.join(workdir, f"{tag}.qmp")]
    for i in range(n):
        argv += ["--object", f"memory-backend-memfd,id=m{i},size=8G",
                 "--device", f"id=vm{i},memdev=m{i},socket={os.path.join(workdir, f'{tag}-{i}.sock')}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise SystemExit(f"serve with {n} devices did not start: {line!r}")
    return proc, time.monotonic() - t0


def _read(pid: int) -> dict:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rollup = f.read()
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return {"rss_kib": _field(rollup, "Rss"), "pss_kib": _field(rollup, "Pss"),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": _field(status, "Threads")}


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def measure(n: int, workdir: str) -> dict:
    """One process with ``n`` devices, then ``n`` processes with one each,
    all running at once (their PSS summed: shared pages counted once)."""
    proc, start_s = _start(n, workdir, f"one{n}")
    try:
        one = _read(proc.pid)
    finally:
        _stop([proc])
    procs: list[subprocess.Popen] = []
    try:
        for i in range(n):
            procs.append(_start(1, workdir, f"many{n}-{i}")[0])
        many = [_read(p.pid) for p in procs]
    finally:
        _stop(procs)
    return {"devices": n, "start_s": start_s, **one, "many_pss_kib": sum(m["pss_kib"] for m in many),
            "many_rss_kib": sum(m["rss_kib"] for m in many)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,8,32")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmem-pc-", dir="/tmp") as workdir:
        rows = [measure(int(n), workdir) for n in args.sizes.split(",")]
    print("| devices | one process: start-up | RSS | PSS | fds | threads | one process per device: PSS (sum) | "
          "RSS (sum) | PSS ratio |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['devices']} | {r['start_s']:.2f} s | {r['rss_kib'] / 1024:.1f} MiB | {r['pss_kib'] / 1024:.1f} MiB "
              f"| {r['fds']} | {r['threads']} | {r['many_pss_kib'] / 1024:.1f} MiB | {r['many_rss_kib'] / 1024:.1f} MiB "
              f"| {r['many_pss_kib'] / r['pss_kib']:.1f} |")


if __name__ == "__main__":
    main()
