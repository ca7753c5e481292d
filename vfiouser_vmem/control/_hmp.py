"""QEMU's human monitor (HMP) for the commands this server has, with
QEMU's text byte for byte (docs/monitor.md).

:class:`HumanMonitor` runs one command line and returns what QEMU's
monitor prints for it: ``run`` with ``\\n`` line ends (what QEMU's command
builds), ``execute`` with ``\\r\\n``, as QEMU's monitor_puts turns every
``\\n`` into ``\\r\\n`` on the way out (monitor/monitor.c), for the socket and
for QMP's ``human-monitor-command`` alike.

The command line is parsed as monitor/hmp.c parses it
(monitor_parse_command, monitor_parse_arguments, get_str): the command
name runs to a space or ``/``; ``s`` arguments are a word or a double-quoted
string with the escapes ``\\n \\r \\\\ \\' \\"``; ``S`` is the rest of the
line; ``-j`` an option.  The texts: "unknown command: 'X'" (X: the line up
to the end of the name), "X: string expected", "X: extraneous characters
at the end of line", "X: unsupported option -c", each parse error followed
by "Try \\"help X\\" for more information"; a failed command prints
"Error: " and the error, with its hint lines (hmp_handle_error,
error_reportf_err).

Commands: ``help``/``?``, ``info`` (``memdev``, ``memory-devices``,
``memory_size_summary``, ``numa``), ``qom-get``, ``qom-list``, ``qom-set``.
Their help lines are those of QEMU's hmp-commands.hx and
hmp-commands-info.hx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vfiouser_vmem.control._arguments import CommandError
from vfiouser_vmem.control._protocol import ControlledDevice
from vfiouser_vmem.control._qom import QomTree, memdev_info

__all__ = ["HumanMonitor", "numa_text", "parse_size", "to_json_pretty"]

_UINT64_MAX = (1 << 64) - 1
_UINT32_MAX = (1 << 32) - 1
#: get_str's buffer (monitor/hmp.c, char buf[1024]): longer words are cut.
_STR_BUF = 1024


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _node_ranges(nodes: list[int]) -> str:
    """A list of numbers as QEMU's string output visitor prints it:
    ranges of consecutive ones joined (qapi/string-output-visitor.c), ``0-2,5``."""
    runs: list[list[int]] = []
    for node in sorted(nodes):
        if runs and runs[-1][1] == node - 1:
            runs[-1][1] = node
        else:
            runs.append([node, node])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


@dataclass(frozen=True)
class _Command:
    name: str  # "help|?": the names hmp_compare_cmd matches
    args_type: str  # QEMU's .args_type, e.g. "path:s,property:s"
    params: str  # QEMU's .params, shown by help
    help: str
    handler: str = ""  # the method's name; "" for a table
    sub_table: tuple[_Command, ...] = ()


# hmp-commands-info.hx, sorted as QEMU sorts its tables (sortcmdlist, strcmp).
_INFO_COMMANDS = (
    _Command("memdev", "", "", "show memory backends", "_info_memdev"),
    _Command("memory-devices", "", "", "show memory devices", "_info_memory_devices"),
    _Command("memory_size_summary", "", "",
             "show the amount of initially allocated and present hotpluggable (if enabled) memory in bytes.",
             "_info_memory_size_summary"),
    _Command("numa", "", "", "show NUMA information", "_info_numa"),
)

# hmp-commands.hx.
_COMMANDS = (
    _Command("help|?", "name:S?", "[cmd]", "show the help", "_help"),
    _Command("info", "item:s?", "[subcommand]", "show various information about the system state",
             "_info_help", sub_table=_INFO_COMMANDS),
    _Command("qom-get", "path:s,property:s", "path property", "print QOM property", "_qom_get"),
    _Command("qom-list", "path:s?", "path", "list QOM properties", "_qom_list"),
    _Command("qom-set", "json:-j,path:s,property:s,value:S", "[-j] path property value",
             "set QOM property.\n\t\t\t-j: the value is specified in json format.", "_qom_set"),
)


class _ParseFailed(Exception):
    """The arguments did not parse; the message is already printed."""


def _isspace(c: str) -> bool:
    return c in " \t\n\v\f\r"


def _compare_cmd(name: str, names: str) -> bool:
    # hmp_compare_cmd: "help|?" names two commands.
    return name in names.split("|")


def _search(table: tuple[_Command, ...], name: str) -> _Command | None:
    for cmd in table:
        if _compare_cmd(name, cmd.name):
            return cmd
    return None


def _get_str(line: str, pos: int) -> tuple[str | None, int]:
    """monitor/hmp.c get_str: a word, or a double-quoted string; (None, pos)
    when there is none (or it is unterminated, or has a bad escape)."""
    n = len(line)
    while pos < n and _isspace(line[pos]):
        pos += 1
    if pos >= n:
        return None, pos
    out: list[str] = []
    if line[pos] == '"':
        pos += 1
        while pos < n and line[pos] != '"':
            c = line[pos]
            if c == "\\":
                pos += 1
                if pos >= n:
                    return None, pos
                c = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(line[pos], "")
                if not c:
                    return None, pos  # QEMU: "unsupported escape code" (to its stderr)
            if len(out) < _STR_BUF - 1:
                out.append(c)
            pos += 1
        if pos >= n:
            return None, pos  # QEMU: "unterminated string" (to its stderr)
        pos += 1
    else:
        while pos < n and not _isspace(line[pos]):
            if len(out) < _STR_BUF - 1:
                out.append(line[pos])
            pos += 1
    return "".join(out), pos


def _parse_cmdline(text: str) -> list[str]:
    """monitor/hmp.c parse_cmdline: the words of ``help``'s argument."""
    args: list[str] = []
    pos = 0
    while True:
        while pos < len(text) and _isspace(text[pos]):
            pos += 1
        if pos >= len(text):
            return args
        word, pos = _get_str(text, pos)
        if word is None:
            return []
        args.append(word)


