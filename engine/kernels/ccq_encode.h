/* The convolutional code's encoder (quant_dot.h's CCQ format): for each row, the bit string whose
 * overlapping CCQ_BITS-bit windows (2 new bits a weight) decode to the levels nearest the fp32
 * weights in squared error, given each group's scale and offset. A Viterbi search over the
 * 2^(CCQ_BITS - 2) states (the bits a window shares with the next): exact, K * 2^CCQ_BITS steps.
 *
 * Code c = t * 4 + lo moves to state t = c >> 2 and follows state c & (STATES - 1). At weight k
 *     d(c)     = fma(scale, level(c), offset) - w[k]
 *     total(c) = fma(d(c), d(c), cost[c & (STATES - 1)])     (cost = 0 before the first weight)
 *     cost'[t] = the first strictly smallest total(t * 4 + lo) over lo = 0..3, starting at FLT_MAX
 * Every rounding is spelled out (explicit fused multiply-adds): with `a * b + c` the compiler may
 * or may not fuse, and the two builds below would pick different codes at near-ties.
 *
 * Two builds of the forward search, bit for bit the same (the tests compare them on random and
 * tied inputs): a scalar loop (any x86-64 CPU) and an AVX-512 one that holds the 16 states in
 * one vector and runs CCQ_TILE rows at once, so that one row's dependency chain (permute, FMA,
 * compare, blend per lo) overlaps the others'. quant_path.h's choice picks the build; the
 * traceback is shared. Include after Python.h.
 */
#ifndef PDSERVE_KERNELS_CCQ_ENCODE_H
#define PDSERVE_KERNELS_CCQ_ENCODE_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "quant_path.h"

#define CCQ_STATES (1 << (CCQ_BITS - 2))
#define CCQ_TILE 4 /* rows the AVX-512 build searches at once */

/* The row's weights, the fp32 scale and offset of its groups, and where its search writes: the
 * K * STATES choices `back` and the final state costs `cost`. */
typedef struct {
    const float *w, *scale, *offset;
    uint8_t *back;
    float cost[CCQ_STATES];
} CcqRow;

/* The forward search of one row, scalar. */
VECTOR_CLONES
static void ccq_search_row(CcqRow *r, int K, int group) {
    float cost[CCQ_STATES] = {0}, next[CCQ_STATES], d[1 << CCQ_BITS];
    for (int k = 0; k < K; k++) {
        const float s = r->scale[k / group], o = r->offset[k / group];
        for (unsigned c = 0; c <= CCQ_MASK; c++) d[c] = fmaf(s, (float)((c * CCQ_MUL) & CCQ_MASK), o) - r->w[k];
        for (int t = 0; t < CCQ_STATES; t++) {
            float best = FLT_MAX;
            int arg = 0;
            for (int lo = 0; lo < 4; lo++) {
                const int c = t * 4 + lo;
                const float total = fmaf(d[c], d[c], cost[c & (CCQ_STATES - 1)]);
                if (total < best) best = total, arg = lo;
            }
            next[t] = best;
            r->back[(size_t)k * CCQ_STATES + t] = (uint8_t)arg;
        }
        memcpy(cost, next, sizeof cost);
    }
    memcpy(r->cost, cost, sizeof cost);
}

#if defined(__x86_64__)
/* The forward search of rows r[0 .. n), n <= CCQ_TILE (a constant where inlined). Per lo, the
 * 16 states' predecessors are a constant permutation, and their codes' decoded values
 * fma(scale, level, offset) are constant over a group: a weight's step is per lo a subtract (the
 * errors), a permute of the previous costs into state order, a fused multiply-add (the totals),
 * a compare and two blends (the cost, and the choice as a byte). */
INLINE_AVX512 void ccq_search_tile(CcqRow *r, int n, int K, int group) {
    __m512 level[4], cost[CCQ_TILE];
    __m512i from[4];
    for (int lo = 0; lo < 4; lo++) {
        float lv[CCQ_STATES];
        int32_t fr[CCQ_STATES];
        for (int t = 0; t < CCQ_STATES; t++) {
            const unsigned c = (unsigned)(t * 4 + lo);
            lv[t] = (float)((c * CCQ_MUL) & CCQ_MASK);
            fr[t] = (int32_t)(c & (CCQ_STATES - 1));
        }
        level[lo] = _mm512_loadu_ps(lv);
        from[lo] = _mm512_loadu_si512(fr);
    }
    for (int i = 0; i < n; i++) cost[i] = _mm512_setzero_ps();
    for (int g = 0; g < K / group; g++) {
        __m512 value[CCQ_TILE][4];
        for (int i = 0; i < n; i++)
            for (int lo = 0; lo < 4; lo++)
                value[i][lo] = _mm512_fmadd_ps(_mm512_set1_ps(r[i].scale[g]), level[lo], _mm512_set1_ps(r[i].offset[g]));
        for (int k = g * group; k < (g + 1) * group; k++) {
            for (int i = 0; i < n; i++) {
                const __m512 x = _mm512_set1_ps(r[i].w[k]);
                __m512 best = _mm512_set1_ps(FLT_MAX);
                __m128i arg = _mm_setzero_si128();
                for (int lo = 0; lo < 4; lo++) {
                    const __m512 d = _mm512_sub_ps(value[i][lo], x);
                    const __m512 total = _mm512_fmadd_ps(d, d, _mm512_permutexvar_ps(from[lo], cost[i]));
                    const __mmask16 less = _mm512_cmp_ps_mask(total, best, _CMP_LT_OQ);
                    best = _mm512_mask_blend_ps(less, best, total);
                    arg = _mm_mask_mov_epi8(arg, less, _mm_set1_epi8((char)lo));
                }
                cost[i] = best;
                _mm_storeu_si128((__m128i *)(r[i].back + (size_t)k * CCQ_STATES), arg);
            }
        }
    }
    for (int i = 0; i < n; i++) _mm512_storeu_ps(r[i].cost, cost[i]);
}

