#!/usr/bin/env bash
# Builds the QEMU/guest kit once and caches it (DESIGN.md section 4):
#   - a Debian trixie root (debootstrap minbase) holding QEMU 11 from
#     trixie-backports (built with vfio-user-pci) and SeaBIOS;
#   - the guest: Debian trixie's kernel (6.12) and a busybox initramfs that
#     carries virtio_mem.ko.
# Idempotent: a stamp file records the hash of this script; a changed script
# rebuilds, an unchanged one returns at once.  Prints the kit directory.
set -euo pipefail

KIT_DIR=${VMEM_KIT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vfiouser-vmem/kit}
MIRROR=${VMEM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)
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

need_host_pkgs=()
command -v debootstrap >/dev/null || need_host_pkgs+=(debootstrap)
command -v cpio >/dev/null || need_host_pkgs+=(cpio)
command -v xz >/dev/null || need_host_pkgs+=(xz-utils)
if ((${#need_host_pkgs[@]})); then
    log "installing host packages: ${need_host_pkgs[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_host_pkgs[@]}" >&2
fi

mkdir -p "$KIT_DIR"
rm -f "$KIT_DIR/stamp"

# Two ways to get QEMU 11 (DESIGN.md section 4):
# - a debootstrap'd trixie root (default; works on Debian 12 and newer);
# - VMEM_KIT_USE_HOST=1: the host itself is Debian trixie (the docker/
#   image), QEMU is installed into it from trixie-backports.  No chroot, no
#   mounts: this is what runs inside an unprivileged `docker build`.
# The guest kernel is downloaded and unpacked (never installed) in both.
if [[ ${VMEM_KIT_USE_HOST:-0} == 1 ]]; then
    ROOT=/
    grep -q '^VERSION_CODENAME=trixie' /etc/os-release || { log "VMEM_KIT_USE_HOST=1 needs a Debian trixie host"; exit 1; }
    echo "deb $MIRROR trixie-backports main" >/etc/apt/sources.list.d/vmem-trixie-backports.list
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
    in_root() { chroot "$ROOT" "$@"; }
fi

log "installing QEMU 11 (trixie-backports), SeaBIOS and busybox"
in_root apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    -t trixie-backports qemu-system-x86 seabios >&2
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    busybox-static dpkg >&2

# The guest kernel: the package that linux-image-amd64 points at, unpacked.
KPKG=$(in_root apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $KPKG ]] || { log "cannot resolve linux-image-amd64"; exit 1; }
rm -rf "$KIT_DIR/kernel-root" && mkdir -p "$KIT_DIR/kernel-root"
in_root sh -c "cd /tmp && rm -f linux-image-*.deb && apt-get download $KPKG" >&2
mv "${ROOT%/}"/tmp/"$KPKG"_*.deb "$KIT_DIR/"
dpkg-deb -x "$(ls "$KIT_DIR"/"$KPKG"_*.deb | head -1)" "$KIT_DIR/kernel-root"
rm -f "$KIT_DIR"/"$KPKG"_*.deb
in_root apt-get clean
if [[ $ROOT != / ]]; then umount_proc; fi
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

build_initramfs() { # $1 = kernel version (as in /lib/modules), $2 = output
    local kver=$1 out=$2 work
    work=$(mktemp -d)
    mkdir -p "$work"/{bin,sbin,proc,sys,dev,tmp,lib/modules,etc}
    cp "$ROOT/usr/bin/busybox" "$work/bin/busybox"
    local ko
    ko=$(find "$KIT_DIR/kernel-root/lib/modules/$kver" "$KIT_DIR/kernel-root/usr/lib/modules/$kver" \
        -name 'virtio_mem.ko*' 2>/dev/null | head -1 || true)
    [[ -n $ko ]] || { log "no virtio_mem.ko in kernel $kver"; exit 1; }
    case $ko in
        *.xz) xz -dc "$ko" >"$work/lib/modules/virtio_mem.ko" ;;
        *.zst) zstd -dc "$ko" >"$work/lib/modules/virtio_mem.ko" ;;
        *) cp "$ko" "$work/lib/modules/virtio_mem.ko" ;;
    esac
    install -m 0755 "$HERE/guest-init.sh" "$work/init"
    (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$work"
}

KMOD_DIR=$KIT_DIR/kernel-root/lib/modules
[[ -d $KMOD_DIR ]] || KMOD_DIR=$KIT_DIR/kernel-root/usr/lib/modules
KVER=$(ls "$KMOD_DIR" | sort -V | tail -1)
cp "$KIT_DIR/kernel-root/boot/vmlinuz-$KVER" "$KIT_DIR/vmlinuz"
build_initramfs "$KVER" "$KIT_DIR/initrd.img"
echo "$KVER" >"$KIT_DIR/kernel-version"
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
