/* RMSNorm of fp32 rows on the CPU: y = x / sqrt(mean(x^2) + eps) * w, one call per norm.
 *
 * Why a kernel for something this small: torch 2.13's CPU `rms_norm` is a composite of six ops
 * (pow, mean, add, rsqrt, mul, mul) and costs 22-35 us on a decode step's [1..16, 256] rows,
 * where the arithmetic is under a microsecond; a decode step runs two norms per layer plus the
 * final one, ~5% of a demo-model step (docs/DECISIONS.md, 2026-12-06, issue 27). The sum of
 * squares runs in eight fp32 lanes, as torch's vectorized reduction does, then one fixed-order
 * horizontal sum, so the result differs from torch's by rounding only. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "vector.h"

VECTOR_CLONES
static void norm_rows(const float *x, const float *w, float *out, Py_ssize_t rows, int n, float eps) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *o = out + (size_t)r * n;
        v8 acc = {0};
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            v8 v = *(const v8 *)(xr + i);
            acc += v * v;
        }
        float squares = hsum(acc);
        for (; i < n; i++) squares += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(squares / (float)n + eps);
        for (i = 0; i + 8 <= n; i += 8) *(v8 *)(o + i) = (*(const v8 *)(xr + i) * inv) * *(const v8 *)(w + i);
        for (; i < n; i++) o[i] = (xr[i] * inv) * w[i];
    }
}

static PyObject *rms_norm(PyObject *self, PyObject *args) {
    Py_ssize_t x, w, out, rows;
    int n;
    float eps;
    if (!PyArg_ParseTuple(args, "nnnnif", &x, &w, &out, &rows, &n, &eps)) return NULL;
    if (rows < 0 || n < 1 || !(eps >= 0.0f)) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: rows must be >= 0, n >= 1 and eps >= 0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS norm_rows((const float *)x, (const float *)w, (float *)out, rows, n, eps);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rms_norm", rms_norm, METH_VARARGS,
     "rms_norm(x, w, out, rows, n, eps): addresses of contiguous fp32 [rows, n] x and out and [n] w; "
     "writes x's rows normalized and scaled by w into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rms_norm_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rms_norm_cpu(void) { return PyModule_Create(&module); }
