"""The errors of vfiouser-vmem: one tree, rooted in :class:`VmemError`.

Every error the package raises on purpose is a :class:`VmemError`, so that
a caller (the CLI, an embedding program) can tell the project's refusals
from bugs with one ``except``.  Each class also derives from the built-in
exception that describes it best (``ValueError`` for a bad setting,
``OSError`` for a system call that failed, ...), so code that catches those
keeps working.  The modules that raise them re-export them.

::

    VmemError
     +-- ConfigError (ValueError)          a flag, config-file key or device setting
     |    +-- MetricsAddressError          --metrics HOST:PORT
     +-- SocketPathInUse (FileExistsError) a socket path the server must not take
     +-- UnsafeSocketPath (PermissionError) a socket directory others could tamper with
     +-- BackendError (OSError)            the host cannot provide a memory backend as configured
     +-- DiscardFailed (OSError)           memory could not be given back to the host
     +-- PreallocFailed (OSError)          plugged memory could not be allocated (prealloc=on)
     +-- DriverError                       the guest's driver broke the rules
     |    +-- ProtocolViolation            a request no driver may send
     |    +-- QueueError                   the virtqueue rules (virtio spec 2.7)
     |    +-- GuestMemoryError             a buffer the device cannot reach or write
     +-- PropertyError                     a QOM property access refused
     |    +-- PropertyNotFound (LookupError)
     |    +-- PropertyReadOnly (PermissionError)
     +-- VfuError (OSError)                a libvfio-user call failed
     +-- ConnectionLost                    the vfio-user client went away
     +-- QmpError                          a QMP error reply, or a broken QMP connection (ctl)

What the command line does with them (``vfiouser_vmem/cli/_exit.py``): ConfigError is bad
usage (exit 2); any other VmemError, an OSError from the system and a
ValueError from a lower layer are a runtime failure (exit 1) with their
message; anything else is a bug and ends with its traceback.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BackendError",
    "ConfigError",
    "ConnectionLost",
    "DiscardFailed",
    "DriverError",
    "GuestMemoryError",
    "MetricsAddressError",
    "PreallocFailed",
    "PropertyError",
    "PropertyNotFound",
    "PropertyReadOnly",
    "ProtocolViolation",
    "QmpError",
    "QueueError",
    "SocketPathInUse",
    "UnsafeSocketPath",
    "VfuError",
    "VmemError",
]


class VmemError(Exception):
    """The root of every error vfiouser-vmem raises on purpose."""


class ConfigError(VmemError, ValueError):
    """A configuration mistake; the message names where and what."""


class MetricsAddressError(ConfigError):
    """A ``--metrics`` address that cannot be served."""


class SocketPathInUse(VmemError, FileExistsError):
    """A socket path exists and is not a stale socket: refusing to take it.
    ``filename`` is the path; ``str()`` names it."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(_errno.EEXIST, why, path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class UnsafeSocketPath(VmemError, PermissionError):
    """A socket path in a directory that another user could change: one
    writable by everyone without the sticky bit, or reached through a
    symlink (docs/security.md).  ``filename`` is the socket path; ``str()``
    names it and the directory at fault."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(_errno.EPERM, why, path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class DiscardFailed(VmemError, OSError):
    """Memory could not be given back to the host (a hole could not be
    punched).  A request that needed it is answered BUSY and its blocks stay
    plugged.  From the C helper, ``errno`` is the C error and ``offset`` the
    backend offset of the range that failed (ranges before it were
    discarded); from elsewhere (a refusal while an earlier discard is
    retried, fault injection) only the message is set."""

    def __init__(self, *args: object, offset: int | None = None) -> None:
        super().__init__(*args)
        self.offset = offset


class BackendError(VmemError, OSError):
    """The host cannot provide a memory backend as it is configured: too few
    huge pages for what must be reserved, a file whose filesystem cannot
    punch holes, a path that cannot be opened.  The message names the
    backend, and the device when there is one; the server does not start."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class PreallocFailed(VmemError, OSError):
    """The backend could not allocate memory for a PLUG (the device's
    ``prealloc=on``: no huge page left, a full tmpfs).  The PLUG is answered
    BUSY, what was allocated for it is given back; ``errno`` is the
    system's."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class DriverError(VmemError):
    """The guest's driver broke the rules: the virtqueue stops until the
    driver resets the device (DEVICE_NEEDS_RESET); block state is kept."""


class ProtocolViolation(DriverError):
    """A request no driver may send (unknown type, short buffer): the
    transport decides what to do with the queue (see virtio/_pci.py)."""


class QueueError(DriverError):
    """The driver broke the virtqueue rules (virtio spec 2.7): the device
    needs a reset."""


class GuestMemoryError(DriverError):
    """A guest address the device cannot reach (or not write, or whose
    memory vanished under the mapping)."""


class PropertyError(VmemError):
    """A QOM property access was refused."""


class PropertyNotFound(PropertyError, LookupError):
    """qom-get/qom-set of a property the device does not have."""


class PropertyReadOnly(PropertyError, PermissionError):
    """qom-set of a property that only changes at device creation."""


class VfuError(VmemError, OSError):
    """A libvfio-user call failed; ``errno`` is the library's."""


class ConnectionLost(VmemError):
    """The vfio-user client went away; ``attach()`` waits for the next one."""


class QmpError(VmemError):
    """A QMP error reply (``desc`` is the message) or a broken connection."""

    def __init__(self, desc: str, error_class: str = "") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
