"""Host settings the tests change, always restored: huge page pools and mounts.

``huge_pages(n)`` raises ``/proc/sys/vm/nr_hugepages`` (2 MiB pages) for
the duration of a ``with`` block and puts the old value back, also when the
block fails, under the lock every user of the pool takes
(integration/hugepages.py).
``mount(fstype, options)`` mounts a filesystem on a fresh directory and
unmounts it (and removes the directory) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

import hugepages  # noqa: E402  (integration/hugepages.py)

POOL_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def pool(field: str) -> int:
    """A counter of the 2 MiB pool: nr_hugepages, free_hugepages, resv_hugepages."""
    with open(os.path.join(POOL_2M, field)) as f:
        return int(f.read())


@contextlib.contextmanager
def huge_pages(count: int) -> Iterator[int]:
    """At least ``count`` more 2 MiB huge pages than are free now, through
    the one home of that rule (integration/hugepages.py: the lock, the old
    value back also on failure); yields the free pages at the start."""
    with hugepages.pool_of(count, say=lambda _: None):
        got = pool("free_hugepages")
        assert got >= count, f"asked the kernel for {count} free huge pages, got {got}"
        yield got


@contextlib.contextmanager
def mount(fstype: str, options: str = "") -> Iterator[str]:
    """A ``fstype`` filesystem on a new directory, unmounted afterwards."""
    directory = tempfile.mkdtemp(prefix=f"vmem-{fstype}-", dir="/tmp")
    try:
        argv = ["mount", "-t", fstype, *(["-o", options] if options else []), "none", directory]
        subprocess.run(argv, check=True, capture_output=True)
        try:
            yield directory
        finally:
            subprocess.run(["umount", "-l", directory], check=True, capture_output=True)
    finally:
        os.rmdir(directory)


def remount(directory: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", directory], check=True, capture_output=True)
