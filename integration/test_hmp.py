"""The human monitor (HMP) of ``vfiouser-vmem serve --monitor PATH`` next to
a real QEMU 11's, command for command.

QEMU is the kit's, paused (``-S``, no guest: nothing is plugged), with two
in-process ``virtio-mem-pci`` devices on two NUMA nodes as in the virtio-mem
user guide's NUMA example and an HMP monitor on a UNIX socket
(``-chardev socket,...`` + ``-mon chardev=...,mode=readline``).  Our server
runs the same two devices (same ids, memdev ids, sizes, nodes and
requested sizes).  Both monitors get the same commands (``COMMANDS``) and
their replies are compared line by line, also the bytes around them: the
banner, QEMU's readline echo of the typed line (``qemu_echo``), ``\\r\\n``
line ends and the ``(qemu)`` prompt.  Only what a VM alone knows may differ
(memaddr, boot memory, CPUs, QEMU's own objects...): ``Differs`` rules, per
command, say which lines and why.  A difference no rule names fails, and so
does a rule that matches none of QEMU's lines (the table stays true to
QEMU).  The same commands go through QMP ``human-monitor-command`` on both.

What needs a guest (the plugged ``size``) is checked on its own: a real
guest on our server's two devices plugs memory, and the monitor's
``size``/``plugged`` lines must equal what the guest's own memory blocks
show.  The last test runs the guide's ``echo "info memory-devices" | nc -U
MONITOR`` as it is.

Every QEMU, server and nc started here is stopped by PID, also on failure
(and the logs are printed then); the work directory is removed by the
``workdir`` fixture.
"""

from __future__ import annotations

import difflib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    GIB,
    MIB,
    Guest,
    Kit,
    QmpClient,
    QmpError,
    ServerProcess,
    kvm_works,
    node_failed,
    stop_and_report,
    stop_process,
    wait_for,
)

BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180
START_TIMEOUT_S = 60
REPLY_TIMEOUT_S = 30

PROMPT = b"(qemu) "

#: The two devices of the guide's NUMA example: (id, memdev id, max size, node, requested-size).
DEVICES = (("vm0", "vmem0mem", "8G", 0, "1G"), ("vm1", "vmem1mem", "4G", 1, "0"))


#: QEMU 11.1.3's reply to "info memory-devices" after the echo, once COMMANDS ran
#: (vm0 requested 4G, vm1 1G; paused, so nothing plugged).
QEMU_INFO_MEMORY_DEVICES = (
    b'\r\nMemory device [virtio-mem]: "vm0"\r\n  memaddr: 0x100000000\r\n  node: 0\r\n'
    b'  requested-size: 4294967296\r\n  size: 0\r\n  max-size: 8589934592\r\n  block-size: 2097152\r\n'
    b'  memdev: /objects/vmem0mem\r\n'
    b'Memory device [virtio-mem]: "vm1"\r\n  memaddr: 0x300000000\r\n  node: 1\r\n'
    b'  requested-size: 1073741824\r\n  size: 0\r\n  max-size: 4294967296\r\n  block-size: 2097152\r\n'
    b'  memdev: /objects/vmem1mem\r\n(qemu) ')


def qemu_echo(line: str) -> bytes:
    """What QEMU's readline (util/readline.c) sends back while a line is typed:
    after each byte it redraws the line, moving the cursor back over what it
    drew before (``ESC [ D`` per character), printing the line so far and
    erasing the rest (``ESC [ K``).  ``Enter`` then sends ``\\r\\n``."""
    data = line.encode()
    return b"".join(b"\x1b[D" * (n - 1) + data[:n] + b"\x1b[K" for n in range(1, len(data) + 1))


def render(data: bytes) -> str:
    """What a terminal shows for ``data`` (only the sequences the monitors
    send: ``ESC [ D``, ``ESC [ K``, ``\\r``, ``\\n``)."""
    lines, line, col = [], [], 0
    i = 0
    while i < len(data):
        if data.startswith(b"\x1b[D", i):
            col = max(0, col - 1)
            i += 3
            continue
        if data.startswith(b"\x1b[K", i):
            del line[col:]
            i += 3
            continue
        c = chr(data[i])
        i += 1
        if c == "\r":
            col = 0
        elif c == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = c
            else:
                line.append(c)
            col += 1
    lines.append("".join(line))
    return "\n".join(lines)


