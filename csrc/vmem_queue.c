/*
 * vmem_queue: the virtio-mem request path in C (see vmem_queue.h).
 *
 * Every check here mirrors one in vfiouser_vmem/virtio/_virtqueue.py
 * (SplitQueue.pop and push) or vfiouser_vmem/vmem/_model.py (VirtioMemDevice._plug, _unplug,
 * _state); where Python would refuse, log or raise, this code stops with
 * VMEM_SERVE_SLOW before it has changed anything, and Python serves that
 * chain.  tests/test_fastpath.py runs random request streams through both
 * paths and compares what the guest sees.
 */
#include "vmem_queue.h"
#include "vmem_blocks.h"

#include <setjmp.h>
#include <string.h>
#include <time.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the rings are little endian (virtio 1.x); this code reads them natively"
#endif

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

#define VIRTIO_MEM_REQ_PLUG 0
#define VIRTIO_MEM_REQ_UNPLUG 1
#define VIRTIO_MEM_REQ_STATE 3
#define VIRTIO_MEM_RESP_ACK 0

#define REQUEST_SIZE 24
/* virtio/_virtqueue.py SplitQueue.pop reads this much of the readable part, so a
 * longer request that is unreachable beyond its first 24 bytes is Python's. */
#define MAX_READABLE 4096
#define RESPONSE_SIZE 10
/* The Linux driver gives one device-writable descriptor for the response;
 * more than this many is unusual enough for Python. */
#define MAX_WRITABLE 4

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* vmem_guest_ptr(base + offset) (NULL: Python then reports why, or handles
 * the straddle): ring addresses come from the driver, and an
 * address that wraps past 2^64 is out of reach (Python's path computes it
 * without wrapping and refuses it), not a way back to low guest memory. */
