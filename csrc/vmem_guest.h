/*
 * vmem_guest: guest memory as the device reaches it, and the guard that
 * keeps a client from killing the server through it.
 *
 * Guest memory is the client's DMA mappings (vfio-user DMA_MAP with an fd,
 * mmap'd by libvfio-user, lib/dma.c dma_map_region).  Three things about
 * such a mapping are the client's to choose, and each used to kill the
 * whole server (every device of the host) when taken for granted:
 *
 * - its protection: libvfio-user maps it with the client's prot, so a
 *   write to a read-only mapping, or any access to a PROT_NONE one, is
 *   SIGSEGV.  Each mapping here says whether it is readable (host != NULL)
 *   and writable; an access that the mapping does not allow is refused
 *   like an unmapped address.
 * - its extent: libvfio-user maps round_up(size) bytes from
 *   round_down(offset), so with an unaligned file offset the tail of the
 *   region is not mapped at all.  The Python side registers only what was
 *   mapped (vfio_user/_context.py DmaRegion.reachable_bytes).
 * - the file behind it: a client may map more than its file holds, or
 *   shrink the file afterwards; touching a page beyond the end of the file
 *   is SIGBUS.  libvfio-user refuses a mapping beyond the end of the file
 *   (patch 0006), and every access here runs under a SIGBUS guard: a fault
 *   ends the access with VMEM_ACCESS_FAULT and records the address, and the
 *   device stops its queue as for any unreachable buffer.  A file sealed
 *   with F_SEAL_SHRINK (QEMU's memory-backend-memfd seals by default)
 *   cannot shrink, but memory-backend-file cannot be sealed, so the guard
 *   is always on: one sigsetjmp (no system call: the signal mask is not
 *   saved, the handler runs with SA_NODEFER) per access or per request.
 *
 * The guard is per thread (a thread-local jump buffer) and chains to the
 * handler that was installed before it for any SIGBUS outside a guarded
 * access, so a genuine bug still ends the process with its usual report.
 *
 * Everything between the CDEF markers is read by csrc/ffi_blocks.py.
 */
#ifndef VMEM_GUEST_H
#define VMEM_GUEST_H

#include <stdint.h>

/* CDEF-BEGIN */
#define VMEM_ACCESS_OK 0
#define VMEM_ACCESS_UNMAPPED 1 /* no mapping, or one the device cannot reach */
#define VMEM_ACCESS_READ_ONLY 2 /* a write to a mapping without PROT_WRITE */
#define VMEM_ACCESS_FAULT 3 /* SIGBUS: the file behind the mapping is gone there */
#define VMEM_ACCESS_UNPLUGGED 4 /* device memory the guest has not plugged */

/* One DMA mapping of guest memory into this process.  host == NULL: the
 * device cannot reach it (Python explains why). */
struct vmem_mapping {
    uint64_t iova;
    uint64_t length;
    uint8_t *host;
    int writable;
    /* Device memory: a memory BAR of this server's that QEMU maps back,
     * reached through the server's own mapping of the backend.  Only its
     * plugged blocks may be touched: reading a hole of a shmem backend
     * allocates a page, so a buffer in unplugged memory would make the host
     * allocate memory the guest was never given.  NULL: guest RAM. */
    const uint64_t *plugged_words;
    uint64_t nb_blocks;
    uint64_t block_size;
    uint64_t device_offset; /* where iova lies in the device region */
};

struct vmem_guest_memory {
    struct vmem_mapping *maps;
    uint32_t nr_maps;
    uint32_t last; /* the mapping that served the last access: tried first */
    /* Set when a guarded access faulted (until Python clears it): the guest
     * address, for the message. */
    int faulted;
    uint64_t fault_addr;
};

/* Install the SIGBUS guard (idempotent).  0, or -errno. */
int vmem_guard_install(void);

/* Copy guest memory at [addr, addr + len) out / in, across mappings.
 * VMEM_ACCESS_OK, or why not (*bad_addr: the first guest address that was
 * refused).  Nothing is written to the guest by a refused vmem_guest_write
 * unless the refusal is a fault in the middle of it. */
int vmem_guest_read(struct vmem_guest_memory *mem, uint64_t addr, uint8_t *out, uint64_t len, uint64_t *bad_addr);
int vmem_guest_write(struct vmem_guest_memory *mem, uint64_t addr, const uint8_t *data, uint64_t len,
                     uint64_t *bad_addr);
/* Whether [addr, addr + len) could be accessed now (for writing when
 * want_write), touching each page of it for reading under the guard;
 * nothing is written. */
int vmem_guest_check(struct vmem_guest_memory *mem, uint64_t addr, uint64_t len, int want_write, uint64_t *bad_addr);
/* CDEF-END */

/* For the C request path (vmem_queue.c). */

/* The host address of [addr, addr + len) when it lies in one mapping that
 * allows the access, else NULL. */
uint8_t *vmem_guest_ptr(struct vmem_guest_memory *mem, uint64_t addr, uint64_t len, int want_write);

#include <setjmp.h>
/* The calling thread's guard: set while a guarded section runs. */
extern __thread sigjmp_buf *vmem_guard_env;
extern __thread uint64_t vmem_guard_fault_host;

#endif /* VMEM_GUEST_H */
