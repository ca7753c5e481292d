"""QEMU's own in-process virtio-mem-pci, booted like the integration guests.

The same kernel, initramfs, /init and command channel as ``harness.Guest``
(which this reuses: QEMU merges repeated ``-m`` options, so the extra
``-m 1G,maxmem=9G,slots=1`` only adds the device-memory region), plus QEMU's
device and QEMU's own QMP socket:

    -object memory-backend-memfd,id=vmemmem0,size=8G,share=on
    -device virtio-mem-pci,id=vmem0,memdev=vmemmem0,block-size=2M,requested-size=0
    -qmp unix:PATH,server=on,wait=off

``backend_opts`` and ``device_opts`` add QEMU's memory backend and
virtio-mem options to those two (bench/run.py's "Memory backends" rows,
e.g. ``hugetlb=on,hugetlbsize=2M`` and ``prealloc=on``); ``maxmem``
defaults to the guest RAM plus the device's size.

``QemuVmem`` offers the same small surface as ``harness.VmemServer`` (get,
set_requested_size, allocated_bytes, rss) so that the benchmark drives both
devices with one code path.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from harness import Guest, GuestError, Kit  # noqa: E402

from bench.procinfo import cpu_seconds, memfd_allocated_bytes, proc_rss  # noqa: E402
from vfiouser_vmem.control import QmpClient  # noqa: E402
from vfiouser_vmem.errors import QmpError  # noqa: E402
from vfiouser_vmem.util.sizes import format_size, parse_size  # noqa: E402


class QemuVmem:
    """A guest whose virtio-mem device is QEMU's ``virtio-mem-pci``."""

    backend_id = "vmemmem0"

    def __init__(self, kit: Kit, workdir: Path, *, size: str = "8G", block_size: str = "2M", id: str = "vmem0",
                 ram: str = "1G", maxmem: str | None = None, cpus: int = 2, name: str = "qemu-vmem",
                 extra_args: list[str] | None = None, backend_opts: str = "", device_opts: str = "") -> None:
        self.id = id
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.size_bytes = None
        if maxmem is None:
            maxmem = format_size(parse_size(ram) + parse_size(size))
        args = [
            "-m", f"{ram},maxmem={maxmem},slots=1",
            "-object", f"memory-backend-memfd,id={self.backend_id},size={size},share=on"
                       + (f",{backend_opts}" if backend_opts else ""),
            "-device", f"virtio-mem-pci,id={id},memdev={self.backend_id},block-size={block_size},requested-size=0"
                       + (f",{device_opts}" if device_opts else ""),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(extra_args or []),
        ]
        self.guest = Guest(kit, workdir, [], ram=ram, cpus=cpus, extra_args=args, name=name)
        self.qmp: QmpClient | None = None
        self._backend_fd: str | None = None

    @property
    def pid(self) -> int:
        return self.guest.proc.pid

    def connect_qmp(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.qmp = QmpClient(self.qmp_path, timeout_s=30)
                return
            except QmpError as exc:
                # QEMU has not created or opened its socket yet: retried.
                if not isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError):
                    raise
                if self.guest.proc.poll() is not None:
                    raise GuestError(f"QEMU exited with {self.guest.proc.returncode}:\n"
                                     f"{self.guest.qemu_log()}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, prop: str) -> int:
        return self.qmp.execute("qom-get", path=self.id, property=prop)

    def set_requested_size(self, size_bytes: int) -> None:
        self.qmp.execute("qom-set", path=self.id, property="requested-size", value=size_bytes)

    def backend_size_bytes(self) -> int:
        return self.qmp.execute("qom-get", path=f"/objects/{self.backend_id}", property="size")

    def allocated_bytes(self) -> int:
        """The device backend's allocated bytes, read from QEMU's fds.

        QEMU names its memfds after the backend type, not the id, and guest
        RAM is a memfd too: the device's is the one of the backend's size."""
        if self.size_bytes is None:
            self.size_bytes = self.backend_size_bytes()
        return memfd_allocated_bytes(self.pid, size_bytes=self.size_bytes)

    def rss(self) -> dict[str, int]:
        return proc_rss(self.pid)

    def cpu(self) -> dict[str, float]:
        return {"qemu": cpu_seconds(self.pid)}

    def stop(self) -> None:
        try:
            if self.qmp is not None:
                self.qmp.close()
        except OSError:
            pass
        self.guest.stop()
