/* AVX2 (+F16C) kernels for x86-64. The whole file is compiled for AVX2 via a target pragma,
 * so the shared header code (vote counters, tails) is vectorized too; nothing here runs
 * unless the CPU check in module.c selected this table. Results are bit-identical to
 * kernels_portable.c: same integer ops, same IEEE float ops in the same order. */
#include "sg_kernels.h"

#if SG_HAVE_AVX2

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,f16c")
#endif

#include <immintrin.h>

#include "sg_fused.h"
#include "sg_momentum.h"
#include "sg_vote.h"

#define SG_PREFETCH_ELEMS 512 /* how far ahead the streaming loops fetch their input */

/* ---- pack: movemask collects the sign bits -------------------------------------------- */

static void pack_f32_avx2(const uint8_t *p, size_t n, uint8_t *out) {
    size_t blocks = n / 64;
    for (size_t b = 0; b < blocks; b++) {
        const float *f = (const float *)(const void *)(p + 256 * b);
        uint64_t word = 0;
        for (unsigned q = 0; q < 8; q++)
            word |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_loadu_ps(f + 8 * q)) << (8 * q);
        memcpy(out + 8 * b, &word, 8);
    }
    sg_pack_scalar(p, SG_F32, 64 * blocks, n, out);
}

/* 16-bit elements: a signed saturating pack to bytes keeps each sign; packs interleaves the
 * 128-bit lanes, the permute puts the 32 bytes back in element order. */
static void pack_16_avx2(const uint8_t *p, sg_dtype dt, size_t n, uint8_t *out) {
    size_t blocks = n / 32;
    for (size_t b = 0; b < blocks; b++) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(const void *)(p + 64 * b));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(const void *)(p + 64 * b + 32));
        __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8);
        sg_st32(out + 4 * b, (uint32_t)_mm256_movemask_epi8(bytes));
    }
    sg_pack_scalar(p, dt, 32 * blocks, n, out);
}

static void pack_avx2(const void *x, sg_dtype dt, size_t n, uint8_t *out) {
    if (dt == SG_F32)
        pack_f32_avx2((const uint8_t *)x, n, out);
    else
        pack_16_avx2((const uint8_t *)x, dt, n, out);
}

/* ---- stochastic pack: 8 hashes per vector, thresholds in float32 as in sg_scalar.h ----- */

static inline __m256i mix32_avx2(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

static inline __m256 load8_f32(const uint8_t *p, sg_dtype dt, size_t i) {
    if (dt == SG_F32) return _mm256_loadu_ps((const float *)(const void *)(p + 4 * i));
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(p + 2 * i));
    if (dt == SG_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The 8 bits of the elements whose counters' low words are lo (hi: their high word ^ the
 * key's). */
static inline unsigned stochastic_byte_avx2(__m256 v, __m256i lo, __m256i k0, __m256i hi,
                                            __m256 cv) {
    __m256i h = mix32_avx2(_mm256_xor_si256(lo, k0));
    __m256i u = _mm256_srli_epi32(mix32_avx2(_mm256_xor_si256(h, hi)), 8);
    __m256 t = _mm256_add_ps(_mm256_set1_ps(8388608.0f), _mm256_mul_ps(v, cv));
    /* negative unless u < t; a NaN t gives 1, as sg_stochastic_bit */
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_cvtepi32_ps(u), t, _CMP_NLT_UQ));
}

static void pack_stochastic_avx2(const void *x, sg_dtype dt, size_t n, float c, uint64_t key,
                                 uint64_t offset, uint8_t *out) {
    const uint8_t *p = (const uint8_t *)x;
    const __m256i k0 = _mm256_set1_epi32((int)(uint32_t)key);
    const __m256i step = _mm256_set1_epi32(8);
    const __m256 cv = _mm256_set1_ps(c);
    /* 32 elements per step: four independent hash chains keep the multipliers busy */
    size_t full = n / 32;
    for (size_t j = 0; j < full; j++) {
        uint64_t c0 = offset + 32 * j;
        if ((uint32_t)c0 > 0xFFFFFFE0u) {   /* the low word wraps inside this block: rare */
            sg_pack_stochastic_scalar(x, dt, 32 * j, 32 * j + 32, c, key, offset, out);
            continue;
        }
        /* compute-bound and too long for the out-of-order window to keep enough misses in
         * flight, so fetch ahead explicitly (prefetches past the end are harmless) */
        const char *ahead = (const char *)p + (32 * j + SG_PREFETCH_ELEMS) * sg_elem_size(dt);
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        __m256i hi = _mm256_set1_epi32((int)((uint32_t)(c0 >> 32) ^ (uint32_t)(key >> 32)));
        __m256i lo = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)c0),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (unsigned q = 0; q < 4; q++, lo = _mm256_add_epi32(lo, step))
            out[4 * j + q] = (uint8_t)stochastic_byte_avx2(load8_f32(p, dt, 32 * j + 8 * q),
                                                           lo, k0, hi, cv);
    }
    sg_pack_stochastic_scalar(x, dt, 32 * full, n, c, key, offset, out);
}

/* ---- unpack: move each bit to the sign position and flip the value's sign ------------- */

static void unpack_f32_avx2(const uint8_t *bits, size_t n, uint32_t value_bits, uint8_t *out) {
    const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256i value = _mm256_set1_epi32((int)value_bits);
    size_t full = n / 8;
    for (size_t j = 0; j < full; j++) {
        __m256i s = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(bits[j]), to_sign), sign);
        _mm256_storeu_si256((__m256i *)(void *)(out + 32 * j), _mm256_xor_si256(value, s));
    }
    sg_unpack_scalar(bits, 8 * full, n, value_bits, SG_F32, out);
}