AVX512_TARGET
static void ccq_search_rows_avx512(CcqRow *r, int n, int K, int group) {
    switch (n) {
    case 4: ccq_search_tile(r, 4, K, group); break;
    case 3: ccq_search_tile(r, 3, K, group); break;
    case 2: ccq_search_tile(r, 2, K, group); break;
    default: ccq_search_tile(r, 1, K, group); break;
    }
}
#endif

/* The bit strings of searched rows r[0 .. n) into out[i] (qmat_row_bytes(FMT_CCQ, K) bytes), and
 * their K levels into levels[i] unless NULL (for the refit): from the cheapest final state (the
 * first on ties) back through the choices. The rows step together: each is a chain of dependent
 * loads, so n of them overlap. */
static void ccq_trace_back(const CcqRow *r, int n, int K, uint8_t *const *out, uint8_t *const *levels) {
    int t[CCQ_TILE];
    for (int i = 0; i < n; i++) {
        t[i] = 0;
        for (int s = 1; s < CCQ_STATES; s++)
            if (r[i].cost[s] < r[i].cost[t[i]]) t[i] = s;
        memset(out[i], 0, (size_t)qmat_row_bytes(FMT_CCQ, K));
        /* The last window's bits [2(K - 1), 2(K - 1) + CCQ_BITS) are all its own (the rest of the
         * row's padding); every earlier window k writes its low 2 bits, the rest coming after. */
        const unsigned c = (unsigned)t[i] * 4 + r[i].back[(size_t)(K - 1) * CCQ_STATES + t[i]];
        for (int b = 0; b < CCQ_BITS; b++)
            out[i][(2 * (K - 1) + b) / 8] |= (uint8_t)((c >> b & 1) << ((2 * (K - 1) + b) % 8));
        if (levels) levels[i][K - 1] = (uint8_t)((c * CCQ_MUL) & CCQ_MASK);
        t[i] = (int)(c & (CCQ_STATES - 1));
    }
    for (int k = K - 2; k >= 0; k--)
        for (int i = 0; i < n; i++) {
            const unsigned c = (unsigned)t[i] * 4 + r[i].back[(size_t)k * CCQ_STATES + t[i]];
            out[i][k / 4] |= (uint8_t)((c & 3) << (2 * (k % 4)));
            if (levels) levels[i][k] = (uint8_t)((c * CCQ_MUL) & CCQ_MASK);
            t[i] = (int)(c & (CCQ_STATES - 1));
        }
}

/* Encodes rows [j0, j1) of fp32 w [N, K] (fp32 scale and offset [N, K / group]) into `out`
 * ([N, row_bytes]), and their levels into `levels` ([N, K]) unless NULL, on the build
 * quant_path.h chose. `back` holds CCQ_TILE * K * STATES bytes. */
static void ccq_encode_rows(
    const float *w, const float *scale, const float *offset, uint8_t *out, uint8_t *levels, int K, int group,
    int j0, int j1, uint8_t *back) {
    const int groups = K / group, row_bytes = qmat_row_bytes(FMT_CCQ, K);
    const int tile = qdot_path() == QPATH_AVX512 ? CCQ_TILE : 1;
    CcqRow r[CCQ_TILE];
    for (int j = j0; j < j1; j += tile) {
        const int n = j1 - j < tile ? j1 - j : tile;
        for (int i = 0; i < n; i++)
            r[i] = (CcqRow){w + (size_t)(j + i) * K, scale + (size_t)(j + i) * groups,
                            offset + (size_t)(j + i) * groups, back + (size_t)i * K * CCQ_STATES, {0}};
#if defined(__x86_64__)
        if (tile > 1)
            ccq_search_rows_avx512(r, n, K, group);
        else
#endif
            ccq_search_row(r, K, group);
        uint8_t *row_out[CCQ_TILE], *row_levels[CCQ_TILE];
        for (int i = 0; i < n; i++) {
            row_out[i] = out + (size_t)(j + i) * row_bytes;
            row_levels[i] = levels ? levels + (size_t)(j + i) * K : NULL;
        }
        ccq_trace_back(r, n, K, row_out, levels ? row_levels : NULL);
    }
}

#endif
