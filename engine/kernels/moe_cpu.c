/* A mixture-of-experts layer's routed experts for decode-sized batches, on the CPU, in fp32.
 *
 * A decode step gives each expert a handful of tokens. BLAS runs such few-row GEMMs badly: it
 * packs the weight on every call, so an expert's weight is read about twice, and a 2 or 3 row
 * product took longer than a 4 row one (measured with OpenBLAS on ERNIE 4.5 21B-A3B's expert
 * shape, [M, 2560] x [2560, 3072]: 3.7 ms at M = 2 against 2.1 ms here). Here each output value
 * is a dot product of a token's row with a row of the expert's weight as the checkpoint stores
 * it ([out, in]), so every weight row is read once, front to back, while the few token rows stay
 * in cache. One call runs every routed expert of the layer, which also saves the per-expert
 * Python and dispatch overhead that dominates a small model's step.
 *
 * `routed_experts` computes, for each (token t, slot s) of the router's top-k choice,
 * y[t, s, :] = weight[t, s] * down(silu(gate(x[t])) * up(x[t])) with expert ids[t, s]. The
 * experts are split among `parts` callers by their token counts; each caller passes its `part`
 * and runs with the GIL released, so Python threads run the parts side by side. Every
 * (t, s) row is written by exactly one part, so parts share `y` without locks. `combine_slots`
 * then sums each token's k rows in slot order: that order, and each dot product's, are fixed,
 * so a token's result does not depend on which other tokens share the step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_dot.h"
#include "quant_path.h"
#include "vector.h"
#include "work_split.h"

#define K_BLOCK 1024 /* weight floats per row kept in L1 while the token rows pass over them */
#define W_ROWS 3     /* weight rows streamed at once */
#define A_ROWS 4     /* token rows per pass over those weight rows */

/* c[i * ldc + j] (+)= dot(a[i][k0:k1], w[j * K + k0 : j * K + k1]) for i < m, j < n. Called
 * with constant m and n, so the loops unroll and the m x n accumulators live in registers. */
INLINE void dot_tile(
    int m, int n, const float *const *a, int k0, int k1, const float *w, int K, float *c, int ldc,
    int first) {
    v8 acc[A_ROWS][W_ROWS];
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) acc[i][j] = (v8){0};
    for (int k = k0; k < k1; k += 8) {
        v8 wv[W_ROWS];
        for (int j = 0; j < n; j++) wv[j] = *(const v8 *)(w + (size_t)j * K + k);
        for (int i = 0; i < m; i++) {
            v8 av = *(const v8 *)(a[i] + k);
            for (int j = 0; j < n; j++) acc[i][j] += av * wv[j];
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float s = hsum(acc[i][j]);
            c[(size_t)i * ldc + j] = first ? s : c[(size_t)i * ldc + j] + s;
        }
}

/* dot_tile for a runtime m (1..4) and constant n. */
#define DOT_TILE_M(n, m, ...)                    \
    do {                                         \
        if ((m) >= 4)                            \
            dot_tile(4, n, __VA_ARGS__);         \
        else if ((m) == 3)                       \
            dot_tile(3, n, __VA_ARGS__);         \
        else if ((m) == 2)                       \
            dot_tile(2, n, __VA_ARGS__);         \
        else                                     \
            dot_tile(1, n, __VA_ARGS__);         \
    } while (0)

/* c[i * ldc + j] = dot(a[i], w[j]) for i < M rows a[i] of K floats and j < N rows of w [N, K].
 * K must be a multiple of 8. The k-blocks are fixed, so each value's summation order depends
 * only on K, not on M or on where the row sits in the batch. */