/* No 16-bit variable shift in AVX2: test each bit against a one-hot lane mask instead. */
static void unpack_16_avx2(const uint8_t *bits, size_t n, uint32_t value_bits, sg_dtype dt,
                           uint8_t *out) {
    const __m256i onehot = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                             4096, 8192, 16384, (short)0x8000);
    const __m256i sign = _mm256_set1_epi16((short)0x8000);
    const __m256i value = _mm256_set1_epi16((short)value_bits);
    size_t full = n / 16;
    for (size_t j = 0; j < full; j++) {
        __m256i b = _mm256_set1_epi16((short)sg_ld16(bits + 2 * j));
        __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(b, onehot), onehot);
        _mm256_storeu_si256((__m256i *)(void *)(out + 32 * j),
                            _mm256_xor_si256(value, _mm256_and_si256(set, sign)));
    }
    sg_unpack_scalar(bits, 16 * full, n, value_bits, dt, out);
}

static void unpack_avx2(const uint8_t *bits, size_t n, uint32_t value_bits, sg_dtype dt,
                        void *out) {
    if (dt == SG_F32)
        unpack_f32_avx2(bits, n, value_bits, (uint8_t *)out);
    else
        unpack_16_avx2(bits, n, value_bits, dt, (uint8_t *)out);
}

/* ---- vote ---------------------------------------------------------------------------- */

/* Counts of the 32 elements 32q .. 32q+31, one byte each: every plane's 4 bytes are spread
 * to 32 bytes (0xFF where the bit is set) and contribute 1 << k. */
static inline __m256i byte_counts32(const sg_counter *c, size_t q) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i onehot = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < c->depth; k++) {
        uint32_t word = sg_ld32((const uint8_t *)c->plane[k] + 4 * q);
        __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)word), spread);
        v = _mm256_cmpeq_epi8(_mm256_and_si256(v, onehot), onehot);
        acc = _mm256_or_si256(acc, _mm256_and_si256(v, _mm256_set1_epi8((char)(1u << k))));
    }
    return acc;
}

/* Bytes 8t .. 8t+7 of v, zero- or sign-extended to 8 x int32. */
static inline __m256i widen_u8(__m256i v, int t) {
    __m128i half = t < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
    return _mm256_cvtepu8_epi32(t % 2 ? _mm_srli_si128(half, 8) : half);
}

static inline __m256i widen_i8(__m256i v, int t) {
    __m128i half = t < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
    return _mm256_cvtepi8_epi32(t % 2 ? _mm_srli_si128(half, 8) : half);
}

static void to_counts_avx2(const sg_counter *c, size_t ne, uint32_t *counts, int accumulate) {
    size_t chunks = ne / 32;
    for (size_t q = 0; q < chunks; q++) {
        __m256i bytes = byte_counts32(c, q);
        for (int t = 0; t < 4; t++) {
            __m256i *dst = (__m256i *)(void *)(counts + 32 * q + 8 * t);
            __m256i v = widen_u8(bytes, t);
            if (accumulate) v = _mm256_add_epi32(v, _mm256_loadu_si256(dst));
            _mm256_storeu_si256(dst, v);
        }
    }
    sg_to_counts_scalar(c, 32 * chunks, ne, counts, accumulate);
}

/* stream: a non-temporal store (dst 32-byte aligned; the caller fences), for outputs far
 * larger than the cache that are not read again soon. */
static inline __attribute__((always_inline)) void store8(float *dst, __m256 v, int stream) {
    if (stream)
        _mm256_stream_ps(dst, v);
    else
        _mm256_storeu_ps(dst, v);
}

/* Votes straight from the byte counts (n_ranks <= 255). Majority stays in bytes:
 * +1 where count <= (R-1)/2, -1 where count >= R/2 + 1, else 0 (a tie). */
static inline __attribute__((always_inline)) void
emit_body(const sg_counter *c, size_t ne, size_t n_ranks, int mode, float *out, int stream) {
    const __m256i plus_max = _mm256_set1_epi8((char)((n_ranks - 1) / 2));
    const __m256i minus_min = _mm256_set1_epi8((char)(n_ranks / 2 + 1));
    const __m256i ranks = _mm256_set1_epi32((int)n_ranks);
    const __m256 divisor = _mm256_set1_ps((float)n_ranks);
    size_t chunks = ne / 32;
    for (size_t q = 0; q < chunks; q++) {
        __m256i bytes = byte_counts32(c, q);
        if (mode == SG_VOTE_MAJORITY) {
            __m256i plus = _mm256_cmpeq_epi8(_mm256_max_epu8(bytes, plus_max), plus_max);
            __m256i minus = _mm256_cmpeq_epi8(_mm256_max_epu8(bytes, minus_min), bytes);
            __m256i votes = _mm256_sub_epi8(minus, plus);   /* masks are -1: plus - minus */
            for (int t = 0; t < 4; t++)
                store8(out + 32 * q + 8 * t, _mm256_cvtepi32_ps(widen_i8(votes, t)), stream);
        } else {
            for (int t = 0; t < 4; t++) {
                __m256i d = _mm256_sub_epi32(ranks, _mm256_slli_epi32(widen_u8(bytes, t), 1));
                __m256 s = _mm256_cvtepi32_ps(d);
                if (mode == SG_VOTE_MEAN) s = _mm256_div_ps(s, divisor);
                store8(out + 32 * q + 8 * t, s, stream);
            }
        }
    }
    sg_emit_scalar(c, 32 * chunks, ne, n_ranks, mode, out);
}

static void emit_avx2(const sg_counter *c, size_t ne, size_t n_ranks, int mode, float *out) {
    emit_body(c, ne, n_ranks, mode, out, 0);
}

