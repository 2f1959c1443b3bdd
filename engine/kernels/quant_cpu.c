/* Weight-only quantized matrices on the CPU: decode-sized products read the packed weights
 * directly (quant_dot.h, `matmul`), larger ones decode each weight once into a cached block that
 * a GEMM microkernel multiplies by every token row (`matmul_dequant`: quant_gemm_avx512.h for
 * Q4/Q8 on AVX-512, else 16-row input-major blocks here),
 * `dequantize` writes fp32 rows, and the convolutional code's encoder (`ccq_encode`, Viterbi).
 *
 * A decode step streams every weight once for a few token rows, so the step's time is the
 * weight's bytes over the memory bandwidth: reading 4 or 2 bits a weight instead of 32, and
 * never writing an fp32 copy, is the speed-up. The parts (Python threads, GIL released) split
 * the output rows; each row is computed by one part, in a fixed order, so results do not depend
 * on how many parts ran.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ccq_encode.h"
#include "quant_dot.h"
#include "quant_gemm_avx512.h"
#include "quant_path.h"

static int parse_qmat(
    QMat *w, Py_ssize_t q, Py_ssize_t scale, Py_ssize_t offset, int N, int K, int group, int fmt) {
    if (N <= 0 || K <= 0 || group <= 0 || group % 8 || K % group || fmt < FMT_Q8 || fmt > FMT_CCQ) {
        PyErr_SetString(PyExc_ValueError, "quantized matrix: bad sizes (group a multiple of 8 dividing K)");
        return -1;
    }
    *w = (QMat){(const uint8_t *)q, (const uint16_t *)scale, (const uint16_t *)offset, N, K, group, fmt,
                qmat_row_bytes(fmt, K)};
    return 0;
}

/* The rows [*j0, *j1) of N that `part` of `parts` computes: equal shares, even-sized. */
static void row_share(int N, int part, int parts, int *j0, int *j1) {
    int step = ((N + parts - 1) / parts + Q_ROWS - 1) / Q_ROWS * Q_ROWS;
    *j0 = part * step < N ? part * step : N;
    *j1 = *j0 + step < N ? *j0 + step : N;
}

static int matmul_part(const float *x, int M, const QMat *w, float *out, int part, int parts) {
    const float **rows = malloc((size_t)(M ? M : 1) * sizeof(float *));
    float *xsum = malloc((size_t)(M ? M : 1) * (w->K / w->group) * sizeof(float));
    if (!rows || !xsum) {
        free(rows), free(xsum);
        return -1;
    }
    for (int i = 0; i < M; i++) rows[i] = x + (size_t)i * w->K;
    group_sums(rows, M, w->K, w->group, xsum);
    int j0, j1, rc = 0;
    row_share(w->N, part, parts, &j0, &j1);
    if (j0 < j1) rc = qdot_rows(rows, M, w, j0, j1, xsum, out, w->N);
    free(rows), free(xsum);
    return rc;
}

typedef int (*PartFn)(const float *x, int M, const QMat *w, float *out, int part, int parts);

/* The Python side of a product: parse (x, q, scale, offset, out, M, N, K, group, fmt, part, parts),
   check them, run `fn` on this part's output rows without the GIL. `name` is for the error. */
