#!/usr/bin/env bash
# Builds the QEMU/guest kit once and caches it (docs/design.md, "Where the parts come from"):
#   - a Debian trixie root (debootstrap minbase) holding QEMU 11 from
#     trixie-backports (built with vfio-user-pci) and SeaBIOS;
#   - the guest: Debian trixie's kernel (6.12) and a busybox initramfs that
#     carries virtio_mem.ko.
# Idempotent: a stamp file records the hash of this script; a changed script
# rebuilds, an unchanged one returns at once.  Prints the kit directory.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/lib.sh
source "$HERE/../scripts/lib.sh"
KIT_DIR=${VMEM_KIT_DIR:-$VMEM_CACHE_DIR/kit}
MIRROR=${VMEM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAMP_WANT=$(cat "$0" "$HERE/guest-init.sh" | sha256sum | cut -c1-16)
ROOT=$KIT_DIR/root

log() { echo "[build-kit] $*" >&2; }

if [[ -f $KIT_DIR/stamp && $(cat "$KIT_DIR/stamp") == "$STAMP_WANT" ]]; then
    echo "$KIT_DIR"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "needs root (debootstrap, chroot); run it with sudo"
    exit 1
fi

ensure_debian_packages debootstrap cpio gzip xz-utils

mkdir -p "$KIT_DIR"
rm -f "$KIT_DIR/stamp"

# Two ways to get QEMU 11 (docs/design.md, "Where the parts come from"):
# - a debootstrap'd trixie root (default; works on Debian 12 and newer);
# - VMEM_KIT_USE_HOST=1: the host itself is Debian trixie (the docker/
#   image), QEMU is installed into it from trixie-backports.  No chroot, no
#   mounts: this is what runs inside an unprivileged `docker build`.
# The guest kernel is downloaded and unpacked (never installed) in both.
if [[ ${VMEM_KIT_USE_HOST:-0} == 1 ]]; then
    ROOT=/
    grep -q '^VERSION_CODENAME=trixie' /etc/os-release || { log "VMEM_KIT_USE_HOST=1 needs a Debian trixie host"; exit 1; }
    echo "deb $MIRROR trixie-backports main" >/etc/apt/sources.list.d/vmem-trixie-backports.list
    APT_ETC=/etc/apt
    in_root() { "$@"; }
else
    if [[ ! -x $ROOT/usr/bin/apt-get ]]; then
        log "debootstrap trixie into $ROOT (about 20 s)"
        rm -rf "$ROOT"
        debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >&2
    fi
    cat >"$ROOT/etc/apt/sources.list" <<SRC
deb $MIRROR trixie main
deb $MIRROR trixie-backports main
SRC
    # apt inside the root needs /proc; unmount it whatever happens.
    umount_proc() { if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc"; fi; }
    trap umount_proc EXIT
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    APT_ETC=$ROOT/etc/apt
    in_root() { chroot "$ROOT" "$@"; }
fi
# bookworm only provides a second guest kernel (Linux 6.1), downloaded,
# never installed: pinned low so that nothing else comes from it.
echo "deb $MIRROR bookworm main" >"$APT_ETC/sources.list.d/vmem-bookworm.list"
rm -f "$APT_ETC/sources.list.d/bookworm.list" "$APT_ETC/preferences.d/bookworm"
printf 'Package: *\nPin: release n=bookworm\nPin-Priority: 100\n' >"$APT_ETC/preferences.d/vmem-bookworm"

log "installing QEMU 11 (trixie-backports), SeaBIOS and busybox"
in_root apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    -t trixie-backports qemu-system-x86 seabios >&2
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    busybox-static dpkg >&2

if [[ $ROOT == / ]]; then
    QEMU_LAUNCH=(/usr/bin/qemu-system-x86_64)
else
    QEMU_LAUNCH=("$ROOT/usr/lib64/ld-linux-x86-64.so.2" --library-path "$ROOT/usr/lib/x86_64-linux-gnu"
                 "$ROOT/usr/bin/qemu-system-x86_64")
fi

QEMU_VERSION=$("${QEMU_LAUNCH[@]}" --version | head -1)
log "$QEMU_VERSION"
if ! "${QEMU_LAUNCH[@]}" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
    log "this QEMU has no vfio-user-pci device"
    exit 1
fi

# modules_in_load_order MODDIR NAME...: the .ko files (relative to MODDIR)
# that NAME... need, dependencies first.  The .deb ships no modules.dep
# (depmod runs at install), so read each module's own "depends=".
# Built-in drivers (virtio_pci in 6.12, a module in 6.1) are not listed.
modules_in_load_order() {
    python3 - "$@" <<'PY'
import lzma, os, re, sys
moddir, names = sys.argv[1], sys.argv[2:]
paths = {}
for root, _, files in os.walk(moddir):
    for f in files:
        if ".ko" in f:
            paths[f.split(".ko")[0].replace("-", "_")] = os.path.relpath(os.path.join(root, f), moddir)
def depends(name):
    data = open(os.path.join(moddir, paths[name]), "rb").read()
    if paths[name].endswith(".xz"):
        data = lzma.decompress(data)
    m = re.search(rb"\0depends=([^\0]*)\0", b"\0" + data)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []
order = []
def visit(name):
    if name in order or name not in paths:
        return  # done, or built into the kernel
    for dep in depends(name):
        visit(dep)
    order.append(name)
for name in names:
    visit(name)
if "virtio_mem" not in order:
    sys.exit(f"no virtio_mem module in {moddir}")
print("\n".join(paths[n] for n in order))
PY
}

build_initramfs() { # $1 = the kernel's modules directory, $2 = output
    local kmoddir=$1 out=$2 work ko name
    work=$(mktemp -d)
    mkdir -p "$work"/{bin,sbin,proc,sys,dev,tmp,lib/modules,etc}
    cp "$ROOT/usr/bin/busybox" "$work/bin/busybox"
    # The guest's /init loads lib/modules/load-order, one module a line.
    : >"$work/lib/modules/load-order"
    modules_in_load_order "$kmoddir" virtio_pci virtio_mem >"$work/modules.list"
    while read -r ko; do
        name=$(basename "$ko"); name=${name%%.ko*}.ko
        case $ko in
            *.xz) xz -dc "$kmoddir/$ko" >"$work/lib/modules/$name" ;;
            *.zst) zstd -dc "$kmoddir/$ko" >"$work/lib/modules/$name" ;;
            *) cp "$kmoddir/$ko" "$work/lib/modules/$name" ;;
        esac
        echo "$name" >>"$work/lib/modules/load-order"
    done <"$work/modules.list"
    rm "$work/modules.list"
    install -m 0755 "$HERE/guest-init.sh" "$work/init"
    (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$work"
}

