"""The ``vfiouser-vmem`` command line (docs/design.md, "The interface contract").

Commands:
    serve         run virtio-mem devices on vfio-user sockets, with a QMP socket
    ctl           resize / info / watch the devices over QMP (see cli/_ctl.py)
    qemu-args     print the QEMU options for the devices of a configuration
    install-unit  write the systemd template unit (cli/_unit.py)

Devices are given to ``serve`` and ``qemu-args`` in one of three ways (not
mixed): the single-device flags (``--socket --size [--block-size]
[--requested-size] [--id] [--node]``), QEMU-style ``--object``/``--device``
options (repeatable), or ``--config FILE`` (TOML); see cli/_config.py.

Exit codes: 0 success (``serve``: also after SIGTERM/SIGINT), 1 runtime
failure (a socket path in use, a QMP error, ...), 2 bad usage (nothing was
started), 3 ``ctl resize --wait`` timed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import grp
import json
import logging
import os
import pwd
import signal
import sys

from vfiouser_vmem import __version__
from vfiouser_vmem.cli import _ctl as ctl
from vfiouser_vmem.cli._config import (
    ConfigError,
    FileConfig,
    build_configs,
    check_socket_path,
    device_spec,
    format_shell,
    load_config_file,
    object_spec,
    qemu_args,
)
from vfiouser_vmem.cli._exit import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_USAGE,
    exit_code,
)
from vfiouser_vmem.cli._libvirt import libvirt_domain
from vfiouser_vmem.cli._logging import LOG_FORMATS, LOG_LEVELS, configure_logging
from vfiouser_vmem.cli._unit import DEFAULT_CONFIG_DIR, DEFAULT_UNIT_DIR, install_unit, render_unit, this_command
from vfiouser_vmem.control import MetricsExporter, parse_metrics_address
from vfiouser_vmem.errors import MetricsAddressError
from vfiouser_vmem.server import STOP_SIGNALS, DeviceConfig, check_id, serve
from vfiouser_vmem.util.hostmem import base_page_size
from vfiouser_vmem.util.logtext import printable
from vfiouser_vmem.util.sizes import format_size, parse_size
from vfiouser_vmem.vmem import CLI_NAMES, check_device_settings, default_block_size

SERVE_EPILOG = """\
examples:
  one device (the original flags):
    vfiouser-vmem serve --socket /run/vmem0.sock --size 8G --qmp /run/vmem.qmp
  several devices in one process, configured like QEMU:
    vfiouser-vmem serve --qmp /run/vmem.qmp \\
      --object memory-backend-memfd,id=mem0,size=8G \\
      --device id=vm0,memdev=mem0,socket=/run/vm0.sock,requested-size=1G \\
      --object memory-backend-memfd,id=mem1,size=4G \\
      --device id=vm1,memdev=mem1,socket=/run/vm1.sock,node=1
  the same from a TOML file ([[object]] and [[device]] tables, same keys):
    vfiouser-vmem serve --config vmem.toml --qmp /run/vmem.qmp

  huge pages, preallocated on each PLUG:
    --object memory-backend-memfd,id=mem0,size=8G,hugetlb=on,hugetlbsize=2M \\
    --device id=vm0,memdev=mem0,socket=/run/vm0.sock,prealloc=on
  a file on tmpfs or hugetlbfs (a directory: an unlinked file is made in it):
    --object memory-backend-file,id=mem0,size=8G,mem-path=/dev/hugepages,share=on

--object memory-backend-memfd (the type, may be omitted) keys: id, size,
  share=on, hugetlb, hugetlbsize, seal, reserve, dump, policy, host-nodes
--object memory-backend-file keys: id, size, mem-path, share=on,
  discard-data, reserve, dump, policy, host-nodes
--device keys: virtio-mem (the driver, may be omitted), id, memdev, socket,
  node, block-size (default: 2M, or the huge page size), requested-size
  (default 0), prealloc, scrub-interval (seconds, default 10; 0: no periodic
  scrub), unplugged-access (reclaim, report or disconnect; docs/scrub.md)
