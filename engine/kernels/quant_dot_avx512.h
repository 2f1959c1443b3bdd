/* The decode-sized packed product (`qdot_rows` of quant_dot.h) for Q4 and Q8 in 16-float AVX-512
 * vectors, for CPUs that run 512-bit operations natively (Intel Sapphire/Emerald Rapids measured:
 * DECISIONS.md, 2026-12-06, "wint4 decode in AVX-512").
 *
 * At one token row the 8-lane kernel is bound by its instructions, not by memory: per 8 weights a
 * broadcast load, a per-lane shift, a mask, a conversion and an FMA. Here:
 *   Q4  16 bytes (32 weights) widen to 16 dwords in one load (vpmovzxbd); lane l holds weights
 *       2l (low nibble) and 2l + 1 (high nibble), so a mask gives the even weights and a shift
 *       the odd ones. The token row is reordered once per call to match ([x0 x2 .. x30 | x1 x3
 *       .. x31] per 32 columns), so the packed format and checkpoints stay as they are. About 7
 *       operations per 32 weights and token row instead of ~22.
 *   Q8  16 bytes widen to 16 dwords (one load), a conversion, an FMA: 3 per 16 weights.
 * The group's scale and offset are applied as in quant_dot.h: scale * (x . levels) + offset *
 * sum(x). Each output's summation order depends only on K and the group, not on M, on the tile
 * or on the part, so a token's result does not depend on its batch (the tests check it); it
 * differs from the 8-lane path's by rounding only.
 *
 * Compiled for AVX-512 by target attributes and called only when the CPU has it (quant_path.h).
 */
#ifndef PDSERVE_KERNELS_QUANT_DOT_AVX512_H
#define PDSERVE_KERNELS_QUANT_DOT_AVX512_H

#include <stdlib.h>

#include "quant_dot.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#define INLINE_AVX512 static inline __attribute__((always_inline)) AVX512_TARGET

#define Z_TOKENS 4 /* token rows per pass at most */

/* Weights decoded per block: 32 for Q4 (two vectors, even then odd weights), 16 for Q8. */
INLINE_AVX512 int z_block(int fmt) { return fmt == FMT_Q4 ? 32 : 16; }

/* The levels of block b of a row as floats: lo (and hi for Q4). `fmt` is a constant where inlined. */
INLINE_AVX512 void z_decode(int fmt, const uint8_t *row, int b, __m512 *lo, __m512 *hi) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (size_t)16 * b)));
    if (fmt == FMT_Q4) {
        *lo = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(15)));
        *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
    } else {
        *lo = _mm512_cvtepi32_ps(d);
    }
}

/* c[i * ldc + j] = dot(a[i], w row j) for i < m and j in [j0, j0 + n), a[i] in the block order
 * above. Called with constant fmt, m and n (m * n <= 8: 8 accumulators and their weights). */
INLINE_AVX512 void z_tile(
    int fmt, int m, int n, const float *const *a, const QMat *w, int j0, const float *xsum, float *c,
    int ldc) {
    const int groups = w->K / w->group, blocks = w->group / z_block(fmt), width = z_block(fmt);
    __m512 tot[Z_TOKENS][4];
    float off[Z_TOKENS][4];
    const uint8_t *row[4];
    for (int j = 0; j < n; j++) row[j] = w->q + (size_t)(j0 + j) * w->row_bytes;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) tot[i][j] = _mm512_setzero_ps(), off[i][j] = 0.0f;
    for (int g = 0; g < groups; g++) {
        __m512 acc[Z_TOKENS][4];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) acc[i][j] = _mm512_setzero_ps();
        for (int b = g * blocks; b < (g + 1) * blocks; b++) {
            __m512 lo[4], hi[4];
            for (int j = 0; j < n; j++) z_decode(fmt, row[j], b, &lo[j], &hi[j]);
            for (int i = 0; i < m; i++) {
                const float *x = a[i] + (size_t)width * b;
                const __m512 xl = _mm512_loadu_ps(x);
                for (int j = 0; j < n; j++) acc[i][j] = _mm512_fmadd_ps(xl, lo[j], acc[i][j]);
                if (fmt == FMT_Q4) {
                    const __m512 xh = _mm512_loadu_ps(x + 16);
                    for (int j = 0; j < n; j++) acc[i][j] = _mm512_fmadd_ps(xh, hi[j], acc[i][j]);
                }
            }
        }
        for (int j = 0; j < n; j++) {
            size_t at = (size_t)(j0 + j) * groups + g;
            const float s = half_to_float(w->scale[at]), o = half_to_float(w->offset[at]);
            for (int i = 0; i < m; i++) {
                tot[i][j] = _mm512_fmadd_ps(acc[i][j], _mm512_set1_ps(s), tot[i][j]);
                off[i][j] += o * xsum[(size_t)i * groups + g];
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) c[(size_t)i * ldc + j0 + j] = _mm512_reduce_add_ps(tot[i][j]) + off[i][j];
}

