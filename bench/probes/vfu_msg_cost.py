"""Server CPU per vfio-user message, without QEMU.

Starts ``vfiouser-vmem serve`` as its own process (8 GiB device, all of it
requested) and drives it with the tests' pure-Python vfio-user client and
virtio driver (tests/vfio_user_client.py, tests/virtio_driver.py) from this
process: PCI and virtio set-up, then, ``--rounds`` times, ``--count``
operations ``--interval-ms`` apart (5 ms by default: the caches go cold
between them, as between a guest's requests under TCG):

- a PLUG and an UNPLUG of one block (two notify writes; the discard worker
  gives the block back after the second);
- a STATE request (one notify write);
- a read of config_generation (one BAR0 read, as the Linux driver makes
  around every device configuration read).

It prints the server process's CPU time (its CPU-time clock, all threads,
ns) per operation, median of the rounds.  Timings are reported, never
asserted; the figures are the server's, the client's own CPU is not in them.

    .venv/bin/python bench/probes/vfu_msg_cost.py [--count 200] [--rounds 3] [--interval-ms 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import trio  # noqa: E402
from vfio_user_client import VfioUserClient  # noqa: E402
from virtio_driver import ACK, VirtioMemDriver  # noqa: E402

BAR_ADDR = 0x40_0000_0000
BLOCK = 2 << 20


def cpu_seconds(pid: int) -> float:
    # Linux's process CPU-time clock for any pid (clock_getcpuclockid).
    return time.clock_gettime(((~pid) << 3) | 2)


async def measure(sock: str, pid: int, args: argparse.Namespace) -> None:
    with trio.fail_after(30):
        client = await VfioUserClient.connect(sock)
    driver = VirtioMemDriver(client, bar_addr=BAR_ADDR)
    try:
        await driver.initialize()

        async def plug_unplug(i: int) -> None:
            addr = BAR_ADDR + (i % 64) * BLOCK
            assert await driver.plug(addr, 1) == ACK
            assert await driver.unplug(addr, 1) == ACK

        async def state(i: int) -> None:
            await driver.state(BAR_ADDR, 1)

        async def generation(i: int) -> None:
            await driver.config_generation()

        for label, op in (("PLUG + UNPLUG", plug_unplug), ("STATE", state), ("config_generation read", generation)):
            per_op = []
            for _ in range(args.rounds):
                before = cpu_seconds(pid)
                for i in range(args.count):
                    await op(i)
                    await trio.sleep(args.interval_ms / 1000)
                per_op.append((cpu_seconds(pid) - before) / args.count)
            print(f"{label:24} {statistics.median(per_op) * 1e6:7.0f} us of server CPU per operation "
                  f"({args.interval_ms:g} ms apart, median of {args.rounds} x {args.count})")
    finally:
        driver.close()
        client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval-ms", type=float, default=5.0)
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="vmem-msgcost-", dir="/tmp")  # socket paths < 107 bytes
    sock = os.path.join(workdir, "vmem0.sock")
    log = open(os.path.join(workdir, "server.log"), "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "vfiouser_vmem.cli", "serve", "--socket", sock, "--size", "8G",
         "--requested-size", "8G", "--qmp", os.path.join(workdir, "vmem0.qmp")],
        stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        if b"ready" not in server.stdout.readline():
            log.flush()
            print(Path(workdir, "server.log").read_text(errors="replace")[-2000:], file=sys.stderr)
            return 1
        trio.run(measure, sock, server.pid, args)
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