static PyObject *run_part(PyObject *args, PartFn fn, const char *name) {
    Py_ssize_t x, q, scale, offset, out;
    int M, N, K, group, fmt, part, parts;
    if (!PyArg_ParseTuple(args, "nnnnniiiiiii", &x, &q, &scale, &offset, &out, &M, &N, &K, &group, &fmt,
                          &part, &parts))
        return NULL;
    QMat w;
    if (parse_qmat(&w, q, scale, offset, N, K, group, fmt)) return NULL;
    if (M < 0 || parts < 1 || part < 0 || part >= parts) {
        PyErr_Format(PyExc_ValueError, "quant %s: bad row count or part", name);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = fn((const float *)x, M, &w, (float *)out, part, parts);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *matmul(PyObject *self, PyObject *args) { return run_part(args, matmul_part, "matmul"); }

/* out[(j - j0) * K + k] = w[j, k] for j in [j0, j1): fp32 rows for a GEMM. */
VECTOR_CLONES
static void dequantize_rows(const QMat *w, int j0, int j1, float *out) {
    const int groups = w->K / w->group, blocks = w->group / 8;
    for (int j = j0; j < j1; j++) {
        const uint8_t *row = w->q + (size_t)j * w->row_bytes;
        float *dst = out + (size_t)(j - j0) * w->K;
        for (int g = 0; g < groups; g++) {
            float s = half_to_float(w->scale[(size_t)j * groups + g]);
            float o = half_to_float(w->offset[(size_t)j * groups + g]);
            for (int b = g * blocks; b < (g + 1) * blocks; b++) {
                v8 level;
                switch (w->fmt) {
                case FMT_Q8:
                    level = decode8(FMT_Q8, row, b);
                    break;
                case FMT_Q4:
                    level = decode8(FMT_Q4, row, b);
                    break;
                case FMT_Q2:
                    level = decode8(FMT_Q2, row, b);
                    break;
                default:
                    level = decode8(FMT_CCQ, row, b);
                }
                *(v8 *)(dst + (size_t)8 * b) = level * s + o;
            }
        }
    }
}

#define DQ_ROWS 16 /* weight rows decoded at once: two vectors wide */
#define DQ_TOKENS 6 /* token rows per pass over them: 12 accumulators, as BLAS microkernels tile */

/* The 8 x 8 transpose of r[0..7] (r[i][l] -> r[l][i]), in shuffles. */
INLINE void transpose8(v8 r[8]) {
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int l = 0; l < 4; l++) {
        r[l] = __builtin_shufflevector(u[l], u[l + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[l + 4] = __builtin_shufflevector(u[l], u[l + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* buf[k * DQ_ROWS + r] = w[j0 + r, k] for r < n (0 for n <= r < DQ_ROWS): rows decoded input-
 * major, so that a column k of DQ_ROWS weights is two vector loads; 8 x 8 tiles are decoded
 * row by row and transposed in registers. `fmt` is a constant where inlined. */
INLINE void dequantize_input_major_fmt(int fmt, const QMat *w, int j0, int n, float *buf) {
    const int groups = w->K / w->group, blocks = w->group / 8;
    for (int r0 = 0; r0 < DQ_ROWS; r0 += 8) {
        const uint8_t *row[8];
        float s[8], o[8];
        for (int i = 0; i < 8; i++) row[i] = r0 + i < n ? w->q + (size_t)(j0 + r0 + i) * w->row_bytes : NULL;
        for (int g = 0; g < groups; g++) {
            for (int i = 0; i < 8; i++) {
                size_t at = (size_t)(j0 + r0 + i) * groups + g;
                s[i] = row[i] ? half_to_float(w->scale[at]) : 0.0f;
                o[i] = row[i] ? half_to_float(w->offset[at]) : 0.0f;
            }
            for (int b = g * blocks; b < (g + 1) * blocks; b++) {
                v8 v[8];
                for (int i = 0; i < 8; i++) v[i] = row[i] ? decode8(fmt, row[i], b) * s[i] + o[i] : (v8){0};
                transpose8(v);
                for (int l = 0; l < 8; l++) *(v8 *)(buf + (size_t)(8 * b + l) * DQ_ROWS + r0) = v[l];
            }
        }
    }
}

VECTOR_CLONES
static void dequantize_input_major(const QMat *w, int j0, int n, float *buf) {
    switch (w->fmt) {
    case FMT_Q8:
        dequantize_input_major_fmt(FMT_Q8, w, j0, n, buf);
        break;
    case FMT_Q4:
        dequantize_input_major_fmt(FMT_Q4, w, j0, n, buf);
        break;
    case FMT_Q2:
        dequantize_input_major_fmt(FMT_Q2, w, j0, n, buf);
        break;
    default:
        dequantize_input_major_fmt(FMT_CCQ, w, j0, n, buf);
    }
}

/* c[i * ldc + r] = sum over k of a[i][k] * buf[k * DQ_ROWS + r] for i < m (<= DQ_TOKENS) and
 * r < n: one broadcast of a token's value times two vectors of weights per k, in k order. */
INLINE void gemm_tile(int m, const float *const *a, const float *buf, int K, float *c, int ldc, int n) {
    v8 acc[DQ_TOKENS][2];
    for (int i = 0; i < m; i++) acc[i][0] = acc[i][1] = (v8){0};
    for (int k = 0; k < K; k++) {
        const float *col = buf + (size_t)k * DQ_ROWS;
        const v8 w0 = *(const v8 *)col, w1 = *(const v8 *)(col + 8);
        for (int i = 0; i < m; i++) {
            const float x = a[i][k];
            const v8 av = {x, x, x, x, x, x, x, x};
            acc[i][0] += av * w0;
            acc[i][1] += av * w1;
        }
    }
    for (int i = 0; i < m; i++) {
        float tmp[DQ_ROWS];
        memcpy(tmp, &acc[i][0], sizeof(v8));
        memcpy(tmp + 8, &acc[i][1], sizeof(v8));
        memcpy(c + (size_t)i * ldc, tmp, (size_t)n * sizeof(float));
    }
}

/* The token rows a[0 .. M) against one decoded block (see gemm_tile). */
VECTOR_CLONES
static void gemm_block(const float *const *a, int M, const float *buf, int K, float *c, int ldc, int n) {
    int i = 0;
    for (; i + DQ_TOKENS <= M; i += DQ_TOKENS)
        gemm_tile(DQ_TOKENS, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
    switch (M - i) {
    case 5:
        gemm_tile(5, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
        break;
    case 4:
        gemm_tile(4, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
        break;
    case 3:
        gemm_tile(3, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
        break;
    case 2:
        gemm_tile(2, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
        break;
    case 1:
        gemm_tile(1, a + i, buf, K, c + (size_t)i * ldc, ldc, n);
        break;
    }
}

#if defined(__x86_64__)
#define Z_GEMM_TOKENS 12 /* token rows per pass: 12 accumulators of all 16 weight rows */

/* gemm_tile with the DQ_ROWS = 16 weight rows of a column in one AVX-512 vector: each lane sums
 * over k in order with FMAs, as the AVX2 build's lanes do, so the results are the same bits; per
 * k one load and m FMAs (embedded broadcasts) instead of two loads and 2m FMAs. */
INLINE_AVX512 void z_gemm_tile(int m, const float *const *a, const float *buf, int K, float *c, int ldc, int n) {
    __m512 acc[Z_GEMM_TOKENS];
    for (int i = 0; i < m; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 wv = _mm512_loadu_ps(buf + (size_t)k * DQ_ROWS);
        for (int i = 0; i < m; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i][k]), wv, acc[i]);
    }
    const __mmask16 keep = (__mmask16)((1u << n) - 1);
    for (int i = 0; i < m; i++) _mm512_mask_storeu_ps(c + (size_t)i * ldc, keep, acc[i]);
}

AVX512_TARGET
static void z_gemm_block(const float *const *a, int M, const float *buf, int K, float *c, int ldc, int n) {
    for (int i = 0; i < M; i += Z_GEMM_TOKENS) {
        const float *const *ai = a + i;
        float *ci = c + (size_t)i * ldc;
        switch (M - i < Z_GEMM_TOKENS ? M - i : Z_GEMM_TOKENS) {
#define Z_GEMM_CASE(m)                           \
    case m:                                      \
        z_gemm_tile(m, ai, buf, K, ci, ldc, n); \
        break;
            Z_GEMM_CASE(1) Z_GEMM_CASE(2) Z_GEMM_CASE(3) Z_GEMM_CASE(4) Z_GEMM_CASE(5) Z_GEMM_CASE(6)
            Z_GEMM_CASE(7) Z_GEMM_CASE(8) Z_GEMM_CASE(9) Z_GEMM_CASE(10) Z_GEMM_CASE(11) Z_GEMM_CASE(12)
#undef Z_GEMM_CASE
        }
    }
}
#endif

/* Weight rows j0..j1 of out = rows @ W.T, DQ_ROWS of them at a time decoded once, input-major,
 * into a buffer that stays in cache while all M token rows multiply it. */
static int dequant_blocks(const float *const *rows, int M, const QMat *w, float *out, int j0, int j1) {
    float *buf = malloc((size_t)DQ_ROWS * w->K * sizeof(float));
    if (!buf) return -1;
    for (int j = j0; j < j1; j += DQ_ROWS) {
        int n = j1 - j < DQ_ROWS ? j1 - j : DQ_ROWS;
        dequantize_input_major(w, j, n, buf);
#if defined(__x86_64__)
        if (qdot_path() == QPATH_AVX512) {
            z_gemm_block(rows, M, buf, w->K, out + j, w->N, n);
            continue;
        }
#endif
        gemm_block(rows, M, buf, w->K, out + j, w->N, n);
    }
    free(buf);
    return 0;
}

/* This part's rows of out[M, N] = x @ W.T for batches too large for `qdot_rows` (which decodes
 * every weight once per QA_ROWS token rows): Q4/Q8 on the AVX-512 path by quant_gemm_avx512.h
 * (token rows in the lanes); otherwise each DQ_ROWS weight rows are decoded once, input-major,
 * into a buffer that stays in cache while all M token rows multiply it. Same bits either way. */
static int matmul_dequant_part(const float *x, int M, const QMat *w, float *out, int part, int parts) {
    int j0, j1;
    row_share(w->N, part, parts, &j0, &j1);
    const float **rows = malloc((size_t)(M ? M : 1) * sizeof(float *));
    if (!rows) return -1;
    for (int i = 0; i < M; i++) rows[i] = x + (size_t)i * w->K;
    int rc;
#if defined(__x86_64__)
    if (qdot_path() == QPATH_AVX512 && qgemm_avx512_handles(w))
        rc = j0 < j1 && M ? qgemm_rows_avx512(rows, M, w, j0, j1, out, w->N) : 0;
    else
#endif
        rc = dequant_blocks(rows, M, w, out, j0, j1);
    free(rows);
    return rc;
}

static PyObject *matmul_dequant(PyObject *self, PyObject *args) {
    return run_part(args, matmul_dequant_part, "matmul_dequant");
}

static PyObject *dequantize(PyObject *self, PyObject *args) {
    Py_ssize_t q, scale, offset, out;
    int N, K, group, fmt, j0, j1;
    if (!PyArg_ParseTuple(args, "nnnniiiiii", &q, &scale, &offset, &out, &N, &K, &group, &fmt, &j0, &j1))
        return NULL;
    QMat w;
    if (parse_qmat(&w, q, scale, offset, N, K, group, fmt)) return NULL;
    if (j0 < 0 || j1 > N || j0 > j1) {
        PyErr_SetString(PyExc_ValueError, "dequantize: rows out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS dequantize_rows(&w, j0, j1, (float *)out);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *ccq_encode(PyObject *self, PyObject *args) {
    Py_ssize_t w, scale, offset, out, levels;
    int N, K, group, part, parts;
    if (!PyArg_ParseTuple(args, "nnnnniiiii", &w, &scale, &offset, &out, &levels, &N, &K, &group, &part, &parts))
        return NULL;
    if (N <= 0 || K <= 0 || group <= 0 || group % 8 || K % group || parts < 1 || part < 0 || part >= parts) {
        PyErr_SetString(PyExc_ValueError, "ccq_encode: bad sizes or part");
        return NULL;
    }
    uint8_t *back = malloc((size_t)CCQ_TILE * K * CCQ_STATES);
    if (!back) return PyErr_NoMemory();
    int j0, j1;
    row_share(N, part, parts, &j0, &j1);
    Py_BEGIN_ALLOW_THREADS ccq_encode_rows(
        (const float *)w, (const float *)scale, (const float *)offset, (uint8_t *)out, (uint8_t *)levels, K, group, j0, j1,
        back);
    Py_END_ALLOW_THREADS free(back);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", matmul, METH_VARARGS,
     "matmul(x, q, scale, offset, out, M, N, K, group, fmt, part, parts): out[M, N] = x[M, K] @ W.T "
     "for this part's rows of the packed W."},
    {"matmul_dequant", matmul_dequant, METH_VARARGS,
     "matmul_dequant(x, q, scale, offset, out, M, N, K, group, fmt, part, parts): the same product, "
     "decoding each weight once into a cached block of rows (for batches of many rows)."},
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(q, scale, offset, out, N, K, group, fmt, j0, j1): rows j0..j1 of W as fp32 into out."},
    {"ccq_encode", ccq_encode, METH_VARARGS,
     "ccq_encode(w, scale, offset, out, levels, N, K, group, part, parts): the CCQ bit strings of this "
     "part's rows of fp32 w [N, K], given fp32 scale and offset [N, K / group], and their levels into "
     "uint8 levels [N, K] unless its address is 0."},
    QDOT_PATH_METHODS,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quant_cpu(void) { return PyModule_Create(&module); }