What each key does, and why some of QEMU's are refused: docs/backends.md.
Sizes take QEMU's forms: a byte count or a number with K, M, G, T (512M, 8G).

""" + EXIT_CODES_HELP


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _node(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node {text!r}: expected a NUMA node number") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"invalid node {value}: expected 0-65535")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    one = p.add_argument_group("one device (the original flags)")
    one.add_argument("--socket", metavar="PATH", help="the vfio-user socket QEMU connects to")
    one.add_argument("--size", type=_size, metavar="SIZE", help="the device's maximum size (memory backend size)")
    one.add_argument("--block-size", type=_size, metavar="SIZE", help="the block size (default 2M)")
    one.add_argument("--requested-size", type=_size, metavar="SIZE",
                     help="the size the guest should plug at start (default 0)")
    one.add_argument("--id", help="the device id used over QMP (default vmem0)")
    one.add_argument("--node", type=_node, metavar="N",
                     help="the guest NUMA node of the memory (offers VIRTIO_MEM_F_ACPI_PXM)")
    many = p.add_argument_group("several devices, configured like QEMU")
    many.add_argument("--object", action="append", default=[], metavar="memory-backend-memfd,id=ID,size=SIZE",
                      help="a memory backend (repeatable)")
    many.add_argument("--device", action="append", default=[], metavar="id=ID,memdev=ID,socket=PATH,...",
                      help="a virtio-mem device using a backend (repeatable)")
    many.add_argument("--config", metavar="FILE", help="a TOML file with [[object]] and [[device]] tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouser-vmem",
        description="An out-of-process virtio-mem device for QEMU's vfio-user-pci.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve virtio-mem devices on vfio-user sockets",
        description="Serve virtio-mem PCI devices on vfio-user sockets, with a QMP control socket.\n"
        "Prints one line once every socket listens; stops on SIGTERM/SIGINT, removing its sockets.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_device_flags(serve)
    serve.add_argument("--qmp", metavar="PATH",
                       help="the UNIX socket on which the server speaks QMP (or qmp= in --config)")
    serve.add_argument("--monitor", metavar="PATH",
                       help="the UNIX socket on which the server speaks QEMU's human monitor (HMP), as QEMU's "
                       "-mon mode=readline (or monitor= in --config)")
    serve.add_argument("--qmp-max-clients", type=_positive_int, metavar="N",
                       help="at most N QMP connections, and N monitor connections (default 64, or "
                       "qmp-max-clients= in --config); at the limit a new client is still served: the one idle "
                       "the longest is disconnected")
    serve.add_argument("--socket-group", metavar="GROUP",
                       help="make the vfio-user, QMP and monitor sockets 0660 and owned by GROUP (default: 0600)")
    serve.add_argument("--allow-uid", action="append", metavar="USER",
                       help="only clients running as USER (a name or uid; repeat, or separate with commas) may "
                       "connect to the vfio-user, QMP and monitor sockets, besides root and the server's own user "
                       "(or allow-uids= in --config); others are logged and disconnected")
    serve.add_argument("--metrics", metavar="[HOST]:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)")
    serve.add_argument("--metrics-allow-remote", action="store_true",
                       help="allow a --metrics host that is not a loopback address")
    serve.add_argument("--log-level", choices=LOG_LEVELS,
                       help="default info, or log-level= in --config (reread on SIGHUP)")
    serve.add_argument("--log-format", choices=LOG_FORMATS,
                       help="auto (the default, or log-format= in --config): journal under systemd's journald, "
                       "text elsewhere; text: with a time stamp; journal: syslog priority prefixes (<3>...), no "
                       "time stamp; json: one object per line (time, level, logger, device, client, message)")

    ctl = sub.add_parser(
        "ctl",
        help="resize, list and watch devices over QMP",
        description="Drive a running server (or a QEMU with virtio-mem-pci devices) over QMP.",
        epilog="--qmp defaults to $VFIOUSER_VMEM_QMP.\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qmp_timeout_help = ("give up on a QMP peer that does not connect, greet or answer a command within S "
                        "seconds (default 10; exit code 1)")
    ctl.add_argument("--qmp", metavar="PATH", default=None, help="the QMP socket")
    ctl.add_argument("--qmp-timeout", type=_positive_float, default=10.0, metavar="S", help=qmp_timeout_help)
    ctl_sub = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    # --qmp and --qmp-timeout are accepted after the subcommand too (SUPPRESS
    # keeps the value given before it).
    qmp_again = argparse.ArgumentParser(add_help=False)
    qmp_again.add_argument("--qmp", metavar="PATH", default=argparse.SUPPRESS, help="the QMP socket")
    qmp_again.add_argument("--qmp-timeout", type=_positive_float, default=argparse.SUPPRESS, metavar="S",
                           help=qmp_timeout_help)
    resize = ctl_sub.add_parser(
        "resize", parents=[qmp_again], help="set a device's requested-size",
        description="Set a device's requested-size; with --wait, wait until the guest has plugged or\n"
        "unplugged its way there, and say where it got stuck if it does not.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    resize.add_argument("id", metavar="ID", help="the device id")
    resize.add_argument("size", metavar="SIZE", type=_size, help="the new requested size (e.g. 1G, 512M, 0)")
    resize.add_argument("--wait", action="store_true", help="wait until the device's size reaches SIZE")
    resize.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                        help="give up waiting after S seconds (default 60; exit code 3)")
    info = ctl_sub.add_parser("info", parents=[qmp_again], help="list the memory devices",
                              description="List the memory devices (query-memory-devices) as a table.")
    info.add_argument("--json", action="store_true", help="print the QMP reply as JSON")
    watch = ctl_sub.add_parser("watch", parents=[qmp_again], help="print size changes as they happen",
                               description="Print a line per MEMORY_DEVICE_SIZE_CHANGE event until Ctrl-C.")
    watch.add_argument("ids", nargs="*", metavar="ID", help="only these devices (default: all)")
    watch.add_argument("--count", type=_positive_int, metavar="N", help="stop after N size changes")
    watch.add_argument("--json", action="store_true", help="print the events as JSON lines")

    qargs = sub.add_parser(
        "qemu-args",
        help="print the QEMU options for a configuration",
        description="Print the QEMU options that attach the devices of a configuration (same device flags\n"
        "as serve): shared guest RAM, one vfio-user-pci device per socket, and -cpu/-numa options\n"
        "when the devices need them (see the README). Advice goes to stderr.",
        epilog="example:\n  eval \"qemu-system-x86_64 $(vfiouser-vmem qemu-args --config vmem.toml) -kernel ...\"\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    unit = sub.add_parser(
        "install-unit",
        help="install the systemd template unit vfiouser-vmem@.service",
        description="Write the systemd template unit vfiouser-vmem@.service, which runs this installation's\n"
        "command on CONFIG_DIR/INSTANCE.toml as a Type=notify service, and make CONFIG_DIR.\n"
        "Then: systemctl daemon-reload; systemctl enable --now vfiouser-vmem@INSTANCE (docs/operating.md).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    unit.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, metavar="DIR",
                      help=f"where the unit goes (default {DEFAULT_UNIT_DIR})")
    unit.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
                      help=f"where INSTANCE.toml is read from (default {DEFAULT_CONFIG_DIR})")
    unit.add_argument("--exec", metavar="PATH", help="the vfiouser-vmem command the unit runs (default: this one)")
    unit.add_argument("--print", action="store_true", help="print the unit instead of installing it")

    _add_device_flags(qargs)
    qargs.add_argument("--ram", type=_size, default=1 << 30, metavar="SIZE", help="the guest's boot RAM (default 1G)")
    qargs.add_argument("--format", choices=["shell", "json", "libvirt"], default="shell",
                       help="shell: quoted for sh (default); json: a JSON list of argv strings; libvirt: a domain "
                       "XML (docs/libvirt.md)")
    qargs.add_argument("--name", default="vmem-guest", help="libvirt: the domain's name (default vmem-guest)")
    qargs.add_argument("--vcpus", type=_positive_int, default=2, metavar="N",
                       help="libvirt: the domain's vCPUs, spread over its NUMA cells (default 2)")
    qargs.add_argument("--qmp", metavar="PATH", help=argparse.SUPPRESS)  # accepted, so serve's flags can be reused
    qargs.add_argument("--monitor", metavar="PATH", help=argparse.SUPPRESS)  # likewise
    return parser


_SINGLE_FLAGS = ("socket", "size", "block_size", "requested_size", "id", "node")


def _device_configs(parser: argparse.ArgumentParser, args: argparse.Namespace, *, qmp_path: str | None,
                    file_config: FileConfig | None) -> list:
    """The DeviceConfigs the flags describe; parser.error (exit 2) otherwise."""
    qemu_style = args.object or args.device
    serving = args.command == "serve"  # its sockets' directories must exist now
    try:
        if file_config is not None:
            return build_configs(file_config.objects, file_config.devices, qmp_path=qmp_path,
                                 need_directories=serving)
        if qemu_style:
            if not args.device:
                raise ConfigError("--object given without any --device using it")
            return build_configs([object_spec(t) for t in args.object], [device_spec(t) for t in args.device],
                                 qmp_path=qmp_path, need_directories=serving)
    except ConfigError as exc:
        parser.error(str(exc))

    missing = [flag for flag, value in (("--socket", args.socket), ("--size", args.size)) if value is None]
    if missing:
        if args.command == "serve" and qmp_path is None:
            missing.append("--qmp")
        parser.error(f"the following arguments are required: {', '.join(missing)} "
                     "(or --object/--device, or --config)")
    block_size = default_block_size(base_page_size()) if args.block_size is None else args.block_size
    requested = 0 if args.requested_size is None else args.requested_size
    try:
        _check_single(args.size, block_size, requested)
        if args.id is not None:
            check_id(args.id, "--id")  # the rule --device id= follows
        check_socket_path(args.socket, "--socket", need_directory=serving)
    except ConfigError as exc:
        parser.error(str(exc))
    if qmp_path is not None and os.path.abspath(args.socket) == os.path.abspath(qmp_path):
        parser.error("--socket and --qmp must be different paths")
    return [DeviceConfig(socket=args.socket, size_bytes=args.size, block_size_bytes=block_size,
                         requested_size_bytes=requested, id="vmem0" if args.id is None else args.id,
                         node=args.node)]


def _check_single(size: int, block_size: int, requested: int) -> None:
    """The single-device checks, with the flags' names in the messages."""
    check_device_settings(size_bytes=size, block_size_bytes=block_size, requested_size_bytes=requested,
                          names=CLI_NAMES)


