#!/usr/bin/env python3
"""A virtio-mem device that misbehaves on purpose, for testing guest drivers.

The device server runs in this process (``vfiouser_vmem.open_server``) with
a plug policy (``vfiouser_vmem.PlugPolicy``) that injects faults into the
answers to the guest's PLUG, UNPLUG and UNPLUG_ALL requests (the ones the
virtio-mem rules would ACK; STATE requests and invalid requests are not
seen by a policy):

- ``--busy-every N``: answer BUSY to every Nth request (numbered 1, 2, ...
  in the order the policy sees them), at most ``--busy-limit`` times;
- ``--nack-storm-requests K`` / ``--nack-storm-seconds T``: a NACK storm,
  NACK for every PLUG from request ``--nack-storm-start`` on, for K requests
  or T seconds (whichever ends first when both are given);
- ``--delay-ms D``: wait D ms before answering each request.

Every injection is logged (``fault_injection`` logger, stderr) and the
totals are printed when the script stops (SIGTERM, SIGINT).

What Linux's virtio_mem driver does with them (drivers/virtio/virtio_mem.c,
``virtio_mem_run_wq()``): a NACK to a PLUG is ``-EAGAIN``, retried at once
(``goto retry``), so a NACK storm makes the driver spin on PLUG/NACK for as
long as the storm lasts (bound it); BUSY is ``-ETXTBSY``, retried by the
driver's timer after 50 s, doubling up to 300 s until a run succeeds, so
an injected BUSY can cost the guest 50 s or more (``--busy-limit`` bounds
the total).  Not always: when the driver has just removed a memory block
while shrinking, it has queued its work again (``virtio_mem_retry()``) and
the UNPLUG refused BUSY is retried at once.

The delay blocks: a policy runs on the server's single trio thread, so
while it sleeps nothing else of this process runs (no other request, no
QMP command, no other device, no vfio-user message), and the guest's vCPU
that notified the queue may be waiting for the answer too (docs/api.md).
It is therefore bounded: at most 1000 ms per request.

Run it next to QEMU (``-device vfio-user-pci,socket=...``), e.g.::

    python examples/fault_injection.py --socket /tmp/vmem0.sock --size 4G \\
        --busy-every 7 --busy-limit 2 --nack-storm-requests 5 --delay-ms 5 \\
        --qmp /tmp/vmem0.qmp

and grow and shrink the guest with QMP (``qom-set vmem0 requested-size``)
on the ``--qmp`` socket.  Only the package's public API is used.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable

import trio

import vfiouser_vmem
from vfiouser_vmem import DeviceConfig, PluggedSizeChanged, Request, RequestType, Response, VirtioMemDevice

log = logging.getLogger("fault_injection")

#: The longest --delay-ms: the delay blocks the server's only thread.
MAX_DELAY_S = 1.0



def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``4096``: the package's parse_size, for argparse."""
    try:
        return vfiouser_vmem.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {exc}") from None


format_size = vfiouser_vmem.format_size


