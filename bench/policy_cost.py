"""The per-request cost of a Python plug policy, without a guest.

    .venv/bin/python bench/policy_cost.py [--requests 2000] [--rounds 5] [--blocks 64]

The same stream of PLUG and UNPLUG requests (each of ``--blocks`` blocks,
one request per notify, as Linux's driver sends them) is served through a
``VirtioPciTransport`` over simulated guest RAM (a split queue in a
bytearray, reached through ``GuestMemory`` as the server's DMA mappings
are; the approach of tests/test_fastpath.py) in four settings:

- **C path**: ``serve_in_c=True``, no policy (``vmem_serve_queue``);
- **Python path**: ``serve_in_c=False``: the transport pops the chain and
  the model's ``handle_request`` answers;
- **C path + always-ACK policy**: ``serve_in_c=True`` with
  ``device.policy`` set to a policy that answers ACK: while a policy is
  installed PLUG and UNPLUG go to Python (the C path stops at them);
- **C path + MemAvailable policy**: the same with a policy that reads
  ``/proc/meminfo`` for every request and answers ACK while MemAvailable
  is above a floor (what a real host policy would look like).

Per request it times ``process_queue()`` (what the server runs after the
guest's notify) with the request already in the ring; the settings take
turns round by round, so that a drift of the machine's load lands on all.
It prints the median (and p90) per request in microseconds and each
setting's ratio to the C path.  Timings are reported, never asserted.
bench/run.py runs it with the other microbenchmarks.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from vfiouser_vmem import HostMemory, Request, RequestType, Response, VirtioMemDevice  # noqa: E402
from vfiouser_vmem.virtio import VirtioPciTransport  # noqa: E402
from vfiouser_vmem.virtio._pci import PCI_MSIX_FLAGS_ENABLE, VIRTIO_CONFIG_S_DRIVER_OK  # noqa: E402

MIB = 1 << 20
BLOCK = 2 * MIB
BAR_ADDR = 0x40_0000_0000
RAM_IOVA = 0x1_0000_0000
RAM_BYTES = 1 << 20
QSIZE = 128
DESC, AVAIL, USED, BUFS = 0x0000, 0x1000, 0x2000, 0x4000
MSIX_CAP = 0x40
F_NEXT, F_WRITE = 1, 2
PLUG, UNPLUG = int(RequestType.PLUG), int(RequestType.UNPLUG)


class AlwaysAck:
    """The cheapest policy there is: its cost is the Python path's."""

    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        return Response.ACK


class MemAvailablePolicy:
    """ACK while the host's MemAvailable is above ``floor_kib``, else NACK
    a PLUG (BUSY an UNPLUG never: giving memory back is always welcome):
    one read of /proc/meminfo per request."""

    def __init__(self, floor_kib: int = 0) -> None:
        self.floor_kib = floor_kib

    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        if request.type != PLUG:
            return Response.ACK
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return Response.ACK if int(line.split()[1]) > self.floor_kib else Response.NACK
        return Response.ACK


class SimulatedGuest:
    """A driver posting one request at a time into simulated guest RAM, and
    the device (transport + model) serving it (tests/test_fastpath.py's
    ``Guest``, cut down to the plain two-descriptor chain)."""

    def __init__(self, *, in_c: bool, policy=None, blocks: int = 64) -> None:
        region = max(4 * blocks, 64) * BLOCK
        self.ram = bytearray(RAM_BYTES)
        self.device = VirtioMemDevice(region_size_bytes=region, block_size_bytes=BLOCK,
                                      requested_size_bytes=region, host_memory=HostMemory())
        self.device.policy = policy
        cfg = bytearray(256)
        struct.pack_into("<II", cfg, 0x10 + 4 * 2, BAR_ADDR & 0xFFFFFFFF | 0xC, BAR_ADDR >> 32)
        struct.pack_into("<H", cfg, MSIX_CAP + 2, PCI_MSIX_FLAGS_ENABLE)
        self.interrupts = 0
        self.transport = VirtioPciTransport(self.device, config_space=lambda: memoryview(cfg),
                                            trigger=self._interrupt, msix_cap_offset=MSIX_CAP)
        self.transport.serve_in_c = in_c
        self.transport.memory.add(RAM_IOVA, RAM_BYTES, memoryview(self.ram))
        q = self.transport.queue
        q.size, q.enabled, q.msix_vector = QSIZE, True, 1
        q.desc_addr, q.driver_addr, q.device_addr = RAM_IOVA + DESC, RAM_IOVA + AVAIL, RAM_IOVA + USED
        self.transport.status = VIRTIO_CONFIG_S_DRIVER_OK
        self.avail_idx = 0
        self.blocks = blocks
        self.plugged = False

    def _interrupt(self, vector: int) -> None:
        self.interrupts += 1

    def post_next(self) -> int:
        """The stream's next request (PLUG, then UNPLUG of the same range,
        and so on) into the ring; returns its type."""
        kind = UNPLUG if self.plugged else PLUG
        self.plugged = not self.plugged
        slot = self.avail_idx % QSIZE
        head, resp = 2 * slot % QSIZE, (2 * slot + 1) % QSIZE
        req_off, resp_off = BUFS + 64 * slot, BUFS + 64 * slot + 32
        self.ram[req_off:req_off + 24] = struct.pack("<H6xQH6x", kind, BAR_ADDR, self.blocks)
        struct.pack_into("<QIHH", self.ram, DESC + 16 * head, RAM_IOVA + req_off, 24, F_NEXT, resp)
        struct.pack_into("<QIHH", self.ram, DESC + 16 * resp, RAM_IOVA + resp_off, 10, F_WRITE, 0)
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)
        return kind

    def serve(self) -> int:
        """The guest's notify, then what the server runs after the message."""
        self.transport.kick_pending = True
        return self.transport.process_queue()

    def last_response(self) -> int:
        slot = (self.avail_idx - 1) % QSIZE
        return struct.unpack_from("<H", self.ram, BUFS + 64 * slot + 32)[0]


