/*
 * vmem_blocks: the small C helper of vfiouser-vmem.
 *
 * - A block-state bitmap in a caller-owned array of uint64_t words: bit i
 *   (bit i % 64 of word i / 64) is block i, 1 = plugged.  The caller owns the
 *   memory so that Python (cffi) can allocate it, keep it alive with the
 *   device and hand the same array to the discard loop without copies.
 * - The discard loop that gives the memory of unplugged blocks back to the
 *   host (fallocate PUNCH_HOLE on the memory backend).
 *
 * Everything between the CDEF markers is read by csrc/ffi_blocks.py as the
 * cffi cdef: only plain declarations and "#define NAME <integer>" there.
 *
 * Conventions shared by every function:
 * - "nbits" is the number of blocks; the words array holds at least
 *   ceil(nbits / 64) words.  Bits of the last word beyond nbits are ignored on
 *   reads and never written, so the caller need not keep them clear.
 * - A range is [first, first + count).  count == 0 is -EINVAL (an empty
 *   request is always a caller bug here: virtio-mem forbids nb_blocks == 0);
 *   a range whose end overflows 64 bits or lies beyond nbits is -ERANGE.
 *   Nothing is written when a range is refused.
 * - nbits must not exceed INT64_MAX, so that indices fit the int64_t results
 *   (-EOVERFLOW otherwise); real devices are far below (1 TiB / 2 MiB = 2^19).
 */
#ifndef VMEM_BLOCKS_H
#define VMEM_BLOCKS_H

#include <stdint.h>

/* CDEF-BEGIN */
/* The values equal virtio-mem's STATE response values on purpose
 * (VIRTIO_MEM_STATE_PLUGGED 0, UNPLUGGED 1, MIXED 2), so the device model can
 * answer a STATE request with the result as is. */
#define VMEM_RANGE_ALL_SET 0
#define VMEM_RANGE_ALL_CLEAR 1
#define VMEM_RANGE_MIXED 2

/* Set / clear bits [first, first + count).  0 or -EINVAL / -ERANGE /
 * -EOVERFLOW. */
int vmem_bitmap_set(uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count);
int vmem_bitmap_clear(uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count);

/* VMEM_RANGE_ALL_SET, VMEM_RANGE_ALL_CLEAR or VMEM_RANGE_MIXED for
 * [first, first + count), or a negative errno for a bad range. */
int vmem_bitmap_range_state(const uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count);

/* Number of set bits among the first nbits, or -EOVERFLOW. */
int64_t vmem_bitmap_count_set(const uint64_t *words, uint64_t nbits);

/* Index of the first set (clear) bit at or after start, or nbits when there
 * is none (also when start >= nbits); -EOVERFLOW when nbits > INT64_MAX. */
int64_t vmem_bitmap_find_next_set(const uint64_t *words, uint64_t nbits, uint64_t start);
int64_t vmem_bitmap_find_next_clear(const uint64_t *words, uint64_t nbits, uint64_t start);

/* Give [offset, offset + length) of fd back to the host (punch a hole).
 * 0, or -errno with *failed_offset (if not NULL) set to the offset of the
 * failed request.  length 0 or a range beyond the largest file offset is
 * -EINVAL, as fallocate itself would say. */
int vmem_discard(int fd, uint64_t offset, uint64_t length, uint64_t *failed_offset);

/* Discard every maximal run of set bits (which == 1) or clear bits
 * (which == 0), one fallocate per run; block i lives at
 * fd_offset + i * block_size.  Stops at the first failure: 0, or -errno with
 * *failed_offset set to the start of the run that failed (runs before it
 * were discarded).  Arguments are checked before anything is discarded:
 * block_size 0, which not 0/1, or a bitmap whose bytes would end beyond
 * INT64_MAX is -EINVAL. */
int vmem_discard_runs(int fd, const uint64_t *words, uint64_t nbits, uint64_t block_size,
                      uint64_t fd_offset, int which, uint64_t *failed_offset);
/* CDEF-END */

#endif /* VMEM_BLOCKS_H */
