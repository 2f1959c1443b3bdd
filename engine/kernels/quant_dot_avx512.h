/* The decode-sized packed product (`qdot_rows` of quant_dot.h) for Q4, Q8, Q2 and CCQ in 16-float AVX-512
 * vectors, for CPUs that run 512-bit operations natively (Intel Sapphire/Emerald Rapids measured:
 * DECISIONS.md, 2026-12-06, "wint4 decode in AVX-512").
 *
 * At one token row the 8-lane kernel is bound by its instructions, not by memory: per 8 weights a
 * broadcast load, a per-lane shift, a mask, a conversion and an FMA, and per group a scale and an
 * offset. Here:
 *   Q4  16 bytes (32 weights) widen to 16 dwords in one load (vpmovzxbd); lane l holds weights
 *       2l (low nibble) and 2l + 1 (high nibble). Each row's group has a 16-entry table of its
 *       weights, scale * level + offset (one FMA), and vpermps, which reads only an index's low 4
 *       bits, looks both nibbles up (the high ones after a shift): the weights come out scaled,
 *       with no conversion and nothing else per group. The token row is reordered once per call
 *       to match ([x0 x2 .. x30 | x1 x3 .. x31] per 32 columns), so the packed format and
 *       checkpoints stay as they are. ~6 operations per 32 weights and token row instead of ~22.
 *   Q8  16 bytes widen to 16 dwords (one load), a conversion, an FMA: 3 per 16 weights; the
 *       group's scale is applied to its sum, the offsets' share at the end (quant_dot.h's form).
 *   Q2  16 bytes (64 weights) widen to 16 dwords; lane l holds byte l, weights 4l .. 4l + 3
 *       (weight 4l + p at bits 2p), and the token row is reordered to match ([x0 x4 .. x60 | x1
 *       x5 .. | x2 .. | x3 ..] per 64 columns). Each row's group has a 16-entry table whose entry
 *       e is its weight for level e & 3, so `vpermps` of the dword shifted by 2p gives part p's
 *       weights scaled: per 64 weights one widening load, 3 shifts, 4 permutes and 4 FMAs.
 *   CCQ (with AVX512-VBMI) the rows of a pass are first decoded to byte levels, 64 at a time:
 *       one 17-byte load, `vpermb` spreads it into 8 overlapping qwords (qword q: bytes 2q ..
 *       2q + 7), `vpmultishiftqb` cuts each weight's 6-bit window out of its qword, and `vpermb`
 *       maps the 64 codes to their levels (a 64-byte table): 3 operations for 64 weights, no
 *       multiply. The levels then go through the Q8 tile.
 * Each output's summation order depends only on K and the group, not on M, on the tile or on the
 * part, so a token's result does not depend on its batch (the tests check it); it differs from
 * the 8-lane path's by rounding only.
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
#define Z_WIDE 4   /* weight rows per pass at most */

/* sc[r * groups + G], of[...] = the fp32 scale and offset of group G of row j0 + r, r < n. */
INLINE_AVX512 void z_scales(const QMat *w, int j0, int n, float *sc, float *of) {
    const int groups = w->K / w->group;
    for (int r = 0; r < n; r++) {
        const size_t at = (size_t)(j0 + r) * groups;
        float *s = sc + (size_t)r * groups, *o = of + (size_t)r * groups;
        int g = 0;
        for (; g + 16 <= groups; g += 16) {
            _mm512_storeu_ps(s + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scale + at + g))));
            _mm512_storeu_ps(o + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->offset + at + g))));
        }
        for (; g < groups; g++) s[g] = half_to_float(w->scale[at + g]), o[g] = half_to_float(w->offset[at + g]);
    }
}

/* Asks for the cache line at byte `at` of the n rows after rows[0 .. n): the next pass's, while
 * this one computes. The hardware prefetcher alone left one thread at 5 GB/s on the q4 LM head
 * (2560 x 103424: 25.8 ms), with this 9 GB/s (14.4 ms; DECISIONS.md 2026-12-06). */
INLINE_AVX512 void z_prefetch_next(const uint8_t *const *rows, int n, int row_bytes, size_t at) {
    for (int j = 0; j < n; j++) _mm_prefetch((const char *)(rows[j] + (size_t)n * row_bytes + at), _MM_HINT_T0);
}

/* table[j] = scale * levels + offset of group g of weight row j (j < n): the 16 weights a lane's
 * level index stands for, which `vpermps` then picks (Q4's 16 levels, Q2's 4 repeated). */
INLINE_AVX512 void z_group_tables(
    int n, __m512 levels, const float *sc, const float *of, int groups, int g, __m512 *table) {
    for (int j = 0; j < n; j++)
        table[j] = _mm512_fmadd_ps(levels, _mm512_set1_ps(sc[(size_t)j * groups + g]),
                                   _mm512_set1_ps(of[(size_t)j * groups + g]));
}

