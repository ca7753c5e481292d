"""The UNIX socket paths the server listens on (vfio-user sockets, QMP): one
policy for taking a path, and for giving it back.

A path is taken if it is free, or if it holds a stale socket (left by a
server killed hard), which is removed.  Anything else is refused with
:class:`SocketPathInUse` and left as it is: a file that is not a socket, or a
socket someone listens on.

Whether someone listens is read from ``/proc/net/unix`` first, without
connecting: a test connection looks like a client to a vfio-user server
(it would wait for the client's VERSION and log a refused client).  That
table shows only this network namespace's sockets, so a socket it does not
list is probed with a connect before it is removed: a server in another
container sharing the directory answers, a stale socket refuses.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from vfiouser_vmem.errors import SocketPathInUse

__all__ = ["SocketPathInUse", "claim_socket_path", "remove_socket_if_same"]

log = logging.getLogger("vfiouser_vmem.sockets")

#: __SO_ACCEPTCON in /proc/net/unix's Flags column: a listening socket.
_SO_ACCEPTCON = 0x10000


def _listening_unix_paths() -> set[str] | None:
    """Paths of listening UNIX sockets (/proc/net/unix), or None if unknown."""
    try:
        with open("/proc/net/unix") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return None
    paths = set()
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) >= 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            paths.add(fields[7])
    return paths


def _answers(path: str) -> bool:
    """Whether a server accepts connections on ``path`` (a connect probe)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
        return True
    except BlockingIOError:  # listening, with a full backlog
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for ``bind()``: nothing to do if it does not exist,
    a stale socket is removed, anything else raises SocketPathInUse."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathInUse(path, "exists and is not a socket; refusing to replace it")
    listening = _listening_unix_paths()
    if (listening is not None and (os.path.abspath(path) in listening or path in listening)) or _answers(path):
        raise SocketPathInUse(path, "another process is already listening on this socket")
    # Stale.  Removed only if it is still the same file: another server may
    # have just replaced it.
    if remove_socket_if_same(path, (st.st_dev, st.st_ino)):
        log.info("removed stale socket %s", path)


def remove_socket_if_same(path: str, identity: tuple[int, int] | None) -> bool:
    """Remove ``path`` if it is still the file ``identity`` (st_dev, st_ino)
    names; True when it was removed.  A server gives its socket back this
    way, so that it never removes the socket of a server that took the path
    after it."""
    if identity is None:
        return False
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove socket %s: %s", path, exc)
    return False
