# shellcheck shell=bash
# Shared by the set-up scripts (sourced, not run).

# ensure_debian_packages PKG...: install the packages that are missing
# (apt-get update only when something is); refuse clearly without root.
debian_packages_installed() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
    done
}

ensure_debian_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) != 0 ]]; then
        echo "missing Debian packages: ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run as root" >&2
        return 1
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Where the project caches what it builds (libvfio-user, the QEMU/guest kit).
VMEM_CACHE_DIR=${VMEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vfiouser-vmem}

# use_libvfio_user: choose the libvfio-user the package is built against
# (docs/libvfio-user.md): LIBVFIO_USER_PREFIX; else, with
# VMEM_SYSTEM_LIBVFIO_USER=1, whatever `pkg-config libvfio-user` finds; else
# the project's patched build (scripts/build-libvfio-user.sh, built when
# missing), exporting PKG_CONFIG_PATH so that the package build finds it.
# Sets LVU_ID (names the library a build used, for the callers' stamps) and
# LVU_PREFIX (its install prefix).
# shellcheck disable=SC2034  # the two are the callers'
use_libvfio_user() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    if [[ -n ${LIBVFIO_USER_PREFIX:-} ]]; then
        echo "using libvfio-user from LIBVFIO_USER_PREFIX=$LIBVFIO_USER_PREFIX" >&2
        LVU_PREFIX=$LIBVFIO_USER_PREFIX
        LVU_ID=$LIBVFIO_USER_PREFIX
    elif [[ ${VMEM_SYSTEM_LIBVFIO_USER:-0} == 1 ]] && pkg-config --exists libvfio-user; then
        LVU_PREFIX=$(pkg-config --variable=prefix libvfio-user)
        echo "using libvfio-user from pkg-config ($LVU_PREFIX)" >&2
        LVU_ID=pkg-config
    else
        LVU_PREFIX=$(bash "$here/build-libvfio-user.sh")
        export PKG_CONFIG_PATH=$LVU_PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
        LVU_ID=$LVU_PREFIX
    fi
}
