"""Fuzzing the QMP and HMP sockets of a real ``vfiouser-vmem serve``
(docs/robustness.md, "QMP and metrics"; docs/monitor.md).

One server process with two devices and no vfio-user client (a device
without a client takes every requested-size its rules allow, nothing plugs),
a QMP socket and a monitor socket, both limited to ``MAX_CLIENTS``.  The
inputs come from a weighted grammar (``Generator``): valid commands with
random arguments (sizes of every kind, wrong types, unknown properties and
paths), request shapes QEMU refuses, ids of every JSON type, malformed JSON
(truncated, bad escapes, lone surrogates, invalid UTF-8, NUL bytes, 1e400,
nesting past the 1024 limit, messages around the 1 MiB limit), commands
before ``qmp_capabilities`` and the negotiation twice, ``exec-oob``, bursts
of connections beyond the limit; HMP command lines on the monitor socket and
through ``human-monitor-command``, garbage bytes with the line editor's keys,
lines past its 4095 bytes.

The rules checked after every input (``Checker``):

- every reply is QMP: a ``return``, or an ``error`` of QEMU's class for that
  input (GenericError, CommandNotFound, DeviceNotFound, as qmp-dispatch.c
  and qom-qmp-cmds.c give them; ``Model.expect``, with QOM paths resolved
  by a model of the tree, ``classify``), never "Internal error"; the id
  comes back; exactly the clients the eviction policy keeps are served;
- the monitor socket prints for a line what ``human-monitor-command``
  returns for it; an HMP ``qom-set`` with a value whose reading is known
  (``hmp_set_oracle``) is taken or refused as QEMU would;
- the connection stays usable: a probe sent after the input is answered on
  it.  Only a truncated message whose connection the fuzzer itself closes,
  and a client evicted by the limit, may lose their connection; then a new
  connection must be served;
- refused commands change nothing: the fuzzer keeps a model of what QMP
  shows of each device (the settable properties); after every refused
  qom-set the property is read back and must equal the model, and every
  ``SNAPSHOT_EVERY`` inputs every property of every object must equal the
  first snapshot but for the modelled ones.  An accepted qom-set updates the
  model with what the server reads back.
- the process lives throughout; its fd count and VmRSS are booked at start
  and end (``run.extra``), the fd count must come back, the RSS stay within
  a generous bound.

Every input goes through ``run.record`` as a step (socket, connection,
bytes in hex), so that ``replay(steps)`` runs a reproducer again on a fresh
server; ``test_qmp_fuzz_regression`` replays tests/fuzz_regressions/qmp-*.json.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import pytest
from fuzzing import FuzzRun, budget, regressions
from proc_util import fd_count, start_serve, terminate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procinfo import proc_rss  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
#: Liveness bound of one answer (milliseconds when all is well; the
#: machine is loaded).
TIMEOUT_S = 30.0
#: --qmp-max-clients, for QMP and the monitor: small, so that bursts pass it cheaply.
MAX_CLIENTS = 8
#: The server's message limit (control/_framing.py DEFAULT_MAX_MESSAGE_BYTES)
#: and nesting limit (MAX_NESTING).
MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 1024
#: util/readline.h READLINE_CMD_BUF_SIZE: a monitor line holds at most this.
READLINE_CMD_BUF_SIZE = 4095
SNAPSHOT_EVERY = 100
#: Descriptors the server may hold at the end beyond the start (a connection
#: whose close it has not seen yet).
FD_SLACK = 4
RSS_BOUND_BYTES = 128 * MiB

#: The devices: id -> (memdev, max-size, block-size, requested-size at start).
DEVICES = {"vm0": ("mem0", 1 * GiB, 2 * MiB, 256 * MiB), "vm1": ("mem1", 512 * MiB, 4 * MiB, 0)}
#: What qom-set may change, and its value at start.
SETTABLE = ("requested-size", "x-fail-discards", "x-hold-requests", "unplugged-quarantine")
#: What changes by itself: the scrubber's passes (docs/scrub.md, every scrub-interval).
VOLATILE = ("scrub-passes",)

# -- the QOM paths, with what they name ----------------------------------------
# (kind, device or backend id, QOM type); kinds: dev, backend, container, none,
# ambiguous (qom-list: GenericError, qom-get/set: DeviceNotFound, as
# qom/qom-qmp-cmds.c).
PATHS: dict[str, tuple[str, str, str]] = {}
for _dev, (_memdev, *_) in DEVICES.items():
    for _p in (_dev, f"/machine/peripheral/{_dev}", f"/machine/peripheral/{_dev}/", f"//machine//peripheral/{_dev}",
               f"peripheral/{_dev}", f"machine/peripheral/{_dev}"):
        PATHS[_p] = ("dev", _dev, "virtio-mem-pci")
    for _p in (f"/machine/peripheral/{_dev}/virtio-backend", f"{_dev}/virtio-backend"):
        PATHS[_p] = ("dev", _dev, "virtio-mem")
    for _p in (f"/objects/{_memdev}", _memdev, f"objects/{_memdev}", f"/machine/peripheral/{_dev}/memdev"):
        PATHS[_p] = ("backend", _memdev, "memory-backend-memfd")
for _p in ("/", "//", "/machine", "machine", "/objects", "objects", "/machine/peripheral", "peripheral"):
    PATHS[_p] = ("container", "", "container")
for _p in ("virtio-backend", ""):
    PATHS[_p] = ("ambiguous", "", "")
for _p in ("/machine/peripheral/vm9", "/objects/mem9", "vm0/nope", "/machine/vm0", "/vm0", "vm2", "VM0",
           "/machine/peripheral/vm0/virtio-backend/x", "nope-\u00e9\ud800"):
    PATHS[_p] = ("none", "", "")

for _dev, (_memdev, *_) in DEVICES.items():
    # Partial paths follow links too (object_resolve_partial_path walks each
    # object's path with object_resolve_abs_path, which resolves a link).
    PATHS[f"{_dev}/memdev"] = ("backend", _memdev, "memory-backend-memfd")
PATHS["memdev"] = ("ambiguous", "", "")  # every device and its virtio-backend link one


# -- the QOM tree as QEMU resolves it (qom/object.c) -----------------------------------
#: Each object (as the tuple of its path components) -> its children; links.
TREE: dict[tuple[str, ...], list[str]] = {(): ["machine", "objects"], ("machine",): ["peripheral"],
                                          ("machine", "peripheral"): list(DEVICES),
                                          ("objects",): [memdev for memdev, *_ in DEVICES.values()]}
LINKS: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
for _dev, (_memdev, *_) in DEVICES.items():
    TREE[("machine", "peripheral", _dev)] = ["virtio-backend"]
    TREE[("machine", "peripheral", _dev, "virtio-backend")] = []
    TREE[("objects", _memdev)] = []
    for _node in (("machine", "peripheral", _dev), ("machine", "peripheral", _dev, "virtio-backend")):
        LINKS[_node] = {"memdev": ("objects", _memdev)}


def _walk(node: tuple[str, ...], parts: list[str]) -> tuple[str, ...] | None:
    """object_resolve_abs_path: empty components skipped, children and links followed."""
    for part in parts:
        if not part:
            continue
        if part in TREE[node]:
            node = (*node, part)
        elif part in LINKS.get(node, {}):
            node = LINKS[node][part]
        else:
            return None
    return node


def classify(path: str) -> tuple[str, str, str]:
    """What ``path`` names, as object_resolve_path_type resolves it: (kind,
    device or backend id, QOM type), kind one of dev, backend, container,
    none, ambiguous (a partial path found from more than one object)."""
    parts = path.split("/")
    if path.startswith("/"):
        node = _walk((), parts[1:])
    else:
        found = [n for n in (_walk(start, parts) for start in TREE) if n is not None]
        if len(found) > 1:
            return "ambiguous", "", ""
        node = found[0] if found else None
    if node is None:
        return "none", "", ""
    if node[:2] == ("machine", "peripheral") and len(node) == 3:
        return "dev", node[2], "virtio-mem-pci"
    if len(node) == 4:
        return "dev", node[2], "virtio-mem"
    if node[:1] == ("objects",) and len(node) == 2:
        return "backend", node[1], "memory-backend-memfd"
    return "container", "", "container"


DEVICE_PROPS = ("size", "requested-size", "block-size", "max-size", "memaddr", "node", "memdev", "discard-pending",
                "unplugged-found", "unplugged-reclaimed", "unplugged-episodes", "unplugged-access",
                "scrub-interval", "scrub-passes", "unplugged-quarantine", "x-fail-discards", "x-hold-requests",
                "x-requests-pending")
BACKEND_PROPS = ("share", "size", "dump", "prealloc-threads", "x-use-canonical-path-for-ramblock-id", "policy",
                 "prealloc-context", "prealloc", "reserve", "host-nodes", "merge", "hugetlb", "seal", "hugetlbsize")

#: The commands and their arguments (QEMU's schema: name, kind, required).
COMMANDS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "qmp_capabilities": (("enable", "caps", False),),
    "query-version": (), "query-commands": (), "query-status": (),
    "qom-get": (("path", "str", True), ("property", "str", True)),
    "qom-set": (("path", "str", True), ("property", "str", True), ("value", "any", True)),
    "qom-list": (("path", "str", True),),
    "query-memory-devices": (), "query-memory-size-summary": (), "query-memdev": (), "x-query-numa": (),
    "human-monitor-command": (("command-line", "str", True), ("cpu-index", "int", False)),
}


class FuzzFailure(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzFailure(what)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- connections -------------------------------------------------------------------


class Conn:
    """One connection to the QMP or the monitor socket, blocking with
    ``TIMEOUT_S`` as the liveness bound of every wait; sending and reading go
    together (select), since the monitor's echo of a long line is far larger
    than any socket buffer and the server stops reading a client that does
    not read."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def pump(self, data: bytes, done: Any) -> bool:
        """Send ``data`` while reading; then read until ``done(buf)``.
        False if the server closed the connection first."""
        view = memoryview(data)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if not view and done(self.buf):
                return True
            if self.eof:
                return False
            left = deadline - time.monotonic()
            check(left > 0, f"no answer within {TIMEOUT_S} s (have {bytes(self.buf[-300:])!r})")
            r, w, _ = select.select([self.sock], [self.sock] if view else [], [], left)
            if r:
                try:
                    chunk = self.sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except ConnectionResetError:
                    chunk = b""
                if chunk == b"":
                    self.eof = True
                elif chunk:
                    self.buf += chunk
                    deadline = time.monotonic() + TIMEOUT_S
            if w and view:
                try:
                    sent = self.sock.send(view[:1 << 18])
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except (BrokenPipeError, ConnectionResetError):
                    self.eof = True
                    continue
                view = view[sent:]
                deadline = time.monotonic() + TIMEOUT_S


