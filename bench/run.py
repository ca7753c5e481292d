"""vfiouser-vmem against QEMU's own virtio-mem-pci, side by side, in one run.

    .venv/bin/python bench/run.py [--reps 5] [--sizes 1G,4G] [--profile cprofile|py-spy]
    .venv/bin/python bench/run.py --only backends [--backends hugetlb,prealloc,hugetlb-prealloc] [--reps 3]
    .venv/bin/python bench/run.py --only many    # bench/many_guests.py's defaults, no guest

Boots the integration kit's guest (QEMU 11, Linux 6.12, busybox /init) twice:
once with QEMU's in-process ``virtio-mem-pci`` (memfd backend, block size
2M, 8G maximum) and once with ``vfiouser-vmem serve`` (same sizes) through
``vfio-user-pci``, and measures both the same way (bench/README.md).  Writes
results.json, table.md, timelines.png and service_times.png to
bench/results/<timestamp>/ and prints the table.  Timings are reported, never
asserted.

Then the "Memory backends" rows (``BACKENDS``): the same series on a
smaller device (``--backend-device-size``, 2G) whose memory backend and
device options, in QEMU's syntax, both devices get: a hugetlb memfd of
2 MiB pages, ``prealloc=on`` on the device, both.  The hugetlb rows raise
/proc/sys/vm/nr_hugepages for their duration (integration/hugepages.py: under an
exclusive flock of /run/vfiouser-vmem-hugepages.lock, the old value put
back in a finally) and also report the pool's free_hugepages.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))

import hugepages  # noqa: E402  (integration/hugepages.py)
from harness import (  # noqa: E402
    MIB,
    Guest,
    GuestError,
    Kit,
    ServerProcess,
    VmemServer,
    kvm_works,
    short_tmpdir,
    stop_process,
    wait_for,
)

from bench import micro, policy_cost, qemutrace, report  # noqa: E402
from bench.procinfo import add_rss, cpu_seconds, proc_rss  # noqa: E402
from bench.qemu_vmem import QemuVmem  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402

BOOT_TIMEOUT_S = 240
RESIZE_TIMEOUT_S = 180
QMP_POLL_S = 0.01
SETTLE_S = 0.3
#: "Back at ~0": the backend holds at most this much above its level before plug.
ALLOC_SLACK_BYTES = 2 * MIB


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the two devices, one surface ------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """The memory backend and device options of one group of "Memory
    backends" rows, in QEMU's syntax, given alike to both devices: QEMU's
    ``-object memory-backend-memfd,id=..,size=..,share=on,OBJECT_OPTS
    -device virtio-mem-pci,id=..,memdev=..,block-size=..,requested-size=0,DEVICE_OPTS``
    and our ``serve --object memory-backend-memfd,id=..,size=..,OBJECT_OPTS
    --device id=..,memdev=..,socket=..,block-size=..,requested-size=0,DEVICE_OPTS``
    (ours is always shared)."""

    name: str
    object_opts: str = ""
    device_opts: str = ""

    @property
    def hugetlb(self) -> bool:
        return "hugetlb=on" in self.object_opts.split(",")

    def label(self, device_size: str) -> str:
        obj = ",".join(x for x in (f"memory-backend-memfd,size={device_size}", self.object_opts) if x)
        return f"`{obj}`, device " + (f"`{self.device_opts}`" if self.device_opts else "defaults")


#: The "Memory backends" rows (``--backends``), in the order they are reported (the
#: hugetlb ones run last, together, while the huge page pool is raised for them).
BACKENDS = {b.name: b for b in (
    Backend("hugetlb", object_opts="hugetlb=on,hugetlbsize=2M"),
    Backend("prealloc", device_opts="prealloc=on"),
    Backend("hugetlb-prealloc", object_opts="hugetlb=on,hugetlbsize=2M", device_opts="prealloc=on"),
)}


def _opts(*parts: str) -> str:
    return ",".join(p for p in parts if p)


class ServedVmem(VmemServer):
    """``harness.VmemServer`` (its argument list, QMP client, ``get``,
    ``set_requested_size``, ``allocated_bytes``, log and ``stop``) with the
    server run by bench/served.py, which records the server's per-request
    figures, instead of the ``vfiouser-vmem`` command.

    With a ``backend``, the device is given in QEMU's syntax instead of the
    single-device flags (``--object memory-backend-memfd,... --device
    id=vmem0,memdev=...``, read by the command line's parser in served.py);
    the rest of VmemServer's surface is the same (the memfd is still named
    after the device)."""

    def __init__(self, workdir: Path, *, served_args: list[str], backend: Backend | None = None, **kwargs) -> None:
        self.served_args = served_args
        if backend is None:
            super().__init__(workdir, **kwargs)
            return
        self.id = kwargs.get("id", "vmem0")
        self.socket = str(workdir / f"{self.id}.sock")
        memdev = f"mem-{self.id}"
        argv = ["--object", _opts(f"memory-backend-memfd,id={memdev},size={kwargs['size']}", backend.object_opts),
                "--device", _opts(f"id={self.id},memdev={memdev},socket={self.socket},"
                                  f"block-size={kwargs.get('block_size', '2M')},requested-size=0",
                                  backend.device_opts)]
        ServerProcess.__init__(self, workdir, self.id, argv)

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "bench" / "served.py"), *self.served_args, "serve"]



class OursVmem:
    """Our device as the bench drives it: bench/served.py (``ServedVmem``)
    and a ``harness.Guest`` attached to it, with the surface of
    ``QemuVmem`` (get, set_requested_size, allocated_bytes, rss, cpu, stop)."""

    def __init__(self, kit: Kit, workdir: Path, *, size: str, block_size: str, stats_path: Path,
                 cprofile_path: Path | None = None, name: str = "ours",
                 served_args: list[str] | None = None, qemu_args: list[str] | None = None,
                 backend: Backend | None = None) -> None:
        """``served_args`` go to bench/served.py (e.g. ``--events PATH``),
        ``qemu_args`` to QEMU (``harness.Guest``'s ``extra_args``);
        ``backend``: the memory backend and device options (``ServedVmem``)."""
        self.id = "vmem0"
        self.stats_path = stats_path
        served = ["--stats", str(stats_path), *(["--cprofile", str(cprofile_path)] if cprofile_path else []),
                  *(served_args or [])]
        started = time.monotonic()
        self.server = ServedVmem(workdir, size=size, block_size=block_size, id=self.id, served_args=served,
                                 backend=backend)
        self.server_ready_s = time.monotonic() - started
        self.qmp = self.server.qmp
        self.log_path = self.server.log_path
        self.guest: Guest | None = None
        try:
            self.guest = Guest(kit, workdir, [self.server.socket], name=name, extra_args=qemu_args)
        except BaseException:
            self.stop()  # nothing this started may outlive it
            raise

    @property
    def pid(self) -> int:
        return self.guest.proc.pid

    def connect_qmp(self) -> None:
        pass  # connected before QEMU started

    def get(self, prop: str) -> int:
        return self.server.get(prop)

    def set_requested_size(self, size_bytes: int) -> None:
        self.server.set_requested_size(size_bytes)

    def allocated_bytes(self) -> int:
        return self.server.allocated_bytes()

    def rss(self) -> dict[str, int]:
        return add_rss(proc_rss(self.pid), proc_rss(self.server.proc.pid))

    def cpu(self) -> dict[str, float]:
        return {"qemu": cpu_seconds(self.pid), "server": cpu_seconds(self.server.proc.pid)}

    def server_log(self) -> str:
        return self.server.log()

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.stop()
        self.server.stop()


# -- measuring a guest ---------------------------------------------------------

class GuestMemWatch:
    """The guest's MemTotal as a stream: one shell loop in the guest that
    prints it every ~20 ms with builtins only (read -t on the command
    channel is the sleep, and any line from us ends it), so that watching
    costs the guest no fork (a fork per poll would load the vCPUs that do
    the guest's side of the resize, and allocate in the memory in question)."""

    LOOP = b'while ! read -t 0.02 x; do read a b c < /proc/meminfo; echo "@@M $b"; done\n'
    LINE = re.compile(rb"@@M (\d+)\r?\n")
    END = re.compile(rb"@@RC (\d+)\r?\n")

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.buf = guest._buf
        guest._buf = b""
        guest.conn.sendall(self.LOOP)

    def next(self, timeout_s: float) -> int | None:
        """The next MemTotal in kB, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.LINE.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return int(m.group(1))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self.guest.proc.poll() is not None:
                raise GuestError(f"QEMU exited with {self.guest.proc.returncode}")
            self.guest.conn.settimeout(min(remaining, 1.0))
            try:
                data = self.guest.conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise GuestError("the guest's command channel closed")
            self.buf += data

    def stop(self) -> None:
        """End the loop; the channel is back to one command at a time."""
        self.guest.conn.sendall(b"\n")
        self.guest._buf = self.LINE.sub(b"", self.buf)
        m = self.guest._read_until(self.END, 30)
        self.guest._buf = self.guest._buf[m.end():]


def memtotal_kib(guest: Guest) -> int:
    # MemTotal is /proc/meminfo's first line; `read` is a shell builtin, so a
    # poll costs the guest one fork of sh and nothing else.
    return int(guest.run("read a b c < /proc/meminfo; echo $b").split()[-1])


def track_resize(dev, target_bytes: int, base_kib: int, *, alloc_floor: int | None = None,
                 timeout_s: float = RESIZE_TIMEOUT_S) -> dict:
    """Ask for ``target_bytes`` and follow the guest's MemTotal (a stream on
    the command channel, this thread), the device's size (QMP, every 10 ms,
    another thread) and the backend's allocated bytes (with ``alloc_floor``:
    until they are back at ``alloc_floor`` + slack).  Times are from just
    before the qom-set."""
    guest = dev.guest
    target_kib = base_kib + target_bytes // 1024
    samples: dict[str, list[tuple[float, int]]] = {"size": [], "memtotal_kib": [], "allocated": []}
    result: dict = {"target": target_bytes, "size_s": None, "memtotal_s": None, "alloc_s": None}
    errors: list[str] = []
    stop = threading.Event()
    t0 = 0.0

    def host_side() -> None:
        try:
            while not stop.is_set():
                t = time.monotonic() - t0
                if result["size_s"] is None:
                    size = dev.get("size")
                    t = time.monotonic() - t0
                    samples["size"].append((t, size))
                    if size == target_bytes:
                        result["size_s"] = t
                if alloc_floor is None or result["alloc_s"] is None:
                    # Followed in every resize: a shrink of "untouched"
                    # memory shows what the guest itself touched meanwhile.
                    alloc = dev.allocated_bytes()
                    samples["allocated"].append((t, alloc))
                    if alloc_floor is not None and alloc <= alloc_floor + ALLOC_SLACK_BYTES:
                        result["alloc_s"] = t
                if result["size_s"] is not None and (alloc_floor is None or result["alloc_s"] is not None):
                    return
                if t > timeout_s:
                    return
                time.sleep(QMP_POLL_S)
        except Exception as exc:  # reported below
            errors.append(f"host side: {exc!r}")

    dev.qmp.events.clear()
    # The guest's MemTotal stream runs before the request, so that the
    # first sample after it is at most one interval late.
    watch = GuestMemWatch(guest)
    try:
        if watch.next(30) is None:
            raise GuestError("the guest's MemTotal stream did not start")
        cpu_before = dev.cpu()
        t0 = time.monotonic()
        result["wall0"] = time.time()  # the same instant on the clock of QEMU's trace
        dev.set_requested_size(target_bytes)
        result["qom_set_s"] = time.monotonic() - t0
        thread = threading.Thread(target=host_side, daemon=True)
        thread.start()
        try:
            while result["memtotal_s"] is None:
                kib = watch.next(timeout_s - (time.monotonic() - t0))
                if kib is None:
                    break
                t = time.monotonic() - t0
                samples["memtotal_kib"].append((t, kib))
                if kib == target_kib:
                    result["memtotal_s"] = t
            thread.join(max(1.0, timeout_s - (time.monotonic() - t0)) + 5)
        finally:
            stop.set()
            thread.join(5)
    finally:
        watch.stop()
    cpu_after = dev.cpu()
    result["cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    mem_ts = [t for t, _ in samples["memtotal_kib"]]
    gaps = [b - a for a, b in zip(mem_ts, mem_ts[1:])]
    result["guest_poll_rtt_s"] = report.percentile(gaps, 50) if gaps else None
    result["samples"] = samples
    result["window"] = [t0, time.monotonic()]
    if errors or result["size_s"] is None or result["memtotal_s"] is None or (
            alloc_floor is not None and result["alloc_s"] is None):
        last_size = samples["size"][-1][1] if samples["size"] else None
        last_kib = samples["memtotal_kib"][-1][1] if samples["memtotal_kib"] else None
        raise TimeoutError(f"resize to {format_size(target_bytes)} did not complete within {timeout_s:.0f} s "
                           f"({'; '.join(errors)}): device size {last_size}, MemTotal {last_kib} kB "
                           f"(target {target_kib} kB)")
    return result


def boot(dev, t_spawn: float) -> dict:
    guest = dev.guest
    guest.wait_ready(BOOT_TIMEOUT_S)
    ready_s = time.monotonic() - t_spawn
    dev.connect_qmp()
    guest.run("mount -o remount,size=8G /tmp")
    wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
             60, "virtio_mem to bind", 0.02)
    bound_s = time.monotonic() - t_spawn
    return {"ready_s": ready_s, "bound_s": bound_s, "base_kib": memtotal_kib(guest),
            "kernel": guest.run("uname -r").strip()}


def run_series(dev, sizes: list[int], reps: int, touch_fraction: float, log_prefix: str,
               rep_offset: int = 0, huge_pages: bool = False) -> dict:
    """The scenarios, ``reps`` times: per size, grow and shrink untouched,
    then grow, write ``touch_fraction`` of it in the guest, shrink.  With
    ``huge_pages``, the 2 MiB pool's counts too (``hugepages_*``: before the
    plug, after the grow, after the writes, when the backend is back after
    the unplug) and the share of the pages taken by the writes that the
    pool got back."""
    guest = dev.guest
    base_kib = memtotal_kib(guest)
    out: dict = {"base_kib": base_kib, "reps": []}
    for rep in range(rep_offset, rep_offset + reps):
        rep_out: dict = {}
        out["reps"].append(rep_out)
        for size in sizes:
            name = format_size(size)
            r: dict = {}
            rep_out[name] = r
            alloc_floor = dev.allocated_bytes()
            r["alloc_before"] = alloc_floor
            if huge_pages:
                r["hugepages_before"] = hugepages.counts()
            r["rss_before"] = dev.rss()
            r["grow"] = track_resize(dev, size, base_kib)
            r["alloc_grown"] = dev.allocated_bytes()
            if huge_pages:
                r["hugepages_grown"] = hugepages.counts()
            say(f"{log_prefix} rep {rep + 1}: grow 0 -> {name}: size {r['grow']['size_s']:.2f} s, "
                f"MemTotal {r['grow']['memtotal_s']:.2f} s")
            time.sleep(SETTLE_S)
            r["shrink_untouched"] = track_resize(dev, 0, base_kib)
            r["alloc_after_untouched"] = dev.allocated_bytes()
            say(f"{log_prefix} rep {rep + 1}: shrink {name} -> 0 untouched: "
                f"size {r['shrink_untouched']['size_s']:.2f} s, MemTotal {r['shrink_untouched']['memtotal_s']:.2f} s")
            time.sleep(SETTLE_S)
            r["grow_again"] = track_resize(dev, size, base_kib)
            time.sleep(SETTLE_S)
            count = int(size // MIB * touch_fraction)
            started = time.monotonic()
            guest.run(f"dd if=/dev/zero of=/tmp/fill bs=1M count={count} 2>/dev/null", timeout_s=900)
            r["touch_s"] = time.monotonic() - started
            r["touch_bytes"] = count * MIB
            r["alloc_touched"] = dev.allocated_bytes()
            if huge_pages:
                r["hugepages_touched"] = hugepages.counts()
            r["rss_touched"] = dev.rss()
            guest.run("rm /tmp/fill")
            time.sleep(SETTLE_S)
            r["shrink_touched"] = track_resize(dev, 0, base_kib, alloc_floor=alloc_floor)
            r["alloc_after"] = dev.allocated_bytes()
            if huge_pages:
                r["hugepages_after"] = hugepages.counts()
                taken = r["hugepages_before"]["free"] - r["hugepages_touched"]["free"]
                r["hugepages_returned_fraction"] = ((r["hugepages_after"]["free"] - r["hugepages_touched"]["free"])
                                                    / taken if taken > 0 else None)
            r["rss_after"] = dev.rss()
            plugged_touched = r["alloc_touched"] - alloc_floor
            r["returned_fraction"] = ((r["alloc_touched"] - r["alloc_after"]) / plugged_touched
                                      if plugged_touched > 0 else None)
            say(f"{log_prefix} rep {rep + 1}: wrote {count} MiB in {r['touch_s']:.1f} s (backend "
                f"{r['alloc_touched'] >> 20} MiB); shrink -> 0: size {r['shrink_touched']['size_s']:.2f} s, "
                f"MemTotal {r['shrink_touched']['memtotal_s']:.2f} s, backend back to "
                f"{r['alloc_after'] >> 20} MiB after {r['shrink_touched']['alloc_s']:.2f} s"
                + (f"; huge pages free {r['hugepages_before']['free']} before, {r['hugepages_touched']['free']} "
                   f"after the writes, {r['hugepages_after']['free']} after" if huge_pages else ""))
            time.sleep(SETTLE_S)
    return out


class PySpy:
    """py-spy record --pid, stopped with SIGINT (it then writes its output)."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.out = out
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                      "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, timeout_s=60)


