"""Device configuration in QEMU's vocabulary: ``--object``/``--device``
options in QEMU's ``key=value,...`` syntax, a TOML file with the same keys,
or the single-device flags of ``serve``.

Everything is checked before anything is created: :func:`build_configs`
either returns the complete list of :class:`~vfiouser_vmem.server.DeviceConfig`
or raises :class:`ConfigError` whose message names the option (or the file
and table) and the key that is wrong.

Syntax (QEMU's QemuOpts, as ``-object``/``-device`` take it)::

    --object memory-backend-memfd,id=mem0,size=8G[,hugetlb=on][,hugetlbsize=2M][,seal=on]
             [,share=on][,reserve=on][,dump=off][,policy=bind,host-nodes=0]
    --object memory-backend-file,id=mem0,size=8G,mem-path=PATH,share=on[,discard-data=on]
             [,reserve=on][,dump=off][,policy=bind,host-nodes=0-1]
    --device [virtio-mem,|driver=virtio-mem,]id=vm0,memdev=mem0,socket=PATH
             [,node=N][,block-size=2M][,requested-size=1G][,prealloc=on]
             [,scrub-interval=10][,unplugged-access=reclaim|report|disconnect]

Items are separated by ``,``; a ``,,`` is a literal comma inside a value.
The first item may be bare: it is the object's ``qom-type`` / the device's
``driver``.  They default to ``memory-backend-memfd`` / ``virtio-mem``
(``virtio-mem-pci`` is accepted too).  A key may be given once, except
``host-nodes`` (``host-nodes=0,host-nodes=2``, or a range ``0-3``).  Sizes
take QEMU's forms (``512M``, ``8G``, a byte count).  What each property
means here, and QEMU's properties that are refused and why, is
docs/backends.md.

The TOML file has the same keys, in ``[[object]]`` and ``[[device]]`` tables
(integers are byte counts, strings take the size forms, booleans or
``"on"``/``"off"`` for flags), plus optional top-level ``qmp`` (the QMP
socket path), ``monitor`` (the human monitor's socket path, as
``--monitor``), ``qmp-max-clients`` (a positive integer, as
``--qmp-max-clients``), ``socket-group``, ``allow-uids`` (an array of
user names or uids, as ``--allow-uid``), ``log-level`` and ``log-format``
(as the flags; ``log-level`` is reread on SIGHUP, docs/operating.md)::

    qmp = "/run/vmem.qmp"

    [[object]]
    qom-type = "memory-backend-memfd"
    id = "mem0"
    size = "8G"

    [[device]]
    id = "vm0"
    memdev = "mem0"
    socket = "/run/vm0.sock"
    requested-size = "1G"
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, overload

from vfiouser_vmem.cli._logging import LOG_FORMATS, LOG_LEVELS
from vfiouser_vmem.errors import ConfigError
from vfiouser_vmem.server import UNPLUGGED_ACCESS_ACTIONS, DeviceConfig, check_id
from vfiouser_vmem.util.sizes import format_size, parse_size
from vfiouser_vmem.util.sockets import unsafe_socket_directory
from vfiouser_vmem.virtio import memory_bar_size
from vfiouser_vmem.vmem import (
    CONFIG_NAMES,
    MAX_DEVICE_SIZE_BYTES,
    MemoryBackendConfig,
    check_device_settings,
    default_block_size,
)

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

DEVICE_DRIVERS = ("virtio-mem", "virtio-mem-pci")
#: QEMU's properties of every memory backend (backends/hostmem.c) that this server takes.
_COMMON_OBJECT_KEYS = ("qom-type", "id", "size", "share", "reserve", "dump", "merge", "policy", "host-nodes")
OBJECT_KEYS = {
    "memory-backend-memfd": _COMMON_OBJECT_KEYS + ("hugetlb", "hugetlbsize", "seal"),
    "memory-backend-file": _COMMON_OBJECT_KEYS + ("mem-path", "discard-data"),
}
DEVICE_KEYS = ("driver", "id", "memdev", "socket", "node", "block-size", "requested-size", "prealloc",
               "scrub-interval", "unplugged-access")
FILE_TOP_LEVEL_KEYS = ("qmp", "monitor", "qmp-max-clients", "socket-group", "allow-uids", "log-level", "log-format",
                       "object", "device")
#: Keys that may be given more than once in QEMU's key=value syntax (a list).
_LIST_KEYS = ("host-nodes",)

#: Why some keys QEMU knows are refused here (the default: "unknown key").
_REFUSED_KEYS = {
    "size": "the device's maximum size is its memdev's size; use requested-size for what the guest should plug",
    "memaddr": "the guest's firmware places the device's memory BAR; it cannot be chosen here",
    "prealloc-threads": "the device's prealloc=on allocates each PLUG's blocks in the server, on one thread",
    "prealloc-context": "the device's prealloc=on allocates each PLUG's blocks in the server, on one thread",
    "readonly": "the guest plugs and writes the device's memory; a read-only file cannot back it",
    "rom": "the guest plugs and writes the device's memory; it cannot be read-only memory",
    "pmem": "the server does not persist the device's memory (unplugged memory is punched out of the file)",
    "align": "the server maps the file at a page boundary of its own; the guest's view starts at offset 0",
    "offset": "the device's memory starts at offset 0 of the file",
    "x-use-canonical-path-for-ramblock-id": "there is no RAM block migration here",
    "dynamic-memslots": "QEMU's memory slots are QEMU's business: it maps the device's BAR as one region",
    "unplugged-inaccessible": "unplugged memory is always inaccessible here (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE "
                              "is QEMU's x86 legacy option)",
}
_BACKEND_PREALLOC_REFUSAL = (
    "the memdev would have all its memory allocated at start; as QEMU refuses it for virtio-mem "
    "(\"'memdev' property specifies a memdev with preallocation enabled\"), specify 'prealloc=on' for the "
    "virtio-mem device (--device ...,prealloc=on) instead: each PLUG's blocks are then allocated before "
    "they are acknowledged")


# ---------------------------------------------------------------------------
# QEMU's key=value syntax


def parse_keyval(text: str, implied_key: str | None = None, *, what: str = "option") -> dict[str, str]:
    """Split ``key=value,key=value`` (``,,`` is a literal comma) into a dict.

    The first item may be a bare value for ``implied_key``.  ConfigError for
    an empty option, an empty key, an item without ``=``, a repeated key.
    """
    if not text.strip():
        raise ConfigError(f"{what}: empty")
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    items.append("".join(current))

    result: dict[str, str] = {}
    for index, item in enumerate(items):
        if item == "":
            raise ConfigError(f"{what}: empty item (a stray ',' ?); write ',,' for a comma inside a value")
        if "=" not in item:
            if index == 0 and implied_key is not None:
                key, value = implied_key, item
            else:
                raise ConfigError(f"{what}: expected key=value, got {item!r}")
        else:
            key, value = item.split("=", 1)
            if key == "":
                raise ConfigError(f"{what}: empty key in {item!r}")
        if key in result:
            if key in _LIST_KEYS:
                # QEMU's list properties: host-nodes=0,host-nodes=2 (QemuOpts).
                result[key] = f"{result[key]},{value}"
                continue
            raise ConfigError(f"{what}: key {key!r} given twice")
        result[key] = value
    return result


# ---------------------------------------------------------------------------
# Specs: what the user wrote, with where they wrote it


@dataclass
class Spec:
    """One ``--object``/``--device`` (or table) before validation."""

    kind: str  # "object" or "device"
    values: dict[str, Any]
    where: str  # e.g. "--device 'id=vm0,...'" or "vmem.toml: [[device]] #2"


def object_spec(text: str) -> Spec:
    where = f"--object {text!r}"
    return Spec("object", parse_keyval(text, "qom-type", what=where), where)


def device_spec(text: str) -> Spec:
    where = f"--device {text!r}"
    return Spec("device", parse_keyval(text, "driver", what=where), where)


@dataclass
class FileConfig:
    objects: list[Spec]
    devices: list[Spec]
    qmp: str | None = None
    socket_group: str | None = None
    qmp_max_clients: int | None = None
    #: The human monitor's socket (``--monitor``).
    monitor: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    #: ``allow-uids``: user names or uids (``--allow-uid``).
    allow_uids: list[str | int] | None = None


def load_config_file(path: str) -> FileConfig:
    """Read a TOML configuration file (see the module docstring)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in FILE_TOP_LEVEL_KEYS:
            raise ConfigError(f"{path}: unknown top-level key {key!r} (known: {', '.join(FILE_TOP_LEVEL_KEYS)})")
    specs: dict[str, list[Spec]] = {"object": [], "device": []}
    for kind in ("object", "device"):
        tables = data.get(kind, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(f"{path}: {kind!r} must be an array of tables, written [[{kind}]]")
        for n, table in enumerate(tables, 1):
            specs[kind].append(Spec(kind, dict(table), f"{path}: [[{kind}]] #{n}"))
    qmp = data.get("qmp")
    if qmp is not None and not isinstance(qmp, str):
        raise ConfigError(f"{path}: qmp must be a string (a socket path)")
    group = data.get("socket-group")
    if group is not None and not isinstance(group, (str, int)):
        raise ConfigError(f"{path}: socket-group must be a group name or number")
    max_clients = data.get("qmp-max-clients")
    if max_clients is not None and (isinstance(max_clients, bool) or not isinstance(max_clients, int)
                                    or max_clients < 1):
        raise ConfigError(f"{path}: qmp-max-clients must be a positive count (of QMP clients), got {max_clients!r}")
    monitor = data.get("monitor")
    if monitor is not None and not isinstance(monitor, str):
        raise ConfigError(f"{path}: monitor must be a string (a socket path)")
    allow_uids = data.get("allow-uids")
    if allow_uids is not None and (not isinstance(allow_uids, list) or not all(
            isinstance(u, str) or (isinstance(u, int) and not isinstance(u, bool) and u >= 0) for u in allow_uids)):
        raise ConfigError(f"{path}: allow-uids must be an array of user names or uids, got {allow_uids!r}")
    choices = {"log-level": LOG_LEVELS, "log-format": LOG_FORMATS}
    for key, allowed in choices.items():
        value = data.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(allowed)}, got {value!r}")
    return FileConfig(specs["object"], specs["device"], qmp, None if group is None else str(group), max_clients,
                      monitor, data.get("log-level"), data.get("log-format"), allow_uids)


