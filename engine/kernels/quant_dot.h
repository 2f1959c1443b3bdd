/* Products with weight-only quantized matrices, read packed: no fp32 copy of a weight is made.
 *
 * A quantized matrix is [N, K] (output rows, input columns), each row cut into groups of
 * `group` columns (a multiple of 8). Weight k of row n is
 *     w[n, k] = scale[n, k / group] * level(n, k) + offset[n, k / group]
 * with an unsigned integer level and fp16 scale and offset per group. The formats differ only in
 * how a row's bytes give the levels (engine/quantization/formats.py packs them the same way):
 *   Q8   one byte per weight;
 *   Q4   weight k in bits [4k, 4k + 4) of the row's bytes read as one little-endian bit string;
 *   Q2   the same with 2 bits;
 *   CCQ  convolutional code: code k is the CCQ_BITS-bit window at bit 2k of the row's string
 *        (windows overlap: 2 new bits per weight, the rest shared with the next weights), and
 *        level = code * CCQ_MUL mod 2^CCQ_BITS. The multiply spreads neighbouring codes over the
 *        range, so a weight's shared bits do not tie it to its neighbour's value: what makes the
 *        trellis search (the encoder) worth ~1.3 dB over plain 2-bit. Rows carry 2 bytes of
 *        padding so a block's 32-bit window never reads past them.
 * Decoding 8 weights is one load, a per-lane shift, a mask (and for CCQ one multiply and mask)
 * and a conversion: no lookup table. The dot product of a token row x with weight row n is
 *     sum over groups G: scale_G * (x[G] . level[G]) + offset_G * sum(x[G]),
 * so the scale is applied once per group, not per weight.
 */
#ifndef PDSERVE_KERNELS_QUANT_DOT_H
#define PDSERVE_KERNELS_QUANT_DOT_H

#include <stdint.h>
#include <string.h>

#include "vector.h"

enum { FMT_Q8 = 0, FMT_Q4 = 1, FMT_Q2 = 2, FMT_CCQ = 3 };
#define CCQ_BITS 6
#define CCQ_MASK ((1u << CCQ_BITS) - 1)
#define CCQ_MUL 49u

typedef uint32_t v8u __attribute__((vector_size(32), aligned(4)));

typedef struct {
    const uint8_t *q;       /* [N, row_bytes] packed levels */
    const uint16_t *scale;  /* [N, K / group] fp16 */
    const uint16_t *offset; /* [N, K / group] fp16 */
    int N, K, group, fmt, row_bytes;
} QMat;

INLINE float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

/* The levels of weights 8b .. 8b + 7 of a row, as floats. `fmt` is a constant where inlined. */
INLINE v8 decode8(int fmt, const uint8_t *row, int b) {
    const v8u lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    uint32_t u = 0;
    v8u v;
    switch (fmt) {
    case FMT_Q8: {
        /* Two 32-bit loads, each broadcast to four lanes and shifted: GCC's direct byte-to-float
         * conversion of an 8-byte vector ran 2x slower than fp32 BLAS. */
        uint32_t lo, hi;
        memcpy(&lo, row + (size_t)8 * b, 4);
        memcpy(&hi, row + (size_t)8 * b + 4, 4);
        v = ((v8u){lo, lo, lo, lo, hi, hi, hi, hi} >> ((lanes & 3) * 8)) & 255u;
        break;
    }
    case FMT_Q4:
        memcpy(&u, row + (size_t)4 * b, 4);
        v = (((v8u){0} + u) >> (lanes * 4)) & 15u;
        break;
    case FMT_Q2:
        memcpy(&u, row + (size_t)2 * b, 2);
        v = (((v8u){0} + u) >> (lanes * 2)) & 3u;
        break;
    default: /* FMT_CCQ */
        memcpy(&u, row + (size_t)2 * b, 4);
        v = ((((v8u){0} + u) >> (lanes * 2)) & CCQ_MASK) * CCQ_MUL & CCQ_MASK;
        break;
    }
    return __builtin_convertvector((v8i)v, v8);
}

#define Q_ROWS 2 /* weight rows decoded at once */
#define QA_ROWS 4 /* token rows per pass over them */

/* c[i * ldc + j] = dot(a[i], w row j) for i < m (<= QA_ROWS) and j in [j0, j0 + n) (n <= Q_ROWS).
 * xsum[i * groups + G] is the sum of a[i] over group G. Called with constant fmt, m and n. */
