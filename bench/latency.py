"""Where the time of one virtio-mem PLUG request goes: vfiouser-vmem against
QEMU's own virtio-mem-pci, segment by segment.

    .venv/bin/python bench/latency.py [--reps 3] [--sizes 1G,4G]
    .venv/bin/python bench/latency.py --analyze bench/results/<timestamp>-latency   (no guest)

Boots the integration kit's guest twice (as bench/run.py does: QEMU's
virtio-mem-pci, then our server through bench/served.py) with QEMU
tracing to one log per thread (``-msg timestamp=on -d tid -D ...
-trace events=...``) and, for ours, the server's own wall-clock events
(``served.py --events``: each notify write the C request path served, with
its requests and its interrupt, at the C call's own clock; the requests
served elsewhere, as the server's RequestServed events).  Both clocks are
CLOCK_REALTIME.  Per repetition and size it grows 0 -> S (the traced
operation: one PLUG request at a time) and shrinks back to 0.  Then it cuts
every PLUG request of the grows into segments, from the vCPU's notify write
to the MSI delivered to the guest's APIC and on to the guest's next notify,
and prints median / p90 / mean per segment for both devices, plus the
per-request totals and their difference.  Writes table.md, requests.json
(every request's timestamps), meta.json and the raw traces to
bench/results/<timestamp>-latency/.  Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))

from harness import Kit, short_tmpdir  # noqa: E402

from bench import report  # noqa: E402
from bench.qemu_vmem import QemuVmem  # noqa: E402
from bench.qemutrace import load_trace, parse_trace_line, trace_args as _trace_args  # noqa: E402,F401 (parse_trace_line: tests)
from bench.run import SETTLE_S, OursVmem, boot, environment, say, track_resize  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402
from vfiouser_vmem.virtio import _pci as vp  # noqa: E402

#: QEMU trace events per device (the ``log`` backend, one line each).
TRACE_EVENTS = {
    "ours": ["vfio_user_region_rw", "vfio_user_send_write", "vfio_user_recv_hdr", "vfio_msi_interrupt",
             "apic_deliver_irq"],
    "qemu": ["virtio_queue_notify", "virtio_mem_plug_request", "virtio_mem_unplug_request",
             "virtio_mem_send_response", "virtio_notify", "apic_deliver_irq"],
}
VIRTIO_MEM_REQ_PLUG = 0

# -- parsing -----------------------------------------------------------------------

def _first_at_or_after(times: list[float], t: float, limit: float | None = None) -> int | None:
    i = bisect.bisect_left(times, t)
    if i < len(times) and (limit is None or times[i] < limit):
        return i
    return None


def _last_at_or_before(times: list[float], t: float, floor: float | None = None) -> int | None:
    i = bisect.bisect_right(times, t) - 1
    if i >= 0 and (floor is None or times[i] > floor):
        return i
    return None


def _in_window(t: float, windows: list[dict]) -> dict | None:
    for w in windows:
        if w["wall0"] <= t <= w["wall1"]:
            return w
    return None


def _link_next(reqs: list[dict]) -> None:
    """Each request's ``next``: the next request's notify write in the same grow."""
    for a, b in zip(reqs, reqs[1:]):
        if a["grow"] == b["grow"]:
            a["next"] = b.get("send")


def requests_ours(trace, events: list[list], windows: list[dict]) -> list[dict]:
    """One dict per request the server handled inside a grow window, keyed
    on its ``req`` event, with the timestamps (seconds since the epoch) of
    the path around it; None where an event was not found."""
    notify = f"region 0 offset {vp.NOTIFY_OFFSET:#x} "
    sends: list[tuple[float, int]] = []  # (vCPU notify write, message id)
    pending: dict[int, float | None] = {}
    replies: dict[int, float] = {}
    msis: list[tuple[float, int, int, tuple[int, int]]] = []  # (t, tid, MSI-X index, (APIC id, vector))
    apics: dict[int, list[tuple[float, tuple[int, int]]]] = {}  # per thread: (t, (APIC id, vector))
    for t, tid, ev, args in trace:
        if ev == "vfio_user_region_rw":
            pending[tid] = t if (args + " ").startswith(notify) else None
        elif ev == "vfio_user_send_write":
            rw = pending.pop(tid, None)
            m = re.search(r"id (0x[0-9a-f]+)", args)
            if rw is not None and m:
                sends.append((rw, int(m.group(1), 16)))
        elif ev == "vfio_user_recv_hdr":
            m = re.search(r"id (0x[0-9a-f]+) cmd 0x[0-9a-f]+ size 0x[0-9a-f]+ flags (0x[0-9a-f]+)", args)
            if m and int(m.group(2), 16) & 0xF == 1:  # a reply
                replies.setdefault(int(m.group(1), 16), t)
        elif ev == "vfio_msi_interrupt":
            m = re.search(r"vector (\d+) (0x[0-9a-f]+)/(0x[0-9a-f]+)", args)
            if m:  # MSI address 0xfeeXX000: XX is the destination APIC id; data: the vector
                dest = (int(m.group(2), 16) >> 12) & 0xFF, int(m.group(3), 16) & 0xFF
                msis.append((t, tid, int(m.group(1)), dest))
        elif ev == "apic_deliver_irq":
            m = re.search(r"dest (\d+) .*vector (\d+)", args)
            if m:
                apics.setdefault(tid, []).append((t, (int(m.group(1)), int(m.group(2)))))
    by: dict[str, list] = {}
    for e in events:
        by.setdefault(e[0], []).append(e)
    for v in by.values():
        v.sort(key=lambda e: e[1])
    times = {k: [e[1] for e in v] for k, v in by.items()}
    T = lambda k: times.get(k, [])  # noqa: E731
    send_t = [s[0] for s in sends]
    msi_t = [m[0] for m in msis]
    out: list[dict] = []
    reqs = by.get("req", [])
    for i, (_, t_req, rtype) in enumerate(reqs):
        grow = _in_window(t_req, windows)
        if grow is None:
            continue
        prev = reqs[i - 1][1] if i else None
        nxt = reqs[i + 1][1] if i + 1 < len(reqs) else None
        r = {"grow": grow["name"], "type": rtype, "req": t_req}
        out.append(r)
        j = _last_at_or_before(T("ntf"), t_req, prev)
        r["ntf"] = T("ntf")[j] if j is not None else None
        j = _last_at_or_before(T("pq0"), t_req, prev)
        r["pq0"] = T("pq0")[j] if j is not None else None
        vector = None
        for key in ("trig", "trig1", "pq1"):
            j = _first_at_or_after(T(key), t_req, nxt)
            r[key] = T(key)[j] if j is not None else None
            if key == "trig" and j is not None:
                vector = by["trig"][j][2]
        r["run0"] = r["run1"] = r["send"] = r["reply"] = None
        if r["ntf"] is not None:
            j = _last_at_or_before(T("run0"), r["ntf"], prev)
            r["run0"] = T("run0")[j] if j is not None else None
            j = _first_at_or_after(T("run1"), r["ntf"], nxt)
            r["run1"] = T("run1")[j] if j is not None else None
        elif r["pq0"] is not None:
            # The notify was taken in C (no ntf event): the vfu_run_ctx call
            # that returned right before process_queue carried it.
            j = _last_at_or_before(T("run1"), r["pq0"], prev)
            r["run1"] = T("run1")[j] if j is not None else None
            if r["run1"] is not None:
                j = _last_at_or_before(T("run0"), r["run1"], prev)
                r["run0"] = T("run0")[j] if j is not None else None
        # The vCPU's notify write: the last one before the server took it
        # (the C serve inside the write: its ntf event; older event files
        # also have the vfu_run_ctx call that carried it).
        anchor = r["ntf"] if r["ntf"] is not None else r["run1"]
        if anchor is not None:
            j = _last_at_or_before(send_t, anchor, prev)
            r["send"], msg_id = (sends[j][0], sends[j][1]) if j is not None else (None, None)
            r["reply"] = replies.get(msg_id) if msg_id is not None else None
        r["msi"] = r["apic"] = None
        if r["trig"] is not None:
            j = _first_at_or_after(msi_t, r["trig"], nxt)
            while j is not None and j < len(msis) and msis[j][2] != vector:
                j += 1
            if j is not None and j < len(msis) and (nxt is None or msis[j][0] < nxt):
                t_msi, tid, _, dest = msis[j]
                r["msi"] = t_msi
                ap = apics.get(tid, [])
                k = _first_at_or_after([a[0] for a in ap], t_msi)
                while k is not None and k < len(ap) and ap[k][1] != dest:
                    k += 1
                if k is not None and k < len(ap):
                    r["apic"] = ap[k][0]
    _link_next(out)
    return out


def requests_qemu(trace, windows: list[dict]) -> list[dict]:
    """One dict per virtio_mem_plug_request / unplug_request inside a grow
    window.  QEMU's device does the whole request in the thread of the
    notify (no ioeventfd under TCG): response, virtio_notify and the MSI
    are looked up in the request's thread."""
    requests = ("virtio_mem_plug_request", "virtio_mem_unplug_request")
    steps = [("virtio_mem_send_response", "resp"), ("virtio_notify", "notify"), ("apic_deliver_irq", "apic")]
    notify_t = [t for t, _, ev, _ in trace if ev == "virtio_queue_notify"]
    per_tid: dict[int, list[tuple[float, str]]] = {}
    found: list[tuple[float, int, str, int]] = []  # (t, tid, event, index in per_tid[tid])
    for t, tid, ev, _ in trace:
        thread = per_tid.setdefault(tid, [])
        if ev in requests:
            found.append((t, tid, ev, len(thread)))
        thread.append((t, ev))
    out: list[dict] = []
    for t, tid, ev, k in found:
        grow = _in_window(t, windows)
        if grow is None:
            continue
        r = {"grow": grow["name"], "type": 0 if ev == "virtio_mem_plug_request" else 1, "plug": t}
        j = _last_at_or_before(notify_t, t, out[-1]["plug"] if out else None)
        r["send"] = notify_t[j] if j is not None else None
        want = list(steps)
        for _, key in steps:
            r[key] = None
        for t2, ev2 in per_tid[tid][k + 1:]:
            if not want or ev2 in requests:
                break
            if ev2 == want[0][0]:
                r[want.pop(0)[1]] = t2
        out.append(r)
    _link_next(out)
    return out


