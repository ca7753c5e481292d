"""QEMU's memory backend options with a real QEMU 11 and a real guest.

``--object memory-backend-memfd,...`` (huge pages, ``reserve``, ``dump``,
``policy``/``host-nodes``), ``--object memory-backend-file,...`` (a
directory on hugetlbfs, a file on tmpfs), the device's ``prealloc=on``, and
a device whose size is not a power of two (only the device's part of the
BAR is mmap-able; the rest traps to the server).

Each test is checked on both sides: the guest's (MemTotal, its own writes)
and the host's (the backend file's allocated bytes through the server's fd,
/proc/meminfo's HugePages_*, the mappings in /proc/PID/maps, smaps and
numa_maps of QEMU and the server).

Everything a test changes on the host is undone by the ``host`` fixture,
also when the test fails, in this order: the guests and servers are stopped
(by PID), the filesystems it mounted are unmounted, and
/proc/sys/vm/nr_hugepages gets its old value back, under the lock every
user of the pool takes (integration/hugepages.py: the benchmarks change it too).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import hugepages
import pytest
from vfiouser_vmem.util.hostmem import default_huge_page_size
from harness import (
    GIB,
    MIB,
    Guest,
    GuestError,
    ServerProcess,
    node_failed,
    open_files,
    stop_and_report,
    stop_process,
    wait_for,
)

BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180
HUGE_PAGE = 2 * MIB
#: The PCI device ID of a modern virtio-mem function (0x1040 + virtio device id 24).
VIRTIO_MEM_PCI_ID = "0x1058"


# ---------------------------------------------------------------------------
# What the host says


def hugepages_meminfo() -> dict[str, int]:
    """HugePages_Total/Free/Rsvd/Surp of /proc/meminfo (the default huge page
    size's pool, the one /proc/sys/vm/nr_hugepages sizes)."""
    counts = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_"):
            name, value = line.split(":")
            counts[name[len("HugePages_"):]] = int(value)
    return counts


def open_file(pid: int, match) -> os.stat_result:
    """The stat of the one file ``pid`` holds open whose /proc/PID/fd link
    target satisfies ``match`` (a file may be open more than once:
    libvfio-user keeps its own fd of a region)."""
    found: dict[int, os.stat_result] = {}
    for target, st in open_files(pid):
        if match(target):
            found[st.st_ino] = st
    if len(found) != 1:
        raise LookupError(f"{len(found)} files among the fds of PID {pid} match (want 1)")
    return next(iter(found.values()))


def memfd_of(dev: str):
    """A /proc/PID/fd (or maps) target of the memfd of device ``dev``: the
    link reads "/memfd:vfiouser-vmem:vm0 (deleted)"; vm0 must not match vm01."""
    return lambda target: target.startswith(f"/memfd:vfiouser-vmem:{dev} ")


def under(directory: Path):
    """A target of a file in ``directory`` (possibly unlinked: "... (deleted)")."""
    return lambda target: target.startswith(f"{directory}/")


def mappings(pid: int, match) -> list[dict]:
    """The mappings of ``pid`` (/proc/PID/smaps) whose file satisfies
    ``match``: start, end, length, perms, path, the smaps fields in kB
    (Rss, ...) and VmFlags."""
    found: list[dict] = []
    current: dict | None = None
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$")
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = header.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            current = {"start": start, "end": end, "length": end - start, "perms": m.group(3),
                       "path": m.group(4)}
            if match(current["path"]):
                found.append(current)
            continue
        if current is None:
            continue
        name, _, value = line.partition(":")
        if name == "VmFlags":
            current["VmFlags"] = value.split()
        elif value.strip().endswith(" kB"):
            current[name] = int(value.split()[0])
    return found


def resident_bytes(mapping: dict) -> int:
    """What a mapping has resident: Rss, or for huge pages (which smaps
    counts apart) Shared_Hugetlb + Private_Hugetlb."""
    return (mapping.get("Rss", 0) + mapping.get("Shared_Hugetlb", 0) + mapping.get("Private_Hugetlb", 0)) * 1024


def numa_maps_lines(pid: int, dev: str) -> list[str]:
    """The /proc/PID/numa_maps lines of the memfd of ``dev`` (a space in the
    file name is written \\040)."""
    pattern = re.compile(rf"file=/memfd:vfiouser-vmem:{re.escape(dev)}(\\040| |$)")
    return [line for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines() if pattern.search(line)]


def df_used_bytes(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def steady(read, what: str, timeout_s: float = 30):
    """``read()`` once two reads in a row agree: several counters read at
    one moment while another process (a guest) may be changing them."""
    last = [read()]

    def agree():
        value = read()
        if value == last[0]:
            return (value,)  # truthy even when the value is not
        last[0] = value
        return None

    return wait_for(agree, timeout_s, what)[0]


# ---------------------------------------------------------------------------
# The server, the guests, and the fixture that undoes everything


class BackendServer(ServerProcess):
    """``vfiouser-vmem serve --object ... --device ...`` with metrics.

    ``devices`` maps a device id to (its backend's options, more device
    options); the i-th device's backend is ``mem<i>``, its socket
    ``<id>.sock`` in ``workdir``."""

    def __init__(self, workdir: Path, name: str, devices: dict[str, tuple[str, str]],
                 extra: list[str] | None = None) -> None:
        argv = ["--metrics", "127.0.0.1:0"]
        self.sockets: dict[str, str] = {}
        for i, (dev, (backend, options)) in enumerate(devices.items()):
            self.sockets[dev] = str(workdir / f"{dev}.sock")
            device = f"id={dev},memdev=mem{i},socket={self.sockets[dev]}" + (f",{options}" if options else "")
            argv += ["--object", f"{backend},id=mem{i}", "--device", device]
        try:
            super().__init__(workdir, name, argv + (extra or []))
        except BaseException:
            # Started but not handed to the caller (its QMP did not answer):
            # stopped here, by PID.
            if hasattr(self, "proc"):
                stop_process(self.proc)
                self.log_file.close()
            raise
        m = re.search(r"metrics on (http://\S+)", self.first_line)
        if not m:
            self.stop()
            raise GuestError(f"no metrics address in {self.first_line!r}")
        self.metrics_url = m.group(1)

    def get(self, dev: str, prop: str):
        return self.qmp.execute("qom-get", path=dev, property=prop)

    def backend_prop(self, memdev: str, prop: str):
        return self.qmp.execute("qom-get", path=f"/objects/{memdev}", property=prop)

    def set_requested_size(self, dev: str, size_bytes: int) -> None:
        self.qmp.execute("qom-set", path=dev, property="requested-size", value=size_bytes)

    def settle(self, dev: str) -> None:
        """Until the memory of every answered UNPLUG is back with the host
        (the server discards after answering: QOM discard-pending)."""
        wait_for(lambda: self.get(dev, "discard-pending") == 0, 60, f"{dev}'s deferred discards to finish")

    def backend_file(self, match) -> os.stat_result:
        return open_file(self.proc.pid, match)

    def requests(self, dev: str, kind: str, response: str) -> float:
        """vfiouser_vmem_requests_total{id=dev,type=kind,response=response}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=30) as reply:
            body = reply.read().decode()
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if (s.name == "vfiouser_vmem_requests_total"
                        and s.labels == {"id": dev, "type": kind, "response": response}):
                    return s.value
        return 0.0


class Host:
    """Servers, guests, mounts and the huge page pool of one test; ``cleanup``
    undoes all of it (see the module docstring for the order)."""

    def __init__(self, kit, workdir: Path) -> None:
        self.kit = kit
        self.workdir = workdir
        self.started: list = []
        self.mounts: list[Path] = []
        #: The huge page pool this test took (integration/hugepages.py), undone at cleanup.
        self.pool: contextlib.AbstractContextManager | None = None

    # -- processes ------------------------------------------------------
    def server(self, name: str, devices: dict[str, tuple[str, str]], extra: list[str] | None = None) -> BackendServer:
        s = BackendServer(self.workdir, name, devices, extra)
        self.started.append(s)
        return s

    def guest(self, sockets: list[str], **kw) -> Guest:
        g = Guest(self.kit, self.workdir, sockets, **kw)
        self.started.append(g)
        return g

    # -- filesystems ----------------------------------------------------
    def mount(self, fstype: str, options: str) -> Path:
        """``mount -t FSTYPE -o OPTIONS none DIR`` on a new directory; unmounted at cleanup."""
        directory = Path(tempfile.mkdtemp(prefix=f"vmem-{fstype}-", dir="/tmp"))
        try:
            subprocess.run(["mount", "-t", fstype, "-o", options, "none", str(directory)], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            directory.rmdir()
            raise RuntimeError(f"mount -t {fstype} -o {options}: {exc.stderr.strip()}") from None
        self.mounts.append(directory)
        return directory

    # -- huge pages ----------------------------------------------------
    def need_huge_pages(self, pages: int) -> dict[str, int]:
        """Make ``pages`` huge pages of the default size available (free and
        not reserved) for the rest of the test: the pool grows by what is
        short, under the lock every user of the pool takes, and gets its old
        size back at cleanup (integration/hugepages.py); returns the pool as
        it then is."""
        if (default_huge_page_size() or 0) != HUGE_PAGE:
            pytest.skip(f"the default huge page size is {default_huge_page_size()} bytes, not 2 MiB")
        assert self.pool is None, "need_huge_pages once per test"
        pool = hugepages_meminfo()
        short = max(0, pages - (pool["Free"] - pool["Rsvd"]))
        self.pool = hugepages.pool_of(short, say=lambda line: print(line, file=sys.stderr))
        self.pool.__enter__()
        pool = hugepages_meminfo()
        if pool["Free"] - pool["Rsvd"] < pages:
            pytest.fail(f"asked for {pages} available huge pages, the kernel gave {pool} (fragmented memory?)")
        return pool

    # -- undo everything -----------------------------------------------
    def cleanup(self, failed: bool) -> None:
        errors: list[str] = []
        for thing in reversed(self.started):
            try:
                stop_and_report(thing, failed)
            except Exception as exc:  # keep undoing the rest
                errors.append(f"stopping {thing!r}: {exc!r}")
        for directory in reversed(self.mounts):
            result = subprocess.run(["umount", str(directory)], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"umount {directory}: {result.stderr.strip()}; detached instead (umount -l)")
                subprocess.run(["umount", "-l", str(directory)], capture_output=True)
            try:
                directory.rmdir()
            except OSError as exc:
                errors.append(f"rmdir {directory}: {exc}")
        if self.pool is not None:
            try:
                self.pool.__exit__(None, None, None)  # nr_hugepages back, then the lock released
            except Exception as exc:
                errors.append(f"restoring nr_hugepages: {exc!r}")
        if errors:
            raise RuntimeError("cleanup: " + "; ".join(errors))


@pytest.fixture
def host(request, kit, workdir):
    h = Host(kit, workdir)
    try:
        yield h
    finally:
        h.cleanup(node_failed(request))


# ---------------------------------------------------------------------------
# The guest side


def boot(host: Host, server: BackendServer, **kw) -> tuple[Guest, int]:
    """A guest with every device of ``server``; returns it and its MemTotal (kB)
    once virtio_mem is bound to all of them."""
    guest = host.guest(list(server.sockets.values()), **kw)
    guest.wait_ready(BOOT_TIMEOUT_S)
    # /tmp (tmpfs) is where the guest writes to its memory.
    guest.run("mount -o remount,size=8G /tmp")
    n = len(server.sockets)
    wait_for(lambda: guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ | grep -c '^virtio' || true").strip()
             == str(n), 60, f"virtio_mem to bind {n} device(s)")
    # The base is MemTotal without the devices' memory: none is plugged yet.
    assert all(server.get(dev, "size") == 0 for dev in server.sockets)
    return guest, guest.meminfo_kib()


def resize(guest: Guest, server: BackendServer, dev: str, size_bytes: int, base_kib: int) -> None:
    """Ask for ``size_bytes``; wait until the device has plugged it and the
    guest's MemTotal shows it (``base_kib`` plus every device's size)."""
    server.set_requested_size(dev, size_bytes)
    try:
        wait_for(lambda: server.get(dev, "size") == size_bytes, RESIZE_TIMEOUT_S, f"{dev} size {size_bytes}")
        wait_memtotal(guest, server, base_kib)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {dev} size {server.get(dev, 'size')}, guest MemTotal {guest.meminfo_kib()} kB "
                           f"(base {base_kib} kB)\n{guest.run('dmesg | tail -30')}") from None


def wait_memtotal(guest: Guest, server: BackendServer, base_kib: int) -> None:
    """Until the guest's MemTotal is its base plus what its devices plugged."""
    def plugged_kib() -> int:
        return sum(server.get(dev, "size") for dev in server.sockets) // 1024

    wait_for(lambda: guest.meminfo_kib() == base_kib + plugged_kib(), RESIZE_TIMEOUT_S,
             "the guest's MemTotal to show the plugged memory")


def touch(guest: Guest, mib: int) -> None:
    """Write ``mib`` MiB in the guest: tmpfs pages are movable allocations,
    which prefer ZONE_MOVABLE, where the plugged memory was onlined."""
    guest.run(f"dd if=/dev/zero of=/tmp/fill bs=1M count={mib} 2>/dev/null")


def untouch(guest: Guest) -> None:
    guest.run("rm -f /tmp/fill")


def assert_no_driver_errors(guest: Guest) -> None:
    bad = [line for line in guest.dmesg().splitlines()
           if "virtio_mem" in line and any(w in line.lower() for w in ("error", "fail", "broken", "could not"))]
    assert not bad, "\n".join(bad)


def assert_qemu_maps(guest: Guest, match, length: int) -> None:
    """QEMU mapped the device's memory (one shared mapping of ``length``): its
    accesses go straight to the backend, none trap to the server."""
    maps = mappings(guest.proc.pid, match)
    assert [(m["length"], m["perms"]) for m in maps] == [(length, "rw-s")], maps
    assert "Failed to mmap" not in guest.qemu_log(), guest.qemu_log()


# ---------------------------------------------------------------------------
# 1. memory-backend-memfd with huge pages


@pytest.mark.parametrize("reserve", ["on", "off"])
def test_hugetlb_memfd_grows_touches_shrinks_and_gives_every_huge_page_back(host, reserve):
    pages = GIB // HUGE_PAGE
    host.need_huge_pages(pages)
    rsvd: dict[str, int] = {}
    free: dict[str, int] = {}

    def record(when: str) -> dict[str, int]:
        pool = hugepages_meminfo()
        rsvd[when], free[when] = pool["Rsvd"], pool["Free"]
        return pool

    before = record("before server start")
    server = host.server("hp", {"vm0": (f"memory-backend-memfd,size=1G,hugetlb=on,hugetlbsize=2M,reserve={reserve}",
                                        "")})
    record("after server start")
    assert {p: server.backend_prop("mem0", p) for p in ("hugetlb", "hugetlbsize", "reserve", "size")} == {
        "hugetlb": True, "hugetlbsize": HUGE_PAGE, "reserve": reserve == "on", "size": GIB}
    # QEMU's default block size on huge pages: the huge page size.
    assert server.get("vm0", "block-size") == HUGE_PAGE
    memfd = memfd_of("vm0")
    assert server.backend_file(memfd).st_size == GIB

    guest, base_kib = boot(host, server)
    record("after QEMU attach")
    assert_qemu_maps(guest, memfd, GIB)

    resize(guest, server, "vm0", GIB, base_kib)
    record("after grow to 1G")
    touch(guest, 900)
    # The pool and the file read at one moment (the guest's own processes
    # may still fault in a page of the plugged memory).
    touched, allocated = steady(lambda: (hugepages_meminfo(), server.backend_file(memfd).st_blocks * 512),
                                "the huge page pool and the backend to agree")
    record("after touching 900M")
    assert allocated >= 600 * MIB, f"the guest's writes reached only {allocated >> 20} MiB of the backend"
    assert allocated % HUGE_PAGE == 0
    # The backend's memory is exactly the huge pages gone from the pool, and
    # each page faulted in used up one page of the file's reservation.
    assert before["Free"] - touched["Free"] == allocated // HUGE_PAGE, (before, touched, allocated)
    assert touched["Rsvd"] + allocated // HUGE_PAGE == before["Rsvd"] + pages, (before, touched, allocated)

    untouch(guest)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    shrunk = record("after shrink to 0")
    assert server.backend_file(memfd).st_blocks == 0
    assert shrunk["Free"] == before["Free"], f"huge pages not back in the pool after the shrink: {before} -> {shrunk}"
    if reserve == "on":
        # The discard dropped the reservation of the pages it freed; the
        # server reserved the range again.
        assert shrunk["Rsvd"] == before["Rsvd"] + pages, (before, shrunk)
    assert_no_driver_errors(guest)

    guest.stop()
    record("after QEMU exit")
    assert server.stop() == 0, server.log()
    after = record("after server exit")
    print(f"reserve={reserve}: HugePages_Rsvd " + ", ".join(f"{k}: {v}" for k, v in rsvd.items()))
    print(f"reserve={reserve}: HugePages_Free " + ", ".join(f"{k}: {v}" for k, v in free.items()))
    # QEMU's mmap of the BAR (hw/vfio/region.c: MAP_SHARED, no MAP_NORESERVE)
    # reserves the backend's huge pages: with reserve=on the file already
    # holds the reservation, with reserve=off this is where it happens.
    assert rsvd["after QEMU attach"] == before["Rsvd"] + pages, rsvd
    assert rsvd["after server start"] == before["Rsvd"] + (pages if reserve == "on" else 0), rsvd
    # Nothing is left reserved or taken once the server is gone.
    assert after["Rsvd"] == before["Rsvd"], rsvd
    assert after["Free"] == before["Free"] and after["Total"] == before["Total"], (before, after)


# ---------------------------------------------------------------------------
# 2. memory-backend-file on hugetlbfs and on tmpfs


@pytest.mark.parametrize("fs", ["hugetlbfs", "tmpfs"])
def test_file_backend_grows_touches_shrinks_and_gives_memory_back(host, fs):
    if fs == "hugetlbfs":
        host.need_huge_pages(GIB // HUGE_PAGE)
        mnt = host.mount("hugetlbfs", "pagesize=2M")
        # A directory: the server makes a file in it and unlinks it at once (as QEMU).
        mem_path = str(mnt)
    else:
        mnt = host.mount("tmpfs", "size=2G")
        # A file: created (it does not exist), used, and kept.
        mem_path = str(mnt / "vm0.mem")
    pool_before = hugepages_meminfo()
    server = host.server("file", {"vm0": (f"memory-backend-file,size=1G,mem-path={mem_path},share=on", "")})
    assert server.backend_prop("mem0", "mem-path") == mem_path
    assert server.backend_prop("mem0", "share") is True
    backend = under(mnt)
    st = server.backend_file(backend)
    assert st.st_size == GIB and st.st_blocks == 0
    if fs == "hugetlbfs":
        assert os.listdir(mnt) == [], "the file made in a mem-path directory is unlinked"
        assert st.st_blksize == HUGE_PAGE
    else:
        assert os.listdir(mnt) == ["vm0.mem"]

    def allocated() -> int:
        return server.backend_file(backend).st_blocks * 512

    def host_view() -> int:
        """The filesystem's own count of the memory in use."""
        if fs == "tmpfs":
            return df_used_bytes(mnt)
        return (pool_before["Free"] - hugepages_meminfo()["Free"]) * HUGE_PAGE

    guest, base_kib = boot(host, server)
    assert_qemu_maps(guest, backend, GIB)
    resize(guest, server, "vm0", GIB, base_kib)
    touch(guest, 900)
    touched, counted = steady(lambda: (allocated(), host_view()), "the file and the filesystem to agree")
    print(f"{fs}: the guest wrote 900M; the file holds {touched >> 20} MiB, the filesystem counts "
          f"{counted >> 20} MiB")
    assert touched >= 600 * MIB, f"the guest's writes reached only {touched >> 20} MiB of the backend"
    assert counted == touched
    # QEMU's mapping of the file is where the guest's memory is.
    assert resident_bytes(mappings(guest.proc.pid, backend)[0]) >= touched // 2

    untouch(guest)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated() == 0
    assert host_view() == 0
    assert_no_driver_errors(guest)

    guest.stop()
    assert server.stop() == 0, server.log()
    if fs == "hugetlbfs":
        after = hugepages_meminfo()
        assert (after["Free"], after["Rsvd"]) == (pool_before["Free"], pool_before["Rsvd"]), (pool_before, after)
        assert os.listdir(mnt) == []
    else:
        # The file the server created stays, holding no memory.
        st = os.stat(mnt / "vm0.mem")
        assert (st.st_size, st.st_blocks) == (GIB, 0)
        assert df_used_bytes(mnt) == 0


# ---------------------------------------------------------------------------
# 3. prealloc=on when the host runs out of memory


WARNING_RE = re.compile(r"WARNING .*vm0: prealloc=on: .*PLUGs are answered BUSY")


def prealloc_until_full(host: Host, device: str, tmpfs: str) -> tuple[Path, BackendServer, Guest, int]:
    """A prealloc=on device of size ``device`` on a file in a tmpfs of size
    ``tmpfs``, its guest asked for all of it, until the first PLUG the
    tmpfs has no room for was answered BUSY."""
    mnt = host.mount("tmpfs", f"size={tmpfs}")
    server = host.server("prealloc", {"vm0": (f"memory-backend-file,size={device},mem-path={mnt}/vm0.mem,share=on",
                                              "prealloc=on")})
    guest, base_kib = boot(host, server)
    server.set_requested_size("vm0", server.get("vm0", "max-size"))
    wait_for(lambda: WARNING_RE.search(server.log()), RESIZE_TIMEOUT_S, "the prealloc WARNING")
    return mnt, server, guest, base_kib


def test_prealloc_answers_busy_when_the_tmpfs_is_full_and_plugs_the_rest_once_it_grows(host):
    mnt, server, guest, base_kib = prealloc_until_full(host, "1G", "512M")
    backend = under(mnt)

    def allocated() -> int:
        return server.backend_file(backend).st_blocks * 512

    busy = server.requests("vm0", "plug", "busy")
    assert busy >= 1
    plugged = server.get("vm0", "size")
    print(f"tmpfs of 512M full: {plugged >> 20} MiB plugged, {busy:.0f} PLUG(s) answered BUSY")
    assert 128 * MIB <= plugged <= 512 * MIB, plugged
    # What a failed PLUG had allocated was punched back: the file holds
    # exactly the plugged blocks.
    assert allocated() == plugged
    assert df_used_bytes(mnt) == plugged

    # The guest and QEMU live on, and the guest uses what it got.
    wait_memtotal(guest, server, base_kib)
    touch(guest, plugged * 3 // 4 // MIB)
    qemu_rss = resident_bytes(mappings(guest.proc.pid, backend)[0])
    print(f"guest wrote {plugged * 3 // 4 >> 20} MiB; QEMU's mapping of the file has {qemu_rss >> 20} MiB resident")
    assert qemu_rss >= plugged // 2, "the guest's writes did not reach the plugged memory"
    assert server.get("vm0", "size") == plugged
    assert allocated() == plugged

    # A config change before there is room (requested-size 2M less, which
    # the guest cannot reach either): it retries at once, is refused again,
    # and that is the same episode (no second WARNING).
    server.set_requested_size("vm0", GIB - HUGE_PAGE)
    wait_for(lambda: server.requests("vm0", "plug", "busy") > busy, 30, "the guest's retried PLUG")
    assert server.get("vm0", "size") == plugged
    assert allocated() == plugged
    assert server.alive() and guest.proc.poll() is None

    # Room for all of it: a config change makes the guest retry, and it
    # plugs the rest (the nudge with the same value, as QEMU's, is
    # test_requested_size_set_to_the_same_value_makes_the_guest_retry_at_once).
    subprocess.run(["mount", "-o", "remount,size=2G", str(mnt)], check=True)
    start = time.monotonic()
    server.set_requested_size("vm0", GIB)
    wait_for(lambda: server.get("vm0", "size") == GIB, RESIZE_TIMEOUT_S, "1G plugged after the remount")
    print(f"after the remount: 1G plugged {time.monotonic() - start:.2f} s after the nudge")
    wait_memtotal(guest, server, base_kib)
    assert allocated() == GIB
    log = server.log()
    assert len(WARNING_RE.findall(log)) == 1, log
    assert "prealloc=on: PLUGs are allocated again" in log, log
    assert server.alive() and guest.proc.poll() is None

    untouch(guest)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert allocated() == 0
    assert df_used_bytes(mnt) == 0
    assert_no_driver_errors(guest)


def config_interrupts(guest: Guest) -> int:
    """The guest's count of virtio-mem config change interrupts (MSI-X vector "virtio0-config")."""
    (line,) = [line for line in guest.run("cat /proc/interrupts").splitlines() if line.endswith("virtio0-config")]
    return sum(int(field) for field in line.split()[1:] if field.isdigit())


def test_requested_size_set_to_the_same_value_makes_the_guest_retry_at_once(host):
    """QEMU notifies the guest on every qom-set of requested-size, "even if
    the size didn't change" (hw/virtio/virtio-mem.c); Linux's virtio_mem
    retries at once on a config interrupt instead of waiting for its retry
    timer (at least 50 s after a BUSY): the operator's nudge after giving
    the host more memory."""
    mnt, server, guest, base_kib = prealloc_until_full(host, "512M", "256M")
    plugged = server.get("vm0", "size")
    assert plugged <= 256 * MIB
    subprocess.run(["mount", "-o", "remount,size=1G", str(mnt)], check=True)
    interrupts = config_interrupts(guest)
    server.set_requested_size("vm0", 512 * MIB)  # the value it has
    # A real interrupt arrives in milliseconds, the guest's retry timer
    # only 50 s after the BUSY: 20 s tell them apart.  The interrupt is
    # what makes the guest retry; the retry itself may take its time.
    wait_for(lambda: config_interrupts(guest) > interrupts, 20, "the guest to get a config interrupt")
    wait_for(lambda: server.get("vm0", "size") == 512 * MIB, RESIZE_TIMEOUT_S, "the guest's retry to plug the rest")
    wait_memtotal(guest, server, base_kib)


# ---------------------------------------------------------------------------
# 4. NUMA policy and dump on a memfd


def test_policy_bind_and_dump_show_on_the_mappings(host):
    server = host.server("numa", {
        "vm0": ("memory-backend-memfd,size=1G,policy=bind,host-nodes=0", ""),  # dump=off, the default
        "vm1": ("memory-backend-memfd,size=1G,dump=on", ""),
    })
    assert [server.backend_prop("mem0", p) for p in ("policy", "host-nodes", "dump")] == ["bind", [0], False]
    assert [server.backend_prop("mem1", p) for p in ("policy", "host-nodes", "dump")] == ["default", [], True]
    guest, base_kib = boot(host, server)
    resize(guest, server, "vm0", 512 * MIB, base_kib)
    touch(guest, 400)
    assert server.backend_file(memfd_of("vm0")).st_blocks * 512 >= 200 * MIB

    qemu, me = guest.proc.pid, server.proc.pid
    for pid, who in ((qemu, "QEMU"), (me, "the server")):
        vm0, vm1 = numa_maps_lines(pid, "vm0"), numa_maps_lines(pid, "vm1")
        print(f"{who} numa_maps:\n  " + "\n  ".join(vm0 + vm1))
        assert len(vm0) == 1 and len(vm1) == 1, (vm0, vm1)
        # The policy is the memfd's (shmem keeps it on the file), so QEMU's
        # mapping shows it too; the guest's writes landed on node 0.
        assert vm0[0].split()[1] == "bind:0", vm0
        assert vm1[0].split()[1] == "default", vm1
    assert re.search(r" N0=\d+", numa_maps_lines(qemu, "vm0")[0])

    # dump=off: MADV_DONTDUMP on the server's mapping ("dd"); dump=on: not.
    (vm0_map,) = mappings(me, memfd_of("vm0"))
    (vm1_map,) = mappings(me, memfd_of("vm1"))
    print(f"server VmFlags: vm0 {' '.join(vm0_map['VmFlags'])}; vm1 {' '.join(vm1_map['VmFlags'])}")
    assert "dd" in vm0_map["VmFlags"]
    assert "dd" not in vm1_map["VmFlags"]
    assert (vm0_map["length"], vm1_map["length"]) == (GIB, GIB)

    untouch(guest)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert server.backend_file(memfd_of("vm0")).st_blocks == 0
    assert_no_driver_errors(guest)


# ---------------------------------------------------------------------------
# 5. A device that is not a power of two: the BAR's tail traps


def test_3g_device_in_a_4g_bar_tail_reads_zeros_drops_writes_holds_no_memory(host):
    # --log-level debug: libvfio-user logs every region access it serves
    # ("region2: wrote 0x... to (OFFSET:COUNT)"), so the log shows which
    # accesses to the memory BAR trapped to the server.
    server = host.server("tail", {"vm0": ("memory-backend-memfd,size=3G", "")}, extra=["--log-level", "debug"])
    memfd = memfd_of("vm0")
    assert server.backend_file(memfd).st_size == 3 * GIB
    guest, base_kib = boot(host, server)
    dmesg = guest.dmesg()
    assert "region size: 0xc0000000" in dmesg, dmesg
    # Only the device's 3G of the 4G BAR is mapped.
    assert_qemu_maps(guest, memfd, 3 * GIB)

    # The memory BAR as the guest's PCI core placed it (sysfs "resource",
    # line 3: BAR2's start, end, flags).
    out = guest.run("for d in /sys/bus/pci/devices/*; do if [ \"$(cat $d/device)\" = " + VIRTIO_MEM_PCI_ID +
                    " ]; then echo $d $(sed -n 3p $d/resource); fi; done")
    (line,) = out.strip().splitlines()
    _, start, end, _ = line.split()
    bar, bar_end = int(start, 16), int(end, 16)
    assert bar_end - bar + 1 == 4 * GIB, line
    assert server.get("vm0", "memaddr") == bar

    # The guest writes past 3G through the BAR (busybox devmem: /dev/mem,
    # uncached: each access traps in QEMU), and reads back zeros.
    tail = [3 * GIB, 3 * GIB + 4096, 3 * GIB + 512 * MIB + 8, 4 * GIB - 8]

    def write_and_read_the_tail() -> None:
        for offset in tail:
            guest.run(f"devmem {bar + offset:#x} 64 0x5a5a5a5a5a5a5a5a")
        for offset in tail:
            assert int(guest.run(f"devmem {bar + offset:#x} 64").strip(), 16) == 0, hex(offset)
        guest.run(f"devmem {bar + 3 * GIB + 16:#x} 32 0xdeadbeef")
        assert int(guest.run(f"devmem {bar + 3 * GIB + 16:#x} 32").strip(), 16) == 0

    # With nothing plugged the guest cannot reach the backend at all, so
    # its allocation must stay exactly 0: the writes allocated nothing.
    write_and_read_the_tail()
    st = server.backend_file(memfd)
    assert (st.st_size, st.st_blocks) == (3 * GIB, 0)
    assert server.alive() and guest.proc.poll() is None

    # Again with 1G plugged and 800M of it written by the guest.
    resize(guest, server, "vm0", GIB, base_kib)
    touch(guest, 800)
    allocated = server.backend_file(memfd).st_blocks * 512
    assert allocated >= 500 * MIB
    write_and_read_the_tail()
    # (The guest's own processes may take a few more pages of the plugged
    # memory meanwhile: only the plugged 1G can hold any.)
    st = server.backend_file(memfd)
    assert st.st_size == 3 * GIB
    assert allocated <= st.st_blocks * 512 <= GIB, (allocated, st.st_blocks * 512)
    assert server.alive() and guest.proc.poll() is None

    log = server.log()
    warnings = re.findall(r"WARNING .*vm0: (write|read) of \d+ byte\(s\) at BAR offset (0x[0-9a-f]+), past the "
                          r"device's 3G", log)
    assert warnings == [("write", hex(3 * GIB))], warnings  # once per client
    accesses = [(int(offset, 16), int(count)) for offset, count in
                re.findall(r"libvfio-user: region2: (?:wrote|read) \S+ (?:to|from) \((0x[0-9a-f]+):(\d+)\)", log)]
    print(f"memory BAR accesses that trapped: {[(hex(o), c) for o, c in accesses]}")
    # Each devmem access trapped once, as the guest made it...
    assert sorted(accesses) == sorted([(o, 8) for o in tail] * 4 + [(3 * GIB + 16, 4)] * 4), accesses
    # ...and none of the plugged memory the guest wrote 800M to did: QEMU
    # reached it through its mapping.
    assert all(offset >= 3 * GIB for offset, _ in accesses), accesses

    # The device still grows to all of it and shrinks.
    untouch(guest)
    resize(guest, server, "vm0", 3 * GIB, base_kib)
    resize(guest, server, "vm0", 0, base_kib)
    server.settle("vm0")
    assert server.backend_file(memfd).st_blocks == 0
    assert_no_driver_errors(guest)