/* Rows [j0, j1) for token rows a[m0 .. m0 + m): 4 weight rows a pass for up to 2 token rows, 2
 * for 3-4 (the accumulators fit the registers); a tail of single rows. */
#define Z_ROWS_FOR(fmt, m, wide)                                                                       \
    do {                                                                                               \
        int j = j0;                                                                                    \
        for (; j + (wide) <= j1; j += (wide)) z_tile(fmt, m, wide, a, w, j, xsum, c, ldc);              \
        for (; j < j1; j++) z_tile(fmt, m, 1, a, w, j, xsum, c, ldc);                                  \
    } while (0)

INLINE_AVX512 void z_rows_fmt(
    int fmt, const float *const *a, int m, const QMat *w, int j0, int j1, const float *xsum, float *c,
    int ldc) {
    switch (m) {
    case 1:
        Z_ROWS_FOR(fmt, 1, 4);
        break;
    case 2:
        Z_ROWS_FOR(fmt, 2, 4);
        break;
    case 3:
        Z_ROWS_FOR(fmt, 3, 2);
        break;
    default:
        Z_ROWS_FOR(fmt, 4, 2);
    }
}

/* True when this path handles w: Q4 with groups of whole 32-weight blocks, Q8 of 16. */
static inline int qdot_avx512_handles(const QMat *w) {
    return (w->fmt == FMT_Q4 && w->group % 32 == 0) || (w->fmt == FMT_Q8 && w->group % 16 == 0);
}

/* dst = src with each 32 columns reordered to [even | odd] (the Q4 block order above). */
AVX512_TARGET
static void z_split_even_odd(const float *src, int K, float *dst) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int k = 0; k < K; k += 32) {
        const __m512 a = _mm512_loadu_ps(src + k), b = _mm512_loadu_ps(src + k + 16);
        _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(dst + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

/* qdot_rows for a matrix qdot_avx512_handles: c[i * ldc + j] = dot(a[i], row j of w) for i < M,
 * j in [j0, j1). Returns -1 when out of memory (the Q4 token rows' reordered copy). */
AVX512_TARGET
static int qdot_rows_avx512(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    const int groups = w->K / w->group;
    const float *rows[Z_TOKENS];
    float *split = NULL;
    if (w->fmt == FMT_Q4) {
        split = malloc((size_t)(M < Z_TOKENS ? M : Z_TOKENS) * w->K * sizeof(float));
        if (!split) return -1;
    }
    for (int m0 = 0; m0 < M; m0 += Z_TOKENS) {
        const int m = M - m0 < Z_TOKENS ? M - m0 : Z_TOKENS;
        for (int i = 0; i < m; i++) {
            rows[i] = a[m0 + i];
            if (split) {
                z_split_even_odd(a[m0 + i], w->K, split + (size_t)i * w->K);
                rows[i] = split + (size_t)i * w->K;
            }
        }
        const float *xs = xsum + (size_t)m0 * groups;
        float *cm = c + (size_t)m0 * ldc;
        if (w->fmt == FMT_Q4)
            z_rows_fmt(FMT_Q4, rows, m, w, j0, j1, xs, cm, ldc);
        else
            z_rows_fmt(FMT_Q8, rows, m, w, j0, j1, xs, cm, ldc);
    }
    free(split);
    return 0;
}

#else
static inline int qdot_avx512_handles(const QMat *w) { return 0 * w->fmt; }
static int qdot_rows_avx512(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    return -1;
}
#endif

#endif