/* Q4, token rows a[i] (i < m, in the block order above) by weight rows [j0, j0 + n). Per group
 * and row a 16-entry table, scale * level + offset for the 16 levels, and `vpermps` (which reads
 * the low 4 bits of each index) turns the nibbles into weights: per 32 weights one widening
 * load, one shift, two permutes and an FMA per token row for each half, nothing per group but
 * the table. Even and odd weights sum in separate accumulators, added at the end. Called with
 * constant m and n (m * n <= 8). */
INLINE_AVX512 void z4_tile(
    int m, int n, const float *const *a, const QMat *w, int j0, const float *sc, const float *of, float *c,
    int ldc) {
    const int groups = w->K / w->group, blocks = w->group / 32;
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 even[Z_TOKENS][Z_WIDE], odd[Z_TOKENS][Z_WIDE];
    const uint8_t *row[Z_WIDE];
    for (int j = 0; j < n; j++) row[j] = w->q + (size_t)(j0 + j) * w->row_bytes;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) even[i][j] = odd[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 table[Z_WIDE];
        z_group_tables(n, iota, sc, of, groups, g, table);
        for (int b = g * blocks; b < (g + 1) * blocks; b++) {
            __m512 lo[Z_WIDE], hi[Z_WIDE];
            if ((b & 3) == 0) z_prefetch_next(row, n, w->row_bytes, (size_t)16 * b);
            for (int j = 0; j < n; j++) {
                const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row[j] + (size_t)16 * b)));
                lo[j] = _mm512_permutexvar_ps(d, table[j]);
                hi[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table[j]);
            }
            for (int i = 0; i < m; i++) {
                const __m512 xl = _mm512_loadu_ps(a[i] + (size_t)32 * b), xh = _mm512_loadu_ps(a[i] + (size_t)32 * b + 16);
                for (int j = 0; j < n; j++) {
                    even[i][j] = _mm512_fmadd_ps(xl, lo[j], even[i][j]);
                    odd[i][j] = _mm512_fmadd_ps(xh, hi[j], odd[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
            c[(size_t)i * ldc + j0 + j] = _mm512_reduce_add_ps(_mm512_add_ps(even[i][j], odd[i][j]));
}

/* Q8, as quant_dot.h's qdot_tile: per group x . levels (16 bytes widened, converted, an FMA),
 * times the group's scale; the offsets' share, sum over groups of offset * sum(x), at the end
 * in 16-group vectors. Called with constant m and n (m * n <= 8). */
INLINE_AVX512 void z8_tile(
    int m, int n, const float *const *a, const QMat *w, int j0, const float *xsum, const float *sc,
    const float *of, float *c, int ldc) {
    const int groups = w->K / w->group, blocks = w->group / 16;
    __m512 tot[Z_TOKENS][Z_WIDE];
    const uint8_t *row[Z_WIDE];
    for (int j = 0; j < n; j++) row[j] = w->q + (size_t)(j0 + j) * w->row_bytes;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) tot[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 acc[Z_TOKENS][Z_WIDE];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) acc[i][j] = _mm512_setzero_ps();
        for (int b = g * blocks; b < (g + 1) * blocks; b++) {
            __m512 lv[Z_WIDE];
            if ((b & 3) == 0) z_prefetch_next(row, n, w->row_bytes, (size_t)16 * b);
            for (int j = 0; j < n; j++)
                lv[j] = _mm512_cvtepi32_ps(
                    _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row[j] + (size_t)16 * b))));
            for (int i = 0; i < m; i++) {
                const __m512 xv = _mm512_loadu_ps(a[i] + (size_t)16 * b);
                for (int j = 0; j < n; j++) acc[i][j] = _mm512_fmadd_ps(xv, lv[j], acc[i][j]);
            }
        }
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++)
                tot[i][j] = _mm512_fmadd_ps(acc[i][j], _mm512_set1_ps(sc[(size_t)j * groups + g]), tot[i][j]);
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            __m512 off = _mm512_setzero_ps();
            const float *o = of + (size_t)j * groups, *xs = xsum + (size_t)i * groups;
            for (int g = 0; g < groups; g += 16) {
                const __mmask16 live = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
                off = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, o + g), _mm512_maskz_loadu_ps(live, xs + g), off);
            }
            c[(size_t)i * ldc + j0 + j] = _mm512_reduce_add_ps(tot[i][j]) + _mm512_reduce_add_ps(off);
        }
}

