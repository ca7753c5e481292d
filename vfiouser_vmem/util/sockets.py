"""The UNIX socket paths the server listens on (vfio-user sockets, QMP): one
policy for taking a path, and for giving it back, and who may connect.

A path is taken only in a directory no other user can change
(``check_socket_directory``): a socket's mode keeps other users from
connecting, but not from renaming it away and putting their own socket in its
place, which every client would then trust (QEMU would DMA-map guest RAM to
it).  So the server refuses a directory that everyone may write without the
sticky bit (anywhere on the way to it), a socket directory that is itself a
symlink, and a symlink on the way owned by another user (either could be
pointed elsewhere).  docs/security.md says why each rule is there.

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
import struct
from collections.abc import Collection
from typing import NamedTuple

from vfiouser_vmem.errors import SocketPathInUse, UnsafeSocketPath

__all__ = ["PeerCredentials", "SocketPathInUse", "UnsafeSocketPath", "check_socket_directory", "claim_socket_path",
           "peer_credentials", "remove_socket_if_same", "uid_allowed", "unsafe_socket_directory"]

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


def _on_the_way(directory: str) -> list[str]:
    """``/``, then each directory from there down to the absolute path
    ``directory``, itself last."""
    parts = [part for part in directory.split("/") if part]
    return ["/"] + ["/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def unsafe_socket_directory(path: str) -> str | None:
    """Why the directory of socket ``path`` is not safe to listen in, or
    None if it is (module docstring).  A directory that does not exist is
    not judged here: ``bind()`` says so."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.islink(directory):
            return (f"its directory {directory} is a symlink (to {os.path.realpath(directory)}), which could be "
                    "pointed elsewhere: give the socket's real path")
        me = os.geteuid()
        # Symlinks on the way: lstat of each component of the path as given.
        for prefix in _on_the_way(directory):
            st = os.lstat(prefix)
            if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, me):
                return (f"{prefix}, on the way to it, is a symlink owned by uid {st.st_uid}, who could point it "
                        "elsewhere: give the socket's real path")
            if stat.S_ISLNK(st.st_mode):
                # The rest is judged on where it leads.
                break
        # Writable directories on the way, resolved: each could have the
        # next component renamed away by anyone (the sticky bit forbids
        # that to all but the owner, as on /tmp).
        real = os.path.realpath(directory)
        for prefix in _on_the_way(real):
            st = os.stat(prefix)
            if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                where = "its directory" if prefix == real else "the directory"
                return (f"{where} {prefix} is writable by every user and has no sticky bit, so anyone could "
                        "replace the socket: use a directory only the server's user (or group) can write")
    except FileNotFoundError:
        return None
    return None


def check_socket_directory(path: str) -> None:
    """Raise UnsafeSocketPath if ``path``'s directory is not safe to listen in."""
    why = unsafe_socket_directory(path)
    if why is not None:
        raise UnsafeSocketPath(path, why)


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for ``bind()``: nothing to do if it does not exist,
    a stale socket is removed, anything else raises SocketPathInUse.  A
    directory others could change raises UnsafeSocketPath first."""
    check_socket_directory(path)
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


class PeerCredentials(NamedTuple):
    """Who is at the other end of a UNIX connection (SO_PEERCRED: as the
    client was when it connected)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid}, uid {self.uid}, gid {self.gid}"


_UCRED = struct.Struct("3i")


def peer_credentials(fd: int) -> PeerCredentials | None:
    """The peer of the connected UNIX socket ``fd``, or None if the kernel
    cannot say (not a UNIX socket, or closed)."""
    try:
        conn = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return PeerCredentials(*_UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))
    except OSError:
        return None
    finally:
        conn.close()


def uid_allowed(creds: PeerCredentials | None, allowed_uids: Collection[int] | None) -> bool:
    """Whether a client may connect under ``--allow-uid`` (None: anyone the
    socket's mode lets in).  Root and the server's own user are always
    allowed: either could replace the socket or trace the server anyway.  A
    peer the kernel cannot name is refused when there is a list."""
    if allowed_uids is None:
        return True
    if creds is None:
        return False
    return creds.uid in (0, os.geteuid()) or creds.uid in allowed_uids