#: (key, label, guest factory)
SETTINGS: list[tuple[str, str, Callable[[int], SimulatedGuest]]] = [
    ("c", "C path (serve_in_c, no policy)", lambda b: SimulatedGuest(in_c=True, blocks=b)),
    ("python", "Python path (serve_in_c=False)", lambda b: SimulatedGuest(in_c=False, blocks=b)),
    ("ack_policy", "C path + always-ACK Python policy",
     lambda b: SimulatedGuest(in_c=True, policy=AlwaysAck(), blocks=b)),
    ("meminfo_policy", "C path + policy reading /proc/meminfo",
     lambda b: SimulatedGuest(in_c=True, policy=MemAvailablePolicy(), blocks=b)),
]


def bench_policy_cost(*, requests: int = 2000, rounds: int = 5, blocks: int = 64) -> dict:
    """Seconds per request of each setting (``SETTINGS``): ``requests``
    requests per round and setting, the settings in turn each round."""
    guests = {key: make(blocks) for key, _, make in SETTINGS}
    times: dict[str, dict[str, list[float]]] = {key: {"PLUG": [], "UNPLUG": []} for key in guests}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for key, guest in guests.items():
            per_type = times[key]
            for _ in range(requests):
                kind = guest.post_next()
                started = clock()
                handled = guest.serve()
                elapsed = clock() - started
                if handled != 1 or guest.last_response() != 0:
                    raise AssertionError(f"{key}: request {kind} handled {handled}, answered "
                                         f"{guest.last_response()} (expected one ACK)")
                per_type["PLUG" if kind == PLUG else "UNPLUG"].append(elapsed * 1e-9)
    return {"requests": requests, "rounds": rounds, "blocks": blocks, "block_bytes": BLOCK,
            "labels": {key: label for key, label, _ in SETTINGS}, "times": times}


def summary(result: dict) -> list[dict]:
    """Per setting: median and p90 per request (PLUG and UNPLUG pooled and
    apart), in seconds, and the ratio of medians to the C path."""
    out = []
    base = None
    for key, per_type in result["times"].items():
        pooled = per_type["PLUG"] + per_type["UNPLUG"]
        row = {"key": key, "label": result["labels"][key], "n": len(pooled),
               "median": report.percentile(pooled, 50), "p90": report.percentile(pooled, 90),
               "plug": report.percentile(per_type["PLUG"], 50), "unplug": report.percentile(per_type["UNPLUG"], 50)}
        if key == "c":
            base = row["median"]
        row["ratio"] = report.ratio(row["median"], base)
        out.append(row)
    return out


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def table(result: dict) -> str:
    rows = [[r["label"], _us(r["median"]), _us(r["p90"]), _us(r["plug"]), _us(r["unplug"]),
             report.fmt_ratio(r["ratio"])] for r in summary(result)]
    return (f"Per-request cost of a Python plug policy: `process_queue()` serving one request of {result['blocks']} "
            f"blocks of {result['block_bytes'] >> 20} MiB (PLUG, UNPLUG alternating), no guest; "
            f"{result['rounds']} rounds x {result['requests']} requests per setting\n\n"
            + report.markdown_table(["request path", "median us", "p90 us", "PLUG median us", "UNPLUG median us",
                                     "/ C path"], rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per round and setting (default 2000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, the settings in turn (default 5)")
    p.add_argument("--blocks", type=int, default=64, help="blocks per request (default 64: Linux's 128 MiB)")
    args = p.parse_args(argv)
    print(table(bench_policy_cost(requests=args.requests, rounds=args.rounds, blocks=args.blocks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
