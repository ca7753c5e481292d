"""The command line's exit codes, in one place for ``serve``, ``qemu-args``
and ``ctl``; which error class ends with which (vfiouser_vmem/errors.py
draws the tree)."""

from __future__ import annotations

from vfiouser_vmem.errors import ConfigError, VmemError

__all__ = ["EXIT_CODES_HELP", "EXIT_FAILURE", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "exit_code"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3

EXIT_CODES_HELP = """\
exit codes:
  0  success (serve: also after SIGTERM/SIGINT)
  1  runtime failure (socket in use, QMP error: its message is printed)
  2  bad usage (nothing was started or changed)
  3  ctl resize --wait: the guest did not reach the size in time"""


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a command that ``exc`` ended (vfiouser_vmem/errors.py
    draws the tree), or None for a bug (its traceback is shown).  A setting
    refused as a ValueError by a lower layer counts as a failure to start."""
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, (VmemError, OSError, ValueError)):
        return EXIT_FAILURE
    return None
