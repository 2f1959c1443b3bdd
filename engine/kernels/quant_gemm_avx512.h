/* The prefill-sized packed product (`matmul_dequant` of quant_cpu.c, above 8 token rows) for Q4
 * and Q8 in AVX-512, for the matrices `qgemm_avx512_handles` takes (below).
 *
 * The AVX2 build decodes 16 weight rows input-major (8 x 8 tiles and a transpose) and puts the
 * weights in the lanes; here the token rows are in the lanes instead, so weights are decoded in
 * their own row order with no transpose at all:
 *   - the token rows are transposed once per call into chunks of 32 (the last of 16 or 32, padded
 *     with zero rows): chunk element (k, t) at k * width + t, so a column k of 16 tokens is one load;
 *   - 96 weight rows x ~256 columns at a time are decoded row by row into a block that stays in
 *     L2 (Q4 through quant_dot_avx512.h's per-group 16-entry table and `vpermps`: one widening
 *     load, a shift and two permutes per 32 weights; Q8 widen, convert, one FMA);
 *   - a 12-row x 32-token tile keeps 24 accumulators in registers: per column k two token loads,
 *     12 weight broadcasts and 24 FMAs, against one load per FMA in the old 12 x 16 tile;
 *   - the accumulators leave to a [rows, tokens] scratch between column blocks (exact: fp32
 *     stores and loads) and are written to the output once, after the last block.
 * Each output is still one FMA chain over k in order from zero, and each decoded weight is
 * fma(level, scale, offset) as in the AVX2 decoder, so the bits equal the AVX2 build's: a token's
 * row does not depend on its batch, the tiles or the split (the tests check both). Q4's decoded
 * block holds each 32 columns as [even | odd]; the tiles read it at the permuted position, not in
 * the permuted order.
 *
 * Compiled for AVX-512 by target attributes and called only when the CPU has it (quant_path.h).
 */
#ifndef PDSERVE_KERNELS_QUANT_GEMM_AVX512_H
#define PDSERVE_KERNELS_QUANT_GEMM_AVX512_H

#include <stdlib.h>

#include "quant_dot.h"
#include "quant_dot_avx512.h"

#if defined(__x86_64__)

#define ZG_ROWS 12    /* weight rows of a tile */
#define ZG_TOKENS 32  /* token rows of a full chunk: two vectors */
#define ZG_BLOCK 96   /* weight rows decoded at once: eight tiles */
#ifndef ZG_COLUMNS
#define ZG_COLUMNS 256 /* columns decoded at once (a multiple of 32): the block's row stride */
#endif

/* The 16 x 16 transpose of r[0..15] (r[i][l] -> r[l][i]). */
INLINE_AVX512 void zg_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int h = 0; h < 2; h++) {
            const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + h + 2]);
            r[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    /* r[4q + s] now holds, in each 128-bit lane L, row block q's column 4L + s (4 rows). */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);      /* lanes 0, 2 of each */
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);  /* lanes 1, 3 */
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* The width (16 or 32 token rows) of the chunk that starts at token row t0 of mp (a multiple
 * of 16). */
static inline int zg_chunk_width(int t0, int mp) { return mp - t0 >= ZG_TOKENS ? ZG_TOKENS : 16; }

/* xt = a[0 .. M) transposed into chunks (see the top): chunk at token t0 starts at xt + t0 * K,
 * element (k, t) at k * width + t - t0; token rows M .. mp - 1 are zero. K a multiple of 16. */
AVX512_TARGET
static void zg_pack_tokens(const float *const *a, int M, int K, int mp, float *xt) {
    for (int t0 = 0; t0 < mp; t0 += ZG_TOKENS) {
        const int width = zg_chunk_width(t0, mp);
        float *chunk = xt + (size_t)t0 * K;
        for (int h = 0; h < width; h += 16)
            for (int k0 = 0; k0 < K; k0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = t0 + h + i < M ? _mm512_loadu_ps(a[t0 + h + i] + k0) : _mm512_setzero_ps();
                zg_transpose16(r);
                for (int l = 0; l < 16; l++) _mm512_storeu_ps(chunk + (size_t)(k0 + l) * width + h, r[l]);
            }
    }
}