class QmpConn(Conn):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.negotiated = False
        greeting = self.messages_until(lambda m: True)
        check(greeting is not None and "QMP" in greeting[-1], f"no QMP greeting: {greeting}")

    def messages_until(self, stop: Any, data: bytes = b"") -> list[Any] | None:
        """Send ``data``; the messages (events left out) up to and with the
        first for which ``stop`` holds; None if the connection closed first."""
        out: list[Any] = []

        def done(buf: bytearray) -> bool:
            while (nl := buf.find(b"\n")) >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    raise FuzzFailure(f"the server sent a line that is not JSON: {line[:300]!r}") from None
                check(isinstance(message, dict), f"a reply that is not an object: {line[:300]!r}")
                if "event" in message:
                    continue
                out.append(message)
                if stop(message):
                    return True
            return False

        return out if self.pump(data, done) else None

    def request(self, message: dict[str, Any]) -> Any:
        replies = self.messages_until(lambda m: True, json.dumps(message).encode())
        check(replies is not None, f"connection closed on {message}")
        return replies[-1]

    def negotiate(self) -> None:
        check(self.request({"execute": "qmp_capabilities"}) == {"return": {}}, "qmp_capabilities refused")
        self.negotiated = True


class HmpConn(Conn):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        check(self.pump(b"", lambda b: b.endswith(b"(qemu) ")), "no monitor banner")
        check(bytes(self.buf).startswith(b"QEMU 11.1.0 monitor"), f"banner: {bytes(self.buf)!r}")
        self.buf.clear()


# -- the server and the model ---------------------------------------------------------


class Server:
    """``serve`` with the two DEVICES, QMP and the monitor."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vmem-fuzz-qmp-", dir="/tmp"))
        self.qmp_path = str(self.tmp / "qmp")
        self.hmp_path = str(self.tmp / "hmp")
        args = ["--qmp", self.qmp_path, "--monitor", self.hmp_path, "--qmp-max-clients", str(MAX_CLIENTS),
                # Refused inputs are logged at INFO and evictions at WARNING: nobody
                # reads stderr while the run goes, so only ERROR (a bug) goes there.
                "--log-level", "error"]
        for dev, (memdev, size, block, requested) in DEVICES.items():
            args += ["--object", f"memory-backend-memfd,id={memdev},size={size}",
                     "--device", f"id={dev},memdev={memdev},socket={self.tmp / (dev + '.sock')},"
                     f"block-size={block},requested-size={requested}"]
        try:
            self.proc, _ = start_serve(*args)
        except BaseException:
            shutil.rmtree(self.tmp)
            raise

    def alive(self) -> None:
        check(self.proc.poll() is None, f"serve exited with {self.proc.returncode}")

    def fd_count(self) -> int:
        return fd_count(self.proc.pid)

    def rss_bytes(self) -> int:
        return proc_rss(self.proc.pid)["VmRSS"]

    def stop(self) -> tuple[int, str]:
        try:
            return terminate(self.proc)
        finally:
            shutil.rmtree(self.tmp)


@dataclass
class Outcome:
    """What the oracle expects of one request.

    ``error``: the error class, or None for a return, which
    ``check_return(value)`` must accept; ``touches``: the (device, property)
    a qom-set names, read back afterwards; ``sets``: the value an accepted
    qom-set sets; ``negotiates``: the session is in command mode after it."""

    error: str | None = None
    check_return: Any = None
    touches: tuple[str, str] | None = None
    sets: Any = None
    negotiates: bool = False


class Model:
    """What QMP shows of the devices: the settable properties (updated on
    every accepted qom-set) and the rest (the first snapshot)."""

    def __init__(self) -> None:
        self.settable = {dev: {"requested-size": requested, "x-fail-discards": 0, "x-hold-requests": False,
                               "unplugged-quarantine": 0} for dev, (_, _, _, requested) in DEVICES.items()}
        self.snapshot: dict[str, dict[str, Any]] = {}

    # -- the oracle ---------------------------------------------------------------

    def expect(self, request: Any, negotiated: bool) -> Outcome:
        """QEMU's answer to ``request`` (monitor/qmp-dispatch.c qmp_dispatch,
        the generated marshallers, qom/qom-qmp-cmds.c)."""
        if not isinstance(request, dict):
            return Outcome("GenericError")
        for key, value in request.items():
            if key == "execute" and not isinstance(value, str):
                return Outcome("GenericError")
            if key == "arguments" and not isinstance(value, dict):
                return Outcome("GenericError")
            if key not in ("execute", "arguments", "id"):
                return Outcome("GenericError")
        if "execute" not in request:
            return Outcome("GenericError")
        name, args = request["execute"], request.get("arguments", {})
        if not negotiated and name != "qmp_capabilities":
            return Outcome("CommandNotFound")
        if name not in COMMANDS:
            return Outcome("CommandNotFound")
        for arg, kind, required in COMMANDS[name]:
            if arg not in args:
                if required:
                    return Outcome("GenericError")
                continue
            v = args[arg]
            if kind == "str" and not isinstance(v, str) or kind == "int" and not is_int(v):
                return Outcome("GenericError")
            if kind == "caps" and not (isinstance(v, list) and all(c == "oob" for c in v)):
                return Outcome("GenericError")
        if set(args) - {arg for arg, _, _ in COMMANDS[name]}:
            return Outcome("GenericError")
        return getattr(self, "_" + name.replace("-", "_"))(args, negotiated)

    def _qmp_capabilities(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        if negotiated:
            return Outcome("CommandNotFound")
        if args.get("enable"):
            return Outcome("GenericError")  # "Capability oob not available": none is offered
        return Outcome(check_return=lambda r: r == {}, negotiates=True)

    def _query_version(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: r["qemu"] == {"major": 11, "minor": 1, "micro": 0})

    def _query_commands(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: sorted(c["name"] for c in r) == sorted(COMMANDS))

    def _query_status(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: r == {"status": "running", "running": True})

    def memory_devices(self) -> list[dict[str, Any]]:
        return [{"type": "virtio-mem", "data": {
            "id": dev, "memaddr": 0, "node": 0, "requested-size": self.settable[dev]["requested-size"], "size": 0,
            "max-size": size, "block-size": block, "memdev": f"/objects/{memdev}"}}
            for dev, (memdev, size, block, _) in DEVICES.items()]

    def _query_memory_devices(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: r == self.memory_devices())

    def _query_memory_size_summary(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: r == {"base-memory": 0, "plugged-memory": 0})

    def _query_memdev(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        return Outcome(check_return=lambda r: [m["id"] for m in r] == [m for m, *_ in DEVICES.values()])

    def _x_query_numa(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        # No device names a node: "0 nodes", as QEMU without -numa (docs/monitor.md).
        return Outcome(check_return=lambda r: r == {"human-readable-text": "0 nodes\n"})

    def _human_monitor_command(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        if "cpu-index" in args:
            return Outcome("GenericError")
        return Outcome(check_return=lambda r: isinstance(r, str), touches=hmp_touches(args["command-line"]))

    def _qom_list(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        kind, _, _ = classify(args["path"])
        if kind == "none":
            return Outcome("DeviceNotFound")
        if kind == "ambiguous":
            return Outcome("GenericError")
        names = {"dev": DEVICE_PROPS, "backend": BACKEND_PROPS, "container": ()}[kind]
        return Outcome(check_return=lambda r: r[0] == {"name": "type", "type": "string"}
                       and set(names) <= {e["name"] for e in r})

    def _qom_get(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        kind, owner, qom_type = classify(args["path"])
        prop = args["property"]
        if kind in ("none", "ambiguous"):
            return Outcome("DeviceNotFound")
        if prop == "type":
            return Outcome(check_return=lambda r: r == qom_type)
        if kind == "dev" and prop in SETTABLE:
            return Outcome(check_return=lambda r: r == self.settable[owner][prop])
        if kind == "dev" and prop in VOLATILE:
            return Outcome(check_return=is_int)
        known = {"dev": DEVICE_PROPS, "backend": BACKEND_PROPS, "container": ()}[kind]
        if prop not in known:
            return Outcome("GenericError")
        return Outcome(check_return=lambda r: r == self.snapshot[owner][prop])

    def _qom_set(self, args: dict[str, Any], negotiated: bool) -> Outcome:
        kind, owner, _ = classify(args["path"])
        prop, v = args["property"], args["value"]
        if kind in ("none", "ambiguous"):
            return Outcome("DeviceNotFound")
        if kind != "dev":
            return Outcome("GenericError")  # containers have nothing settable, backends refuse in use
        refused = Outcome("GenericError", touches=(owner, prop) if prop in SETTABLE else None)
        _, size, block, _ = DEVICES[owner]
        if prop == "requested-size":
            ok = is_int(v) and 0 <= v <= size and v % block == 0
        elif prop == "x-fail-discards":
            ok = is_int(v) and 0 <= v <= UINT32_MAX
        elif prop == "x-hold-requests":
            ok = isinstance(v, bool)
        elif prop == "unplugged-quarantine":
            # A uint32 (QEMU's visitor takes integers only) that may only be 0.
            ok = is_int(v) and v == 0
        else:
            return refused  # read-only or unknown
        if not ok:
            return refused
        return Outcome(check_return=lambda r: r == {}, touches=(owner, prop), sets=v)


def hmp_touches(line: str) -> tuple[str, str] | None:
    """(device, property) an HMP line's qom-set names, if it is one on a path
    the fuzzer knows (the state then decides whether it was taken)."""
    if "qom-set" not in line:
        return None
    words = line.split()
    if words[1:2] == ["-j"]:
        del words[1]
    # Anything else that holds qom-set ("qom-set/x ...": the name ends at a
    # slash, monitor/hmp.c) may have set anything.
    if words[:1] != ["qom-set"] or len(words) < 3 or classify(words[1])[0] != "dev" or '"' in words[1]:
        return ("*", "*")
    return classify(words[1])[1], words[2]


_HMP_SET_RE = re.compile(r"qom-set ([^\s\"]+) (\S+) (.*)", re.DOTALL)
_SIZE_SUFFIX_BYTES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _decimal(digits: str) -> int:
    """A decimal number; past 30 significant digits, 2^64 (beyond every
    value here: the interpreter refuses int() of more than 4300 digits)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 30 else 1 << 64


