"""The wheel of scripts/build-wheel is self-contained: installed into a fresh
venv, it serves a real guest where the build cache does not exist.

scripts/build-wheel rebuilds only when the sources changed (its stamp holds
their hash), so this test never runs a stale wheel and rebuilds at most once
per change.  What runs from the wheel runs in a private mount namespace
(``unshare -m``) in which a tmpfs covers VMEM_CACHE_DIR, where the patched
libvfio-user is built (and /dev/null covers the library of a prefix outside
it, LIBVFIO_USER_PREFIX): as on a machine that never built it.  QEMU runs
outside that namespace, from the kit in the same cache; it has no use for
libvfio-user's build.  The namespace, and the mounts in it, end with the last
process in it; every process is stopped by PID."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from harness import GIB, REPO, Guest, ProjectSettings, VmemServer, project_settings, stop_and_report, wait_for

BOOT_TIMEOUT_S = 240
# TCG on two shared cores is slow and sometimes stalls (docs/design.md, "Where the parts come from").
RESIZE_TIMEOUT_S = 180
#: The source of the tmpfs mounts, to find them in a mount table.
HIDDEN = "vmem-hidden"
#: Where a prefix may hold its libraries (csrc/ffi_vfu.py looks in the same).
LIBDIRS = ("lib", "lib/x86_64-linux-gnu", "lib64")


def build_wheel() -> Path:
    out = subprocess.run(["bash", str(REPO / "scripts" / "build-wheel")], check=True, stdout=subprocess.PIPE,
                         text=True, timeout=1800).stdout
    return Path(out.strip().splitlines()[-1])


def hiding(settings: ProjectSettings) -> list[str]:
    """The command prefix that runs a command where libvfio-user's build is
    gone (the module docstring)."""
    cache = settings.cache_dir
    outside = [lib for d in LIBDIRS for lib in sorted((settings.libvfio_user_prefix / d).glob("libvfio-user.so*"))
               if not lib.is_relative_to(cache)]
    # --make-rprivate: nothing mounted here propagates to the host's namespace.
    script = ('set -eu; mount --make-rprivate /; mount -t tmpfs -o size=1m,mode=0755 ' + HIDDEN + ' "$1"; shift; '
              'while [ "$1" != -- ]; do mount --bind /dev/null "$1"; shift; done; shift; exec "$@"')
    return ["unshare", "--mount", "--", "sh", "-c", script, "sh", str(cache), *map(str, outside), "--"]


def run(argv: list[str | Path], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)


def run_paths(elf: Path) -> list[str]:
    """The RPATH and RUNPATH entries of a shared object (readelf -d)."""
    out = run(["readelf", "-d", elf]).stdout
    return [p for m in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[(.*)\]", out) for p in m.split(":")]


def resolved(ldd_output: str) -> dict[str, str]:
    """soname -> path, from ldd's ``name => path (address)`` lines."""
    return dict(re.findall(r"^\s*(\S+) => (\S+)", ldd_output, re.M))