/* The vote (a whole bucket) is read only once every bucket is done, long out of cache:
 * streamed, without reading each line in first, when out is 32-byte aligned (every block's
 * out then is: blocks are whole vectors). */
static void emit_stream_avx2(const sg_counter *c, size_t ne, size_t n_ranks, int mode,
                             float *out) {
    emit_body(c, ne, n_ranks, mode, out, 1);
}

/* Counts one full block, 256 elements (a vector per row) at a time, with the planes in
 * registers: for each pair of ranks a full adder into plane 0, then the carry ripples up.
 * `depth` is a constant once inlined (see count_block_avx2), so p[] stays in registers. */
static inline __attribute__((always_inline)) void
count_block_depth(const sg_rows *rows, size_t byte0, sg_counter *c, int depth) {
    const ptrdiff_t stride = rows->stride;
    c->depth = depth;
    for (size_t v = 0; v < SG_BLOCK_BYTES / 32; v++) {
        __m256i p[8];
        for (int k = 0; k < depth; k++) p[k] = _mm256_setzero_si256();
        const uint8_t *row = sg_row(rows, 0, byte0 + 32 * v);
        size_t m = 0;
        for (; m < rows->n_ranks; m += 2, row += 2 * stride) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)row), carry;
            _mm_prefetch((const char *)row + SG_BLOCK_BYTES, _MM_HINT_T0);
            if (m + 1 < rows->n_ranks) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(row + stride));
                __m256i u = _mm256_xor_si256(p[0], a);
                _mm_prefetch((const char *)row + stride + SG_BLOCK_BYTES, _MM_HINT_T0);
                carry = _mm256_or_si256(_mm256_and_si256(p[0], a), _mm256_and_si256(u, b));
                p[0] = _mm256_xor_si256(u, b);
            } else {  /* odd rank out: a half adder */
                carry = _mm256_and_si256(p[0], a);
                p[0] = _mm256_xor_si256(p[0], a);
            }
            for (int k = 1; k < depth; k++) {
                __m256i t = _mm256_and_si256(p[k], carry);
                p[k] = _mm256_xor_si256(p[k], carry);
                carry = t;
            }
        }
        for (int k = 0; k < depth; k++)
            _mm256_storeu_si256((__m256i *)(void *)&c->plane[k][4 * v], p[k]);
    }
}

static void count_block_avx2(const sg_rows *rows, size_t byte0, sg_counter *c) {
    switch (sg_depth(rows->n_ranks)) {
    case 1: count_block_depth(rows, byte0, c, 1); break;
    case 2: count_block_depth(rows, byte0, c, 2); break;
    case 3: count_block_depth(rows, byte0, c, 3); break;
    case 4: count_block_depth(rows, byte0, c, 4); break;
    case 5: count_block_depth(rows, byte0, c, 5); break;
    case 6: count_block_depth(rows, byte0, c, 6); break;
    case 7: count_block_depth(rows, byte0, c, 7); break;
    default: count_block_depth(rows, byte0, c, 8); break;
    }
}

static void vote_count_avx2(const sg_rows *rows, size_t n, int mode, float *out) {
    if ((uintptr_t)out % 32 != 0) {
        sg_vote_count_blocks(rows, n, mode, out, count_block_avx2, emit_avx2, to_counts_avx2);
        return;
    }
    sg_vote_count_blocks(rows, n, mode, out, count_block_avx2, emit_stream_avx2,
                         to_counts_avx2);
    _mm_sfence();   /* the streamed stores are visible before the caller reads out */
}

/* The 8 lanes' masks of one byte of bits: lane i all ones where bit i is set. */
static inline __m256i byte_lanes_avx2(uint8_t byte) {
    const __m256i to_top = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    return _mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(byte), to_top), 31);
}

static void add_signed_avx2(const uint8_t *bits, const uint8_t *zbits, size_t ne, float w,
                            float *acc) {
    const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256 wv = _mm256_set1_ps(w);
    size_t full = ne / 8;
    for (size_t j = 0; j < full; j++) {
        __m256i s = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(bits[j]), to_sign), sign);
        __m256 v = _mm256_xor_ps(wv, _mm256_castsi256_ps(s));
        if (zbits) v = _mm256_andnot_ps(_mm256_castsi256_ps(byte_lanes_avx2(zbits[j])), v);
        _mm256_storeu_ps(acc + 8 * j, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * j), v));
    }
    sg_add_signed_scalar(bits, zbits, 8 * full, ne, w, acc);
}

static inline __m256 signs_of(__m256 v) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    __m256 pos = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), one);
    __m256 neg = _mm256_and_ps(_mm256_cmp_ps(zero, v, _CMP_GT_OQ), one);
    return _mm256_sub_ps(pos, neg);
}

/* 64 elements at a time with their 8 accumulators in registers, every rank added in order:
 * per rank, the 64 bits are broadcast and each lane shifts its own bit to the sign position,
 * which then flips the sign of w; a marked zero (zeros, when not NULL) clears the term to
 * +0.0. Inlined with zeros NULL or not, so the unmarked loop carries no zero test. */