def hmp_set_oracle(line: str) -> tuple[str, str, bool, Any, str | None] | None:
    """What an HMP ``qom-set PATH PROP VALUE`` (no -j) on a device must do,
    where the text is one whose reading QEMU and the fuzzer agree on
    (qapi/string-input-visitor.c: sizes as qemu_strtosz, decimal with k/M/G
    suffixes or 0x hex; integers in decimal without leading zeros or 0x hex;
    booleans on/off/yes/no/true/false/y/n): (device, property, taken, value,
    the error printed if known); None for any other line."""
    m = _HMP_SET_RE.fullmatch(line)
    if m is None or classify(m[1])[0] != "dev" or m[2] not in SETTABLE:
        return None
    dev, prop, text = classify(m[1])[1], m[2], m[3]
    _, size, block, _ = DEVICES[dev]
    hexadecimal = re.fullmatch(r"0x([0-9a-f]+)", text)
    value = int(hexadecimal[1], 16) if hexadecimal else None
    if prop == "requested-size":
        sized = re.fullmatch(r"([0-9]+)([KMG]?)", text)
        if sized is not None:
            value = _decimal(sized[1]) * _SIZE_SUFFIX_BYTES[sized[2]]
        if value is not None:
            # util/cutils.c do_strtosz: ERANGE past 2^64-1 (hmp's "out of range").
            erange = f"Error: Value '{text}' is out of range for parameter 'requested-size'\r\n"
            return dev, prop, value <= size and value % block == 0, value, erange if value > UINT64_MAX else None
        return (dev, prop, False, None, None) if text in ("-1", "abc", "1.5", "0x", "1e9", "on", "16E") else None
    if prop == "x-hold-requests":
        flags = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False,
                 "n": False}
        if text in flags:
            return dev, prop, True, flags[text], None
        return (dev, prop, False, None, None) if text in ("maybe", "0", "1", "abc", "1G") else None
    # uint32: x-fail-discards, unplugged-quarantine (only 0).
    if re.fullmatch(r"0|[1-9][0-9]*", text):
        value = _decimal(text)
    if value is not None:
        return dev, prop, value <= UINT32_MAX and (prop != "unplugged-quarantine" or value == 0), value, None
    return (dev, prop, False, None, None) if text in ("abc", "on", "1.5", "maybe", "1G", "2M") else None


# -- inputs ---------------------------------------------------------------------------------


def resync_suffix(data: bytes) -> bytes:
    """What ends whatever message ``data`` leaves open in the server's
    splitter (control/_framing.py: strings and bracket depth followed, a
    message complete when its outermost value closes): a quote for an open
    string (after a letter, should a backslash wait for its character), a
    bracket per open level."""
    depth, in_string, escape, mode = 0, False, False, "idle"
    for c in data:
        if in_string:
            if escape:
                escape = False
            elif c == 0x5C:
                escape = True
            elif c == 0x22:
                in_string = False
                if depth == 0:
                    mode = "idle"
            continue
        if mode == "token":
            if c in b' \t\r\n{}[]",:':
                mode = "idle"
            else:
                continue
        if c == 0x22:
            in_string = True
            mode = "struct"
        elif c in b"{[":
            depth += 1
            mode = "struct"
        elif c in b"}]":
            if depth:
                depth -= 1
                if depth == 0:
                    mode = "idle"
        elif mode == "idle" and c not in b' \t\r\n,:':
            mode = "token"
    return (b"n" if escape else b"") + (b'"' if in_string else b"") + b"]" * depth


