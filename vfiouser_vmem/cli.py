"""The ``vfiouser-vmem`` command line (DESIGN.md section 6).

Exit codes: 0 success (also after SIGTERM/SIGINT), 1 runtime failure,
2 bad usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

import trio

from vfiouser_vmem import __version__
from vfiouser_vmem.sizes import format_size, parse_size

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouser-vmem",
        description="An out-of-process virtio-mem device for QEMU's vfio-user-pci.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a virtio-mem device on a vfio-user socket",
        description="Serve a virtio-mem PCI device on a vfio-user socket, with a QMP control socket. "
        "Sizes take QEMU's forms: a byte count or a number with K, M, G, T (e.g. 512M, 8G).",
    )
    serve.add_argument("--socket", required=True, metavar="PATH", help="the vfio-user socket QEMU connects to")
    serve.add_argument("--size", required=True, type=_size, metavar="SIZE", help="the device's maximum size (memory backend size)")
    serve.add_argument("--block-size", type=_size, default=2 << 20, metavar="SIZE", help="the block size (default 2M)")
    serve.add_argument("--requested-size", type=_size, default=0, metavar="SIZE", help="the size the guest should plug at start (default 0)")
    serve.add_argument("--id", default="vmem0", help="the device id used over QMP (default vmem0)")
    serve.add_argument("--node", type=_node, default=None, metavar="N", help="the guest NUMA node of the memory (offers VIRTIO_MEM_F_ACPI_PXM)")
    serve.add_argument("--qmp", required=True, metavar="PATH", help="the UNIX socket on which the server speaks QMP")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def _check_serve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from vfiouser_vmem.device import validate_block_size

    try:
        validate_block_size(args.block_size)
    except ValueError as exc:
        parser.error(f"--block-size: {exc}")
    if args.size == 0 or args.size % args.block_size:
        parser.error(f"--size {format_size(args.size)} is not a positive multiple of the block size {format_size(args.block_size)}")
    if args.size > 1 << 40:
        parser.error(f"--size {format_size(args.size)} is above the supported maximum of 1T")
    if args.requested_size > args.size:
        parser.error(f"--requested-size {format_size(args.requested_size)} is above --size {format_size(args.size)}")
    if args.requested_size % args.block_size:
        parser.error(f"--requested-size {format_size(args.requested_size)} is not a multiple of the block size {format_size(args.block_size)}")
    if args.socket == args.qmp:
        parser.error("--socket and --qmp must be different paths")


def _serve(args: argparse.Namespace) -> int:
    from vfiouser_vmem.server import DeviceConfig, SocketPathInUse, serve

    config = DeviceConfig(
        socket=args.socket,
        size_bytes=args.size,
        block_size_bytes=args.block_size,
        requested_size_bytes=args.requested_size,
        id=args.id,
        node=args.node,
    )

    def ready() -> None:
        print(
            f"vfiouser-vmem {__version__}: {config.id} ready on {config.socket} "
            f"(max {format_size(config.size_bytes)}, block {format_size(config.block_size_bytes)}, "
            f"requested {format_size(config.requested_size_bytes)}), QMP on {args.qmp}",
            flush=True,
        )

    try:
        trio.run(functools.partial(serve, [config], args.qmp, ready=ready))
    except (SocketPathInUse, ValueError, OSError) as exc:
        logging.getLogger("vfiouser_vmem").error("%s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO) if hasattr(args, "log_level") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        _check_serve_args(parser, args)
        return _serve(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
