"""A vfiouser-vmem server that records its own per-request figures, built on
the public API (``open_server``, ``Device.subscribe``).

    python bench/served.py --stats OUT.json [--events OUT.json] [--cprofile OUT.prof] \\
        serve --qmp PATH --socket PATH --size 8G [--block-size 2M] [--requested-size 0] [--id vmem0]
    python bench/served.py --stats OUT.json ... \
        serve --qmp PATH --object memory-backend-memfd,id=mem0,size=2G,hugetlb=on \
        --device id=vmem0,memdev=mem0,socket=PATH,prealloc=on

After ``serve`` come the single-device flags of ``vfiouser-vmem serve``
(so that bench/run.py starts it through ``harness.VmemServer``'s own
argument list), or its ``--object``/``--device`` options in QEMU's syntax,
read by the command line's own parser (``vfiouser_vmem.cli._config``:
bench/run.py's "Memory backends" rows give both devices the same backend
and device options).  It prints one "ready" line once every socket listens, and
stops on SIGTERM/SIGINT, writing its files then:

- ``--stats``: every ``RequestServed`` event of every device, as
  ``{"hook": "RequestServed", "devices": {id: [[monotonic time, request
  type, response code, service seconds, path], ...]}}``; ``path`` is "c" or
  "python" (the request path that served it), the time is when the server
  told its observers (on its trio thread, right after the guest got its
  interrupt: the bench's clock of "answered");
- ``--events``: wall-clock (CLOCK_REALTIME, the clock of QEMU's ``-msg
  timestamp=on``) events for bench/latency.py, ``{"events": [[kind,
  seconds since the epoch, ...], ...]}``, kinds:

  ``ntf``  a notify write served in C (the C call's own clock, read when it
           returned, just before it raised the interrupt)
  ``req``  a request it served (extra: request type), at the same time
  ``trig`` the interrupt it raised (extra: MSI-X vector), at the same time
  ``nq``   the same call's totals (extra: requests, their seconds in C)
  ``srv``  a request served anywhere else (after the vfio-user message, in
           C or in Python): extra: type, service seconds, path; the time is
           when the observers heard of it, after the interrupt;
- ``--cprofile``: the whole process under cProfile (pstats file).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from vfiouser_vmem import ConfigError, Device, DeviceConfig, RequestServed, open_server  # noqa: E402
from vfiouser_vmem.cli._config import build_configs, device_spec, object_spec  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402


class Recorder:
    """What served.py writes at exit, gathered from the devices' events."""

    def __init__(self, *, events: bool) -> None:
        #: device id -> [[monotonic time, type, response code, seconds, path]]
        self.records: dict[str, list[list]] = {}
        self.events: list[list] | None = [] if events else None

    def attach(self, device: Device) -> None:
        records = self.records.setdefault(device.id, [])
        # Requests of a notify write already in self.events (take_notify
        # below): their RequestServed events come first in the next batch.
        in_notify = [0]

        def served(event: RequestServed) -> None:
            records.append([time.monotonic(), int(event.request.type), int(event.response), event.service_s,
                            event.path])
            if self.events is None:
                return
            if in_notify[0] and event.path == "c":
                in_notify[0] -= 1
                return
            self.events.append(["srv", time.time(), int(event.request.type), event.service_s, event.path])

        device.subscribe(served, RequestServed)
        if self.events is not None:
            self._trace_notify_serve(device, in_notify)

    def _trace_notify_serve(self, device: Device, in_notify: list[int]) -> None:
        """The one wrap: the public API tells when a request was answered
        (RequestServed, after the interrupt), not when the C serve inside
        the guest's notify write ran.  That call's own clock and results
        (``notify_state``: ``realtime_ns``, ``nr_served``, ``interrupt_due``,
        ``irq_vector``; ``notify_results[i]``: ``type``, ``elapsed_ns``) are
        cleared by ``take_notify``, which books them after the vfio-user
        message: they are read just before it, on this device only."""
        # Device keeps its DeviceServer private; the transport's C path
        # (transport.handler.native) is reached through it, read-only.
        native = device._server.transport.handler.native
        if native is None:
            return
        state, results, ev = native.notify_state, native.notify_results, self.events.append
        take_notify = native.take_notify

        def take_notify_traced():
            count = int(state.nr_served)
            if count:
                t = state.realtime_ns * 1e-9
                ev(["ntf", t])
                for i in range(count):
                    ev(["req", t, int(results[i].type)])
                if state.interrupt_due and state.irq_vector >= 0:
                    ev(["trig", t, int(state.irq_vector)])
                ev(["nq", t, count, sum(results[i].elapsed_ns for i in range(count)) * 1e-9])
                in_notify[0] += count
            return take_notify()

        native.take_notify = take_notify_traced

    def stats(self) -> dict:
        return {"hook": "RequestServed", "devices": self.records}


async def serve(configs: list[DeviceConfig], qmp_path: str, recorder: Recorder) -> None:
    """open_server until SIGTERM/SIGINT, the recorder subscribed to every
    device before the "ready" line (so before any client can connect)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_server(configs, qmp_path) as server:
            for device in server.devices.values():
                recorder.attach(device)
            print("served: " + ", ".join(f"{c.id} ready on {c.socket} (max {format_size(c.size_bytes)}, block "
                                         f"{format_size(c.block_size_bytes)})" for c in configs)
                  + f", QMP on {qmp_path}", flush=True)
            async for _ in signals:
                break


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats", help="write every request's service time here (JSON) at exit")
    p.add_argument("--events", help="write the wall-clock events of bench/latency.py here (JSON) at exit")
    p.add_argument("--cprofile", help="profile the server (cProfile) and write pstats here at exit")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="vfiouser-vmem serve's single-device flags")
    s.add_argument("--qmp", required=True)
    s.add_argument("--socket")
    s.add_argument("--size", type=parse_size)
    s.add_argument("--block-size", default=2 << 20, type=parse_size)
    s.add_argument("--requested-size", default=0, type=parse_size)
    s.add_argument("--id", default="vmem0")
    s.add_argument("--object", action="append", default=[], help="as vfiouser-vmem serve --object (QEMU's syntax)")
    s.add_argument("--device", action="append", default=[], help="as vfiouser-vmem serve --device")
    args = p.parse_args(argv)
    if not args.device and (args.socket is None or args.size is None):
        s.error("--socket and --size are required (or --object/--device)")
    return args


def device_configs(args: argparse.Namespace) -> list[DeviceConfig]:
    """The devices of the single-device flags, or of --object/--device as
    ``vfiouser-vmem serve`` reads them."""
    if args.device:
        return build_configs([object_spec(t) for t in args.object], [device_spec(t) for t in args.device],
                             qmp_path=args.qmp, need_directories=True)
    return [DeviceConfig(socket=args.socket, size_bytes=args.size, block_size_bytes=args.block_size,
                         requested_size_bytes=args.requested_size, id=args.id)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        configs = device_configs(args)
    except ConfigError as exc:
        print(f"served: {exc}", flush=True)  # the first line, instead of "ready"
        return 2
    recorder = Recorder(events=bool(args.events))
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        trio.run(serve, configs, args.qmp, recorder)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
        if args.stats:
            Path(args.stats).write_text(json.dumps(recorder.stats()))
        if args.events:
            Path(args.events).write_text(json.dumps({"events": recorder.events}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
