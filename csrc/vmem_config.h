/*
 * vmem_config: reads of the virtio-mem device configuration answered in C.
 *
 * After a resize the Linux driver re-reads plugged_size, usable_region_size
 * and requested_size (virtio_mem_refresh_config), each u64 as two 4-byte
 * reads between two reads of config_generation (virtio_cread_le ->
 * __virtio_cread_many): 12 vfio-user messages, each a synchronous round
 * trip for the vCPU (QEMU's vfio-user client has no posted reads).  In
 * Python each costs about 200 us of server CPU with cold caches and as
 * much of the guest's time; QEMU's own device answers them inside the
 * vCPU thread.  Here they are answered inside vfu_run_ctx, from the device
 * model's own state (struct vmem_device_state: one home, nothing copied).
 *
 * The vfio-user binding (csrc/ffi_vfu.py) calls vmem_bar0_fast_read for a
 * BAR0 read while the server has armed it (after each vfio-user message,
 * with the BAR address current); any Python callback disarms it first.
 * Everything else is Python's: writes, reads of other registers, reads that
 * straddle a register window, and every read while the memory BAR has no
 * guest address (Python warns about that).
 *
 * Everything between the CDEF markers is read by csrc/ffi_blocks.py.
 */
#ifndef VMEM_CONFIG_H
#define VMEM_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
struct vmem_bar0_reads {
    struct vmem_device_state *dev;
    uint64_t region_size;
    uint64_t device_cfg_offset;  /* the device configuration window in BAR0 */
    uint64_t generation_offset;  /* config_generation, in the common configuration */
    uint16_t node_id;
    /* The common configuration's config_generation (virtio spec 4.1.4.3):
     * its one home (VirtioPciTransport.config_generation). */
    uint8_t config_generation;
};

/* 1 when the read was answered into buf, 0 when it is Python's. */
int vmem_bar0_fast_read(void *arg, char *buf, size_t count, uint64_t offset);
/* CDEF-END */

#endif /* VMEM_CONFIG_H */
