/*
 * vmem_config: the device configuration read in C (see vmem_config.h).
 * Mirrors vfiouser_vmem/virtio/_pci.py bar0_access and
 * vfiouser_vmem/vmem/_model.py config_bytes; tests/test_config_reads.py compares the two.
 */
#include "vmem_config.h"
#include "vmem_queue.h"

#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the device configuration is little endian (virtio 1.x); this code writes it natively"
#endif

/* virtio spec 5.15.4, struct virtio_mem_config: 56 bytes. */
struct virtio_mem_config {
    uint64_t block_size;
    uint16_t node_id;
    uint8_t padding[6];
    uint64_t addr;
    uint64_t region_size;
    uint64_t usable_region_size;
    uint64_t plugged_size;
    uint64_t requested_size;
};
_Static_assert(sizeof(struct virtio_mem_config) == 56, "virtio_mem_config is 56 bytes");

int vmem_bar0_fast_read(void *arg, char *buf, size_t count, uint64_t offset)
{
    const struct vmem_bar0_reads *r = arg;
    const struct vmem_device_state *dev = r->dev;

    if (count == 0 || dev == NULL)
        return 0;
    if (offset == r->generation_offset && count == 1) {
        buf[0] = (char)r->config_generation;
        return 1;
    }
    if (offset >= r->device_cfg_offset && offset - r->device_cfg_offset <= sizeof(struct virtio_mem_config)
        && count <= sizeof(struct virtio_mem_config) - (offset - r->device_cfg_offset)) {
        struct virtio_mem_config cfg;

        /* An unassigned BAR: Python answers, and warns once. */
        if (dev->addr == 0)
            return 0;
        memset(&cfg, 0, sizeof(cfg));
        cfg.block_size = dev->block_size;
        cfg.node_id = r->node_id;
        cfg.addr = dev->addr;
        cfg.region_size = r->region_size;
        cfg.usable_region_size = dev->usable_region_size;
        cfg.plugged_size = dev->plugged_blocks * dev->block_size;
        cfg.requested_size = dev->requested_size;
        memcpy(buf, (const char *)&cfg + (offset - r->device_cfg_offset), count);
        return 1;
    }
    return 0;
}
