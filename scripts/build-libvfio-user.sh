#!/usr/bin/env bash
# Builds libvfio-user from the copy carried by Debian's QEMU source package
# (docs/design.md, "Where the parts come from"), applies the project's patches
# (scripts/libvfio-user-patches, see docs/libvfio-user.md), and installs it
# into a prefix together with a pkg-config file and its LICENSE.  Idempotent: the prefix is
# named after the hash of this script and the patches.  Prints the prefix.
#
# Users with their own libvfio-user skip this: set LIBVFIO_USER_PREFIX, or
# make `pkg-config libvfio-user` find it, before installing the package.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/lib.sh
source "$HERE/lib.sh"
CACHE=$VMEM_CACHE_DIR
MIRROR=${VMEM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Versions tried in order; newest QEMU sources sometimes 404 (docs/design.md, "Where the parts come from").
QEMU_SRC_VERSIONS=${VMEM_QEMU_SRC_VERSIONS:-"1:10.2.2+ds-1 1:10.0.13+ds-0+deb13u1"}
LIBVFIO_USER_COMMIT=0b28d205572c80b568a1003db2c8f37ca333e4d7

log() { echo "[libvfio-user] $*" >&2; }

HASH=$(cat "$0" "$HERE"/libvfio-user-patches/*.patch | sha256sum | cut -c1-12)
PREFIX=$CACHE/libvfio-user-$HASH
if [[ -f $PREFIX/.complete ]]; then
    echo "$PREFIX"
    exit 0
fi

# libc6-dev: gcc without recommends (ensure_debian_packages) cannot link a program without it.
ensure_debian_packages meson ninja-build pkg-config patch xz-utils libjson-c-dev libcmocka-dev gcc libc6-dev

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# An apt configuration of our own, with only deb-src lines, so that the
# host's apt sources are neither read nor changed.
APT=$CACHE/apt-src
mkdir -p "$APT"/{lists/partial,cache/archives/partial,sources.list.d,preferences.d}
cat >"$APT/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
SRC
APT_OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
    -o "Dir::Etc::Preferences=$APT/preferences" -o "Dir::Etc::PreferencesParts=$APT/preferences.d"
    -o "APT::Sandbox::User=root"
    # sid's Release is valid for a week, and a mirror that serves a snapshot
    # (as this project's CI hosts' does) has it expired: apt-get update then
    # fails.  What is fetched is still checked against the signed Release's
    # hashes, and the version is pinned above; only this private
    # configuration skips the date.
    -o "Acquire::Check-Valid-Until=false")

ORIG=$(ls "$CACHE"/src/qemu_*.orig.tar.xz 2>/dev/null | head -1 || true)
if [[ -z $ORIG ]]; then
    log "fetching the QEMU source package (it carries libvfio-user)"
    apt-get "${APT_OPTS[@]}" update -q >&2
    mkdir -p "$CACHE/src"
    for v in $QEMU_SRC_VERSIONS; do
        if (cd "$CACHE/src" && apt-get "${APT_OPTS[@]}" source --download-only "qemu=$v" >&2); then
            break
        fi
        log "qemu=$v did not download; trying the next version"
    done
    ORIG=$(ls "$CACHE"/src/qemu_*.orig.tar.xz 2>/dev/null | head -1 || true)
    [[ -n $ORIG ]] || { log "no QEMU source package could be downloaded"; exit 1; }
fi

tar -xJf "$ORIG" -C "$WORK" --wildcards '*/subprojects/libvfio-user*'
SRC=$(echo "$WORK"/*/subprojects/libvfio-user)
WRAP=$(echo "$WORK"/*/subprojects/libvfio-user.wrap)
if ! grep -q "$LIBVFIO_USER_COMMIT" "$WRAP"; then
    log "warning: $(basename "$ORIG") carries $(grep revision "$WRAP"), the patches are for $LIBVFIO_USER_COMMIT"
fi
for p in "$HERE"/libvfio-user-patches/*.patch; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --quiet --forward <"$p"
done

rm -rf "$PREFIX"
meson setup "$WORK/build" "$SRC" --prefix "$PREFIX" --libdir lib \
    -Dbuildtype=release -Ddebug=false >&2
ninja -C "$WORK/build" lib/libvfio-user.so.0.0.1 >&2
meson install -C "$WORK/build" --no-rebuild --quiet >&2 || ninja -C "$WORK/build" install >&2

# Its licence goes with it: scripts/build-wheel puts the library into the wheel,
# and a BSD-licensed library travels in binary form with its notice.
install -D -m 0644 "$SRC/LICENSE" "$PREFIX/share/doc/libvfio-user/LICENSE"

mkdir -p "$PREFIX/lib/pkgconfig"
cat >"$PREFIX/lib/pkgconfig/libvfio-user.pc" <<PC
prefix=$PREFIX
libdir=\${prefix}/lib
includedir=\${prefix}/include/vfio-user

Name: libvfio-user
Description: vfio-user server library (commit ${LIBVFIO_USER_COMMIT:0:7} + vfiouser-vmem patches)
Version: 0.0.1
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lvfio-user
Cflags: -I\${includedir}
PC
touch "$PREFIX/.complete"
log "installed into $PREFIX"
echo "$PREFIX"
