"""The service manager's notification protocol (sd_notify(3)), for
``Type=notify`` units: ``READY=1``, ``STATUS=...``, ``STOPPING=1`` and the
watchdog's ``WATCHDOG=1``.

Written by hand because the protocol is one datagram on a UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace), and the PyPI packages that wrap it either need libsystemd
(``systemd-python``, a C build) or are unmaintained; a missing or dead
socket must never stop the server, so every failure is logged once and
swallowed.

``WATCHDOG_USEC`` (set by systemd when the unit has ``WatchdogSec=``) is
read as sd_watchdog_enabled(3) reads it: it applies when ``WATCHDOG_PID``
is unset or names this process.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger("vfiouser_vmem.systemd")


class Notifier:
    """Sends state lines to the service manager; does nothing where
    ``NOTIFY_SOCKET`` is unset (not started by systemd, or ``Type=simple``).

    ``environ`` defaults to ``os.environ``; like sd_notify's
    ``unset_environment``, the variables are not passed on to children only
    if the caller removes them (the server starts none)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        target = env.get("NOTIFY_SOCKET") or None
        # sd_notify(3): "@" at the start names a socket in the abstract namespace.
        self.address: str | bytes | None = None
        if target is not None:
            self.address = b"\0" + target[1:].encode() if target.startswith("@") else target
        self.target = target
        self.watchdog_usec = _watchdog_usec(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=value``) as one datagram; True when sent."""
        if self.address is None:
            return False
        # A newline inside a value would start a new assignment (a forged
        # READY=1 in a STATUS= text, for one): a STATUS text is one line.
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager on NOTIFY_SOCKET=%s: %s (further failures are "
                            "not logged)", self.target, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def _watchdog_usec(env) -> int | None:
    """sd_watchdog_enabled(3): the period in microseconds, or None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec
