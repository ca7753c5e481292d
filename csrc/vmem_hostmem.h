/*
 * vmem_hostmem: the system calls of the memory backends that Python's os
 * and mmap modules do not offer (vfiouser_vmem/vmem/_backend.py).
 *
 * - statfs(2) f_type, to tell hugetlbfs (its page size is the mount's) from
 *   other filesystems, as QEMU's qemu_fd_getpagesize does (util/oslib-posix.c);
 * - mbind(2), without libnuma: one system call, and the kernel's quirk of
 *   counting maxnode one past the highest node is the caller's business;
 * - preallocation of a range of the backend for the device's prealloc=on
 *   (QEMU's qemu_prealloc_mem, util/oslib-posix.c, does the same two steps).
 *
 * Every function returns 0 (or a non-negative value) or -errno.
 */
#ifndef VMEM_HOSTMEM_H
#define VMEM_HOSTMEM_H

#include <stdint.h>

/* CDEF-BEGIN */
/* statfs f_type of the filesystem fd lives on, or -errno. */
int64_t vmem_fs_magic(int fd);

/* mbind(addr, length, mode, nodemask, maxnode, flags); 0 or -errno. */
int vmem_mbind(void *addr, uint64_t length, int mode, const unsigned long *nodemask, uint64_t maxnode,
               unsigned int flags);

/* set_mempolicy(mode, nodemask, maxnode) for the calling thread; 0 or
 * -errno.  hugetlbfs keeps no shared policy of mbind's (it has no
 * set_policy operation), so the server allocates a hugetlb backend's blocks
 * under a thread policy instead. */
int vmem_set_mempolicy(int mode, const unsigned long *nodemask, uint64_t maxnode);

/* Allocate [offset, offset + length) of fd: fallocate(mode 0), or, where
 * the filesystem cannot (EOPNOTSUPP), MADV_POPULATE_WRITE on addr + offset
 * (the caller's shared mapping of fd from offset 0; NULL: no fallback).
 * 0, or -errno (ENOSPC, ENOMEM, EFAULT for a huge page pool that ran out
 * under MADV_POPULATE_WRITE).  On failure part of the range may be
 * allocated: the caller punches it again. */
int vmem_populate(int fd, void *addr, uint64_t offset, uint64_t length);
/* The allocated extents of fd within [start, end), found with
 * lseek(SEEK_DATA) / lseek(SEEK_HOLE): at most max_extents [start, end)
 * pairs into out (2 * max_extents words), clipped to the range; the cost is
 * one pair of lseek calls per extent, whatever the size of the holes.
 * Returns the number of extents (max_extents: there may be more, from
 * out[2 * max_extents - 1] on), or -errno.  A filesystem without SEEK_DATA
 * reports the whole range as one extent (generic_file_llseek). */
int64_t vmem_data_extents(int fd, uint64_t start, uint64_t end, uint64_t *out, uint64_t max_extents);

/* The parts of the extents (n [start, end) pairs, in order) that lie in
 * clear bits (unplugged blocks) of the block bitmap (vmem_blocks.h): at most
 * max_parts [offset, end) pairs into out, adjacent parts merged.  Returns
 * the number of parts (max_parts: there may be more; call again from the
 * last part's end), or -EINVAL for block_size 0. */
int64_t vmem_unplugged_parts(const uint64_t *words, uint64_t nbits, uint64_t block_size, const uint64_t *extents,
                             uint64_t n, uint64_t *out, uint64_t max_parts);
/* CDEF-END */

#endif /* VMEM_HOSTMEM_H */
