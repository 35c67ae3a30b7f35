/* Vote building blocks shared by every ISA (header-only, compiled once per ISA file so the
 * AVX2 copy gets auto-vectorized).
 *
 * Unweighted votes never unpack to floats: the elements are processed in blocks of
 * SG_BLOCK_ELEMS; for each block the packed words of all ranks are added into a bit-sliced
 * counter (plane k holds bit k of every element's count of set bits, i.e. of "-1" votes),
 * so one 64-bit AND/XOR advances 64 counters at once. Ranks go in groups of at most 255 so
 * a count fits in a byte when the planes are turned back into per-element counts. */
#ifndef SG_VOTE_H
#define SG_VOTE_H

#include "sg_scalar.h"

#define SG_BLOCK_BYTES 256                  /* per rank and block: 2048 elements */
#define SG_BLOCK_WORDS (SG_BLOCK_BYTES / 8)
#define SG_BLOCK_ELEMS (SG_BLOCK_BYTES * 8)
#define SG_GROUP_RANKS 255

typedef struct {
    uint64_t plane[8][SG_BLOCK_WORDS];
    uint64_t carry[SG_BLOCK_WORDS];
    int depth;                              /* planes in use: enough bits for the group */
} sg_counter;

/* Turns the planes of one group into per-element counts (counts[i] = or += count of i). */
typedef void (*sg_to_counts_fn)(const sg_counter *c, size_t nelem, uint32_t *counts,
                                int accumulate);
/* Counts all ranks (n_ranks <= 255) over the full block starting at byte0. */
typedef void (*sg_count_block_fn)(const sg_rows *rows, size_t byte0, sg_counter *c);
/* When all ranks fit in one group: planes -> votes out[0 .. nelem) directly. */
typedef void (*sg_emit_fn)(const sg_counter *c, size_t nelem, size_t n_ranks, int mode,
                           float *out);

static inline size_t sg_min(size_t a, size_t b) { return a < b ? a : b; }

static inline const uint8_t *sg_row(const sg_rows *rows, size_t m, size_t byte0) {
    return rows->base + (ptrdiff_t)m * rows->stride + (ptrdiff_t)byte0;
}

/* A full block is read in place; the last, partial one through a zero-padded copy. */
static inline const uint8_t *sg_block_src(const uint8_t *row, size_t nbytes, uint8_t *pad) {
    if (nbytes == SG_BLOCK_BYTES) return row;
    memset(pad, 0, SG_BLOCK_BYTES);
    memcpy(pad, row, nbytes);
    return pad;
}

/* Propagates c->carry through planes from..depth-1 (half adders; the loops over j are
 * what the compiler vectorizes). */
static inline void sg_ripple(sg_counter *c, int from) {
    for (int k = from; k < c->depth; k++) {
        for (size_t j = 0; j < SG_BLOCK_WORDS; j++) {
            uint64_t p = c->plane[k][j], cy = c->carry[j];
            c->plane[k][j] = p ^ cy;
            c->carry[j] = p & cy;
        }
    }
}

static inline void sg_add_one(sg_counter *c, const uint8_t *a) {
    for (size_t j = 0; j < SG_BLOCK_WORDS; j++) c->carry[j] = sg_ld64(a + 8 * j);
    sg_ripple(c, 0);
}

/* Two ranks at once: a full adder into plane 0, then one carry to ripple (saves a level). */
static inline void sg_add_two(sg_counter *c, const uint8_t *a, const uint8_t *b) {
    for (size_t j = 0; j < SG_BLOCK_WORDS; j++) {
        uint64_t x = sg_ld64(a + 8 * j), y = sg_ld64(b + 8 * j), p = c->plane[0][j];
        uint64_t u = p ^ x;
        c->plane[0][j] = u ^ y;
        c->carry[j] = (p & x) | (u & y);
    }
    sg_ripple(c, 1);
}