static inline __attribute__((always_inline)) void
vote_weighted_body(const sg_rows *rows, const sg_rows *zeros, size_t n, const float *w,
                   int majority, float *out, int stream) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256i to_sign[4] = {
        _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
        _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
        _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
        _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
    size_t chunks = n / 64;
    for (size_t q = 0; q < chunks; q++) {
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        for (size_t m = 0; m < rows->n_ranks; m++) {
            const uint8_t *bits = sg_row(rows, m, 8 * q);
            __m256i half[2] = {_mm256_set1_epi32((int)sg_ld32(bits)),
                               _mm256_set1_epi32((int)sg_ld32(bits + 4))};
            __m256i zhalf[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            if (zeros) {
                const uint8_t *z = sg_row(zeros, m, 8 * q);
                zhalf[0] = _mm256_set1_epi32((int)sg_ld32(z));
                zhalf[1] = _mm256_set1_epi32((int)sg_ld32(z + 4));
            }
            __m256 wv = _mm256_set1_ps(w[m]);
            for (int r = 0; r < 8; r++) {
                __m256i s = _mm256_and_si256(_mm256_sllv_epi32(half[r / 4], to_sign[r % 4]), sign);
                __m256 v = _mm256_xor_ps(wv, _mm256_castsi256_ps(s));
                if (zeros) {
                    __m256i zm = _mm256_srai_epi32(_mm256_sllv_epi32(zhalf[r / 4], to_sign[r % 4]),
                                                   31);
                    v = _mm256_andnot_ps(_mm256_castsi256_ps(zm), v);
                }
                acc[r] = _mm256_add_ps(acc[r], v);
            }
        }
        for (int r = 0; r < 8; r++)
            store8(out + 64 * q + 8 * r, majority ? signs_of(acc[r]) : acc[r], stream);
    }
    if (n % 64) {  /* the last elements: a block of the generic loop on shifted rows */
        sg_rows tail = {rows->base + 8 * chunks, rows->stride, rows->n_ranks};
        sg_rows ztail = {zeros ? zeros->base + 8 * chunks : NULL, zeros ? zeros->stride : 0,
                         rows->n_ranks};
        sg_vote_weighted_blocks(&tail, zeros ? &ztail : NULL, n % 64, w, majority,
                                out + 64 * chunks, add_signed_avx2);
    }
}

/* Streamed when out is 32-byte aligned, as the count vote (emit_stream_avx2). */
static void vote_weighted_avx2(const sg_rows *rows, const sg_rows *zeros, size_t n,
                               const float *w, int majority, float *out) {
    if ((uintptr_t)out % 32 != 0) {
        if (zeros)
            vote_weighted_body(rows, zeros, n, w, majority, out, 0);
        else
            vote_weighted_body(rows, NULL, n, w, majority, out, 0);
        return;
    }
    if (zeros)
        vote_weighted_body(rows, zeros, n, w, majority, out, 1);
    else
        vote_weighted_body(rows, NULL, n, w, majority, out, 1);
    _mm_sfence();   /* the streamed stores are visible before the caller reads out */
}

/* ---- sparse selection: compare 32 keys at a time, skip blocks without a hit ----------- */

/* Mask of the 32 elements x[0 .. 32) with key >= lo; keys < 2^31, so the signed compare
 * key > lo - 1 is exact (lo == 0 gives -1: every key passes). */
static inline uint32_t ge_mask32(const float *x, __m256i bound) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    uint32_t m = 0;
    for (unsigned q = 0; q < 4; q++) {
        __m256i k = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(x + 8 * q)),
                                     abs_mask);
        m |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, bound)))
             << (8 * q);
    }
    return m;
}

static size_t scan_ge_avx2(const float *x, size_t n, uint32_t lo, uint32_t *pos, float *val,
                           size_t cap) {
    const __m256i bound = _mm256_set1_epi32((int)(lo - 1u));
    size_t c = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        uint32_t m = ge_mask32(x + i, bound);
        for (; m; m &= m - 1) {
            size_t j = i + (size_t)__builtin_ctz(m);
            sg_scan_put(j, x[j], pos, val, cap, c++);
        }
    }
    return sg_scan_ge_scalar(x, i, n, lo, pos, val, cap, c);
}

static size_t count_ge_avx2(const float *x, size_t n, uint32_t lo) {
    const __m256i bound = _mm256_set1_epi32((int)(lo - 1u));
    size_t c = 0, i = 0;
    for (; i + 32 <= n; i += 32) c += (size_t)__builtin_popcount(ge_mask32(x + i, bound));
    return c + sg_count_ge_scalar(x, i, n, lo);
}

/* ---- zero count: the shared scalar loop, auto-vectorized under the AVX2 target -------- */

static size_t count_zeros_avx2(const void *x, sg_dtype dt, size_t n) {
    return sg_count_zeros_scalar(x, dt, 0, n);
}

/* ---- fused error-feedback scaled sign (sg_fused.h) ------------------------------------- */

/* p of 8 elements from i: g + e, or with ecx g + (a*e - b*d2) (sg_fused.h's order; the
 * target has no FMA, and -ffp-contract=off keeps the products rounded anyway). */
static inline __attribute__((always_inline)) __m256 load_p_avx2(const sg_src *s, size_t i,
                                                                int ecx) {
    __m256 g = _mm256_loadu_ps(s->g + i), e = _mm256_loadu_ps(s->e + i);
    if (!ecx) return _mm256_add_ps(g, e);
    __m256 c = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(s->a), e),
                             _mm256_mul_ps(_mm256_set1_ps(s->b), _mm256_loadu_ps(s->d2 + i)));
    return _mm256_add_ps(g, c);
}

/* The horizontal sum of a 64-element block's lane sums (sg_sum64's final tree) into the
 * tree's level 1. */
static inline __attribute__((always_inline)) void push_block_avx2(sg_tree *t, __m256 v) {
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 b2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    sg_tree_push(t, 1, _mm_cvtss_f32(_mm_add_ss(b2, _mm_shuffle_ps(b2, b2, 1))));
}

/* Adds the 8 lane counts of zc to *zeros (a lane counts < 2^32 / 8 blocks: n <= 2^31). */
static inline void add_lanes_avx2(size_t *zeros, __m256i zc) {
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)(void *)lanes, zc);
    for (int k = 0; k < 8; k++) *zeros += lanes[k];
}

