"""The command line: ``vfiouser-vmem serve|qemu-args|ctl ...``.

The top layer: it may import every other (docs/architecture.md).
"""

from vfiouser_vmem.cli._exit import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, exit_code
from vfiouser_vmem.cli._main import build_parser, main

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "build_parser", "exit_code", "main"]
