/* Portable C kernels: the reference path, used on any CPU (arm64 included) and forced with
 * HVD_SIGNSGD_NATIVE_ISA=portable. Written so that compilers can vectorize the full-byte
 * loops; endianness-independent (bytes are only combined arithmetically). */
#include "sg_fused.h"
#include "sg_momentum.h"
#include "sg_vote.h"

static void pack_portable(const void *x, sg_dtype dt, size_t n, uint8_t *out) {
    const uint8_t *p = (const uint8_t *)x;
    size_t full = n / 8;
    if (dt == SG_F32) {
        for (size_t j = 0; j < full; j++) {
            unsigned byte = 0;
            for (unsigned i = 0; i < 8; i++) byte |= (sg_ld32(p + 32 * j + 4 * i) >> 31) << i;
            out[j] = (uint8_t)byte;
        }
    } else {
        for (size_t j = 0; j < full; j++) {
            unsigned byte = 0;
            for (unsigned i = 0; i < 8; i++)
                byte |= (unsigned)(sg_ld16(p + 16 * j + 2 * i) >> 15) << i;
            out[j] = (uint8_t)byte;
        }
    }
    sg_pack_scalar(x, dt, 8 * full, n, out);
}

static void pack_stochastic_portable(const void *x, sg_dtype dt, size_t n, float c,
                                     uint64_t key, uint64_t offset, uint8_t *out) {
    sg_pack_stochastic_scalar(x, dt, 0, n, c, key, offset, out);
}

static void unpack_portable(const uint8_t *bits, size_t n, uint32_t value_bits, sg_dtype dt,
                            void *out) {
    sg_unpack_scalar(bits, 0, n, value_bits, dt, out);
}

static void to_counts_portable(const sg_counter *c, size_t ne, uint32_t *counts,
                               int accumulate) {
    sg_to_counts_scalar(c, 0, ne, counts, accumulate);
}

static void emit_portable(const sg_counter *c, size_t ne, size_t n_ranks, int mode,
                          float *out) {
    sg_emit_scalar(c, 0, ne, n_ranks, mode, out);
}

static void vote_count_portable(const sg_rows *rows, size_t n, int mode, float *out) {
    sg_vote_count_blocks(rows, n, mode, out, NULL, emit_portable, to_counts_portable);
}

static void add_signed_portable(const uint8_t *bits, const uint8_t *zbits, size_t ne, float w,
                                float *acc) {
    sg_add_signed_scalar(bits, zbits, 0, ne, w, acc);
}

static void vote_weighted_portable(const sg_rows *rows, const sg_rows *zeros, size_t n,
                                   const float *w, int majority, float *out) {
    sg_vote_weighted_blocks(rows, zeros, n, w, majority, out, add_signed_portable);
}

static size_t scan_ge_portable(const float *x, size_t n, uint32_t lo, uint32_t *pos,
                               float *val, size_t cap) {
    return sg_scan_ge_scalar(x, 0, n, lo, pos, val, cap, 0);
}

static size_t count_ge_portable(const float *x, size_t n, uint32_t lo) {
    return sg_count_ge_scalar(x, 0, n, lo);
}

static size_t count_zeros_portable(const void *x, sg_dtype dt, size_t n) {
    return sg_count_zeros_scalar(x, dt, 0, n);
}

/* 64 elements at a time into the tree's first level (see sg_fused.h), the rest one by one.
 * ecx: p = g + (a*e - b*d2), else p = g + e (a constant after inlining). */
static inline __attribute__((always_inline)) int
pass1_portable_body(const sg_src *src, size_t from, size_t to, sg_tree *t, size_t *zeros,
                    int ecx) {
    const float *g = src->g, *e = src->e, *d2 = src->d2;
    const float a = src->a, b = src->b;
    size_t i = from, z = 0;
    uint32_t worst = 0;
    float v[SG_TREE_FAN];
    for (; i + SG_TREE_FAN <= to; i += SG_TREE_FAN) {
        for (unsigned k = 0; k < SG_TREE_FAN; k++) {
            float p = ecx ? g[i + k] + (a * e[i + k] - b * d2[i + k]) : g[i + k] + e[i + k];
            uint32_t bp = sg_bits_from_f32(p) & 0x7FFFFFFFu;
            worst = bp > worst ? bp : worst;
            z += bp == 0;
            v[k] = sg_f32_from_bits(bp);
        }
        sg_tree_push(t, 1, sg_sum64(v));
    }
    *zeros += z;
    return worst < 0x7F800000u && sg_ef_pass1_scalar(src, i, to, t, zeros);
}

static int ef_pass1_portable(const sg_src *src, size_t from, size_t to, sg_tree *t,
                             size_t *zeros) {
    return pass1_portable_body(src, from, to, t, zeros, 0);
}

static int ecx_pass1_portable(const sg_src *src, size_t from, size_t to, sg_tree *t,
                              size_t *zeros) {
    return pass1_portable_body(src, from, to, t, zeros, 1);
}