static uint8_t *ring_ptr(struct vmem_guest_memory *mem, uint64_t base, uint64_t offset, uint64_t len,
                         int want_write)
{
    uint64_t addr;
    if (__builtin_add_overflow(base, offset, &addr))
        return NULL;
    return vmem_guest_ptr(mem, addr, len, want_write);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Rule 2 of docs/design.md, "virtio-mem rules" (vmem/_model.py _range_error): aligned, not
 * empty, inside the usable region.  The first block, or -1 when Python must
 * refuse the range. */
static int64_t first_block(const struct vmem_device_state *dev, uint64_t addr, uint16_t nb_blocks)
{
    uint64_t bs = dev->block_size;
    if (bs == 0 || addr % bs || nb_blocks == 0 || addr < dev->addr)
        return -1;
    uint64_t offset = addr - dev->addr, size;
    if (__builtin_mul_overflow((uint64_t)nb_blocks, bs, &size))
        return -1;
    if (offset > dev->usable_region_size || size > dev->usable_region_size - offset)
        return -1;
    uint64_t first = offset / bs;
    if (first + nb_blocks > dev->nb_blocks)
        return -1;
    return (int64_t)first;
}

/* The response to an accepted request, applied to the bitmap, or -1 when
 * Python must answer it (nothing changed then). */
static int serve_request(struct vmem_device_state *dev, uint16_t type, uint64_t addr, uint16_t nb_blocks,
                         uint16_t *state)
{
    *state = 0;
    if (type != VIRTIO_MEM_REQ_PLUG && type != VIRTIO_MEM_REQ_UNPLUG && type != VIRTIO_MEM_REQ_STATE)
        return -1; /* UNPLUG_ALL (discards the whole device) or unknown */
    int64_t first = first_block(dev, addr, nb_blocks);
    if (first < 0)
        return -1;
    int range = vmem_bitmap_range_state(dev->words, dev->nb_blocks, (uint64_t)first, nb_blocks);
    if (range < 0)
        return -1;
    switch (type) {
    case VIRTIO_MEM_REQ_STATE:
        /* VMEM_RANGE_* equal VIRTIO_MEM_STATE_* (vmem_blocks.h). */
        *state = (uint16_t)range;
        return VIRTIO_MEM_RESP_ACK;
    case VIRTIO_MEM_REQ_PLUG: {
        uint64_t plugged;
        if (!dev->plug_allowed || range != VMEM_RANGE_ALL_CLEAR)
            return -1;
        /* Above requested_size is NACK (vmem/_model.py _plug), logged by Python. */
        if (__builtin_mul_overflow(dev->plugged_blocks + nb_blocks, dev->block_size, &plugged) ||
            plugged > dev->requested_size)
            return -1;
        if (vmem_bitmap_set(dev->words, dev->nb_blocks, (uint64_t)first, nb_blocks) < 0)
            return -1;
        dev->plugged_blocks += nb_blocks;
        return VIRTIO_MEM_RESP_ACK;
    }
    default: /* VIRTIO_MEM_REQ_UNPLUG */
        if (!dev->unplug_allowed || range != VMEM_RANGE_ALL_SET)
            return -1;
        if (vmem_bitmap_clear(dev->words, dev->nb_blocks, (uint64_t)first, nb_blocks) < 0)
            return -1;
        dev->plugged_blocks -= nb_blocks;
        /* Its discard is queued by Python after this call: a PLUG of the
         * same range before that would be discarded behind the guest's back. */
        dev->plug_allowed = 0;
        return VIRTIO_MEM_RESP_ACK;
    }
}

/* Serve the chain at the head of the available ring.  1: served; 0: empty
 * queue; -1: Python must serve it (nothing consumed, nothing changed). */
static int serve_one(struct vmem_vring *vq, struct vmem_guest_memory *mem, struct vmem_device_state *dev,
                     struct vmem_served *out, volatile int *applied)
{
    uint16_t size = vq->size, avail_idx, head;
    uint8_t *p;

    if (size == 0 || (p = ring_ptr(mem, vq->driver_addr, 2, 2, 0)) == NULL)
        return -1;
    memcpy(&avail_idx, p, 2);
    /* The driver writes the ring entry, then the index (spec 2.7.13): read
     * nothing of the entry before the index. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > size)
        return -1;
    if ((p = ring_ptr(mem, vq->driver_addr, 4 + 2u * (vq->last_avail_idx % size), 2, 0)) == NULL)
        return -1;
    memcpy(&head, p, 2);

    uint8_t request[REQUEST_SIZE];
    uint32_t request_bytes = 0, readable_bytes = 0;
    uint8_t *writable[MAX_WRITABLE];
    uint32_t writable_len[MAX_WRITABLE];
    unsigned nr_writable = 0;
    uint32_t writable_bytes = 0;
    uint16_t index = head;
    unsigned walked = 0;
    for (;;) {
        struct vring_desc desc;
        if (index >= size || walked++ >= size) /* out of the ring, or a loop */
            return -1;
        if ((p = ring_ptr(mem, vq->desc_addr, 16u * index, 16, 0)) == NULL)
            return -1;
        memcpy(&desc, p, sizeof(desc));
        if (desc.flags & VRING_DESC_F_INDIRECT)
            return -1;
        if (desc.flags & VRING_DESC_F_WRITE) {
            if (nr_writable == MAX_WRITABLE)
                return -1;
            /* Only the part the response fills must be reachable. */
            uint32_t need = RESPONSE_SIZE > writable_bytes ? RESPONSE_SIZE - writable_bytes : 0;
            uint32_t n = desc.len < need ? desc.len : need;
            writable[nr_writable] = NULL;
            if (n && (writable[nr_writable] = vmem_guest_ptr(mem, desc.addr, n, 1)) == NULL)
                return -1;
            writable_len[nr_writable++] = n;
            writable_bytes += n;
        } else {
            if (nr_writable) /* readable after writable: spec 2.7.4.2 */
                return -1;
            uint32_t n = MAX_READABLE - readable_bytes;
            if (desc.len < n)
                n = desc.len;
            if (n) {
                if ((p = vmem_guest_ptr(mem, desc.addr, n, 0)) == NULL)
                    return -1;
                readable_bytes += n;
                uint32_t take = REQUEST_SIZE - request_bytes;
                if (take > n)
                    take = n;
                memcpy(request + request_bytes, p, take);
                request_bytes += take;
            }
        }
        if (!(desc.flags & VRING_DESC_F_NEXT))
            break;
        index = desc.next;
    }
    if (request_bytes < REQUEST_SIZE || writable_bytes < RESPONSE_SIZE)
        return -1;
    uint8_t *used_elem = ring_ptr(mem, vq->device_addr, 4 + 8u * (vq->used_idx % size), 8, 1);
    uint8_t *used_idx = ring_ptr(mem, vq->device_addr, 2, 2, 1);
    if (used_elem == NULL || used_idx == NULL)
        return -1;

    /* Touch what the answer will write, for reading, before the request
     * changes anything: a file shrunk under a mapping faults here (the
     * guard in serve_one_guarded), while nothing has changed yet. */
    for (unsigned i = 0; i < nr_writable; i++) {
        if (writable_len[i]) {
            volatile uint8_t first = writable[i][0], last = writable[i][writable_len[i] - 1];
            (void)first, (void)last;
        }
    }
    {
        volatile uint8_t touch = used_elem[0] + used_elem[7] + used_idx[0] + used_idx[1];
        (void)touch;
    }

    uint64_t started = now_ns();
    uint16_t type, nb_blocks, state;
    uint64_t addr;
    memcpy(&type, request, 2);
    memcpy(&addr, request + 8, 8);
    memcpy(&nb_blocks, request + 16, 2);
    int response = serve_request(dev, type, addr, nb_blocks, &state);
    if (response < 0)
        return -1;

    uint8_t answer[RESPONSE_SIZE] = {0};
    uint16_t code = (uint16_t)response;
    memcpy(answer, &code, 2);
    memcpy(answer + 8, &state, 2);
    /* The request took effect: recorded before the answer is written, so
     * that a fault while writing it (the file shrunk between the touch
     * above and here) still tells Python what changed. */
    out->addr = addr;
    out->type = type;
    out->nb_blocks = nb_blocks;
    out->response = code;
    out->state = state;
    out->elapsed_ns = 0;
    *applied = 1;
    uint32_t pos = 0;
    for (unsigned i = 0; i < nr_writable; i++) {
        if (writable_len[i]) {
            memcpy(writable[i], answer + pos, writable_len[i]);
            pos += writable_len[i];
        }
    }
    uint32_t elem[2] = {head, pos};
    memcpy(used_elem, elem, 8);
    /* The used element before the used index (spec 2.7.8). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint16_t next_used = (uint16_t)(vq->used_idx + 1);
    memcpy(used_idx, &next_used, 2);
    vq->used_idx = next_used;
    vq->last_avail_idx = (uint16_t)(vq->last_avail_idx + 1);
    out->elapsed_ns = now_ns() - started;
    return 1;
}

/* The host address a guarded access faulted at, as a guest address. */
static uint64_t fault_guest_addr(const struct vmem_guest_memory *mem, uint64_t host)
{
    for (uint32_t i = 0; i < mem->nr_maps; i++) {
        const struct vmem_mapping *m = &mem->maps[i];
        uint64_t start = (uint64_t)(uintptr_t)m->host;
        if (m->host != NULL && host >= start && host - start < m->length)
            return m->iova + (host - start);
    }
    return 0;
}

/* serve_one under the SIGBUS guard (vmem_guest.h).  2: the guest memory
 * faulted (mem->faulted); *applied says whether the request had already
 * taken effect (it is then in *out, and its chain is consumed so that it
 * is never applied twice). */
static int serve_one_guarded(struct vmem_vring *vq, struct vmem_guest_memory *mem, struct vmem_device_state *dev,
                             struct vmem_served *out, int *applied_out)
{
    sigjmp_buf env;
    volatile int applied = 0;
    int rc;

    if (sigsetjmp(env, 0)) {
        mem->faulted = 1;
        mem->fault_addr = fault_guest_addr(mem, vmem_guard_fault_host);
        if (applied)
            vq->last_avail_idx = (uint16_t)(vq->last_avail_idx + 1);
        *applied_out = applied;
        return 2;
    }
    vmem_guard_env = &env;
    rc = serve_one(vq, mem, dev, out, &applied);
    vmem_guard_env = NULL;
    *applied_out = applied;
    return rc;
}

int vmem_serve_queue(struct vmem_vring *vq, struct vmem_guest_memory *mem, struct vmem_device_state *dev,
                     struct vmem_served *served, uint32_t max_served, uint32_t *nr_served)
{
    *nr_served = 0;
    if (mem->faulted)
        return VMEM_SERVE_FAULT; /* until Python has stopped the queue */
    while (*nr_served < max_served) {
        int applied = 0;
        int rc = serve_one_guarded(vq, mem, dev, &served[*nr_served], &applied);
        if (rc == 2) {
            if (applied)
                (*nr_served)++;
            return VMEM_SERVE_FAULT;
        }
        if (rc == 0) {
            /* The used index is written (serve_one): only now may the flags
             * be read, or a driver that re-enables interrupts in between
             * would miss one (virtio spec 2.7.10). */
            uint64_t bad;
            uint16_t flags = 0;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (vmem_guest_read(mem, vq->driver_addr, (uint8_t *)&flags, 2, &bad) != VMEM_ACCESS_OK)
                flags = 0;
            vq->avail_flags = flags;
            return VMEM_SERVE_DONE;
        }
        if (rc < 0)
            return VMEM_SERVE_SLOW;
        (*nr_served)++;
    }
    return VMEM_SERVE_FULL;
}

int vmem_serve_on_notify(void *arg, int *need_python)
{
    struct vmem_notify_serve *s = arg;
    uint32_t n = 0;
    int rc;
    struct timespec ts;

    if (s->nr_served != 0 || s->max_served == 0) {
        /* Requests of an earlier call that Python has not taken yet: they
         * stay as they are, and Python serves this notify. */
        s->need_python = 1;
        *need_python = 1;
        return -1;
    }
    rc = vmem_serve_queue(s->vq, s->mem, s->dev, s->served, s->max_served, &n);
    s->nr_served = n;
    s->interrupt_due = rc == VMEM_SERVE_DONE && n > 0 && !(s->vq->avail_flags & VRING_AVAIL_F_NO_INTERRUPT);
    s->need_python = rc != VMEM_SERVE_DONE;
    *need_python = s->need_python;
    clock_gettime(CLOCK_REALTIME, &ts);
    s->realtime_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return s->interrupt_due ? s->irq_vector : -1;
}