/* A 64-element block is 8 vectors: the vector adds are sg_sum64's lane sums, the horizontal
 * sum its final tree. */
static inline __attribute__((always_inline)) int
pass1_avx2_body(const sg_src *src, size_t from, size_t to, sg_tree *t, size_t *zeros, int ecx) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), max_finite = _mm256_set1_epi32(0x7F7FFFFF);
    const __m256i zero = _mm256_setzero_si256();
    __m256i bad = zero, zc = zero;
    size_t i = from;
    for (; i + SG_TREE_FAN <= to; i += SG_TREE_FAN) {
        __m256 v = _mm256_setzero_ps();
        for (int r = 0; r < 8; r++) {
            __m256 p = load_p_avx2(src, i + 8 * r, ecx);
            __m256i a = _mm256_and_si256(_mm256_castps_si256(p), abs_mask);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(a, max_finite));
            zc = _mm256_sub_epi32(zc, _mm256_cmpeq_epi32(a, zero));
            v = r ? _mm256_add_ps(v, _mm256_castsi256_ps(a)) : _mm256_castsi256_ps(a);
        }
        push_block_avx2(t, v);
    }
    add_lanes_avx2(zeros, zc);
    return _mm256_testz_si256(bad, bad) && sg_ef_pass1_scalar(src, i, to, t, zeros);
}

static int ef_pass1_avx2(const sg_src *src, size_t from, size_t to, sg_tree *t,
                         size_t *zeros) {
    return pass1_avx2_body(src, from, to, t, zeros, 0);
}

static int ecx_pass1_avx2(const sg_src *src, size_t from, size_t to, sg_tree *t,
                          size_t *zeros) {
    return pass1_avx2_body(src, from, to, t, zeros, 1);
}

/* The residual of 8 elements of a segment: x - copysign(scale, x), x where x is +-0. */
static inline __attribute__((always_inline)) __m256 residual8_avx2(__m256 x, __m256 sc, __m256 z) {
    return _mm256_blendv_ps(_mm256_sub_ps(x, _mm256_or_ps(sc, _mm256_and_ps(x, _mm256_set1_ps(-0.0f)))),
                            x, z);
}

/* All ones in the lanes where x is +-0. */
static inline __attribute__((always_inline)) __m256 zero_lanes_avx2(__m256 x) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(
        _mm256_and_si256(_mm256_castps_si256(x), abs_mask), _mm256_setzero_si256()));
}

/* e_out is written with non-temporal stores when it is 32-byte aligned (segments start at
 * multiples of 8 elements): the new memory is next read a step later, so reading its old
 * lines in first (a normal store's read-for-ownership) would only add traffic. */
