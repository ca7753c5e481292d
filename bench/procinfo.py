"""Host-side views of a process: its memfds' allocated bytes and its RSS."""

from __future__ import annotations

import os
from pathlib import Path


def memfd_allocated_bytes(pid: int, *, name_prefix: str | None = None, size_bytes: int | None = None) -> int:
    """Allocated bytes (st_blocks * 512) of the memfds ``pid`` holds open that
    match ``name_prefix`` (``/memfd:NAME``) and/or have ``size_bytes``.

    The same memfd can be open more than once (libvfio-user keeps its own fd
    of a region, QEMU dups them): each file is counted once, by inode."""
    blocks_by_inode: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            st = os.stat(fd)
        except OSError:
            continue
        if not target.startswith("/memfd:"):
            continue
        if name_prefix is not None and not target.startswith(f"/memfd:{name_prefix}"):
            continue
        if size_bytes is not None and st.st_size != size_bytes:
            continue
        blocks_by_inode[st.st_ino] = st.st_blocks
    if not blocks_by_inode:
        raise LookupError(f"no matching memfd among the fds of PID {pid} (name {name_prefix!r}, size {size_bytes})")
    return sum(blocks_by_inode.values()) * 512


def proc_rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of ``pid`` in bytes (0 when gone)."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = int(rest.split()[0]) * 1024
    return out


def add_rss(*rss: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rss:
        for k, v in r.items():
            total[k] = total.get(k, 0) + v
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far, 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