def _load_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FileConfig | None:
    """Check that one way of giving devices is used; load --config."""
    single = [f for f in _SINGLE_FLAGS if getattr(args, f) is not None]
    qemu_style = args.object or args.device
    if single and (qemu_style or args.config):
        flags = ", ".join("--" + f.replace("_", "-") for f in single)
        parser.error(f"{flags} (one device) cannot be combined with --object/--device/--config")
    if args.config and qemu_style:
        parser.error("--config cannot be combined with --object/--device")
    if not args.config:
        return None
    try:
        return load_config_file(args.config)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable


def _group_id(parser: argparse.ArgumentParser, group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    parser.error(f"--socket-group: no group named {group!r}")
    raise AssertionError  # unreachable


def _allowed_uids(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  file_config: FileConfig | None) -> frozenset[int] | None:
    """``--allow-uid`` (or the file's ``allow-uids``) as uids; None if neither is given."""
    if args.allow_uid:
        where = "--allow-uid"
        users: list[str | int] = [u.strip() for arg in args.allow_uid for u in arg.split(",")]
    elif file_config is not None and file_config.allow_uids is not None:
        where = f"{args.config}: allow-uids"
        users = list(file_config.allow_uids)
    else:
        return None
    uids = set()
    for user in users:
        if isinstance(user, int):
            uids.add(user)
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            if not user.isdigit():
                parser.error(f"{where}: no user named {user!r}")
            uids.add(int(user))
    return frozenset(uids)


def _describe(config) -> str:
    return (f"{config.id} on {config.socket} (max {format_size(config.size_bytes)}, "
            f"block {format_size(config.block_size_bytes)}, requested {format_size(config.requested_size_bytes)})")


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import trio


    file_config = _load_file(parser, args)
    qmp_path = args.qmp or (file_config.qmp if file_config else None)
    configs = _device_configs(parser, args, qmp_path=qmp_path, file_config=file_config)
    if qmp_path is None:
        parser.error("the following arguments are required: --qmp")
    try:
        check_socket_path(qmp_path, "--qmp" if args.qmp else f"{args.config}: qmp", need_directory=True)
    except ConfigError as exc:
        parser.error(str(exc))
    monitor_path = args.monitor or (file_config.monitor if file_config else None)
    if monitor_path is not None:
        where = "--monitor" if args.monitor else f"{args.config}: monitor"
        try:
            check_socket_path(monitor_path, where, need_directory=True)
        except ConfigError as exc:
            parser.error(str(exc))
        taken = {os.path.abspath(qmp_path): "the QMP socket"}
        taken.update({os.path.abspath(c.socket): f"the vfio-user socket of {c.id}" for c in configs})
        if os.path.abspath(monitor_path) in taken:
            parser.error(f"{where}: {monitor_path!r} is {taken[os.path.abspath(monitor_path)]} too; "
                         "use different paths")
    max_clients = args.qmp_max_clients or (file_config.qmp_max_clients if file_config else None)
    group = args.socket_group or (file_config.socket_group if file_config else None)
    gid = None if group is None else _group_id(parser, group)
    allowed_uids = _allowed_uids(parser, args, file_config)
    exporter = None
    if args.metrics is not None:
        try:
            host, port = parse_metrics_address(args.metrics, allow_remote=args.metrics_allow_remote)
        except MetricsAddressError as exc:
            parser.error(f"--metrics: {exc}")
        exporter = MetricsExporter(host, port)
    elif args.metrics_allow_remote:
        parser.error("--metrics-allow-remote needs --metrics")

    def ready() -> None:
        if len(configs) == 1:  # the original wording
            c = configs[0]
            line = (f"vfiouser-vmem {__version__}: {c.id} ready on {c.socket} (max {format_size(c.size_bytes)}, "
                    f"block {format_size(c.block_size_bytes)}, requested {format_size(c.requested_size_bytes)}), "
                    f"QMP on {qmp_path}")
            if monitor_path is not None:
                line += f", monitor on {monitor_path}"
        else:
            line = (f"vfiouser-vmem {__version__}: ready: " + ", ".join(_describe(c) for c in configs)
                    + f"; QMP on {qmp_path}" + ("" if monitor_path is None else f", monitor on {monitor_path}"))
        if exporter is not None:
            line += f", metrics on {exporter.url}"
        print(line, flush=True)

    log_format = args.log_format or (file_config.log_format if file_config else None) or "auto"
    configure_logging(_log_level(args, file_config), log_format, device_ids=[c.id for c in configs])
    on_hangup = None if file_config is None else functools.partial(_reread_config, args, file_config)
    # serve() handles the signals while it runs.  Before (trio starting) and
    # after (trio ending, the sockets already gone) a stop signal ends the
    # process with 0 rather than killing it, and SIGHUP does not kill it.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_at_once)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        trio.run(_serve_then_ignore_signals, functools.partial(
            serve, configs, qmp_path, ready=ready, metrics=exporter, socket_group=gid, qmp_max_clients=max_clients,
            monitor_path=monitor_path, on_hangup=on_hangup, allowed_uids=allowed_uids))
    except BaseException as exc:
        # Failures to start (a path or port in use, a permission), possibly
        # wrapped in exception groups by trio's nurseries: a message, exit 1.
        leaves = _leaf_exceptions(exc)
        codes = [exit_code(e) for e in leaves]
        if None in codes:
            raise
        for e in leaves:
            logging.getLogger("vfiouser_vmem").error("%s", printable(_error_text(e)))
        return max(code for code in codes if code is not None)
    return EXIT_OK


