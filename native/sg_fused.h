/* Fused error-feedback scaled sign (ef_sign, ecx_sign): the scalar building blocks and the
 * driver shared by every ISA (header-only, compiled once per ISA file).
 *
 * The compensated value p is read from the memories (sg_src):
 *   ef_sign:  p = g + e
 *   ecx_sign: p = g + (a*e - b*d2),  a = float32(2 - alpha), b = float32(1 - alpha)
 *             (ErrorCompensatedX: e = delta_{t-1}, d2 = delta_{t-2}); every product, the
 *             difference and the sum rounded to float32 in this order, no FMA
 * For p over a bucket of n float32 elements and its segments (tensors) t = (o_t, s_t),
 * o_t a multiple of 8, ascending, non-overlapping; the other elements are gaps:
 *   scale_t  = tree_sum(|p[o_t .. o_t+s_t)|) / float32(max(s_t - zeros_t, 1))
 *   e_out_i  = p_i                                  where p_i is +-0 or i is a gap
 *            = p_i - copysign(scale_t, p_i)         elsewhere in segment t
 *   bits     = sign bits of p (pack_signs layout), zplane = (p_i == +-0) bits
 *   zeros[t] = number of +-0 in segment t; zeros[n_segs] = in the gaps
 * Per segment two passes: pass 1 reads the inputs (sum, zero count, NaN/Inf check), pass 2
 * reads them again (cache-warm for segments that fit) and writes e_out and the bits. Nothing
 * is written for a segment before its pass 1 has found it finite. Any NaN/Inf input makes p
 * NaN/Inf (0 * Inf is NaN), so the check on p covers the inputs too.
 *
 * tree_sum fixes the float32 summation order so that every ISA and the torch fallback agree
 * bit for bit (hvd_signsgd/kernels/_torch.py: tree_abs_sum): the values, zero-padded to a
 * multiple of 64, are summed 64 at a time by sg_sum64; the partial sums are summed the same
 * way, level after level, until one value is left (0 for no values). */
#ifndef SG_FUSED_H
#define SG_FUSED_H

#include "sg_scalar.h"

#define SG_TREE_FAN 64
#define SG_TREE_LEVELS 7 /* 64^6 > 2^31 elements: the top level never holds more than one */

/* Sum of 64 floats: 8 lanes j each add x[j], x[8+j], ..., x[56+j] in order, then
 * ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)) (the order of an AVX2 horizontal sum). */
