# Shared by the set-up scripts (sourced, not run).

# ensure_debian_packages PKG...: install the packages that are missing
# (apt-get update only when something is); refuse clearly without root.
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
