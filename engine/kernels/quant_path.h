/* Which build of the decode-sized packed product runs: chosen once at first use from the CPU's
 * features (the fastest it can run), or set by `qdot_path(code)` from Python so that tests run
 * every path this CPU has against the reference. One build of the extension runs on every x86-64
 * CPU: AVX-512 (Q4/Q8, and Q2/CCQ with groups of 64 or more; others take the AVX2 build), AVX2 + FMA, plain x86-64.
 *
 * Each extension that includes this header has its own setting: `quant_cpu.use_kernel_path`
 * sets both. Include after Python.h.
 */
#ifndef PDSERVE_KERNELS_QUANT_PATH_H
#define PDSERVE_KERNELS_QUANT_PATH_H

#include "quant_dot.h"
#include "quant_dot_avx512.h"

enum { QPATH_DEFAULT = 0, QPATH_AVX2 = 1, QPATH_AVX512 = 2 };

/* The fastest path this CPU runs. */
static int qdot_best_path(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi2"))
        return QPATH_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return QPATH_AVX2;
#endif
    return QPATH_DEFAULT;
}

static int qdot_path_now = -1; /* -1: not chosen yet */

static int qdot_path(void) {
    if (qdot_path_now < 0) qdot_path_now = qdot_best_path();
    return qdot_path_now;
}

/* c[i * ldc + j] = dot(a[i], row j of w) for i < M, j in [j0, j1) on the chosen path (see
 * quant_dot.h's qdot_rows_avx2 for the contract). Returns -1 when out of memory. */
static int qdot_rows(
    const float *const *a, int M, const QMat *w, int j0, int j1, const float *xsum, float *c, int ldc) {
    switch (qdot_path()) {
#if defined(__x86_64__)
    case QPATH_AVX512:
        if (qdot_avx512_handles(w)) return qdot_rows_avx512(a, M, w, j0, j1, xsum, c, ldc);
        /* fall through */
    case QPATH_AVX2:
        qdot_rows_avx2(a, M, w, j0, j1, xsum, c, ldc);
        return 0;
#endif
    default:
        qdot_rows_default(a, M, w, j0, j1, xsum, c, ldc);
        return 0;
    }
}

/* Python: qdot_path([code]) sets the path when code is given (ValueError when this CPU cannot
 * run it) and returns the path in effect; qdot_best_path() the fastest this CPU runs. */
static PyObject *py_qdot_path(PyObject *self, PyObject *args) {
    int code = -1;
    if (!PyArg_ParseTuple(args, "|i", &code)) return NULL;
    if (code >= 0) {
        if (code > qdot_best_path()) {
            PyErr_Format(PyExc_ValueError, "qdot_path: this CPU cannot run path %d (best: %d)", code,
                         qdot_best_path());
            return NULL;
        }
        qdot_path_now = code;
    }
    return PyLong_FromLong(qdot_path());
}

static PyObject *py_qdot_best_path(PyObject *self, PyObject *args) { return PyLong_FromLong(qdot_best_path()); }

#define QDOT_PATH_METHODS                                                                                  \
    {"qdot_path", py_qdot_path, METH_VARARGS,                                                              \
     "qdot_path([code]): the decode-sized packed product's path (0 plain, 1 AVX2, 2 AVX-512), set when " \
     "code is given."},                                                                                    \
        {"qdot_best_path", py_qdot_best_path, METH_NOARGS, "qdot_best_path(): the fastest path this CPU runs."}

#endif
