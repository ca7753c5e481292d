"""Where the time between two PLUG requests goes with a Memory backends row
of bench/run.py (``--backend``, default ``prealloc``), for both devices.

With ``prealloc=on`` our grows took longer than the device's own service
time explains (docs/benchmarks.md, "Memory backends").  This probe boots
each device in turn with the row's backend and device options (bench/run.py's
``BACKENDS``: 2 GiB devices, 2 MiB blocks), QEMU traced as bench/latency.py
traces it (one log per thread) and, for ours, bench/served.py's wall-clock
events; grows 0 -> 1G and shrinks back ``--grows`` times; then cuts every
PLUG request of the grows:

- QEMU's device: ``virtio_mem_plug_request`` -> ``virtio_mem_send_response``
  (the request, inside the vCPU's notify write), -> ``apic_deliver_irq``,
  -> the guest's next ``virtio_queue_notify``;
- ours (PLUGs served in Python, after the vfio-user message, as prealloc=on
  has them; served.py's ``srv`` events: when the observers heard, and the
  service time): the vCPU's notify write (``vfio_user_region_rw`` at the
  notify offset) -> the serve's start (``srv`` time - service time) ->
  its end -> QEMU's ``vfio_msi_interrupt`` -> ``apic_deliver_irq`` -> the
  guest's next notify write.

Prints the median of each segment.  The hugetlb rows need huge pages: run
those under integration/hugepages.py's pool (``--backend hugetlb-prealloc``
takes it itself).  Timings are reported, never asserted.

    .venv/bin/python bench/probes/prealloc_gap.py [--backend prealloc] [--grows 4] [--out DIR]   # ~1.5 min
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))

import hugepages  # noqa: E402  (integration/hugepages.py)
from harness import Kit, short_tmpdir  # noqa: E402

from bench import latency, report  # noqa: E402
from bench.qemu_vmem import QemuVmem  # noqa: E402
from bench.run import BACKENDS, SETTLE_S, OursVmem, boot, say, track_resize  # noqa: E402
from vfiouser_vmem.util.sizes import parse_size  # noqa: E402
from vfiouser_vmem.virtio import _pci as vp  # noqa: E402

DEVICE_SIZE = "2G"
GROW = "1G"


def run_device(kind: str, kit: Kit, backend, kdir: Path, grows: int) -> list[tuple[float, float]]:
    """Boot, grow and shrink ``grows`` times; the grows' wall-clock windows."""
    qemu_args = latency.trace_args(kind, kdir)
    workdir = short_tmpdir()
    dev = None
    try:
        t_spawn = time.monotonic()
        if kind == "qemu":
            dev = QemuVmem(kit, workdir, size=DEVICE_SIZE, block_size="2M", extra_args=qemu_args,
                           backend_opts=backend.object_opts, device_opts=backend.device_opts)
        else:
            dev = OursVmem(kit, workdir, size=DEVICE_SIZE, block_size="2M", stats_path=kdir / "service_times.json",
                           qemu_args=qemu_args, served_args=["--events", str(kdir / "server-events.json")],
                           backend=backend)
        base = boot(dev, t_spawn)["base_kib"]
        windows = []
        for i in range(grows):
            wall0 = time.time()
            g = track_resize(dev, parse_size(GROW), base)
            windows.append((wall0, time.time()))
            say(f"{kind}: grow {i + 1}: device size after {g['size_s']:.3f} s")
            time.sleep(SETTLE_S)
            track_resize(dev, 0, base)
            time.sleep(SETTLE_S)
        return windows
    finally:
        if dev is not None:
            dev.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _med(xs: list[float]) -> str:
    return f"{report.percentile(xs, 50) * 1e3:.2f} ms (n={len(xs)})" if xs else "-"