#: QEMU's own device tells when it answered a PLUG only through these trace
#: events (two lines per request: nothing that slows the guest).
QEMU_PLUG_EVENTS = ["virtio_mem_plug_request", "virtio_mem_send_response"]


def _start_device(kind: str, kit: Kit, args: argparse.Namespace, outdir: Path, workdir: Path,
                  backend: Backend | None = None):
    """One device and its guest; with a ``backend``, of --backend-device-size
    with the backend's options (both kinds alike)."""
    size = args.device_size if backend is None else args.backend_device_size
    if kind == "qemu":
        return QemuVmem(kit, workdir, size=size, block_size=args.block_size,
                        extra_args=qemutrace.trace_args(QEMU_PLUG_EVENTS, outdir / "qemu-trace"),
                        backend_opts=backend.object_opts if backend else "",
                        device_opts=backend.device_opts if backend else "")
    return OursVmem(kit, workdir, size=size, block_size=args.block_size,
                    stats_path=outdir / "service_times.json",
                    cprofile_path=outdir / "server.prof" if args.profile == "cprofile" and backend is None else None,
                    backend=backend)


def _report_failure(kind: str, dev, exc: BaseException, result: dict) -> None:
    result["error"] = f"{exc!r}"
    say(f"{kind}: FAILED: {exc}\n{traceback.format_exc()}")
    if dev is not None and dev.guest is not None:
        say(f"----- {kind} guest console (tail) -----\n{dev.guest.console()[-4000:]}")
        say(f"----- {kind} QEMU output (tail) -----\n{dev.guest.qemu_log()[-2000:]}")
    if isinstance(dev, OursVmem):
        say(f"----- server log (tail) -----\n{dev.server_log()[-4000:]}")