def _exit_at_once(signum: int, _frame: object) -> None:
    raise SystemExit(EXIT_OK)


async def _serve_then_ignore_signals(run_server) -> None:
    """``run_server()``, then ignore the stop signals and SIGHUP: the
    process only exits from here on, and the interpreter's finalisation
    puts SIG_DFL back for Python handlers (not for SIG_IGN), so a late
    SIGTERM would kill it (status 143) after a clean stop."""
    try:
        await run_server()
    finally:
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


def _log_level(args: argparse.Namespace, file_config: FileConfig | None) -> str:
    """The flag, else the file's ``log-level``, else info."""
    return args.log_level or (file_config.log_level if file_config else None) or "info"


def _reread_config(args: argparse.Namespace, running: FileConfig) -> None:
    """SIGHUP: apply the configuration file's ``log-level`` (the one setting
    that changes without a restart: devices, sockets and backends are the
    guest's hardware); say which other changes wait for a restart.  A file
    that no longer loads changes nothing."""
    log = logging.getLogger("vfiouser_vmem")
    try:
        new = load_config_file(args.config)
    except ConfigError as exc:
        log.error("SIGHUP: %s; the running configuration is kept", printable(exc))
        return
    level = new.log_level or args.log_level or "info"
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    log.warning("SIGHUP: %s reread: log level %s", args.config, level)
    changed = [f.name.replace("_", "-") for f in dataclasses.fields(FileConfig)
               if f.name != "log_level" and getattr(new, f.name) != getattr(running, f.name)]
    if changed:
        log.warning("SIGHUP: %s: changes to %s take effect at the next start (only log-level is reread)",
                    args.config, ", ".join(changed))


