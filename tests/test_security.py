"""Who may reach the server's sockets (docs/security.md): directories no
other user can change, each client's credentials logged, ``--allow-uid``.

The clients of another user are real processes: Debian's ``/usr/bin/python3``
run as ``nobody`` (the tests' interpreter lives under /root, which nobody
cannot enter), with the venv's trio and the tests' vfio-user client on its
path.  The sockets reach nobody through ``--socket-group nogroup`` and a
directory of that group.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from proc_util import EXE, start_serve, terminate
from vfio_user_client import VfioUserClient

from vfiouser_vmem.cli._config import check_socket_path
from vfiouser_vmem.errors import ConfigError, UnsafeSocketPath
from vfiouser_vmem.server import DeviceConfig, open_server
from vfiouser_vmem.util.sockets import (
    PeerCredentials,
    check_socket_directory,
    peer_credentials,
    uid_allowed,
    unsafe_socket_directory,
)

TESTS = Path(__file__).parent
SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def tmp():
    path = Path(tempfile.mkdtemp(prefix="vmem-sec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- directories ---------------------------------------------------------------

def test_a_world_writable_directory_without_the_sticky_bit_is_refused(tmp: Path) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    why = unsafe_socket_directory(str(shared / "vm0.sock"))
    assert why is not None and str(shared) in why and "no sticky bit" in why
    # With the sticky bit (as /tmp) only a file's owner may rename it away.
    os.chmod(shared, 0o1777)
    assert unsafe_socket_directory(str(shared / "vm0.sock")) is None
    # Group-writable is the operator's choice (--socket-group setups).
    os.chmod(shared, 0o770)
    assert unsafe_socket_directory(str(shared / "vm0.sock")) is None


def test_a_world_writable_directory_on_the_way_is_refused(tmp: Path) -> None:
    # Anyone could rename "inner" away and put a directory of their own,
    # with their own socket, in its place.
    outer = tmp / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    os.chmod(outer, 0o777)
    os.chmod(inner, 0o700)
    why = unsafe_socket_directory(str(inner / "vm0.sock"))
    assert why is not None and f"the directory {outer} " in why


def test_a_symlinked_socket_directory_is_refused(tmp: Path) -> None:
    real = tmp / "real"
    real.mkdir()
    link = tmp / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeSocketPath) as info:
        check_socket_directory(str(link / "vm0.sock"))
    assert str(link / "vm0.sock") in str(info.value) and "is a symlink" in str(info.value)
    assert str(real) in str(info.value)  # where to point it instead
    check_socket_directory(str(real / "vm0.sock"))


def test_a_symlink_on_the_way_owned_by_another_user_is_refused(tmp: Path) -> None:
    real = tmp / "real"
    (real / "sockets").mkdir(parents=True)
    link = tmp / "link"
    link.symlink_to(real)
    # Root's own symlinks on the way (as Debian's /var/run -> /run) are fine.
    assert unsafe_socket_directory(str(link / "sockets" / "vm0.sock")) is None
    os.lchown(link, 65534, 65534)
    why = unsafe_socket_directory(str(link / "sockets" / "vm0.sock"))
    assert why is not None and f"{link}, on the way to it, is a symlink owned by uid 65534" in why


def test_the_command_line_names_the_flag_of_an_unsafe_directory(tmp: Path) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match=r"^--qmp: refusing to listen on .*no sticky bit"):
        check_socket_path(str(shared / "q"), "--qmp", need_directory=True)
    # A path for another machine (qemu-args) is not judged here.
    check_socket_path(str(shared / "q"), "--qmp")
    result = subprocess.run([*EXE, "serve", "--socket", str(shared / "vm0.sock"), "--size", "1G",
                             "--qmp", str(tmp / "q")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert f"--socket: refusing to listen on '{shared / 'vm0.sock'}'" in result.stderr
    assert not (shared / "vm0.sock").exists() and not (tmp / "q").exists()


async def test_the_api_refuses_an_unsafe_directory_before_taking_anything(tmp: Path) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    config = DeviceConfig(id="vm0", socket=str(shared / "vm0.sock"), size_bytes=1 << 30)
    with pytest.raises(UnsafeSocketPath, match="no sticky bit"):
        async with open_server([config], str(tmp / "q")):
            pass
    assert list(shared.iterdir()) == [] and not (tmp / "q").exists()
    # The QMP socket's directory is judged too (ConnectionServer.serve).
    good = DeviceConfig(id="vm0", socket=str(tmp / "vm0.sock"), size_bytes=1 << 30)
    with pytest.raises(UnsafeSocketPath, match="no sticky bit"):
        async with open_server([good], str(shared / "q")):
            pass
    assert list(shared.iterdir()) == [] and not (tmp / "vm0.sock").exists()


# -- credentials ---------------------------------------------------------------

def test_peer_credentials_and_the_allow_list() -> None:
    a, b = __import__("socket").socketpair()
    with a, b:
        assert peer_credentials(a.fileno()) == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
    other = PeerCredentials(1, 4242, 4242)
    assert uid_allowed(other, None)
    assert not uid_allowed(other, frozenset())
    assert uid_allowed(other, frozenset({4242}))
    assert uid_allowed(PeerCredentials(1, 0, 0), frozenset())  # root
    assert uid_allowed(PeerCredentials(1, os.geteuid(), 0), frozenset())  # the server's own user
    assert not uid_allowed(None, frozenset({4242}))  # unknown: refused when there is a list
    r, w = os.pipe()
    try:
        assert peer_credentials(r) is None
    finally:
        os.close(r)
        os.close(w)


#: Run as nobody: connect to the QMP socket (greeting or not) and the
#: vfio-user socket (VERSION, then DEVICE_GET_INFO), print what happened.
CLIENT = r"""
import json, socket, sys
sys.path[:0] = sys.argv[3:]
import trio
from vfio_user_client import VfioUserClient