/* buf[r * ZG_COLUMNS + p] = the weights of rows j0 + r (r < n; rows n .. rows - 1 zero) at
 * columns [k0, k0 + kc): Q8 in column order, Q4 each 32 columns [even | odd]. The row stride is
 * a constant so that the tiles address all 12 rows from one pointer. */
INLINE_AVX512 void zg_decode(int fmt, const QMat *w, int j0, int n, int rows, int k0, int kc, float *buf) {
    const int groups = w->K / w->group, step = fmt == FMT_Q4 ? 32 : 16;
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int r = 0; r < rows; r++) {
        float *dst = buf + (size_t)r * ZG_COLUMNS;
        if (r >= n) {
            memset(dst, 0, (size_t)kc * sizeof(float));
            continue;
        }
        const uint8_t *row = w->q + (size_t)(j0 + r) * w->row_bytes;
        const size_t at = (size_t)(j0 + r) * groups;
        int g = -1;
        __m512 s = _mm512_setzero_ps(), o = s, table = s;
        for (int k = k0; k < k0 + kc; k += step) {
            if (k / w->group != g) {
                g = k / w->group;
                s = _mm512_set1_ps(half_to_float(w->scale[at + g]));
                o = _mm512_set1_ps(half_to_float(w->offset[at + g]));
                table = _mm512_fmadd_ps(iota, s, o);
            }
            if (fmt == FMT_Q4) {
                const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
                _mm512_storeu_ps(dst + (k - k0), _mm512_permutexvar_ps(d, table));
                _mm512_storeu_ps(dst + (k - k0) + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table));
            } else {
                const __m512 level =
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k))));
                _mm512_storeu_ps(dst + (k - k0), _mm512_fmadd_ps(level, s, o));
            }
        }
    }
}

/* One column k of a tile: tokens x[0 .. 16 * T) times the ZG_ROWS weights at position p. */
#define ZG_STEP(k, p)                                                                     \
    do {                                                                                  \
        const __m512 x0 = _mm512_loadu_ps(x + (size_t)(k) * width);                      \
        const __m512 x1 = T == 2 ? _mm512_loadu_ps(x + (size_t)(k) * width + 16) : x0;    \
        for (int r = 0; r < ZG_ROWS; r++) {                                               \
            const __m512 wv = _mm512_set1_ps(buf[r * ZG_COLUMNS + (p)]);                    \
            acc[0][r] = _mm512_fmadd_ps(x0, wv, acc[0][r]);                               \
            if (T == 2) acc[1][r] = _mm512_fmadd_ps(x1, wv, acc[1][r]);                   \
        }                                                                                 \
    } while (0)

/* part[r * width + t] (+)= sum over the block's columns of x(k, t) * buf(r, k) for the tile's 12
 * rows and width = 16 * T tokens: from zero when `first`, else from part. x: the chunk at the
 * block's first column; `fmt` and T are constants where inlined. */
INLINE_AVX512 void zg_tile(
    int fmt, int T, const float *x, int width, const float *buf, int kc, float *part, int first) {
    __m512 acc[2][ZG_ROWS];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < ZG_ROWS; r++)
            acc[t][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (size_t)r * width + 16 * t);
    if (fmt == FMT_Q4) {
        for (int b = 0; b < kc; b += 32)
            for (int l = 0; l < 16; l++) {
                ZG_STEP(b + 2 * l, b + l);
                ZG_STEP(b + 2 * l + 1, b + 16 + l);
            }
    } else {
        for (int k = 0; k < kc; k++) ZG_STEP(k, k);
    }
    for (int t = 0; t < T; t++)
        for (int r = 0; r < ZG_ROWS; r++) _mm512_storeu_ps(part + (size_t)r * width + 16 * t, acc[t][r]);
}
#undef ZG_STEP