# -- values -----------------------------------------------------------------

_SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class _SizeError(Exception):
    def __init__(self, erange: bool) -> None:
        super().__init__()
        self.erange = erange


def _strtosz(text: str) -> int:
    """util/cutils.c qemu_strtosz (do_strtosz with unit 1024): decimal,
    a fraction only with a suffix, hex (0x) without; ERANGE for a negative
    number or one past 2^64-1, EINVAL for the rest (_SizeError)."""
    s = text.lstrip(" \t\n\v\f\r")
    if s.startswith("-"):
        raise _SizeError(True)
    if s.startswith("+"):
        s = s[1:]
    m = re.match(r"0[xX]([0-9a-fA-F]+)", s)
    if m:
        rest = s[m.end():]
        if rest:
            raise _SizeError(False)
        value = int(m.group(1), 16)
        if value > _UINT64_MAX:
            raise _SizeError(True)
        return value
    # ASCII digits only (\d takes any script's, which int() reads too).
    m = re.match(r"([0-9]*)(?:\.([0-9]*))?", s)
    assert m is not None
    whole, frac = m.group(1), m.group(2)
    if not whole and not frac:
        raise _SizeError(False)
    # Leading zeros dropped, and more than 20 digits is past 2^64-1 without
    # int(), which refuses more than 4300 digits (sys.get_int_max_str_digits).
    whole = whole.lstrip("0")
    if len(whole) > 20 or whole and int(whole) > _UINT64_MAX:
        raise _SizeError(True)
    rest = s[m.end():]
    shift = 0
    if rest:
        if rest[0].lower() not in _SUFFIXES or len(rest) > 1:
            raise _SizeError(False)
        shift = _SUFFIXES[rest[0].lower()]
    numerator = int(whole or "0")
    if frac:
        if shift == 0:
            raise _SizeError(False)  # "When a fraction is present, a scale is required."
        # QEMU reads the fraction as a double (do_strtosz, qemu_strtod_finite):
        # its digits past the 30th change nothing QEMU could tell.
        frac = frac[:30]
        scale = 10 ** len(frac)
        exact = (numerator * scale + int(frac)) << shift
        value = (2 * exact + scale) // (2 * scale)  # round 0.5 upward
    else:
        value = numerator << shift
    if value > _UINT64_MAX:
        raise _SizeError(True)
    return value


def parse_size(name: str, text: str) -> int:
    """A size property's value from text, as QEMU's string input visitor
    parses it (parse_option_size, util/qemu-option.c); ValueError with
    QEMU's text and hint."""
    try:
        return _strtosz(text)
    except _SizeError as exc:
        if exc.erange:
            raise ValueError(f"Value '{text}' is out of range for parameter '{name}'") from None
        raise ValueError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                         "and exabytes, respectively.") from None


