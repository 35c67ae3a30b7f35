/* Scalar building blocks shared by every ISA: unaligned loads, float16/bfloat16 conversions,
 * the counter-based RNG and per-element versions of the kernels (the portable path, and the
 * tails of the SIMD paths). Header-only and static so each ISA file compiles its own copy. */
#ifndef SG_SCALAR_H
#define SG_SCALAR_H

#include <string.h>

#include "sg_kernels.h"

/* ---- loads and stores through memcpy: buffers need not be aligned ------------------------ */

static inline uint16_t sg_ld16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t sg_ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t sg_ld64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void sg_st16(void *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void sg_st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline float sg_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t sg_bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* 1 and *r = 1 / d when d = 2^k, -126 <= k <= 126 (d and 1 / d both normal, also under
 * DAZ): then x * r rounds the same real number as x / d, so a multiply can stand in for the
 * division (same bits, and it vectorizes without the divider). Else 0. */
static inline int sg_exact_reciprocal(float d, float *r) {
    uint32_t b = sg_bits_from_f32(d), e = b >> 23;
    if ((b & 0x7FFFFFu) != 0 || e < 1 || e > 253) return 0;
    *r = 1.0f / d;
    return 1;
}

/* x[i] /= d for i < n, with the division's bits (the division took half of a sparse decode). */
static inline void sg_divide(float *x, size_t n, float d) {
    float r;
    if (d == 1.0f) return;
    if (sg_exact_reciprocal(d, &r)) {
        for (size_t i = 0; i < n; i++) x[i] *= r;
        return;
    }
    for (size_t i = 0; i < n; i++) x[i] /= d;
}

static inline size_t sg_nbytes(size_t n) { return n / 8 + (n % 8 != 0); }
static inline size_t sg_elem_size(sg_dtype dt) { return dt == SG_F32 ? 4 : 2; }

/* ---- float16 / bfloat16 ------------------------------------------------------------------ */

/* Exact widening. NaN payloads are kept (they only ever feed comparisons). */
static inline float sg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {                     /* zero or subnormal: m * 2^-24 is exact in float */
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    if (e == 0x1F) return sg_f32_from_bits(sign | 0x7F800000u | (m << 13));
    return sg_f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

static inline float sg_bf16_to_f32(uint16_t h) { return sg_f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even, like torch's float -> half cast; NaN -> quiet NaN 0x7E00 | sign. */
static inline uint16_t sg_f32_to_f16(float f) {
    uint32_t u = sg_bits_from_f32(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;
    if (a >= 0x477FF000u) return sign | 0x7C00u;           /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                                 /* normal half (>= 2^-14) */
        uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);          /* RNE on the 13 dropped bits */
        return sign | (uint16_t)((r - 0x38000000u) >> 13);   /* rebias exponent 127 -> 15 */
    }
    /* Subnormal half: round |f| / 2^-24 to an integer (may give 1024 = smallest normal). */
    uint32_t e = a >> 23;
    if (e < 102) return sign;                               /* below 2^-25: rounds to 0 */
    uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - e;   /* 14 .. 24 */
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint16_t)q;
}

/* Round to nearest even, like torch's float -> bfloat16 cast; NaN -> 0x7FC0. */
static inline uint16_t sg_f32_to_bf16(float f) {
    uint32_t u = sg_bits_from_f32(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Element i of x as float32 (exact for all three types). */
static inline float sg_load_value(const void *x, sg_dtype dt, size_t i) {
    const uint8_t *p = (const uint8_t *)x;
    if (dt == SG_F32) return sg_f32_from_bits(sg_ld32(p + 4 * i));
    uint16_t h = sg_ld16(p + 2 * i);
    return dt == SG_F16 ? sg_f16_to_f32(h) : sg_bf16_to_f32(h);
}

/* ---- sparse selection by magnitude --------------------------------------------------------
 * key(v) = bits(v) & 0x7FFFFFFF: for non-NaN v, key(a) < key(b) iff |a| < |b| and key(a) ==
 * key(b) iff |a| == |b| (+0 and -0 share key 0; subnormals order correctly). +-Inf has key
 * 0x7F800000; NaNs have larger keys, so they rank above every number (by payload). */

static inline uint32_t sg_key(float v) { return sg_bits_from_f32(v) & 0x7FFFFFFFu; }

/* One position found by a scan, i with value v: the c-th (val may be NULL). */
static inline void sg_scan_put(size_t i, float v, uint32_t *pos, float *val, size_t cap,
                               size_t c) {
    if (c >= cap) return;
    pos[c] = (uint32_t)i;
    if (val) val[c] = v;
}

static inline size_t sg_scan_ge_scalar(const float *x, size_t from, size_t n, uint32_t lo,
                                       uint32_t *pos, float *val, size_t cap, size_t c) {
    for (size_t i = from; i < n; i++) {
        if (sg_key(x[i]) >= lo) sg_scan_put(i, x[i], pos, val, cap, c++);
    }
    return c;
}

static inline size_t sg_count_ge_scalar(const float *x, size_t from, size_t n, uint32_t lo) {
    size_t c = 0;
    for (size_t i = from; i < n; i++) c += sg_key(x[i]) >= lo;
    return c;
}

/* ---- counter-based RNG --------------------------------------------------------------------
 * Mirrors hvd_signsgd/kernels/_torch.py exactly (all arithmetic modulo 2^32 or 2^64):
 *   key = splitmix64(seed)                        (computed once per call, by the binding)
 *   c   = offset + i                              (the element's absolute counter)
 *   h   = mix32(lo32(c) ^ lo32(key));  h = mix32(h ^ hi32(c) ^ hi32(key));  u = h >> 8
 * mix32 is the "lowbias32" integer hash (constants from C. Wellons' hash prospector).
 * Element i is positive (bit 0) iff  float(u) < 2^23 + x_i * c  in float32 arithmetic (IEEE,
 * no FMA), with c = float32(min(2^23 / norm, FLT_MAX)) (division in double; c = 0 when
 * norm == 0), i.e. with
 * probability min(1, max(0, 1/2 + x_i / (2 norm))) up to ~2^-23: float32 is ample here and
 * twice as fast as double. */

static inline uint64_t sg_splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint32_t sg_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

static inline uint32_t sg_uniform24(uint64_t key, uint64_t counter) {
    uint32_t h = sg_mix32((uint32_t)counter ^ (uint32_t)key);
    h = sg_mix32(h ^ (uint32_t)(counter >> 32) ^ (uint32_t)(key >> 32));
    return h >> 8;
}

/* 1 (negative) unless u falls below the threshold; NaN thresholds give 1. */
static inline unsigned sg_stochastic_bit(float v, float c, uint32_t u) {
    float t = 8388608.0f + v * c;
    return !((float)u < t);
}

/* ---- per-element kernels; `from` is a multiple of 8 ---------------------------------------- */

static inline void sg_pack_scalar(const void *x, sg_dtype dt, size_t from, size_t n,
                                  uint8_t *out) {
    const uint8_t *p = (const uint8_t *)x;
    for (size_t j = from / 8; j < sg_nbytes(n); j++) {
        unsigned byte = 0;
        for (size_t i = 8 * j; i < n && i < 8 * j + 8; i++) {
            unsigned s = dt == SG_F32 ? sg_ld32(p + 4 * i) >> 31 : sg_ld16(p + 2 * i) >> 15u;
            byte |= s << (i % 8);
        }
        out[j] = (uint8_t)byte;
    }
}

static inline void sg_pack_stochastic_scalar(const void *x, sg_dtype dt, size_t from, size_t n,
                                             float c, uint64_t key, uint64_t offset,
                                             uint8_t *out) {
    for (size_t j = from / 8; j < sg_nbytes(n); j++) {
        unsigned byte = 0;
        for (size_t i = 8 * j; i < n && i < 8 * j + 8; i++) {
            unsigned s = sg_stochastic_bit(sg_load_value(x, dt, i), c,
                                           sg_uniform24(key, offset + i));
            byte |= s << (i % 8);
        }
        out[j] = (uint8_t)byte;
    }
}

/* Number of elements of x[from .. n) equal to +0 or -0 (all bits but the sign clear). */
static inline size_t sg_count_zeros_scalar(const void *x, sg_dtype dt, size_t from, size_t n) {
    const uint8_t *p = (const uint8_t *)x;
    size_t count = 0;
    if (dt == SG_F32) {
        for (size_t i = from; i < n; i++) count += (sg_ld32(p + 4 * i) & 0x7FFFFFFFu) == 0;
    } else {
        for (size_t i = from; i < n; i++) count += (sg_ld16(p + 2 * i) & 0x7FFFu) == 0;
    }
    return count;
}

/* add_finite and scan_ge for i in [from, n), the c positions found before included: out[i]
 * = a[i] + b[i], positions with key >= lo to pos/val (cap as scan_ge's). Returns the new
 * count; *worst rises to the largest key seen (>= 0x7F800000: NaN/Inf). */
static inline size_t sg_add_scan_ge_scalar(const float *a, const float *b, float *out,
                                           size_t from, size_t n, uint32_t lo, uint32_t *pos,
                                           float *val, size_t cap, size_t c, uint32_t *worst) {
    for (size_t i = from; i < n; i++) {
        float s = a[i] + b[i];
        uint32_t k = sg_key(s);
        out[i] = s;
        *worst = k > *worst ? k : *worst;
        if (k >= lo) sg_scan_put(i, s, pos, val, cap, c++);
    }
    return c;
}

/* out[i] = a[i] + b[i] for i in [from, n); returns 1 if every sum is finite (the scan above
 * with a bound no key reaches). */
static inline int sg_add_finite_scalar(const float *a, const float *b, float *out, size_t from,
                                       size_t n) {
    uint32_t worst = 0;
    sg_add_scan_ge_scalar(a, b, out, from, n, 0x80000000u, NULL, NULL, 0, 0, &worst);
    return worst < 0x7F800000u;
}

static inline void sg_unpack_scalar(const uint8_t *bits, size_t from, size_t n,
                                    uint32_t value_bits, sg_dtype dt, void *out) {
    uint8_t *o = (uint8_t *)out;
    for (size_t i = from; i < n; i++) {
        uint32_t bit = (bits[i / 8] >> (i % 8)) & 1u;
        if (dt == SG_F32)
            sg_st32(o + 4 * i, value_bits ^ (bit << 31));
        else
            sg_st16(o + 2 * i, (uint16_t)(value_bits ^ (bit << 15)));
    }
}

#endif /* SG_SCALAR_H */
