#!/usr/bin/env python3
"""A virtio-mem device that does not grow the guest while the host is short of memory.

The device server runs in this process (``vfiouser_vmem.open_server``) with
a plug policy (``vfiouser_vmem.PlugPolicy``) that refuses every PLUG while
the host is under memory pressure:

- ``MemAvailable`` (read from a meminfo-format file, ``/proc/meminfo`` by
  default) is below ``--min-available``, or
- the memory PSI ``some avg10`` (``/proc/pressure/memory`` by default) is
  above ``--max-psi``.

UNPLUG and UNPLUG_ALL are always allowed: giving memory back is what a host
under pressure wants.  A file that cannot be read or parsed counts as
pressure (the policy fails closed, and says why in the log).

Why BUSY and not NACK
---------------------
Linux's virtio_mem driver (drivers/virtio/virtio_mem.c) maps the answers of
a PLUG to errors of its work function, ``virtio_mem_run_wq()``:

- NACK becomes ``-EAGAIN``, which the work function answers with
  ``goto retry``: it re-reads the configuration and sends the PLUG again at
  once, in a loop.  NACK is meant for "you asked for more than
  requested_size" (the request shrank under the driver), where the re-read
  configuration ends the loop.  A NACK for host pressure would not end it:
  the guest's kworker and this server's thread would spin on PLUG/NACK,
  burning host CPU exactly while the host is short of resources.
- BUSY becomes ``-ETXTBSY`` ("the hypervisor cannot process our request
  right now (e.g., out of memory, migrating)"), which arms the driver's
  retry timer: 50 s after the first refusal, doubling up to 300 s, reset
  after a run that succeeds.  That is what pressure is.

So the policy answers BUSY.  The price is latency: after the pressure ends,
the guest would wait for its timer (up to 5 minutes).  A change of the
device configuration cancels that timer and makes the driver retry at once,
so, unless ``--no-nudge``, this script re-checks the pressure every
``--recheck-interval`` seconds while a refused grow is pending and, once the
pressure is over, nudges the guest: ``Device.notify_config_change()`` sends
it a configuration-change interrupt, and nothing else changes.

Run it next to QEMU (``-device vfio-user-pci,socket=...``), e.g.::

    python examples/host_pressure.py --socket /tmp/vmem0.sock --size 4G \\
        --min-available 2G --max-psi 10 --qmp /tmp/vmem0.qmp

and grow the guest with QMP (``qom-set vmem0 requested-size``) on the
``--qmp`` socket.  Only the package's public API is used.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path

import trio

import vfiouser_vmem
from vfiouser_vmem import DeviceConfig, PluggedSizeChanged, Request, RequestType, Response, VirtioMemDevice

log = logging.getLogger("host_pressure")

DEFAULT_MEMINFO = "/proc/meminfo"
DEFAULT_PSI = "/proc/pressure/memory"

def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``4096``: the package's parse_size, for argparse."""
    try:
        return vfiouser_vmem.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {exc}") from None


format_size = vfiouser_vmem.format_size


def read_mem_available(path: str | Path) -> int:
    """``MemAvailable`` of a meminfo-format file, in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            value = int(fields[1])
            unit = fields[2] if len(fields) > 2 else "kB"
            if unit != "kB":
                raise ValueError(f"{path}: MemAvailable in {unit!r}, expected kB")
            return value * 1024
    raise ValueError(f"{path}: no MemAvailable line")


def read_psi_some_avg10(path: str | Path) -> float:
    """``some avg10`` of a PSI file (``/proc/pressure/memory`` format), in percent."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    return float(value)
    raise ValueError(f"{path}: no 'some ... avg10=' line")


class HostPressurePolicy:
    """A ``vfiouser_vmem.PlugPolicy``: BUSY for every PLUG while the host is
    under memory pressure, ACK otherwise; UNPLUG and UNPLUG_ALL always ACK.

    ``min_available_bytes``: refuse below this MemAvailable (None: no
    check).  ``max_psi_some_avg10``: refuse above this PSI ``some avg10``,
    in percent (None: no check).  The files are read on every PLUG (a few
    tens of microseconds; PLUGs come at most a few per memory block)."""

    def __init__(self, *, min_available_bytes: int | None, max_psi_some_avg10: float | None,
                 meminfo_path: str | Path = DEFAULT_MEMINFO, psi_path: str | Path = DEFAULT_PSI) -> None:
        if min_available_bytes is not None and min_available_bytes < 0:
            raise ValueError("min_available_bytes must not be negative")
        if max_psi_some_avg10 is not None and not 0 <= max_psi_some_avg10 <= 100:
            raise ValueError("max_psi_some_avg10 is a percentage (0-100)")
        self.min_available_bytes = min_available_bytes
        self.max_psi_some_avg10 = max_psi_some_avg10
        self.meminfo_path = Path(meminfo_path)
        self.psi_path = Path(psi_path)
        #: PLUGs refused and ACKed so far.
        self.refused = 0
        self.granted = 0
        #: A PLUG was refused since the last ``refusal_handled()``: the guest
        #: waits for its retry timer.
        self.refusal_pending = False

    def __repr__(self) -> str:
        return (f"HostPressurePolicy(min_available={self.min_available_bytes}, "
                f"max_psi_some_avg10={self.max_psi_some_avg10})")

    def pressure(self) -> str | None:
        """Why the host is under memory pressure now, or None."""
        if self.min_available_bytes is not None:
            try:
                available = read_mem_available(self.meminfo_path)
            except (OSError, ValueError) as exc:
                return f"cannot read MemAvailable ({exc})"
            if available < self.min_available_bytes:
                return (f"MemAvailable {format_size(available)} < {format_size(self.min_available_bytes)} "
                        f"({self.meminfo_path})")
        if self.max_psi_some_avg10 is not None:
            try:
                avg10 = read_psi_some_avg10(self.psi_path)
            except (OSError, ValueError) as exc:
                return f"cannot read the memory PSI ({exc})"
            if avg10 > self.max_psi_some_avg10:
                return f"memory PSI some avg10 {avg10:.2f}% > {self.max_psi_some_avg10:g}% ({self.psi_path})"
        return None

    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        if request.type != RequestType.PLUG:
            return Response.ACK
        reason = self.pressure()
        if reason is None:
            self.granted += 1
            return Response.ACK
        self.refused += 1
        self.refusal_pending = True
        log.warning("refused PLUG of %s at %#x (BUSY, #%d): host under memory pressure: %s",
                    format_size(request.nb_blocks * device.block_size), request.addr, self.refused, reason)
        return Response.BUSY

    def refusal_handled(self) -> None:
        self.refusal_pending = False