# -- the table -----------------------------------------------------------------------

#: (segment, from, to); "=" rows are sums over several segments.
SEGMENTS = {
    "ours": [
        ("vCPU notify write (`vfio_user_region_rw`) -> request served in C inside it", "send", "ntf"),
        ("served in C -> QEMU has the reply (vCPU blocked until then)", "ntf", "reply"),
        ("= notify write -> QEMU has the reply", "send", "reply"),
        ("interrupt raised in C -> QEMU `vfio_msi_interrupt` (main loop)", "trig", "msi"),
        ("`vfio_msi_interrupt` -> `apic_deliver_irq`", "msi", "apic"),
        ("= notify write -> MSI delivered (device latency)", "send", "apic"),
        ("MSI delivered -> next notify write (guest)", "apic", "next"),
        ("= per request (notify -> next notify)", "send", "next"),
    ],
    "qemu": [
        ("`virtio_queue_notify` -> `virtio_mem_plug_request`", "send", "plug"),
        ("`plug_request` -> `virtio_mem_send_response`", "plug", "resp"),
        ("`send_response` -> `virtio_notify`", "resp", "notify"),
        ("`virtio_notify` -> `apic_deliver_irq`", "notify", "apic"),
        ("= notify -> MSI delivered (device latency)", "send", "apic"),
        ("MSI delivered -> next notify (guest)", "apic", "next"),
        ("= per request (notify -> next notify)", "send", "next"),
    ],
}
#: The per-request totals, comparable between the devices.
TOTALS = [("device latency: notify -> MSI delivered", "send", "apic"),
          ("guest: MSI delivered -> next notify", "apic", "next"),
          ("per request: notify -> next notify", "send", "next")]