def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    try:
        s.connect(path)
    except OSError as exc:
        return f"connect: {exc.strerror}"
    data = s.recv(4096)
    s.close()
    return "greeting" if b'"QMP"' in data else ("eof" if not data else repr(data))

async def vfio_user(path):
    with trio.fail_after(20):
        try:
            client = await VfioUserClient.connect(path)
        except OSError as exc:
            return f"connect: {exc}"
        async with client:
            try:
                info = await client.device_info()
            except Exception as exc:
                return f"after VERSION: {type(exc).__name__}"
            return f"device info: {info.num_regions} regions"

print(json.dumps({"qmp": qmp(sys.argv[1]), "vfio-user": trio.run(vfio_user, sys.argv[2])}))
"""


def _as_nobody(qmp_path: str, vfu_path: str) -> dict[str, str]:
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, qmp_path, vfu_path, str(SITE_PACKAGES), str(TESTS)],
                            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def shared_dir(tmp: Path):
    """A directory that nobody may enter (group nogroup), for sockets of that group."""
    if not os.path.exists(SYSTEM_PYTHON) or os.geteuid() != 0:
        pytest.skip("needs root and /usr/bin/python3 of the same minor version")
    nobody = pwd.getpwnam("nobody")
    imports = "import sys; sys.path[:0] = sys.argv[1:]; import trio, vfio_user_client"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", imports, str(SITE_PACKAGES), str(TESTS)], user=nobody.pw_uid,
                           group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        # A venv in a private directory (integration/test_packaging.py's,
        # under a 0700 work directory): the checkout's own venv runs these.
        pytest.skip(f"nobody cannot import trio from {SITE_PACKAGES} and {TESTS}: {probe.stderr.strip()[-200:]}")
    gid = grp.getgrnam("nogroup").gr_gid
    os.chown(tmp, 0, gid)
    os.chmod(tmp, 0o750)
    return tmp


def _serve(tmp: Path, *extra: str):
    return start_serve("--id", "vm0", "--socket", str(tmp / "vm0.sock"), "--size", "1G", "--qmp", str(tmp / "q"),
                       "--socket-group", "nogroup", *extra)


async def _served_as_root(tmp: Path) -> int:
    with trio.fail_after(30):
        async with await VfioUserClient.connect(str(tmp / "vm0.sock")) as client:
            return (await client.device_info()).num_regions


async def test_every_client_is_logged_with_its_credentials_and_others_may_connect(shared_dir: Path) -> None:
    proc, _ = _serve(shared_dir)
    try:
        seen = await trio.to_thread.run_sync(_as_nobody, str(shared_dir / "q"), str(shared_dir / "vm0.sock"))
    finally:
        rc, err = terminate(proc)
    assert seen["qmp"] == "greeting", seen
    assert seen["vfio-user"].startswith("device info:"), seen
    assert rc == 0, err
    assert "QMP client 1 connected (pid " in err and ", uid 65534, gid 65534)" in err
    assert "vm0: vfio-user client 1 (pid " in err and "uid 65534, gid 65534) connected on" in err


async def test_allow_uid_refuses_other_users_on_every_socket(shared_dir: Path) -> None:
    proc, _ = _serve(shared_dir, "--allow-uid", "4242")
    try:
        seen = await trio.to_thread.run_sync(_as_nobody, str(shared_dir / "q"), str(shared_dir / "vm0.sock"))
        # Root is still served, and the refused client left nothing behind.
        regions = await _served_as_root(shared_dir)
        assert proc.poll() is None
    finally:
        rc, err = terminate(proc)
    # QMP: closed before the greeting; vfio-user: closed after the VERSION
    # reply (libvfio-user accepts and negotiates before the server sees who).
    assert seen["qmp"] == "eof" and seen["vfio-user"].startswith("after VERSION:"), seen
    assert regions > 0
    assert rc == 0, err
    assert "QMP: refusing a client (pid " in err and "uid 65534, gid 65534): its uid is not allowed" in err
    assert "vm0: refusing a vfio-user client on " in err and "uid 65534" in err
    assert "vfio-user client 1 (pid " in err  # root's, the only one counted


async def test_allow_uids_in_the_file_takes_user_names(shared_dir: Path) -> None:
    config = shared_dir / "c.toml"
    config.write_text(f'qmp = "{shared_dir / "q"}"\nsocket-group = "nogroup"\nallow-uids = ["nobody"]\n'
                      '[[object]]\nqom-type = "memory-backend-memfd"\nid = "m"\nsize = "1G"\n'
                      f'[[device]]\nid = "vm0"\nmemdev = "m"\nsocket = "{shared_dir / "vm0.sock"}"\n')
    proc, _ = start_serve("--config", str(config))
    try:
        seen = await trio.to_thread.run_sync(_as_nobody, str(shared_dir / "q"), str(shared_dir / "vm0.sock"))
    finally:
        rc, err = terminate(proc)
    assert seen["qmp"] == "greeting" and seen["vfio-user"].startswith("device info:"), seen
    assert rc == 0 and "refusing" not in err, err


@pytest.mark.parametrize("args, message", [
    (["--allow-uid", "no-such-user-here"], "--allow-uid: no user named 'no-such-user-here'"),
    (["--allow-uid", "nobody,,x-nobody"], "--allow-uid: no user named ''"),
])
def test_allow_uid_refuses_unknown_users(tmp: Path, args: list[str], message: str) -> None:
    result = subprocess.run([*EXE, "serve", "--socket", str(tmp / "s"), "--size", "1G", "--qmp", str(tmp / "q"),
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result


def test_allow_uids_in_the_file_must_be_names_or_uids(tmp: Path) -> None:
    config = tmp / "c.toml"
    config.write_text('qmp = "q"\nallow-uids = "nobody"\n[[device]]\nid = "vm0"\n')
    result = subprocess.run([*EXE, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert f"{config}: allow-uids must be an array of user names or uids, got 'nobody'" in result.stderr
