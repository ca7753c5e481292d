#!/usr/bin/env bash
# Installs everything the project needs, idempotently, on a Debian machine:
#   system packages -> libvfio-user (patched, in a prefix) -> .venv with the
#   package (the `vfiouser-vmem` command: .venv/bin/vfiouser-vmem)
#   and, with --kit, the QEMU 11 / guest kit for the integration tests.
# A second run does nothing that the first one already did.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WITH_KIT=0
for arg in "$@"; do
    case $arg in
        --kit) WITH_KIT=1 ;;
        *) echo "usage: $0 [--kit]" >&2; exit 2 ;;
    esac
done
log() { echo "[setup] $*" >&2; }
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# -- system packages --------------------------------------------------------
PKGS=(gcc pkg-config libffi-dev meson ninja-build libjson-c-dev libcmocka-dev patch xz-utils
      python3 python3-venv python3-dev ca-certificates)
# netcat-openbsd: the monitor test runs the guide's `echo ... | nc -U MONITOR` (integration/test_hmp.py);
# systemd: systemd-analyze verify of the unit (tests/test_unit_file.py) and a `systemd --user` manager that
# runs it (integration/test_systemd.py), also where PID 1 is not systemd; util-linux: unshare, nsenter;
# podman, buildah, runc: the images of docker/ are built and run (integration/test_containers.py).
((WITH_KIT)) && PKGS+=(debootstrap cpio gzip netcat-openbsd systemd util-linux podman buildah runc)
ensure_debian_packages "${PKGS[@]}"

# libvirt, for integration/test_libvirt.py (docs/libvirt.md), which starts and stops its own
# daemons: the packages' maintainer scripts would start libvirtd at install time (the -sysv
# package keeps systemd-sysv out, so they use /etc/init.d), which a policy-rc.d that refuses
# every start prevents (invoke-rc.d(8)).
LIBVIRT_PKGS=(libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients libvirt-daemon-driver-qemu)
if ((WITH_KIT)) && ! debian_packages_installed "${LIBVIRT_PKGS[@]}"; then
    POLICY_RC=/usr/sbin/policy-rc.d
    if [[ ! -e $POLICY_RC && $(id -u) == 0 ]]; then
        printf '#!/bin/sh\n# scripts/setup.sh: no daemon starts while libvirt is installed\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        trap 'rm -f "$POLICY_RC"' EXIT
        ensure_debian_packages "${LIBVIRT_PKGS[@]}"
        rm -f "$POLICY_RC"
        trap - EXIT
    else
        ensure_debian_packages "${LIBVIRT_PKGS[@]}"
    fi
fi

# -- libvfio-user -----------------------------------------------------------
use_libvfio_user

# -- the virtualenv and the package -------------------------------------------
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "$PYTHON is older than 3.11; set PYTHON to a newer interpreter"
    exit 1
fi
VENV=$ROOT/.venv
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
STAMP_WANT=$( (echo "$LVU_ID"; cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/csrc/*) | sha256sum | cut -c1-16)
if [[ -f $VENV/.vmem-installed && $(cat "$VENV/.vmem-installed") == "$STAMP_WANT" ]] \
    && "$VENV/bin/python" -c 'import vfiouser_vmem._vfu, vfiouser_vmem._blocks' 2>/dev/null; then
    :
else
    log "installing the package into $VENV (editable, with the test and bench extras)"
    "$VENV/bin/python" -m pip install -q -U pip setuptools wheel "cffi>=1.16" >&2
    "$VENV/bin/python" -m pip install -q --no-build-isolation -e "$ROOT[test,bench]" >&2
    echo "$STAMP_WANT" >"$VENV/.vmem-installed"
fi

# -- the QEMU / guest kit -------------------------------------------------------
if ((WITH_KIT)); then
    bash "$ROOT/integration/build-kit.sh" >/dev/null
fi
log "ready: $VENV/bin/vfiouser-vmem"
