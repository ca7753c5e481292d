/*
 * vmem_queue: the request path of the virtio-mem virtqueue in C.
 *
 * One call serves every available request the device can answer without
 * Python: it pops a chain from the split virtqueue (virtio spec 2.7), reads
 * the 24-byte request, applies the virtio-mem rules to the block bitmap
 * (spec 5.15.6; docs/design.md, "virtio-mem rules") and pushes the 10-byte response.
 * Python (vfiouser_vmem/virtio/_pci.py) then sends one interrupt, hands the
 * unplugged ranges to the discard queue and tells the size listeners.
 *
 * Why: in Python this path costs 85-110 us per request between two TCG
 * bursts that evict the caches, while the guest's vCPU waits (bench/latency.py);
 * here it is a few microseconds.
 *
 * Only accepted requests are served here: PLUG, UNPLUG and STATE answered
 * ACK.  Everything else -- refusals (they are logged with the reason), NACK,
 * UNPLUG_ALL, unknown types, a chain that breaks the ring rules or lies
 * outside the mapped guest memory, or whose response buffer or used ring
 * the device may not write -- stops the call with VMEM_SERVE_SLOW *before
 * anything of that chain is consumed*, and Python's path (the
 * reference semantics, virtio/_virtqueue.py and vmem/_model.py) handles it.  So the C
 * path never decides differently from Python; it only decides faster.
 *
 * Everything between the CDEF markers is read by csrc/ffi_blocks.py as the
 * cffi cdef.
 */
#ifndef VMEM_QUEUE_H
#define VMEM_QUEUE_H

#include <stdint.h>

#include "vmem_guest.h"

/* CDEF-BEGIN */
#define VMEM_SERVE_DONE 0 /* no request left in the queue */
#define VMEM_SERVE_SLOW 1 /* the next chain is for Python; none of it consumed */
#define VMEM_SERVE_FULL 2 /* the served[] array is full; call again */
/* Guest memory faulted (the client shrank the file behind a mapping):
 * mem->faulted says where.  A request whose answer was being written when
 * it faulted is in served[] (its state change happened) and its chain is
 * consumed; the queue must stop (virtio/_pci.py). */
#define VMEM_SERVE_FAULT 3

/* The device side of a split virtqueue. */
struct vmem_vring {
    uint64_t desc_addr;
    uint64_t driver_addr; /* the available ring */
    uint64_t device_addr; /* the used ring */
    uint16_t size;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    /* Out, with VMEM_SERVE_DONE: the avail ring's flags read after the last
     * used index was written (VRING_AVAIL_F_NO_INTERRUPT, spec 2.7.7), so
     * that the interrupt can be sent without another look at the ring. */
    uint16_t avail_flags;
};

/* What the request rules need of the device model: the model's own home of
 * these numbers (vmem/_model.py reads them through util/native.py CField).  The call
 * changes plugged_blocks, and clears plug_allowed after an UNPLUG. */
struct vmem_device_state {
    uint64_t *words; /* the block bitmap (vmem_blocks.h) */
    uint64_t nb_blocks;
    uint64_t block_size;
    uint64_t addr; /* guest physical start of the device region */
    uint64_t usable_region_size;
    uint64_t requested_size;
    uint64_t plugged_blocks;
    /* 0: PLUGs go to Python.  The device model clears it while a discard
     * may be queued (a PLUG must claim its range from the discard queue
     * first); the C path clears it after serving an UNPLUG, whose discard
     * Python has not queued yet. */
    int plug_allowed;
    /* 0: UNPLUGs go to Python (the discard would be refused: BUSY). */
    int unplug_allowed;
};

/* One request served. */
struct vmem_served {
    uint64_t addr;
    uint64_t elapsed_ns; /* from the request read to the used index written */
    uint16_t type;
    uint16_t nb_blocks;
    uint16_t response;
    uint16_t state;
};

/* Serve requests until the queue is empty (VMEM_SERVE_DONE), the next chain
 * needs Python (VMEM_SERVE_SLOW) or max_served requests were served
 * (VMEM_SERVE_FULL).  *nr_served says how many were; each is in served[]. */
int vmem_serve_queue(struct vmem_vring *vq, struct vmem_guest_memory *mem, struct vmem_device_state *dev,
                     struct vmem_served *served, uint32_t max_served, uint32_t *nr_served);
/* Serving inside the guest's notify write.  QEMU's vfio-user client sends
 * the notify write synchronously (no posted writes once a region is
 * mmap-able) and holds the vCPU, and the BQL, until the reply; QEMU's own
 * virtio-mem under TCG serves the queue inside that very write.  Served
 * here, the interrupt is raised before the reply goes out, so QEMU's main
 * loop injects it as soon as the vCPU lets the BQL go, instead of after
 * another wake-up of this server (docs/request-path.md).
 *
 * The server arms it after each vfio-user message (virtio/_pci.py
 * _arm_notify_serve: queue ready, device state, MSI-X vector) and the vfio-user
 * binding (csrc/ffi_vfu.py) disarms it before every Python callback and
 * after one call: one notify is served per arming, and anything that may
 * change what it relies on goes through Python first. */
struct vmem_notify_serve {
    struct vmem_vring *vq;
    struct vmem_guest_memory *mem;
    struct vmem_device_state *dev;
    struct vmem_served *served;
    uint32_t max_served;
    /* Out, until Python takes them (virtio/_pci.py take_notify_served): */
    uint32_t nr_served;
    /* 1: the last call served requests and the guest is owed an interrupt
     * for them (the avail ring did not suppress it). */
    int interrupt_due;
    /* 1: the last call stopped before the queue was empty (a chain for
     * Python, or served[] full): Python's process_queue takes over, and
     * decides the interrupt for these requests too. */
    int need_python;
    /* CLOCK_REALTIME when the last call returned (bench/latency.py lines it
     * up with QEMU's trace). */
    uint64_t realtime_ns;
    /* The queue's MSI-X vector, or -1 when no interrupt can be sent (no
     * vector, MSI-X disabled or masked). */
    int32_t irq_vector;
};

/* Serve one notify (arg: a struct vmem_notify_serve).  Returns the MSI-X
 * vector to trigger now, or -1; *need_python = 1 when Python must look at
 * the queue (the notify then counts as a kick). */
int vmem_serve_on_notify(void *arg, int *need_python);
/* CDEF-END */

#endif /* VMEM_QUEUE_H */