def _error_text(exc: BaseException) -> str:
    """What a failure to start says: an OSError's own text without its
    ``[Errno N]`` prefix, with the path it is about when it has one."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        return text
    return str(exc)


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_exceptions(sub)]
    return [exc]


def _install_unit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.print:
            print(render_unit(args.exec or this_command(), args.config_dir), end="")
            return EXIT_OK
        path, changed = install_unit(args.unit_dir, exec_path=args.exec, config_dir=args.config_dir)
    except ConfigError as exc:
        parser.error(str(exc))
    print(f"{'wrote' if changed else 'unchanged:'} {path}; configurations go to {args.config_dir}/INSTANCE.toml\n"
          "next: systemctl daemon-reload && systemctl enable --now vfiouser-vmem@INSTANCE")
    return EXIT_OK


def _qemu_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    file_config = _load_file(parser, args)
    configs = _device_configs(parser, args, qmp_path=None, file_config=file_config)
    if args.ram == 0:
        parser.error("--ram must be positive")
    try:
        if args.format == "libvirt":
            text, notes = libvirt_domain(configs, args.ram, name=args.name, vcpus=args.vcpus)
        else:
            argv, notes = qemu_args(configs, args.ram)
            text = (json.dumps(argv) if args.format == "json" else format_shell(argv)) + "\n"
    except ConfigError as exc:
        parser.error(str(exc))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(text, end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # serve sets its own level and format once its configuration is read.
    configure_logging("warning", "text")
    # For errors that name the command: build_parser added one group of subcommands.
    assert parser._subparsers is not None
    commands = parser._subparsers._group_actions[0]
    assert isinstance(commands, argparse._SubParsersAction)
    subparser = commands.choices[args.command]
    if args.command == "serve":
        return _serve(subparser, args)
    if args.command == "qemu-args":
        return _qemu_args(subparser, args)
    if args.command == "install-unit":
        return _install_unit(subparser, args)
    if args.command == "ctl":

        return ctl.run(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