def test_the_wheel_serves_a_guest_where_the_build_cache_does_not_exist(kit, workdir) -> None:
    settings = project_settings()
    wheel = build_wheel()
    version = wheel.name.split("-")[1]

    # -- the file: a manylinux tag this glibc can run, the libraries inside --
    tag = re.fullmatch(r"vfiouser_vmem-[^-]+-cp311-abi3-manylinux_(\d+)_(\d+)_x86_64\.whl", wheel.name)
    assert tag, wheel.name
    glibc = tuple(int(n) for n in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    assert (int(tag[1]), int(tag[2])) <= glibc[:2]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    libs = [n for n in names if n.startswith("vfiouser_vmem.libs/") and not n.endswith("/")]
    assert sorted(re.sub(r"-[0-9a-f]{8}\.so.*", "", n.split("/")[1]) for n in libs) == ["libjson-c", "libvfio-user"], libs
    dist_info = f"vfiouser_vmem-{version}.dist-info"
    for name in ("vfiouser_vmem/py.typed", f"{dist_info}/licenses/LICENSE",
                 f"{dist_info}/licenses/bundled/libvfio-user/LICENSE", f"{dist_info}/licenses/bundled/libjson-c5/copyright"):
        assert name in names, name

    # -- installed into a fresh venv (its requirements from the index) -------
    venv = workdir / "venv"
    assert run([sys.executable, "-m", "venv", venv]).returncode == 0
    installed = run([venv / "bin" / "python", "-m", "pip", "install", wheel], timeout=1800,
                    env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert installed.returncode == 0, installed.stdout[-5000:] + installed.stderr[-5000:]
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
                    cwd=workdir).stdout.strip()).resolve()
    bundled = site / "vfiouser_vmem.libs"
    binding = next((site / "vfiouser_vmem").glob("_vfu*.so"))
    elves = [*(site / "vfiouser_vmem").glob("*.so"), *bundled.iterdir()]
    assert len(elves) == 4, elves
    # No run path of the build host is left (the cache, the interpreter's lib/).
    assert {str(p.relative_to(site)): [e for e in run_paths(p) if not e.startswith("$ORIGIN")] for p in elves} \
        == {str(p.relative_to(site)): [] for p in elves}
    assert run_paths(binding) == ["$ORIGIN/../vfiouser_vmem.libs"]

    hide = hiding(settings)
    # -- the control: in the namespace, libvfio-user's build is gone ----------
    library = next(p for d in LIBDIRS if (p := settings.libvfio_user_prefix / d / "libvfio-user.so.0").exists())
    load = [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"]
    assert run(load).returncode == 0
    hidden_load = run([*hide, *load])
    assert hidden_load.returncode != 0 and "libvfio-user" in hidden_load.stderr, hidden_load.stderr
    # The symptom, with the project's own (editable) install, which
    # links libvfio-user by a run path into its build: ImportError.
    import vfiouser_vmem._vfu as editable

    if resolved(run(["ldd", editable.__file__]).stdout).get("libvfio-user.so.0", "").startswith(str(settings.cache_dir)):
        broken = run([*hide, sys.executable, "-c", "import vfiouser_vmem._vfu"], cwd=workdir)
        assert broken.returncode != 0 and "libvfio-user.so.0" in broken.stderr, broken.stderr

    # -- the wheel's binding finds its libraries in the wheel ----------------
    ldd = run([*hide, "ldd", binding])
    assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout + ldd.stderr
    found = resolved(ldd.stdout)
    ours = {name: path for name, path in found.items() if name.startswith(("libvfio-user", "libjson-c"))}
    # ldd prints the path as the loader built it ($ORIGIN/..): resolved.
    assert len(ours) == 2 and all(Path(p).resolve().parent == bundled for p in ours.values()), found

    helped = run([*hide, venv / "bin" / "python", "-m", "vfiouser_vmem", "--help"], cwd=workdir)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: vfiouser-vmem "), helped.stdout + helped.stderr
    versioned = run([*hide, venv / "bin" / "vfiouser-vmem", "--version"], cwd=workdir)
    assert versioned.stdout == f"vfiouser-vmem {version}\n", versioned.stdout + versioned.stderr

    # -- serve a real guest from the wheel, and grow it ----------------------
    class WheelServer(VmemServer):
        def command(self) -> list[str]:
            return [*hide, str(venv / "bin" / "vfiouser-vmem"), "serve"]

    started: list[object] = []
    failed = True
    try:
        server = WheelServer(workdir, size="4G")
        started.append(server)
        pid = server.proc.pid
        # unshare and sh exec: the PID is the server's, in the namespace.
        assert any(line.split()[-3:-1] == ["tmpfs", HIDDEN] and line.split()[4] == str(settings.cache_dir)
                   for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())
        mapped = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                  if "libvfio-user" in line or "libjson-c" in line}
        assert len(mapped) == 2 and all(Path(p).parent == bundled for p in mapped), mapped

        guest = Guest(kit, workdir, [server.socket])
        started.append(guest)
        guest.wait_ready(BOOT_TIMEOUT_S)
        wait_for(lambda: "virtio" in guest.run("ls /sys/bus/virtio/drivers/virtio_mem/ 2>/dev/null || true"),
                 60, "virtio_mem to bind")
        base_kib = guest.meminfo_kib()
        server.set_requested_size(1 * GIB)
        wait_for(lambda: server.get("size") == 1 * GIB, RESIZE_TIMEOUT_S, "size 1 GiB over QMP")
        wait_for(lambda: guest.meminfo_kib() == base_kib + GIB // 1024, RESIZE_TIMEOUT_S,
                 "the guest's MemTotal 1 GiB above its base")
        failed = False
    finally:
        for thing in reversed(started):
            stop_and_report(thing, failed)
    assert server.proc.returncode == 0, server.log()[-5000:]
    # The namespace's mounts never reached the host's.
    assert HIDDEN not in Path("/proc/self/mountinfo").read_text()
