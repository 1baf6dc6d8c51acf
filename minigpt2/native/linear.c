/* minigpt2's native matrix-vector kernel: y = x W^T + b for a few rows of x.
 *
 * Decoding one token at batch 1 streams every weight matrix once, so it runs at the speed
 * of the memory, not of the arithmetic (kernels.py). This kernel reads W, stored [out, in]
 * row-major, as R row streams at a time, multiplies them with x in fp32 fused multiply-adds
 * and adds the bias; half-precision weights (bf16, fp16) are widened to fp32 on the fly, so
 * a half-precision model streams half the bytes of an fp32 one on any x86-64 host with AVX2,
 * with or without native bf16 arithmetic. Results are rounded once to the weights' dtype.
 *
 * Two layouts of W: fp32 weights as stored ([out, in] row-major: R rows are R streams), and
 * half-precision weights packed ([out/R][in/W][R][W], W the vector width: one stream per
 * thread, the R rows of a group interleaved W columns at a time). Measured on an AMD EPYC
 * (Zen 5) here, half-precision rows of 768 values (1.5 KB) are too short for the hardware
 * prefetchers when read as R streams (35 GB/s), packed they stream at 42-47 GB/s, ahead of
 * oneDNN's bf16 GEMV (38 GB/s); fp32 rows stream as well either way (~40 GB/s), so fp32
 * keeps the layout that needs no copy of the tied unembedding.
 *
 * Threads: one OpenMP parallel region per call, on the OpenMP runtime torch itself uses
 * (kernels.py loads this library only when the process ends up with one OpenMP runtime), so
 * the products and torch's own ops share one team and never spin against each other.
 *
 * Built on first use by native.py with the host's C compiler and -march=native: the vector
 * width below (AVX-512, AVX2 + FMA, or plain C) is the host's own.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define R 8 /* output rows per group: R weight streams in flight, x reused R times from L1 */

static inline float bf16_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#if defined(__F16C__)
static inline float f16_f32(uint16_t v) { return _cvtsh_ss(v); }
static inline uint16_t f32_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#endif

/* ---- vectors: W lanes of fp32; load a weight vector of each dtype widened to fp32 ---- */
#if defined(__AVX512F__)
#define W 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec vload_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define W 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#if defined(__F16C__)
static inline vec vload_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define W 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vload(const float *p) { return *p; }
static inline vec vload_bf16(const uint16_t *p) { return bf16_f32(*p); }
#if defined(__F16C__)
static inline vec vload_f16(const uint16_t *p) { return f16_f32(*p); }
#endif
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline float vsum(vec a) { return a; }
#endif

#if defined(__F16C__)
#define HAS_F16 1
#else
#define HAS_F16 0
#endif

/* One group of rows o0..o0+nr (nr <= R) of W against the N rows of x (fp32, [N, in]):
 * acc[n][k] = sum_i W[o0+k, i] x[n, i]. The weights of a group (R x in) stay in cache while
 * the N rows of x go by, so a few rows cost little more than one. */
#define DEFINE_GROUP(NAME, WT, VLOAD, SLOAD)                                                     \
    static void NAME(const WT *w, const float *x, long N, long in, long nr, float *acc) {       \
        for (long n = 0; n < N; n++) {                                                           \
            const float *xn = x + n * in;                                                        \
            vec a[R];                                                                            \
            for (int k = 0; k < R; k++) a[k] = vzero();                                          \
            long i = 0;                                                                          \
            if (nr == R) {                                                                       \
                for (; i + W <= in; i += W) {                                                    \
                    vec xv = vload(xn + i);                                                      \
                    for (int k = 0; k < R; k++) a[k] = vfma(VLOAD(w + k * in + i), xv, a[k]);    \
                }                                                                                \
            } else {                                                                             \
                for (; i + W <= in; i += W) {                                                    \
                    vec xv = vload(xn + i);                                                      \
                    for (int k = 0; k < nr; k++) a[k] = vfma(VLOAD(w + k * in + i), xv, a[k]);   \
                }                                                                                \
            }                                                                                    \
            for (int k = 0; k < nr; k++) {                                                       \
                float s = vsum(a[k]);                                                            \
                for (long j = i; j < in; j++) s += SLOAD(w[k * in + j]) * xn[j];                 \
                acc[n * R + k] = s;                                                              \
            }                                                                                    \
        }                                                                                        \
    }

/* The same for W packed as [in/W][R][W] per group (in a multiple of W; rows past `out` are
 * zeros, so every group computes R rows and keeps nr). */
#define DEFINE_GROUP_PACKED(NAME, WT, VLOAD)                                                    \
    static void NAME(const WT *w, const float *x, long N, long in, long nr, float *acc) {       \
        for (long n = 0; n < N; n++) {                                                           \
            const float *xn = x + n * in;                                                        \
            vec a[R];                                                                            \
            for (int k = 0; k < R; k++) a[k] = vzero();                                          \
            for (long c = 0; c < in / W; c++) {                                                  \
                vec xv = vload(xn + c * W);                                                      \
                const WT *wc = w + c * (R * W);                                                  \
                for (int k = 0; k < R; k++) a[k] = vfma(VLOAD(wc + k * W), xv, a[k]);            \
            }                                                                                    \
            for (int k = 0; k < nr; k++) acc[n * R + k] = vsum(a[k]);                            \
        }                                                                                        \
    }