static void ef_pass2_portable(const sg_ef_io *io, size_t from, size_t to, float scale) {
    size_t unused = 0;
    sg_ef_pass2_mode(io, from, to, to, scale, &unused, 0);
}

static void ecx_pass2_portable(const sg_ef_io *io, size_t from, size_t to, float scale) {
    size_t unused = 0;
    sg_ef_pass2_mode(io, from, to, to, scale, &unused, 1);
}

static int ef_sign_portable(const float *g, const float *e, float *e_out, size_t n,
                            const int64_t *segs, size_t n_segs, uint8_t *bits, uint8_t *zplane,
                            float *scales, uint64_t *zeros) {
    sg_src src = {g, e, NULL, 0.0f, 0.0f};
    return sg_ef_sign_run(src, e_out, n, segs, n_segs, bits, zplane, scales, zeros,
                          ef_pass1_portable, ef_pass2_portable);
}

static int ecx_sign_portable(const float *u, const float *d1, const float *d2, float a, float b,
                             float *d_out, size_t n, const int64_t *segs, size_t n_segs,
                             uint8_t *bits, uint8_t *zplane, float *scales, uint64_t *zeros) {
    sg_src src = {u, d1, d2, a, b};
    return sg_ef_sign_run(src, d_out, n, segs, n_segs, bits, zplane, scales, zeros,
                          ecx_pass1_portable, ecx_pass2_portable);
}

/* ef_sign_deferred, ecx_sign_deferred (sg_fused.h): every element by the scalar loop. */
static size_t efd_blocks_portable(const sg_ef_io *io, size_t from, size_t to, float prev1,
                                  float prev2, sg_tree *t, size_t *zeros) {
    (void)io, (void)to, (void)prev1, (void)prev2, (void)t, (void)zeros;
    return from;
}

static int ef_sign_deferred_portable(const float *g, const float *p_prev,
                                     const float *prev_scales, float *p_out, size_t n,
                                     const int64_t *segs, size_t n_segs, uint8_t *bits,
                                     uint8_t *zplane, float *scales, uint64_t *zeros) {
    sg_src src = {g, p_prev, NULL, 0.0f, 0.0f};
    return sg_ef_deferred_run(src, prev_scales, NULL, p_out, n, segs, n_segs, bits, zplane,
                              scales, zeros, efd_blocks_portable);
}

static int ecx_sign_deferred_portable(const float *u, const float *p1, const float *prev1,
                                      const float *p2, const float *prev2, float a, float b,
                                      float *p_out, size_t n, const int64_t *segs,
                                      size_t n_segs, uint8_t *bits, uint8_t *zplane,
                                      float *scales, uint64_t *zeros) {
    sg_src src = {u, p1, p2, a, b};
    return sg_ef_deferred_run(src, prev1, prev2, p_out, n, segs, n_segs, bits, zplane, scales,
                              zeros, efd_blocks_portable);
}

/* Fused momentum (sg_momentum.h): the scalar loops themselves. */
static int momentum_sign_portable(const float *g, const float *m, float *m_out, size_t n,
                                  float a, float b, uint8_t *bits, uint8_t *zplane,
                                  size_t *zeros) {
    *zeros = 0;
    return sg_momentum_sign_scalar(g, m, m_out, 0, n, a, b, bits, zplane, zeros);
}

static int momentum_absmax_portable(const float *g, const float *m, float *m_out, size_t n,
                                    float a, float b, float *absmax, size_t *zeros) {
    uint32_t worst = 0;
    *zeros = 0;
    sg_momentum_absmax_scalar(g, m, m_out, 0, n, a, b, &worst, zeros);
    *absmax = sg_f32_from_bits(worst);
    return worst < 0x7F800000u;
}

static int add_scan_ge_portable(const float *a, const float *b, float *out, size_t n,
                                uint32_t lo, uint32_t *pos, float *val, size_t cap,
                                size_t *found) {
    uint32_t worst = 0;
    *found = sg_add_scan_ge_scalar(a, b, out, 0, n, lo, pos, val, cap, 0, &worst);
    return worst < 0x7F800000u;
}

static int add_finite_portable(const float *a, const float *b, float *out, size_t n) {
    return sg_add_finite_scalar(a, b, out, 0, n);
}

static int sign_scan_portable(const float *x, size_t n, uint8_t *bits, uint8_t *zplane,
                              size_t *zeros) {
    *zeros = 0;
    return sg_sign_scan_scalar(x, 0, n, bits, zplane, zeros);
}

const sg_kernels sg_kernels_portable = {
    "portable",          pack_portable,          pack_stochastic_portable, unpack_portable,
    vote_count_portable, vote_weighted_portable, scan_ge_portable,         count_ge_portable,
    count_zeros_portable, ef_sign_portable,
    momentum_sign_portable, momentum_absmax_portable,
    ecx_sign_portable, add_finite_portable, sign_scan_portable, ef_sign_deferred_portable,
    ecx_sign_deferred_portable, add_scan_ge_portable,
};