class FaultInjector:
    """A ``vfiouser_vmem.PlugPolicy`` that injects BUSY, NACK storms and delays.

    Requests are numbered from 1 in the order ``decide`` sees them.  In a
    storm every PLUG is NACKed (UNPLUGs pass: NACK is not an answer to
    them); outside it every ``busy_every``-th request is BUSY, at most
    ``busy_limit`` times; everything else is ACK.  ``clock`` and ``sleep``
    are for tests."""

    def __init__(self, *, busy_every: int = 0, busy_limit: int | None = None, delay_s: float = 0.0,
                 nack_storm_requests: int = 0, nack_storm_seconds: float = 0.0, nack_storm_start: int = 1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if busy_every < 0:
            raise ValueError("busy_every must not be negative (0: no BUSY)")
        if busy_limit is not None and busy_limit < 0:
            raise ValueError("busy_limit must not be negative")
        if not 0 <= delay_s <= MAX_DELAY_S:
            raise ValueError(f"the delay must be within 0-{MAX_DELAY_S:g} s: it blocks the server's only thread")
        if nack_storm_requests < 0 or nack_storm_seconds < 0:
            raise ValueError("a NACK storm's length must not be negative")
        if nack_storm_start < 1:
            raise ValueError("requests are numbered from 1")
        self.busy_every = busy_every
        self.busy_limit = busy_limit
        self.delay_s = delay_s
        self.nack_storm_requests = nack_storm_requests
        self.nack_storm_seconds = nack_storm_seconds
        self.nack_storm_start = nack_storm_start
        self._clock = clock
        self._sleep = sleep
        #: Requests seen so far (the number of the last one).
        self.seen = 0
        #: What was injected: "BUSY", "NACK", "delay", by count.
        self.injected: Counter[str] = Counter()
        self._storm_started_at: float | None = None
        self._storm_over = not (nack_storm_requests or nack_storm_seconds)

    def _storm_length(self) -> str:
        lengths = [f"{self.nack_storm_requests} requests" if self.nack_storm_requests else "",
                   f"{self.nack_storm_seconds:g} s" if self.nack_storm_seconds else ""]
        return " or ".join(x for x in lengths if x)

    def __repr__(self) -> str:
        parts = []
        if self.busy_every:
            limit = "" if self.busy_limit is None else f" (at most {self.busy_limit})"
            parts.append(f"BUSY every {self.busy_every}th request{limit}")
        if self.nack_storm_requests or self.nack_storm_seconds:
            parts.append(f"NACK storm from request {self.nack_storm_start} for {self._storm_length()}")
        if self.delay_s:
            parts.append(f"{self.delay_s * 1000:g} ms delay")
        return f"FaultInjector({', '.join(parts) or 'no faults'})"

    def _storm(self, n: int) -> bool:
        """Whether request ``n`` (just seen) falls in the NACK storm."""
        if self._storm_over or n < self.nack_storm_start:
            return False
        now = self._clock()
        if self._storm_started_at is None:
            self._storm_started_at = now
            log.warning("NACK storm begins at request #%d (for %s)", n, self._storm_length())
        by_count = self.nack_storm_requests and n >= self.nack_storm_start + self.nack_storm_requests
        by_time = self.nack_storm_seconds and now - self._storm_started_at >= self.nack_storm_seconds
        if by_count or by_time:
            self._storm_over = True
            log.warning("NACK storm over at request #%d after %.2f s: %d PLUG(s) NACKed", n,
                        now - self._storm_started_at, self.injected["NACK"])
            return False
        return True

    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        self.seen += 1
        n = self.seen
        kind = RequestType(request.type).name
        what = f"{kind} #{n} of {request.nb_blocks} block(s) at {request.addr:#x}"
        if self.delay_s:
            # Blocks the server's thread (see the module's docstring); bounded by MAX_DELAY_S.
            self._sleep(self.delay_s)
            self.injected["delay"] += 1
            log.debug("%s: delayed %.0f ms", what, self.delay_s * 1000)
        if self._storm(n) and request.type == RequestType.PLUG:
            self.injected["NACK"] += 1
            log.info("injected NACK into %s (NACK storm)", what)
            return Response.NACK
        if (self.busy_every and n % self.busy_every == 0
                and (self.busy_limit is None or self.injected["BUSY"] < self.busy_limit)):
            self.injected["BUSY"] += 1
            log.warning("injected BUSY into %s (every %dth request; %d so far)", what, self.busy_every,
                        self.injected["BUSY"])
            return Response.BUSY
        return Response.ACK

    def summary(self) -> str:
        return (f"{self.seen} request(s) seen; injected {self.injected['NACK']} NACK, {self.injected['BUSY']} BUSY, "
                f"{self.injected['delay']} delay(s) of {self.delay_s * 1000:g} ms")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="the vfio-user socket QEMU connects to")
    p.add_argument("--size", required=True, type=parse_size, help="the device's maximum size (e.g. 4G)")
    p.add_argument("--block-size", type=parse_size, default=parse_size("2M"), help="device block size (default 2M)")
    p.add_argument("--requested-size", type=parse_size, default=0, help="initial requested size (default 0)")
    p.add_argument("--id", default="vmem0", help="device id, as QEMU's id= (default vmem0)")
    p.add_argument("--qmp", metavar="PATH", help="also serve QMP (qom-get/qom-set, query-memory-devices) here")
    p.add_argument("--busy-every", type=int, default=0, metavar="N", help="BUSY for every Nth request (0: never)")
    p.add_argument("--busy-limit", type=int, default=None, metavar="M", help="at most M BUSY answers in all")
    p.add_argument("--nack-storm-requests", type=int, default=0, metavar="K",
                   help="NACK every PLUG for K requests (0: no storm by count)")
    p.add_argument("--nack-storm-seconds", type=float, default=0.0, metavar="T",
                   help="NACK every PLUG for T seconds (0: no storm by time)")
    p.add_argument("--nack-storm-start", type=int, default=1, metavar="R",
                   help="the storm begins at request R (default 1, the first)")
    p.add_argument("--delay-ms", type=float, default=0.0, metavar="D",
                   help=f"wait D ms before each answer (at most {MAX_DELAY_S * 1000:g}; it blocks the server)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def make_policy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FaultInjector:
    try:
        return FaultInjector(busy_every=args.busy_every, busy_limit=args.busy_limit, delay_s=args.delay_ms / 1000,
                             nack_storm_requests=args.nack_storm_requests, nack_storm_seconds=args.nack_storm_seconds,
                             nack_storm_start=args.nack_storm_start)
    except ValueError as exc:
        parser.error(str(exc))


async def run(args: argparse.Namespace, policy: FaultInjector) -> None:
    config = DeviceConfig(socket=args.socket, size_bytes=args.size, block_size_bytes=args.block_size,
                          requested_size_bytes=args.requested_size, id=args.id, policy=policy)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with vfiouser_vmem.open_server([config], qmp_path=args.qmp) as server:
            device = server.devices[args.id]
            device.subscribe(lambda e: log.info("%s: plugged size now %s", e.device_id,
                                                format_size(e.plugged_size_bytes)), PluggedSizeChanged)
            print(f"fault_injection: {args.id} ready on {args.socket} (max {format_size(args.size)}), {policy!r}"
                  + (f", QMP on {args.qmp}" if args.qmp else ""), flush=True)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                break
            if device.model.hook_errors:
                log.error("the policy raised %d time(s) (answered BUSY)", device.model.hook_errors["policy"])
    print(f"fault_injection: {policy.summary()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = make_policy(parser, args)
    failed = False
    try:
        trio.run(run, args, policy)
    except* vfiouser_vmem.VmemError as group:  # a socket in use, a bad setting: one line each
        for exc in group.exceptions:
            log.error("%s", exc)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