class Generator:
    """The weighted grammar of inputs; each method returns one step (a
    JSON-able dict that ``Checker.step`` runs)."""

    def __init__(self, rng: Random) -> None:
        self.rng = rng

    def pick(self, *options: Any) -> Any:
        return self.rng.choice(options)

    # -- values ---------------------------------------------------------------------------

    def size(self, dev: str | None = None) -> Any:
        r = self.rng
        _, max_size, block, _ = DEVICES[dev or "vm0"]
        kind = r.randrange(16)
        if kind < 5:
            return r.randrange(max_size // block + 1) * block  # valid
        return self.pick(
            lambda: r.randrange(max_size // block + 1) * block + r.randrange(1, block),  # unaligned
            lambda: max_size + block * r.randrange(1, 4),  # above the device
            lambda: -r.randrange(1, 1 << 40), lambda: UINT64_MAX, lambda: 1 << 64, lambda: (1 << 64) + block,
            lambda: 1 << r.randrange(64, 200), lambda: -(1 << 64),
            lambda: float(r.randrange(max_size // block) * block), lambda: 1.5, lambda: 0.0, lambda: -0.0,
            lambda: self.pick("1G", "256M", "0x10000000", "0", "", "2097152", "1e9", "-1"),
            lambda: self.pick(True, False, None), lambda: [block], lambda: {"value": block},
            lambda: self.nested(r.randrange(1, 40)), lambda: 1e308,
        )()

    def nested(self, depth: int) -> Any:
        value: Any = self.pick(0, "x", None, {})
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"a": value}
        return value

    def scalar(self) -> Any:
        r = self.rng
        return self.pick(
            lambda: None, lambda: True, lambda: False, lambda: r.randrange(-(1 << 70), 1 << 70),
            lambda: r.uniform(-1e300, 1e300), lambda: self.text(), lambda: 0, lambda: -0.0, lambda: 5e-324,
        )()

    def text(self) -> str:
        r = self.rng
        return self.pick(
            lambda: "".join(r.choice("abc-_/ 0\u00e9\u20ac\U0001f600\ud800\udc00\x00\x1f\"\\'") for _ in
                            range(r.randrange(12))),
            lambda: "vm0", lambda: "requested-size", lambda: "", lambda: "x" * r.randrange(1, 5000),
        )()

    def any_json(self, depth: int = 0) -> Any:
        r = self.rng
        if depth > 3 or r.random() < 0.5:
            return self.scalar()
        if r.random() < 0.5:
            return [self.any_json(depth + 1) for _ in range(r.randrange(4))]
        return {self.text(): self.any_json(depth + 1) for _ in range(r.randrange(4))}

    def path(self) -> str:
        x = self.rng.random()
        if x < 0.6:
            return self.pick(*PATHS)
        if x < 0.9:  # components of the tree in any order: the resolution's corners
            parts = [self.pick("machine", "peripheral", "objects", "virtio-backend", "memdev", "", ".", "..", "type",
                               *DEVICES, *(m for m, *_ in DEVICES.values())) for _ in range(self.rng.randrange(1, 6))]
            return self.pick("", "/", "//") + "/".join(parts) + self.pick("", "", "/")
        return self.text()

    def prop(self, path: str) -> str:
        kind = classify(path)[0]
        r = self.rng.random()
        if r < 0.45 and kind == "dev":
            return self.pick(*SETTABLE)
        if r < 0.75:
            return self.pick(*DEVICE_PROPS, *BACKEND_PROPS, "type", "virtio-backend")
        return self.pick("nope", "", "Requested-size", "requested-size ", self.text())

    def qom_set_value(self, path: str, prop: str) -> Any:
        kind, owner, _ = classify(path)
        if prop == "requested-size" or self.rng.random() < 0.3:
            return self.size(owner if kind == "dev" else None)
        if prop == "x-hold-requests":
            return self.pick(True, False, 1, 0, "on", None)
        if prop in ("x-fail-discards", "unplugged-quarantine"):
            return self.pick(0, 0, 1, 7, UINT32_MAX, UINT32_MAX + 1, -1, 0.0, False, "0", None)
        return self.any_json()

    # -- requests ------------------------------------------------------------------------

    def command(self) -> dict[str, Any]:
        r = self.rng
        name = self.pick("qom-get", "qom-get", "qom-set", "qom-set", "qom-set", "qom-set", "qom-list",
                         "query-memory-devices", "query-status", "query-version", "query-commands",
                         "query-memory-size-summary", "query-memdev", "x-query-numa", "human-monitor-command",
                         "qmp_capabilities")
        args: dict[str, Any] = {}
        if name == "qom-set" and r.random() < 0.4:  # aimed: mostly taken, the model moves
            args["path"] = self.pick(*(p for p, (kind, _, _) in PATHS.items() if kind == "dev"))
            args["property"] = self.pick(*SETTABLE)
            args["value"] = self.qom_set_value(args["path"], args["property"])
        elif name in ("qom-get", "qom-set", "qom-list"):
            args["path"] = self.path()
            if name != "qom-list":
                args["property"] = self.prop(args["path"])
            if name == "qom-set":
                args["value"] = self.qom_set_value(args["path"], args["property"])
        elif name == "human-monitor-command":
            args["command-line"] = self.hmp_line()
            if r.random() < 0.1:
                args["cpu-index"] = self.pick(0, -1, "0", 1.0)
        elif name == "qmp_capabilities" and r.random() < 0.5:
            args["enable"] = self.pick(["oob"], [], ["x"], "oob", [1], None)
        # The argument errors: wrong types, missing, unknown members.
        if r.random() < 0.2:
            victim = self.pick(*args) if args and r.random() < 0.7 else self.pick("value", "bogus", "path", "id")
            action = r.randrange(3)
            if action == 0:
                args[victim] = self.any_json()
            elif action == 1:
                args.pop(victim, None)
            else:
                args[self.text() or "x"] = self.any_json()
        message: dict[str, Any] = {"execute": name}
        if args or r.random() < 0.1:
            message["arguments"] = args
        if r.random() < 0.4:
            message["id"] = self.any_json()
        return message

    def bad_request(self) -> Any:
        r = self.rng
        base = self.command()
        return self.pick(
            lambda: {**base, "execute": self.any_json()},
            lambda: {"arguments": base.get("arguments", {}), "id": 1},
            lambda: {**base, "arguments": self.pick([], "x", 1, None, True, [{"path": "vm0"}])},
            lambda: {**base, self.pick("exec-oob", "control", "Execute", "ID", self.text() or "x"): "query-status"},
            lambda: {"exec-oob": "query-status", "id": 1},
            lambda: {"execute": self.pick("quit", "qom_get", "query-cpus-fast", "device_add", "", "QOM-GET",
                                          "qom-get ", self.text()), "id": r.randrange(100)},
            lambda: self.pick([base], "qom-get", 17, None, True, [], {}),
        )()

    # -- steps ---------------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        r = self.rng
        x = r.random()
        if x < 0.33:
            return {"kind": "request", "hex": encode(self.command()).hex()}
        if x < 0.36:
            # Split over many writes (the splitter resumes in strings,
            # escapes, numbers and keywords: control/_framing.py).
            data = encode(self.command())
            return {"kind": "request", "hex": data.hex(),
                    "cuts": sorted(r.randrange(1, len(data)) for _ in range(r.randrange(1, 12)))}
        if x < 0.46:
            return {"kind": "request", "hex": encode(self.bad_request()).hex()}
        if x < 0.56:
            return {"kind": "raw", "hex": self.malformed().hex()}
        if x < 0.58:
            data = self.huge()
            # Sent whole or in pieces: the limit applies while a message arrives.
            cuts = sorted(r.randrange(1, len(data)) for _ in range(r.randrange(4))) if r.random() < 0.5 else []
            return {"kind": "raw", "hex": data.hex(), "cuts": cuts}
        if x < 0.60:
            return {"kind": "fresh", "hex": [encode(m).hex() for m in self.fresh_session()]}
        if x < 0.61:
            # Many requests in one write, none waited for: replies in order,
            # the server reading them in batches (control/_qmp.py _read_loop).
            messages, n = [], r.randrange(2, 400)
            while len(messages) < n:
                message = self.command()
                if message["execute"] != "human-monitor-command":  # its qom-set's value is not known
                    messages.append(message)
            return {"kind": "pipeline", "hex": [encode(m).hex() for m in messages]}
        if x < 0.615:
            # docs/monitor.md: a client that closes its sending side still
            # gets its output, then the server closes (echo ... | nc -U).
            line = self.pick(*(f"help {i}".strip() for i in HELP_ITEMS), *(f"info {i}".strip() for i in INFO_ITEMS),
                             "qom-list /", "qom-get vm0 size", "nope")
            return {"kind": "half-close", "hex": encode(self.command()).hex(), "line": line}
        if x < 0.63:
            data = encode(self.command())
            return {"kind": "truncated-close", "hex": data[:r.randrange(1, len(data))].hex()}
        if x < 0.64:
            return {"kind": "burst", "qmp": r.randrange(1, 2 * MAX_CLIENTS + 2), "hmp": r.randrange(0, MAX_CLIENTS + 2)}
        if x < 0.80:
            line = self.hmp_line()
            return {"kind": self.pick("hmp-line", "hmp-line", "hmp-via-qmp"), "hex": line.encode("latin-1", "replace")
                    .hex()}
        if x < 0.88:
            return {"kind": "hmp-raw", "hex": self.hmp_garbage().hex()}
        if x < 0.885:
            line = LONG_LINE_HEAD + b"a" * r.randrange(1, 1500)
            line += b" " * (r.randrange(3000, 6000) - len(line)) + b" x\n"
            return {"kind": "hmp-raw", "hex": line.hex()}
        return {"kind": "request", "hex": encode(self.command()).hex()}

    def fresh_session(self) -> list[Any]:
        """Messages on a new connection: commands before qmp_capabilities,
        the negotiation (maybe refused, maybe twice), commands after."""
        out = [self.command() if self.rng.random() < 0.7 else self.bad_request()
               for _ in range(self.rng.randrange(4))]
        for _ in range(self.rng.randrange(3)):
            caps: dict[str, Any] = {"execute": "qmp_capabilities"}
            if self.rng.random() < 0.3:
                caps["arguments"] = {"enable": self.pick(["oob"], [], ["oob", "oob"], ["x"])}
            out.append(caps)
            out += [self.command() for _ in range(self.rng.randrange(3))]
        return out

    def malformed(self) -> bytes:
        r = self.rng
        valid = encode(self.command())
        return self.pick(
            lambda: valid[:r.randrange(len(valid))],  # truncated (ended by resync_suffix)
            lambda: self.mutate(valid),
            lambda: valid + self.pick(b"}", b"]", b"garbage", b",", b"\x00", b"trux", b":", b'"', b"\xff"),
            lambda: b'{"execute": "qom-get", "arguments": {"path": "vm0\\x", "property": "size"}}',
            lambda: b'{"execute": "qom-get", "arguments": {"path": "\\ud800\\udfff\\ud800", "property": "size"}}',
            lambda: b'{"execute": "query-status", "id": "\\uZZZZ"}',
            lambda: b'{"execute": "query-status\xff\xfe"}',
            lambda: b'{"execute": "query-status", "id": "\xed\xa0\x80"}',  # a surrogate in UTF-8: invalid
            lambda: b'{"execute": "query-status", "id": "a\x00b"}',
            lambda: b"\x00" * r.randrange(1, 100),
            lambda: b'{"execute": "query-status", "id": ' + self.pick(b"1e400", b"-1e400", b"NaN", b"Infinity",
                                                                      b"1" * 400, b"0x10", b"01", b"1.", b"-",
                                                                      b"+1", b".5") + b"}",
            lambda: b'{"execute": "query-status", "id": 1, "id": 2}',
            lambda: b'{"execute": "query-status", "id": ' + b"9" * r.randrange(4000, 6000) + b"}",
            lambda: b"[" * (n := r.randrange(MAX_NESTING + 1, 20000)) + b"]" * n,
            lambda: b'{"a": ' * (n := r.randrange(MAX_NESTING + 1, 12000)) + b"1" + b"}" * n,
            lambda: b'{"execute": "qom-set", "arguments": {"path": "vm0", "property": "requested-size", "value": '
                    + b"[" * (n := r.randrange(800, MAX_NESTING)) + b"0" + b"]" * n + b"}}",
            lambda: b'{"execute": "query-status", "id": ' + b"[" * (n := r.randrange(900, MAX_NESTING))
                    + b"]" * n + b"}",
            lambda: bytes(r.randrange(256) for _ in range(r.randrange(1, 300))),
            lambda: b"}}}]]]" + valid,
            lambda: b"\xef\xbb\xbf" + valid,  # a BOM
            lambda: b" \t\r\n\x0b\x0c" + valid,
            lambda: b"".join(encode(self.command()) for _ in range(r.randrange(2, 20))),  # many in one read
        )()

    def mutate(self, data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(self.rng.randrange(1, 4)):
            i = self.rng.randrange(len(b))
            op = self.rng.randrange(3)
            if op == 0:
                b[i] = self.rng.randrange(256)
            elif op == 1:
                del b[i]
            else:
                b.insert(i, self.rng.choice(b'{}[]",:\\\x00\xff0e-'))
        return bytes(b)

    def huge(self) -> bytes:
        """Messages around the 1 MiB limit: under it they are parsed, over
        it refused at once and the rest discarded (control/_framing.py)."""
        r = self.rng
        fill = MAX_MESSAGE_BYTES + self.pick(-200, -60, 0, 1, 100, 4096, MiB // 2)
        head, tail, _ = self.pick(*HUGE)
        body = self.pick(b"a", b"\\n", b"\\u00e9", b"[", b"{")
        n = max(0, (fill - len(head) - len(tail)) // len(body))
        return head + body * n + tail + (encode(self.command()) if r.random() < 0.5 else b"")

    def hmp_line(self) -> str:
        r = self.rng
        path = self.path().replace(" ", "") or "vm0"
        prop = self.prop(path).replace(" ", "") or "size"
        dev_path, settable = self.pick(*(p for p, (kind, _, _) in PATHS.items() if kind == "dev")), self.pick(*SETTABLE)
        word = self.pick(
            lambda: f"qom-get {path} {prop}",
            lambda: f"qom-set {path} {prop} {self.hmp_value(prop)}",
            lambda: f"qom-set {dev_path} {settable} {self.hmp_value(settable)}",
            lambda: f"qom-set {dev_path} {settable} {self.hmp_value(settable)}",
            lambda: f"qom-set -j {path} {prop} {json.dumps(self.qom_set_value(path, prop))}",
            lambda: f"qom-set -{self.pick('x', '', 'jj')} {path} {prop} 0",
            # Nested as deep as a monitor line holds (2000 levels in 4000 bytes).
            lambda: f"qom-set -j {path} {prop} " + "[" * (n := r.randrange(1, 2000)) + "0" + "]" * n,
            lambda: f"qom-set -j {path} {prop} " + "9" * r.randrange(1, 6000),
            lambda: f"qom-list {self.pick(path, '', '/', path + ' extra')}",
            lambda: "info " + self.pick(*INFO_ITEMS),
            lambda: "help " + self.pick(*HELP_ITEMS),
            lambda: self.pick("?", "help", "info", "quit", "x", "system_reset", "qom-get", "qom-get vm0",
                              "qom-set vm0 requested-size", 'qom-get "vm0" "size"', 'qom-get "vm0 size',
                              'qom-get "v\\m0" size', "info/memdev", "  info   memdev  ", "qom-list / x"),
            lambda: self.text().replace("\n", " ").replace("\r", " "),
        )()
        if r.random() < 0.05:
            word += " " + "y" * r.randrange(100, 2000)
        return word

    def hmp_value(self, prop: str) -> str:
        r = self.rng
        return self.pick(
            lambda: f"{r.randrange(0, 1025)}M", lambda: f"{r.randrange(0, 3)}G", lambda: str(r.randrange(0, 1 << 31)),
            lambda: hex(r.randrange(0, 1 << 31)), lambda: f"{r.randrange(0, 4)}.{r.randrange(0, 100)}G",
            lambda: self.pick("-1", "16E", "18446744073709551615", "18446744073709551616", "0x", "1.5", "1e9",
                              "abc", "1 G", "0x1G", "+2M", " 2M", "1.5k", "on", "off", "yes", "no", "true", "maybe",
                              "0", "4294967296", "-0", "1B", "1P", "99999999999999999999999E"),
            # Past the interpreter's 4300 digits for int(): a size out of range,
            # as qemu_strtosz's ERANGE.
            lambda: self.pick("", "0" * r.randrange(1, 5000)) + "9" * r.randrange(1, 6000) + self.pick("", "M", "k"),
            lambda: "1." + "5" * r.randrange(1, 6000) + "G",
        )()

    def hmp_garbage(self) -> bytes:
        r = self.rng
        keys = [b"\x1b[A", b"\x1b[B", b"\x1b[C", b"\x1b[D", b"\x1b[3~", b"\x1b[1~", b"\x1b[4~", b"\x1bOF", b"\x1bOH",
                b"\x01", b"\x04", b"\x05", b"\x17", b"\x08", b"\x7f", b"\x9b", b"\x1b", b"\x1b[12", b"\x00", b"\t",
                b"\r", b"\n", b"\r\n", b"\xff", b"\x80"]
        parts = []
        for _ in range(r.randrange(1, 30)):
            x = r.random()
            if x < 0.4:
                parts.append(r.choice(keys))
            elif x < 0.7:
                parts.append(self.hmp_line().encode("latin-1", "replace")[: r.randrange(1, 40)])
            else:
                parts.append(bytes(r.randrange(256) for _ in range(r.randrange(1, 20))))
        return b"".join(parts)


#: Huge messages, a string filled up to around the size limit: (head, tail,
#: what the first reply must be at or under the limit).  Past it the reply is
#: "JSON message size limit exceeded".
HUGE = (
    (b'{"execute": "qom-get", "arguments": {"path": "', b'", "property": "size"}}',
     lambda r: r.get("error", {}).get("class") == "DeviceNotFound"),
    (b'{"execute": "query-status", "id": "', b'"}',
     lambda r: r.get("return") == {"status": "running", "running": True}),
    (b'{"execute": "human-monitor-command", "arguments": {"command-line": "', b'"}}',
     # A line of newlines is empty: nothing printed (monitor/hmp.c).
     lambda r: r.get("return", "").startswith("unknown command: '") or r.get("return") == ""),
)
INFO_ITEMS = ("memdev", "memory-devices", "memory_size_summary", "numa", "", "bogus", "mtree")
HELP_ITEMS = ("", "info", "qom-set", "info numa", "bogus", "info bogus", '"q', "qom-get x")
LONG_LINE_HEAD = b"qom-list "
HMP_WORD_BYTES = 1023
DEEP_HEADS = (b"[" * (MAX_NESTING + 1), b'{"a": ' * (MAX_NESTING + 1))


def encode(message: Any) -> bytes:
    # What a client writes: JSON text, non-ASCII escaped (lone surrogates
    # can only be sent so).
    return json.dumps(message).encode()


# -- running and checking steps ---------------------------------------------------------------


class Checker:
    """Runs steps against a server and holds the server to the rules."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.model = Model()
        self.sync_number = 0
        #: What the replies were (return, each error class, state changes,
        #: evictions): the summary line shows that the grammar reaches them all.
        self.tally: Counter[str] = Counter()
        self.main = self.open_qmp(negotiate=True)
        self.hmp = HmpConn(server.hmp_path)
        self.hmp_raw = HmpConn(server.hmp_path)
        #: The server's fds while only these three connections are open.
        self.fd_base = server.fd_count()
        self.model.snapshot = self.read_snapshot()
        for dev, (memdev, size, block, requested) in DEVICES.items():
            snap = self.model.snapshot[dev]
            check((snap["max-size"], snap["block-size"], snap["requested-size"], snap["size"])
                  == (size, block, requested, 0), f"{dev} at start: {snap}")
            check(snap["memdev"] == f"/objects/{memdev}" and memdev in self.model.snapshot, f"{dev}: {snap}")
        self.check_settable()

    def close(self) -> None:
        for conn in (self.main, self.hmp, self.hmp_raw):
            conn.close()

    def open_qmp(self, *, negotiate: bool) -> QmpConn:
        conn = QmpConn(self.server.qmp_path)
        if negotiate:
            conn.negotiate()
        return conn

    # -- state -------------------------------------------------------------------------

    def get(self, path: str, prop: str) -> Any:
        reply = self.main.request({"execute": "qom-get", "arguments": {"path": path, "property": prop}})
        check("return" in reply, f"qom-get {path} {prop}: {reply}")
        return reply["return"]

    def read_snapshot(self) -> dict[str, dict[str, Any]]:
        snap: dict[str, dict[str, Any]] = {}
        for dev, (memdev, *_) in DEVICES.items():
            for owner, path in ((dev, dev), (memdev, f"/objects/{memdev}")):
                listing = self.main.request({"execute": "qom-list", "arguments": {"path": path}})
                check("return" in listing, f"qom-list {path}: {listing}")
                snap[owner] = {e["name"]: self.get(path, e["name"]) for e in listing["return"]
                               if not e["type"].startswith("child<")}
        return snap

    def check_snapshot(self) -> None:
        """Every property of every object as at start, but the settable ones
        (as the model says)."""
        now = self.read_snapshot()
        for owner, props in now.items():
            for prop, value in props.items():
                if owner in DEVICES and prop in VOLATILE:
                    continue
                want = self.model.settable[owner][prop] if owner in DEVICES and prop in SETTABLE \
                    else self.model.snapshot[owner][prop]
                check(value == want, f"{owner}.{prop} is {value!r}, the model says {want!r}")
        reply = self.main.request({"execute": "query-memory-devices"})
        check(reply.get("return") == self.model.memory_devices(), f"query-memory-devices: {reply}")

    def check_settable(self, changed: tuple[str, str] | None = None) -> None:
        """The settable properties equal the model; ``changed`` = (device,
        property) may have changed (an HMP qom-set the output says was
        taken, or ("*", "*"): any): the model takes what the server reads."""
        for dev in DEVICES:
            for prop in SETTABLE:
                value = self.get(dev, prop)
                if changed is not None and (changed == ("*", "*") or changed == (dev, prop)):
                    self.model.settable[dev][prop] = value
                check(value == self.model.settable[dev][prop],
                      f"{dev}.{prop} is {value!r}, the model says {self.model.settable[dev][prop]!r}")

    # -- QMP ----------------------------------------------------------------------------

    def sync(self, conn: QmpConn, data: bytes, cuts: Sequence[int] = ()) -> list[Any] | None:
        """Send ``data`` (in pieces, one send each, cut at ``cuts``) and a
        probe (query-status with an id no input uses); the replies before the
        probe's, None if the connection closed."""
        suffix = resync_suffix(data)
        start = 0
        for cut in sorted(cuts):
            if not conn.pump(data[start:cut], lambda b: True):
                return None
            start = max(start, cut)
        data = data[start:]
        self.sync_number += 1
        sync_id = f"vmem-fuzz-sync-{self.sync_number}"
        probe = encode({"execute": "query-status", "id": sync_id})
        replies = conn.messages_until(lambda m: m.get("id") == sync_id, data + suffix + probe)
        if replies is None:
            return None
        want = {"return": {"status": "running", "running": True}, "id": sync_id} if conn.negotiated else \
            {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with "
                       "'qmp_capabilities'"}, "id": sync_id}
        check(replies[-1] == want, f"the probe after the input: {replies[-1]}")
        return replies[:-1]

    @staticmethod
    def check_shape(reply: Any) -> None:
        check(isinstance(reply, dict) and ("return" in reply) != ("error" in reply)
              and set(reply) <= {"return", "error", "id"}, f"not a QMP reply: {reply}")
        if "error" in reply:
            err = reply["error"]
            check(set(err) == {"class", "desc"} and isinstance(err["desc"], str)
                  and err["class"] in ("GenericError", "CommandNotFound", "DeviceNotFound"), f"error: {reply}")
            check(not err["desc"].startswith("Internal error"), f"an internal error: {str(reply)[:2000]}")

    def request(self, conn: QmpConn, data: bytes, cuts: Sequence[int] = ()) -> None:
        """One well-formed JSON message: its reply is the oracle's."""
        message = json.loads(data)
        outcome = self.model.expect(message, conn.negotiated)
        # The probe comes after the request: it sees the negotiation done.
        conn.negotiated = conn.negotiated or outcome.negotiates
        replies = self.sync(conn, data, cuts)
        check(replies is not None, "the connection closed after a request")
        check(len(replies) == 1, f"{len(replies)} replies to one request: {replies}")
        reply = replies[0]
        self.check_shape(reply)
        self.tally[reply["error"]["class"] if "error" in reply else "return"] += 1
        if isinstance(message, dict) and "id" in message and "id" not in reply:
            # docs/robustness.md: an id the server cannot encode is refused, without it.
            check(reply.get("error", {}).get("desc", "").startswith("QMP input member 'id' cannot be sent back"),
                  f"the id is missing: {str(reply)[:500]}")
            outcome = Outcome("GenericError", touches=outcome.touches)
        elif isinstance(message, dict) and "id" in message:
            check(reply["id"] == message["id"], f"id {str(reply['id'])[:200]} for {str(message['id'])[:200]}")
        else:
            check("id" not in reply, f"an id nobody sent: {reply}")
        if outcome.error is not None:
            check("error" in reply and reply["error"]["class"] == outcome.error,
                  f"expected {outcome.error} for {data[:300]!r}, got {str(reply)[:500]}")
        else:
            check("return" in reply, f"expected a return for {data[:300]!r}, got {str(reply)[:500]}")
            check(outcome.check_return(reply["return"]), f"wrong return for {data[:300]!r}: {str(reply)[:800]}")
        if outcome.sets is not None or (outcome.touches and outcome.error is None and "return" in reply):
            dev, prop = outcome.touches
            if message["execute"] == "qom-set":
                self.tally["taken"] += 1
                check(self.get(dev, prop) == outcome.sets, f"{dev}.{prop} after an accepted qom-set")
                self.model.settable[dev][prop] = self.get(dev, prop)
            else:  # human-monitor-command qom-set: taken if it printed nothing
                self.tally["taken" if reply["return"] == "" else "hmp-refused"] += 1
                self.check_settable(outcome.touches if reply["return"] == "" else None)
        elif outcome.touches:
            self.check_settable()

    def half_close(self, request: bytes, line: str) -> None:
        """A QMP request and a monitor line, each on a new connection that
        then shuts down its sending side: the reply and the output come,
        then the end of the connection."""
        conn = self.open_qmp(negotiate=True)
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # after the negotiation: this connection's last words
        finally:
            conn.close()
        conn = self.open_qmp(negotiate=True)
        try:
            message = json.loads(request)
            outcome = self.model.expect(message, True)
            conn.pump(request, lambda b: True)  # returns once all is sent
            conn.sock.shutdown(socket.SHUT_WR)
            check(not conn.pump(b"", lambda b: False), "QMP kept the connection open")
            replies = [json.loads(x) for x in bytes(conn.buf).splitlines()]
            replies = [r for r in replies if "event" not in r]
            check(len(replies) == 1, f"{len(replies)} replies after a half close: {str(replies)[:300]}")
            self.check_shape(replies[0])
            if outcome.error is not None:
                check(replies[0].get("error", {}).get("class") == outcome.error, f"{request[:200]!r}: {replies}")
            elif outcome.sets is not None:
                dev, prop = outcome.touches
                self.model.settable[dev][prop] = outcome.sets
        finally:
            conn.close()
        self.check_settable()
        hmp = HmpConn(self.server.hmp_path)
        try:
            hmp.pump(line.encode() + b"\n", lambda b: True)
            hmp.sock.shutdown(socket.SHUT_WR)
            check(not hmp.pump(b"", lambda b: False), "the monitor kept the connection open")
            out = bytes(hmp.buf)
        finally:
            hmp.close()
        echo_end = line.encode() + b"\x1b[K\r\n"
        check(echo_end in out and out.endswith(b"(qemu) "), f"{line!r} after a half close: {out[-300:]!r}")
        result = out[out.rindex(echo_end) + len(echo_end):-len(b"(qemu) ")].decode("latin-1")
        reply = self.main.request({"execute": "human-monitor-command", "arguments": {"command-line": line}})
        check(reply.get("return") == result, f"{line!r}: the monitor printed {result[:300]!r}, QMP {reply}")

    def pipeline(self, requests: list[bytes]) -> None:
        """Requests sent at once: one reply each, in order, each the oracle's
        with the model as the requests before it left it."""
        replies = self.sync(self.main, b"".join(requests))
        check(replies is not None and len(replies) == len(requests),
              f"{len(requests)} requests, {None if replies is None else len(replies)} replies")
        assert replies is not None
        for data, reply in zip(requests, replies):
            message = json.loads(data)
            outcome = self.model.expect(message, self.main.negotiated)
            self.check_shape(reply)
            self.tally[reply["error"]["class"] if "error" in reply else "return"] += 1
            check(reply.get("id") == message.get("id") or "id cannot be sent back" in str(reply),
                  f"reply {str(reply)[:300]} to {data[:300]!r}")
            if outcome.error is not None:
                check(reply.get("error", {}).get("class") == outcome.error,
                      f"expected {outcome.error} for {data[:300]!r}, got {str(reply)[:500]}")
            elif "id cannot be sent back" not in str(reply):
                check("return" in reply and outcome.check_return(reply["return"]),
                      f"for {data[:300]!r}: {str(reply)[:500]}")
                if outcome.sets is not None:
                    dev, prop = outcome.touches
                    self.model.settable[dev][prop] = outcome.sets
                    self.tally["taken"] += 1
        self.check_settable()

    def raw(self, conn: QmpConn, data: bytes, cuts: Sequence[int] = ()) -> None:
        """Bytes that need not be JSON: whatever the replies, all QMP, the
        connection answers the probe; state changes only with a return."""
        replies = self.sync(conn, data, cuts)
        check(replies is not None, f"the connection closed after {data[:200]!r}")
        for reply in replies:
            self.check_shape(reply)
            self.tally[reply["error"]["class"] if "error" in reply else "return"] += 1
        first = replies[0]["error"]["desc"] if replies and "error" in replies[0] else None
        for head, tail, under_limit in HUGE:
            if data.startswith(head) and len(data) > MAX_MESSAGE_BYTES // 2:
                size = data.index(tail) + len(tail)
                check(bool(replies), f"no reply to a message of {size} bytes")
                if size > MAX_MESSAGE_BYTES:
                    check(first == f"JSON message size limit exceeded ({MAX_MESSAGE_BYTES} bytes)",
                          f"{size} bytes: {str(replies)[:300]}")
                else:
                    check(under_limit(replies[0]), f"{size} bytes: {str(replies)[:300]}")
        if data.startswith(DEEP_HEADS):
            check(first == "JSON nesting depth limit exceeded" and len(replies) == 1, f"deep: {str(replies)[:300]}")
        self.check_settable(("*", "*") if any("return" in r for r in replies) else None)

    # -- the steps ---------------------------------------------------------------------------

    def step(self, step: dict[str, Any]) -> None:
        # Replies echo ids nested up to the server's 1024 levels: decoding
        # and comparing them takes more than the default 1000 frames.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 3 * MAX_NESTING + 1000))
        try:
            self._step(step)
        finally:
            sys.setrecursionlimit(limit)

    def _step(self, step: dict[str, Any]) -> None:
        kind = step["kind"]
        if kind in ("request", "raw"):
            data = bytes.fromhex(step["hex"])
            if kind == "request":
                self.request(self.main, data, step.get("cuts", []))
            else:
                self.raw(self.main, data, step.get("cuts", []))
        elif kind == "half-close":
            self.half_close(bytes.fromhex(step["hex"]), step["line"])
        elif kind == "pipeline":
            self.pipeline([bytes.fromhex(m) for m in step["hex"]])
        elif kind == "fresh":
            conn = self.open_qmp(negotiate=False)
            try:
                for message in step["hex"]:
                    self.request(conn, bytes.fromhex(message))
            finally:
                conn.close()
        elif kind == "truncated-close":
            # Half a message, then the client goes: nothing to resynchronise,
            # the server forgets it (and the next connection is served).
            conn = self.open_qmp(negotiate=True)
            conn.sock.sendall(bytes.fromhex(step["hex"]))
            conn.close()
            self.check_settable()
        elif kind == "burst":
            self.burst(step["qmp"], step["hmp"])
        elif kind in ("hmp-line", "hmp-via-qmp"):
            self.hmp_line(bytes.fromhex(step["hex"]).decode("latin-1"), via_qmp=kind == "hmp-via-qmp")
        elif kind == "hmp-raw":
            self.hmp_raw_input(bytes.fromhex(step["hex"]))
        else:
            raise FuzzFailure(f"unknown step {kind}")
        self.server.alive()

    def burst(self, n_qmp: int, n_hmp: int) -> None:
        """Connections at once, beyond the limit: each new one is greeted,
        exactly MAX_CLIENTS (the fuzzer's own included) stay served, the
        others are closed by the server (docs/robustness.md: the one idle the
        longest, negotiating ones first); then new ones replace the fuzzer's
        own that were closed."""
        # The connections of earlier steps must be gone first (the server
        # sees their end asynchronously), or they would count to the limit.
        fds = wait_fds_at_most(self.server, self.fd_base)
        check(fds <= self.fd_base, f"the server holds {fds} fds, {self.fd_base} with the fuzzer's three connections")
        conns: list[Conn] = []
        try:
            qmps = []
            for i in range(n_qmp):
                qmps.append(self.open_qmp(negotiate=i % 3 == 0))
                conns.append(qmps[-1])
            hmps = []
            for _ in range(n_hmp):
                hmps.append(HmpConn(self.server.hmp_path))
                conns.append(hmps[-1])
            qmp_alive = [self.sync(conn, b"") is not None for conn in [self.main, *qmps]]
            hmp_alive = [self.hmp_sync(conn, b"") is not None for conn in [self.hmp, self.hmp_raw, *hmps]]
            self.tally["evicted"] += qmp_alive.count(False) + hmp_alive.count(False)
            for what, alive in (("QMP", qmp_alive), ("monitor", hmp_alive)):
                check(sum(alive) == min(len(alive), MAX_CLIENTS),
                      f"{len(alive)} {what} clients, {sum(alive)} served; the limit is {MAX_CLIENTS}")
                check(alive[-1], f"the newest {what} client was closed")
            # Which QMP clients the policy closes (control/_qmp.py _evict): the
            # fuzzer's own is in command mode and idle the longest, the burst's
            # are negotiating (i % 3) or negotiated (their input came in order).
            pool = [(True, 0)]
            for i in range(n_qmp):
                if len(pool) >= MAX_CLIENTS:
                    pool.remove(min(pool))
                pool.append((i % 3 == 0, i + 1))
            want = [(i == 0 or (i - 1) % 3 == 0, i) in pool for i in range(n_qmp + 1)]
            check(qmp_alive == want, f"QMP clients served {qmp_alive}, the policy says {want}")
        finally:
            for conn in conns:
                conn.close()
        # Replaced once the burst is gone: a new client now would close another.
        fds = wait_fds_at_most(self.server, self.fd_base - (not qmp_alive[0]) - (not hmp_alive[0])
                               - (not hmp_alive[1]))
        if not qmp_alive[0]:
            self.main.close()
            self.main = self.open_qmp(negotiate=True)
        if not hmp_alive[0]:
            self.hmp.close()
            self.hmp = HmpConn(self.server.hmp_path)
        if not hmp_alive[1]:
            self.hmp_raw.close()
            self.hmp_raw = HmpConn(self.server.hmp_path)

    # -- HMP ----------------------------------------------------------------------------------

    def hmp_sync(self, conn: HmpConn, data: bytes) -> bytes | None:
        """Send ``data``, then end its line (^B leaves any escape sequence
        of the line editor and is ignored otherwise; util/readline.c) and a
        line the monitor answers "unknown command: 'vmem-sync-N'"; what came
        before that answer, None if the connection closed."""
        self.sync_number += 1
        marker = f"vmem-sync-{self.sync_number}".encode()
        end = b"\r\nunknown command: '" + marker + b"'\r\n(qemu) "
        conn.buf.clear()
        if not conn.pump(data + b"\x02\n" + marker + b"\n", lambda b: b.endswith(end)):
            return None
        out = bytes(conn.buf)
        conn.buf.clear()
        check(out.count(end) == 1, f"the monitor answered the sync line {out.count(end)} times")
        return out[:-len(end)]

    def hmp_result(self, line: str) -> str:
        """The text the monitor socket printed for one plain line."""
        data = line.encode("latin-1")
        out = self.hmp_sync(self.hmp, data + b"\n")
        check(out is not None, f"the monitor closed the connection after {data[:200]!r}")
        assert out is not None
        # The echo ends with the whole line, ESC [ K and Enter's \r\n; then the
        # result and the prompt; the ^B-and-Enter line adds "\r\n(qemu) ".
        if data:
            echo_end = data + b"\x1b[K\r\n"
            check(echo_end in out, f"no echo of the line in {out[-500:]!r}")
            out = out[out.rindex(echo_end) + len(echo_end):]
        else:
            check(out.startswith(b"\r\n"), f"an empty line: {out[:200]!r}")
            out = out[2:]
        check(b"(qemu) \r\n(qemu) " in out, f"no prompt after the result: {out[-300:]!r}")
        result = out[:out.rindex(b"(qemu) \r\n(qemu) ")]
        return result.decode("latin-1")

    def hmp_line(self, line: str, *, via_qmp: bool) -> None:
        """One command line: on the monitor socket (its output must be what
        human-monitor-command prints for it, for a line that changes
        nothing) or through human-monitor-command; a qom-set is taken when
        it prints nothing, and only then may the state change."""
        touches = hmp_touches(line)
        plain = len(line.encode("latin-1")) < READLINE_CMD_BUF_SIZE and all(" " <= c < "\x7f" or c > "\x9f"
                                                                             for c in line)
        if via_qmp or not plain:
            reply = self.main.request({"execute": "human-monitor-command", "arguments": {"command-line": line}})
            self.check_shape(reply)
            check("return" in reply and isinstance(reply["return"], str), f"human-monitor-command: {reply}")
            output = reply["return"]
        else:
            output = self.hmp_result(line)
            if touches is None:
                reply = self.main.request({"execute": "human-monitor-command", "arguments": {"command-line": line}})
                check(reply.get("return") == output,
                      f"the monitor printed {output[:500]!r}, human-monitor-command {str(reply)[:500]}")
        check("Internal error" not in output, f"{line[:200]!r}: {output[:500]!r}")
        self.tally["hmp"] += 1
        oracle = hmp_set_oracle(line)
        if oracle is not None:
            dev, prop, taken, value, error = oracle
            check((output == "") == taken, f"{line[:300]!r} printed {output[:300]!r}: the oracle says "
                  f"{'taken' if taken else 'refused'}")
            check(error is None or output == error,
                  f"{line[:300]!r} printed {output[:300]!r}, not {(error or '')[:300]!r}")
            if taken:
                check(self.get(dev, prop) == value, f"{line!r}: {dev}.{prop} is {self.get(dev, prop)!r}")
            self.tally["hmp-oracle"] += 1
        if touches is not None:
            self.tally["taken" if output == "" else "hmp-refused"] += 1
            self.check_settable(touches if output == "" else None)

    def hmp_raw_input(self, data: bytes) -> None:
        out = self.hmp_sync(self.hmp_raw, data)
        check(out is not None, f"the monitor closed the connection after {data[:200]!r}")
        assert out is not None
        check(b"Internal error" not in out, f"{data[:200]!r}: {out[-500:]!r}")
        if data.startswith(LONG_LINE_HEAD) and data.endswith(b" x\n") and b"\r" not in data:
            # The line editor keeps READLINE_CMD_BUF_SIZE bytes and drops the
            # rest (util/readline.c): the "x" at the end is extraneous if it
            # was kept.  The path is cut to get_str's 1024-byte buffer
            # (monitor/hmp.c).
            path_bytes = len(data.split(b" ")[1])
            if len(data) - 2 < READLINE_CMD_BUF_SIZE:
                want = b"\r\nqom-list: extraneous characters at the end of line\r\n"
            else:
                want = b"\r\nError: Device '" + b"a" * min(path_bytes, HMP_WORD_BYTES) + b"' not found\r\n(qemu) "
            check(want in out, f"a line of {len(data) - 1} bytes: {out[-300:]!r}")
            self.tally["long-line"] += 1
        self.check_settable(("*", "*") if b"qom-set" in data or b"\x1b[A" in data else None)


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture
def server():
    srv = Server()
    try:
        yield srv
    finally:
        rc, err = srv.stop()
    # Killed by a signal is a negative code: the defect itself.  ERROR lines
    # (the only ones, --log-level error) are a bug's traceback.
    assert rc == 0, f"serve exited with {rc}:\n{err[-3000:]}"
    assert "Traceback" not in err and " ERROR " not in err, err[-3000:]


def wait_fds_at_most(server: Server, bound: int) -> int:
    """The server's fd count once its closed connections are gone (it sees
    their end asynchronously), at most TIMEOUT_S; the last count."""
    deadline = time.monotonic() + TIMEOUT_S
    while (count := server.fd_count()) > bound and time.monotonic() < deadline:
        select.select([], [], [], 0.01)  # poll interval of a condition awaited under a deadline
    return count


def replay(steps: list[dict[str, Any]], server: Server) -> None:
    checker = Checker(server)
    try:
        for step in steps:
            checker.step(step)
        checker.check_snapshot()
    finally:
        checker.close()


def test_qmp_and_hmp_fuzz(server):
    n = budget(ci=3000, long=10000)
    with FuzzRun("qmp", unit="inputs") as run:
        started = time.monotonic()
        checker = Checker(server)
        # The server's own fds, without the fuzzer's three connections.
        fd_start, rss_start = server.fd_count() - 3, server.rss_bytes()
        gen = Generator(run.rng)
        try:
            for i in range(n):
                step = gen.step()
                run.record(step)
                checker.step(step)
                run.done()
                if i % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1:
                    checker.check_snapshot()
            checker.check_snapshot()
        finally:
            checker.close()
        fd_end = wait_fds_at_most(server, fd_start)
        rss_end = server.rss_bytes()
        run.extra.update({"fds": f"{fd_start}->{fd_end}", "rss_MiB": f"{rss_start / MiB:.0f}->{rss_end / MiB:.0f}",
                          "wall_s": f"{time.monotonic() - started:.0f}",
                          "outcomes": " ".join(f"{k}={v}" for k, v in sorted(checker.tally.items()))})
        check(fd_end <= fd_start + FD_SLACK, f"the server holds {fd_end} fds, {fd_start} at start")
        check(rss_end < rss_start + RSS_BOUND_BYTES, f"RSS {rss_start} -> {rss_end}")


#: The known-good reproducer the regression test replays while there is no
#: real one (tests/fuzzing.py): one of each step kind.
GOOD = "qmp-known-good.json"


REGRESSIONS = list(regressions("qmp"))


@pytest.mark.parametrize("name,repro", REGRESSIONS, ids=[name for name, _ in REGRESSIONS])
def test_qmp_fuzz_regression(server, name, repro):
    assert repro["fuzzer"] == "qmp" and repro["inputs"], name
    replay(repro["inputs"], server)


def test_the_path_model_says_what_the_hand_written_table_says():
    # The oracle's resolution (classify) against paths whose meaning is
    # known from QEMU's own behaviour (qom/object.c), so that neither can
    # drift alone.
    assert {path: classify(path) for path in PATHS} == PATHS


def test_the_known_good_reproducer_holds_every_step_kind():
    kinds = {step["kind"] for _, repro in regressions("qmp") if _ == GOOD for step in repro["inputs"]}
    assert kinds == {"request", "raw", "fresh", "pipeline", "half-close", "truncated-close", "burst", "hmp-line",
                     "hmp-via-qmp", "hmp-raw"}
