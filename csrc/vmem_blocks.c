/*
 * vmem_blocks: block-state bitmap and discard loop (see vmem_blocks.h).
 *
 * The bitmap works a word at a time: a 1 TiB device with 2 MiB blocks has
 * 524288 blocks, and the device model scans it on every request, on
 * UNPLUG_ALL and on reset, so a bit-at-a-time loop would be 64 times slower
 * on the path the guest waits for.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* fallocate() and FALLOC_FL_* */
#endif

#include "vmem_blocks.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stddef.h>

#define WORD_BITS 64u

static uint64_t nb_words(uint64_t nbits)
{
    /* Not (nbits + 63) / 64: that overflows for nbits near 2^64. */
    return nbits / WORD_BITS + (nbits % WORD_BITS != 0);
}

/* Bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static uint64_t word_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == WORD_BITS ? ~UINT64_C(0) : (UINT64_C(1) << hi) - 1;
    return upper & (~UINT64_C(0) << lo);
}

/* Refuse a range before touching memory: the caller is Python or a guest
 * request, and a wrong range must never turn into a write out of bounds. */
static int check_range(uint64_t nbits, uint64_t first, uint64_t count)
{
    if (nbits > (uint64_t)INT64_MAX)
        return -EOVERFLOW;
    if (count == 0)
        return -EINVAL;
    /* Written so that first + count is never computed: it may wrap. */
    if (count > nbits || first > nbits - count)
        return -ERANGE;
    return 0;
}

/*
 * Call fn(word pointer, mask) for every word that [first, first + count)
 * touches.  Shared by set/clear/state so the boundary arithmetic, the part
 * that is easy to get wrong, exists once.  The range has been checked.
 */
#define FOR_EACH_WORD_MASK(first, count, idx, mask, ...)                      \
    do {                                                                       \
        uint64_t end_ = (first) + (count);                                     \
        uint64_t last_idx_ = (end_ - 1) / WORD_BITS;                           \
        for (uint64_t idx = (first) / WORD_BITS; idx <= last_idx_; idx++) {    \
            unsigned lo_ = idx == (first) / WORD_BITS ? (first) % WORD_BITS : 0;\
            unsigned hi_ = idx == last_idx_ ? (end_ - 1) % WORD_BITS + 1        \
                                            : WORD_BITS;                       \
            uint64_t mask = word_mask(lo_, hi_);                               \
            __VA_ARGS__                                                        \
        }                                                                      \
    } while (0)

int vmem_bitmap_set(uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count)
{
    int rc = check_range(nbits, first, count);
    if (rc < 0)
        return rc;
    FOR_EACH_WORD_MASK(first, count, i, mask, { words[i] |= mask; });
    return 0;
}

int vmem_bitmap_clear(uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count)
{
    int rc = check_range(nbits, first, count);
    if (rc < 0)
        return rc;
    FOR_EACH_WORD_MASK(first, count, i, mask, { words[i] &= ~mask; });
    return 0;
}

int vmem_bitmap_range_state(const uint64_t *words, uint64_t nbits, uint64_t first, uint64_t count)
{
    int rc = check_range(nbits, first, count);
    if (rc < 0)
        return rc;
    int any_set = 0, any_clear = 0;
    FOR_EACH_WORD_MASK(first, count, i, mask, {
        uint64_t bits = words[i] & mask;
        any_set |= bits != 0;
        any_clear |= bits != mask;
        /* A STATE request over a huge range that is mixed early need not
         * read the rest. */
        if (any_set && any_clear)
            return VMEM_RANGE_MIXED;
    });
    return any_set ? VMEM_RANGE_ALL_SET : VMEM_RANGE_ALL_CLEAR;
}

int64_t vmem_bitmap_count_set(const uint64_t *words, uint64_t nbits)
{
    if (nbits > (uint64_t)INT64_MAX)
        return -EOVERFLOW;
    uint64_t full = nbits / WORD_BITS;
    int64_t total = 0;
    for (uint64_t i = 0; i < full; i++)
        total += __builtin_popcountll(words[i]);
    if (nbits % WORD_BITS)
        /* Stray bits beyond nbits in the caller's last word do not count. */
        total += __builtin_popcountll(words[full] & word_mask(0, nbits % WORD_BITS));
    return total;
}

