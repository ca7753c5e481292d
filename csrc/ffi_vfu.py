"""cffi (API mode) builder of ``vfiouser_vmem._vfu``: the binding to libvfio-user.

The library is found, in this order, through ``LIBVFIO_USER_PREFIX`` (an
install prefix holding ``include/vfio-user/libvfio-user.h`` and
``lib/libvfio-user.so``), or ``pkg-config libvfio-user``.  The project's own
build (scripts/build-libvfio-user.sh) installs a patched copy and a
pkg-config file; see docs/libvfio-user.md for the patches and why.

It is looked up only when the module is compiled (``find_libvfio_user``,
called by setup.py's ``build_ext`` just before cffi writes the C source),
not when this file is executed: setuptools executes it for every command
(``sdist``, ``egg_info``), and those need no libvfio-user.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from cffi import FFI

# The context's private data: shared by the cdef (cffi parses C comments
# away) and the compiled source, so the two cannot drift apart.
PRIVATE = r"""
/* The device's serve of a notify (csrc/vmem_queue.h vmem_serve_on_notify):
 * returns the MSI-X vector to trigger or -1, and sets *need_python when the
 * notify must also be counted as a kick for Python. */
typedef int (vmem_notify_serve_fn)(void *arg, int *need_python);
/* The device's answer to a read of the region (csrc/vmem_config.h
 * vmem_bar0_fast_read): 1 when it filled buf, 0 when the read is Python's. */
typedef int (vmem_fast_read_fn)(void *arg, char *buf, size_t count, uint64_t offset);

struct vmem_vfu_private {
    void *handle;            /* ffi.new_handle(VfuContext) */
    uint64_t notify_offset;  /* the notify window, within notify_region */
    uint64_t notify_length;
    int notify_region;       /* -1: none; else VFU_PCI_DEV_BAR0_REGION_IDX */
    /* Notify writes since VfuContext.take_kicks() last read it.  Written
     * here, inside vfu_run_ctx, and read/reset by take_kicks(): both on the
     * trio thread, never at the same time, so no atomics are needed. */
    uint32_t kicks;
    /* Optional: called for a notify write while notify_armed; disarmed
     * after one call and before any Python callback (VfuContext). */
    vmem_notify_serve_fn *notify_serve;
    void *notify_serve_arg;
    int notify_armed;
    /* The last vfu_irq_trigger of a served notify that failed: its errno
     * (0: none) and vector, for Python to log (take_notify_irq_error). */
    int irq_errno;
    int irq_failed_vector;
    /* Optional: tried for every read of the region while reads_armed;
     * disarmed before any Python callback, not by the reads themselves. */
    vmem_fast_read_fn *fast_read;
    void *fast_read_arg;
    int reads_armed;
};
"""

CDEF = r"""
typedef long loff_t;
struct iovec { void *iov_base; size_t iov_len; };

typedef struct vfu_ctx vfu_ctx_t;
typedef ... vfu_pci_config_space_t;

typedef enum { VFU_TRANS_SOCK, VFU_TRANS_PIPE, VFU_TRANS_MAX } vfu_trans_t;
typedef enum { VFU_DEV_TYPE_PCI } vfu_dev_type_t;
#define LIBVFIO_USER_FLAG_ATTACH_NB ...

vfu_ctx_t *vfu_create_ctx(vfu_trans_t trans, const char *path, int flags,
                          void *pvt, vfu_dev_type_t dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
void *vfu_get_private(vfu_ctx_t *vfu_ctx);

typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t *log, int level);

typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf,
                                         size_t count, loff_t offset,
                                         bool is_write);
#define VFU_REGION_FLAG_READ ...
#define VFU_REGION_FLAG_WRITE ...
#define VFU_REGION_FLAG_RW ...
#define VFU_REGION_FLAG_MEM ...
#define VFU_REGION_FLAG_ALWAYS_CB ...
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_t *region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas,
                     int fd, uint64_t offset);

typedef enum vfu_reset_type {
    VFU_RESET_DEVICE,
    VFU_RESET_LOST_CONN,
    VFU_RESET_PCI_FLR
} vfu_reset_type_t;
typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, vfu_reset_type_t type);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t *reset);

typedef int (vfu_device_quiesce_cb_t)(vfu_ctx_t *vfu_ctx);
void vfu_setup_device_quiesce_cb(vfu_ctx_t *vfu_ctx,
                                 vfu_device_quiesce_cb_t *quiesce_cb);