static inline __attribute__((always_inline)) void
ef_pass2_body(const sg_ef_io *io, size_t from, size_t to, float scale, int stream, int ecx) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (size_t i = from; i < to; i += 8) {
        _mm_prefetch((const char *)(io->src.g + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        _mm_prefetch((const char *)(io->src.e + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        if (ecx) _mm_prefetch((const char *)(io->src.d2 + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        __m256 p = load_p_avx2(&io->src, i, ecx);
        __m256 z = zero_lanes_avx2(p);
        store8(io->e_out + i, residual8_avx2(p, sc, z), stream);
        io->bits[i / 8] = (uint8_t)_mm256_movemask_ps(p);
        io->zplane[i / 8] = (uint8_t)_mm256_movemask_ps(z);
    }
}

static void ef_pass2_avx2(const sg_ef_io *io, size_t from, size_t to, float scale) {
    ef_pass2_body(io, from, to, scale, 0, 0);
}

static void ef_pass2_stream_avx2(const sg_ef_io *io, size_t from, size_t to, float scale) {
    ef_pass2_body(io, from, to, scale, 1, 0);
}

static void ecx_pass2_avx2(const sg_ef_io *io, size_t from, size_t to, float scale) {
    ef_pass2_body(io, from, to, scale, 0, 1);
}

static void ecx_pass2_stream_avx2(const sg_ef_io *io, size_t from, size_t to, float scale) {
    ef_pass2_body(io, from, to, scale, 1, 1);
}

static int ef_sign_avx2(const float *g, const float *e, float *e_out, size_t n,
                        const int64_t *segs, size_t n_segs, uint8_t *bits, uint8_t *zplane,
                        float *scales, uint64_t *zeros) {
    sg_src src = {g, e, NULL, 0.0f, 0.0f};
    if ((uintptr_t)e_out % 32 != 0)
        return sg_ef_sign_run(src, e_out, n, segs, n_segs, bits, zplane, scales, zeros,
                              ef_pass1_avx2, ef_pass2_avx2);
    int ok = sg_ef_sign_run(src, e_out, n, segs, n_segs, bits, zplane, scales, zeros,
                            ef_pass1_avx2, ef_pass2_stream_avx2);
    _mm_sfence();   /* the streamed stores are visible before the caller reads e_out */
    return ok;
}

static int ecx_sign_avx2(const float *u, const float *d1, const float *d2, float a, float b,
                         float *d_out, size_t n, const int64_t *segs, size_t n_segs,
                         uint8_t *bits, uint8_t *zplane, float *scales, uint64_t *zeros) {
    sg_src src = {u, d1, d2, a, b};
    if ((uintptr_t)d_out % 32 != 0)
        return sg_ef_sign_run(src, d_out, n, segs, n_segs, bits, zplane, scales, zeros,
                              ecx_pass1_avx2, ecx_pass2_avx2);
    int ok = sg_ef_sign_run(src, d_out, n, segs, n_segs, bits, zplane, scales, zeros,
                            ecx_pass1_avx2, ecx_pass2_stream_avx2);
    _mm_sfence();
    return ok;
}

/* The deferred kernels' whole 64-element blocks (sg_fused.h): the residuals of the kept
 * buffers, p = g + e1 (ecx: g + (a*e1 - b*e2), load_p_avx2's order) written to p_out
 * (streamed when aligned: it is next read a step later), the bits, and the block's |p| sum
 * for the tree. */
static inline __attribute__((always_inline)) size_t
efd_blocks_body(const sg_ef_io *io, size_t from, size_t to, float prev1, float prev2,
                sg_tree *t, size_t *zeros, int stream, int ecx) {
    const __m256 sc1 = _mm256_set1_ps(prev1), sc2 = _mm256_set1_ps(prev2);
    const __m256 va = _mm256_set1_ps(io->src.a), vb = _mm256_set1_ps(io->src.b);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), max_finite = _mm256_set1_epi32(0x7F7FFFFF);
    const __m256i zero = _mm256_setzero_si256();
    /* locals: the byte stores below may alias anything, so fields of io would be reloaded */
    const float *g = io->src.g, *x1p = io->src.e, *x2p = io->src.d2;
    float *out = io->e_out;
    uint8_t *bits = io->bits, *zplane = io->zplane;
    __m256i bad = zero, zc = zero;
    size_t i = from;
    for (; i + SG_TREE_FAN <= to; i += SG_TREE_FAN) {
        __m256 v = _mm256_setzero_ps();
        uint64_t sb = 0, zb = 0;   /* the block's 8 bytes of sign bits and zero plane */
        for (int r = 0; r < 8; r++) {
            size_t k = i + 8 * r;
            _mm_prefetch((const char *)(g + k + SG_PREFETCH_ELEMS), _MM_HINT_T0);
            _mm_prefetch((const char *)(x1p + k + SG_PREFETCH_ELEMS), _MM_HINT_T0);
            __m256 x1 = _mm256_loadu_ps(x1p + k);
            __m256 e = residual8_avx2(x1, sc1, zero_lanes_avx2(x1));
            __m256 p;
            if (ecx) {
                _mm_prefetch((const char *)(x2p + k + SG_PREFETCH_ELEMS), _MM_HINT_T0);
                __m256 x2 = _mm256_loadu_ps(x2p + k);
                __m256 d = residual8_avx2(x2, sc2, zero_lanes_avx2(x2));
                p = _mm256_add_ps(_mm256_loadu_ps(g + k),
                                  _mm256_sub_ps(_mm256_mul_ps(va, e), _mm256_mul_ps(vb, d)));
            } else {
                p = _mm256_add_ps(_mm256_loadu_ps(g + k), e);
            }
            store8(out + k, p, stream);
            __m256i a = _mm256_and_si256(_mm256_castps_si256(p), abs_mask);
            __m256i z = _mm256_cmpeq_epi32(a, zero);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(a, max_finite));
            zc = _mm256_sub_epi32(zc, z);
            sb |= (uint64_t)(unsigned)_mm256_movemask_ps(p) << (8 * r);
            zb |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(z)) << (8 * r);
            v = r ? _mm256_add_ps(v, _mm256_castsi256_ps(a)) : _mm256_castsi256_ps(a);
        }
        memcpy(bits + i / 8, &sb, 8);     /* little-endian: byte r is elements 8r .. 8r+7 */
        memcpy(zplane + i / 8, &zb, 8);
        push_block_avx2(t, v);
    }
    add_lanes_avx2(zeros, zc);
    return _mm256_testz_si256(bad, bad) ? i : (size_t)-1;
}

static size_t efd_blocks_avx2(const sg_ef_io *io, size_t from, size_t to, float prev1,
                              float prev2, sg_tree *t, size_t *zeros) {
    return efd_blocks_body(io, from, to, prev1, prev2, t, zeros, 0, 0);
}

static size_t efd_blocks_stream_avx2(const sg_ef_io *io, size_t from, size_t to, float prev1,
                                     float prev2, sg_tree *t, size_t *zeros) {
    return efd_blocks_body(io, from, to, prev1, prev2, t, zeros, 1, 0);
}

static size_t ecxd_blocks_avx2(const sg_ef_io *io, size_t from, size_t to, float prev1,
                               float prev2, sg_tree *t, size_t *zeros) {
    return efd_blocks_body(io, from, to, prev1, prev2, t, zeros, 0, 1);
}

static size_t ecxd_blocks_stream_avx2(const sg_ef_io *io, size_t from, size_t to, float prev1,
                                      float prev2, sg_tree *t, size_t *zeros) {
    return efd_blocks_body(io, from, to, prev1, prev2, t, zeros, 1, 1);
}

/* Both deferred kernels: the streamed blocks when p_out is 32-byte aligned. */
static int deferred_run_avx2(sg_src src, const float *prev1, const float *prev2, float *p_out,
                             size_t n, const int64_t *segs, size_t n_segs, uint8_t *bits,
                             uint8_t *zplane, float *scales, uint64_t *zeros) {
    int stream = (uintptr_t)p_out % 32 == 0;
    sg_efd_blocks_fn blocks = src.d2 ? (stream ? ecxd_blocks_stream_avx2 : ecxd_blocks_avx2)
                                     : (stream ? efd_blocks_stream_avx2 : efd_blocks_avx2);
    int ok = sg_ef_deferred_run(src, prev1, prev2, p_out, n, segs, n_segs, bits, zplane, scales,
                                zeros, blocks);
    if (stream) _mm_sfence();   /* the streamed stores are visible before the caller reads */
    return ok;
}

static int ef_sign_deferred_avx2(const float *g, const float *p_prev, const float *prev_scales,
                                 float *p_out, size_t n, const int64_t *segs, size_t n_segs,
                                 uint8_t *bits, uint8_t *zplane, float *scales,
                                 uint64_t *zeros) {
    sg_src src = {g, p_prev, NULL, 0.0f, 0.0f};
    return deferred_run_avx2(src, prev_scales, NULL, p_out, n, segs, n_segs, bits, zplane,
                             scales, zeros);
}

static int ecx_sign_deferred_avx2(const float *u, const float *p1, const float *prev1,
                                  const float *p2, const float *prev2, float a, float b,
                                  float *p_out, size_t n, const int64_t *segs, size_t n_segs,
                                  uint8_t *bits, uint8_t *zplane, float *scales,
                                  uint64_t *zeros) {
    sg_src src = {u, p1, p2, a, b};
    return deferred_run_avx2(src, prev1, prev2, p_out, n, segs, n_segs, bits, zplane, scales,
                             zeros);
}

/* ---- fused momentum (sg_momentum.h) ---------------------------------------------------- */

static inline __m256 momentum8(const float *g, const float *m, size_t i, __m256 a, __m256 b) {
    return _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(m + i)),
                         _mm256_mul_ps(b, _mm256_loadu_ps(g + i)));
}

