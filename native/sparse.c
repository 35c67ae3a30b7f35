/* Exact Top-k and hard-threshold selection with the fused error feedback update, and the
 * scatter-add decode (see sg_sparse.h for the contract). sg_topk_take_sum forms p = g + e as
 * it goes: step 1's scan is then that sum's own pass (add_scan_ge), and the other paths
 * read the p it wrote.
 *
 * Top-k is a radix select on the 31-bit key (digits of 11, 10 and 10 bits), run on a
 * candidate list when one can be had cheaply:
 *  1. On large segments, a fixed pseudo-random sample of about 64 d / k keys (in runs of 16
 *     consecutive keys: one cache miss per run) gives a bound lo a few standard deviations
 *     below the k-th largest key; one streaming scan (AVX2: 32 keys per compare, blocks
 *     without a hit skipped) lists the positions with key >= lo. If there
 *     are at least k of them (and not too many), they contain every key the selection can
 *     take, ties included, and the whole select runs on them: one pass over the segment.
 *  2. Otherwise a histogram of the top 11 bits over the segment finds the bin of the k-th
 *     largest key, and the positions at or above that bin are listed if they are few.
 *  3. If even that bin is crowded (many equal or nearly equal magnitudes), the digits are
 *     resolved on the whole segment and the final pass scans it in chunks.
 * The sample only decides how fast the answer comes, never what it is. The scan copies each
 * candidate's value next to its position, so the radix passes over the candidates read one
 * short array in order instead of scattered elements of the segment. The candidates are in
 * ascending position order, so the last step walks them once and takes every key above the
 * k-th largest and the first `need` equal to it. */
#include <stdlib.h>

#include "sg_scalar.h"
#include "sg_sparse.h"

#define TOP_BITS 11u
#define TOP_SHIFT 20u
#define LOW_BITS 10u
#define LOW_MASK ((1u << LOW_BITS) - 1u)
#define N_HIST 4 /* sub-histograms of the first pass: repeated bins do not serialize */
#define CHUNK 4096
#define TAKE_AHEAD 16 /* candidates ahead whose element is prefetched for the write-back */

typedef struct {
    uint32_t *hist;   /* N_HIST << TOP_BITS counters */
    uint32_t *cand;   /* candidate positions */
    float *cval;      /* and their values */
    size_t cand_cap;
    uint32_t *keys;   /* the sample's keys */
    size_t keys_cap;
    uint32_t chunk[CHUNK];
} workspace;

/* Takes position g, whose value v = t->p[g] the caller has (a scattered load less). */
static inline void take_one(sg_take *t, size_t g, float v) {
    if (t->count >= t->cap) return;
    t->idx[t->count] = (int32_t)g;
    if (t->vt == SG_F32) {
        ((float *)t->vals)[t->count] = v;
        t->p[g] = v - v;
    } else {   /* NaN passes the clamp unchanged, as torch.clamp does */
        float c = v < -SG_FP16_MAX ? -SG_FP16_MAX : (v > SG_FP16_MAX ? SG_FP16_MAX : v);
        uint16_t h = sg_f32_to_f16(c);
        sg_st16((uint8_t *)t->vals + 2 * t->count, h);
        t->p[g] = v - sg_f16_to_f32(h);
    }
    t->count++;
}

/* Histogram of the top TOP_BITS of the keys of x[0 .. n) into hist[0 .. 1 << TOP_BITS). */
static void hist_top(const float *x, size_t n, uint32_t *hist) {
    const size_t bins = (size_t)1 << TOP_BITS;
    memset(hist, 0, N_HIST * bins * sizeof(uint32_t));
    size_t i = 0;
    for (; i + N_HIST <= n; i += N_HIST)
        for (size_t h = 0; h < N_HIST; h++) hist[h * bins + (sg_key(x[i + h]) >> TOP_SHIFT)]++;
    for (; i < n; i++) hist[sg_key(x[i]) >> TOP_SHIFT]++;
    for (size_t b = 0; b < bins; b++)
        for (size_t h = 1; h < N_HIST; h++) hist[b] += hist[h * bins + b];
}

/* The bin b holding the need-th largest key (counting down from the top bin): moves the
 * counts of the bins above b from need to above; *m = hist[b]. If the counts fall short
 * (impossible unless x changes during the call) it stops at bin 0. */
static uint32_t pick(const uint32_t *hist, uint32_t bins, size_t *need, size_t *above,
                     size_t *m) {
    size_t cum = 0;
    uint32_t b = bins - 1;
    for (; b > 0; b--) {
        if (cum + hist[b] >= *need) break;
        cum += hist[b];
    }
    *above += cum;
    *need -= cum < *need ? cum : *need;
    *m = hist[b];
    return b;
}

/* Histogram of the top bits of the keys of the candidates' values (one counter set: they are
 * few). */