def measure_devices(kinds: list[str], kit: Kit, args: argparse.Namespace, outdir: Path,
                    backend: Backend | None = None) -> dict[str, dict]:
    """Boot one guest per device and keep both up; then, repetition by
    repetition, run the series on one device and then on the other (the
    order alternates).  Interleaved, a slow drift of this shared machine's
    load (seen as +-30% between runs minutes apart) lands on both devices
    alike instead of on whichever ran second.  The idle guest meanwhile
    costs little: its vCPUs halt.  With a ``backend`` (the "Memory
    backends" rows): its devices, ``--backend-sizes``, no extra boots."""
    sizes = args.sizes if backend is None else args.backend_sizes
    prefix = "" if backend is None else f"{backend.name}: "
    workdirs = {kind: short_tmpdir() for kind in kinds}
    devs: dict[str, object] = {}
    results: dict[str, dict] = {kind: {"kind": kind} for kind in kinds}
    spy = None
    try:
        for kind in kinds:
            result = results[kind]
            dev = None
            try:
                t_spawn = time.monotonic()
                dev = _start_device(kind, kit, args, outdir, workdirs[kind], backend)
                devs[kind] = dev
                if isinstance(dev, OursVmem):
                    result["server_ready_s"] = dev.server_ready_s
                result["boot"] = boot(dev, t_spawn)
                say(f"{prefix}{kind}: guest ready after {result['boot']['ready_s']:.2f} s, virtio_mem bound after "
                    f"{result['boot']['bound_s']:.2f} s, MemTotal {result['boot']['base_kib'] >> 10} MiB")
                result["series"] = {"reps": []}
            except Exception as exc:
                _report_failure(kind, dev, exc, result)
        if "ours" in devs and "error" not in results["ours"] and args.profile == "py-spy" and backend is None:
            spy = PySpy(devs["ours"].server.proc.pid, outdir / "server-py-spy.txt")
        for rep in range(args.reps):
            order = kinds if rep % 2 == 0 else list(reversed(kinds))
            for kind in order:
                result = results[kind]
                if "error" in result:
                    continue
                try:
                    one = run_series(devs[kind], sizes, 1, args.touch_fraction, f"{prefix}{kind}", rep_offset=rep,
                                     huge_pages=backend is not None and backend.hugetlb)
                    result["series"]["base_kib"] = one["base_kib"]
                    result["series"]["reps"] += one["reps"]
                except Exception as exc:
                    _report_failure(kind, devs.get(kind), exc, result)
    finally:
        if spy is not None:
            spy.stop()
        for dev in devs.values():
            dev.stop()
            if isinstance(dev, OursVmem):
                (outdir / "server.log").write_text(dev.server_log())
        for workdir in workdirs.values():
            shutil.rmtree(workdir, ignore_errors=True)
    if backend is None:
        extra_boots(kinds, kit, args, outdir, results)
    return results


