/*
 * vmem_guest: guest memory access under a SIGBUS guard (see vmem_guest.h).
 */
#include "vmem_guest.h"
#include "vmem_blocks.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

__thread sigjmp_buf *vmem_guard_env;
__thread uint64_t vmem_guard_fault_host;

static struct sigaction previous_sigbus;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static int installed;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *env = vmem_guard_env;
    (void)context;
    if (env != NULL && info->si_code > 0) { /* a fault, not a kill(2) */
        vmem_guard_env = NULL;
        vmem_guard_fault_host = (uint64_t)(uintptr_t)info->si_addr;
        siglongjmp(*env, 1);
    }
    /* Not a guarded access: put back what was there before us and return;
     * the access faults again and meets that disposition (the default one
     * ends the process with a core, Python's faulthandler prints the
     * stacks first). */
    sigaction(SIGBUS, &previous_sigbus, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

int vmem_guard_install(void)
{
    struct sigaction sa;
    int rc = 0;

    pthread_mutex_lock(&install_lock);
    if (!installed) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        /* SA_NODEFER: SIGBUS is not blocked in the handler, so leaving it
         * with siglongjmp needs no saved signal mask (sigsetjmp(env, 0) is
         * a few instructions, not a system call). */
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &previous_sigbus) == 0)
            installed = 1;
        else
            rc = -errno;
    }
    pthread_mutex_unlock(&install_lock);
    return rc;
}

static struct vmem_mapping *find(struct vmem_guest_memory *mem, uint64_t addr)
{
    for (uint32_t n = 0; n < mem->nr_maps; n++) {
        uint32_t i = (mem->last + n) % mem->nr_maps;
        struct vmem_mapping *m = &mem->maps[i];
        if (addr >= m->iova && addr - m->iova < m->length) {
            mem->last = i;
            return m;
        }
    }
    return NULL;
}

/* For device memory: whether [offset, offset + n) of mapping m (n > 0)
 * lies in plugged blocks. */
static int plugged(const struct vmem_mapping *m, uint64_t offset, uint64_t n)
{
    uint64_t start = m->device_offset + offset;
    uint64_t first = start / m->block_size, last = (start + n - 1) / m->block_size;
    if (last >= m->nb_blocks)
        return 0;
    return vmem_bitmap_range_state(m->plugged_words, m->nb_blocks, first, last - first + 1) == VMEM_RANGE_ALL_SET;
}

uint8_t *vmem_guest_ptr(struct vmem_guest_memory *mem, uint64_t addr, uint64_t len, int want_write)
{
    if (addr + len < addr)
        return NULL;
    struct vmem_mapping *m = find(mem, addr);
    if (m == NULL || m->host == NULL || (want_write && !m->writable) || len > m->length - (addr - m->iova))
        return NULL;
    if (m->plugged_words != NULL && len && !plugged(m, addr - m->iova, len))
        return NULL;
    return m->host + (addr - m->iova);
}

/* The host pieces of [addr, addr + len) one after the other: the
 * mapping-by-mapping walk of read, write and check.  Calls piece() for
 * each; stops at the first refusal. */
typedef void (piece_fn)(uint8_t *host, uint64_t offset, uint64_t n, void *arg);

static int walk(struct vmem_guest_memory *mem, uint64_t addr, uint64_t len, int want_write, uint64_t *bad_addr,
                piece_fn *piece, void *arg)
{
    sigjmp_buf env;
    volatile uint64_t at = addr, done = 0;

    if (addr + len < addr) {
        *bad_addr = addr;
        return VMEM_ACCESS_UNMAPPED;
    }
    if (sigsetjmp(env, 0)) {
        mem->faulted = 1;
        mem->fault_addr = at;
        *bad_addr = at;
        return VMEM_ACCESS_FAULT;
    }
    vmem_guard_env = &env;
    while (done < len) {
        struct vmem_mapping *m = find(mem, at);
        if (m == NULL || m->host == NULL || (want_write && !m->writable)) {
            vmem_guard_env = NULL;
            *bad_addr = at;
            return m != NULL && m->host != NULL ? VMEM_ACCESS_READ_ONLY : VMEM_ACCESS_UNMAPPED;
        }
        uint64_t offset = at - m->iova, n = m->length - offset;
        if (n > len - done)
            n = len - done;
        if (m->plugged_words != NULL && !plugged(m, offset, n)) {
            vmem_guard_env = NULL;
            *bad_addr = at;
            return VMEM_ACCESS_UNPLUGGED;
        }
        piece(m->host + offset, done, n, arg);
        done += n;
        at += n;
    }
    vmem_guard_env = NULL;
    return VMEM_ACCESS_OK;
}

static void read_piece(uint8_t *host, uint64_t offset, uint64_t n, void *arg)
{
    memcpy((uint8_t *)arg + offset, host, n);
}

static void write_piece(uint8_t *host, uint64_t offset, uint64_t n, void *arg)
{
    memcpy(host, (const uint8_t *)arg + offset, n);
}

static void check_piece(uint8_t *host, uint64_t offset, uint64_t n, void *arg)
{
    static uint64_t page;
    volatile uint8_t sink;
    (void)offset, (void)arg;
    if (page == 0)
        page = (uint64_t)sysconf(_SC_PAGESIZE);
    /* One read per page, and the last byte: a page beyond the end of the
     * file faults on any access. */
    for (uint64_t i = 0; i < n; i += page - ((uintptr_t)(host + i) & (page - 1)))
        sink = host[i];
    if (n)
        sink = host[n - 1];
    (void)sink;
}

int vmem_guest_read(struct vmem_guest_memory *mem, uint64_t addr, uint8_t *out, uint64_t len, uint64_t *bad_addr)
{
    return walk(mem, addr, len, 0, bad_addr, read_piece, out);
}

int vmem_guest_write(struct vmem_guest_memory *mem, uint64_t addr, const uint8_t *data, uint64_t len,
                     uint64_t *bad_addr)
{
    /* Refused before anything is written when a mapping does not allow it:
     * check the whole range first (no faults expected, so cheap). */
    int rc = walk(mem, addr, len, 1, bad_addr, check_piece, NULL);
    if (rc != VMEM_ACCESS_OK)
        return rc;
    return walk(mem, addr, len, 1, bad_addr, write_piece, (void *)data);
}

int vmem_guest_check(struct vmem_guest_memory *mem, uint64_t addr, uint64_t len, int want_write, uint64_t *bad_addr)
{
    return walk(mem, addr, len, want_write, bad_addr, check_piece, NULL);
}