def qemu_segments(kdir: Path, windows: list[tuple[float, float]]) -> list[list[str]]:
    trace = latency.load_trace(sorted(kdir.glob("trace-*.log")))
    reqs = [r for r in latency.requests_qemu(trace, [{"wall0": a, "wall1": b, "name": str(i)}
                                                      for i, (a, b) in enumerate(windows)]) if r["type"] == 0]

    def seg(a: str, b: str) -> list[float]:
        return [r[b] - r[a] for r in reqs if r.get(a) is not None and r.get(b) is not None]

    return [["QEMU: plug_request -> send_response (the request, in the notify write)", _med(seg("plug", "resp"))],
            ["QEMU: send_response -> apic_deliver_irq", _med(seg("resp", "apic"))],
            ["QEMU: apic_deliver_irq -> next notify (guest)", _med(seg("apic", "next"))],
            ["QEMU: notify -> next notify", _med(seg("send", "next"))]]


def ours_segments(kdir: Path, windows: list[tuple[float, float]]) -> list[list[str]]:
    trace = latency.load_trace(sorted(kdir.glob("trace-*.log")))
    notify = f"region 0 offset {vp.NOTIFY_OFFSET:#x} "
    sends = [t for t, _, ev, a in trace if ev == "vfio_user_region_rw" and (a + " ").startswith(notify)]
    msis = [t for t, _, ev, _ in trace if ev == "vfio_msi_interrupt"]
    apics = [t for t, _, ev, _ in trace if ev == "apic_deliver_irq"]
    events = json.loads((kdir / "server-events.json").read_text())["events"]
    srv = sorted((e for e in events if e[0] == "srv" and int(e[2]) == 0
                  and any(a <= e[1] <= b for a, b in windows)), key=lambda e: e[1])
    wait, service, to_msi, msi_apic, apic_next, per = [], [], [], [], [], []
    for i, e in enumerate(srv):
        end, start = e[1], e[1] - e[3]
        service.append(e[3])
        j = bisect.bisect_right(sends, start) - 1
        send = sends[j] if j >= 0 else None
        if send is not None:
            wait.append(start - send)
        k = bisect.bisect_left(msis, start)
        if k == len(msis):
            continue
        to_msi.append(msis[k] - end)
        a = bisect.bisect_left(apics, msis[k])
        if a == len(apics):
            continue
        msi_apic.append(apics[a] - msis[k])
        n = bisect.bisect_left(sends, apics[a])
        if n < len(sends) and i + 1 < len(srv) and sends[n] < srv[i + 1][1]:
            apic_next.append(sends[n] - apics[a])
            if send is not None:
                per.append(sends[n] - send)
    return [["ours: notify write -> the serve starts (Python path)", _med(wait)],
            ["ours: the serve (service time: allocation and answer)", _med(service)],
            ["ours: vfio_msi_interrupt, from the serve's end (observers told; negative: the MSI came first)",
             _med(to_msi)],
            ["ours: vfio_msi_interrupt -> apic_deliver_irq", _med(msi_apic)],
            ["ours: apic_deliver_irq -> next notify write (guest)", _med(apic_next)],
            ["ours: notify -> next notify", _med(per)]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=list(BACKENDS), default="prealloc")
    p.add_argument("--grows", type=int, default=4)
    p.add_argument("--out", help="keep the traces here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    backend = BACKENDS[args.backend]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="prealloc-gap-"))
    kit = Kit.build()
    # One device at a time: one backend's reservation.
    pool = (hugepages.pool_of(parse_size(DEVICE_SIZE) // hugepages.PAGE_BYTES, say=say) if backend.hugetlb
            else contextlib.nullcontext())
    try:
        windows = {}
        with pool:
            for kind in ("qemu", "ours"):
                windows[kind] = run_device(kind, kit, backend, out / kind, args.grows)
        rows = qemu_segments(out / "qemu", windows["qemu"]) + ours_segments(out / "ours", windows["ours"])
        print(f"{backend.label(DEVICE_SIZE)}; grow 0 -> {GROW}, {args.grows} times per device; per PLUG, median\n")
        print(report.markdown_table(["segment", "median"], rows))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
