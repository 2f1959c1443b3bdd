/* Attention of a step's short sequences (decodes, speculative verifications) over the paged KV
 * cache, on the CPU, in fp32.
 *
 * The torch path gathers every sequence's K and V into padded [B, KVH, Cmax, D] copies
 * (`index_select`), builds a [B, 1, Q, Cmax] mask and calls SDPA: for a decode step that is
 * mostly copying, allocation and per-op dispatch, while the arithmetic (a few MFLOP) is small.
 * Here each sequence reads its K/V rows straight from the cache through its block table, a
 * tile of positions at a time, and every query head sharing a kv head (grouped-query
 * attention) and every query row of the sequence uses the tile while it is in L1. Measured on
 * the demo model's shape at batch 32 with 128-256 positions of context (AMD EPYC, 2 vCPUs):
 * 0.65-0.78 ms per layer in the engine against 1.46-1.76 for the torch path (0.26-0.43 against
 * 0.9-1.3 with K/V in cache); ERNIE 4.5 0.3B's shape, 1.9 against 6.2 ms. In the engine about
 * half of it is waiting for K/V from memory, which the other layers evict between steps.
 *
 * Per query, the softmax is computed online (flash-attention style): keys come in tiles of
 * TILE positions; a tile's scores are masked causally (query j of a sequence with n new tokens
 * and context c sits at position c - n + j and sees positions <= its own), the running maximum
 * and sum are updated, and the running output is rescaled before the tile's weighted V rows
 * are added. Tiles start at absolute positions 0, TILE, 2 TILE, ... and every sum runs in a
 * fixed order, so a query's result depends only on its own q and context: not on the batch,
 * on the other query rows of its sequence, nor on how the work is split among parts.
 *
 * `attend` runs the (sequence, kv head) pairs that `part` of `parts` owns, with the GIL
 * released, so Python threads run the parts side by side; each pair writes its own output
 * rows, so the parts share `out` without locks. The two vCPUs of the machine measured share
 * their FMA units, so a second part gains little while K/V sit in cache; it pays when they
 * come from memory (a decode's usual case: the other layers evict them between steps).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector.h"
#include "work_split.h"

#define TILE 16    /* key positions per online-softmax step: two vectors of scores */
#define D_CHUNK 64 /* output floats (8 vectors) kept in registers while a tile's V rows pass */
#define PREFETCH_TILES 2 /* how many tiles ahead K/V rows are requested */

INLINE v8 vmax(v8 a, v8 b) { return lane_select(a > b, a, b); }

INLINE float hmax(v8 v) {
    const v8i swap4 = {4, 5, 6, 7, 0, 1, 2, 3}, swap2 = {2, 3, 0, 1, 6, 7, 4, 5}, swap1 = {1, 0, 3, 2, 5, 4, 7, 6};
    v = vmax(v, __builtin_shuffle(v, swap4));
    v = vmax(v, __builtin_shuffle(v, swap2));
    return vmax(v, __builtin_shuffle(v, swap1))[0];
}