static inline float id_f32(float v) { return v; }
DEFINE_GROUP(group_f32, float, vload, id_f32)
DEFINE_GROUP(group_bf16, uint16_t, vload_bf16, bf16_f32)
DEFINE_GROUP_PACKED(packed_f32, float, vload)
DEFINE_GROUP_PACKED(packed_bf16, uint16_t, vload_bf16)
#if HAS_F16
DEFINE_GROUP(group_f16, uint16_t, vload_f16, f16_f32)
DEFINE_GROUP_PACKED(packed_f16, uint16_t, vload_f16)
#endif

/* Which dtypes this build serves: bit d set for dtype code d (F32, BF16, F16). */
int minigpt2_dtypes(void) { return (1 << F32) | (1 << BF16) | (HAS_F16 << F16); }

/* The vector width in fp32 lanes this build was compiled for (16: AVX-512, 8: AVX2, 1: C),
 * and the rows of a group: the packed layout's W and R. */
int minigpt2_lanes(void) { return W; }
int minigpt2_group_rows(void) { return R; }

static inline float in_f32(int dtype, const void *p, long i) {
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == BF16) return bf16_f32(((const uint16_t *)p)[i]);
#if HAS_F16
    return f16_f32(((const uint16_t *)p)[i]);
#else
    return 0.0f;
#endif
}

static inline void store(int dtype, void *y, long i, float v) {
    if (dtype == F32) ((float *)y)[i] = v;
    else if (dtype == BF16) ((uint16_t *)y)[i] = f32_bf16(v);
#if HAS_F16
    else ((uint16_t *)y)[i] = f32_f16(v);
#endif
}

/* y[N, out] = x[N, in] W[out, in]^T + b[out] (b may be NULL); W, b, x, y all of `dtype`,
 * contiguous; W as stored, or packed (see the top; in a multiple of W). fp32 accumulation, one rounding to `dtype` at the end. Returns 0, or -1 for
 * a dtype this build does not serve. Runs on omp_get_max_threads() threads (torch's setting
 * on the calling thread) when the matrix is large enough to gain from them. */
int minigpt2_linear(int dtype, int packed, const void *w, const void *b, const void *x, void *y, long N, long out, long in) {
    if (dtype < 0 || dtype > F16 || !((minigpt2_dtypes() >> dtype) & 1)) return -1;
    if (packed && in % W != 0) return -1;
    if (N <= 0 || out <= 0) return 0;
    /* x in fp32 (half-precision x widened exactly), one copy per call */
    const float *xf = (const float *)x;
    float *xbuf = NULL;
    if (dtype != F32) {
        xbuf = (float *)malloc((size_t)(N * in) * sizeof(float));
        if (!xbuf) return -2;
        for (long i = 0; i < N * in; i++) xbuf[i] = in_f32(dtype, x, i);
        xf = xbuf;
    }
    long groups = (out + R - 1) / R;
    int nt = omp_get_max_threads();
    if (nt > groups) nt = (int)groups;
    if ((double)out * (double)in < 32768.0) nt = 1; /* a parallel region costs more than the work */
    long esize = dtype == F32 ? 4 : 2;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long g0 = groups * t / T, g1 = groups * (t + 1) / T; /* contiguous groups: one stream per thread */
        float acc[64 * R];
        for (long g = g0; g < g1; g++) {
            long o0 = g * R, nr = out - o0 < R ? out - o0 : R;
            for (long n0 = 0; n0 < N; n0 += 64) {
                long nn = N - n0 < 64 ? N - n0 : 64;
                const char *wg = (const char *)w + (size_t)o0 * in * esize;
                const float *xg = xf + n0 * in;
                if (packed) {
                    if (dtype == F32) packed_f32((const float *)wg, xg, nn, in, nr, acc);
                    else if (dtype == BF16) packed_bf16((const uint16_t *)wg, xg, nn, in, nr, acc);
#if HAS_F16
                    else packed_f16((const uint16_t *)wg, xg, nn, in, nr, acc);
#endif
                } else {
                    if (dtype == F32) group_f32((const float *)wg, xg, nn, in, nr, acc);
                    else if (dtype == BF16) group_bf16((const uint16_t *)wg, xg, nn, in, nr, acc);
#if HAS_F16
                    else group_f16((const uint16_t *)wg, xg, nn, in, nr, acc);
#endif
                }
                for (long n = 0; n < nn; n++)
                    for (long k = 0; k < nr; k++) {
                        float v = acc[n * R + k] + (b ? in_f32(dtype, b, o0 + k) : 0.0f);
                        store(dtype, y, (n0 + n) * out + o0 + k, v);
                    }
            }
        }
    }
    free(xbuf);
    return 0;
}