# ---------------------------------------------------------------------------
# Validation


def _check_keys(spec: Spec, known: tuple[str, ...]) -> None:
    for key in spec.values:
        if key in known:
            continue
        why = _REFUSED_KEYS.get(key)
        if why:
            raise ConfigError(f"{spec.where}: {key}= is not accepted: {why}")
        raise ConfigError(f"{spec.where}: unknown key {key!r} (known: {', '.join(known)})")


def _str(spec: Spec, key: str) -> str | None:
    value = spec.values.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{spec.where}: {key} must be a string, got {value!r}")
    return value


def _required_str(spec: Spec, key: str, why: str) -> str:
    value = _str(spec, key)
    if value is None or value == "":
        raise ConfigError(f"{spec.where}: {key}= is required ({why})")
    return value


# With an int default, the size is never None.
@overload
def _size(spec: Spec, key: str, default: int) -> int: ...
@overload
def _size(spec: Spec, key: str, default: None = None) -> int | None: ...


def _size(spec: Spec, key: str, default: int | None = None) -> int | None:
    value = spec.values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{spec.where}: {key}: expected a size (e.g. 512M, 8G), got {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{spec.where}: {key}: {exc}") from None


def _flag(spec: Spec, key: str, default: bool) -> bool:
    value = spec.values.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("on", "yes", "true"):
        return True
    if isinstance(value, str) and value in ("off", "no", "false"):
        return False
    raise ConfigError(f"{spec.where}: {key}: expected on or off, got {value!r}")


def _choice(spec: Spec, key: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(spec, key)
    if value is None:
        return default
    if value not in choices:
        raise ConfigError(f"{spec.where}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def _seconds(spec: Spec, key: str, default: float) -> float:
    value = spec.values.get(key)
    if value is None:
        return default
    try:
        seconds = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{spec.where}: {key}: expected a number of seconds >= 0, got {value!r}")
    return seconds


def _id(spec: Spec) -> str:
    value = _required_str(spec, "id",
                          "the name used over QMP" if spec.kind == "device" else "the name memdev= refers to")
    return check_id(value, spec.where)


def _host_nodes(spec: Spec) -> tuple[int, ...]:
    """QEMU's host-nodes: ``0``, ``0-3``, ``host-nodes=0,host-nodes=2`` (given
    twice), or in TOML an integer, a list of integers or such a string."""
    value = spec.values.get("host-nodes")
    if value is None:
        return ()
    items: list[object]
    if isinstance(value, list):
        items = list(value)
    elif isinstance(value, str):
        items = [item for item in value.split(",") if item != ""] or [value]
    else:
        items = [value]
    nodes: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            nodes.append(item)
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item) if isinstance(item, str) else None
        if match is None:
            raise ConfigError(f"{spec.where}: host-nodes: expected node numbers (0, 0-3, or a list), got {item!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ConfigError(f"{spec.where}: host-nodes: range {item!r} is empty")
        nodes.extend(range(low, min(high, 1 << 16) + 1))
    return tuple(nodes)


def _backend(spec: Spec, *, check_host: bool) -> MemoryBackendConfig:
    qom_type = _str(spec, "qom-type") or "memory-backend-memfd"
    if qom_type not in OBJECT_KEYS:
        # MemoryBackendConfig says why (memory-backend-ram) or what is known.
        MemoryBackendConfig(id="x", size_bytes=1, qom_type=qom_type, where=spec.where)
    if "prealloc" in spec.values and _flag(spec, "prealloc", False):
        raise ConfigError(f"{spec.where}: prealloc=on is not accepted: {_BACKEND_PREALLOC_REFUSAL}")
    spec.values.pop("prealloc", None)  # prealloc=off is QEMU's default: nothing to say
    _check_keys(spec, OBJECT_KEYS[qom_type])
    obj_id = _id(spec)
    size = _size(spec, "size")
    if size is None:
        raise ConfigError(f"{spec.where}: size= is required (the device's maximum size, e.g. 8G)")
    if size > MAX_DEVICE_SIZE_BYTES:
        raise ConfigError(f"{spec.where}: size {format_size(size)} is above the supported maximum of "
                          f"{format_size(MAX_DEVICE_SIZE_BYTES)}")
    policy = _str(spec, "policy") or "default"
    backend = MemoryBackendConfig(
        id=obj_id,
        size_bytes=size,
        qom_type=qom_type,
        # memory-backend-file's default is share=off, which MemoryBackendConfig refuses with the reason.
        share=_flag(spec, "share", qom_type != "memory-backend-file"),
        hugetlb=_flag(spec, "hugetlb", False),
        hugetlbsize_bytes=_size(spec, "hugetlbsize", 0),
        seal=_flag(spec, "seal", True),
        reserve=_flag(spec, "reserve", True),
        dump=_flag(spec, "dump", False),
        merge=_flag(spec, "merge", False),
        policy=policy,
        host_nodes=_host_nodes(spec),
        mem_path=_str(spec, "mem-path"),
        discard_data=_flag(spec, "discard-data", False),
        where=spec.where,
    )
    if check_host:
        backend.check_host()
    return backend


def _node(spec: Spec) -> int | None:
    value = spec.values.get("node")
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"\d+", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{spec.where}: node: expected a NUMA node number 0-65535, got {value!r}")
    return value


def check_socket_path(path: str, where: str, *, need_directory: bool = False) -> None:
    """A UNIX socket path to listen on; ``need_directory``: its directory
    must exist now (``serve``; ``qemu-args`` may describe another machine)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{where}: path {path!r} is longer than the {MAX_SOCKET_PATH_BYTES} bytes a UNIX socket path may have"
        )
    if need_directory:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            why = "is not a directory" if os.path.lexists(directory) else "does not exist"
            raise ConfigError(f"{where}: cannot create the socket {path!r}: the directory {directory!r} {why}")
        unsafe = unsafe_socket_directory(path)
        if unsafe is not None:
            raise ConfigError(f"{where}: refusing to listen on {path!r}: {unsafe}")


def build_configs(objects: Iterable[Spec], devices: Iterable[Spec], *, qmp_path: str | None = None,
                  need_directories: bool = False) -> list:
    """Check every spec and return the DeviceConfigs, in device order;
    ``need_directories``: see check_socket_path."""

    objects, devices = list(objects), list(devices)
    if not devices:
        raise ConfigError("no device configured: give at least one --device (or a [[device]] table)")
    backends: dict[str, MemoryBackendConfig] = {}
    for spec in objects:
        if spec.kind != "object":
            raise ConfigError(f"{spec.where}: not an object")
        backend = _backend(spec, check_host=need_directories)
        if backend.id in backends:
            raise ConfigError(
                f"{spec.where}: duplicate object id {backend.id!r} (also {backends[backend.id].where})"
            )
        backends[backend.id] = backend

    configs = []
    used_memdevs: dict[str, str] = {}
    ids: dict[str, str] = {}
    sockets: dict[str, str] = {}
    for spec in devices:
        _check_keys(spec, DEVICE_KEYS)
        driver = _str(spec, "driver") or "virtio-mem"
        if driver not in DEVICE_DRIVERS:
            raise ConfigError(
                f"{spec.where}: driver {driver!r} is not supported: this server provides virtio-mem devices only"
            )
        dev_id = _id(spec)
        if dev_id in ids:
            raise ConfigError(f"{spec.where}: duplicate device id {dev_id!r} (also {ids[dev_id]})")
        ids[dev_id] = spec.where
        memdev = _required_str(spec, "memdev", "the id of a memory-backend-memfd object holding the memory")
        if memdev not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise ConfigError(f"{spec.where}: memdev {memdev!r} is not an object id (objects: {known})")
        if memdev in used_memdevs:
            raise ConfigError(f"{spec.where}: memdev {memdev!r} is already used by {used_memdevs[memdev]}")
        used_memdevs[memdev] = spec.where
        socket = _required_str(spec, "socket", "the vfio-user socket path QEMU connects to")
        check_socket_path(socket, f"{spec.where}: socket", need_directory=need_directories)
        key = os.path.abspath(socket)
        if key in sockets:
            raise ConfigError(f"{spec.where}: socket {socket!r} is already used by {sockets[key]}")
        if qmp_path is not None and key == os.path.abspath(qmp_path):
            raise ConfigError(f"{spec.where}: socket {socket!r} is the QMP socket too; use different paths")
        sockets[key] = spec.where
        backend = backends[memdev]
        page_size = backend.page_size_bytes()
        block_size = _size(spec, "block-size", default_block_size(page_size))
        requested = _size(spec, "requested-size", 0)
        check_device_settings(where=spec.where, size_bytes=backend.size_bytes, block_size_bytes=block_size,
                              requested_size_bytes=requested, page_size_bytes=page_size,
                              names=CONFIG_NAMES)
        configs.append(DeviceConfig(
            socket=socket,
            size_bytes=backend.size_bytes,
            block_size_bytes=block_size,
            requested_size_bytes=requested,
            id=dev_id,
            node=_node(spec),
            memdev=memdev,
            memory_backend=backend,
            prealloc=_flag(spec, "prealloc", False),
            scrub_interval_s=_seconds(spec, "scrub-interval", 10.0),
            unplugged_access=_choice(spec, "unplugged-access", UNPLUGGED_ACCESS_ACTIONS, "reclaim"),
        ))
    unused = [b for b in backends.values() if b.id not in used_memdevs]
    if unused:
        raise ConfigError(f"{unused[0].where}: object {unused[0].id!r} is not used by any device (memdev=)")
    return configs


# ---------------------------------------------------------------------------
# The QEMU side of a configuration (``vfiouser-vmem qemu-args``)

#: BARs up to this size were placed by SeaBIOS with QEMU's default 40
#: physical address bits (README, "Large devices").
DEFAULT_PHYS_BITS_MAX_BAR_BYTES = 256 << 30
PHYS_BITS = 46
NUMA_RAM_ALIGN_BYTES = 2 << 20


@dataclass
class GuestLayout:
    """What a guest of these devices needs, whatever writes its options
    (``qemu_args``; cli/_libvirt.py for a libvirt domain)."""

    #: (node, bytes) of guest RAM per NUMA node, or None: one RAM backend, no -numa.
    numa_ram: list[tuple[int, int]] | None
    #: Guest physical address bits the memory BARs need, or None: QEMU's default does.
    phys_bits: int | None
    #: The memory BARs of all devices together.
    bar_bytes: int


def guest_layout(configs: list, ram_bytes: int) -> GuestLayout:
    """The rules ``qemu_args`` documents, decided once."""
    nodes = sorted({c.node for c in configs if c.node is not None})
    numa_ram = None
    if nodes:
        # Every node up to the highest one used gets a share of the guest
        # RAM, so that it exists for the guest (an ACPI node without memory
        # or CPUs is unknown to Linux, which then puts the device's memory
        # on node 0).  Node 0 takes the remainder.
        count = nodes[-1] + 1
        share = ram_bytes // count // NUMA_RAM_ALIGN_BYTES * NUMA_RAM_ALIGN_BYTES
        if share == 0:
            raise ConfigError(f"--ram {format_size(ram_bytes)} is too small to give each of {count} NUMA nodes "
                              f"{format_size(NUMA_RAM_ALIGN_BYTES)}")
        numa_ram = [(node, ram_bytes - share * (count - 1) if node == 0 else share) for node in range(count)]
    phys_bits = None
    bars = [memory_bar_size(c.size_bytes) for c in configs]
    if max(bars, default=0) > DEFAULT_PHYS_BITS_MAX_BAR_BYTES or sum(bars) > DEFAULT_PHYS_BITS_MAX_BAR_BYTES:
        phys_bits = PHYS_BITS
    return GuestLayout(numa_ram, phys_bits, sum(bars))


def phys_bits_note(layout: GuestLayout, how: str) -> str:
    """The advice that goes with ``layout.phys_bits``; ``how``: the option
    that sets them in the output's own terms."""
    return (f"memory BARs of {format_size(layout.bar_bytes)} in total need more than 40 guest physical address "
            f"bits: {how}")


def vfio_user_device(config) -> str:
    """The ``-device`` value that attaches one device (QEMU's JSON form)."""
    import json

    return json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": config.socket}},
                      separators=(",", ":"))


def qemu_args(configs: list, ram_bytes: int) -> tuple[list[str], list[str]]:
    """The QEMU options for guests of these devices: (argv, notes).

    - Guest RAM is a shared memfd (the server must read the virtqueues):
      ``-machine q35,memory-backend=ram0 -m RAM -object
      memory-backend-memfd,id=ram0,size=RAM,share=on``.
    - One ``-device {"driver":"vfio-user-pci","socket":{...}}`` per device,
      in configuration order (the guest enumerates them in that order).
    - ``-cpu qemu64,phys-bits=46`` when a device's memory BAR is above
      256 GiB, or all BARs together are (only 256 GiB was placed with the
      default 40 bits here).
    - When a device has a ``node``: the guest needs that NUMA node, so the
      guest RAM is split over nodes 0 to the highest node used, one shared
      memfd each (``-object memory-backend-memfd,id=ramN,...,share=on
      -numa node,nodeid=N,memdev=ramN``; node 0 takes the remainder, the
      others a multiple of 2 MiB), instead of ``-machine memory-backend``
      (QEMU refuses both at once).  A node without memory and CPUs would be
      unknown to the guest.
    ``notes`` are advice for people (printed on stderr).
    """
    layout = guest_layout(configs, ram_bytes)
    ram = format_size(ram_bytes)
    if layout.numa_ram is not None:
        argv = ["-machine", "q35", "-m", ram]
        for node, part in layout.numa_ram:
            argv += ["-object", f"memory-backend-memfd,id=ram{node},size={format_size(part)},share=on",
                     "-numa", f"node,nodeid={node},memdev=ram{node}"]
    else:
        argv = ["-machine", "q35,memory-backend=ram0", "-m", ram,
                "-object", f"memory-backend-memfd,id=ram0,size={ram},share=on"]
    notes = []
    if layout.numa_ram is not None and len(layout.numa_ram) > 1:
        notes.append(f"guest RAM is split over NUMA nodes 0-{len(layout.numa_ram) - 1} so that the guest knows "
                     "them; QEMU assigns the vCPUs to the nodes round robin unless -numa node,...,cpus= says "
                     "otherwise")
    if layout.phys_bits is not None:
        argv += ["-cpu", f"qemu64,phys-bits={layout.phys_bits}"]
        notes.append(phys_bits_note(layout, f"-cpu qemu64,phys-bits={layout.phys_bits} (with KVM: -cpu "
                                            "host,host-phys-bits=on)"))
    for c in configs:
        argv += ["-device", vfio_user_device(c)]
    return argv, notes


def format_shell(argv: list[str]) -> str:
    """One option (with its value) per line, quoted for sh, continued with ``\\``."""
    import shlex

    pairs: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            pairs.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            pairs.append(shlex.quote(argv[i]))
            i += 1
    lines: list[str] = []
    for pair in pairs:
        if lines and pair.startswith("-m "):
            lines[-1] += " " + pair  # -machine ... -m RAM: one line
        else:
            lines.append(pair)
    return " \\\n  ".join(lines)