LABELS = {"qemu": "QEMU virtio-mem-pci", "ours": "vfiouser-vmem"}


def plugs(reqs: list[dict], size: str | None = None) -> list[dict]:
    return [r for r in reqs if r.get("type") == VIRTIO_MEM_REQ_PLUG
            and (size is None or r["grow"].startswith(f"{size}#"))]


def segment_us(reqs: list[dict], a: str, b: str) -> list[float]:
    return [(r[b] - r[a]) * 1e6 for r in reqs if r.get(a) is not None and r.get(b) is not None]


def stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"n": len(xs), "median": report.percentile(xs, 50), "p90": report.percentile(xs, 90),
            "mean": statistics.fmean(xs)}


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def segment_table(reqs: list[dict], kind: str) -> str:
    rows = []
    for name, a, b in SEGMENTS[kind]:
        s = stats(segment_us(plugs(reqs), a, b))
        if s is None:
            rows.append([name, "0", "-", "-", "-"])
        else:
            rows.append([f"**{name}**" if name.startswith("=") else name, str(s["n"]), _us(s["median"]),
                         _us(s["p90"]), _us(s["mean"])])
    return report.markdown_table(["segment", "n", "median us", "p90 us", "mean us"], rows)


def totals_table(data: dict[str, list[dict]], sizes: list[str]) -> str:
    rows = []
    for size in [None, *sizes] if len(sizes) > 1 else [None]:
        for name, a, b in TOTALS:
            o = stats(segment_us(plugs(data.get("ours", []), size), a, b))
            q = stats(segment_us(plugs(data.get("qemu", []), size), a, b))
            cell = lambda s: "-" if s is None else f"{_us(s['median'])} / {_us(s['p90'])} / {_us(s['mean'])} ({s['n']})"  # noqa: E731
            diff = "-" if o is None or q is None else (f"{o['median'] - q['median']:+.0f} / "
                                                       f"{o['mean'] - q['mean']:+.0f}")
            rows.append([f"{name}{'' if size is None else f' (grow 0 -> {size})'}", cell(o), cell(q), diff])
    return report.markdown_table(["per PLUG request, us", "ours: median / p90 / mean (n)",
                                  "QEMU's: median / p90 / mean (n)", "ours - QEMU's: median / mean"], rows)


