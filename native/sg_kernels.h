/* Kernel interface shared by the Python binding (module.c) and the per-ISA kernel files.
 *
 * Bit layout (the contract of hvd_signsgd.kernels): element 8j+i of a vector is bit i of byte j
 * (LSB first); a set bit means "negative" (the IEEE sign bit); padding bits of the last byte
 * are zero. Each kernel exists once per ISA (kernels_portable.c, kernels_avx2.c); the binding
 * calls them through the table selected at import (sg_active()).
 */
#ifndef SG_KERNELS_H
#define SG_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Element types. bfloat16 has no buffer-protocol format; it travels as 16-bit integers. */
typedef enum { SG_F32 = 0, SG_F16 = 1, SG_BF16 = 2 } sg_dtype;

/* What an unweighted vote writes per element (vote_count's mode). */
enum { SG_VOTE_SUM = 0, SG_VOTE_MAJORITY = 1, SG_VOTE_MEAN = 2 };

/* The packed vectors of all ranks: row m starts at base + m * stride (any stride, even 0). */
typedef struct {
    const uint8_t *base;
    ptrdiff_t stride;
    size_t n_ranks;
} sg_rows;

typedef struct {
    const char *name;
    /* out[0 .. ceil(n/8)) <- sign bits of x[0 .. n) */
    void (*pack)(const void *x, sg_dtype dt, size_t n, uint8_t *out);
    /* Stochastic signs; c = float32(2^23 / norm), key = splitmix64(seed) (see sg_scalar.h). */
    void (*pack_stochastic)(const void *x, sg_dtype dt, size_t n, float c, uint64_t key,
                            uint64_t offset, uint8_t *out);
    /* out[i] <- value with its sign bit flipped where bit i is set. value_bits is the
     * bit pattern of +scale in dt (16 significant bits for float16/bfloat16). */
    void (*unpack)(const uint8_t *bits, size_t n, uint32_t value_bits, sg_dtype dt, void *out);
    /* Unweighted vote: out[i] <- s = n_ranks - 2 * (number of set bits), its sign, or
     * float32(s) / float32(n_ranks) (mode: SG_VOTE_SUM, _MAJORITY, _MEAN). */
    void (*vote_count)(const sg_rows *rows, size_t n, int mode, float *out);
    /* Weighted vote: out[i] <- ((0 + s_0 w_0) + s_1 w_1) + ... in float32, or its sign; a
     * term is +0.0 where the rank's zero plane (zeros: rows as in `rows`; NULL: none) marks
     * the element. */
    void (*vote_weighted)(const sg_rows *rows, const sg_rows *zeros, size_t n, const float *w,
                          int majority, float *out);
    /* Sparse selection by magnitude; key(v) = bits(v) & 0x7FFFFFFF (sg_key), lo <= 2^31-1.
     * scan_ge: the positions i < n (n < 2^32) with key(x[i]) >= lo, ascending; writes the
     * first cap of them to pos (and their values x[i] to val, unless NULL) and returns how
     * many there are (possibly more than cap). */
    size_t (*scan_ge)(const float *x, size_t n, uint32_t lo, uint32_t *pos, float *val,
                      size_t cap);
    /* count_ge: the number of positions i < n with key(x[i]) >= lo. */
    size_t (*count_ge)(const float *x, size_t n, uint32_t lo);
    /* Number of elements of x[0 .. n) that are +0 or -0. */
    size_t (*count_zeros)(const void *x, sg_dtype dt, size_t n);
    /* Fused error-feedback scaled sign over p = g + e (sg_fused.h): e_out, the sign bits, the
     * zero plane, one scale per segment and the zero counts; 0 if anything is NaN/Inf. */
    int (*ef_sign)(const float *g, const float *e, float *e_out, size_t n, const int64_t *segs,
                   size_t n_segs, uint8_t *bits, uint8_t *zplane, float *scales,
                   uint64_t *zeros);
    /* Fused momentum (sg_momentum.h), m_out = (a * m) + (b * g) rounded per operation:
     * momentum_sign writes m_out, its sign bits and zero plane (ceil(n/8) bytes each) and the
     * +-0 count into *zeros; momentum_absmax writes m_out, max |m_out| into *absmax and the
     * +-0 count. Both return 0 if any m_out is NaN/Inf (outputs then unspecified). */
    int (*momentum_sign)(const float *g, const float *m, float *m_out, size_t n, float a,
                         float b, uint8_t *bits, uint8_t *zplane, size_t *zeros);
    int (*momentum_absmax)(const float *g, const float *m, float *m_out, size_t n, float a,
                           float b, float *absmax, size_t *zeros);
    /* 12: fused ErrorCompensatedX scaled sign over p = u + (a*d1 - b*d2) (sg_fused.h),
     * outputs as ef_sign's, d_out the new delta; 0 if anything is NaN/Inf. */
    int (*ecx_sign)(const float *u, const float *d1, const float *d2, float a, float b,
                    float *d_out, size_t n, const int64_t *segs, size_t n_segs, uint8_t *bits,
                    uint8_t *zplane, float *scales, uint64_t *zeros);
    /* 13: out = a + b (rounded float32 sums), the error-feedback compensation of the sparse
     * compressors written out of place; 0 if any sum is NaN/Inf (out then fully written). */
    int (*add_finite)(const float *a, const float *b, float *out, size_t n);
    /* 14: signSGD's encode in one pass (sg_momentum.h): the sign bits and zero plane of x
     * (ceil(n/8) bytes each) and the +-0 count into *zeros; 0 if any x is NaN/Inf. */
    int (*sign_scan)(const float *x, size_t n, uint8_t *bits, uint8_t *zplane, size_t *zeros);
    /* 15: ef_sign with the memory kept as the last p and its scales (sg_fused.h): one pass,
     * p_out <- p = g + residual(p_prev); the other outputs as ef_sign's. */
    int (*ef_sign_deferred)(const float *g, const float *p_prev, const float *prev_scales,
                            float *p_out, size_t n, const int64_t *segs, size_t n_segs,
                            uint8_t *bits, uint8_t *zplane, float *scales, uint64_t *zeros);
    /* 16: ecx_sign with both memories kept as earlier p's and their scales (sg_fused.h): one
     * pass, p_out <- p = u + (a*residual(p1) - b*residual(p2)); the other outputs as ecx_sign's. */
    int (*ecx_sign_deferred)(const float *u, const float *p1, const float *prev1,
                             const float *p2, const float *prev2, float a, float b,
                             float *p_out, size_t n, const int64_t *segs, size_t n_segs,
                             uint8_t *bits, uint8_t *zplane, float *scales, uint64_t *zeros);
    /* 17: add_finite and scan_ge in one pass, Top-k's compensation and candidate scan:
     * out = a + b (fully written), and the positions i < n with key(out[i]) >= lo into pos
     * and val as scan_ge's, their number into *found; 0 if any sum is NaN/Inf (pos, val and
     * *found then unspecified). */
    int (*add_scan_ge)(const float *a, const float *b, float *out, size_t n, uint32_t lo,
                       uint32_t *pos, float *val, size_t cap, size_t *found);
} sg_kernels;

extern const sg_kernels sg_kernels_portable;

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SG_HAVE_AVX2 1
extern const sg_kernels sg_kernels_avx2;
#else
#define SG_HAVE_AVX2 0
#endif

#endif /* SG_KERNELS_H */