/* Lanes (a0 + a1, a2 + a3, b0 + b1, b2 + b3, a4 + a5, a6 + a7, b4 + b5, b6 + b7): AVX's hadd. */
INLINE v8 hadd(v8 a, v8 b) {
    const v8i even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

/* (hsum(a[0]), ..., hsum(a[7])): eight dot products' partial sums reduced into one vector. */
INLINE v8 reduce8(const v8 *a) {
    v8 s0123 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
    v8 s4567 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
    return __builtin_shuffle(s0123, s4567, lo) + __builtin_shuffle(s0123, s4567, hi);
}

/* The dot products of q with the eight rows k[0..7], each of D floats (D a multiple of 8). */
INLINE v8 scores8(const float *q, const float *const *k, int D) {
    v8 acc[8] = {{0}};
    for (int d = 0; d < D; d += 8) {
        v8 qv = *(const v8 *)(q + d);
        for (int i = 0; i < 8; i++) acc[i] += qv * *(const v8 *)(k[i] + d);
    }
    return reduce8(acc);
}

/* acc[0 : 8 nc] = acc * corr + sum over t < nt of w[t] * v[t][0 : 8 nc], the nc vectors held
 * in registers while the nt rows pass. Called with a constant nc, so the loops unroll. */
INLINE void weighted_rows(int nc, float *acc, float corr, const float *w, const float *const *v, int nt,
                          int d0) {
    v8 a[D_CHUNK / 8];
    for (int c = 0; c < nc; c++) a[c] = *(const v8 *)(acc + 8 * c) * corr;
    for (int t = 0; t < nt; t++) {
        const float *row = v[t] + d0;
        const float wt = w[t];
        for (int c = 0; c < nc; c++) a[c] += wt * *(const v8 *)(row + 8 * c);
    }
    for (int c = 0; c < nc; c++) *(v8 *)(acc + 8 * c) = a[c];
}

/* weighted_rows over all D floats, in chunks of D_CHUNK and a tail of D_CHUNK - 8 or less. */
INLINE void accumulate(float *acc, float corr, const float *w, const float *const *v, int nt, int D) {
    int d0 = 0;
    for (; d0 + D_CHUNK <= D; d0 += D_CHUNK) weighted_rows(D_CHUNK / 8, acc + d0, corr, w, v, nt, d0);
    switch ((D - d0) / 8) {
        case 7: weighted_rows(7, acc + d0, corr, w, v, nt, d0); break;
        case 6: weighted_rows(6, acc + d0, corr, w, v, nt, d0); break;
        case 5: weighted_rows(5, acc + d0, corr, w, v, nt, d0); break;
        case 4: weighted_rows(4, acc + d0, corr, w, v, nt, d0); break;
        case 3: weighted_rows(3, acc + d0, corr, w, v, nt, d0); break;
        case 2: weighted_rows(2, acc + d0, corr, w, v, nt, d0); break;
        case 1: weighted_rows(1, acc + d0, corr, w, v, nt, d0); break;
        default: break;
    }
}

typedef struct {
    const float *q;         /* [T, H, D] */
    const float *k, *v;     /* the cache's K and V planes: [num_blocks * block_size, KVH, D] */
    const int64_t *rows;    /* [B, Q]: sequence b's j-th query is row rows[b, j] of q and out */
    const int32_t *qlens;   /* [B] query rows of each sequence (the first qlens[b] of rows[b]) */
    const int32_t *ctxlens; /* [B] context length of each sequence, its new tokens included */
    const int32_t *tables;  /* [B, max_blocks] block ids */
    float *out;             /* [T, H, D] */
    float scale;
    int T, B, Q, H, KVH, D, block_size, max_blocks, num_blocks;
} Problem;

/* slots[t]: the offset of position p0 + t's K (and V) rows, all kv heads, in its plane, for
 * t < TILE (p0 < ctx). Positions past the context get the last position's (their scores are
 * masked), so nothing outside the sequence's blocks is read. */
INLINE void tile_slots(const Problem *p, const int32_t *table, int p0, int ctx, size_t slots[TILE]) {
    const int bs = p->block_size;
    const size_t slot_stride = (size_t)p->KVH * p->D;
    int block = p0 / bs, offset = p0 % bs;
    for (int t = 0; t < TILE; t++) {
        slots[t] = ((size_t)table[block] * bs + offset) * slot_stride;
        if (p0 + t < ctx - 1 && ++offset == bs) {
            offset = 0;
            block++;
        }
    }
}

/* Requests the K and V rows of kv heads h_lo .. h_hi - 1 at positions p0 .. p0 + TILE - 1. */
INLINE void prefetch_tile(const Problem *p, const int32_t *table, int p0, int ctx, int h_lo, int h_hi) {
    size_t slots[TILE];
    tile_slots(p, table, p0, ctx, slots);
    for (int t = 0; t < TILE; t++)
        for (int d = h_lo * p->D; d < h_hi * p->D; d += 16) {
            __builtin_prefetch(p->k + slots[t] + d);
            __builtin_prefetch(p->v + slots[t] + d);
        }
}

/* Scratch for one call of attend_heads: the running state of its M = heads * n * G queries
 * (query m is kv head m / (n G), row j = m / G % n of the sequence, head g = m % G of the
 * group). Arrays indexed by query are padded to a multiple of 8 for the vectorised rescale. */
typedef struct {
    float *q;      /* [M, D] the queries, times the scale */
    float *acc;    /* [M, D] running (unnormalised) outputs */
    float *scores; /* [M, TILE] this tile's scaled scores, then their weights */
    float *mx;     /* [M] running maxima of the scaled scores */
    float *new_mx; /* [M] maxima with this tile's scores */
    float *corr;   /* [M] e^(mx - new_mx): how much the running sums shrink */
    float *sum;    /* [M] running sums of e^(score - max) */
    float **op;
    int *limit; /* [M] last context position each query sees */
} Scratch;

/* Sequence b's attention for kv heads h_lo .. h_hi - 1: all its query rows, and the G query
 * heads of each.
 *
 * The heads go together through each tile of positions: a position's K (and V) rows of all
 * kv heads lie side by side in the cache, so a tile reads contiguous runs of memory, and the
 * next tile's runs are prefetched while this one is computed (a sequence's blocks lie
 * anywhere in the cache, and a decode reads each row once). Each tile goes in three passes
 * over the queries: scores and their maxima, the rescale factors (eight queries per vector),
 * then weights and weighted V rows. A query's softmax bookkeeping is a chain of dependent
 * steps; passes over independent queries let the CPU overlap those chains. */
VECTOR_CLONES
static void attend_heads(const Problem *p, const Scratch *s, int b, int h_lo, int h_hi) {
    const int G = p->H / p->KVH, D = p->D;
    const int n = p->qlens[b], ctx = p->ctxlens[b], per_head = n * G, M = (h_hi - h_lo) * per_head;
    const int32_t *table = p->tables + (size_t)b * p->max_blocks;
    for (int h = h_lo; h < h_hi; h++)
        for (int j = 0; j < n; j++) {
            size_t row = (size_t)p->rows[(size_t)b * p->Q + j];
            for (int g = 0; g < G; g++) {
                int m = (h - h_lo) * per_head + j * G + g;
                size_t offset = (row * p->H + (size_t)h * G + g) * D;
                /* The query times the scale, once, rather than every score. */
                for (int d = 0; d < D; d++) s->q[(size_t)m * D + d] = p->q[offset + d] * p->scale;
                s->op[m] = p->out + offset;
                s->limit[m] = ctx - n + j;
            }
        }
    const int padded = (M + 7) / 8 * 8;
    for (int m = 0; m < padded; m++) {
        s->mx[m] = m < M ? -INFINITY : 0.0f;
        s->new_mx[m] = 0.0f;
        s->sum[m] = 0.0f;
    }
    memset(s->acc, 0, (size_t)M * D * sizeof(float));

    /* A sequence's blocks lie anywhere in the cache, and a decode reads each row once, from
     * memory more often than not (the layers between two steps evict it): the rows of the tile
     * PREFETCH_TILES ahead are requested while this one is computed. */
    for (int p0 = 0; p0 < PREFETCH_TILES * TILE && p0 < ctx; p0 += TILE)
        prefetch_tile(p, table, p0, ctx, h_lo, h_hi);
    size_t slots[TILE];
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8 neg_inf = (v8){0} - INFINITY;
    const float *kp[TILE], *vp[TILE];
    for (int p0 = 0; p0 < ctx; p0 += TILE) {
        const int ahead = p0 + PREFETCH_TILES * TILE;
        if (ahead < ctx) prefetch_tile(p, table, ahead, ctx, h_lo, h_hi);
        tile_slots(p, table, p0, ctx, slots);
        /* Limits grow with the row, so the queries of a head that see this tile (lim >= p0)
         * are its last ones: a verification's earlier rows stop before the last tiles. */
        const int first_row = p0 - (ctx - n);
        const int skipped = first_row > 0 ? first_row * G : 0;

        for (int h = h_lo; h < h_hi; h++) {
            for (int t = 0; t < TILE; t++) kp[t] = p->k + slots[t] + (size_t)h * D;
            const int m1 = (h - h_lo + 1) * per_head;
            for (int m = m1 - per_head + skipped; m < m1; m++) {
                const int lim = s->limit[m];
                const float *qm = s->q + (size_t)m * D;
                float *sc = s->scores + (size_t)m * TILE;
                v8 tile_max = neg_inf;
                for (int i = 0; i < TILE / 8; i++) {
                    v8 v = scores8(qm, kp + 8 * i, D);
                    if (p0 + 8 * i + 7 > lim) /* the context's or the query's last tile */
                        v = lane_select((lane + (p0 + 8 * i)) <= lim, v, neg_inf);
                    tile_max = vmax(tile_max, v);
                    memcpy(sc + 8 * i, &v, sizeof v);
                }
                float t_max = hmax(tile_max), old = s->mx[m];
                s->new_mx[m] = old > t_max ? old : t_max;
            }
        }
        /* Queries that skip this tile get a factor too, unused. On a query's first tile the
         * factor is e^(-inf) = 0, times a sum and an output still 0. */
        for (int m = 0; m < M; m += 8) {
            v8 c = exp8(*(const v8 *)(s->mx + m) - *(const v8 *)(s->new_mx + m));
            memcpy(s->corr + m, &c, sizeof c);
        }
        for (int h = h_lo; h < h_hi; h++) {
            for (int t = 0; t < TILE; t++) vp[t] = p->v + slots[t] + (size_t)h * D;
            const int m1 = (h - h_lo + 1) * per_head;
            for (int m = m1 - per_head + skipped; m < m1; m++) {
                const int lim = s->limit[m];
                const float new_max = s->new_mx[m];
                float *w = s->scores + (size_t)m * TILE;
                v8 total = {0};
                for (int i = 0; i < TILE / 8; i++) {
                    v8 e = exp8(*(const v8 *)(w + 8 * i) - new_max); /* masked lanes: -inf, so 0 */
                    total += e;
                    memcpy(w + 8 * i, &e, sizeof e);
                }
                const float corr = s->corr[m];
                s->sum[m] = s->sum[m] * corr + hsum(total);
                s->mx[m] = new_max;
                int nt = lim - p0 + 1 < TILE ? lim - p0 + 1 : TILE;
                accumulate(s->acc + (size_t)m * D, corr, w, vp, nt, D);
            }
        }
    }
    for (int m = 0; m < M; m++) {
        const float inv = 1.0f / s->sum[m];
        const float *a = s->acc + (size_t)m * D;
        for (int d = 0; d < D; d++) s->op[m][d] = a[d] * inv;
    }
}

static int run_part(const Problem *p, int part, int parts) {
    if (p->B == 0) return 0;
#if defined(__x86_64__)
    /* Flush denormals to zero while this thread computes: a weight near e^-87 times a V value
     * is a denormal product, and with real activations (scores spread far apart) enough of
     * them occur to make the call 1.5x slower. What they drop is below 1e-38. */
    const unsigned int mxcsr = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(mxcsr | 0x8040); /* FTZ | DAZ */
#endif
    const size_t M = (size_t)p->Q * p->H, padded = (M + 7) / 8 * 8;
    Scratch s;
    s.q = malloc(M * p->D * sizeof(float));
    s.acc = malloc(M * p->D * sizeof(float));
    s.scores = malloc(M * TILE * sizeof(float));
    s.mx = malloc(padded * sizeof(float));
    s.new_mx = malloc(padded * sizeof(float));
    s.corr = malloc(padded * sizeof(float));
    s.sum = malloc(padded * sizeof(float));
    s.op = malloc(M * sizeof(float *));
    s.limit = malloc(M * sizeof(int));
    /* The (sequence, kv head) pairs, in order b * KVH + h, split by cost: query rows x context,
     * plus a fixed cost per pair for its setup. */
    const int pairs = p->B * p->KVH;
    double *cost = malloc((size_t)pairs * sizeof(double));
    int rc = -1;
    if (s.q && s.acc && s.scores && s.mx && s.new_mx && s.corr && s.sum && s.op && s.limit && cost) {
        for (int i = 0; i < pairs; i++) cost[i] = 64.0 + (double)p->qlens[i / p->KVH] * p->ctxlens[i / p->KVH];
        int lo, hi;
        owned_range(cost, pairs, part, parts, &lo, &hi);
        /* Each sequence's run of owned pairs in one call: all its kv heads, mostly. */
        for (int i = lo; i < hi;) {
            int b = i / p->KVH, h_lo = i % p->KVH;
            int h_hi = hi - i < p->KVH - h_lo ? h_lo + (hi - i) : p->KVH;
            attend_heads(p, &s, b, h_lo, h_hi);
            i += h_hi - h_lo;
        }
        rc = 0;
    }
    free(s.q), free(s.acc), free(s.scores), free(s.mx), free(s.new_mx), free(s.corr), free(s.sum);
    free(s.op), free(s.limit), free(cost);
#if defined(__x86_64__)
    __builtin_ia32_ldmxcsr(mxcsr);
#endif
    return rc;
}

/* NULL when the indices are consistent, else what is wrong (every read must stay in bounds). */
static const char *check(const Problem *p) {
    for (int b = 0; b < p->B; b++) {
        const int n = p->qlens[b], ctx = p->ctxlens[b];
        if (n < 1 || n > p->Q) return "a query length is not in 1..Q";
        if (ctx < n) return "a context length is shorter than its query length";
        if (ctx > (int64_t)p->max_blocks * p->block_size) return "a context is longer than its block table";
        for (int j = 0; j < n; j++) {
            int64_t row = p->rows[(size_t)b * p->Q + j];
            if (row < 0 || row >= p->T) return "a query row is out of range";
        }
        const int32_t *table = p->tables + (size_t)b * p->max_blocks;
        for (int i = 0; i < (ctx + p->block_size - 1) / p->block_size; i++)
            if (table[i] < 0 || table[i] >= p->num_blocks) return "a block id is out of range";
    }
    return NULL;
}

static PyObject *attend(PyObject *self, PyObject *args) {
    Py_ssize_t q, k, v, rows, qlens, ctxlens, tables, out;
    float scale;
    int T, B, Q, H, KVH, D, block_size, max_blocks, num_blocks, part, parts;
    if (!PyArg_ParseTuple(args, "nnnnnnnnfiiiiiiiiiii", &q, &k, &v, &rows, &qlens, &ctxlens, &tables, &out,
                          &scale, &T, &B, &Q, &H, &KVH, &D, &block_size, &max_blocks, &num_blocks, &part,
                          &parts))
        return NULL;
    if (T < 0 || B < 0 || Q < 1 || H < 1 || KVH < 1 || H % KVH || D < 8 || D % 8 || block_size < 1 ||
        max_blocks < 0 || num_blocks < 1 || parts < 1 || part < 0 || part >= parts) {
        PyErr_SetString(PyExc_ValueError,
                        "paged attention: bad sizes (H must be a multiple of KVH, D of 8)");
        return NULL;
    }
    Problem p = {(const float *)q,       (const float *)k,      (const float *)v,
                 (const int64_t *)rows,  (const int32_t *)qlens, (const int32_t *)ctxlens,
                 (const int32_t *)tables, (float *)out,          scale,
                 T, B, Q, H, KVH, D, block_size, max_blocks, num_blocks};
    const char *problem = check(&p);
    if (problem) {
        PyErr_Format(PyExc_ValueError, "paged attention: %s", problem);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = run_part(&p, part, parts);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *work(PyObject *self, PyObject *args) {
    Py_ssize_t qlens, ctxlens;
    int B;
    if (!PyArg_ParseTuple(args, "nni", &qlens, &ctxlens, &B)) return NULL;
    long long total = 0;
    for (int b = 0; b < B; b++) total += (long long)((const int32_t *)qlens)[b] * ((const int32_t *)ctxlens)[b];
    return PyLong_FromLongLong(total);
}

static PyMethodDef methods[] = {
    {"attend", attend, METH_VARARGS,
     "attend(q, k, v, rows, qlens, ctxlens, tables, out, scale, T, B, Q, H, KVH, D, block_size, "
     "max_blocks, num_blocks, part, parts): addresses and sizes; writes this part's (sequence, kv "
     "head) pairs' attention outputs into out [T, H, D]."},
    {"work", work, METH_VARARGS,
     "work(qlens, ctxlens, B): sum over b of qlens[b] * ctxlens[b] (int32 arrays by address)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_paged_attention_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__paged_attention_cpu(void) { return PyModule_Create(&module); }