/* Signum's m_out is not read again this step: streamed when 32-byte aligned (as ef_sign's). */
static inline __attribute__((always_inline)) int
momentum_sign_body(const float *g, const float *m, float *m_out, size_t n, float a, float b,
                   uint8_t *bits, uint8_t *zplane, size_t *zeros, int stream) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i max_finite = _mm256_set1_epi32(0x7F7FFFFF), zero = _mm256_setzero_si256();
    __m256i bad = zero;
    size_t i = 0, z = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(g + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        __m256 v = momentum8(g, m, i, va, vb);
        __m256i mag = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(mag, max_finite));
        unsigned zb = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, zero)));
        store8(m_out + i, v, stream);
        bits[i / 8] = (uint8_t)_mm256_movemask_ps(v);
        zplane[i / 8] = (uint8_t)zb;
        z += (size_t)__builtin_popcount(zb);
    }
    *zeros = z;
    int tail_ok = sg_momentum_sign_scalar(g, m, m_out, i, n, a, b, bits, zplane, zeros);
    return _mm256_testz_si256(bad, bad) && tail_ok;
}

static int momentum_sign_avx2(const float *g, const float *m, float *m_out, size_t n, float a,
                              float b, uint8_t *bits, uint8_t *zplane, size_t *zeros) {
    if ((uintptr_t)m_out % 32 != 0)
        return momentum_sign_body(g, m, m_out, n, a, b, bits, zplane, zeros, 0);
    int ok = momentum_sign_body(g, m, m_out, n, a, b, bits, zplane, zeros, 1);
    _mm_sfence();   /* the streamed stores are visible before the caller reads m_out */
    return ok;
}

/* SSDM's m_out is read again by the stochastic pack, but only after every bucket's update
 * (the pack needs the whole model's norm), long out of cache: streamed when 32-byte aligned.
 * The magnitude bits of non-NaN floats order as the values, so an unsigned integer max is
 * max |m_out|, and any NaN/Inf makes it >= 0x7F800000. */
static inline __attribute__((always_inline)) int
momentum_absmax_body(const float *g, const float *m, float *m_out, size_t n, float a, float b,
                     float *absmax, size_t *zeros, int stream) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), zero = _mm256_setzero_si256();
    __m256i w = zero, zc = zero;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(g + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        __m256 v = momentum8(g, m, i, va, vb);
        __m256i mag = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        w = _mm256_max_epu32(w, mag);
        zc = _mm256_sub_epi32(zc, _mm256_cmpeq_epi32(mag, zero));
        store8(m_out + i, v, stream);
    }
    uint32_t lanes[8], counts[8], worst = 0;
    _mm256_storeu_si256((__m256i *)(void *)lanes, w);
    _mm256_storeu_si256((__m256i *)(void *)counts, zc);
    size_t z = 0;
    for (int k = 0; k < 8; k++) {      /* a lane counts < 2^28 zeros: n <= 2^31 */
        worst = lanes[k] > worst ? lanes[k] : worst;
        z += counts[k];
    }
    *zeros = z;
    sg_momentum_absmax_scalar(g, m, m_out, i, n, a, b, &worst, zeros);
    *absmax = sg_f32_from_bits(worst);
    return worst < 0x7F800000u;
}

static int momentum_absmax_avx2(const float *g, const float *m, float *m_out, size_t n,
                                float a, float b, float *absmax, size_t *zeros) {
    if ((uintptr_t)m_out % 32 != 0)
        return momentum_absmax_body(g, m, m_out, n, a, b, absmax, zeros, 0);
    int ok = momentum_absmax_body(g, m, m_out, n, a, b, absmax, zeros, 1);
    _mm_sfence();   /* the streamed stores are visible before the caller reads m_out */
    return ok;
}

static int sign_scan_avx2(const float *x, size_t n, uint8_t *bits, uint8_t *zplane,
                          size_t *zeros) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i max_finite = _mm256_set1_epi32(0x7F7FFFFF), zero = _mm256_setzero_si256();
    __m256i bad = zero;
    size_t i = 0, z = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(x + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        __m256 v = _mm256_loadu_ps(x + i);
        __m256i mag = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(mag, max_finite));
        unsigned zb = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, zero)));
        bits[i / 8] = (uint8_t)_mm256_movemask_ps(v);
        zplane[i / 8] = (uint8_t)zb;
        z += (size_t)__builtin_popcount(zb);
    }
    *zeros = z;
    int tail_ok = sg_sign_scan_scalar(x, i, n, bits, zplane, zeros);
    return _mm256_testz_si256(bad, bad) && tail_ok;
}