static inline float sg_sum64(const float *x) {
    float v[8], a[4];
    for (int j = 0; j < 8; j++) v[j] = x[j];
    for (int r = 1; r < 8; r++)
        for (int j = 0; j < 8; j++) v[j] += x[8 * r + j];
    for (int j = 0; j < 4; j++) a[j] = v[j] + v[j + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

typedef struct {
    float buf[SG_TREE_LEVELS][SG_TREE_FAN];
    unsigned count[SG_TREE_LEVELS];
} sg_tree;

static inline void sg_tree_init(sg_tree *t) { memset(t->count, 0, sizeof t->count); }

/* Appends v to level k; a full level is summed into the next. */
static inline void sg_tree_push(sg_tree *t, int k, float v) {
    for (;;) {
        t->buf[k][t->count[k]++] = v;
        if (t->count[k] < SG_TREE_FAN || k == SG_TREE_LEVELS - 1) return;
        v = sg_sum64(t->buf[k]);
        t->count[k] = 0;
        k++;
    }
}

/* The last, partial block of each level, zero-padded (x + 0 == x for the |p| summed here, so
 * summing a lone value again changes nothing). */
static inline float sg_tree_finish(sg_tree *t) {
    for (int k = 0; k < SG_TREE_LEVELS - 1; k++) {
        if (!t->count[k]) continue;
        for (unsigned i = t->count[k]; i < SG_TREE_FAN; i++) t->buf[k][i] = 0.0f;
        t->count[k] = 0;
        sg_tree_push(t, k + 1, sg_sum64(t->buf[k]));
    }
    return t->count[SG_TREE_LEVELS - 1] ? t->buf[SG_TREE_LEVELS - 1][0] : 0.0f;
}

static inline float sg_absf(float v) { return sg_f32_from_bits(sg_bits_from_f32(v) & 0x7FFFFFFFu); }
static inline int sg_nonfinite(float v) { return (sg_bits_from_f32(v) & 0x7FFFFFFFu) >= 0x7F800000u; }

/* The residual of one element of a segment (scale >= 0). */
static inline float sg_ef_residual(float p, float scale) {
    uint32_t pb = sg_bits_from_f32(p);
    if (!(pb & 0x7FFFFFFFu)) return p;
    return p - sg_f32_from_bits(sg_bits_from_f32(scale) | (pb & 0x80000000u));
}

/* The inputs p is computed from: d2 == NULL for ef_sign (a, b unused). */
typedef struct {
    const float *g, *e, *d2;
    float a, b;
} sg_src;

/* p_i; ecx: whether s->d2 is set, a constant where the callers below are inlined (the loops
 * are split by mode once per call, not per element). */
static inline __attribute__((always_inline)) float sg_src_p(const sg_src *s, size_t i,
                                                             int ecx) {
    if (!ecx) return s->g[i] + s->e[i];
    return s->g[i] + (s->a * s->e[i] - s->b * s->d2[i]);
}

typedef struct {
    sg_src src;
    float *e_out;
    uint8_t *bits, *zplane;
} sg_ef_io;

static inline __attribute__((always_inline)) int
sg_ef_pass1_mode(const sg_src *src, size_t from, size_t to, sg_tree *t, size_t *zeros, int ecx) {
    int bad = 0;
    size_t z = 0;
    for (size_t i = from; i < to; i++) {
        float a = sg_absf(sg_src_p(src, i, ecx));
        bad |= sg_nonfinite(a);
        z += a == 0.0f;
        sg_tree_push(t, 0, a);
    }
    *zeros += z;
    return !bad;
}

/* Pass 1 over [from, to): |p| into the tree, zeros counted; returns 1 if all finite. */
static inline int sg_ef_pass1_scalar(const sg_src *src, size_t from, size_t to, sg_tree *t,
                                     size_t *zeros) {
    return src->d2 ? sg_ef_pass1_mode(src, from, to, t, zeros, 1)
                   : sg_ef_pass1_mode(src, from, to, t, zeros, 0);
}

static inline __attribute__((always_inline)) int
sg_ef_pass2_mode(const sg_ef_io *io, size_t from, size_t to, size_t seg_end, float scale,
                 size_t *gap_zeros, int ecx) {
    int bad = 0;
    for (size_t j = from / 8; 8 * j < to; j++) {
        unsigned sb = 0, zb = 0;
        for (size_t i = 8 * j; i < to && i < 8 * j + 8; i++) {
            float p = sg_src_p(&io->src, i, ecx);
            uint32_t pb = sg_bits_from_f32(p);
            unsigned zero = (pb & 0x7FFFFFFFu) == 0;
            sb |= (unsigned)(pb >> 31) << (i % 8);
            zb |= zero << (i % 8);
            if (i < seg_end) {
                io->e_out[i] = sg_ef_residual(p, scale);
            } else {
                io->e_out[i] = p;
                bad |= sg_nonfinite(p);
                *gap_zeros += zero;
            }
        }
        io->bits[j] = (uint8_t)sb;
        io->zplane[j] = (uint8_t)zb;
    }
    return !bad;
}

/* Pass 2 (and the gaps) over [from, to), from a multiple of 8: writes e_out, bits, zplane.
 * Elements at or past seg_end are gaps (e_out = p); returns 1 if all finite, counts the gap
 * zeros into *gap_zeros. Padding bits of the last byte are 0. */
static inline int sg_ef_pass2_scalar(const sg_ef_io *io, size_t from, size_t to, size_t seg_end,
                                     float scale, size_t *gap_zeros) {
    return io->src.d2 ? sg_ef_pass2_mode(io, from, to, seg_end, scale, gap_zeros, 1)
                      : sg_ef_pass2_mode(io, from, to, seg_end, scale, gap_zeros, 0);
}

/* pass1(src, from, to, tree, zeros): as sg_ef_pass1_scalar.
 * pass2(io, from, to, scale): full bytes only (to - from a multiple of 8), all in a segment. */
typedef int (*sg_ef_pass1_fn)(const sg_src *src, size_t from, size_t to, sg_tree *t,
                              size_t *zeros);
typedef void (*sg_ef_pass2_fn)(const sg_ef_io *io, size_t from, size_t to, float scale);

/* segs: n_segs (offset, size) pairs, checked by the caller. Returns 1 when every p and every
 * scale is finite; else 0 and the outputs are unspecified (the inputs are only read). */
static inline __attribute__((always_inline)) int
sg_ef_sign_run(sg_src src, float *e_out, size_t n, const int64_t *segs, size_t n_segs,
               uint8_t *bits, uint8_t *zplane, float *scales, uint64_t *zeros,
               sg_ef_pass1_fn pass1, sg_ef_pass2_fn pass2) {
    sg_ef_io io = {src, e_out, bits, zplane};
    sg_tree tree;
    size_t pos = 0, gap_zeros = 0;
    for (size_t t = 0; t < n_segs; t++) {
        size_t o = (size_t)segs[2 * t], s = (size_t)segs[2 * t + 1], z = 0;
        if (pos < o && !sg_ef_pass2_scalar(&io, pos, o, 0, 0.0f, &gap_zeros)) return 0;
        sg_tree_init(&tree);
        if (!pass1(&io.src, o, o + s, &tree, &z)) return 0;
        float sum = sg_tree_finish(&tree);
        float scale = sum / (float)(s > z ? s - z : 1);
        if (sg_nonfinite(scale)) return 0;
        uint64_t zz = z;
        scales[t] = scale;
        memcpy(zeros + t, &zz, 8);   /* zeros need not be aligned */
        size_t full = o + (s / 8) * 8, end = (o + s + 7) / 8 * 8;
        if (end > n) end = n;
        pass2(&io, o, full, scale);
        if (!sg_ef_pass2_scalar(&io, full, end, o + s, scale, &gap_zeros)) return 0;
        pos = end;
    }
    if (pos < n && !sg_ef_pass2_scalar(&io, pos, n, 0, 0.0f, &gap_zeros)) return 0;
    uint64_t gz = gap_zeros;
    memcpy(zeros + n_segs, &gz, 8);
    return 1;
}

/* ---- deferred residual (ef_sign_deferred, ecx_sign_deferred): error feedback in one pass ------
 * Each memory is kept as an earlier step's p and its scales; its residual is formed wherever a
 * later step reads it, never stored (ECX reads each buffer twice: as d1, then as d2):
 *   e_i = sg_ef_residual(x_i, prev_scale_t)   in segment t, x the kept buffer
 *       = x_i                                  in the gaps
 *   p_i = g_i + e1_i                           (ef_sign_deferred: x = p_prev)
 *       = g_i + (a*e1_i - b*e2_i)              (ecx_sign_deferred: x = p1, then p2; as ecx_sign)
 * written to p_out, and the outputs are ef_sign's (ecx_sign's) for that p (bits, zplane,
 * scales, zeros). Since the sign bits do not depend on the scale, one pass per segment reads
 * the inputs and writes p_out and the bits, where the two-pass kernels read them twice. Each
 * e_i has the bits the two-pass kernel's memory would have held, so both give the same p,
 * payload and (once formed) memory. Outputs may be written before a NaN/Inf is found (then 0
 * is returned and they are unspecified; the inputs are only read). */

/* p_i of a deferred pass (src.d2 set: ecx); in_seg: whether i lies in the segment. */
static inline float sg_efd_p(const sg_src *src, size_t i, int in_seg, float prev1,
                             float prev2) {
    float e = in_seg ? sg_ef_residual(src->e[i], prev1) : src->e[i];
    if (!src->d2) return src->g[i] + e;
    float d = in_seg ? sg_ef_residual(src->d2[i], prev2) : src->d2[i];
    return src->g[i] + (src->a * e - src->b * d);
}

/* Elements [from, to), from a multiple of 8: those below seg_end belong to the segment (|p|
 * into the tree, zeros into *zeros), the rest are gaps (zeros into *gap_zeros). Returns 1 if
 * every p is finite. Padding bits of the last byte are 0. */
static inline int sg_efd_scalar(const sg_ef_io *io, size_t from, size_t to, size_t seg_end,
                                float prev1, float prev2, sg_tree *t, size_t *zeros,
                                size_t *gap_zeros) {
    int bad = 0;
    for (size_t j = from / 8; 8 * j < to; j++) {
        unsigned sb = 0, zb = 0;
        for (size_t i = 8 * j; i < to && i < 8 * j + 8; i++) {
            int in_seg = i < seg_end;
            float p = sg_efd_p(&io->src, i, in_seg, prev1, prev2);
            float a = sg_absf(p);
            unsigned zero = a == 0.0f;
            io->e_out[i] = p;
            bad |= sg_nonfinite(a);
            sb |= (sg_bits_from_f32(p) >> 31) << (i % 8);
            zb |= zero << (i % 8);
            if (in_seg) {
                *zeros += zero;
                sg_tree_push(t, 0, a);
            } else {
                *gap_zeros += zero;
            }
        }
        io->bits[j] = (uint8_t)sb;
        io->zplane[j] = (uint8_t)zb;
    }
    return !bad;
}

/* blocks(io, from, to, prev1, prev2, tree, zeros): the whole 64-element blocks of a segment
 * from its start (the tree's level 1, one sum per block, as sg_efd_scalar's 64 pushes would
 * give); returns where it stopped, or (size_t)-1 on NaN/Inf. */
typedef size_t (*sg_efd_blocks_fn)(const sg_ef_io *io, size_t from, size_t to, float prev1,
                                   float prev2, sg_tree *t, size_t *zeros);

/* src: g and the kept buffers (src.e = p1, src.d2 = p2 or NULL); prev1, prev2 (NULL without
 * p2): their scales, one per segment. */
static inline __attribute__((always_inline)) int
sg_ef_deferred_run(sg_src src, const float *prev1, const float *prev2, float *p_out, size_t n,
                   const int64_t *segs, size_t n_segs, uint8_t *bits, uint8_t *zplane,
                   float *scales, uint64_t *zeros, sg_efd_blocks_fn blocks) {
    sg_ef_io io = {src, p_out, bits, zplane};
    sg_tree tree;
    size_t pos = 0, gap_zeros = 0, unused = 0;
    for (size_t t = 0; t < n_segs; t++) {
        size_t o = (size_t)segs[2 * t], s = (size_t)segs[2 * t + 1], z = 0;
        float s1 = prev1[t], s2 = prev2 ? prev2[t] : 0.0f;
        if (pos < o && !sg_efd_scalar(&io, pos, o, 0, 0.0f, 0.0f, &tree, &unused, &gap_zeros))
            return 0;
        sg_tree_init(&tree);
        size_t i = blocks(&io, o, o + s, s1, s2, &tree, &z);
        if (i == (size_t)-1) return 0;
        size_t end = (o + s + 7) / 8 * 8;
        if (end > n) end = n;
        if (!sg_efd_scalar(&io, i, end, o + s, s1, s2, &tree, &z, &gap_zeros)) return 0;
        float scale = sg_tree_finish(&tree) / (float)(s > z ? s - z : 1);
        if (sg_nonfinite(scale)) return 0;
        uint64_t zz = z;
        scales[t] = scale;
        memcpy(zeros + t, &zz, 8);
        pos = end;
    }
    if (pos < n && !sg_efd_scalar(&io, pos, n, 0, 0.0f, 0.0f, &tree, &unused, &gap_zeros))
        return 0;
    uint64_t gz = gap_zeros;
    memcpy(zeros + n_segs, &gz, 8);
    return 1;
}

#endif /* SG_FUSED_H */