def grows_table(meta: dict) -> str:
    rows = []
    for size in meta["sizes"]:
        cells = []
        for kind in ("ours", "qemu"):
            g = [w for w in meta["devices"].get(kind, {}).get("grows", []) if w["size"] == size]
            s = report.Summary.of([w["memtotal_s"] for w in g])
            cells.append(report.fmt_summary(s, "s"))
        rows.append([f"grow 0 -> {size}: guest MemTotal", *cells])
    return report.markdown_table(["traced grows, median (min - max)", "vfiouser-vmem", "QEMU virtio-mem-pci"], rows)


def no_msi_note(data: dict[str, list[dict]]) -> str:
    """Requests without an MSI before the guest's next notify: the guest
    found the answer in the used ring without waiting, and the interrupt
    came later (for ours: QEMU's main loop read the eventfd of two
    triggers at once)."""
    notes = []
    for kind, reqs in data.items():
        ps = plugs(reqs)
        missing = [r for r in ps if r.get("apic") is None]
        if missing:
            notes.append(f"{LABELS[kind]}: {len(missing)} of {len(ps)} PLUG requests had no MSI delivered before "
                         "the guest's next notify (not in the device-latency and guest rows)")
    return "; ".join(notes)


def outside_notify_note(events: list[list]) -> str:
    """Requests bench/served.py saw served outside a notify write (after
    the vfio-user message, in C or in Python): the server tells of those
    only after their interrupt, so they are not cut into segments."""
    plugs_ = [e for e in events if e[0] == "srv" and int(e[2]) == VIRTIO_MEM_REQ_PLUG]
    if not plugs_:
        return ""
    in_python = sum(1 for e in plugs_ if e[4] == "python")
    return (f"vfiouser-vmem: {len(plugs_)} PLUG request(s) were served after the vfio-user message rather than "
            f"inside the notify write ({in_python} of them in Python); they are not in the segments above")


def render(meta: dict, data: dict[str, list[dict]]) -> str:
    env = meta.get("env", {})
    parts = [f"virtio-mem PLUG request latency, vfiouser-vmem vs QEMU's virtio-mem-pci, {env.get('date', '?')}; "
             f"{env.get('host', '?')}; {env.get('qemu', '?')}, {env.get('accel', '?')}, 2 vCPUs; "
             f"{meta['device_size']} maximum, {meta['block_size']} blocks; {meta['reps']} repetition(s) of "
             f"grow 0 -> {', '.join(meta['sizes'])}, traced; every PLUG request of the grows, pooled",
             "Per request, both devices\n\n" + totals_table(data, meta["sizes"])]
    for kind in ("ours", "qemu"):
        d = meta["devices"].get(kind, {})
        if d.get("error"):
            parts.append(f"**{kind}: failed:** {d['error']}")
        if data.get(kind):
            parts.append(f"{LABELS[kind]}, segment by segment\n\n" + segment_table(data[kind], kind))
    for note in (no_msi_note(data), meta.get("outside_notify", "")):
        if note:
            parts.insert(2, note)
    parts.append(grows_table(meta))
    return "\n\n".join(parts) + "\n"


# -- running the guests -----------------------------------------------------------------

def trace_args(kind: str, tdir: Path) -> list[str]:
    return _trace_args(TRACE_EVENTS[kind], tdir, per_thread=True)