#: What strtoull(3) with base 0 reads (util/cutils.c qemu_strtou64, under the
#: string input visitor): hexadecimal after 0x, octal after a leading 0,
#: decimal otherwise; no 0b, no digit separators, ASCII digits only.
_STRTOU64 = re.compile(r"[ \t\n\v\f\r]*(?:0[xX](?P<hex>[0-9a-fA-F]+)|0(?P<oct>[0-7]*)|(?P<dec>[1-9][0-9]*))")


def _strtou64(text: str) -> int:
    """``text`` as qemu_strtou64 with base 0 reads it whole, or -1."""
    m = _STRTOU64.fullmatch(text)
    if m is None or len(text) > 64:  # beyond 2^64 in any base: out of range anyway
        return -1
    if m["hex"] is not None:
        return int(m["hex"], 16)
    if m["oct"] is not None:
        return int(m["oct"] or "0", 8)
    return int(m["dec"])


def _parse_value(name: str, qom_type: str | None, text: str) -> Any:
    """object_property_parse's string input visitor, for our property types."""
    if qom_type == "size":
        return parse_size(name, text)
    if qom_type == "bool":
        # qapi/qapi-util.c qapi_bool_parse.
        if text in ("on", "yes", "true", "y"):
            return True
        if text in ("off", "no", "false", "n"):
            return False
        raise ValueError(f"Parameter '{name}' expects 'on' or 'off'")
    if qom_type in ("uint64", "uint32", "uint16", "uint8"):
        value = _strtou64(text)
        if not 0 <= value <= _UINT64_MAX:
            raise ValueError(f"Parameter '{name}' expects an uint64 value")
        if qom_type == "uint32" and value > _UINT32_MAX:
            raise ValueError(f"Parameter '{name}' expects uint32_t")
        return value
    return text


