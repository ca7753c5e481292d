"""``vfiouser-vmem ctl``: resize, inspect and watch devices over QMP.

Works against this server's QMP socket, and against a QEMU whose own
``virtio-mem-pci`` devices it should manage (same commands, same events).

Commands::

    ctl [--qmp PATH] [--qmp-timeout S] resize ID SIZE [--wait] [--timeout S]
    ctl [--qmp PATH] [--qmp-timeout S] info [--json]
    ctl [--qmp PATH] [--qmp-timeout S] watch [ID ...] [--count N] [--json]

``resize`` sets ``requested-size`` (``qom-set``).  With ``--wait`` it waits
until the device's ``size`` (what the guest has plugged) equals the
requested size, on ``MEMORY_DEVICE_SIZE_CHANGE`` events and a ``qom-get
size`` poll every 0.1 s (events are rate-limited to one a second per device,
and one may be missed); after ``--timeout``
seconds (default 60) it reports the size reached, the size requested and
hints, and exits 3.

``info`` prints ``query-memory-devices`` as a table with readable sizes
(``--json``: the QMP reply as it came).

``watch`` prints one line per ``MEMORY_DEVICE_SIZE_CHANGE`` (QMP rate
limits these to one per second per device, always delivering the final
size), for the given device ids or all; ``--count N`` stops after N lines;
Ctrl-C or SIGTERM stops it (exit 0).  It says on stderr when it is subscribed.

``--qmp`` defaults to ``$VFIOUSER_VMEM_QMP``.  ``--qmp-timeout S`` (default
10) bounds the wait for the connection, the greeting and each reply; a peer
that does not answer in time, answers something that is not QMP or closes
mid-message is an error naming the socket (exit 1), never a traceback.  What
the peer sent is shown escaped (logtext.printable).

Exit codes: 0 success; 1 runtime error (QMP socket unreachable, a QMP
error: its ``desc`` is printed); 2 bad usage; 3 ``resize --wait`` timed out.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any, TextIO

from vfiouser_vmem.cli._exit import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from vfiouser_vmem.control import QmpClient
from vfiouser_vmem.errors import QmpError
from vfiouser_vmem.util.logtext import printable
from vfiouser_vmem.util.sizes import format_size

SIZE_CHANGE_EVENT = "MEMORY_DEVICE_SIZE_CHANGE"
#: qom-get size this often while waiting: QMP events are rate-limited to one a
#: second per device, so they alone would make the wait up to 1 s late.
POLL_INTERVAL_S = 0.1
DEFAULT_QMP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------
# formatting


def human(size_bytes: int) -> str:
    """``0 B``, ``2 MiB``, ``1.5 GiB``, ``1023.99 MiB``: readable, at most
    two decimals (trailing zeros dropped)."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes >= unit:
            text = f"{size_bytes / unit:.2f}".rstrip("0").rstrip(".")
            return f"{text} {suffix}"
    return f"{size_bytes} B"


def _state(data: dict[str, Any]) -> str:
    size, requested = data.get("size", 0), data.get("requested-size", 0)
    if size == requested:
        return "ok"
    return "growing" if size < requested else "shrinking"