/* Q2, token rows a[i] (i < m, in the 64-column order above) by weight rows [j0, j0 + n): per 64
 * weights and row a widening load, and per part a shift and a `vpermps` through the group's
 * table, then an FMA per token row. Parts 0 and 2 sum in one accumulator, 1 and 3 in another,
 * added at the end. Called with constant m and n (m * n <= 8). */
INLINE_AVX512 void z2_tile(
    int m, int n, const float *const *a, const QMat *w, int j0, const float *sc, const float *of, float *c,
    int ldc) {
    const int groups = w->K / w->group, blocks = w->group / 64;
    const __m512 level = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    __m512 even[Z_TOKENS][Z_WIDE], odd[Z_TOKENS][Z_WIDE];
    const uint8_t *row[Z_WIDE];
    for (int j = 0; j < n; j++) row[j] = w->q + (size_t)(j0 + j) * w->row_bytes;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) even[i][j] = odd[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 table[Z_WIDE];
        z_group_tables(n, level, sc, of, groups, g, table);
        for (int b = g * blocks; b < (g + 1) * blocks; b++) {
            __m512i bits[Z_WIDE];
            if ((b & 3) == 0) z_prefetch_next(row, n, w->row_bytes, (size_t)16 * b);
            for (int j = 0; j < n; j++)
                bits[j] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row[j] + (size_t)16 * b)));
            for (int p = 0; p < 4; p++) {
                __m512 wv[Z_WIDE];
                for (int j = 0; j < n; j++)
                    wv[j] = _mm512_permutexvar_ps(p ? _mm512_srli_epi32(bits[j], 2 * p) : bits[j], table[j]);
                for (int i = 0; i < m; i++) {
                    const __m512 xv = _mm512_loadu_ps(a[i] + (size_t)64 * b + 16 * p);
                    for (int j = 0; j < n; j++) {
                        if (p & 1)
                            odd[i][j] = _mm512_fmadd_ps(xv, wv[j], odd[i][j]);
                        else
                            even[i][j] = _mm512_fmadd_ps(xv, wv[j], even[i][j]);
                    }
                }
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
            c[(size_t)i * ldc + j0 + j] = _mm512_reduce_add_ps(_mm512_add_ps(even[i][j], odd[i][j]));
}

/* levels[j * K + k] = the level of weight k of row j0 + j, j < n, for a CCQ matrix (the VBMI
 * decoding above), asking for the next pass's rows meanwhile. Needs AVX512-VBMI. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
static void z_ccq_levels(const QMat *w, int j0, int n, uint8_t *levels) {
    uint8_t spread[64], shift[64], table[64];
    for (int i = 0; i < 64; i++) {
        spread[i] = (uint8_t)(2 * (i / 8) + i % 8); /* qword q: row bytes 2q .. 2q + 7 */
        shift[i] = (uint8_t)(2 * (i % 8));         /* weight 8q + i % 8 at bit 2 (i % 8) of it */
        table[i] = (uint8_t)(((unsigned)i * CCQ_MUL) & CCQ_MASK);
    }
    const __m512i sp = _mm512_loadu_si512(spread), sh = _mm512_loadu_si512(shift), lv = _mm512_loadu_si512(table);
    for (int j = 0; j < n; j++) {
        const uint8_t *row = w->q + (size_t)(j0 + j) * w->row_bytes, *next = row + (size_t)n * w->row_bytes;
        for (int b = 0; b < w->K / 64; b++) {
            if ((b & 3) == 0) _mm_prefetch((const char *)(next + (size_t)16 * b), _MM_HINT_T0);
            /* Bytes 16b .. 16b + 16: the 17th holds the last window's high bits (a row's last
             * block reads its padding). */
            const __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)0x1FFFF, row + (size_t)16 * b);
            const __m512i codes = _mm512_multishift_epi64_epi8(sh, _mm512_permutexvar_epi8(sp, raw));
            _mm512_storeu_si512(levels + (size_t)j * w->K + (size_t)64 * b, _mm512_permutexvar_epi8(codes, lv));
        }
    }
}

/* Rows [j0, j1) for token rows a[0 .. m): `wide` weight rows a pass (their scales converted
 * into sc/of first), then single rows. */
#define Z_TILE(fmt, m, n, j)                                                                 \
    do {                                                                                     \
        z_scales(w, j, n, sc, of);                                                           \
        if (fmt == FMT_Q4) {                                                                 \
            z4_tile(m, n, a, w, j, sc, of, c, ldc);                                          \
        } else if (fmt == FMT_Q2) {                                                          \
            z2_tile(m, n, a, w, j, sc, of, c, ldc);                                          \
        } else if (fmt == FMT_CCQ) {                                                         \
            z_ccq_levels(w, j, n, levels);                                                   \
            QMat decoded = *w;                                                               \
            decoded.q = levels, decoded.fmt = FMT_Q8, decoded.row_bytes = w->K;              \
            z8_tile(m, n, a, &decoded, 0, xsum, sc, of, c + j, ldc);                         \
        } else {                                                                             \
            z8_tile(m, n, a, w, j, xsum, sc, of, c, ldc);                                    \
        }                                                                                    \
    } while (0)

