#!/bin/busybox sh
# /init of the test guest's initramfs.  The kernel console is ttyS0 (a log
# file on the host); ttyS1 carries a line-based command channel to the test
# harness: each line is run by sh, its output is followed by "@@RC <code>".
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /tmp
mount -t tmpfs -o size=90% tmpfs /tmp

# virtio_mem (and, in older kernels, the virtio core and virtio_pci it
# needs) in dependency order; virtio_mem probes the device at load.
while read -r module; do
    insmod "/lib/modules/$module" || echo "insmod $module failed"
done </lib/modules/load-order

stty -F /dev/ttyS1 raw -echo -icrnl -onlcr 2>/dev/null
exec </dev/ttyS1 >/dev/ttyS1 2>&1
echo "@@READY $(uname -r)"
while IFS= read -r line; do
    sh -c "$line"
    echo "@@RC $?"
done
