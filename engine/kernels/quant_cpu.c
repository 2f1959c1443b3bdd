/* Weight-only quantized matrices on the CPU: decode-sized products read the packed weights
 * directly (quant_dot.h), prefill-sized ones dequantize a block of rows at a time into a GEMM
 * (`dequantize`), and the convolutional code's encoder (`ccq_encode`, a Viterbi search).
 *
 * A decode step streams every weight once for a few token rows, so the step's time is the
 * weight's bytes over the memory bandwidth: reading 4 or 2 bits a weight instead of 32, and
 * never writing an fp32 copy, is the speed-up. The parts (Python threads, GIL released) split
 * the output rows; each row is computed by one part, in a fixed order, so results do not depend
 * on how many parts ran.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_dot.h"

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
    int j0, j1;
    row_share(w->N, part, parts, &j0, &j1);
    if (j0 < j1) qdot_rows(rows, M, w, j0, j1, xsum, out, w->N);
    free(rows), free(xsum);
    return 0;
}

static PyObject *matmul(PyObject *self, PyObject *args) {
    Py_ssize_t x, q, scale, offset, out;
    int M, N, K, group, fmt, part, parts;
    if (!PyArg_ParseTuple(args, "nnnnniiiiiii", &x, &q, &scale, &offset, &out, &M, &N, &K, &group, &fmt,
                          &part, &parts))
        return NULL;
    QMat w;
    if (parse_qmat(&w, q, scale, offset, N, K, group, fmt)) return NULL;
    if (M < 0 || parts < 1 || part < 0 || part >= parts) {
        PyErr_SetString(PyExc_ValueError, "quant matmul: bad row count or part");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = matmul_part((const float *)x, M, &w, (float *)out, part, parts);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

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

/* The convolutional code's encoder for one row: the bit string whose overlapping CCQ_BITS-bit
 * windows (2 new bits a weight) decode to the levels nearest `w` in squared error, given each
 * group's scale and offset. A Viterbi search over the 2^(CCQ_BITS - 2) states (the bits a window
 * shares with the next): exact, K * 2^CCQ_BITS steps. `back` holds K * STATES bytes. */
#define CCQ_STATES (1 << (CCQ_BITS - 2))
VECTOR_CLONES
static void ccq_encode_row(
    const float *w, int K, int group, const float *scale, const float *offset, uint8_t *out, uint8_t *back) {
    float cost[CCQ_STATES], next[CCQ_STATES], value[1 << CCQ_BITS];
    for (int k = 0; k < K; k++) {
        const float s = scale[k / group], o = offset[k / group];
        for (unsigned c = 0; c <= CCQ_MASK; c++) {
            float d = s * (float)((c * CCQ_MUL) & CCQ_MASK) + o - w[k];
            value[c] = d * d;
        }
        /* Code c = t * 4 + lo moves to state t = c >> 2; it follows state c & (STATES - 1). */
        for (int t = 0; t < CCQ_STATES; t++) {
            float best = FLT_MAX;
            int arg = 0;
            for (int lo = 0; lo < 4; lo++) {
                int c = t * 4 + lo;
                float total = value[c] + (k ? cost[c & (CCQ_STATES - 1)] : 0.0f);
                if (total < best) best = total, arg = lo;
            }
            next[t] = best;
            back[(size_t)k * CCQ_STATES + t] = (uint8_t)arg;
        }
        memcpy(cost, next, sizeof cost);
    }
    int t = 0;
    for (int s = 1; s < CCQ_STATES; s++)
        if (cost[s] < cost[t]) t = s;
    const int row_bytes = qmat_row_bytes(FMT_CCQ, K);
    memset(out, 0, (size_t)row_bytes);
    for (int k = K - 1; k >= 0; k--) {
        int c = t * 4 + back[(size_t)k * CCQ_STATES + t];
        /* Window k covers bits [2k, 2k + CCQ_BITS): its low 2 bits are its own, the rest are
         * written by the windows after it (and, for the last, by the row's padding bits). */
        unsigned bits = k == K - 1 ? (unsigned)c : (unsigned)(c & 3);
        for (int i = 0; i < (k == K - 1 ? CCQ_BITS : 2); i++)
            if (bits >> i & 1) out[(2 * k + i) / 8] |= (uint8_t)(1u << ((2 * k + i) % 8));
        t = c & (CCQ_STATES - 1);
    }
}

static PyObject *ccq_encode(PyObject *self, PyObject *args) {
    Py_ssize_t w, scale, offset, out;
    int N, K, group, part, parts;
    if (!PyArg_ParseTuple(args, "nnnniiiii", &w, &scale, &offset, &out, &N, &K, &group, &part, &parts))
        return NULL;
    if (N <= 0 || K <= 0 || group <= 0 || group % 8 || K % group || parts < 1 || part < 0 || part >= parts) {
        PyErr_SetString(PyExc_ValueError, "ccq_encode: bad sizes or part");
        return NULL;
    }
    uint8_t *back = malloc((size_t)K * CCQ_STATES);
    if (!back) return PyErr_NoMemory();
    int j0, j1;
    row_share(N, part, parts, &j0, &j1);
    const int groups = K / group, row_bytes = qmat_row_bytes(FMT_CCQ, K);
    Py_BEGIN_ALLOW_THREADS for (int j = j0; j < j1; j++) ccq_encode_row(
        (const float *)w + (size_t)j * K, K, group, (const float *)scale + (size_t)j * groups,
        (const float *)offset + (size_t)j * groups, (uint8_t *)out + (size_t)j * row_bytes, back);
    Py_END_ALLOW_THREADS free(back);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", matmul, METH_VARARGS,
     "matmul(x, q, scale, offset, out, M, N, K, group, fmt, part, parts): out[M, N] = x[M, K] @ W.T "
     "for this part's rows of the packed W."},
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(q, scale, offset, out, N, K, group, fmt, j0, j1): rows j0..j1 of W as fp32 into out."},
    {"ccq_encode", ccq_encode, METH_VARARGS,
     "ccq_encode(w, scale, offset, out, N, K, group, part, parts): the CCQ bit strings of this part's "
     "rows of fp32 w [N, K], given fp32 scale and offset [N, K / group]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quant_cpu(void) { return PyModule_Create(&module); }