#define Z_ROWS_FOR(fmt, m, wide)                                                             \
    do {                                                                                     \
        int j = j0;                                                                          \
        for (; j + (wide) <= j1; j += (wide)) Z_TILE(fmt, m, wide, j);                       \
        for (; j < j1; j++) Z_TILE(fmt, m, 1, j);                                            \
    } while (0)

/* `levels`: K * Z_WIDE bytes for a CCQ pass's decoded rows. */
INLINE_AVX512 void z_rows_fmt(
    int fmt, const float *const *a, int m, const QMat *w, int j0, int j1, const float *xsum, float *sc,
    float *of, uint8_t *levels, float *c, int ldc) {
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

/* True when this path handles w: Q4 with groups of whole 32-weight blocks, Q8 of 16, Q2 of 64,
 * and CCQ of 64 on CPUs with AVX512-VBMI. */
static inline int qdot_avx512_handles(const QMat *w) {
    static int vbmi = -1;
    if (vbmi < 0) vbmi = __builtin_cpu_supports("avx512vbmi");
    return (w->fmt == FMT_Q4 && w->group % 32 == 0) || (w->fmt == FMT_Q8 && w->group % 16 == 0) ||
           (w->fmt == FMT_Q2 && w->group % 64 == 0) || (w->fmt == FMT_CCQ && w->group % 64 == 0 && vbmi);
}

/* dst = src with each 64 columns reordered to [x0 x4 .. x60 | x1 x5 .. | x2 .. | x3 ..] (the Q2
 * block order above). */
AVX512_TARGET
static void z_split_quarters(const float *src, int K, float *dst) {
    for (int k = 0; k < K; k += 64)
        for (int p = 0; p < 4; p++)
            for (int l = 0; l < 16; l++) dst[k + 16 * p + l] = src[k + 4 * l + p];
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
 * j in [j0, j1). Returns -1 when out of memory (scratch: the token rows' reordered copy for Q4
 * and Q2, the fp32 scales and offsets of the rows in a pass, and CCQ's decoded levels). */
AVX512_TARGET
static int qdot_rows_avx512(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    const int groups = w->K / w->group, reorder = w->fmt == FMT_Q4 || w->fmt == FMT_Q2;
    const float *rows[Z_TOKENS];
    const size_t split_floats = reorder ? (size_t)(M < Z_TOKENS ? M : Z_TOKENS) * w->K : 0;
    const size_t level_floats = w->fmt == FMT_CCQ ? (size_t)Z_WIDE * w->K / sizeof(float) : 0;
    float *scratch = malloc((split_floats + (size_t)2 * Z_WIDE * groups + level_floats) * sizeof(float));
    if (!scratch) return -1;
    float *sc = scratch + split_floats, *of = sc + (size_t)Z_WIDE * groups;
    uint8_t *levels = (uint8_t *)(of + (size_t)Z_WIDE * groups);
    for (int m0 = 0; m0 < M; m0 += Z_TOKENS) {
        const int m = M - m0 < Z_TOKENS ? M - m0 : Z_TOKENS;
        for (int i = 0; i < m; i++) {
            rows[i] = a[m0 + i];
            if (reorder) {
                float *dst = scratch + (size_t)i * w->K;
                if (w->fmt == FMT_Q4)
                    z_split_even_odd(a[m0 + i], w->K, dst);
                else
                    z_split_quarters(a[m0 + i], w->K, dst);
                rows[i] = dst;
            }
        }
        const float *xs = xsum + (size_t)m0 * groups;
        float *cm = c + (size_t)m0 * ldc;
        switch (w->fmt) {
        case FMT_Q4: z_rows_fmt(FMT_Q4, rows, m, w, j0, j1, xs, sc, of, levels, cm, ldc); break;
        case FMT_Q8: z_rows_fmt(FMT_Q8, rows, m, w, j0, j1, xs, sc, of, levels, cm, ldc); break;
        case FMT_Q2: z_rows_fmt(FMT_Q2, rows, m, w, j0, j1, xs, sc, of, levels, cm, ldc); break;
        default: z_rows_fmt(FMT_CCQ, rows, m, w, j0, j1, xs, sc, of, levels, cm, ldc); break;
        }
    }
    free(scratch);
    return 0;
}

#else
static inline int qdot_avx512_handles(const QMat *w) {
    (void)w;
    return 0; /* not x86-64: never chosen (quant_path.h) */
}
#endif

#endif
