"""The main job, shown: our server + a real QEMU 11 guest, grown and shrunk.

Run through scripts/demo (which installs what is missing first).  Everything
it starts is stopped at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import MIB, Guest, Kit, VmemServer, short_tmpdir, wait_for  # noqa: E402

from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Grow and shrink a real guest through vfiouser-vmem.")
    parser.add_argument("--size", default="4G", help="device maximum (default 4G)")
    parser.add_argument("--steps", default="1G,2G,0", help="requested sizes to go through (default 1G,2G,0)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args()
    steps = [parse_size(s) for s in args.steps.split(",")]

    kit = Kit.build()
    workdir = short_tmpdir()
    server = guest = None
    try:
        server = VmemServer(workdir, size=args.size)
        say(f"server:  vfiouser-vmem serve --socket {server.socket} --size {args.size} --qmp {server.qmp_path}")
        guest = Guest(kit, workdir, [server.socket])
        say(f"QEMU:    {(kit.dir / 'qemu-version').read_text().strip()}, guest RAM 1G (memfd, share=on), "
            f"-device vfio-user-pci socket={server.socket}")
        kernel = guest.wait_ready(240)
        wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/"), 60, "virtio_mem")
        say(f"guest:   Linux {kernel} booted; virtio_mem bound:")
        for line in guest.dmesg().splitlines():
            if "virtio_mem" in line and any(k in line for k in ("start address", "region size", "block size:")):
                say(f"           {line.split('] ', 1)[-1]}")
        base_kib = guest.meminfo_kib()
        say(f"guest:   MemTotal {base_kib >> 10} MiB\n")
        for target in steps:
            start = time.monotonic()
            server.set_requested_size(target)
            wait_for(lambda: server.get("size") == target, 300, f"size {target}", 0.01)
            device_s = time.monotonic() - start
            wait_for(lambda: guest.meminfo_kib() == base_kib + target // 1024, 300, "MemTotal")
            guest_s = time.monotonic() - start
            say(f"qom-set requested-size {format_size(target):>5}: device size {format_size(server.get('size')):>5} "
                f"after {device_s:5.2f} s, guest MemTotal {guest.meminfo_kib() >> 10} MiB after {guest_s:5.2f} s")
            if target:
                n_mib = max(target // MIB * 8 // 10, 1)
                guest.run(f"mount -o remount,size=8G /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count={n_mib} "
                          "2>/dev/null && rm /tmp/fill")
                say(f"           guest wrote {n_mib} MiB; host backend holds {server.allocated_bytes() >> 20} MiB")
            else:
                say(f"           host backend holds {server.settled_allocated_bytes() >> 20} MiB (unplugged memory given back)")
        say("\nquery-memory-devices: " + str(server.qmp.execute("query-memory-devices")))
        return 0
    finally:
        if guest is not None:
            guest.stop()
        if server is not None:
            server.stop()
            if args.keep:
                say(f"logs kept in {workdir}")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