def format_table(devices: list[dict[str, Any]]) -> str:
    """query-memory-devices as a table (like QEMU's ``info memory-devices``)."""
    header = ["ID", "TYPE", "SIZE", "REQUESTED", "MAX", "BLOCK", "NODE", "MEMADDR", "MEMDEV", "STATE"]
    rows = [header]
    total = 0
    for entry in devices:
        data = entry.get("data", {})
        total += int(data.get("size", 0))
        memaddr = data.get("memaddr")
        rows.append([  # the names come from the peer: escaped
            printable(data.get("id", "")),
            printable(entry.get("type", "")),
            human(int(data.get("size", 0))),
            human(int(data.get("requested-size", 0))),
            human(int(data.get("max-size", 0))),
            human(int(data.get("block-size", 0))),
            printable(data.get("node", "")),
            "-" if not memaddr else f"{memaddr:#x}",
            printable(data.get("memdev", "")),
            _state(data),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not devices:
        lines.append("(no memory devices)")
    lines.append(f"plugged in total: {human(total)}")
    return "\n".join(lines)


def format_event(event: dict[str, Any]) -> str:
    stamp = event.get("timestamp", {})
    when = datetime.fromtimestamp(stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6)
    data = event.get("data", {})
    size = int(data.get("size", 0))
    return f"{when.isoformat(timespec='milliseconds')} {printable(data.get('id', '?'))} size {human(size)} ({size})"


# ---------------------------------------------------------------------------
# commands


def _find(devices: list[dict[str, Any]], dev_id: str) -> dict[str, Any] | None:
    for entry in devices:
        if entry.get("data", {}).get("id") == dev_id:
            return entry["data"]
    return None


def resize(qmp: QmpClient, dev_id: str, size_bytes: int, *, wait: bool, timeout_s: float,
           out: TextIO, err: TextIO) -> int:
    start = time.monotonic()
    qmp.execute("qom-set", path=dev_id, property="requested-size", value=size_bytes)
    if not wait:
        size = qmp.execute("qom-get", path=dev_id, property="size")
        print(f"{dev_id}: requested-size {human(size_bytes)} (size now {human(size)})", file=out)
        return EXIT_OK
    deadline = start + timeout_s
    size = qmp.execute("qom-get", path=dev_id, property="size")
    next_poll = time.monotonic() + POLL_INTERVAL_S
    while size != size_bytes:
        now = time.monotonic()
        if now >= deadline:
            return _stuck(qmp, dev_id, size_bytes, timeout_s, err)
        event = qmp.next_event(min(deadline, next_poll) - now)
        if event is not None and event.get("event") == SIZE_CHANGE_EVENT \
                and event.get("data", {}).get("id") == dev_id:
            size = event["data"].get("size")
        if time.monotonic() >= next_poll or event is None:
            size = qmp.execute("qom-get", path=dev_id, property="size")
            next_poll = time.monotonic() + POLL_INTERVAL_S
    print(f"{dev_id}: size {human(size_bytes)} reached after {time.monotonic() - start:.2f} s", file=out)
    return EXIT_OK


def _stuck(qmp: QmpClient, dev_id: str, size_bytes: int, timeout_s: float, err: TextIO) -> int:
    size = qmp.execute("qom-get", path=dev_id, property="size")
    requested = qmp.execute("qom-get", path=dev_id, property="requested-size")
    lines = [f"{dev_id}: timed out after {timeout_s:g} s: size is {human(size)} ({size}), "
             f"requested {human(size_bytes)} ({size_bytes})"]
    if requested != size_bytes:
        lines.append(f"  requested-size is now {human(requested)}: someone else changed it meanwhile")
    elif size == 0 and size_bytes > 0:
        lines.append("  the guest plugged nothing: is a guest running with the virtio_mem driver bound "
                     "(and memhp_default_state=online_movable or memory onlining)?")
    elif size < size_bytes:
        lines.append(f"  the guest is still plugging ({human(size_bytes - size)} to go) or ran out of "
                     "memory it can online; try a longer --timeout")
    else:
        lines.append(f"  the guest is still unplugging ({human(size - size_bytes)} to go): Linux can only "
                     "unplug movable memory; online it as movable (memhp_default_state=online_movable)")
    print("\n".join(lines), file=err)
    return EXIT_TIMEOUT


def info(qmp: QmpClient, *, as_json: bool, out: TextIO) -> int:
    devices = qmp.execute("query-memory-devices")
    if as_json:
        print(json.dumps(devices, indent=2), file=out)
    else:
        print(format_table(devices), file=out)
    return EXIT_OK


def watch(qmp: QmpClient, ids: list[str], *, count: int | None, as_json: bool,
          out: TextIO, err: TextIO) -> int:
    if ids:
        known = {entry.get("data", {}).get("id") for entry in qmp.execute("query-memory-devices")}
        missing = [i for i in ids if i not in known]
        if missing:
            raise QmpError(f"Device '{missing[0]}' not found")
    print(f"watching size changes of {', '.join(ids) if ids else 'all devices'} on {qmp.path} (Ctrl-C to stop)",
          file=err, flush=True)
    seen = 0
    while count is None or seen < count:
        event = qmp.next_event(None)
        if event is None or event.get("event") != SIZE_CHANGE_EVENT:
            continue
        if ids and event.get("data", {}).get("id") not in ids:
            continue
        print(json.dumps(event) if as_json else format_event(event), file=out, flush=True)
        seen += 1
    return EXIT_OK


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: Any, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run a parsed ``ctl`` command line (see cli.py)."""
    qmp_path = args.qmp or os.environ.get("VFIOUSER_VMEM_QMP")
    if not qmp_path:
        print("vfiouser-vmem ctl: error: --qmp PATH is required (or set VFIOUSER_VMEM_QMP)", file=err)
        return EXIT_USAGE
    try:
        with QmpClient(qmp_path, getattr(args, "qmp_timeout", DEFAULT_QMP_TIMEOUT_S), id_prefix="ctl") as qmp:
            if args.ctl_command == "resize":
                return resize(qmp, args.id, args.size, wait=args.wait, timeout_s=args.timeout, out=out, err=err)
            if args.ctl_command == "info":
                return info(qmp, as_json=args.json, out=out)
            if args.ctl_command == "watch":
                # Ctrl-C (or SIGTERM) ends the watch with 0, even when the
                # shell started it with SIGINT ignored (a background job).
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, _interrupt)
                return watch(qmp, args.ids, count=args.count, as_json=args.json, out=out, err=err)
    except QmpError as exc:
        # The desc comes from the peer: escaped, so that it cannot drive the terminal.
        print(f"vfiouser-vmem ctl: {printable(exc.desc)}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    raise AssertionError(f"unknown ctl command {args.ctl_command}")


__all__ = ["QmpError", "format_table", "format_size", "human", "run"]
