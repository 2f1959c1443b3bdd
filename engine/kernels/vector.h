/* Eight-float vectors and the helpers both CPU kernels use (GCC vector extensions).
 *
 * Code written with these compiles to AVX2 + FMA inside functions marked VECTOR_CLONES on a
 * CPU that has them, and to SSE2 pairs otherwise: one build runs on every x86-64 CPU. */
#ifndef PDSERVE_KERNELS_VECTOR_H
#define PDSERVE_KERNELS_VECTOR_H

#include <stdint.h>
#include <string.h>

/* Eight floats; alignment 4 so loads and stores from any float address are allowed. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define INLINE static inline __attribute__((always_inline))

/* mask ? a : b, lane by lane (C has no vector conditional operator). */
INLINE v8 lane_select(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* The sum of the eight lanes, in a fixed order. */
INLINE float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* e^x for eight floats, Cephes' single-precision method (range reduction by ln 2, a degree-6
 * polynomial): within 2 ulp of expf on [-87, 88]; 0 below -87 (-inf included, so masked scores
 * weigh exactly nothing), and x is clamped to 88 above. */
INLINE v8 exp8(v8 x) {
    const v8 lo = (v8){0} - 87.0f, hi = (v8){0} + 88.0f;
    const v8i below = x < lo;
    x = lane_select(below, lo, x);
    x = lane_select(x > hi, hi, x);
    /* n = round(x / ln 2), by the 1.5 * 2^23 trick (exact for |n| < 2^22). */
    const v8 magic = (v8){0} + 12582912.0f;
    v8 n = (x * 1.44269504088896341f + magic) - magic;
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = (v8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    v8 e = p * r * r + r + 1.0f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23; /* 2^n */
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return lane_select(below, (v8){0}, e * scale);
}

#endif