VECTOR_CLONES
static void dot_rows(const float *const *a, int M, const float *w, int N, int K, float *c, int ldc) {
    for (int n0 = 0; n0 < N; n0 += W_ROWS) {
        int n = N - n0 < W_ROWS ? N - n0 : W_ROWS;
        const float *wn = w + (size_t)n0 * K;
        for (int k0 = 0; k0 < K; k0 += K_BLOCK) {
            int k1 = K - k0 < K_BLOCK ? K : k0 + K_BLOCK;
            for (int m0 = 0; m0 < M; m0 += A_ROWS) {
                int m = M - m0;
                float *cm = c + (size_t)m0 * ldc + n0;
                if (n == 3)
                    DOT_TILE_M(3, m, a + m0, k0, k1, wn, K, cm, ldc, k0 == 0);
                else if (n == 2)
                    DOT_TILE_M(2, m, a + m0, k0, k1, wn, K, cm, ldc, k0 == 0);
                else
                    DOT_TILE_M(1, m, a + m0, k0, k1, wn, K, cm, ldc, k0 == 0);
            }
        }
    }
}

/* h[i] = silu(g[i]) * u[i], SiLU as torch computes it: g / (1 + exp(-g)). */
VECTOR_CLONES
static void silu_mul(const float *g, const float *u, float *h, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8 gv = *(const v8 *)(g + i);
        *(v8 *)(h + i) = gv / (1.0f + exp8(-gv)) * *(const v8 *)(u + i);
    }
    for (; i < n; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

typedef struct {
    const float *x;         /* [T, H] */
    const int64_t *ids;     /* [T, k] */
    const float *weights;   /* [T, k] */
    /* fp32 (fmt < 0): [E] addresses of [2I, H] row-major weights, gate rows then up rows, and of
     * [H, I] down weights. Quantized (fmt a quant_dot.h format): [E, 3] addresses of each
     * expert's packed rows, scales and offsets (a QMat each). */
    const int64_t *gate_up;
    const int64_t *down;
    float *y; /* [T, k, H] */
    int T, H, I, k, E;
    int fmt, group; /* the experts' quantized format (-1: fp32) and group size */
} Problem;

/* Expert e's [n, K] product out = rows @ W.T, fp32 or packed. xsum: room for n * K / group.
 * Returns -1 when out of memory. */
static int expert_product(const Problem *p, const int64_t *table, int e, int N, int K,
                           const float **rows, int n, float *xsum, float *out) {
    if (p->fmt < 0) {
        dot_rows(rows, n, (const float *)(intptr_t)table[e], N, K, out, N);
        return 0;
    }
    const int64_t *at = table + (size_t)3 * e;
    QMat w = {(const uint8_t *)(intptr_t)at[0], (const uint16_t *)(intptr_t)at[1],
              (const uint16_t *)(intptr_t)at[2], N, K, p->group, p->fmt, qmat_row_bytes(p->fmt, K)};
    group_sums(rows, n, K, p->group, xsum);
    return qdot_rows(rows, n, &w, 0, N, xsum, out, N);
}

static int run_part(const Problem *p, int part, int parts) {
    const int T = p->T, H = p->H, I = p->I, k = p->k, E = p->E;
    int *counts = calloc((size_t)E + 1, sizeof(int));
    int *starts = malloc(((size_t)E + 1) * sizeof(int));
    int *order = malloc((size_t)T * k * sizeof(int));
    if (!counts || !starts || !order) goto oom;
    for (int r = 0; r < T * k; r++) counts[p->ids[r]]++;
    starts[0] = 0;
    int max_count = 0;
    for (int e = 0; e < E; e++) {
        starts[e + 1] = starts[e] + counts[e];
        if (counts[e] > max_count) max_count = counts[e];
    }
    /* Counting sort of the (token, slot) rows by expert, in token order within an expert. */
    int *fill = calloc((size_t)E, sizeof(int));
    if (!fill) goto oom;
    for (int r = 0; r < T * k; r++) {
        int e = (int)p->ids[r];
        order[starts[e] + fill[e]++] = r;
    }
    free(fill);

    /* The experts this part runs: a contiguous range in expert order, balanced by cost (reading
     * an expert's weight costs about as much as computing four of its rows). */
    double *cost = malloc((size_t)E * sizeof(double));
    if (!cost) goto oom;
    for (int e = 0; e < E; e++) cost[e] = counts[e] ? 4.0 + counts[e] : 0.0;
    int lo, hi;
    owned_range(cost, E, part, parts, &lo, &hi);
    free(cost);
    const size_t cap = max_count ? (size_t)max_count : 1; /* rows of the busiest expert */
    const float **rows = malloc(cap * sizeof(float *));
    float *gu = malloc(cap * 2 * I * sizeof(float));
    float *h = malloc(cap * I * sizeof(float));
    float *out = malloc(cap * H * sizeof(float));
    const float **h_rows = malloc(cap * sizeof(float *));
    const int min_group = p->fmt < 0 ? 8 : p->group;
    float *xsum = malloc(cap * ((H > I ? H : I) / min_group) * sizeof(float));
    if (!rows || !gu || !h || !out || !h_rows || !xsum) {
        free(rows), free(gu), free(h), free(out), free(h_rows), free(xsum);
        goto oom;
    }
    for (int e = lo; e < hi; e++) {
        int n = counts[e];
        if (!n) continue;
        const int *mine = order + starts[e];
        for (int i = 0; i < n; i++) rows[i] = p->x + (size_t)(mine[i] / k) * H;
        int rc = expert_product(p, p->gate_up, e, 2 * I, H, rows, n, xsum, gu);
        for (int i = 0; i < n; i++) {
            silu_mul(gu + (size_t)i * 2 * I, gu + (size_t)i * 2 * I + I, h + (size_t)i * I, I);
            h_rows[i] = h + (size_t)i * I;
        }
        if (!rc) rc = expert_product(p, p->down, e, H, I, h_rows, n, xsum, out);
        if (rc) {
            free(rows), free(gu), free(h), free(out), free(h_rows), free(xsum);
            goto oom;
        }
        for (int i = 0; i < n; i++) {
            float wt = p->weights[mine[i]];
            float *dst = p->y + (size_t)mine[i] * H;
            const float *src = out + (size_t)i * H;
            for (int j = 0; j < H; j++) dst[j] = src[j] * wt;
        }
    }
    free(rows), free(gu), free(h), free(out), free(h_rows), free(xsum);
    free(counts), free(starts), free(order);
    return 0;
oom:
    free(counts), free(starts), free(order);
    return -1;
}

static PyObject *routed_experts(PyObject *self, PyObject *args) {
    Py_ssize_t x, ids, weights, gate_up, down, y;
    int T, H, I, k, E, part, parts, fmt = -1, group = 8;
    if (!PyArg_ParseTuple(args, "nnnnnniiiiiii|ii", &x, &ids, &weights, &gate_up, &down, &y, &T, &H, &I,
                          &k, &E, &part, &parts, &fmt, &group))
        return NULL;
    if (T < 0 || H <= 0 || I <= 0 || k <= 0 || E <= 0 || H % 8 || I % 8 || parts < 1 || part < 0 ||
        part >= parts || fmt < -1 || fmt > FMT_CCQ ||
        (fmt >= 0 && (group <= 0 || group % 8 || H % group || I % group))) {
        PyErr_SetString(PyExc_ValueError,
                        "routed_experts: bad sizes (H and I multiples of 8, and of the group when quantized)");
        return NULL;
    }
    Problem p = {(const float *)x, (const int64_t *)ids, (const float *)weights, (const int64_t *)gate_up,
                 (const int64_t *)down, (float *)y, T, H, I, k, E, fmt, group};
    for (int r = 0; r < T * k; r++)
        if (p.ids[r] < 0 || p.ids[r] >= E) {
            PyErr_SetString(PyExc_ValueError, "routed_experts: an expert id is out of range");
            return NULL;
        }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = run_part(&p, part, parts);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

VECTOR_CLONES
static void sum_slots(const float *y, int T, int k, int H, float *out) {
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * H;
        const float *src = y + (size_t)t * k * H;
        memcpy(o, src, (size_t)H * sizeof(float));
        for (int s = 1; s < k; s++)
            for (int j = 0; j < H; j++) o[j] += src[(size_t)s * H + j];
    }
}

static PyObject *combine_slots(PyObject *self, PyObject *args) {
    Py_ssize_t y, out;
    int T, k, H;
    if (!PyArg_ParseTuple(args, "nniii", &y, &out, &T, &k, &H)) return NULL;
    if (T < 0 || k <= 0 || H <= 0) {
        PyErr_SetString(PyExc_ValueError, "combine_slots: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS sum_slots((const float *)y, T, k, H, (float *)out);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* ERNIE's router for one token: softmax over the gate's logits (fp32), top-k chosen on
 * probability + correction bias, weighted by the unbiased probabilities renormalised. Ties in
 * the biased score go to the lower expert id. H is a multiple of 8. */
VECTOR_CLONES
static void route_token(const float *x, const float *gate, const float *bias, int H, int E, int k,
                        float norm_min, float *probs, int64_t *ids, float *weights) {
    float max = -INFINITY;
    for (int e = 0; e < E; e++) {
        const float *g = gate + (size_t)e * H;
        v8 acc = (v8){0};
        for (int j = 0; j < H; j += 8) acc += *(const v8 *)(x + j) * *(const v8 *)(g + j);
        probs[e] = hsum(acc);
        if (probs[e] > max) max = probs[e];
    }
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        probs[e] = expf(probs[e] - max);
        sum += probs[e];
    }
    for (int e = 0; e < E; e++) probs[e] /= sum;
    float chosen = 0.0f;
    for (int s = 0; s < k; s++) {
        int best = -1;
        float best_score = -INFINITY;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < s; q++) taken |= ids[q] == e;
            float score = probs[e] + (bias ? bias[e] : 0.0f);
            if (!taken && (best < 0 || score > best_score)) best = e, best_score = score;
        }
        ids[s] = best;
        weights[s] = probs[best];
        chosen += probs[best];
    }
    float norm = chosen > norm_min ? chosen : norm_min;
    for (int s = 0; s < k; s++) weights[s] /= norm;
}

static PyObject *route(PyObject *self, PyObject *args) {
    Py_ssize_t x, gate, bias, ids, weights;
    int T, H, E, k;
    float norm_min;
    if (!PyArg_ParseTuple(args, "nnnnniiiif", &x, &gate, &bias, &ids, &weights, &T, &H, &E, &k, &norm_min))
        return NULL;
    if (T < 0 || H <= 0 || H % 8 || E <= 0 || k <= 0 || k > E) {
        PyErr_SetString(PyExc_ValueError, "route: bad sizes (need 0 < k <= E, H a multiple of 8)");
        return NULL;
    }
    float *probs = malloc((size_t)E * sizeof(float));
    if (!probs) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS for (int t = 0; t < T; t++) route_token(
        (const float *)x + (size_t)t * H, (const float *)gate, (const float *)bias, H, E, k, norm_min, probs,
        (int64_t *)ids + (size_t)t * k, (float *)weights + (size_t)t * k);
    Py_END_ALLOW_THREADS free(probs);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"routed_experts", routed_experts, METH_VARARGS,
     "routed_experts(x, ids, weights, gate_up, down, y, T, H, I, k, E, part, parts[, fmt, group]): "
     "addresses and sizes; writes this part's experts' weighted outputs into y [T, k, H]. With fmt "
     ">= 0 the experts are packed (quant_dot.h), gate_up and down [E, 3] address tables."},
    {"route", route, METH_VARARGS,
     "route(x, gate, bias, ids, weights, T, H, E, k, norm_min): ERNIE's top-k router; writes ids "
     "[T, k] (int64) and weights [T, k]. bias may be 0 (none)."},
    {"combine_slots", combine_slots, METH_VARARGS,
     "combine_slots(y, out, T, k, H): out[t] = sum over s of y[t, s], in slot order."},
    QDOT_PATH_METHODS,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_moe_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__moe_cpu(void) { return PyModule_Create(&module); }
