"""``vfiouser-vmem serve`` with the server's own per-request timing recorded.

Runs the real command line (``vfiouser_vmem.cli.main``) in this process, with
an observer appended to every ``DeviceServer``'s
``transport.request_observers``: each request's service time (parse, bitmap,
discard, response push; measured by the transport) is kept, and written as
JSON to ``--stats`` when the server exits (SIGTERM/SIGINT, as the CLI does).

    python bench/served.py --stats OUT.json [--cprofile OUT.prof] -- serve --socket ... --qmp ...
    python bench/served.py --stats OUT.json --devices 8 --dir DIR --size 8G --qmp PATH
    python bench/served.py --events OUT.json -- serve ...      (bench/latency.py)

The second form starts N devices in one process through
``vfiouser_vmem.server.serve`` directly (for a ``serve`` that takes one
device only); it prints one "ready" line like the CLI.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vfiouser_vmem import server as _server  # noqa: E402

#: device id -> list of [monotonic time, request type, response code, seconds]
RECORDS: dict[str, list[list[float]]] = {}
#: device id -> list of [monotonic time, request type, wall seconds, thread CPU seconds] of handle_request
MODEL_RECORDS: dict[str, list[list[float]]] = {}
HOOK = {"kind": "none"}
#: --model-timing: also time handle_request in wall and thread CPU time.  Off
#: by default: its clock reads (CLOCK_THREAD_CPUTIME_ID is a real system
#: call) sit inside the transport's service-time window and inflate it.
MODEL_TIMING = {"on": False}


def _time_model(model, records: list) -> None:
    """Also time the device model's handle_request alone, in wall and in
    thread CPU time: the difference is time the server thread was not
    running (preempted by the vCPU threads on a busy host)."""
    handle = model.handle_request

    def timed(data):
        wall, cpu = time.perf_counter(), time.thread_time()
        response = handle(data)
        records.append([time.monotonic(), int.from_bytes(bytes(data[:2]), "little"),
                        time.perf_counter() - wall, time.thread_time() - cpu])
        return response

    model.handle_request = timed


#: vfio-user side: "run" = [monotonic start, seconds] per vfu_run_ctx call (one
#: wake-up of a device's loop: the messages pending then); "bar0" = [monotonic
#: start, offset, is_write, length, seconds] per BAR0 access (virtio common,
#: ISR, device config, notify), each one a synchronous round trip for QEMU.
VFU_EVENTS: dict[str, list[list[float]]] = {"run": [], "bar0": []}


def _install_vfu_timing() -> None:
    from vfiouser_vmem.vfio_user import _context as vfu

    run = vfu.VfuContext.run

    def timed_run(self):
        started = time.monotonic()
        try:
            return run(self)
        finally:
            VFU_EVENTS["run"].append([started, time.monotonic() - started])

    vfu.VfuContext.run = timed_run
    bar0 = _server.DeviceServer._bar0_access

    def timed_bar0(self, offset, buf, is_write):
        started = time.monotonic()
        try:
            return bar0(self, offset, buf, is_write)
        finally:
            VFU_EVENTS["bar0"].append([started, offset, int(bool(is_write)), len(buf), time.monotonic() - started])

    # Patched on the class before any DeviceServer exists: setup_region()
    # takes the bound method at construction.
    _server.DeviceServer._bar0_access = timed_bar0


#: --events: wall-clock (CLOCK_REALTIME, time.time(), the clock of QEMU's
#: ``-msg timestamp=on``) events of the request path, for bench/latency.py:
#: [kind, seconds since the epoch(, extra)], kinds:
#:   run0 / run1  vfu_run_ctx start / end (extra: messages handled)
#:   ntf          BAR0 notify write callback entered (only where a notify
#:                reaches Python; the server takes it in C)
#:   pq0 / pq1    process_queue start (a kick pending) / end (extra: handled)
#:   req          the device model's handle_request returned, or the C
#:                request path returned the request (extra: request type)
#:   trig / trig1 vfu_irq_trigger called / returned (extra: vector)
#:   cq           a C request path call returned (extra: requests, the
#:                call's seconds as Python saw it, their seconds in C)
#:   nq           requests served inside the notify write (extra: requests,
#:                their seconds in C); with ntf, req and trig/trig1 events
#:                at the C call's own time
EVENTS: list[list] = []


def _install_events() -> None:
    from vfiouser_vmem.virtio import _pci as vp
    from vfiouser_vmem.vfio_user import _context as vfu
    from vfiouser_vmem.virtio import _virtqueue as vq

    now, ev = time.time, EVENTS.append
    run = vfu.VfuContext.run

    def run_traced(self):
        ev(["run0", now()])
        n = -1
        try:
            n = run(self)
            return n
        finally:
            ev(["run1", now(), n])

    vfu.VfuContext.run = run_traced
    trigger = vfu.VfuContext.irq_trigger

    def trigger_traced(self, vector):
        ev(["trig", now(), vector])
        try:
            return trigger(self, vector)
        finally:
            ev(["trig1", now(), vector])

    # Before any DeviceServer exists: the transport takes ctx.irq_trigger
    # bound at construction, setup_region() the BAR0 callback.
    vfu.VfuContext.irq_trigger = trigger_traced
    bar0 = _server.DeviceServer._bar0_access
    lo, hi = vp.NOTIFY_OFFSET, vp.NOTIFY_OFFSET + vp.NOTIFY_OFF_MULTIPLIER * vp.NUM_QUEUES

    def bar0_traced(self, offset, buf, is_write):
        if is_write and lo <= offset < hi:
            ev(["ntf", now()])
        return bar0(self, offset, buf, is_write)

    _server.DeviceServer._bar0_access = bar0_traced
    process_queue = vp.VirtioPciTransport.process_queue

    def process_queue_traced(self):
        if not getattr(self, "kick_pending", True):
            return process_queue(self)  # nothing to do: not an event
        ev(["pq0", now()])
        handled = process_queue(self)
        ev(["pq1", now(), handled])
        return handled

    vp.VirtioPciTransport.process_queue = process_queue_traced
    orig_init = _server.DeviceServer.__init__

    def init(self, config, *args, **kwargs):
        orig_init(self, config, *args, **kwargs)
        handle = self.model.handle_request

        def handle_traced(data):
            response = handle(data)
            ev(["req", now(), int.from_bytes(bytes(data[:2]), "little")])
            return response

        self.model.handle_request = handle_traced

    _server.DeviceServer.__init__ = init
    serve_in_c = vq.SplitQueue.serve_in_c

    def serve_in_c_traced(self, mem, device_state, served):
        # The C request path (csrc/vmem_queue.c): its requests are handled
        # when vmem_serve_queue returns.
        t0 = now()
        result, count = serve_in_c(self, mem, device_state, served)
        t = now()
        for i in range(count):
            ev(["req", t, int(served[i].type)])
        # The call as Python saw it (the cffi call, the GIL taken back)
        # against the requests' own time in C.
        ev(["cq", t, count, t - t0, sum(served[i].elapsed_ns for i in range(count)) * 1e-9])
        return result, count

    vq.SplitQueue.serve_in_c = serve_in_c_traced
    take_notify_served = vp.VirtioPciTransport.take_notify_served

    def take_notify_served_traced(self):
        # Requests the C request path served inside the notify write
        # (csrc/vmem_queue.h vmem_serve_on_notify), with the interrupt
        # raised there: their events carry the C call's own CLOCK_REALTIME
        # stamp (taken when it returned, just before the trigger), not the
        # time Python looks at them.
        c = self.notify_serve._c
        count = int(c.nr_served)
        if count:
            t = c.realtime_ns * 1e-9
            ev(["ntf", t])
            for i in range(count):
                ev(["req", t, int(self.notify_serve.served[i].type)])
            if c.interrupt_due and c.irq_vector >= 0:
                ev(["trig", t, int(c.irq_vector)])
                ev(["trig1", t, int(c.irq_vector)])
            ev(["nq", t, count, sum(self.notify_serve.served[i].elapsed_ns for i in range(count)) * 1e-9])
        return take_notify_served(self)

    vp.VirtioPciTransport.take_notify_served = take_notify_served_traced


#: process_queue calls that served requests: [monotonic end, requests, wall
#: seconds, the server thread's CPU seconds].  Wall well above CPU: the
#: thread was off the CPU (preempted) while it served them.  Measured around
#: the whole call, so the clock reads stay out of the service times.
QUEUE_RUNS: list[list[float]] = []


def _install_queue_timing() -> None:
    from vfiouser_vmem.virtio import _pci as vp

    process_queue = vp.VirtioPciTransport.process_queue

    def timed(self):
        wall, cpu = time.perf_counter(), time.thread_time()
        handled = process_queue(self)
        if handled:
            QUEUE_RUNS.append([time.monotonic(), handled, time.perf_counter() - wall, time.thread_time() - cpu])
        return handled

    vp.VirtioPciTransport.process_queue = timed


def _install_observer() -> None:
    orig_init = _server.DeviceServer.__init__

    def init(self, config, *args, **kwargs):
        orig_init(self, config, *args, **kwargs)
        records = RECORDS.setdefault(config.id, [])
        observers = getattr(self.transport, "request_observers", None)
        if observers is not None:
            HOOK["kind"] = "request_observers"

            def observe(request_type: int, response_code: int, seconds: float) -> None:
                records.append([time.monotonic(), request_type, response_code, seconds])

            observers.append(observe)
            if MODEL_TIMING["on"]:
                _time_model(self.model, MODEL_RECORDS.setdefault(config.id, []))
            return
        # An older transport without the hook: time the device model's
        # handle_request (parse, bitmap, discard; not the response push).
        HOOK["kind"] = "handle_request"
        model = self.model
        handle = model.handle_request

        def timed(data):
            started = time.perf_counter()
            response = handle(data)
            elapsed = time.perf_counter() - started
            records.append([time.monotonic(), int.from_bytes(bytes(data[:2]), "little"),
                            int.from_bytes(response[:2], "little"), elapsed])
            return response

        model.handle_request = timed

    _server.DeviceServer.__init__ = init


def _serve_many(args: argparse.Namespace) -> int:
    import trio

    from vfiouser_vmem.util.sizes import parse_size

    size = parse_size(args.size)
    configs = [
        _server.DeviceConfig(socket=str(Path(args.dir) / f"vm{i}.sock"), size_bytes=size, id=f"vm{i}")
        for i in range(args.devices)
    ]

    def ready() -> None:
        print(f"served: {len(configs)} devices ready, QMP on {args.qmp}", flush=True)

    trio.run(functools.partial(_server.serve, configs, args.qmp, ready=ready))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", help="write the per-request service times here (JSON) at exit")
    parser.add_argument("--cprofile", help="profile the server (cProfile) and write pstats here at exit")
    parser.add_argument("--devices", type=int, help="serve this many devices through server.serve() directly")
    parser.add_argument("--dir", help="with --devices: where the vfio-user sockets go")
    parser.add_argument("--size", default="8G", help="with --devices: each device's maximum (default 8G)")
    parser.add_argument("--qmp", help="with --devices: the QMP socket")
    parser.add_argument("--model-timing", action="store_true",
                        help="also record handle_request's wall and thread CPU time (inflates the service times)")
    parser.add_argument("--events", help="record wall-clock events of the request path, written here (JSON) at "
                        "exit (bench/latency.py)")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- and the vfiouser-vmem arguments")
    args = parser.parse_args(argv)
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli

    MODEL_TIMING["on"] = args.model_timing
    _install_observer()
    _install_vfu_timing()
    if not args.events:  # latency.py wraps process_queue itself
        _install_queue_timing()
    if args.events:
        _install_events()
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if args.devices:
            if not (args.dir and args.qmp):
                parser.error("--devices needs --dir and --qmp")
            import logging

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return _serve_many(args)
        from vfiouser_vmem.cli._main import main as cli_main

        return cli_main(cli_args)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
        if args.stats:
            Path(args.stats).write_text(json.dumps({"hook": HOOK["kind"], "devices": RECORDS, "model": MODEL_RECORDS,
                                                "vfu": VFU_EVENTS, "queue_runs": QUEUE_RUNS}))
        if args.events:
            Path(args.events).write_text(json.dumps({"events": EVENTS}))


if __name__ == "__main__":
    sys.exit(main())