static void hist_top_of(const float *val, size_t n, uint32_t *hist) {
    memset(hist, 0, ((size_t)1 << TOP_BITS) * sizeof(uint32_t));
    for (size_t j = 0; j < n; j++) hist[sg_key(val[j]) >> TOP_SHIFT]++;
}

#define SAMPLE_PER_K 64   /* sample points expected above the k-th largest key */
#define SAMPLE_RUN 16   /* consecutive elements per sampled point: a cache line's worth */
/* The bound sits SAMPLE_Z standard deviations lower, the deviation taken SAMPLE_RUN_ROOT
 * times that of independent points: neighbours in a run may be alike (fully alike runs would
 * need sqrt(16) = 4; 2 leaves ~5% of such segments to the slower histogram path, and costs
 * ~10% of the selection's speed against 1 on independent data; the result is exact either
 * way). */
#define SAMPLE_Z 4
#define SAMPLE_RUN_ROOT 2

/* Where run r of the sample starts, runs of SAMPLE_RUN elements one per stride >= 4 SAMPLE_RUN
 * (pseudo-random inside it, fixed, so the speed does not depend on state and periodic data
 * cannot alias with it). Runs, not single points: the sample's scattered loads, which miss
 * the cache, cost one miss per run instead of one per element. */
static inline size_t sample_run(size_t r, size_t stride) {
    return r * stride +
           (size_t)(((uint64_t)sg_mix32((uint32_t)r) * (stride - SAMPLE_RUN + 1)) >> 32);
}

/* A key probably a little below the k-th largest of x[0 .. d) (top 21 bits of the r-th
 * largest sample key, r = s k / d + SAMPLE_Z SAMPLE_RUN_ROOT sqrt(s k / d) + 1, rounded) into
 * *lo: 1, or 0 if a sample of SAMPLE_PER_K d / k points would not be much smaller than the
 * segment; -1 when out of memory. x = g + e when g is given (x not written yet). The sampled
 * keys are gathered once into the workspace: both histogram passes then read them in order. */
static int sample_bound(workspace *w, const float *x, const float *g, const float *e, size_t d,
                        size_t k, uint32_t *lo) {
    uint64_t s = (uint64_t)SAMPLE_PER_K * d / k;
    if (s < 1024) s = 1024;
    if (4 * s > d) return 0;
    if (s > w->keys_cap) {
        uint32_t *grown = realloc(w->keys, (size_t)s * sizeof(uint32_t));
        if (!grown) return -1;
        w->keys = grown;
        w->keys_cap = (size_t)s;
    }
    uint32_t *keys = w->keys, *hist = w->hist;
    s -= s % SAMPLE_RUN;
    size_t stride = d / ((size_t)s / SAMPLE_RUN);
    for (size_t r = 0; r < s / SAMPLE_RUN; r++) {
        size_t at = sample_run(r, stride);
        if (g)   /* p = g + e is not formed yet: the same float sums as the kernel's */
            for (size_t i = 0; i < SAMPLE_RUN; i++)
                keys[SAMPLE_RUN * r + i] = sg_key(g[at + i] + e[at + i]);
        else
            for (size_t i = 0; i < SAMPLE_RUN; i++) keys[SAMPLE_RUN * r + i] = sg_key(x[at + i]);
    }
    size_t ks = (size_t)(s * k / d), root = 0, above = 0, m;
    while ((root + 1) * (root + 1) <= ks) root++;   /* ks < 4 SAMPLE_PER_K 2^10: few steps */
    size_t need = ks + SAMPLE_Z * SAMPLE_RUN_ROOT * root + 1;
    if (need > s) need = (size_t)s;
    memset(hist, 0, ((size_t)1 << TOP_BITS) * sizeof(uint32_t));
    for (size_t j = 0; j < s; j++) hist[keys[j] >> TOP_SHIFT]++;
    uint32_t top = pick(hist, 1u << TOP_BITS, &need, &above, &m);
    memset(hist, 0, (LOW_MASK + 1) * sizeof(uint32_t));
    for (size_t j = 0; j < s; j++) {
        if (keys[j] >> TOP_SHIFT == top) hist[(keys[j] >> (TOP_SHIFT - LOW_BITS)) & LOW_MASK]++;
    }
    uint32_t mid = pick(hist, LOW_MASK + 1, &need, &above, &m);
    *lo = top << TOP_SHIFT | mid << (TOP_SHIFT - LOW_BITS);
    return 1;
}

static int reserve(workspace *w, size_t n) {
    if (n <= w->cand_cap) return 0;
    uint32_t *c = realloc(w->cand, n * sizeof(uint32_t));
    if (!c) return -1;
    w->cand = c;
    float *v = realloc(w->cval, n * sizeof(float));
    if (!v) return -1;
    w->cval = v;
    w->cand_cap = n;
    return 0;
}