/* invert = ~0 finds clear bits by searching the complement, so both
 * searches share one loop. */
static int64_t find_next(const uint64_t *words, uint64_t nbits, uint64_t start, uint64_t invert)
{
    if (nbits > (uint64_t)INT64_MAX)
        return -EOVERFLOW;
    if (start >= nbits)
        return (int64_t)nbits;
    uint64_t n = nb_words(nbits);
    uint64_t i = start / WORD_BITS;
    uint64_t w = (words[i] ^ invert) & (~UINT64_C(0) << (start % WORD_BITS));
    for (;;) {
        if (w) {
            uint64_t bit = i * WORD_BITS + (uint64_t)__builtin_ctzll(w);
            /* A hit beyond nbits is a stray bit of the last word (or, when
             * searching clear bits, the complement of one): no hit at all. */
            return (int64_t)(bit < nbits ? bit : nbits);
        }
        if (++i >= n)
            return (int64_t)nbits;
        w = words[i] ^ invert;
    }
}

int64_t vmem_bitmap_find_next_set(const uint64_t *words, uint64_t nbits, uint64_t start)
{
    return find_next(words, nbits, start, 0);
}

int64_t vmem_bitmap_find_next_clear(const uint64_t *words, uint64_t nbits, uint64_t start)
{
    return find_next(words, nbits, start, ~UINT64_C(0));
}

int vmem_discard(int fd, uint64_t offset, uint64_t length, uint64_t *failed_offset)
{
    int err = 0;
    /* fallocate takes signed off_t; refuse what would turn negative rather
     * than let a huge unsigned value wrap into a different request. */
    if (length == 0 || offset > (uint64_t)INT64_MAX || length > (uint64_t)INT64_MAX - offset) {
        err = EINVAL;
    } else {
        /*
         * PUNCH_HOLE frees the pages in the page cache of the memfd/file, so
         * every process that maps it (the server and QEMU) loses them at
         * once and the host gets the memory back.  KEEP_SIZE is mandatory
         * for a hole (the kernel refuses PUNCH_HOLE without it) and is the
         * point anyway: the backend is sized to the device maximum, which
         * the BAR exports to QEMU, and must never shrink.
         */
        while (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) < 0) {
            /* Punching a hole is idempotent, so a call interrupted half way
             * is safely repeated whole.  Anything else goes to the caller,
             * who must not report the blocks as given back. */
            if (errno != EINTR) {
                err = errno;
                break;
            }
        }
    }
    if (err && failed_offset)
        *failed_offset = offset;
    return -err;
}

int vmem_discard_runs(int fd, const uint64_t *words, uint64_t nbits, uint64_t block_size,
                      uint64_t fd_offset, int which, uint64_t *failed_offset)
{
    /* Check the whole byte range first, so that an overflow can never
     * surface half way through, after some runs were already discarded. */
    if (block_size == 0 || (which != 0 && which != 1) || nbits > (uint64_t)INT64_MAX ||
        fd_offset > (uint64_t)INT64_MAX ||
        (nbits && block_size > ((uint64_t)INT64_MAX - fd_offset) / nbits)) {
        if (failed_offset)
            *failed_offset = fd_offset;
        return -EINVAL;
    }
    /* One fallocate per run, not per block: an UNPLUG_ALL of a large device
     * is then a handful of syscalls instead of one per 2 MiB. */
    uint64_t pos = 0;
    while (pos < nbits) {
        int64_t start = which ? vmem_bitmap_find_next_set(words, nbits, pos)
                              : vmem_bitmap_find_next_clear(words, nbits, pos);
        if ((uint64_t)start >= nbits)
            break;
        int64_t end = which ? vmem_bitmap_find_next_clear(words, nbits, (uint64_t)start)
                            : vmem_bitmap_find_next_set(words, nbits, (uint64_t)start);
        int rc = vmem_discard(fd, fd_offset + (uint64_t)start * block_size,
                              ((uint64_t)end - (uint64_t)start) * block_size, failed_offset);
        if (rc < 0)
            return rc;
        pos = (uint64_t)end;
    }
    return 0;
}