def nudge(device: vfiouser_vmem.Device) -> None:
    """Make the guest's driver look at the device now instead of at its
    retry timer (a configuration-change interrupt); only for a pending grow."""
    if device.plugged_size < device.requested_size:
        device.notify_config_change()


async def watch_pressure(device: vfiouser_vmem.Device, policy: HostPressurePolicy, interval_s: float) -> None:
    """While a refused grow is pending, re-check the pressure; once it is
    over, nudge the guest (see the module's docstring)."""
    while True:
        await trio.sleep(interval_s)
        if not policy.refusal_pending:
            continue
        if device.plugged_size >= device.requested_size:
            policy.refusal_handled()  # the guest got there anyway (or the request shrank)
            continue
        if policy.pressure() is None:
            log.info("memory pressure is over: nudging the guest to retry now (plugged %s of requested %s)",
                     format_size(device.plugged_size), format_size(device.requested_size))
            policy.refusal_handled()
            nudge(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="the vfio-user socket QEMU connects to")
    p.add_argument("--size", required=True, type=parse_size, help="the device's maximum size (e.g. 4G)")
    p.add_argument("--block-size", type=parse_size, default=parse_size("2M"), help="device block size (default 2M)")
    p.add_argument("--requested-size", type=parse_size, default=0, help="initial requested size (default 0)")
    p.add_argument("--id", default="vmem0", help="device id, as QEMU's id= (default vmem0)")
    p.add_argument("--qmp", metavar="PATH", help="also serve QMP (qom-get/qom-set, query-memory-devices) here")
    p.add_argument("--meminfo", default=DEFAULT_MEMINFO, help=f"meminfo-format file (default {DEFAULT_MEMINFO})")
    p.add_argument("--psi", default=DEFAULT_PSI,
                   help=f"memory PSI file (default {DEFAULT_PSI}); 'none': no PSI check")
    p.add_argument("--min-available", type=parse_size, default=parse_size("1G"),
                   help="refuse plugs while MemAvailable is below this (default 1G; 0: no check)")
    p.add_argument("--max-psi", type=float, default=10.0, metavar="PERCENT",
                   help="refuse plugs while PSI 'some avg10' is above this (default 10)")
    p.add_argument("--recheck-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often to re-check the pressure after a refusal (default 1)")
    p.add_argument("--no-nudge", action="store_true",
                   help="leave the guest to its own retry timer (50-300 s) after the pressure ends")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def make_policy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> HostPressurePolicy:
    psi: str | None = None if args.psi.lower() == "none" else args.psi
    if psi is not None and not Path(psi).exists():
        if args.psi != DEFAULT_PSI:
            parser.error(f"--psi {psi}: no such file")
        log.warning("%s does not exist (a kernel without PSI): only MemAvailable is checked", psi)
        psi = None
    min_available = args.min_available or None
    if min_available is not None:
        try:
            read_mem_available(args.meminfo)
        except (OSError, ValueError) as exc:
            parser.error(f"--meminfo: {exc}")
    if psi is not None:
        if not math.isfinite(args.max_psi) or not 0 <= args.max_psi <= 100:
            parser.error("--max-psi is a percentage (0-100)")
        try:
            read_psi_some_avg10(psi)
        except (OSError, ValueError) as exc:
            parser.error(f"--psi: {exc}")
    if args.recheck_interval <= 0:
        parser.error("--recheck-interval must be positive")
    return HostPressurePolicy(min_available_bytes=min_available,
                              max_psi_some_avg10=None if psi is None else args.max_psi,
                              meminfo_path=args.meminfo, psi_path=psi or DEFAULT_PSI)


async def run(args: argparse.Namespace, policy: HostPressurePolicy) -> None:
    config = DeviceConfig(socket=args.socket, size_bytes=args.size, block_size_bytes=args.block_size,
                          requested_size_bytes=args.requested_size, id=args.id, policy=policy)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with vfiouser_vmem.open_server([config], qmp_path=args.qmp) as server:
            device = server.devices[args.id]
            device.subscribe(lambda e: log.info("%s: plugged size now %s", e.device_id,
                                                format_size(e.plugged_size_bytes)), PluggedSizeChanged)
            print(f"host_pressure: {args.id} ready on {args.socket} (max {format_size(args.size)}), {policy!r}"
                  + (f", QMP on {args.qmp}" if args.qmp else ""), flush=True)
            async with trio.open_nursery() as nursery:
                if not args.no_nudge:
                    nursery.start_soon(watch_pressure, device, policy, args.recheck_interval)
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    print(f"host_pressure: {policy.granted} plug(s) granted, {policy.refused} refused", flush=True)


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