int vfu_device_quiesced(vfu_ctx_t *vfu_ctx, int quiesce_errno);

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
} vfu_dma_info_t;
typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx,
                         vfu_dma_register_cb_t *dma_register,
                         vfu_dma_unregister_cb_t *dma_unregister);

enum vfu_dev_irq_type {
    VFU_DEV_INTX_IRQ,
    VFU_DEV_MSI_IRQ,
    VFU_DEV_MSIX_IRQ,
    VFU_DEV_ERR_IRQ,
    VFU_DEV_REQ_IRQ,
    VFU_DEV_NUM_IRQS
};
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type,
                             uint32_t count);
typedef void (vfu_dev_irq_state_cb_t)(vfu_ctx_t *vfu_ctx, uint32_t start,
                                      uint32_t count, bool mask);
int vfu_setup_irq_state_callback(vfu_ctx_t *vfu_ctx,
                                 enum vfu_dev_irq_type type,
                                 vfu_dev_irq_state_cb_t *cb);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);

typedef struct dma_sg dma_sg_t;
size_t dma_sg_size(void);
int vfu_addr_to_sgl(vfu_ctx_t *vfu_ctx, void *dma_addr, size_t len,
                    dma_sg_t *sgl, size_t max_nr_sgs, int prot);
int vfu_sgl_get(vfu_ctx_t *vfu_ctx, dma_sg_t *sgl, struct iovec *iov,
                size_t cnt, int flags);
void vfu_sgl_put(vfu_ctx_t *vfu_ctx, dma_sg_t *sgl, struct iovec *iov,
                 size_t cnt);

enum {
    VFU_PCI_DEV_BAR0_REGION_IDX,
    VFU_PCI_DEV_BAR1_REGION_IDX,
    VFU_PCI_DEV_BAR2_REGION_IDX,
    VFU_PCI_DEV_BAR3_REGION_IDX,
    VFU_PCI_DEV_BAR4_REGION_IDX,
    VFU_PCI_DEV_BAR5_REGION_IDX,
    VFU_PCI_DEV_ROM_REGION_IDX,
    VFU_PCI_DEV_CFG_REGION_IDX,
    VFU_PCI_DEV_VGA_REGION_IDX,
    VFU_PCI_DEV_MIGR_REGION_IDX,
    VFU_PCI_DEV_NUM_REGIONS
};
typedef enum {
    VFU_PCI_TYPE_CONVENTIONAL,
    VFU_PCI_TYPE_PCI_X_1,
    VFU_PCI_TYPE_PCI_X_2,
    VFU_PCI_TYPE_EXPRESS
} vfu_pci_type_t;
#define PCI_HEADER_TYPE_NORMAL ...
int vfu_pci_init(vfu_ctx_t *vfu_ctx, vfu_pci_type_t pci_type, int hdr_type,
                 int revision);
void vfu_pci_set_id(vfu_ctx_t *vfu_ctx, uint16_t vid, uint16_t did,
                    uint16_t ssvid, uint16_t ssid);
void vfu_pci_set_class(vfu_ctx_t *vfu_ctx, uint8_t base, uint8_t sub,
                       uint8_t pi);
vfu_pci_config_space_t *vfu_pci_get_config_space(vfu_ctx_t *vfu_ctx);
#define VFU_CAP_FLAG_EXTENDED ...
#define VFU_CAP_FLAG_CALLBACK ...
#define VFU_CAP_FLAG_READONLY ...
ssize_t vfu_pci_add_capability(vfu_ctx_t *vfu_ctx, size_t pos, int flags,
                               void *data);
size_t vfu_pci_find_capability(vfu_ctx_t *vfu_ctx, bool extended, int cap_id);

/* Callbacks into Python: one per region, because libvfio-user does not pass
 * the region index to a region callback. */
