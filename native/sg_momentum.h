/* Fused momentum kernels for Signum and SSDM, and signSGD's sign scan (momentum_sign's pass
 * on x itself): the scalar building blocks shared by every ISA (header-only, compiled once
 * per ISA file).
 *
 * The update, for float32 coefficients a = float32(beta) and b = float32(1 - beta) (1 - beta
 * taken in double, then rounded):
 *     m_out_i = (a * m_i) + (b * g_i)
 * two rounded float32 products and one rounded float32 sum, no FMA (the build uses
 * -ffp-contract=off and the AVX2 target has no FMA). torch's add_(g, alpha=) rounds
 * differently in its vector body (FMA) and its scalar tail, so the torch fallback and the
 * methods' unfused path compute torch.mul(m, beta) + torch.mul(g, 1 - beta) instead: the same
 * three roundings (hvd_signsgd/kernels/_torch.py: momentum_update).
 *
 * momentum_sign: one pass writes m_out, the sign bits of m_out (pack_signs layout), the bitplane
 *   of m_out == +-0 and counts those zeros.
 * momentum_absmax: one pass writes m_out, max |m_out_i| (as the largest magnitude bit pattern)
 *   and counts the zeros.
 * Both return 0 when any m_out_i is NaN or Inf (which covers every NaN/Inf in g and m); the
 * outputs are then unspecified and g and m are only read. */
#ifndef SG_MOMENTUM_H
#define SG_MOMENTUM_H

#include "sg_scalar.h"

static inline float sg_momentum(float m, float g, float a, float b) {
    float x = a * m, y = b * g;
    return x + y;
}

/* signSGD's encode: the sign bits, zero plane (whole bytes, padding bits 0) and zero count
 * of x[from, to), from a multiple of 8; returns 1 if every x is finite. */
static inline int sg_sign_scan_scalar(const float *x, size_t from, size_t to, uint8_t *bits,
                                      uint8_t *zplane, size_t *zeros) {
    uint32_t worst = 0;
    size_t z = 0;
    for (size_t j = from / 8; 8 * j < to; j++) {
        unsigned sb = 0, zb = 0;
        for (size_t i = 8 * j; i < to && i < 8 * j + 8; i++) {
            uint32_t vb = sg_bits_from_f32(x[i]), mag = vb & 0x7FFFFFFFu;
            worst = mag > worst ? mag : worst;
            sb |= (unsigned)(vb >> 31) << (i % 8);
            zb |= (unsigned)(mag == 0) << (i % 8);
            z += mag == 0;
        }
        bits[j] = (uint8_t)sb;
        zplane[j] = (uint8_t)zb;
    }
    *zeros += z;
    return worst < 0x7F800000u;
}

/* [from, to), from a multiple of 8: m_out, then its bits / zplane / zeros byte by byte (the
 * eight values are still in L1); returns 1 if every m_out is finite. */
static inline int sg_momentum_sign_scalar(const float *g, const float *m, float *m_out,
                                          size_t from, size_t to, float a, float b,
                                          uint8_t *bits, uint8_t *zplane, size_t *zeros) {
    int ok = 1;
    for (size_t i0 = from; i0 < to; i0 += 8) {
        size_t end = to - i0 < 8 ? to : i0 + 8;
        for (size_t i = i0; i < end; i++) m_out[i] = sg_momentum(m[i], g[i], a, b);
        ok &= sg_sign_scan_scalar(m_out, i0, end, bits, zplane, zeros);
    }
    return ok;
}

/* [from, to): m_out, the largest magnitude bits into *worst, zeros counted. */
static inline void sg_momentum_absmax_scalar(const float *g, const float *m, float *m_out,
                                             size_t from, size_t to, float a, float b,
                                             uint32_t *worst, size_t *zeros) {
    uint32_t w = *worst;
    size_t z = 0;
    for (size_t i = from; i < to; i++) {
        float v = sg_momentum(m[i], g[i], a, b);
        uint32_t mag = sg_bits_from_f32(v) & 0x7FFFFFFFu;
        m_out[i] = v;
        w = mag > w ? mag : w;
        z += mag == 0;
    }
    *worst = w;
    *zeros += z;
}

#endif /* SG_MOMENTUM_H */