/* Take position g (value v) when its key is above thr, or equal to it while *need > 0. */
static inline void take_if(sg_take *t, size_t g, float v, uint32_t thr, size_t *need) {
    uint32_t key = sg_key(v);
    if (key > thr) {
        take_one(t, g, v);
    } else if (key == thr && *need > 0) {
        (*need)--;
        take_one(t, g, v);
    }
}

/* The candidates above the sample's bound (see the file's comment), with p = g + e formed
 * into x in the same pass when g is given. Returns 1 with *nc set when there are enough and
 * not too many, 0 when the sample misled or was not taken, -1 out of memory, 2 NaN/Inf in
 * p (g given). */
static int candidates(const sg_kernels *K, workspace *w, float *x, const float *g,
                      const float *e, size_t d, size_t k, size_t cand_limit, size_t *nc) {
    uint32_t lo;
    int sampled = k > 0 && k < d ? sample_bound(w, x, g, e, d, k, &lo) : 0;
    if (sampled < 0 || (sampled && reserve(w, cand_limit) < 0)) return -1;
    if (!sampled) {
        *nc = 0;
        return g && !K->add_finite(g, e, x, d) ? 2 : 0;
    }
    if (g) {
        if (!K->add_scan_ge(g, e, x, d, lo, w->cand, w->cval, cand_limit, nc)) return 2;
    } else {
        *nc = K->scan_ge(x, d, lo, w->cand, w->cval, cand_limit);
    }
    return *nc >= k && *nc <= cand_limit;   /* else: the sample misled us */
}

static int topk_segment(const sg_kernels *K, workspace *w, size_t off, size_t d, size_t k,
                        const float *g, const float *e, sg_take *t) {
    const float *x = t->p + off;
    const size_t cand_limit = k + d / 8 + 1024;
    size_t need = k, above = 0, m, nc;
    int found = candidates(K, w, t->p + off, g ? g + off : NULL, g ? e + off : NULL, d, k,
                           cand_limit, &nc);
    if (found < 0 || found == 2) return found;
    if (k == 0 || d == 0) return 0;
    if (k >= d) {
        for (size_t i = 0; i < d; i++) take_one(t, off + i, x[i]);
        return 0;
    }
    const uint32_t *cand = found ? w->cand : NULL;
    if (cand)
        hist_top_of(w->cval, nc, w->hist);
    else
        hist_top(x, d, w->hist);
    uint32_t prefix = pick(w->hist, 1u << TOP_BITS, &need, &above, &m) << TOP_SHIFT;
    uint32_t mask = ((1u << TOP_BITS) - 1u) << TOP_SHIFT;
    for (uint32_t shift = TOP_SHIFT;;) {
        /* key >= prefix (lower digits 0) holds for the `above` keys and the m in the bin */
        if (!cand && shift > 0 && above + m <= cand_limit) {
            if (reserve(w, above + m) < 0) return -1;
            nc = K->scan_ge(x, d, prefix, w->cand, w->cval, above + m);
            if (nc > above + m) nc = above + m;
            cand = w->cand;
        }
        if (shift == 0) break;
        shift -= LOW_BITS;
        uint32_t *h = w->hist;
        memset(h, 0, (LOW_MASK + 1) * sizeof(uint32_t));
        if (cand) {
            for (size_t j = 0; j < nc; j++) {
                uint32_t key = sg_key(w->cval[j]);
                if ((key & mask) == prefix) h[(key >> shift) & LOW_MASK]++;
            }
        } else {
            for (size_t i = 0; i < d; i++) {
                uint32_t key = sg_key(x[i]);
                if ((key & mask) == prefix) h[(key >> shift) & LOW_MASK]++;
            }
        }
        prefix |= pick(h, LOW_MASK + 1, &need, &above, &m) << shift;
        mask |= LOW_MASK << shift;
    }
    /* prefix is now the k-th largest key; take all above it and the first `need` equal */
    if (cand) {
        for (size_t j = 0; j < nc; j++) {
            /* the write-back of a taken element misses the cache: ask for its line early */
            if (j + TAKE_AHEAD < nc) __builtin_prefetch(t->p + off + cand[j + TAKE_AHEAD], 1);
            take_if(t, off + cand[j], w->cval[j], prefix, &need);
        }
        return 0;
    }
    for (size_t start = 0; start < d; start += CHUNK) {
        size_t len = d - start < CHUNK ? d - start : CHUNK;
        size_t got = K->scan_ge(x + start, len, prefix, w->chunk, NULL, CHUNK);
        for (size_t j = 0; j < got; j++) {
            size_t i = start + w->chunk[j];
            take_if(t, off + i, x[i], prefix, &need);
        }
    }
    return 0;
}

/* sg_topk_take, and sg_topk_take_sum with g given: the ranges between the segments (and
 * after the last, up to n) are formed by add_finite alone. */
