/* See vmem_hostmem.h. */
#include "vmem_hostmem.h"
#include "vmem_blocks.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* linux/mman.h, since 5.14 */
#endif

int64_t vmem_fs_magic(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return -errno;
    return (int64_t)(uint64_t)(unsigned long)st.f_type;
}

int vmem_mbind(void *addr, uint64_t length, int mode, const unsigned long *nodemask, uint64_t maxnode,
               unsigned int flags)
{
    /* glibc has no mbind wrapper (libnuma does); the system call is stable. */
    if (syscall(SYS_mbind, addr, (unsigned long)length, mode, nodemask, (unsigned long)maxnode, flags) < 0)
        return -errno;
    return 0;
}

int vmem_set_mempolicy(int mode, const unsigned long *nodemask, uint64_t maxnode)
{
    if (syscall(SYS_set_mempolicy, mode, nodemask, (unsigned long)maxnode) < 0)
        return -errno;
    return 0;
}

int vmem_populate(int fd, void *addr, uint64_t offset, uint64_t length)
{
    if (length == 0 || offset > (uint64_t)INT64_MAX || length > (uint64_t)INT64_MAX - offset)
        return -EINVAL;
    for (;;) {
        /* Mode 0 allocates without writing a byte: shmem and hugetlbfs take
         * the pages (huge pages from the pool) and zero them, and a later
         * fault through any mapping finds them there. */
        if (fallocate(fd, 0, (off_t)offset, (off_t)length) == 0)
            return 0;
        if (errno != EINTR)
            break;
    }
    if (errno != EOPNOTSUPP || addr == NULL)
        return -errno;
    /* A filesystem without fallocate: fault every page in for writing, the
     * way the guest's first touch would, but here where a failure is an
     * error code and not a SIGBUS. */
    for (;;) {
        if (madvise((char *)addr + offset, (size_t)length, MADV_POPULATE_WRITE) == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

int64_t vmem_data_extents(int fd, uint64_t start, uint64_t end, uint64_t *out, uint64_t max_extents)
{
    uint64_t count = 0;
    uint64_t pos = start;
    if (start > (uint64_t)INT64_MAX || end > (uint64_t)INT64_MAX)
        return -EINVAL;
    while (pos < end && count < max_extents) {
        off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)  /* no data at or after pos */
                break;
            return -errno;
        }
        if ((uint64_t)data >= end)
            break;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        uint64_t extent_end = (uint64_t)hole < end ? (uint64_t)hole : end;
        out[2 * count] = (uint64_t)data;
        out[2 * count + 1] = extent_end;
        count++;
        pos = extent_end;
    }
    return (int64_t)count;
}

int64_t vmem_unplugged_parts(const uint64_t *words, uint64_t nbits, uint64_t block_size, const uint64_t *extents,
                             uint64_t n, uint64_t *out, uint64_t max_parts)
{
    uint64_t count = 0;
    if (block_size == 0)
        return -EINVAL;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t start = extents[2 * i], end = extents[2 * i + 1];
        uint64_t block = start / block_size;
        uint64_t last = (end + block_size - 1) / block_size;
        if (last > nbits)
            last = nbits;
        while (block < last) {
            int64_t run = vmem_bitmap_find_next_clear(words, nbits, block);
            if (run < 0 || (uint64_t)run >= last)
                break;
            int64_t run_end = vmem_bitmap_find_next_set(words, nbits, (uint64_t)run);
            if (run_end < 0)
                break;
            uint64_t lo = (uint64_t)run * block_size, hi = (uint64_t)run_end * block_size;
            if (lo < start)
                lo = start;
            if (hi > end)
                hi = end;
            if (lo < hi) {
                if (count > 0 && out[2 * count - 1] == lo) {
                    out[2 * count - 1] = hi;
                } else {
                    if (count == max_parts)
                        return (int64_t)count;
                    out[2 * count] = lo;
                    out[2 * count + 1] = hi;
                    count++;
                }
            }
            block = (uint64_t)run_end;
        }
    }
    return (int64_t)count;
}
