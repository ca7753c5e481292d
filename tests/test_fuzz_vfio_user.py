"""The vfio-user message fuzzer: random messages on vm0's socket of a real
``vfiouser-vmem serve`` (docs/robustness.md, rule 1), with vm1 beside it.

Many connections, each of a random number of messages drawn with weights:
well-formed commands with random contents (VERSION again, DMA_MAP with real
memfds of random sizes, sealed or not, with pipes, sockets, eventfds, no fd
or several; DMA_UNMAP of random and overlapping ranges; the info commands
with random indexes and argsz; SET_IRQS garbage; REGION_READ/WRITE on every
region index and beyond, at random offsets and sizes; DEVICE_RESET,
DIRTY_PAGES, unknown commands) and header mutations (truncated headers,
sizes below the header, above the maximum, above or below what is sent,
reply and error flags, no_reply, random ids, a disconnect in the middle of
a message).  Some connections first set up the virtio device with the
tests' driver, so that the random messages (and the resets among them) hit
a running device with a live virtqueue, and kick random requests at it;
QMP resizes among the messages raise config interrupts on whatever fds
SET_IRQS left.  A few connections begin with a first message that is not
QEMU's VERSION (random versions and capabilities, not JSON, fds, lying
sizes).

What each message may get back is decided from its header alone
(``expectation``): a message whose size can be trusted and that came whole
gets a reply with its msg_id and command (an error reply is a reply); the
connection may end only where docs/robustness.md says the server drops a
client: a size it cannot trust (below 16 bytes, above SERVER_MAX_MSG_SIZE),
a body that did not come in full (the fuzzer closes its socket then, rather
than make the server wait its 5 s MESSAGE_DEADLINE_S), and a message
deadline (which the fuzzer never lets pass).  Any other end of the
connection is a finding.

After each connection the process runs, its log holds no traceback (an
exception in a callback is answered as a refusal, and would pass for one),
a clean client (the full PCI and virtio set-up) attaches to vm0 and a PLUG
of one block is ACKed, QMP then reports that block; every few connections
vm1 serves a client of its own.  The server's fd count and VmRSS are
booked before and after the run.

Every entry is recorded before it runs (``replay`` is the one path for the
run and for a reproducer): connection markers, the bytes of each message
(hex) with how much of it was sent, its fds by kind and size, the checks.
"""

from __future__ import annotations