def measure_backends(kinds: list[str], kit: Kit, args: argparse.Namespace, outdir: Path) -> dict[str, dict]:
    """The "Memory backends" rows: for each of ``--backends``, both devices
    with that backend (``measure_devices``), in ``outdir/backend-NAME/``.
    The hugetlb ones run last, together, while integration/hugepages.py holds the
    2 MiB pool at what their devices reserve (all kinds are up at once:
    each reserves its whole backend when it starts); a pool that cannot be
    had is those rows' error."""
    chosen = [BACKENDS[name] for name in args.backends]
    out: dict[str, dict] = {b.name: {"label": b.label(args.backend_device_size), "hugetlb": b.hugetlb}
                            for b in chosen}

    def one(b: Backend) -> None:
        sub = outdir / f"backend-{b.name}"
        sub.mkdir(parents=True, exist_ok=True)
        say(f"{b.name}: {out[b.name]['label']}")
        devices = measure_devices(kinds, kit, args, sub, backend=b)
        stats_path = sub / "service_times.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
        add_answer_clocks(devices, sub, stats)
        out[b.name]["devices"] = devices
        if stats is not None:
            out[b.name]["service_times"] = [r for recs in stats["devices"].values() for r in recs]

    for b in chosen:
        if not b.hugetlb:
            one(b)
    huge = [b for b in chosen if b.hugetlb]
    if huge:
        pages = len(kinds) * (parse_size(args.backend_device_size) // hugepages.PAGE_BYTES)
        try:
            with hugepages.pool_of(pages, say=say) as pool:
                for b in huge:
                    out[b.name]["pool"] = pool
                    one(b)
        except hugepages.HugePagesUnavailable as exc:
            say(f"huge pages: {exc}")
            for b in huge:
                out[b.name].setdefault("error", f"huge pages: {exc}")
    return out


def extra_boots(kinds: list[str], kit: Kit, args: argparse.Namespace, outdir: Path, results: dict) -> None:
    """``--boots`` - 1 more boots of each device, alone on the machine, in
    alternating order (the series' boots ran QEMU's first): one boot is a
    single sample of a 4 s TCG boot on a shared machine, which scattered by
    +-20% between runs."""
    for i in range(max(0, args.boots - 1)):
        order = list(reversed(kinds)) if i % 2 == 0 else kinds
        for kind in order:
            result = results[kind]
            if "error" in result or "boot" not in result:
                continue
            workdir = short_tmpdir()
            dev = None
            try:
                t_spawn = time.monotonic()
                # Its trace and service-time files go to the scratch directory.
                dev = _start_device(kind, kit, args, workdir, workdir)
                ready_s = boot(dev, t_spawn)["ready_s"]
                result.setdefault("boots_s", [result["boot"]["ready_s"]]).append(ready_s)
                say(f"{kind}: boot {i + 2}: guest ready after {ready_s:.2f} s")
            except Exception as exc:
                say(f"{kind}: extra boot failed: {exc!r}")
            finally:
                if dev is not None:
                    dev.stop()
                shutil.rmtree(workdir, ignore_errors=True)


def boot_samples(result: dict) -> list[float]:
    """Every boot of a device: the series' and the extra ones."""
    if "boots_s" in result:
        return list(result["boots_s"])
    return [result["boot"]["ready_s"]] if "boot" in result else []


# -- the devices' own clock of a grow --------------------------------------------

def qemu_plug_answers(trace) -> list[float]:
    """Wall times at which QEMU's device answered a PLUG: the response that
    follows each ``virtio_mem_plug_request`` (other requests are not
    traced, so their responses follow no pending PLUG)."""
    out, pending = [], False
    for t, _, event, _ in trace:
        if event == "virtio_mem_plug_request":
            pending = True
        elif event == "virtio_mem_send_response" and pending:
            out.append(t)
            pending = False
    return out


def add_answer_clock(series: dict, answers: list[float], *, wall: bool) -> None:
    """Each grow's ``answered_s``: from the qom-set to the device's last
    PLUG answer inside the grow's window.  Both devices' answers are
    timestamped when the response is in the ring (ours: the server's own
    record, CLOCK_MONOTONIC like the bench; QEMU's: its trace, wall clock),
    which the 10 ms QMP poll of the size cannot resolve on a 50 ms grow."""
    answers = sorted(answers)
    for rep in series.get("reps", []):
        for r in rep.values():
            for key in ("grow", "grow_again"):
                g = r.get(key)
                if not g or "window" not in g:
                    continue
                t0, t1 = g["window"]
                if wall:
                    if "wall0" not in g:
                        continue
                    t0, t1 = g["wall0"], g["wall0"] + (t1 - t0)
                first, end = bisect.bisect_left(answers, t0), bisect.bisect_right(answers, t1)
                g["answered_s"] = answers[end - 1] - t0 if end > first else None


def add_answer_clocks(devices: dict, outdir: Path, stats: dict | None) -> None:
    qemu = (devices.get("qemu") or {}).get("series")
    trace_log = outdir / "qemu-trace" / "trace.log"
    if qemu and trace_log.exists():
        add_answer_clock(qemu, qemu_plug_answers(qemutrace.load_trace([trace_log])), wall=True)
    ours = (devices.get("ours") or {}).get("series")
    if ours and stats:
        plugs = [r[0] for recs in stats["devices"].values() for r in recs if int(r[1]) == 0]
        add_answer_clock(ours, plugs, wall=False)


# -- the report ----------------------------------------------------------------

def _vals(series: dict | None, size_name: str, *path: str) -> list[float]:
    if not series:
        return []
    out = []
    for rep in series.get("reps", []):
        v = rep.get(size_name)
        for key in path:
            if v is None:
                break
            v = v.get(key) if isinstance(v, dict) else None
        if v is not None:
            out.append(v)
    return out


def size_rows(qs: dict | None, os_: dict | None, n: str, touch_fraction: float, *,
              backend: bool = False) -> list[report.Row]:
    """The rows of one size, QEMU's series and ours; ``backend``: for the
    "Memory backends" tables (the backend's allocated bytes after the grow,
    the huge page pool's counts when there are any; no RSS rows)."""
    S = report.Summary.of
    both = lambda *path: (S(_vals(qs, n, *path)), S(_vals(os_, n, *path)))  # noqa: E731

    def grows(clock: str) -> tuple:
        # Both grows of a repetition are the same operation (0 -> n after
        # a shrink to 0): twice the samples for the noisiest clocks.
        return tuple(S(_vals(series, n, "grow", clock) + _vals(series, n, "grow_again", clock))
                     for series in (qs, os_))

    rows = [
        report.Row(f"grow 0 -> {n}: last PLUG answered (device's clock)", "s", *grows("answered_s")),
        report.Row(f"grow 0 -> {n}: device size (QMP)", "s", *grows("size_s")),
        report.Row(f"grow 0 -> {n}: guest MemTotal", "s", *grows("memtotal_s")),
        report.Row(f"shrink {n} -> 0 untouched: guest MemTotal", "s", *both("shrink_untouched", "memtotal_s")),
        report.Row(f"shrink {n} -> 0 untouched: device size (QMP)", "s", *both("shrink_untouched", "size_s")),
        report.Row(f"guest writes {touch_fraction:.0%} of {n} (dd to tmpfs)", "s", *both("touch_s")),
        report.Row(f"shrink {n} -> 0 after writes: guest MemTotal", "s", *both("shrink_touched", "memtotal_s")),
        report.Row(f"shrink {n} -> 0 after writes: device size (QMP)", "s", *both("shrink_touched", "size_s")),
        report.Row(f"shrink {n} -> 0 after writes: backend back at ~0", "s", *both("shrink_touched", "alloc_s")),
    ]
    if backend:
        rows.append(report.Row(f"{n}: backend allocated after grow", "bytes", *both("alloc_grown")))
    rows += [
        report.Row(f"{n}: backend allocated after writes", "bytes", *both("alloc_touched")),
        report.Row(f"{n}: backend allocated after unplug", "bytes", *both("alloc_after")),
        report.Row(f"{n}: unplugged memory the host got back", "fraction", *both("returned_fraction")),
    ]
    if backend and (_vals(qs, n, "hugepages_before") or _vals(os_, n, "hugepages_before")):
        for key, label in (("hugepages_before", "before plug"), ("hugepages_grown", "after grow"),
                           ("hugepages_touched", "after writes"), ("hugepages_after", "after unplug")):
            rows.append(report.Row(f"{n}: huge pages free (2 MiB, pool-wide) {label}", "count", *both(key, "free")))
        rows.append(report.Row(f"{n}: huge pages the writes took that the pool got back", "fraction",
                               *both("hugepages_returned_fraction")))
    for key, label in (("grow", f"grow 0 -> {n}"), ("shrink_untouched", f"shrink {n} -> 0 untouched"),
                       ("shrink_touched", f"shrink {n} -> 0 after writes")):
        # Both grows of a repetition, as for the grows' clocks above.
        keys = (key, "grow_again") if key == "grow" else (key,)
        cpu = lambda series, keys=keys: [sum(v.values()) for k in keys  # noqa: E731
                                         for v in _vals(series, n, k, "cpu_s")]
        rows.append(report.Row(f"{label}: host CPU time (QEMU + server)", "s", S(cpu(qs)), S(cpu(os_))))
    if not backend:
        for key, label in (("rss_before", "before plug"), ("rss_touched", "after writes"),
                           ("rss_after", "after unplug")):
            for field in ("VmRSS", "RssShmem"):
                rows.append(report.Row(f"{n}: QEMU (+ server) {field} {label}", "bytes", *both(key, field)))
    return rows


def comparison_rows(results: dict, sizes: list[int]) -> list[report.Row]:
    q = results["devices"].get("qemu", {})
    o = results["devices"].get("ours", {})
    qs, os_ = q.get("series"), o.get("series")
    S = report.Summary.of
    rows = [
        report.Row("boot: QEMU spawn -> guest /init ready", "s",
                   S(boot_samples(q)) if "boot" in q else None,
                   S(boot_samples(o)) if "boot" in o else None),
    ]
    for size in sizes:
        rows += size_rows(qs, os_, format_size(size), results["touch_fraction"])
    svc = results.get("service_times", {}).get("all_seconds", [])
    if svc:
        rows.append(report.Row("device service time per request, p50 (ours only)", "s", None,
                               S([report.percentile(svc, 50)])))
        rows.append(report.Row("device service time per request, p99 (ours only)", "s", None,
                               S([report.percentile(svc, 99)])))
    rows.append(report.Row("resolution: interval between two MemTotal samples", "s",
                           S(_poll_rtts(qs)), S(_poll_rtts(os_))))
    return rows


def backend_rows(b: dict, sizes: list[int], touch_fraction: float) -> list[report.Row]:
    """One "Memory backends" table: ``size_rows`` per size, then our
    device's service time per PLUG and UNPLUG (with prealloc=on a PLUG
    allocates its blocks before the answer, on the Python path)."""
    devices = b.get("devices", {})
    qs, os_ = (devices.get("qemu") or {}).get("series"), (devices.get("ours") or {}).get("series")
    rows = []
    for size in sizes:
        rows += size_rows(qs, os_, format_size(size), touch_fraction, backend=True)
    recs = b.get("service_times") or []
    for rtype, name in ((0, "PLUG"), (1, "UNPLUG")):
        vals = [r[3] for r in recs if int(r[1]) == rtype]
        if not vals:
            continue
        paths = sorted({r[4] for r in recs if int(r[1]) == rtype and len(r) > 4})
        for p, what in ((50, "p50"), (100, "max")):
            rows.append(report.Row(f"device service time per {name} ({'/'.join(paths) or '?'} path), {what} "
                                   "(ours only)", "s", None, report.Summary.of([report.percentile(vals, p)])))
    return [r for r in rows if r.qemu is not None or r.ours is not None]


def backend_section(results: dict) -> str:
    bk = results.get("backends")
    if not bk:
        return ""
    sizes = results["backend_sizes"]
    parts = [f"Memory backends: both devices with the same memory backend and device options (QEMU's "
             f"{results['backend_device_size']} backend also share=on, which ours always is); 2M blocks, "
             f"{results['reps']} repetition(s): median (min - max); ratio = ours / QEMU's medians"]
    for name, b in bk.items():
        title = f"**{name}**: {b['label']}"
        if "pool" in b:
            title += f" (nr_hugepages {b['pool']['old']} -> {b['pool']['nr']} for these rows)"
        parts.append(title)
        rows = backend_rows(b, sizes, results["touch_fraction"])
        if rows:
            parts.append(report.comparison_table(rows))
        if b.get("error"):
            parts.append(f"**{name}: not measured:** {b['error']}")
        for kind, d in b.get("devices", {}).items():
            if d.get("error"):
                parts.append(f"**{name}, {kind}: failed:** {d['error']}")
        paired = paired_section({"devices": b.get("devices", {})}, sizes)
        if paired:
            parts.append(paired)
    return "\n\n".join(parts)


def paired_grow_ratios(results: dict, size_name: str, clock: str) -> list[float]:
    """ours / QEMU's for each grow, paired by repetition: the two devices'
    grows of one repetition ran back to back (alternating which went
    first), so a pair shares the machine's load of that minute."""
    q = (results["devices"].get("qemu") or {}).get("series")
    o = (results["devices"].get("ours") or {}).get("series")
    if not q or not o:
        return []
    ratios = []
    for q_rep, o_rep in zip(q["reps"], o["reps"]):
        for key in ("grow", "grow_again"):
            a = ((o_rep.get(size_name) or {}).get(key) or {}).get(clock)
            b = ((q_rep.get(size_name) or {}).get(key) or {}).get(clock)
            if a and b:
                ratios.append(a / b)
    return ratios


def paired_section(results: dict, sizes: list[int]) -> str:
    rows = []
    for size in sizes:
        n = format_size(size)
        for clock, label in (("answered_s", "last PLUG answered (device's clock)"), ("size_s", "device size (QMP)"),
                             ("memtotal_s", "guest MemTotal")):
            ratios = paired_grow_ratios(results, n, clock)
            if ratios:
                rows.append([f"grow 0 -> {n}: {label}", str(len(ratios)), f"{report.percentile(ratios, 50):.2f}",
                             f"{min(ratios):.2f} - {max(ratios):.2f}"])
    if not rows:
        return ""
    return ("Grows paired by repetition (ours / QEMU's of the two grows that ran back to back; less exposed to the "
            "machine's load drifting between repetitions than the ratio of medians)\n\n"
            + report.markdown_table(["grow", "pairs", "median ratio", "min - max"], rows))


def _poll_rtts(series: dict | None) -> list[float]:
    if not series:
        return []
    return [t["guest_poll_rtt_s"] for rep in series["reps"] for r in rep.values()
            for key, t in r.items() if isinstance(t, dict) and t.get("guest_poll_rtt_s") is not None]


def micro_tables(results: dict) -> str:
    parts = []
    m = results.get("micro", {})
    disc = m.get("discard", [])
    if disc:
        rows = []
        for d in disc:
            c = report.Summary.of(d["times"]["c"])
            p = report.Summary.of(d["times"]["python"])
            label = (f"{format_size(d['device_bytes'])} memfd, {d['ranges']} runs of "
                     f"{format_size(d['block_bytes'])}, {'touched' if d['touch'] else 'untouched (sparse)'}")
            rows.append([label, report.fmt_summary(c, "s"), report.fmt_summary(p, "s"),
                         report.fmt_ratio(report.ratio(c.median, p.median)),
                         report.fmt_seconds(c.median / d["ranges"]), report.fmt_seconds(p.median / d["ranges"])])
        ua = m.get("unplug_all")
        if ua:
            c = report.Summary.of(ua["times"]["c"])
            for key, what in (("unplug_all", "UNPLUG_ALL answered: VirtioMemDevice.unplug_all() queues the runs"),
                              ("give_back", "then the discard worker gives them back (a fallocate per run)")):
                if key not in ua["times"]:
                    continue
                p = report.Summary.of(ua["times"][key])
                rows.append([f"{format_size(ua['device_bytes'])} device, {ua['ranges']} runs, the server (Python "
                             f"column): {what}",
                             report.fmt_summary(c, "s"), report.fmt_summary(p, "s"),
                             report.fmt_ratio(report.ratio(c.median, p.median)),
                             report.fmt_seconds(c.median / ua["ranges"]),
                             report.fmt_seconds(p.median / ua["ranges"])])
        parts.append("Discard loop: C `discard_runs` vs a Python/ctypes `fallocate(PUNCH_HOLE|KEEP_SIZE)` loop "
                     "over the same ranges\n\n" + report.markdown_table(
                         ["ranges", "C", "Python/ctypes", "C / Python", "C per range", "Python per range"], rows))
    bm = m.get("bitmap")
    if bm:
        rows = [[k, report.fmt_seconds(v)] for k, v in bm["ops"].items() if not k.startswith("_")]
        parts.append(f"Block bitmap, {bm['nb_blocks']} blocks ({format_size(bm['nb_blocks'] * bm['block_bytes'])} "
                     f"device, {format_size(bm['block_bytes'])} blocks; every other block plugged = "
                     f"{bm['ops'].get('_alternating_runs')} runs), time per call\n\n"
                     + report.markdown_table(["operation", "per call"], rows))
    if m.get("scrub"):
        parts.append(micro.scrub_tables(m["scrub"]))
    pc = m.get("policy_cost")
    if pc:
        parts.append(policy_cost.table(pc))
    st = m.get("startup", [])
    if st:
        rows = []
        for s in st:
            label = (f"1 device, max {s['size']}" if s["devices"] == 1
                     else f"{s['devices']} devices of {s['size']} in one process ({s['how']})")
            rss = report.Summary.of([r["VmRSS"] for r in s["rss"]])
            rows.append([label, report.fmt_summary(report.Summary.of(s["ready_s"]), "s"),
                         report.fmt_summary(rss, "bytes")])
        parts.append("Server start-up (spawn -> \"ready\" line and QMP answering, as harness.ServerProcess starts it) "
                     "and RSS then\n\n"
                     + report.markdown_table(["server", "start-up", "VmRSS"], rows))
    return "\n\n".join(parts)


def service_time_section(results: dict) -> str:
    st = results.get("service_times")
    if not st or not st.get("records"):
        return ""
    recs = st["records"]
    return (f"Device-side service time per request (vfiouser-vmem's own timing, its {st['hook']} events: parse, "
            f"bitmap, queueing the discard (done after the answer: docs/discard.md), response; per request "
            f"path, C or Python; QEMU's device has no such hook)\n\n" + report.service_time_table(recs)
            + "\n\n" + report.histogram_table(recs))


def scenario_service(results: dict) -> str:
    """Per scenario and repetition: how many requests and how much device time."""
    st = results.get("service_times")
    o = results["devices"].get("ours", {}).get("series")
    if not st or not st.get("records") or not o:
        return ""
    recs = st["records"]
    rows = []
    for rep_i, rep in enumerate(o["reps"]):
        for size_name, r in rep.items():
            for key in ("grow", "shrink_untouched", "grow_again", "shrink_touched"):
                t = r.get(key)
                if not t:
                    continue
                lo, hi = t["window"]
                inside = [x for x in recs if lo <= x[0] <= hi]
                busy = sum(x[3] for x in inside)
                wall = (t["size_s"] or 0)
                cpu = t.get("cpu_s", {})
                in_c = sum(1 for x in inside if len(x) > 4 and x[4] == "c")
                rows.append([f"rep {rep_i + 1} {key.replace('_', ' ')} {size_name}", str(len(inside)), str(in_c),
                             report.fmt_seconds(busy), report.fmt_seconds(wall),
                             report.fmt_percent(busy / wall) if wall else "-",
                             report.fmt_seconds(cpu.get("server", 0)), report.fmt_seconds(cpu.get("qemu", 0))])
    return ("Where the time of a resize goes (ours): requests served (of them in C), device busy time (the "
            "requests' service times), wall time to the device's size, CPU time\n\n"
            + report.markdown_table(["scenario", "requests", "in C", "device busy", "wall (size)", "busy / wall",
                                     "server CPU", "QEMU CPU"], rows))


def write_plots(results: dict, sizes: list[int], outdir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (.venv/bin/pip install matplotlib): no plots")
        return []
    written: list[str] = []
    if not any(d.get("series") for d in results["devices"].values()):
        return written + _service_plot(results, outdir, plt)
    scenarios = [("grow", "grow 0 -> {n}"), ("shrink_untouched", "shrink {n} -> 0, untouched"),
                 ("shrink_touched", "shrink {n} -> 0, after writes")]
    colors = {"qemu": "tab:blue", "ours": "tab:red"}
    labels = {"qemu": "QEMU virtio-mem-pci", "ours": "vfiouser-vmem"}
    fig, axes = plt.subplots(len(sizes), len(scenarios), figsize=(5 * len(scenarios), 3.6 * len(sizes)),
                             squeeze=False)
    for i, size in enumerate(sizes):
        n = format_size(size)
        for j, (key, title) in enumerate(scenarios):
            ax = axes[i][j]
            for kind in ("qemu", "ours"):
                d = results["devices"].get(kind, {})
                series = d.get("series")
                if not series:
                    continue
                base = series["base_kib"]
                for rep_i, rep in enumerate(series["reps"]):
                    t = rep.get(n, {}).get(key)
                    if not t:
                        continue
                    mem = t["samples"]["memtotal_kib"]
                    size_s = t["samples"]["size"]
                    lbl = labels[kind] if rep_i == 0 else None
                    start = 0 if key == "grow" else size / MIB  # the state before the request
                    ax.step([0] + [x for x, _ in mem], [start] + [(v - base) / 1024 for _, v in mem],
                            where="post", color=colors[kind], alpha=0.8,
                            label=f"{lbl}: guest MemTotal - base" if lbl else None)
                    ax.step([0] + [x for x, _ in size_s], [start] + [v / MIB for _, v in size_s],
                            where="post", color=colors[kind], alpha=0.5, linestyle="--",
                            label=f"{lbl}: device size" if lbl else None)
            ax.set_title(title.format(n=n))
            ax.set_xlabel("seconds after qom-set requested-size")
            ax.set_ylabel("MiB plugged (MemTotal - base)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"virtio-mem resize timelines, {results['env']['accel']}, {results['env']['date']}")
    fig.tight_layout()
    path = outdir / "timelines.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written + _service_plot(results, outdir, plt)


def _service_plot(results: dict, outdir: Path, plt) -> list[str]:
    written = []
    st = results.get("service_times", {})
    recs = st.get("records") or []
    if recs:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        counts = report.histogram(r[3] * 1e6 for r in recs)
        ax.bar(range(len(counts)), counts, color="tab:red")
        ax.set_xticks(range(len(counts)), [report.bucket_label(k) for k in range(len(counts))], rotation=45,
                      ha="right", fontsize=7)
        ax.set_ylabel("requests")
        ax.set_title("vfiouser-vmem: device-side service time per request")
        fig.tight_layout()
        path = outdir / "service_times.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def environment(kit: Kit | None) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu_version = "?"
    try:
        if kit is not None:
            qemu_version = (kit.dir / "qemu-version").read_text().strip()
    except OSError:
        pass
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "host": f"{platform.node()}, {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
            "accel": "KVM" if kvm_works() else "TCG", "qemu": qemu_version}


def render(results: dict, sizes: list[int]) -> str:
    env = results["env"]
    head = (f"vfiouser-vmem vs QEMU's virtio-mem-pci, {env['date']}; {env['host']}; {env['qemu']}, "
            f"{env['accel']}, 2 vCPUs, guest Linux {results.get('guest_kernel', '?')}")
    if results["devices"]:
        head += (f"; 8G maximum, 2M blocks, {results['reps']} repetition(s): median (min - max); "
                 "ratio = ours / QEMU's medians")
    rows = [r for r in comparison_rows(results, sizes) if r.qemu is not None or r.ours is not None]
    parts = [head]
    if rows:
        parts.append(report.comparison_table(rows))
    for kind in ("qemu", "ours"):
        err = results["devices"].get(kind, {}).get("error")
        if err:
            parts.append(f"**{kind}: failed:** {err}")
    for section in (paired_section(results, sizes), service_time_section(results), scenario_service(results),
                    backend_section(results), micro_tables(results)):
        if section:
            parts.append(section)
    return "\n\n".join(parts) + "\n"


def run_micro(args: argparse.Namespace) -> dict:
    out: dict = {}
    say("micro: discard loop (C vs Python/ctypes)")
    out["discard"] = [
        micro.bench_discard(args.micro_device, touch=False, reps=args.reps),
        micro.bench_discard(args.micro_touch, touch=True, reps=args.reps),
    ]
    out["unplug_all"] = micro.bench_unplug_all(args.micro_device, reps=args.reps)
    say("micro: block bitmap")
    nb = args.micro_device // (2 * MIB)
    out["bitmap"] = {"nb_blocks": nb, "block_bytes": 2 * MIB, "ops": micro.bench_bitmap(nb)}
    say("micro: scrub passes and resets")
    out["scrub"] = micro.bench_scrub(args.micro_device, reps=args.reps, reset_reps=args.reps)
    say("micro: the per-request cost of a Python plug policy")
    out["policy_cost"] = policy_cost.bench_policy_cost(rounds=args.reps)
    say("micro: server start-up")
    out["startup"] = [
        micro.bench_startup(size=args.device_size, reps=args.reps),
        micro.bench_startup(size=format_size(args.micro_device), reps=args.reps),
        micro.bench_startup(devices=8, device_size=args.device_size, reps=args.reps),
    ]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions of every measure (default 5)")
    p.add_argument("--sizes", default="1G,4G", help="grow/shrink targets (default 1G,4G)")
    p.add_argument("--boots", type=int, default=3,
                   help="boots of each guest for the boot row: the series' one, then alternating (default 3)")
    p.add_argument("--device-size", default="8G", help="both devices' maximum (default 8G)")
    p.add_argument("--block-size", default="2M", help="both devices' block size (default 2M)")
    p.add_argument("--touch-fraction", type=float, default=0.9, help="share of the plugged memory the guest writes")
    p.add_argument("--micro-device", default="1T", help="device size of the bitmap/discard/start-up benchmarks")
    p.add_argument("--micro-touch", default="512M", help="memfd size of the touched discard benchmark")
    p.add_argument("--only", choices=["all", "guests", "micro", "qemu", "ours", "backends", "many"], default="all",
                   help="a part of the run: guests = the main series and the Memory backends rows (both devices), "
                        "qemu/ours = the main series of one device, backends = the Memory backends rows alone, "
                        "many = the Many guests, one process rows alone (bench/many_guests.py, its defaults)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"the Memory backends rows to run, or none (default {','.join(BACKENDS)})")
    p.add_argument("--backend-device-size", default="2G",
                   help="both devices' maximum in the Memory backends rows (default 2G)")
    p.add_argument("--backend-sizes", default="1G", help="grow/shrink targets of the Memory backends rows (default 1G)")
    p.add_argument("--profile", choices=["none", "cprofile", "py-spy"], default="none",
                   help="profile the server during the guest runs (perturbs the timings)")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>)")
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.backend_sizes = [parse_size(s) for s in args.backend_sizes.split(",") if s]
    args.backends = [] if args.backends == "none" else [b for b in args.backends.split(",") if b]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        p.error(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)}, or none)")
    if any(s > parse_size(args.backend_device_size) for s in args.backend_sizes):
        p.error("--backend-sizes: a size above --backend-device-size")
    args.micro_device = parse_size(args.micro_device)
    args.micro_touch = parse_size(args.micro_touch)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    outdir = Path(args.out) if args.out else REPO / "bench" / "results" / datetime.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    if args.only == "many":
        # No guest, no kit: its own module, tables and results.json in the same folder.
        from bench import many_guests

        return many_guests.main(["--out", str(outdir)])
    # The micro part alone needs no guest, so no kit (built on first use).
    kit = None if args.only == "micro" else Kit.build()
    results: dict = {"env": environment(kit), "reps": args.reps, "sizes": args.sizes,
                     "touch_fraction": args.touch_fraction, "devices": {}}
    if args.only in ("all", "guests", "backends") and args.backends:
        results.update(backend_device_size=args.backend_device_size, backend_sizes=args.backend_sizes)
    if args.only in ("all", "micro"):
        results["micro"] = run_micro(args)
    kinds = {"all": ["qemu", "ours"], "guests": ["qemu", "ours"], "qemu": ["qemu"], "ours": ["ours"]}.get(args.only, [])
    if kinds:
        results["devices"] = measure_devices(kinds, kit, args, outdir)
        for measured in results["devices"].values():
            if "boot" in measured:
                results["guest_kernel"] = measured["boot"]["kernel"]
    if "backend_sizes" in results:
        results["backends"] = measure_backends(["qemu", "ours"], kit, args, outdir)
        for b in results["backends"].values():
            for measured in b.get("devices", {}).values():
                if "boot" in measured:
                    results.setdefault("guest_kernel", measured["boot"]["kernel"])
    stats_path = outdir / "service_times.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    if "devices" in results:
        add_answer_clocks(results["devices"], outdir, stats)
    if stats is not None:
        recs = [r for dev_recs in stats["devices"].values() for r in dev_recs]
        results["service_times"] = {"hook": stats["hook"], "records": recs, "all_seconds": [r[3] for r in recs]}
    results["elapsed_s"] = time.monotonic() - started
    (outdir / "results.json").write_text(json.dumps(results, indent=1))
    text = render(results, args.sizes)
    (outdir / "table.md").write_text(text)
    plots = write_plots(results, args.sizes, outdir)
    print(text)
    print(f"results: {outdir} ({', '.join(Path(p).name for p in plots) or 'no plots'}); "
          f"took {results['elapsed_s']:.0f} s", flush=True)
    failed = [k for k, d in results["devices"].items() if "error" in d]
    failed += [name for name, b in results.get("backends", {}).items()
               if "error" in b or any("error" in d for d in b.get("devices", {}).values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