/* Planes needed to count up to n_ranks. */
static inline int sg_depth(size_t n_ranks) {
    int depth = 0;
    while (((size_t)1 << depth) <= n_ranks) depth++;
    return depth;
}

/* Counts the set bits of ranks r0 .. r0+nr-1 over bytes byte0 .. byte0+nbytes-1. */
static inline void sg_count_group(const sg_rows *rows, size_t r0, size_t nr, size_t byte0,
                                  size_t nbytes, sg_counter *c) {
    uint8_t pad_a[SG_BLOCK_BYTES], pad_b[SG_BLOCK_BYTES];
    int depth = sg_depth(nr);
    c->depth = depth;
    memset(c->plane, 0, (size_t)depth * sizeof c->plane[0]);
    size_t m = r0;
    for (; m + 1 < r0 + nr; m += 2)
        sg_add_two(c, sg_block_src(sg_row(rows, m, byte0), nbytes, pad_a),
                   sg_block_src(sg_row(rows, m + 1, byte0), nbytes, pad_b));
    if (m < r0 + nr) sg_add_one(c, sg_block_src(sg_row(rows, m, byte0), nbytes, pad_a));
}

/* Byte i of the result (as a number, whatever the endianness) is bit i of b. */
static inline uint64_t sg_spread_bits(unsigned b) {
    uint64_t x = ((uint64_t)b * 0x0101010101010101ull) & 0x8040201008040201ull;
    return ((x + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

/* Counts of elements 8j .. 8j+7 as eight byte-wide counters: sum_k spread(byte j of
 * plane k) << k. Byte i of the result (as a number) is the count of element 8j+i. */
static inline uint64_t sg_byte_counts(const sg_counter *c, size_t j) {
    uint64_t lanes = 0;
    for (int k = 0; k < c->depth; k++)
        lanes += sg_spread_bits(((const uint8_t *)c->plane[k])[j]) << k;
    return lanes;
}

static inline uint32_t sg_lane(uint64_t lanes, size_t i) {
    return (uint32_t)(lanes >> (8 * (i % 8))) & 0xFFu;
}

/* The vote of one element from its count: s = n_ranks - 2 * count, the sign of s, or the
 * mean s / n_ranks (one rounded float32 division: the bits of the sum then torch's div_). */
static inline float sg_vote_of(uint32_t count, size_t n_ranks, int mode) {
    int32_t d = (int32_t)n_ranks - 2 * (int32_t)count;
    if (mode == SG_VOTE_MAJORITY) return (float)((d > 0) - (d < 0));
    return mode == SG_VOTE_MEAN ? (float)d / (float)n_ranks : (float)d;
}

/* Planes -> counts for elements from .. ne-1 (from a multiple of 8). */
static inline void sg_to_counts_scalar(const sg_counter *c, size_t from, size_t ne,
                                       uint32_t *counts, int accumulate) {
    for (size_t j = from / 8; j < sg_nbytes(ne); j++) {
        uint64_t lanes = sg_byte_counts(c, j);
        for (size_t i = 8 * j; i < ne && i < 8 * j + 8; i++)
            counts[i] = (accumulate ? counts[i] : 0) + sg_lane(lanes, i);
    }
}

/* Planes -> votes for elements from .. ne-1 (from a multiple of 8). */
static inline void sg_emit_scalar(const sg_counter *c, size_t from, size_t ne, size_t n_ranks,
                                  int mode, float *out) {
    for (size_t j = from / 8; j < sg_nbytes(ne); j++) {
        uint64_t lanes = sg_byte_counts(c, j);
        for (size_t i = 8 * j; i < ne && i < 8 * j + 8; i++)
            out[i] = sg_vote_of(sg_lane(lanes, i), n_ranks, mode);
    }
}

/* The sum of the +-1 votes is exact in float up to 2^24 ranks. */
static inline void sg_counts_to_votes(const uint32_t *counts, size_t ne, size_t n_ranks,
                                      int mode, float *out) {
    for (size_t i = 0; i < ne; i++) out[i] = sg_vote_of(counts[i], n_ranks, mode);
}

/* Up to 255 ranks the planes of a block go straight to votes; beyond, the counts of each
 * group of ranks are added up first. */
static inline __attribute__((always_inline)) void
sg_vote_count_blocks(const sg_rows *rows, size_t n, int mode, float *out,
                     sg_count_block_fn count_block, sg_emit_fn emit, sg_to_counts_fn to_counts) {
    sg_counter c;
    uint32_t counts[SG_BLOCK_ELEMS];
    for (size_t e0 = 0; e0 < n; e0 += SG_BLOCK_ELEMS) {
        size_t ne = sg_min(SG_BLOCK_ELEMS, n - e0), nbytes = sg_nbytes(ne);
        if (rows->n_ranks <= SG_GROUP_RANKS) {
            if (count_block && nbytes == SG_BLOCK_BYTES)
                count_block(rows, e0 / 8, &c);
            else
                sg_count_group(rows, 0, rows->n_ranks, e0 / 8, nbytes, &c);
            emit(&c, ne, rows->n_ranks, mode, out + e0);
            continue;
        }
        for (size_t r0 = 0; r0 < rows->n_ranks; r0 += SG_GROUP_RANKS) {
            size_t nr = sg_min(SG_GROUP_RANKS, rows->n_ranks - r0);
            sg_count_group(rows, r0, nr, e0 / 8, nbytes, &c);
            to_counts(&c, ne, counts, r0 > 0);
        }
        sg_counts_to_votes(counts, ne, rows->n_ranks, mode, out + e0);
    }
}

/* ---- weighted votes: float32 accumulation, ranks in index order, from +0.0 -------------- */

/* acc[i] += c_i, c_i = (bit i set ? -w : w), or +0.0 where bit i of zbits is set (a marked
 * zero; zbits NULL: none). Adding +0.0 keeps the additions those of the torch fallback. */
typedef void (*sg_add_signed_fn)(const uint8_t *bits, const uint8_t *zbits, size_t ne, float w,
                                 float *acc);

static inline void sg_signs_of(float *acc, size_t ne) {
    for (size_t i = 0; i < ne; i++) acc[i] = (float)((acc[i] > 0.0f) - (acc[i] < 0.0f));
}

/* The block stays in L1 while every rank adds into it, so out is written once. zeros: the
 * ranks' zero planes, rows as in `rows` (NULL: no marks). */
static inline __attribute__((always_inline)) void
sg_vote_weighted_blocks(const sg_rows *rows, const sg_rows *zeros, size_t n, const float *w,
                        int majority, float *out, sg_add_signed_fn add_signed) {
    for (size_t e0 = 0; e0 < n; e0 += SG_BLOCK_ELEMS) {
        size_t ne = sg_min(SG_BLOCK_ELEMS, n - e0);
        float *acc = out + e0;
        for (size_t i = 0; i < ne; i++) acc[i] = 0.0f;
        for (size_t m = 0; m < rows->n_ranks; m++)
            add_signed(sg_row(rows, m, e0 / 8), zeros ? sg_row(zeros, m, e0 / 8) : NULL, ne,
                       w[m], acc);
        if (majority) sg_signs_of(acc, ne);
    }
}

/* The sign flip is a bit flip, as torch's negation. */
static inline void sg_add_signed_scalar(const uint8_t *bits, const uint8_t *zbits, size_t from,
                                        size_t ne, float w, float *acc) {
    uint32_t wb = sg_bits_from_f32(w);
    for (size_t i = from; i < ne; i++) {
        uint32_t bit = (bits[i / 8] >> (i % 8)) & 1u;
        uint32_t zero = zbits ? (zbits[i / 8] >> (i % 8)) & 1u : 0u;
        acc[i] += sg_f32_from_bits(zero ? 0u : wb ^ (bit << 31));
    }
}

#endif /* SG_VOTE_H */