def _json_string(s: str) -> str:
    # qobject/qjson.c to_json: these escapes, other control characters and
    # everything past ASCII as \\uXXXX (upper case), '/' as it is.
    out = ['"']
    for ch in s:
        cp = ord(ch)
        esc = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
        if esc is not None:
            out.append(esc)
        elif cp < 0x20 or 0x7F <= cp <= 0xFFFF and cp > 0x7F:
            out.append(f"\\u{cp:04X}")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 | (cp >> 10):04X}\\u{0xDC00 | (cp & 0x3FF):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json_pretty(value: Any, indent: int = 0) -> str:
    """qobject_to_json_pretty: 4-space indents, ``[\\n]`` for an empty list."""
    pad = "    " * (indent + 1)
    end = "\n" + "    " * indent
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, dict):
        items = [f"{pad}{_json_string(str(k))}: {to_json_pretty(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + end + "}" if items else "{" + end + "}"
    if isinstance(value, (list, tuple)):
        items = [pad + to_json_pretty(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + end + "]" if items else "[" + end + "]"
    return _json_string(str(value))


def _json_int(text: str) -> int | float:
    """A JSON integer as qobject/json-parser.c reads it: one past what it can
    hold as an integer is a double (parse_literal); here, one past the 4300
    digits int() reads (sys.get_int_max_str_digits), which would raise."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _json_error(text: str, exc: json.JSONDecodeError) -> str:
    # qobject/json-parser.c texts, "LINE:COL: JSON parse error, ...".
    what = "premature end of input" if exc.pos >= len(text.rstrip()) else "invalid input"
    return f"{exc.lineno}:{exc.colno}: JSON parse error, {what}"


def numa_text(devices: Iterator[ControlledDevice]) -> str:
    """x-query-numa's text (hw/core/machine-qmp-cmds.c qmp_x_query_numa),
    from what this process knows: the nodes are 0..N-1 for the highest
    node a device names (none: "0 nodes", QEMU without -numa); no CPUs;
    a node's size and plugged memory are its devices' plugged memory (QEMU
    adds the node's boot memory to size, which we do not have)."""
    plugged: dict[int, int] = {}
    highest = -1
    for device in devices:
        info = device.memory_device_info()
        node = getattr(device, "numa_node", info.get("node"))
        if node is None:
            continue
        node = int(node)
        highest = max(highest, node)
        plugged[node] = plugged.get(node, 0) + int(info["size"])
    lines = [f"{highest + 1} nodes\n"]
    for i in range(highest + 1):
        lines.append(f"node {i} cpus:\n")
        lines.append(f"node {i} size: {plugged.get(i, 0) >> 20} MB\n")
        lines.append(f"node {i} plugged: {plugged.get(i, 0) >> 20} MB\n")
    return "".join(lines)


class HumanMonitor:
    """The HMP commands over the devices and the QOM tree."""

    def __init__(self, devices: Callable[[], Iterator[ControlledDevice]], tree: QomTree) -> None:
        self._devices = devices
        self._tree = tree

    def execute(self, line: str) -> str:
        """What QEMU's monitor prints for ``line``, ``\\r\\n`` line ends."""
        return self.run(line).replace("\n", "\r\n")

    def run(self, line: str) -> str:
        """What QEMU's monitor prints for ``line``, ``\\n`` line ends."""
        out: list[str] = []
        self._handle(line, out)
        return "".join(out)

    # -- parsing (monitor/hmp.c handle_hmp_command) --------------------------------

    def _handle(self, line: str, out: list[str]) -> None:
        table: tuple[_Command, ...] = _COMMANDS
        pos = 0
        cmd: _Command | None = None
        while True:
            p = pos
            while p < len(line) and _isspace(line[p]):
                p += 1
            if p >= len(line):
                if cmd is None:
                    return  # an empty line: nothing
                break
            start = p
            while p < len(line) and line[p] != "/" and not _isspace(line[p]):
                p += 1
            name = line[start:p][:255]
            found = _search(table, name)
            if found is None:
                out.append(f"unknown command: '{line[:p]}'\n")
                return
            cmd = found
            while p < len(line) and _isspace(line[p]):
                p += 1
            pos = p
            if not cmd.sub_table or p >= len(line):
                break
            table = cmd.sub_table
        try:
            args = self._parse_arguments(cmd, line, pos, out)
        except _ParseFailed:
            end = pos
            while end > 0 and _isspace(line[end - 1]):
                end -= 1
            out.append(f'Try "help {line[:end]}" for more information\n')
            return
        try:
            getattr(self, cmd.handler)(args, out)
        except CommandError as exc:
            out.append(f"Error: {exc.desc}\n")

    @staticmethod
    def _parse_arguments(cmd: _Command, line: str, pos: int, out: list[str]) -> dict[str, Any]:
        """monitor_parse_arguments for the types our commands use."""
        name = cmd.name.split("|")[0]
        args: dict[str, Any] = {}
        n = len(line)
        for spec in filter(None, cmd.args_type.split(",")):
            key, typestr = spec.split(":", 1)
            kind, optional = typestr[0], typestr.endswith("?")
            if kind == "-":
                flag = typestr[1]
                while pos < n and _isspace(line[pos]):
                    pos += 1
                if pos < n and line[pos] == "-":
                    if pos + 1 >= n or line[pos + 1] != flag:
                        bad = line[pos + 1] if pos + 1 < n else ""
                        out.append(f"{name}: unsupported option -{bad}\n")
                        raise _ParseFailed
                    pos += 2
                    args[key] = True
                continue
            while pos < n and _isspace(line[pos]):
                pos += 1
            if optional and pos >= n:
                continue
            if kind == "s":
                value, pos = _get_str(line, pos)
                if value is None:
                    out.append(f"{name}: string expected\n")
                    raise _ParseFailed
                args[key] = value
            else:  # "S": the rest of the line
                if pos >= n:
                    out.append(f"{name}: string expected\n")
                    raise _ParseFailed
                args[key] = line[pos:]
                pos = n
        while pos < n and _isspace(line[pos]):
            pos += 1
        if pos < n:
            out.append(f"{name}: extraneous characters at the end of line\n")
            raise _ParseFailed
        return args

    # -- help (monitor/hmp.c help_cmd, help_cmd_dump) ----------------------------

    @staticmethod
    def _dump_one(cmd: _Command, prefix: list[str], out: list[str]) -> None:
        out.append("".join(f"{p} " for p in prefix) + f"{cmd.name} {cmd.params} -- {cmd.help}\n")

    def _dump(self, table: tuple[_Command, ...], args: list[str], index: int, out: list[str]) -> None:
        if index >= len(args):
            for cmd in table:
                self._dump_one(cmd, args[:index], out)
            return
        for cmd in table:
            if _compare_cmd(args[index], cmd.name):
                if cmd.sub_table:
                    self._dump(cmd.sub_table, args, index + 1, out)
                else:
                    self._dump_one(cmd, args[:index], out)
                return
        words = "".join(f"{args[i]}{'' if i == len(args) - 1 else ' '}" for i in range(index + 1))
        out.append(f"unknown command: '{words}'\n")

    def _help(self, args: dict[str, Any], out: list[str]) -> None:
        name = args.get("name")
        self._dump(_COMMANDS, _parse_cmdline(name) if name is not None else [], 0, out)

    def _info_help(self, args: dict[str, Any], out: list[str]) -> None:
        # hmp_info_help: "info" alone is "help info".
        self._dump(_COMMANDS, ["info"], 0, out)

    # -- info (hw/core/machine-hmp-cmds.c) --------------------------------------

    def _info_memdev(self, args: dict[str, Any], out: list[str]) -> None:
        # hmp_info_memdev (hw/core/machine-hmp-cmds.c), over query-memdev's list.
        for backend in self._tree.backends():  # the devices' order (QEMU's: its hash table's)
            m = memdev_info(backend)
            out.append(f"memory backend: {m['id']}\n"
                       f"  size:  {int(m['size'])}\n"
                       f"  merge: {_bool(m['merge'])}\n"
                       f"  dump: {_bool(m['dump'])}\n"
                       f"  prealloc: {_bool(m['prealloc'])}\n"
                       f"  share: {_bool(m['share'])}\n"
                       f"  reserve: {_bool(m['reserve'])}\n"
                       f"  policy: {m['policy']}\n"
                       f"  host nodes: {_node_ranges(m['host-nodes'])}\n")
        out.append("\n")  # after the list, as QEMU 11.1 prints it

    def _info_memory_devices(self, args: dict[str, Any], out: list[str]) -> None:
        for device in self._devices():
            d = device.memory_device_info()
            out.append(f'Memory device [virtio-mem]: "{d.get("id") or ""}"\n'
                       f"  memaddr: 0x{int(d['memaddr']):x}\n"
                       f"  node: {int(d['node'])}\n"
                       f"  requested-size: {int(d['requested-size'])}\n"
                       f"  size: {int(d['size'])}\n"
                       f"  max-size: {int(d['max-size'])}\n"
                       f"  block-size: {int(d['block-size'])}\n"
                       f"  memdev: {d['memdev']}\n")

    def _info_memory_size_summary(self, args: dict[str, Any], out: list[str]) -> None:
        # base memory: 0, as query-memory-size-summary says: this process
        # owns no boot memory (docs/monitor.md).
        plugged = sum(int(device.memory_device_info()["size"]) for device in self._devices())
        out.append(f"base memory: 0\nplugged memory: {plugged}\n")

    def _info_numa(self, args: dict[str, Any], out: list[str]) -> None:
        out.append(numa_text(self._devices()))

    # -- QOM (qom/qom-hmp-cmds.c) ------------------------------------------------

    def _qom_list(self, args: dict[str, Any], out: list[str]) -> None:
        path = args.get("path")
        if path is None:
            out.append("/\n")
            return
        for entry in self._tree.qom_list(path):
            out.append(f"{entry['name']} ({entry['type']})\n")

    def _qom_get(self, args: dict[str, Any], out: list[str]) -> None:
        value = self._tree.qom_get(args["path"], args["property"])
        out.append(to_json_pretty(value) + "\n")

    def _qom_set(self, args: dict[str, Any], out: list[str]) -> None:
        path, prop, text = args["path"], args["property"], args["value"]
        if args.get("json"):
            try:
                value = json.loads(text, parse_int=_json_int)
            except json.JSONDecodeError as exc:
                raise CommandError(_json_error(text, exc)) from None
            except RecursionError:
                # Nested deeper than the interpreter's stack (about 1000
                # levels, a 2 KiB line): refused with the text of QEMU's
                # limit (qobject/json-streamer.c, MAX_NESTING 1024), not an
                # internal error.
                raise CommandError("JSON nesting depth limit exceeded") from None
            self._tree.qom_set(path, prop, value)
            return
        node = self._tree.lookup(path)
        try:
            value = _parse_value(prop, node.property_type(prop), text)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self._tree.qom_set(path, prop, value)