import array
import collections
import fcntl
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from fuzzing import FuzzRun, budget, regressions
from proc_util import fd_count
from test_robustness import TIMEOUT, WHILE_HELD_S, Served, driver_on, qmp, serving, sizes
from vfio_user_client import (
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_USER_DEVICE_GET_INFO,
    VFIO_USER_DEVICE_GET_IRQ_INFO,
    VFIO_USER_DEVICE_GET_REGION_INFO,
    VFIO_USER_DEVICE_GET_REGION_IO_FDS,
    VFIO_USER_DEVICE_RESET,
    VFIO_USER_DEVICE_SET_IRQS,
    VFIO_USER_DIRTY_PAGES,
    VFIO_USER_DMA_MAP,
    VFIO_USER_DMA_UNMAP,
    VFIO_USER_REGION_READ,
    VFIO_USER_REGION_WRITE,
    VFIO_USER_VERSION,
    ProtocolError,
    VfioUserClient,
    VfioUserError,
)
from virtio_driver import (
    ACK,
    DEFAULT_BAR_ADDR,
    PLUG,
    STATE,
    STATUS_NEEDS_RESET,
    UNPLUG,
    UNPLUG_ALL,
    VirtioMemDriver,
    request,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procinfo import proc_rss  # noqa: E402

MiB = 1 << 20
BLOCK = 2 * MiB
U64 = (1 << 64) - 1
#: libvfio-user with patch 0006 (lib/private.h): 64 KiB of data plus a
#: REGION_WRITE's header and access fields; a header above it is dropped.
SERVER_MAX_MSG_BYTES = (64 << 10) + HEADER_SIZE + 16
#: csrc/ffi_vfu.py VMEM_MAX_MSG_BYTES: up to this size the server waits for
#: all of a message before handing it over, even one it will refuse.
GATE_MAX_MSG_BYTES = 128 << 10
#: A liveness bound for one reply (the server answers in milliseconds).
REPLY_S = 10.0
#: vm0's requested-size (test_robustness.Served), set again after a
#: connection that changed it, for the clean client's PLUG.
REQUESTED_BYTES = 256 * MiB
#: vm1 gets a client of its own after every this many connections.
VM1_EVERY = 4
#: The server's fds may grow by this much over a run (a worker thread's
#: eventfd, trio's wakeup pipe being replaced, ...); a leak per message or
#: per connection is hundreds.
FD_SLACK = 8
#: RSS may grow by this much over a run (the allocator's arenas, caches
#: warming up); what a leak per message costs over thousands is more.
RSS_SLACK_BYTES = 96 * MiB

_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, addr, size
_DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, addr, size
_BITMAP = struct.Struct("<QQ")  # pgsize, size
_INFO4 = struct.Struct("<IIII")  # DEVICE_INFO, IRQ_INFO, REGION_IO_FDS request
_REGION_INFO = struct.Struct("<IIIIQQ")
_IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
_REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
_DIRTY = struct.Struct("<II")  # argsz, flags


# ---------------------------------------------------------------------------
# The server, with its output drained


class DrainedServed(Served):
    """test_robustness's ``Served``, with the server's stdout and stderr read
    as they come: thousands of refused messages log thousands of lines, and
    a pipe nobody reads stops the server at its 64 KiB (the write blocks the
    trio thread).  The last lines are kept for a finding's message."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.log_tail: collections.deque[str] = collections.deque(maxlen=60)
        self.tracebacks: list[str] = []
        self._readers = [threading.Thread(target=self._drain, args=(stream,), daemon=True)
                         for stream in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()

    def _drain(self, stream: Any) -> None:
        in_traceback = False
        for line in stream:
            self.log_tail.append(line)
            # A traceback in the log is a bug the server survived: an
            # exception in a region callback is answered as a refusal
            # (vfio_user/_context.py), one in the serve loop drops only that
            # client, and the fuzzer would see neither as such.
            if "Traceback (most recent call last)" in line:
                in_traceback = True
                self.tracebacks.append(self.log_tail[-2] if len(self.log_tail) > 1 else "")
            elif in_traceback and _LOG_RECORD.match(line):
                in_traceback = False
            if in_traceback and len(self.tracebacks[-1]) < 4000:
                self.tracebacks[-1] += line

    def tail(self) -> str:
        return "".join(self.log_tail)

    def stop(self) -> tuple[int, str]:
        # proc_util.terminate's communicate() would race the readers for
        # the pipes: the same SIGTERM-then-SIGKILL, then the readers' EOF.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=20)
        return self.proc.returncode, self.tail()


@pytest.fixture
def served():
    with serving(DrainedServed, "vmem-fuzz-") as server:
        yield server


#: The first line of a log record (the server's text log format).
_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def rss_bytes(pid: int) -> int:
    return proc_rss(pid)["VmRSS"]


# ---------------------------------------------------------------------------
# What a message may get back


def expectation(data: bytes, sent_bytes: int) -> str:
    """What the server may do with ``data`` of which ``sent_bytes`` went out
    before the client closes or waits:

    - "close": the message is incomplete (a part of its header, or less of
      it than its size says): the client closes at once, rather than let the
      server wait MESSAGE_DEADLINE_S for the rest (that drop is the
      documented one; waiting for it would cost 5 s a time);
    - "drop": a size the server cannot trust (below the header, above
      SERVER_MAX_MSG_SIZE): it drops the client, without a reply;
    - "none": no_reply: a whole message, nothing comes back;
    - "reply_then_close": the size says less than was sent: the first part
      is a whole message and is answered; what follows it is parsed as the
      next header, and the client closes rather than guess at it;
    - "reply": a reply with the message's id and command (or an error reply).
    """
    if sent_bytes < HEADER_SIZE:
        return "close"
    _msg_id, _cmd, size, flags, _err = HEADER.unpack_from(data)
    if size < HEADER_SIZE or size > GATE_MAX_MSG_BYTES:
        return "drop"  # the gate hands it over at once; libvfio-user drops it
    if size > sent_bytes:
        return "close"  # incomplete: the gate would wait for the rest
    if size > SERVER_MAX_MSG_BYTES:
        return "drop"
    if flags & FLAG_NO_REPLY:
        return "close" if size < sent_bytes else "none"
    return "reply_then_close" if size < sent_bytes else "reply"


# ---------------------------------------------------------------------------
# Generating messages (all from run.rng; the result is JSON, replayed as is)


def _pick(rng: Any, weighted: list[tuple[Any, float]]) -> Any:
    values, weights = zip(*weighted)
    return rng.choices(values, weights)[0]


def _iova(rng: Any) -> int:
    return _pick(rng, [(0, 3), (0x1000, 2), (0x100000, 2), (1 << 32, 2), (DEFAULT_BAR_ADDR, 2),
                       (rng.randrange(1 << 48) & ~0xFFF, 4), (rng.randrange(1 << 64), 2),
                       ((1 << 64) - 0x1000, 1), (rng.randrange(1 << 20), 1)])


def _length(rng: Any) -> int:
    return _pick(rng, [(0x1000, 3), (0x10000, 2), (MiB, 3), (BLOCK, 2), (rng.randrange(1, 1 << 24), 3),
                       (0, 1), (1 << 40, 1), (U64, 1), (rng.randrange(1 << 64), 1), (0x800, 1)])


def _fd_spec(rng: Any, mapped_bytes: int = 0) -> dict[str, Any]:
    kind = _pick(rng, [("memfd", 7), ("pipe", 1), ("socket", 1), ("eventfd", 1)])
    if kind == "memfd":
        # Shorter than the mapping, exactly it, longer, empty, random.
        size = _pick(rng, [(min(mapped_bytes, 1 << 32), 4), (min(mapped_bytes, 1 << 32) // 2, 2),
                           (0, 1), (rng.randrange(1, 16 * MiB), 2), (0x1000, 1)])
        return {"kind": kind, "size": size, "sealed": rng.random() < 0.3, "shrink_after": rng.random() < 0.1}
    if kind == "pipe":
        return {"kind": kind, "end": rng.choice(["r", "w"])}
    return {"kind": kind}


def _fds(rng: Any, mapped_bytes: int = 0, one: float = 0.6) -> list[dict[str, Any]]:
    r = rng.random()
    if r < 1 - one - 0.1:
        return []
    n = 1 if r < 0.9 else rng.choice([2, 3, 4, 9, 20])
    return [_fd_spec(rng, mapped_bytes) for _ in range(n)]


def _region_index(rng: Any, region_sizes: dict[int, int]) -> int:
    present = [index for index, size in region_sizes.items() if size]
    return _pick(rng, [(rng.choice(present), 12), (rng.randrange(10), 6), (rng.randrange(10, 16), 1),
                       (rng.randrange(1 << 32), 1)])


def _region_offset(rng: Any, size: int) -> int:
    r = rng.random()
    if size and r < 0.6:
        return rng.randrange(size) & ~rng.choice([0, 1, 3, 7])
    if r < 0.7:
        return max(0, size - rng.randrange(1, 16))  # straddling the end
    if r < 0.8:
        return (1 << 64) - rng.randrange(1, 4096)  # offset + count wraps
    if r < 0.9:
        return size + rng.randrange(1 << 20)
    return rng.randrange(1 << 64)


def _access_count(rng: Any) -> int:
    return _pick(rng, [(rng.choice([1, 2, 4, 8]), 12), (rng.randrange(1, 4096), 4), (0, 1),
                       (rng.choice([64 << 10, (64 << 10) + 1, MiB, 1 << 31, (1 << 32) - 1]), 2),
                       (rng.randrange(4096, 64 << 10), 1)])


def _unmap_range(rng: Any, maps: list[tuple[int, int]]) -> tuple[int, int]:
    """A range to unmap: random, or one mapped earlier in the connection,
    whole, a part of it, or overlapping it."""
    if not maps or rng.random() < 0.4:
        return _iova(rng), _length(rng)
    iova, size = rng.choice(maps)
    iova, size = _pick(rng, [((iova, size), 4), ((iova, size // 2), 1), ((iova + size // 2, size), 1),
                             ((max(0, iova - 0x1000), size + 0x2000), 1), ((iova, 0), 1)])
    return iova & U64, size & U64


def _payload(rng: Any, kind: str, region_sizes: dict[int, int],
             maps: list[tuple[int, int]]) -> tuple[int, bytes, list[dict[str, Any]]]:
    """(command, payload, fds) of a well-formed message of ``kind`` with
    random contents; ``maps`` are the ranges DMA_MAP asked for so far in the
    connection (whether or not the server took them)."""
    rb = rng.randbytes
    if kind == "version":
        caps = _pick(rng, [({"capabilities": {"max_msg_fds": 16}}, 1), ({}, 1),
                           ({"capabilities": {"max_data_xfer_size": rng.randrange(1 << 32)}}, 1)])
        text = json.dumps(caps).encode() + b"\0" if rng.random() < 0.7 else rb(rng.randrange(40))
        return VFIO_USER_VERSION, struct.pack("<HH", rng.randrange(3), rng.randrange(3)) + text, []
    if kind == "dma_map":
        size = _length(rng)
        offset = _pick(rng, [(0, 6), (0x800, 1), (0x1000, 1), (rng.randrange(1 << 24), 1), ((1 << 64) - 0x1000, 1)])
        prot = _pick(rng, [(3, 6), (1, 2), (2, 1), (0, 1), (rng.randrange(1 << 32), 1)])
        argsz = _pick(rng, [(_DMA_MAP.size, 9), (rng.randrange(1 << 32), 1)])
        fds = _fds(rng, size + (offset if offset < (1 << 32) else 0), one=0.75)
        if maps and rng.random() < 0.2:
            iova = rng.choice(maps)[0] + rng.choice([0, 0x1000, -0x1000])  # overlapping one
        else:
            iova = _iova(rng)
        iova &= U64
        maps.append((iova, size))
        return VFIO_USER_DMA_MAP, _DMA_MAP.pack(argsz, prot, offset, iova, size), fds
    if kind == "dma_unmap":
        flags = _pick(rng, [(0, 6), (DMA_UNMAP_FLAG_ALL, 2), (DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 1),
                            (rng.randrange(1 << 32), 1)])
        iova, size = (0, 0) if flags == DMA_UNMAP_FLAG_ALL and rng.random() < 0.7 else _unmap_range(rng, maps)
        tail = _BITMAP.pack(rng.choice([4096, 0, rng.randrange(1 << 64)]), rng.randrange(1 << 16)) \
            if rng.random() < 0.2 else b""
        argsz = _pick(rng, [(_DMA_UNMAP.size + len(tail), 9), (rng.randrange(1 << 32), 1)])
        return VFIO_USER_DMA_UNMAP, _DMA_UNMAP.pack(argsz, flags, iova, size) + tail, _fds(rng, one=0.05)
    if kind == "device_info":
        argsz = _pick(rng, [(16, 6), (rng.randrange(64), 2), (rng.randrange(1 << 32), 1)])
        return VFIO_USER_DEVICE_GET_INFO, _INFO4.pack(argsz, 0, 0, 0), []
    if kind == "region_info":
        argsz = _pick(rng, [(32, 3), (512, 3), (rng.randrange(4096), 2), (rng.randrange(1 << 32), 1)])
        return (VFIO_USER_DEVICE_GET_REGION_INFO,
                _REGION_INFO.pack(argsz, rng.randrange(4), _region_index(rng, region_sizes), 0, 0, 0), [])
    if kind == "region_io_fds":
        argsz = _pick(rng, [(16, 3), (rng.randrange(4096), 2), (rng.randrange(1 << 32), 1)])
        return (VFIO_USER_DEVICE_GET_REGION_IO_FDS,
                _INFO4.pack(argsz, rng.randrange(3), _region_index(rng, region_sizes), rng.randrange(8)), [])
    if kind == "irq_info":
        argsz = _pick(rng, [(16, 6), (rng.randrange(64), 2), (rng.randrange(1 << 32), 1)])
        return VFIO_USER_DEVICE_GET_IRQ_INFO, _INFO4.pack(argsz, 0, rng.randrange(8), 0), []
    if kind == "set_irqs":
        data_kind = _pick(rng, [(VFIO_IRQ_SET_DATA_EVENTFD, 4), (VFIO_IRQ_SET_DATA_NONE, 2),
                                (VFIO_IRQ_SET_DATA_BOOL, 2)])
        action = _pick(rng, [(VFIO_IRQ_SET_ACTION_TRIGGER, 5), (VFIO_IRQ_SET_ACTION_MASK, 1),
                             (VFIO_IRQ_SET_ACTION_UNMASK, 1)])
        flags = _pick(rng, [(data_kind | action, 8), (rng.randrange(1 << 32), 1), (data_kind, 1)])
        index = _pick(rng, [(2, 6), (rng.randrange(6), 3), (rng.randrange(1 << 32), 1)])
        start = _pick(rng, [(0, 6), (rng.randrange(4), 3), (rng.randrange(1 << 32), 1)])
        count = _pick(rng, [(rng.randrange(4), 8), (rng.randrange(1 << 32), 1), (rng.randrange(64), 1)])
        fds: list[dict[str, Any]] = []
        data = b""
        if data_kind == VFIO_IRQ_SET_DATA_EVENTFD and count < 64:
            n = count if rng.random() < 0.8 else rng.randrange(6)
            fds = [_pick(rng, [({"kind": "eventfd"}, 6), (_fd_spec(rng, 0x1000), 2)]) for _ in range(n)]
        elif data_kind == VFIO_IRQ_SET_DATA_BOOL and count < 64:
            data = rb(count if rng.random() < 0.8 else rng.randrange(8))
        argsz = _pick(rng, [(_IRQ_SET.size + len(data), 8), (rng.randrange(1 << 32), 1)])
        return VFIO_USER_DEVICE_SET_IRQS, _IRQ_SET.pack(argsz, flags, index, start, count) + data, fds
    if kind in ("region_read", "region_write"):
        region = _region_index(rng, region_sizes)
        offset = _region_offset(rng, region_sizes.get(region, 0))
        count = _access_count(rng)
        if kind == "region_read":
            return VFIO_USER_REGION_READ, _REGION_ACCESS.pack(offset, region, count), []
        # The data as long as the count (a count above the maximum makes a
        # message the server drops), or a count that lies about it.
        data_bytes = count if count <= (64 << 10) + 1 and rng.random() < 0.85 else rng.randrange(16)
        return VFIO_USER_REGION_WRITE, _REGION_ACCESS.pack(offset, region, count) + rb(data_bytes), []
    if kind == "reset":
        return VFIO_USER_DEVICE_RESET, b"" if rng.random() < 0.8 else rb(rng.randrange(1, 32)), []
    if kind == "dirty_pages":
        flags = _pick(rng, [(1, 2), (2, 2), (4, 2), (rng.randrange(1 << 32), 1)])
        tail = struct.pack("<QQ", *_unmap_range(rng, maps)) + _BITMAP.pack(4096, rng.randrange(1 << 12)) \
            if flags == 4 else b""
        return VFIO_USER_DIRTY_PAGES, _DIRTY.pack(_DIRTY.size + len(tail), flags) + tail, []
    assert kind == "unknown", kind
    cmd = _pick(rng, [(0, 1), (rng.randrange(15, 64), 2), (rng.randrange(1 << 16), 2),
                      (rng.choice([11, 12]), 1)])  # DMA_READ/WRITE: the server's to send
    return cmd, rb(rng.randrange(1, 128)), _fds(rng, one=0.1)


#: Message kinds and their weights; the header mutations below apply to any.
COMMAND_KINDS = [("version", 2), ("dma_map", 12), ("dma_unmap", 8), ("device_info", 2), ("region_info", 5),
                 ("region_io_fds", 2), ("irq_info", 2), ("set_irqs", 8), ("region_read", 16),
                 ("region_write", 16), ("reset", 3), ("dirty_pages", 3), ("unknown", 3)]
#: Mutations that keep the stream in step (the connection carries on).
IN_STEP_MUTATIONS = [(None, 40), ("short_payload", 3), ("reply_flags", 2), ("error_flag", 1), ("no_reply", 2)]
#: Mutations after which the connection ends, one way or the other.
ENDING_MUTATIONS = [("truncated_header", 2), ("size_below_header", 2), ("size_above_max", 2),
                    ("size_above_sent", 2), ("size_below_sent", 2), ("mid_message", 3)]


def message(rng: Any, region_sizes: dict[int, int], maps: list[tuple[int, int]], *,
            ending: bool) -> dict[str, Any]:
    """One message, as recorded: its bytes, its fds, how much of it is sent,
    and what may come back."""
    kind = _pick(rng, COMMAND_KINDS)
    cmd, payload, fds = _payload(rng, kind, region_sizes, maps)
    mutation = _pick(rng, ENDING_MUTATIONS if ending else IN_STEP_MUTATIONS)
    flags = FLAG_TYPE_COMMAND
    size = HEADER_SIZE + len(payload)
    if mutation == "short_payload" and payload:
        payload = payload[:rng.randrange(len(payload))]  # framed right, too short for its command
        size = HEADER_SIZE + len(payload)
    elif mutation == "reply_flags":
        flags = rng.choice([FLAG_TYPE_REPLY, FLAG_TYPE_REPLY | FLAG_ERROR, rng.randrange(2, 16)])
    elif mutation == "error_flag":
        flags = FLAG_ERROR | (rng.randrange(1 << 32) & ~0x1F)
    elif mutation == "no_reply":
        flags = FLAG_NO_REPLY
    elif mutation == "size_below_header":
        size = rng.randrange(HEADER_SIZE)
    elif mutation == "size_above_max":
        size = _pick(rng, [(rng.randrange(SERVER_MAX_MSG_BYTES + 1, GATE_MAX_MSG_BYTES + 1), 1),
                           (rng.randrange(GATE_MAX_MSG_BYTES + 1, 1 << 32), 1), ((1 << 32) - 1, 1)])
        if size <= GATE_MAX_MSG_BYTES:
            # All of it, so that the gate hands it over (and the server drops it).
            payload += rng.randbytes(size - HEADER_SIZE - len(payload))
    elif mutation == "size_above_sent":
        size += rng.randrange(1, SERVER_MAX_MSG_BYTES - size + 1) if size < SERVER_MAX_MSG_BYTES else 1
    elif mutation == "size_below_sent" and payload:
        size = rng.randrange(HEADER_SIZE, size)
    data = HEADER.pack(rng.randrange(1 << 16), cmd, size, flags, rng.choice([0, 0, rng.randrange(1 << 32)])) + payload
    sent = len(data)
    if mutation == "truncated_header":
        sent = rng.randrange(HEADER_SIZE)
    elif mutation == "mid_message":
        sent = rng.randrange(len(data))
    entry = {"kind": kind, "mutation": mutation, "hex": data.hex(), "sent": sent, "fds": fds,
             "expect": expectation(data, sent)}
    return entry


def driver_kick(rng: Any) -> dict[str, Any]:
    """A virtio-mem request through the fuzz connection's own driver, kicked
    but not waited for (what the random messages did to the device and its
    mappings decides whether it is served)."""
    type_ = _pick(rng, [(PLUG, 5), (UNPLUG, 3), (UNPLUG_ALL, 1), (STATE, 2), (rng.randrange(4, 1 << 16), 1)])
    addr = _pick(rng, [(DEFAULT_BAR_ADDR + BLOCK * rng.randrange(512), 6), (rng.randrange(1 << 64), 1)])
    nb_blocks = _pick(rng, [(rng.randrange(1, 8), 6), (rng.randrange(1 << 16), 1)])
    return {"kind": "driver_kick", "request": request(type_, addr, nb_blocks).hex()}


# ---------------------------------------------------------------------------
# Running them


def make_fd(spec: dict[str, Any], keep: list[int]) -> tuple[int, int | None]:
    """The fd to send for ``spec`` (the caller closes it after the send) and
    a memfd to shrink after the reply, or None; other ends go to ``keep``."""
    kind = spec["kind"]
    if kind == "memfd":
        fd = os.memfd_create("fuzz-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, spec["size"])
        if spec["sealed"]:
            # QEMU's memory-backend-memfd seals against shrinking by default.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return fd, (os.dup(fd) if spec["shrink_after"] and not spec["sealed"] else None)
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        mine, theirs = (w, r) if spec["end"] == "r" else (r, w)
        keep.append(mine)  # the other end open while the connection lasts
        return theirs, None
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep.append(a.detach())
        return b.detach(), None
    assert kind == "eventfd", kind
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), None


class Connection:
    """One fuzz connection to vm0: the tests' client for the handshake and
    the framing, the fuzzer's messages sent as recorded."""

    def __init__(self, served: DrainedServed, outcomes: collections.Counter[str]) -> None:
        self.served = served
        #: What came back, by kind: for the summary line, and for a run
        #: that tried nothing of some kind to show it.
        self.outcomes = outcomes
        self.client: VfioUserClient | None = None
        self.driver: VirtioMemDriver | None = None
        self.keep: list[int] = []
        #: The connection again (a dup), to send fds with: the client sends
        #: them only with its own whole messages.
        self.with_fds: trio.socket.SocketType | None = None

    async def open(self, with_driver: bool) -> None:
        with trio.fail_after(TIMEOUT):
            self.client = await VfioUserClient.connect(self.served.sockets["vm0"])
            self.with_fds = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(self.client.fileno())))
            if with_driver:
                self.driver = VirtioMemDriver(self.client, bar_addr=DEFAULT_BAR_ADDR)
                await self.driver.initialize()

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        if self.client is not None:
            self.client.close()
        if self.with_fds is not None:
            self.with_fds.close()
        for fd in self.keep:
            os.close(fd)
        self.keep = []

    def finding(self, what: str, entry: dict[str, Any]) -> AssertionError:
        return AssertionError(f"{what}\nmessage: {json.dumps(entry)[:600]}\n"
                              f"server log (last lines):\n{self.served.tail()}")

    async def run(self, entry: dict[str, Any]) -> bool:
        """Send one recorded entry and check what comes back; False when the
        connection is over."""
        assert self.client is not None
        if entry["kind"] == "driver_kick":
            return await self._driver_kick(entry)
        if entry["kind"] == "resize":
            await set_requested_size(self.served, entry["requested_size"])
            self.outcomes["resize"] += 1
            return True
        data = bytes.fromhex(entry["hex"])[:entry["sent"]]
        fds: list[int] = []
        shrink: list[int] = []
        try:
            for spec in entry["fds"]:
                fd, to_shrink = make_fd(spec, self.keep)
                fds.append(fd)
                if to_shrink is not None:
                    shrink.append(to_shrink)
            try:
                with trio.fail_after(REPLY_S):
                    await self._send(data, fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # Every earlier message was answered or needed none: the
                # server ended a connection that was in step.
                raise self.finding(f"the server dropped the connection before this message ({exc})", entry) from exc
        finally:
            for fd in fds:
                os.close(fd)
        try:
            return await self._outcome(entry)
        finally:
            for fd in shrink:
                # The client shrinks its file under the server's mapping
                # (memory-backend-file cannot be sealed): the SIGBUS guard's case.
                os.ftruncate(fd, 0)
                os.close(fd)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        """The fds go with the first byte, as QEMU sends them (one sendmsg);
        the rest of a message larger than the socket took follows."""
        assert self.client is not None and self.with_fds is not None
        if fds and data:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            data = data[await self.with_fds.sendmsg([data], ancdata):]
        if data:
            await self.client.send_raw(data)

    async def _outcome(self, entry: dict[str, Any]) -> bool:
        assert self.client is not None
        expect = entry["expect"]
        self.outcomes[expect] += 1
        if expect == "close":
            return False
        if expect == "none":
            return True
        if expect == "drop":
            with trio.fail_after(REPLY_S):
                rest = await self.client.receive_raw()
            if rest:
                raise self.finding(f"a header the server cannot trust was answered: {rest[:64].hex()}", entry)
            return False
        msg_id, cmd = HEADER.unpack_from(bytes.fromhex(entry["hex"]))[:2]
        try:
            with trio.fail_after(REPLY_S):
                reply = await self.client._receive_reply(msg_id, cmd)
            for fd in reply.fds:  # the memory BAR's, with its region info
                os.close(fd)
            self.outcomes["answered"] += 1
        except VfioUserError:
            self.outcomes["refused"] += 1  # an error reply: a reply all the same
        except ConnectionResetError as exc:
            # Not one of robustness.md's drops (a size it cannot trust, an
            # incomplete body, a deadline): the message was whole and its
            # size in bounds.  Examine it; no case of it is allowed.
            raise self.finding("the server dropped a whole message of a size it accepts", entry) from exc
        except ProtocolError as exc:  # not a reply, another id or command: out of step
            raise self.finding(f"the server's answer does not fit the message: {exc}", entry) from exc
        return expect == "reply"

    async def _driver_kick(self, entry: dict[str, Any]) -> bool:
        driver = self.driver
        if driver is None:
            return True  # recorded for a connection without a driver: nothing to kick
        driver.prepare(bytes.fromhex(entry["request"]))
        driver.publish()
        try:
            with trio.fail_after(REPLY_S):
                await driver.kick()
        except VfioUserError:
            pass  # the random messages moved BAR0 or its notify window: refused
        except ConnectionResetError as exc:
            raise self.finding("the server dropped the connection on a notify write", entry) from exc
        return True


async def set_requested_size(served: DrainedServed, value: int) -> None:
    with trio.fail_after(TIMEOUT):
        await qmp(served, "qom-set", {"path": "vm0", "property": "requested-size", "value": value})


async def check_clean_client(served: DrainedServed, dev: str) -> None:
    """The process runs; a clean client on ``dev`` goes through the PCI and
    virtio set-up and a PLUG of one block is ACKed; QMP reports the block."""
    assert served.proc.poll() is None, f"serve died with {served.proc.returncode}:\n{served.tail()}"
    assert not served.tracebacks, "the server logged a traceback:\n" + "\n".join(served.tracebacks[:3])
    async with driver_on(served, dev) as d:
        with trio.fail_after(TIMEOUT):
            await d.start_virtio()
            assert await d.plug(DEFAULT_BAR_ADDR, 1) == ACK
        # The fuzz connection's end reset the device (everything unplugged):
        # what is plugged now is the block just ACKed.
        assert (await sizes(served))[dev] == BLOCK
    assert served.proc.poll() is None, f"serve died with {served.proc.returncode}:\n{served.tail()}"


async def replay(served: DrainedServed, inputs: list[dict[str, Any]], run: FuzzRun | None = None,
                 outcomes: collections.Counter[str] | None = None) -> collections.Counter[str]:
    """Run entries (connection markers, messages, checks): the fuzzer's own
    path, which records each entry (``run``) before it runs it, so that a
    failing one is the reproducer's last, and a reproducer's.  Messages
    after one that ended its connection are not sent (nor recorded).
    Returns the outcomes (``Connection.outcomes``)."""
    outcomes = collections.Counter() if outcomes is None else outcomes
    conn: Connection | None = None
    over = True  # a long run's reproducer may begin part way through a connection
    resized = False
    try:
        for entry in inputs:
            if "check" not in entry and "connection" not in entry and "handshake" not in entry and over:
                continue
            if run is not None:
                run.record(entry)
            if "connection" in entry or "handshake" in entry:
                if conn is not None:
                    conn.close()
                    conn = None
                if "handshake" in entry:
                    await handshake(served, entry["handshake"], outcomes)
                    over = True
                else:
                    conn = Connection(served, outcomes)
                    await conn.open(entry.get("driver", False))
                    over = False
            elif "check" in entry:
                if conn is not None:
                    conn.close()
                    conn = None
                over = True
                if resized:
                    await set_requested_size(served, REQUESTED_BYTES)
                    resized = False
                for dev in entry["check"]:
                    await check_clean_client(served, dev)
            else:
                assert conn is not None
                resized |= entry["kind"] == "resize"
                if run is not None:
                    run.done()
                outcomes["messages"] += 1
                over = not await conn.run(entry)
    finally:
        if conn is not None:
            conn.close()
    return outcomes


def handshake_message(rng: Any) -> dict[str, Any]:
    """A first message that is not the VERSION QEMU sends: random versions
    and capabilities (libvfio-user lib/tran.c parses the JSON), not JSON,
    no NUL, another command, fds, sizes that lie."""
    caps: Any = {"capabilities": {
        key: value for key, value in (
            ("max_msg_fds", _pick(rng, [(16, 3), (-1, 1), (0, 1), (1024, 1), (1025, 1), (1 << 31, 1), ("x", 1)])),
            ("max_data_xfer_size", _pick(rng, [(MiB, 3), (0, 1), (1, 1), (U64, 1), (-1, 1), (1 << 40, 1)])),
            ("migration", _pick(rng, [({"pgsize": 4096}, 3), ({"pgsize": 0}, 1), ({"pgsize": 1}, 1),
                                      ({"pgsize": U64}, 1), ([], 1)])),
        ) if rng.random() < 0.7}}
    caps = _pick(rng, [(caps, 8), ([], 1), (None, 1), ("text", 1), ({"capabilities": []}, 1)])
    text = _pick(rng, [(json.dumps(caps).encode() + b"\0", 8), (json.dumps(caps).encode(), 1), (b"\0", 1),
                       (rng.randbytes(rng.randrange(1, 64)), 1), (b"[" * 100 + b"\0", 1), (b"", 2)])
    payload = struct.pack("<HH", _pick(rng, [(0, 8), (1, 1), (rng.randrange(1 << 16), 1)]),
                          _pick(rng, [(1, 6), (0, 2), (rng.randrange(1 << 16), 1)])) + text
    cmd = _pick(rng, [(VFIO_USER_VERSION, 9), (rng.randrange(1 << 16), 1)])
    size = _pick(rng, [(HEADER_SIZE + len(payload), 9), (rng.randrange(HEADER_SIZE), 1),
                       (rng.randrange(GATE_MAX_MSG_BYTES, 1 << 32), 1)])
    flags = _pick(rng, [(FLAG_TYPE_COMMAND, 9), (FLAG_TYPE_REPLY, 1), (FLAG_NO_REPLY, 1)])
    data = HEADER.pack(rng.randrange(1 << 16), cmd, size, flags, 0) + payload
    sent = len(data) if rng.random() < 0.85 else rng.randrange(len(data))
    return {"hex": data.hex(), "sent": sent, "fds": _fds(rng, one=0.05)}


async def handshake(served: DrainedServed, entry: dict[str, Any], outcomes: collections.Counter[str]) -> None:
    """A connection whose first message is ``entry``: the server answers it
    (a VERSION reply or an error reply) or closes the connection; either is
    fine (libvfio-user reads it in vfu_attach_ctx, on a worker thread, with
    a 5 s bound: patch 0005), hanging is not."""
    data = bytes.fromhex(entry["hex"])[:entry["sent"]]
    keep: list[int] = []
    fds = [make_fd(spec, keep)[0] for spec in entry["fds"]]
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def connect_and_send() -> None:
        # Blocking, as VfioUserClient.connect: the listen backlog is 0.
        raw.connect(served.sockets["vm0"])
        if fds and data:
            raw.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        elif data:
            raw.sendall(data)

    try:
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(connect_and_send, abandon_on_cancel=True)
        for fd in fds + keep:
            os.close(fd)
        fds = keep = []
        if entry["sent"] < len(bytes.fromhex(entry["hex"])):
            outcomes["handshake hung up"] += 1
            return  # the rest never comes: closed at once
        sock = trio.socket.from_stdlib_socket(raw)
        with trio.fail_after(REPLY_S):
            try:
                answer = await sock.recv(HEADER_SIZE)
            except ConnectionResetError:
                answer = b""
        outcomes["handshake answered" if answer else "handshake closed"] += 1
    finally:
        for fd in fds + keep:
            os.close(fd)
        raw.close()


async def region_sizes_of(served: DrainedServed) -> dict[int, int]:
    """Every region's size, for offsets inside and around each."""
    with trio.fail_after(TIMEOUT):
        async with await VfioUserClient.connect(served.sockets["vm0"]) as client:
            found = {}
            for index in range(10):
                try:
                    found[index] = (await client.region_info(index)).size
                except VfioUserError:
                    found[index] = 0
            return found


async def test_fuzz_vfio_user_messages(served: DrainedServed) -> None:
    with FuzzRun("vfio-user", unit="messages") as run:
        total = budget(ci=10_000, long=200_000)
        region_sizes = await region_sizes_of(served)
        # A first clean client before the figures: what the server sets up
        # once (worker threads, caches) is not a leak.
        await replay(served, [{"check": ["vm0", "vm1"]}], run)
        pid = served.proc.pid
        fds_before, rss_before = fd_count(pid), rss_bytes(pid)
        run.extra["server fds"] = f"{fds_before}->?"
        connections = 0
        outcomes: collections.Counter[str] = collections.Counter()
        rng = run.rng
        while run.count < total:
            connections += 1
            checks = ["vm0", "vm1"] if connections % VM1_EVERY == 0 else ["vm0"]
            if rng.random() < 0.05:
                await replay(served, [{"handshake": handshake_message(rng)}, {"check": checks}], run, outcomes)
                continue
            # Log-uniform between 20 and 200 messages: many short
            # connections (each ends in a reset) and some long ones.
            n = min(total - run.count, int(math.exp(rng.uniform(math.log(20), math.log(200)))))
            with_driver = rng.random() < 0.3
            entries: list[dict[str, Any]] = [{"connection": connections, "driver": with_driver}]
            maps: list[tuple[int, int]] = [(0, MiB)] if with_driver else []  # the driver's guest RAM
            for i in range(n):
                last = i == n - 1
                r = rng.random()
                if with_driver and r < 0.12:
                    entries.append(driver_kick(rng))
                elif r > 0.98:
                    # A config change interrupt, to whatever fd SET_IRQS left.
                    entries.append({"kind": "resize", "requested_size": rng.randrange(0, 513) * BLOCK})
                else:
                    entries.append(message(rng, region_sizes, maps, ending=last and rng.random() < 0.6))
            entries.append({"check": checks})
            await replay(served, entries, run, outcomes)
        fds_after, rss_after = fd_count(pid), rss_bytes(pid)
        run.extra["connections"] = connections
        run.extra["outcomes"] = " ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
        run.extra["server fds"] = f"{fds_before}->{fds_after}"
        run.extra["VmRSS MiB"] = f"{rss_before / MiB:.1f}->{rss_after / MiB:.1f}"
        assert fds_after <= fds_before + FD_SLACK, f"server fds {fds_before} -> {fds_after}"
        assert rss_after < rss_before + RSS_SLACK_BYTES, f"server VmRSS {rss_before} -> {rss_after}"


@pytest.mark.parametrize("name,reproducer", list(regressions("vfio-user")) or [("none", None)])
async def test_fuzz_vfio_user_regressions(served: DrainedServed, name: str, reproducer: dict | None) -> None:
    assert reproducer is not None, "no tests/fuzz_regressions/vfio-user-*.json (a hand-written one belongs there)"
    inputs = reproducer["inputs"]
    outcomes = await replay(served, inputs)
    # A reproducer holds only what was sent (after the first connection:
    # a long run's may begin part way through one): all of it is sent again.
    first = next((i for i, e in enumerate(inputs) if "connection" in e or "handshake" in e), len(inputs))
    assert outcomes["messages"] == sum(1 for e in inputs[first:] if "kind" in e)
    # Whatever the reproducer did, the server serves a clean client after it.
    await check_clean_client(served, "vm0")
    await check_clean_client(served, "vm1")


@pytest.mark.parametrize("sent_bytes", [5, HEADER_SIZE + 8], ids=["part_of_the_header", "part_of_the_body"])
async def test_a_client_that_hangs_up_mid_message_frees_the_device_at_once(served: DrainedServed,
                                                                           sent_bytes: int) -> None:
    # The fuzzer's first finding: a client that closed its socket part way
    # through a message (QEMU killed in the middle of a sendmsg) was waited
    # for until MESSAGE_DEADLINE_S, the rest being "still to come", and the
    # device accepted no new client meanwhile.  Now the hang-up (POLLRDHUP)
    # ends the connection at once, unread: libvfio-user refuses a header cut
    # short before it takes the fds from the control message, so reading it
    # would have left them open in the server.
    await check_clean_client(served, "vm0")
    pid = served.proc.pid
    fds_before = fd_count(pid)
    dma_map = HEADER.pack(1, VFIO_USER_DMA_MAP, HEADER_SIZE + _DMA_MAP.size, FLAG_TYPE_COMMAND, 0)
    dma_map += _DMA_MAP.pack(_DMA_MAP.size, 3, 0, 0, MiB)
    for _ in range(3):
        with trio.fail_after(TIMEOUT):
            attacker = await VfioUserClient.connect(served.sockets["vm0"])
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]
        raw = socket.socket(fileno=os.dup(attacker.fileno()))
        try:
            raw.sendmsg([dma_map[:sent_bytes]],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        finally:
            raw.close()
            for fd in fds:
                os.close(fd)
            attacker.close()
        # Below the deadline: served because the hang-up was seen, not
        # because the deadline passed.
        with trio.fail_after(WHILE_HELD_S):
            async with await VfioUserClient.connect(served.sockets["vm0"]) as client:
                await client.device_info()
        await check_clean_client(served, "vm0")
    # 12 fds went with the parts.  The last clean client's own fds (its
    # connection, its MSI-X eventfds) go when the server has seen it leave,
    # which it may not have yet: awaited, under a liveness bound.
    with trio.fail_after(TIMEOUT):
        while fd_count(pid) > fds_before + 2:
            await trio.sleep(0.01)


async def test_a_dma_map_past_2_64_leaves_no_unmapped_memory_in_use(served: DrainedServed) -> None:
    # The fuzzer's second finding: libvfio-user accepts a DMA_MAP that runs
    # past 2^64 (lib/dma.c checks no wrap); with an unaligned file offset
    # its unreachable tail began beyond 2^64, which the C table of guest
    # memory could not hold, and every later update of the table failed.
    # Guest RAM unmapped after that stayed in the C table, and the next
    # notify served in C read the unmapped ring: SIGSEGV, every device gone.
    async with driver_on(served) as d:
        fd = os.memfd_create("wrapping-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, MiB)
            with trio.fail_after(TIMEOUT):
                await d.start_virtio()
                try:
                    await d.client.dma_map((1 << 64) - 0x1000, 0x10000, fd, offset=0x800)
                except VfioUserError:
                    pass  # refusing it is as good
                await d.client.dma_unmap(d.ram.iova, d.ram.size)
                d.prepare(request(PLUG, DEFAULT_BAR_ADDR, 1))
                d.publish()
                await d.kick()
                # The rings are gone: the queue stops, the process carries on.
                assert await d.status() & STATUS_NEEDS_RESET
        finally:
            os.close(fd)
    assert not served.tracebacks, "\n".join(served.tracebacks)
    await check_clean_client(served, "vm0")
    await check_clean_client(served, "vm1")


def test_guest_memory_holds_no_mapping_past_2_64() -> None:
    # The same finding without patch 0007 (a libvfio-user of the user's own
    # accepts the wrapping DMA_MAP): the server's table clips the mapping at
    # 2^64 and drops a tail that begins beyond it, so that its C table can
    # hold every entry and keeps following DMA_UNMAPs.
    from vfiouser_vmem.virtio._virtqueue import GuestMemory

    memory = GuestMemory()
    ram = memoryview(bytearray(0x2000))
    memory.add(0x1000, 0x2000, ram)
    memory.add((1 << 64) - 0x1000, 0x10000, None, "wraps")
    memory.add((1 << 64) + 0x800, 0x800, None, "beyond 2^64")
    assert len(memory) == int(memory.c_memory.nr_maps) == 2
    memory.remove(0x1000, 0x2000)
    assert len(memory) == int(memory.c_memory.nr_maps) == 1
    assert int(memory.c_memory.maps[0].iova) + int(memory.c_memory.maps[0].length) == 1 << 64