INLINE void qdot_tile(
    int fmt, int m, int n, const float *const *a, const QMat *w, int j0, const float *xsum, float *c,
    int ldc) {
    const int groups = w->K / w->group, blocks = w->group / 8;
    v8 tot[QA_ROWS][Q_ROWS];
    float off[QA_ROWS][Q_ROWS];
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) tot[i][j] = (v8){0}, off[i][j] = 0.0f;
    const size_t group_bytes = (size_t)w->row_bytes * w->group / w->K;
    for (int g = 0; g < groups; g++) {
        v8 acc[QA_ROWS][Q_ROWS];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) acc[i][j] = (v8){0};
        /* The next pass's rows, this group's bytes: the hardware prefetcher alone left the q4
         * LM head at 34.6 ms on one thread, 22.6 with this (DECISIONS.md, 2026-12-06). */
        for (int j = 0; j < n; j++)
            __builtin_prefetch(w->q + (size_t)(j0 + n + j) * w->row_bytes + g * group_bytes);
        for (int b = g * blocks; b < (g + 1) * blocks; b++) {
            v8 wv[Q_ROWS];
            for (int j = 0; j < n; j++) wv[j] = decode8(fmt, w->q + (size_t)(j0 + j) * w->row_bytes, b);
            for (int i = 0; i < m; i++) {
                v8 av = *(const v8 *)(a[i] + (size_t)8 * b);
                for (int j = 0; j < n; j++) acc[i][j] += av * wv[j];
            }
        }
        for (int j = 0; j < n; j++) {
            size_t at = (size_t)(j0 + j) * groups + g;
            float s = half_to_float(w->scale[at]), o = half_to_float(w->offset[at]);
            for (int i = 0; i < m; i++) {
                tot[i][j] += acc[i][j] * s;
                off[i][j] += o * xsum[(size_t)i * groups + g];
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) c[(size_t)i * ldc + j0 + j] = hsum(tot[i][j]) + off[i][j];
}

#define QDOT_TILE_M(fmt, n, m, ...)              \
    do {                                         \
        if ((m) >= 4)                            \
            qdot_tile(fmt, 4, n, __VA_ARGS__);   \
        else if ((m) == 3)                       \
            qdot_tile(fmt, 3, n, __VA_ARGS__);   \
        else if ((m) == 2)                       \
            qdot_tile(fmt, 2, n, __VA_ARGS__);   \
        else                                     \
            qdot_tile(fmt, 1, n, __VA_ARGS__);   \
    } while (0)

/* Rows [j0, j1) of w for M token rows a[i] (K floats each); xsum as in qdot_tile for all M. */
INLINE void qdot_rows_fmt(
    int fmt, const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c,
    int ldc) {
    const int groups = w->K / w->group;
    for (int m0 = 0; m0 < M; m0 += QA_ROWS) {
        int m = M - m0;
        const float *xs = xsum + (size_t)m0 * groups;
        float *cm = c + (size_t)m0 * ldc;
        int j = j0;
        for (; j + Q_ROWS <= j1; j += Q_ROWS) QDOT_TILE_M(fmt, Q_ROWS, m, a + m0, w, j, xs, cm, ldc);
        for (; j < j1; j++) QDOT_TILE_M(fmt, 1, m, a + m0, w, j, xs, cm, ldc);
    }
}

/* xsum[i * groups + G] = sum of a[i] over group G, for i < M. */
VECTOR_CLONES
static void group_sums(const float *const *a, int M, int K, int group, float *xsum) {
    const int groups = K / group;
    for (int i = 0; i < M; i++)
        for (int g = 0; g < groups; g++) {
            v8 acc = (v8){0};
            for (int k = g * group; k < (g + 1) * group; k += 8) acc += *(const v8 *)(a[i] + k);
            xsum[(size_t)i * groups + g] = hsum(acc);
        }
}

/* c[i * ldc + j] = dot(a[i], row j of w) for i < M, j in [j0, j1). `xsum` from group_sums. Each
 * value's summation order depends only on K and the group, not on M or j0, so a token's result
 * does not depend on the batch it is in. Two builds of the same code, AVX2 + FMA and plain
 * x86-64, chosen at run time by quant_path.h (not by target_clones, so a test can force each). */
#define QDOT_ROWS_BY_FORMAT                                          \
    switch (w->fmt) {                                                \
    case FMT_Q8:                                                     \
        qdot_rows_fmt(FMT_Q8, a, M, w, j0, j1, xsum, c, ldc);        \
        break;                                                       \
    case FMT_Q4:                                                     \
        qdot_rows_fmt(FMT_Q4, a, M, w, j0, j1, xsum, c, ldc);        \
        break;                                                       \
    case FMT_Q2:                                                     \
        qdot_rows_fmt(FMT_Q2, a, M, w, j0, j1, xsum, c, ldc);        \
        break;                                                       \
    default:                                                         \
        qdot_rows_fmt(FMT_CCQ, a, M, w, j0, j1, xsum, c, ldc);       \
        break;                                                       \
    }

#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v3")))
static void qdot_rows_avx2(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    QDOT_ROWS_BY_FORMAT
}
#endif

static void qdot_rows_default(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    QDOT_ROWS_BY_FORMAT
}

/* The bytes one packed row takes. */
static inline int qmat_row_bytes(int fmt, int K) {
    switch (fmt) {
    case FMT_Q8:
        return K;
    case FMT_Q4:
        return K / 2;
    case FMT_Q2:
        return K / 4;
    default:
        return K / 4 + 2;
    }
}

#endif