/* ---- compensation add (the sparse compressors' error feedback) ------------------------- */

/* out (a whole bucket) is far larger than the cache: streamed when 32-byte aligned. */
static inline __attribute__((always_inline)) int
add_finite_body(const float *a, const float *b, float *out, size_t n, int stream) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i w = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(a + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + i + SG_PREFETCH_ELEMS), _MM_HINT_T0);
        __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        __m256 s1 = _mm256_add_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
        store8(out + i, s0, stream);
        store8(out + i + 8, s1, stream);
        w = _mm256_max_epu32(w, _mm256_and_si256(_mm256_castps_si256(s0), abs_mask));
        w = _mm256_max_epu32(w, _mm256_and_si256(_mm256_castps_si256(s1), abs_mask));
    }
    uint32_t lanes[8], worst = 0;
    _mm256_storeu_si256((__m256i *)(void *)lanes, w);
    for (int k = 0; k < 8; k++) worst = lanes[k] > worst ? lanes[k] : worst;
    return sg_add_finite_scalar(a, b, out, i, n) && worst < 0x7F800000u;
}

static int add_finite_avx2(const float *a, const float *b, float *out, size_t n) {
    if ((uintptr_t)out % 32 != 0) return add_finite_body(a, b, out, n, 0);
    int ok = add_finite_body(a, b, out, n, 1);
    _mm_sfence();   /* the streamed stores are visible before the caller reads out */
    return ok;
}

/* add_finite_body and scan_ge_avx2 in one pass: each sum is stored (streamed when out is
 * 32-byte aligned) and compared; a block with a hit puts its candidates from a copy in L1,
 * never from out (reading back a streamed line would stall). */
static inline __attribute__((always_inline)) size_t
add_scan_ge_body(const float *a, const float *b, float *out, size_t n, uint32_t lo,
                 uint32_t *pos, float *val, size_t cap, uint32_t *worst, int stream) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i bound = _mm256_set1_epi32((int)(lo - 1u));
    __m256i w = _mm256_setzero_si256();
    size_t c = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 s[4];
        uint32_t m = 0;
        for (unsigned q = 0; q < 4; q++) {
            if (q % 2 == 0) {   /* one fetch per 64-byte line of each input */
                _mm_prefetch((const char *)(a + i + 8 * q + SG_PREFETCH_ELEMS), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + i + 8 * q + SG_PREFETCH_ELEMS), _MM_HINT_T0);
            }
            s[q] = _mm256_add_ps(_mm256_loadu_ps(a + i + 8 * q), _mm256_loadu_ps(b + i + 8 * q));
            store8(out + i + 8 * q, s[q], stream);
            __m256i k = _mm256_and_si256(_mm256_castps_si256(s[q]), abs_mask);
            w = _mm256_max_epu32(w, k);
            m |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, bound)))
                 << (8 * q);
        }
        if (!m) continue;
        float copy[32];
        for (unsigned q = 0; q < 4; q++) _mm256_storeu_ps(copy + 8 * q, s[q]);
        for (; m; m &= m - 1) {
            unsigned j = (unsigned)__builtin_ctz(m);
            sg_scan_put(i + j, copy[j], pos, val, cap, c++);
        }
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)(void *)lanes, w);
    for (int k = 0; k < 8; k++) *worst = lanes[k] > *worst ? lanes[k] : *worst;
    return sg_add_scan_ge_scalar(a, b, out, i, n, lo, pos, val, cap, c, worst);
}

/* The head up to out's 32-byte boundary in scalar code, so that the rest can stream (a
 * segment of a bucket starts anywhere). */
static int add_scan_ge_avx2(const float *a, const float *b, float *out, size_t n, uint32_t lo,
                            uint32_t *pos, float *val, size_t cap, size_t *found) {
    uint32_t worst = 0;
    size_t head = 0;
    if ((uintptr_t)out % 4 == 0) head = ((32 - (uintptr_t)out % 32) % 32) / 4;
    if ((uintptr_t)out % 4 != 0 || head >= n) {
        *found = add_scan_ge_body(a, b, out, n, lo, pos, val, cap, &worst, 0);
        return worst < 0x7F800000u;
    }
    size_t c = sg_add_scan_ge_scalar(a, b, out, 0, head, lo, pos, val, cap, 0, &worst);
    /* the rest's positions count from head: shift them when the head found any */
    size_t got = add_scan_ge_body(a + head, b + head, out + head, n - head, lo,
                                  c < cap ? pos + c : pos, c < cap && val ? val + c : NULL,
                                  c < cap ? cap - c : 0, &worst, 1);
    _mm_sfence();   /* the streamed stores are visible before the caller reads out */
    for (size_t j = c; j < c + got && j < cap; j++) pos[j] += (uint32_t)head;
    *found = c + got;
    return worst < 0x7F800000u;
}

const sg_kernels sg_kernels_avx2 = {
    "avx2",          pack_avx2,          pack_stochastic_avx2, unpack_avx2,
    vote_count_avx2, vote_weighted_avx2, scan_ge_avx2,         count_ge_avx2,
    count_zeros_avx2, ef_sign_avx2,
    momentum_sign_avx2, momentum_absmax_avx2,
    ecx_sign_avx2, add_finite_avx2, sign_scan_avx2, ef_sign_deferred_avx2,
    ecx_sign_deferred_avx2, add_scan_ge_avx2,
};

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif /* SG_HAVE_AVX2 */