# A guest kernel per suite: the package linux-image-amd64 points at there,
# unpacked into guest-SUITE/ with its own busybox initramfs.
fetch_guest_kernel() { # $1 = suite
    local suite=$1 dir=$KIT_DIR/guest-$1 kpkg kmods kver
    kpkg=$(in_root apt-cache show "linux-image-amd64/$suite" | awk '/^Depends: linux-image-[0-9]/ {print $2; exit}')
    [[ -n $kpkg ]] || { log "cannot resolve linux-image-amd64/$suite"; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir/root"
    in_root sh -c "cd /tmp && rm -f linux-image-*.deb && apt-get download $kpkg/$suite" >&2
    dpkg-deb -x "$(ls "${ROOT%/}"/tmp/"$kpkg"_*.deb | head -1)" "$dir/root"
    rm -f "${ROOT%/}"/tmp/"$kpkg"_*.deb
    kmods=$dir/root/lib/modules
    [[ -d $kmods ]] || kmods=$dir/root/usr/lib/modules
    kver=$(ls "$kmods" | sort -V | tail -1)
    cp "$dir/root/boot/vmlinuz-$kver" "$dir/vmlinuz"
    build_initramfs "$kmods/$kver" "$dir/initrd.img"
    echo "$kver" >"$dir/kernel-version"
    rm -rf "$dir/root"
    log "guest kernel $kver ($suite)"
}
for suite in trixie bookworm; do
    fetch_guest_kernel "$suite"
done
# The default guest is trixie's (Linux 6.12).
ln -sfn guest-trixie/vmlinuz "$KIT_DIR/vmlinuz"
ln -sfn guest-trixie/initrd.img "$KIT_DIR/initrd.img"
ln -sfn guest-trixie/kernel-version "$KIT_DIR/kernel-version"
KVER=$(cat "$KIT_DIR/kernel-version")
rm -rf "$KIT_DIR/kernel-root"
in_root apt-get clean
if [[ $ROOT != / ]]; then umount_proc; fi
echo "$QEMU_VERSION" >"$KIT_DIR/qemu-version"

# The launcher runs the root's QEMU through the root's own loader, so that no
# library of the host is mixed in; the second -L is there because Debian's
# firmware links are absolute paths.
{
    echo '#!/bin/sh'
    printf 'exec'
    printf ' %q' "${QEMU_LAUNCH[@]}" -L "$ROOT/usr/share/qemu" -L "$ROOT/usr/share/seabios"
    echo ' "$@"'
} >"$KIT_DIR/qemu-system-x86_64"
chmod +x "$KIT_DIR/qemu-system-x86_64"

echo "$STAMP_WANT" >"$KIT_DIR/stamp"
log "kit ready in $KIT_DIR (kernel $KVER)"
echo "$KIT_DIR"