def measure(kind: str, kit: Kit, args: argparse.Namespace, outdir: Path) -> dict:
    """Boot, grow and shrink ``args.reps`` times per size, stop; the grow
    windows (wall clock) and the files are in ``outdir/kind``."""
    kdir = outdir / kind
    qemu_args = trace_args(kind, kdir)
    workdir = short_tmpdir()
    result: dict = {"grows": []}
    dev = None
    try:
        t_spawn = time.monotonic()
        if kind == "qemu":
            dev = QemuVmem(kit, workdir, size=args.device_size, block_size=args.block_size, extra_args=qemu_args)
        else:
            dev = OursVmem(kit, workdir, size=args.device_size, block_size=args.block_size,
                           stats_path=kdir / "service_times.json", qemu_args=qemu_args,
                           served_args=["--events", str(kdir / "server-events.json")])
        result["boot"] = boot(dev, t_spawn)
        base = result["boot"]["base_kib"]
        say(f"{kind}: guest ready after {result['boot']['ready_s']:.1f} s")
        time.sleep(1.0)
        for rep in range(args.reps):
            for size in args.sizes:
                name = format_size(size)
                wall0 = time.time()
                g = track_resize(dev, size, base)
                wall1 = time.time()
                result["grows"].append({"name": f"{name}#{rep + 1}", "size": name, "rep": rep + 1, "wall0": wall0,
                                        "wall1": wall1, "memtotal_s": g["memtotal_s"], "size_s": g["size_s"]})
                time.sleep(SETTLE_S)
                s = track_resize(dev, 0, base)
                say(f"{kind} rep {rep + 1}: grow 0 -> {name}: MemTotal {g['memtotal_s'] * 1000:.0f} ms; "
                    f"shrink: {s['memtotal_s']:.2f} s")
                time.sleep(SETTLE_S)
    except Exception as exc:
        result["error"] = f"{exc!r}"
        say(f"{kind}: FAILED: {exc}\n{traceback.format_exc()}")
        if dev is not None and dev.guest is not None:
            say(f"----- {kind} QEMU output (tail) -----\n{dev.guest.qemu_log()[-2000:]}")
    finally:
        if dev is not None:
            dev.stop()
        if isinstance(dev, OursVmem):
            shutil.copyfile(dev.log_path, kdir / "server.log")
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def analyze(outdir: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Per-request records from a results folder (meta.json, the traces,
    server-events.json)."""
    meta = json.loads((outdir / "meta.json").read_text())
    data: dict[str, list[dict]] = {}
    for kind, d in meta["devices"].items():
        kdir = outdir / kind
        trace = load_trace(sorted(kdir.glob("trace-*.log")))
        if kind == "ours":
            ev_path = kdir / "server-events.json"
            events = json.loads(ev_path.read_text())["events"] if ev_path.exists() else []
            data[kind] = requests_ours(trace, events, d["grows"])
            meta["outside_notify"] = outside_notify_note(events)
        else:
            data[kind] = requests_qemu(trace, d["grows"])
    return meta, data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="grows per size and device (default 3)")
    p.add_argument("--sizes", default="1G,4G", help="grow targets (default 1G,4G)")
    p.add_argument("--device-size", default="8G", help="both devices' maximum (default 8G)")
    p.add_argument("--block-size", default="2M", help="both devices' block size (default 2M)")
    p.add_argument("--only", choices=["both", "qemu", "ours"], default="both")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>-latency)")
    p.add_argument("--analyze", metavar="DIR", help="only analyse an earlier run's folder again (no guest)")
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.analyze:
        outdir = Path(args.analyze)
    else:
        outdir = Path(args.out) if args.out else REPO / "bench" / "results" / (
            datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-latency")
        outdir.mkdir(parents=True, exist_ok=True)
        kit = Kit.build()
        meta = {"env": environment(kit), "reps": args.reps, "sizes": [format_size(s) for s in args.sizes],
                "device_size": args.device_size, "block_size": args.block_size, "devices": {}}
        for kind in (["qemu", "ours"] if args.only == "both" else [args.only]):
            meta["devices"][kind] = measure(kind, kit, args, outdir)
        meta["elapsed_s"] = time.monotonic() - started
        (outdir / "meta.json").write_text(json.dumps(meta, indent=1))
    meta, data = analyze(outdir)
    (outdir / "requests.json").write_text(json.dumps(data))
    text = render(meta, data)
    (outdir / "table.md").write_text(text)
    print(text)
    print(f"results: {outdir}; took {time.monotonic() - started:.0f} s", flush=True)
    return 1 if any(d.get("error") for d in meta["devices"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
