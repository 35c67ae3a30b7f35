/* Sparse kernels (sparse.c): exact Top-k and hard-threshold selection by magnitude with the
 * error-feedback update fused into the compaction, and the scatter-add decode. Written once
 * in portable C; the streaming passes go through the ISA table (scan_ge, count_ge, add_finite,
 * add_scan_ge).
 *
 * Selection order is by key(v) = bits(v) & 0x7FFFFFFF (sg_key in sg_scalar.h): |v| for every
 * non-NaN v, +0 == -0; NaN ranks above +-Inf. Ties at the cut go to the lowest position. */
#ifndef SG_SPARSE_H
#define SG_SPARSE_H

#include "sg_kernels.h"

#define SG_FP16_MAX 65504.0f

/* Where the selected pairs go. Taking position g writes idx = g and val = v = p[g] (float32,
 * or float16 of v clamped to +-65504, round to nearest even), then sets p[g] = v - q with q
 * the value as sent (float32(float16 bits) for float16; v itself for float32). */
typedef struct {
    float *p;
    int32_t *idx;
    void *vals;       /* float32 or float16 bits, as vt says */
    sg_dtype vt;      /* SG_F32 or SG_F16 */
    size_t cap;       /* room in idx and vals */
    size_t count;     /* pairs taken so far (never written past cap) */
} sg_take;

/* Top-k per segment: segs holds n_segs triples (offset, size, k) of non-overlapping ascending
 * ranges of p; for each, the min(k, size) largest keys (ties to the lowest position), taken in
 * ascending position order. Returns 0, or -1 when out of memory (the segments before may
 * have been taken: the caller discards p and the pairs). */
int sg_topk_take(const sg_kernels *K, const int64_t *segs, size_t n_segs, sg_take *t);

/* sg_topk_take of p = g + e (float32 sums), formed into t->p[0 .. n) as the selection goes
 * (the segments lie inside [0, n); gaps between and after them are formed too): a large
 * segment's sum is its candidate scan (add_scan_ge), so p is read once less. Returns 0, -1
 * out of memory, or 2 when some sum is NaN/Inf (after either, p and the pairs may be partly
 * formed: the caller discards them). g and e (n elements each) must not overlap p or the
 * pairs. */
int sg_topk_take_sum(const sg_kernels *K, const float *g, const float *e, size_t n,
                     const int64_t *segs, size_t n_segs, sg_take *t);

/* Hard threshold over p[0 .. n): positions with key(p[i]) >= lo. Scans the positions into
 * t->idx first; only when there are exactly t->cap of them are the values written and p
 * updated. Returns the number found (p is untouched when it differs from t->cap). */
size_t sg_threshold_take(const sg_kernels *K, size_t n, uint32_t lo, sg_take *t);

/* Decode: out[idx[j]] += value j (float32, or float16 widened exactly), j ascending. idx may
 * be unaligned; every idx[j] must be in [0, n) (sg_indices_in_range). */
void sg_scatter_add(float *out, const void *idx, const void *vals, sg_dtype vt, size_t nnz);
int sg_indices_in_range(const void *idx, size_t nnz, size_t n);

/* One rank's pairs (idx == NULL: a dense part of n float32 values). */
typedef struct {
    const void *idx;
    const void *vals;
    sg_dtype vt;
    size_t nnz;
} sg_pairs;

/* 1 if idx[0 .. nnz) is ascending (Top-k's and the threshold's payloads are). */
int sg_ascending(const void *idx, size_t nnz);

/* The decode of sparse parts with ascending indices into out[0 .. n): zeros, every part's
 * pairs added in part order, everything divided by d, one cache-sized block of out at a
 * time (the additions and the division then hit the cache); at: n_parts cursors of scratch.
 * The same bits as doing each step over the whole of out. */
void sg_blocked_sum(const sg_pairs *parts, size_t n_parts, size_t *at, float d, float *out,
                    size_t n);

#endif /* SG_SPARSE_H */