@dataclass
class Reply:
    raw: bytes  # everything after the command was sent, up to and with the prompt
    echo: bytes  # the readline echo, before the first \r\n
    lines: list[str]  # the output lines, without their \r\n


class Hmp:
    """A client of a readline-mode HMP monitor on a UNIX socket."""

    def __init__(self, path: str, timeout_s: float = START_TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def connected() -> bool:
            try:
                self.sock.connect(path)
                return True
            except (FileNotFoundError, ConnectionRefusedError):
                return False

        self._buf = b""
        try:
            wait_for(connected, timeout_s, f"the monitor socket {path}")
            self.banner = self._until_prompt(timeout_s)
        except BaseException:
            self.sock.close()
            raise

    def _until_prompt(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while not self._buf.endswith(PROMPT):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no prompt within {timeout_s:.0f} s; got {self._buf[-2000:]!r}")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise EOFError(f"the monitor closed the connection; got {self._buf[-2000:]!r}")
            self._buf += data
        out, self._buf = self._buf, b""
        return out

    def command(self, line: str, timeout_s: float = REPLY_TIMEOUT_S) -> Reply:
        self.sock.sendall(line.encode() + b"\n")
        raw = self._until_prompt(timeout_s)
        end_of_echo = raw.find(b"\r\n")
        assert end_of_echo >= 0, f"{line!r}: no \\r\\n before the prompt: {raw!r}"
        body = raw[end_of_echo + 2:-len(PROMPT)]
        # Every output line ends in \r\n (QEMU's monitor_puts); no bare \n.
        assert body == b"" or body.endswith(b"\r\n"), f"{line!r}: output does not end in \\r\\n: {body!r}"
        assert b"\n" not in body.replace(b"\r\n", b""), f"{line!r}: a bare \\n in {body!r}"
        lines = body.decode().split("\r\n")[:-1] if body else []
        return Reply(raw, raw[:end_of_echo], lines)

    def close(self) -> None:
        self.sock.close()


# -- what may differ, and why ------------------------------------------------


@dataclass(frozen=True)
class Differs:
    """Lines of one command's reply that may differ between QEMU and us.

    ``kind`` "value": the line is on both sides and matches ``pattern``
    (fullmatch) on both; only the group ``v`` may differ.  "qemu-only": a
    line of QEMU's matching ``pattern`` that our reply may lack.
    "ours-only": a line of ours matching ``pattern`` that QEMU's lacks."""

    pattern: str
    why: str
    kind: str = "value"


VERSION = Differs(r"QEMU (?P<v>\d+\.\d+\.\d+) monitor - type 'help' for more information",
                  "the kit's QEMU is 11.1.3; the server names the QEMU release whose QMP it mimics "
                  "(11.1.0, control/_qmp.py QEMU_VERSION)")
MEMADDR = Differs(r"  memaddr: (?P<v>0x[0-9a-f]+)",
                  "the guest-physical address: QEMU places the device in its device-memory region "
                  "at realize; ours is the memory BAR, which only a guest's firmware assigns (0 before)")
NUMA_NODES = Differs(r"(?P<v>\d+) nodes",
                     "the VM's -numa options define its nodes; the server only knows the nodes its "
                     "devices name")
NUMA_CPUS = Differs(r"node \d+ cpus:(?P<v>( \d+)*)", "the VM's vCPUs")
NUMA_SIZE = Differs(r"node \d+ size: (?P<v>\d+) MB",
                    "the node's boot memory (a VM's) plus what is plugged; the server has no boot memory")
#: help lines of QEMU commands that the server does not have (a VM's), and
#: their continuation lines.
OTHER_HELP = Differs(r"(?!(help\|\?|info|qom-get|qom-set|qom-list) ).*|\t.*|\[.*",
                     "help of QEMU's other commands: they act on a VM (the server's are help, info, "
                     "qom-get, qom-set, qom-list)", "qemu-only")
# (qom-set's own "\t\t\t-j: ..." line falls under "\t.*" in ``help``; ``help qom-set`` has no rule.)


def props_only_qemu(names: str, why: str) -> Differs:
    return Differs(rf"({names}) \(.*\)", why, "qemu-only")


#: (command, ordered, rules).  ``ordered`` False: the lines are compared as
#: a set (QEMU's qom-list order is its hash table's).
COMMANDS: list[tuple[str, bool, tuple[Differs, ...]]] = [
    ("info memory-devices", True, (MEMADDR,)),
    ("info memory_size_summary", True,
     (Differs(r"base memory: (?P<v>\d+)", "the VM's boot memory (-m); the server owns none (0, as its QMP's "
                                          "query-memory-size-summary)"),)),
    ("info numa", True, (NUMA_NODES, NUMA_CPUS, NUMA_SIZE)),
    ("qom-list /", False,
     (Differs(r"machine \(child<(?P<v>[^>]+)>\)", "QEMU's machine type (pc-q35-11.1-machine); the server "
                                                  "has no machine, only /machine/peripheral"),
      Differs(r"(backend|chardevs|audiodevs) \(child<container>\)",
              "containers of a VM's block backends, character devices and audio devices", "qemu-only"))),
    ("qom-list /machine/peripheral", False, ()),
    ("qom-list /objects", False,
     (Differs(r"mem[01] \(child<memory-backend-ram>\)", "the guest's boot RAM backends (-numa memdev=)",
              "qemu-only"),
      Differs(r"compat_monitor\d+ \(child<monitor-(hmp|qmp)>\)",
              "the objects QEMU makes for its -mon and -qmp monitors", "qemu-only"))),
    ("qom-list /objects/vmem0mem", False,
     (props_only_qemu(r"vmem0mem\[0\]", "the backend's MemoryRegion child, a VM's RAM block"),)),
    ("qom-get /objects/vmem0mem dump", True, ()),
    ("qom-get /objects/vmem0mem policy", True, ()),
    ("qom-get /objects/vmem0mem host-nodes", True, ()),
    ("qom-get /objects/vmem0mem seal", True, ()),
    ("qom-list vm0", False,
     (Differs(r"(?!(type|size|requested-size|block-size|memaddr|node|memdev) ).*",
              "the PCI proxy's and virtio transport's properties and memory regions (a VM's device model)",
              "qemu-only"),
      Differs(r"(max-size|discard-pending|unplugged-found|unplugged-reclaimed|unplugged-episodes|unplugged-access"
              r"|unplugged-quarantine|scrub-interval|scrub-passes|x-fail-discards|x-hold-requests"
              r"|x-requests-pending) \(.*\)",
              "the server's own properties (README: discard-pending, docs/scrub.md, testing aids; max-size is "
              "query-memory-devices' field, not a QOM property in QEMU)", "ours-only"))),
    ("qom-get vm0 requested-size", True, ()),
    ("qom-get /machine/peripheral/vm0 requested-size", True, ()),
    ("qom-get vm0 size", True, ()),  # no guest: nothing plugged on either side
    ("qom-get vm0 memaddr", True,
     (Differs(r"(?P<v>\d+)", MEMADDR.why),)),
    ("qom-get vm0 node", True, ()),
    ("qom-get vm0 block-size", True, ()),
    ("qom-get vm0 memdev", True, ()),
    ("qom-get /objects/vmem0mem size", True, ()),
    ("qom-set vm0 requested-size 2G", True, ()),
    ("qom-get vm0 requested-size", True, ()),
    ("qom-set vm0 requested-size 4G", True, ()),
    ("qom-set vm1 requested-size 1073741824", True, ()),
    ("info memory-devices", True, (MEMADDR,)),
    ("qom-set vm0 size 1G", True, ()),
    ("qom-set vm0 requested-size 3", True, ()),
    ("qom-set vm0 requested-size 9G", True, ()),
    ("qom-get vm0 nope", True, ()),
    ("qom-get /nope size", True, ()),
    ("qom-list /nope", True, ()),
    ("qom-get", True, ()),
    ("qom-set vm0 requested-size", True, ()),
    ("info memory-devices extra", True, ()),
    ("foo", True, ()),
    ("", True, ()),
    ("help qom-get", True, ()),
    ("help qom-set", True, ()),
    ("help qom-list", True, ()),
    ("help help", True, ()),
    ("help info", True,
     (Differs(r"info (?!(memdev|memory-devices|memory_size_summary|numa) ).*",
              "info subcommands the server does not have: they show a VM's state", "qemu-only"),)),
    ("help", True, (OTHER_HELP,)),
]

#: What goes through QMP human-monitor-command (the reply: the same text, \r\n line ends).
QMP_COMMANDS = ["info memory-devices", "info memory_size_summary", "info numa", "qom-get vm0 requested-size",
                "qom-get vm0 size", "foo", "qom-get /nope size"]


def rules_for(command: str) -> tuple[Differs, ...]:
    for cmd, _, rules in COMMANDS:
        if cmd == command:
            return rules
    raise KeyError(command)


def normalise(line: str, rules: tuple[Differs, ...]) -> str:
    for rule in rules:
        if rule.kind != "value":
            continue
        m = re.fullmatch(rule.pattern, line)
        if m:
            return line[:m.start("v")] + "<differs>" + line[m.end("v"):]
    return line


def compare(command: str, ordered: bool, rules: tuple[Differs, ...], qemu: list[str], ours: list[str],
            used: set[Differs]) -> list[str]:
    """The unexpected differences (unified diff lines); marks in ``used`` the
    rules that matched a line of QEMU's."""
    for rule in rules:
        side = ours if rule.kind == "ours-only" else qemu
        if any(re.fullmatch(rule.pattern, line) for line in side):
            used.add(rule)
    only_qemu = [r for r in rules if r.kind == "qemu-only"]
    only_ours = [r for r in rules if r.kind == "ours-only"]
    q = [normalise(line, rules) for line in qemu
         if line in ours or not any(re.fullmatch(r.pattern, line) for r in only_qemu)]
    o = [normalise(line, rules) for line in ours
         if line in qemu or not any(re.fullmatch(r.pattern, line) for r in only_ours)]
    if not ordered:
        q, o = sorted(q), sorted(o)
    if q == o:
        return []
    return list(difflib.unified_diff(q, o, f"QEMU: {command}", f"ours: {command}", lineterm="", n=1))


# -- the processes -----------------------------------------------------------


class Qemu:
    """The kit's QEMU, paused, with the guide's two virtio-mem devices, an
    HMP monitor and a QMP socket."""

    def __init__(self, kit: Kit, workdir: Path) -> None:
        self.monitor = str(workdir / "qemu.mon")
        self.qmp_path = str(workdir / "qemu.qmp")
        self.log_path = workdir / "qemu-hmp.log"
        accel = ["-accel", "kvm", "-cpu", "host"] if kvm_works() else ["-accel", "tcg", "-cpu", "qemu64"]
        devices = []
        for dev_id, memdev, size, node, requested in DEVICES:
            # dump=off,merge=off: the server's defaults for a device's backend
            # (docs/backends.md), so that info memdev / query-memdev compare.
            devices += ["-object", f"memory-backend-memfd,id={memdev},size={size},share=on,dump=off,merge=off",
                        "-device", f"virtio-mem-pci,id={dev_id},memdev={memdev},node={node},"
                                   f"requested-size={requested}"]
        self.argv = [
            kit.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-machine", "q35", *accel,
            "-m", "2G,maxmem=20G", "-smp", "2",
            "-object", "memory-backend-ram,id=mem0,size=1G", "-object", "memory-backend-ram,id=mem1,size=1G",
            "-numa", "node,nodeid=0,cpus=0,memdev=mem0", "-numa", "node,nodeid=1,cpus=1,memdev=mem1",
            *devices,
            "-chardev", f"socket,id=mon0,path={self.monitor},server=on,wait=off",
            "-mon", "chardev=mon0,mode=readline",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log_file.close()


def server_device_args(workdir: Path) -> list[str]:
    args = []
    for dev_id, memdev, size, node, requested in DEVICES:
        args += ["--object", f"memory-backend-memfd,id={memdev},size={size},share=on",
                 "--device", f"id={dev_id},memdev={memdev},socket={workdir / dev_id}.sock,node={node},"
                             f"requested-size={requested}"]
    return args


class MonitorServer(ServerProcess):
    """``vfiouser-vmem serve --monitor PATH`` with the two devices."""

    def __init__(self, workdir: Path) -> None:
        self.id = "vmem-hmp"
        self.monitor = str(workdir / "vmem.mon")
        self.sockets = [f"{workdir / dev_id}.sock" for dev_id, *_ in DEVICES]
        super().__init__(workdir, self.id, ["--monitor", self.monitor, *server_device_args(workdir)])


def monitor_supported() -> bool:
    from harness import VFIOUSER_VMEM

    out = subprocess.run([VFIOUSER_VMEM, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    return "--monitor" in out


needs_monitor = pytest.mark.skipif(not monitor_supported(), reason="vfiouser-vmem serve has no --monitor yet")


@pytest.fixture
def procs(request, kit, workdir):
    """QEMUs, servers, guests and HMP clients a test starts; all stopped by
    PID at the end (clients and guests first), logs printed on failure."""
    started: list = []

    class Procs:
        def qemu(self) -> Qemu:
            q = Qemu(kit, workdir)
            started.append(q)
            return q

        def server(self) -> MonitorServer:
            s = MonitorServer(workdir)
            started.append(s)
            return s

        def guest(self, sockets: list[str], **kw) -> Guest:
            g = Guest(kit, workdir, sockets, **kw)
            started.append(g)
            return g

        def hmp(self, path: str) -> Hmp:
            h = Hmp(path)
            started.append(h)
            return h

        def qmp(self, path: str) -> QmpClient:
            wait_for(lambda: os.path.exists(path), START_TIMEOUT_S, f"the QMP socket {path}")
            c = QmpClient(path, timeout_s=REPLY_TIMEOUT_S)
            started.append(c)
            return c

    yield Procs()
    failed = node_failed(request)
    order = {Hmp: 0, QmpClient: 0, Guest: 1, Qemu: 2}
    for thing in sorted(reversed(started), key=lambda t: order.get(type(t), 3)):
        if isinstance(thing, (Hmp, QmpClient)):
            try:
                thing.close()
            except OSError:
                pass
            continue
        stop_and_report(thing, failed)


# -- the tests ---------------------------------------------------------------


def test_qemu_monitor_is_what_the_comparison_assumes(procs):
    """QEMU's half alone (runs without --monitor): its banner, echo and
    prompt are what ``Hmp`` and ``qemu_echo`` model, and every ``Differs``
    rule matches a line of QEMU's (no stale rule)."""
    qemu = procs.qemu()
    hmp = procs.hmp(qemu.monitor)
    assert re.fullmatch(VERSION.pattern + r"\r\n\(qemu\) ", hmp.banner.decode()), hmp.banner
    used: set[Differs] = set()
    for command, ordered, rules in COMMANDS:
        reply = hmp.command(command)
        assert reply.echo == qemu_echo(command), (command, reply.echo)
        assert render(reply.echo) == command
        compare(command, ordered, rules, reply.lines, reply.lines, used)
    stale = {r for _, _, rules in COMMANDS for r in rules if r.kind != "ours-only"} - used
    assert not stale, f"rules that match no line of QEMU's: {stale}"
    # The recorded bytes (QEMU 11.1.3), requested sizes as the table's qom-sets left them.
    assert hmp.command("info memory-devices").raw == qemu_echo("info memory-devices") + QEMU_INFO_MEMORY_DEVICES


@needs_monitor
def test_monitor_matches_qemu_line_by_line(procs):
    qemu = procs.qemu()
    server = procs.server()
    theirs, ours = procs.hmp(qemu.monitor), procs.hmp(server.monitor)

    # The banner: the version may differ, nothing else; the prompt is QEMU's.
    assert compare("banner", True, (VERSION,), theirs.banner.decode().split("\r\n"),
                   ours.banner.decode().split("\r\n"), set()) == []

    unexpected: list[str] = []
    for command, ordered, rules in COMMANDS:
        q, o = theirs.command(command), ours.command(command)
        if o.echo != q.echo:
            unexpected.append(f"--- echo of {command!r}: QEMU {q.echo!r}, ours {o.echo!r}")
        unexpected += compare(command, ordered, rules, q.lines, o.lines, set())
    assert not unexpected, "differences no rule allows:\n" + "\n".join(unexpected)


@needs_monitor
def test_human_monitor_command_over_qmp_matches_qemu(procs):
    qemu = procs.qemu()
    server = procs.server()
    theirs, ours = procs.qmp(qemu.qmp_path), procs.qmp(server.qmp_path)
    unexpected: list[str] = []
    for command in QMP_COMMANDS:
        q = theirs.execute("human-monitor-command", **{"command-line": command})
        o = ours.execute("human-monitor-command", **{"command-line": command})
        assert isinstance(o, str) and (o == "" or o.endswith("\r\n")), (command, o)
        ordered = next(ordered for cmd, ordered, _ in COMMANDS if cmd == command)
        unexpected += compare(command, ordered, rules_for(command), q.split("\r\n")[:-1], o.split("\r\n")[:-1],
                              set())
    # Without its argument: QMP's own argument error, as QEMU says it.
    with pytest.raises(QmpError) as q_err:
        theirs.execute("human-monitor-command")
    with pytest.raises(QmpError) as o_err:
        ours.execute("human-monitor-command")
    assert str(o_err.value) == str(q_err.value) == "Parameter 'command-line' is missing"
    assert not unexpected, "differences no rule allows:\n" + "\n".join(unexpected)


def memdev_blocks(lines: list[str]) -> dict[str, list[str]]:
    """``info memdev``'s blocks by backend id."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        m = re.fullmatch(r"memory backend: (.+)", line)
        if m:
            current = blocks.setdefault(m.group(1), [])
        if line:  # the empty line after the list
            current.append(line)
    return blocks


@needs_monitor
def test_memory_backends_match_qemu(procs):
    """``info memdev`` and ``query-memdev``: the devices' backends as QEMU
    shows the same backends (the same ids, sizes and options); QEMU's boot
    RAM backends (mem0, mem1) are its own, and its order is its hash table's."""
    qemu = procs.qemu()
    server = procs.server()
    theirs, ours = procs.hmp(qemu.monitor), procs.hmp(server.monitor)
    q_blocks = memdev_blocks(theirs.command("info memdev").lines)
    o_blocks = memdev_blocks(ours.command("info memdev").lines)
    assert sorted(q_blocks) == ["mem0", "mem1", "vmem0mem", "vmem1mem"], q_blocks
    assert o_blocks == {memdev: q_blocks[memdev] for memdev in ("vmem0mem", "vmem1mem")}
    q_list = procs.qmp(qemu.qmp_path).execute("query-memdev")
    o_list = procs.qmp(server.qmp_path).execute("query-memdev")
    assert sorted(o_list, key=lambda m: m["id"]) == sorted(
        (m for m in q_list if m["id"] in ("vmem0mem", "vmem1mem")), key=lambda m: m["id"])


def parse_memory_devices(lines: list[str]) -> dict[str, dict[str, str]]:
    devices: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in lines:
        m = re.fullmatch(r'Memory device \[virtio-mem\]: "(.+)"', line)
        if m:
            current = devices.setdefault(m.group(1), {})
            continue
        key, _, value = line.strip().partition(": ")
        current[key] = value
    return devices


def guest_plugged_bytes(guest: Guest, start: int, length: int) -> int:
    """Bytes of the guest's online memory blocks in [start, start + length):
    the guest's own count of what a device's driver added and onlined."""
    # Blocks come and go while the driver works: a block listed by the glob
    # may be gone when cat opens it (its line then has no state).
    out = guest.run("cd /sys/devices/system/memory && cat block_size_bytes && "
                    "for m in memory[0-9]*; do echo $m $(cat $m/state 2>/dev/null); done").split("\n")
    block = int(out[0].strip(), 16)
    total = 0
    for line in out[1:]:
        fields = line.split()
        if len(fields) != 2:
            continue
        addr = int(fields[0][len("memory"):]) * block
        if start <= addr < start + length and fields[1] == "online":
            total += block
    return total


@needs_monitor
def test_size_lines_show_what_a_real_guest_plugged(procs):
    server = procs.server()
    hmp = procs.hmp(server.monitor)
    guest = procs.guest(server.sockets, ram="2G", numa_nodes=2)
    guest.wait_ready(BOOT_TIMEOUT_S)
    wait_for(lambda: guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ | grep -c '^virtio' || true").strip() == "2",
             60, "virtio_mem to bind both devices")
    # vm0 was started with requested-size 1G: the guest plugs it at boot.
    wait_for(lambda: hmp.command("qom-get vm0 size").lines == [str(GIB)], RESIZE_TIMEOUT_S, "vm0 to reach 1G")
    assert hmp.command("qom-set vm1 requested-size 512M").lines == []
    wait_for(lambda: hmp.command("qom-get vm1 size").lines == [str(512 * MIB)], RESIZE_TIMEOUT_S,
             "vm1 to reach 512M")

    devices = parse_memory_devices(hmp.command("info memory-devices").lines)
    assert set(devices) == {"vm0", "vm1"}
    for dev_id, want in (("vm0", GIB), ("vm1", 512 * MIB)):
        d = devices[dev_id]
        start, length = int(d["memaddr"], 16), int(d["max-size"])
        assert start != 0, f"{dev_id}: memaddr 0 with a guest attached"
        # Both devices' memory is online in full blocks (1G and 512M are multiples of 128M).
        wait_for(lambda s=start, n=length, w=want: guest_plugged_bytes(guest, s, n) == w, RESIZE_TIMEOUT_S,
                 f"the guest to online {want >> 20} MiB of {dev_id}")
        assert int(d["size"]) == guest_plugged_bytes(guest, start, length) == want, (dev_id, d)
    summary = hmp.command("info memory_size_summary").lines
    assert summary[1] == f"plugged memory: {GIB + 512 * MIB}", summary
    numa = hmp.command("info numa").lines
    assert "node 0 plugged: 1024 MB" in numa and "node 1 plugged: 512 MB" in numa, numa


def nc_openbsd() -> str | None:
    nc = shutil.which("nc")
    if nc is None:
        return None
    help_text = subprocess.run([nc, "-h"], capture_output=True, text=True, timeout=30)
    return nc if "-U" in help_text.stdout + help_text.stderr else None


@needs_monitor
@pytest.mark.skipif(nc_openbsd() is None, reason="nc with -U (netcat-openbsd) is not installed; "
                                                  "this test installs nothing (apt-get install netcat-openbsd)")
def test_the_guides_nc_one_liner(procs):
    """``echo "info memory-devices" | nc -U MONITOR`` as the guide has it;
    the output holds QEMU's block for each device (taken from the QEMU
    started with the same devices, memaddr aside: no guest)."""
    qemu = procs.qemu()
    server = procs.server()
    reference = parse_memory_devices(procs.hmp(qemu.monitor).command("info memory-devices").lines)
    wait_for(lambda: os.path.exists(server.monitor), START_TIMEOUT_S, "the monitor socket")
    # nc may keep waiting after its stdin's EOF (Debian's netcat-openbsd
    # without -N/-q): read until the reply and the next prompt are in, then
    # end it (its own session: the sh and the nc this test started).
    proc = subprocess.Popen(["sh", "-c", f'echo "info memory-devices" | nc -U {server.monitor}'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out = b""
    try:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while out.count(PROMPT) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                out += data
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
    assert out.count(PROMPT) >= 2, f"no reply within {REPLY_TIMEOUT_S} s: {out!r} {stderr}"
    shown = render(out).splitlines()
    assert shown[1] == "(qemu) info memory-devices", shown
    lines = out.split(b"\r\n", 2)[2].decode().split("\r\n")
    got = parse_memory_devices(lines[:lines.index("(qemu) ")])
    assert set(got) == set(reference) == {"vm0", "vm1"}
    for dev_id in reference:
        assert {k: v for k, v in got[dev_id].items() if k != "memaddr"} == \
            {k: v for k, v in reference[dev_id].items() if k != "memaddr"}, dev_id
        assert list(got[dev_id]) == list(reference[dev_id]), dev_id  # QEMU's order of the lines