extern "Python" void vfu_py_log(vfu_ctx_t *, int, const char *);
extern "Python" int vfu_py_reset(vfu_ctx_t *, vfu_reset_type_t);
extern "Python" void vfu_py_dma_register(vfu_ctx_t *, vfu_dma_info_t *);
extern "Python" void vfu_py_dma_unregister(vfu_ctx_t *, vfu_dma_info_t *);
extern "Python" ssize_t vfu_py_region0(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region1(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region2(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region3(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region4(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region5(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region6(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region7(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region8(vfu_ctx_t *, char *, size_t, loff_t, bool);
extern "Python" ssize_t vfu_py_region9(vfu_ctx_t *, char *, size_t, loff_t, bool);

/* The context's private pointer (vfu_create_ctx's pvt) and the notify fast
 * path: PRIVATE above, SOURCE below. */
""" + PRIVATE + r"""
ssize_t vmem_region_fast_notify(vfu_ctx_t *, char *, size_t, loff_t, bool);

/* The connection's next message (VfuContext.next_message). */
#define VMEM_MSG_READY ...
#define VMEM_MSG_PARTIAL ...
#define VMEM_MSG_NO_ROOM ...
#define VMEM_MSG_HUNG_UP ...
int vmem_vfu_next_message(int fd);
"""

# C compiled into the module.  The notify fast path: the guest's write to the
# virtio notify register is a trapped BAR write, and QEMU's vfio-user client
# sends region writes synchronously (no posted writes once a region is
# mmap-able), so the vCPU waits for our reply.  Entering Python for it
# costs 20-40 us here (GIL re-acquire, cold caches).  This callback answers
# notify writes in C: when the device armed it, it serves the queue there
# through the device's C request path and raises the interrupt before the
# reply (csrc/vmem_queue.h, vmem_serve_on_notify); otherwise, or when that
# needs Python, it counts a kick, and the queue is processed after
# vfu_run_ctx returns.  Every other access of the region goes to its Python
# callback.
SOURCE = r"""
#include <stdint.h>
#include <libvfio-user.h>

#include <errno.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#define VMEM_MSG_READY 1
#define VMEM_MSG_PARTIAL 0
#define VMEM_MSG_NO_ROOM 2
#define VMEM_MSG_HUNG_UP 3
#define VMEM_MAX_MSG_BYTES (128u << 10)

/* libvfio-user (0b28d20) reads a message with blocking recv()s, and sends
 * its reply with a blocking sendmsg(), on the thread that serves every
 * device: a client that sent a header and not its body, or that read no
 * replies, held that thread.  The server therefore hands it a message only
 * when this says VMEM_MSG_READY:
 * - all of the message is in the socket (libvfio-user patch 0006 caps
 *   messages so that one always fits the client's send buffer), or the
 *   connection is at its end (which libvfio-user must see); else
 *   VMEM_MSG_PARTIAL.  Peeking leaves the bytes, and any fds, in place.
 * - and its reply can be sent without blocking: for a Unix socket, POLLOUT
 *   means at least three quarters of the send buffer are free, more than
 *   any reply to a message the server accepts; else VMEM_MSG_NO_ROOM (the
 *   client does not read its replies).
 * - VMEM_MSG_HUNG_UP instead of VMEM_MSG_PARTIAL when the client has shut
 *   its end down (POLLRDHUP): the rest of the message can never come, and
 *   waiting the deadline for it kept every new client of the device out
 *   (QEMU restarted after it was killed in the middle of a sendmsg).  The
 *   caller drops the connection rather than let libvfio-user read the part:
 *   a header cut short is refused before its fds are taken from the
 *   control message (lib/tran_sock.c get_msg), so they would stay open.
 * -errno on error. */
static int vmem_partial(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLRDHUP };

    if (poll(&p, 1, 0) < 0)
        return -errno;
    return p.revents & (POLLRDHUP | POLLHUP) ? VMEM_MSG_HUNG_UP : VMEM_MSG_PARTIAL;
}

int vmem_vfu_next_message(int fd)
{
    struct { uint16_t msg_id, cmd; uint32_t msg_size, flags, error_no; } hdr;
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    int avail = 0, rc;
    ssize_t n;

    if (ioctl(fd, FIONREAD, &avail) < 0)
        return -errno;
    if (avail == 0)
        return VMEM_MSG_READY;
    if ((size_t)avail < sizeof(hdr))
        return vmem_partial(fd);
    n = recv(fd, &hdr, sizeof(hdr), MSG_PEEK | MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? vmem_partial(fd) : -errno;
    if ((size_t)n < sizeof(hdr))
        return vmem_partial(fd);
    /* A size no accepted message has (patch 0006: 64 KiB of data plus the
     * message's own fields) is libvfio-user's to refuse, which drops the
     * client: ready, whatever follows. */
    if (hdr.msg_size >= sizeof(hdr) && hdr.msg_size <= VMEM_MAX_MSG_BYTES && (uint32_t)avail < hdr.msg_size)
        return vmem_partial(fd);
    rc = poll(&p, 1, 0);
    if (rc < 0)
        return -errno;
    /* An error or hang-up on the socket: libvfio-user's send fails at once. */
    return rc == 1 && (p.revents & (POLLOUT | POLLERR | POLLHUP)) ? VMEM_MSG_READY : VMEM_MSG_NO_ROOM;
}

""" + PRIVATE + r"""
/* cffi defines the extern "Python" functions after this code. */
static ssize_t vfu_py_region0(vfu_ctx_t *, char *, size_t, loff_t, bool);

/* libvfio-user does not pass the region index to a region callback, so this
 * one serves BAR0 only (VfuContext.setup_region refuses other regions) and
 * hands what it does not handle to BAR0's Python callback. */
ssize_t
vmem_region_fast_notify(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset,
                        bool is_write)
{
    struct vmem_vfu_private *p = vfu_get_private(ctx);

    /* A write of 1, 2 or 4 bytes lying entirely inside the window (the
     * value written, the queue index, does not matter: one queue).  Reads,
     * other sizes and writes that straddle the window edge go to Python,
     * which answers or refuses them as before. */
    if (is_write && (count == 1 || count == 2 || count == 4) && offset >= 0
        && (uint64_t)offset >= p->notify_offset
        && count <= p->notify_length
        && (uint64_t)offset - p->notify_offset <= p->notify_length - count) {
        if (p->notify_armed && p->notify_serve != NULL) {
            int need_python = 0;
            int vector;

            p->notify_armed = 0;
            vector = p->notify_serve(p->notify_serve_arg, &need_python);
            /* Before the reply: QEMU's main loop sees the eventfd while the
             * vCPU still waits, and injects the MSI once it lets the BQL go. */
            if (vector >= 0 && vfu_irq_trigger(ctx, (uint32_t)vector) < 0) {
                p->irq_errno = errno != 0 ? errno : EIO;
                p->irq_failed_vector = vector;
            }
            if (!need_python) {
                return (ssize_t)count;
            }
        }
        if (p->kicks != UINT32_MAX) {
            p->kicks++;
        }
        return (ssize_t)count;
    }
    if (!is_write && p->reads_armed && p->fast_read != NULL && offset >= 0
        && p->fast_read(p->fast_read_arg, buf, count, (uint64_t)offset)) {
        return (ssize_t)count;
    }
    return vfu_py_region0(ctx, buf, count, offset, is_write);
}
"""


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "libvfio-user"], check=True, capture_output=True, text=True).stdout
    return shlex.split(out)


def find_libvfio_user() -> dict[str, list[str]]:
    """The compiler's and linker's options for libvfio-user (Extension
    keywords); exits naming what to do when it is not found."""
    prefix = os.environ.get("LIBVFIO_USER_PREFIX")
    if prefix:
        header = os.path.join(prefix, "include", "vfio-user", "libvfio-user.h")
        if not os.path.exists(header):
            sys.exit(f"LIBVFIO_USER_PREFIX={prefix}: no {header}")
        libdirs = [d for d in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib", "x86_64-linux-gnu"), os.path.join(prefix, "lib64")) if os.path.isdir(d)]
        return {
            "include_dirs": [os.path.join(prefix, "include", "vfio-user")],
            "library_dirs": libdirs,
            "runtime_library_dirs": libdirs,
        }
    try:
        cflags = _pkg_config("--cflags")
        libs = _pkg_config("--libs")
    except (OSError, subprocess.CalledProcessError):
        sys.exit(
            "libvfio-user not found: run scripts/build-libvfio-user.sh and point "
            "PKG_CONFIG_PATH at its prefix (scripts/setup.sh does both), or set "
            "LIBVFIO_USER_PREFIX to your own install"
        )
    return {
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "runtime_library_dirs": [f[2:] for f in libs if f.startswith("-L")],
    }


def make_builder(**library: list[str]) -> FFI:
    """The module's builder; ``library``: where libvfio-user is
    (``find_libvfio_user``), added to the compiler's and linker's options."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "vfiouser_vmem._vfu",
        SOURCE,
        libraries=["vfio-user"],
        extra_compile_args=["-D_GNU_SOURCE"],
        **library,
    )
    return builder


# setup.py's cffi_modules: without libvfio-user's location, which setup.py's
# build_ext adds to the extension when it builds it.
ffibuilder = make_builder()

if __name__ == "__main__":
    make_builder(**find_libvfio_user()).compile(verbose=True)