static int topk_take(const sg_kernels *K, const float *g, const float *e, size_t n,
                     const int64_t *segs, size_t n_segs, sg_take *t) {
    workspace *w = malloc(sizeof(workspace));
    if (!w) return -1;
    w->hist = malloc((N_HIST << TOP_BITS) * sizeof(uint32_t));
    w->cand = NULL;
    w->cval = NULL;
    w->cand_cap = 0;
    w->keys = NULL;
    w->keys_cap = 0;
    int rc = w->hist ? 0 : -1;
    size_t end = 0;   /* of the last segment */
    for (size_t s = 0; s < n_segs && rc == 0; s++) {
        size_t off = (size_t)segs[3 * s];
        if (g && off > end && !K->add_finite(g + end, e + end, t->p + end, off - end)) rc = 2;
        if (rc == 0)
            rc = topk_segment(K, w, off, (size_t)segs[3 * s + 1], (size_t)segs[3 * s + 2], g, e,
                              t);
        end = off + (size_t)segs[3 * s + 1];
    }
    if (rc == 0 && g && n > end && !K->add_finite(g + end, e + end, t->p + end, n - end)) rc = 2;
    free(w->cand);
    free(w->cval);
    free(w->keys);
    free(w->hist);
    free(w);
    return rc;
}

int sg_topk_take(const sg_kernels *K, const int64_t *segs, size_t n_segs, sg_take *t) {
    return topk_take(K, NULL, NULL, 0, segs, n_segs, t);
}

int sg_topk_take_sum(const sg_kernels *K, const float *g, const float *e, size_t n,
                     const int64_t *segs, size_t n_segs, sg_take *t) {
    return topk_take(K, g, e, n, segs, n_segs, t);
}

size_t sg_threshold_take(const sg_kernels *K, size_t n, uint32_t lo, sg_take *t) {
    /* positions into idx (uint32 and int32 share a representation below 2^31) */
    size_t found = K->scan_ge(t->p, n, lo, (uint32_t *)(void *)t->idx, NULL, t->cap);
    if (found != t->cap) return found;
    for (size_t j = 0; j < found; j++) {
        size_t g = (size_t)t->idx[j];
        t->count = j;   /* take_one rewrites idx[j] with the same position */
        take_one(t, g, t->p[g]);
    }
    return found;
}

/* Value j of a payload's values (float32, or float16 widened exactly). */
static inline float pair_value(const uint8_t *vb, sg_dtype vt, size_t j) {
    return vt == SG_F32 ? sg_f32_from_bits(sg_ld32(vb + 4 * j)) : sg_f16_to_f32(sg_ld16(vb + 2 * j));
}

void sg_scatter_add(float *out, const void *idx, const void *vals, sg_dtype vt, size_t nnz) {
    const uint8_t *ib = (const uint8_t *)idx, *vb = (const uint8_t *)vals;
    for (size_t j = 0; j < nnz; j++) out[sg_ld32(ib + 4 * j)] += pair_value(vb, vt, j);
}

int sg_ascending(const void *idx, size_t nnz) {
    const uint8_t *ib = (const uint8_t *)idx;
    uint32_t bad = 0;
    for (size_t j = 1; j < nnz; j++) bad |= sg_ld32(ib + 4 * j) < sg_ld32(ib + 4 * (j - 1));
    return !bad;
}

#define SUM_BLOCK 16384 /* elements of out per block of sg_blocked_sum (64 KB: stays in L2) */

void sg_blocked_sum(const sg_pairs *parts, size_t n_parts, size_t *at, float d, float *out,
                    size_t n) {
    for (size_t r = 0; r < n_parts; r++) at[r] = 0;
    for (size_t b0 = 0; b0 < n; b0 += SUM_BLOCK) {
        size_t b1 = n - b0 < SUM_BLOCK ? n : b0 + SUM_BLOCK;
        memset(out + b0, 0, (b1 - b0) * sizeof(float));
        for (size_t r = 0; r < n_parts; r++) {
            const uint8_t *ib = (const uint8_t *)parts[r].idx, *vb = (const uint8_t *)parts[r].vals;
            size_t j = at[r];
            for (uint32_t i; j < parts[r].nnz && (i = sg_ld32(ib + 4 * j)) < b1; j++)
                out[i] += pair_value(vb, parts[r].vt, j);
            at[r] = j;
        }
        sg_divide(out + b0, b1 - b0, d);
    }
}

int sg_indices_in_range(const void *idx, size_t nnz, size_t n) {
    const uint8_t *ib = (const uint8_t *)idx;
    uint32_t bad = 0;
    for (size_t j = 0; j < nnz; j++) bad |= (size_t)sg_ld32(ib + 4 * j) >= n;   /* < 0 wraps */
    return !bad;
}
