"""The host's 2 MiB huge page pool, for whoever needs some of it for a while:
the tests (tests/host_setup.py, integration/test_memory_backends.py) and
bench/run.py's hugetlb rows.

``pool_of(pages)`` raises ``/proc/sys/vm/nr_hugepages`` by what the rows
need and puts the old value back when they are done, also when they fail
(an exception, Ctrl-C or SIGTERM), holding an exclusive ``flock`` on
``/run/vfiouser-vmem-hugepages.lock`` for the whole time the value is
changed: other users of the pool on this machine (the integration tests)
take the same lock, so that neither sees the other's pool.  ``counts()``
is the pool as the kernel counts it (sysfs), read at each call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PAGE_KIB = 2048
PAGE_BYTES = PAGE_KIB * 1024
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
POOL_DIR = Path(f"/sys/kernel/mm/hugepages/hugepages-{PAGE_KIB}kB")
LOCK_PATH = "/run/vfiouser-vmem-hugepages.lock"
#: How long to wait for another holder of the lock before giving up.
LOCK_TIMEOUT_S = 1800.0


class HugePagesUnavailable(RuntimeError):
    """The pool could not be set up for the rows (no permission, no 2 MiB
    default huge page size, the kernel found fewer pages, the lock was held
    too long)."""


def counts() -> dict[str, int]:
    """The 2 MiB pool now: ``nr`` (total), ``free`` (not allocated; includes
    pages reserved for mappings but not faulted in), ``resv`` (reserved),
    ``surplus``."""
    names = {"nr": "nr_hugepages", "free": "free_hugepages", "resv": "resv_hugepages",
             "surplus": "surplus_hugepages"}
    return {key: int((POOL_DIR / name).read_text()) for key, name in names.items()}


def free_pages() -> int:
    """``free_hugepages`` of the 2 MiB pool."""
    return int((POOL_DIR / "free_hugepages").read_text())


def _default_page_kib() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1])
    return None


def _write_nr(value: int) -> int:
    """Write nr_hugepages; returns what the kernel then has (it may find
    fewer free contiguous 2 MiB ranges than asked)."""
    NR_HUGEPAGES.write_text(f"{value}\n")
    return int(NR_HUGEPAGES.read_text())


def _lock(say: Callable[[str], None], timeout_s: float) -> int:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            say(f"huge pages: {LOCK_PATH} is held by another user of the pool; waiting (up to {timeout_s:.0f} s)")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HugePagesUnavailable(f"{LOCK_PATH} was held by another process for more than "
                                               f"{timeout_s:.0f} s") from None
                time.sleep(1.0)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM as SystemExit while the pool is changed, so that the
    ``finally`` that restores it runs (main thread only; elsewhere as is)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
        installed = True
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def pool_of(pages: int, *, say: Callable[[str], None] = print,
            lock_timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[dict[str, int]]:
    """``pages`` more 2 MiB huge pages in the pool for the duration: under
    the lock, nr_hugepages is raised from its value then (``old``) to
    ``old + pages``, and set back to ``old`` in a ``finally``; the lock is
    released only after that.  Yields ``{"old": old, "nr": new}``.
    HugePagesUnavailable when the pool cannot be had (the old value is
    back then too)."""
    if _default_page_kib() != PAGE_KIB:
        raise HugePagesUnavailable(f"the default huge page size is not {PAGE_KIB} kB (/proc/meminfo "
                                   f"Hugepagesize), so {NR_HUGEPAGES} is not the 2 MiB pool")
    if not os.access(NR_HUGEPAGES, os.W_OK):
        raise HugePagesUnavailable(f"{NR_HUGEPAGES} is not writable here (root is needed to change it)")
    fd = _lock(say, lock_timeout_s)
    try:
        with _sigterm_raises():
            old = int(NR_HUGEPAGES.read_text())
            try:
                want = old + pages
                have = _write_nr(want)
                say(f"huge pages: nr_hugepages {old} -> {have} ({pages} more are needed)")
                if have < want:
                    raise HugePagesUnavailable(f"asked the kernel for {want} huge pages of 2 MiB, it found "
                                               f"{have} (host memory too fragmented or too small)")
                yield {"old": old, "nr": have}
            finally:
                back = _write_nr(old)
                left = counts()
                say(f"huge pages: nr_hugepages back to {back}"
                    + (f" (surplus {left['surplus']}: pages still in use)" if left["surplus"] else ""))
                if back != old:
                    say(f"huge pages: WARNING: nr_hugepages is {back}, not the {old} it was before the rows")
    finally:
        os.close(fd)  # releases the lock, after nr_hugepages is back