/* Every tile of a decoded block (`rows` weight rows, a multiple of ZG_ROWS) by every chunk. The
 * sums of the chunk at token t0 are part[t0 * ZG_BLOCK + r * width + t - t0]: a tile's are
 * contiguous (rows of all tokens, mp apart, put every row in the same L1 set). */
INLINE_AVX512 void zg_block_fmt(
    int fmt, const float *xt, int K, int mp, const float *buf, int rows, int k0, int kc, float *part, int first) {
    for (int t0 = 0; t0 < mp; t0 += ZG_TOKENS) {
        const int width = zg_chunk_width(t0, mp);
        const float *x = xt + (size_t)t0 * K + (size_t)k0 * width;
        for (int r0 = 0; r0 < rows; r0 += ZG_ROWS) {
            const float *b = buf + (size_t)r0 * ZG_COLUMNS;
            float *p = part + (size_t)t0 * ZG_BLOCK + (size_t)r0 * width;
            if (width == ZG_TOKENS)
                zg_tile(fmt, 2, x, width, b, kc, p, first);
            else
                zg_tile(fmt, 1, x, width, b, kc, p, first);
        }
    }
}

/* Decodes and multiplies one column block of weight rows [j, j + n) (see the top). */
AVX512_TARGET
static void zg_block(const QMat *w, int j, int n, int rows, int k0, int kc, const float *xt, int mp,
                     float *buf, float *part) {
    if (w->fmt == FMT_Q4) {
        zg_decode(FMT_Q4, w, j, n, rows, k0, kc, buf);
        zg_block_fmt(FMT_Q4, xt, w->K, mp, buf, rows, k0, kc, part, k0 == 0);
    } else {
        zg_decode(FMT_Q8, w, j, n, rows, k0, kc, buf);
        zg_block_fmt(FMT_Q8, xt, w->K, mp, buf, rows, k0, kc, part, k0 == 0);
    }
}

/* Whether qgemm_rows_avx512 takes `w`: Q4 in groups of 32 columns or more and Q8 in groups of 16
 * (the decode-sized kernel also takes Q2 and CCQ; this one does not decode them). */
static inline int qgemm_avx512_handles(const QMat *w) {
    return (w->fmt == FMT_Q4 && w->group % 32 == 0) || (w->fmt == FMT_Q8 && w->group % 16 == 0);
}

/* c[i * ldc + j] = dot(a[i], row j of w) for i < M, j in [j0, j1), for a matrix
 * qgemm_avx512_handles. Returns -1 when out of memory. */
AVX512_TARGET
static int qgemm_rows_avx512(const float *const *a, int M, const QMat *w, int j0, int j1, float *c, int ldc) {
    const int K = w->K, mp = (M + 15) / 16 * 16;
    float *xt = malloc(((size_t)mp * K + (size_t)ZG_BLOCK * ZG_COLUMNS + (size_t)ZG_BLOCK * mp) * sizeof(float));
    if (!xt) return -1;
    float *buf = xt + (size_t)mp * K, *part = buf + (size_t)ZG_BLOCK * ZG_COLUMNS;
    zg_pack_tokens(a, M, K, mp, xt);
    for (int j = j0; j < j1; j += ZG_BLOCK) {
        const int n = j1 - j < ZG_BLOCK ? j1 - j : ZG_BLOCK;
        const int rows = (n + ZG_ROWS - 1) / ZG_ROWS * ZG_ROWS;
        for (int k0 = 0; k0 < K; k0 += ZG_COLUMNS)
            zg_block(w, j, n, rows, k0, K - k0 < ZG_COLUMNS ? K - k0 : ZG_COLUMNS, xt, mp, buf, part);
        for (int i = 0; i < M; i++) {
            const int t0 = i / ZG_TOKENS * ZG_TOKENS, width = zg_chunk_width(t0, mp);
            const float *p = part + (size_t)t0 * ZG_BLOCK + (i - t0);
            for (int r = 0; r < n; r++) c[(size_t)i * ldc + j + r] = p[(size_t)r * width];
        }
    }
    free(xt);
    return 0;
}

#endif
#endif
