/* minigpt2's native matrix-vector kernel: y = x W^T + b for a few rows of x, and with it
 * GPT-2's whole one-token decode step (minigpt2_decode_step, at the end of this file).
 *
 * Decoding one token at batch 1 streams every weight matrix once, so it runs at the speed
 * of the memory, not of the arithmetic (kernels.py). This kernel reads W, stored [out, in]
 * row-major, as R row streams at a time, multiplies them with x in fp32 fused multiply-adds
 * and adds the bias; half-precision weights (bf16, fp16) are widened to fp32 on the fly, so
 * a half-precision model streams half the bytes of an fp32 one on any x86-64 host with AVX2,
 * with or without native bf16 arithmetic. Results are rounded once to the weights' dtype.
 *
 * W is read one row at a time by each thread (a contiguous block of rows per thread: one
 * sequential stream), U vectors per iteration into U accumulators, which the hardware
 * prefetchers follow best: measured on an AMD EPYC (Zen 5) here over GPT-2's 49 matrices, fp32
 * 46-49 GB/s and bf16 47-49 GB/s, against 39-41 and ~35 when R rows are read side by side (R
 * streams), and ~38 GB/s for oneDNN's bf16 GEMV. No copy of the tied unembedding is needed.
 *
 * Threads: one OpenMP parallel region per call, on the OpenMP runtime torch itself uses
 * (native.py uses this library only when the process ends up with one OpenMP runtime), so
 * the products and torch's own ops share one team and never spin against each other.
 *
 * Built on first use by native.py with the host's C compiler and -march=native: the vector
 * width below (AVX-512, AVX2 + FMA, or plain C) is the host's own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

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
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vset1(float f) { return _mm512_set1_ps(f); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); } /* b where either is NaN */
static inline float vmax_all(vec a) { return _mm512_reduce_max_ps(a); }
static inline unsigned vnans(vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }   /* bit per NaN lane */
static inline unsigned veq(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); } /* bit per equal lane */
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
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vset1(float f) { return _mm256_set1_ps(f); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float vmax_all(vec a) {
    float t[8], m;
    _mm256_storeu_ps(t, a);
    m = t[0];
    for (int i = 1; i < 8; i++) m = t[i] > m ? t[i] : m;
    return m;
}
static inline unsigned vnans(vec a) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
static inline unsigned veq(vec a, vec b) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
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
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vsub(vec a, vec b) { return a - b; }
static inline vec vset1(float f) { return f; }
static inline void vstore(float *p, vec a) { *p = a; }
static inline float vsum(vec a) { return a; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline float vmax_all(vec a) { return a; }
static inline unsigned vnans(vec a) { return a != a; }
static inline unsigned veq(vec a, vec b) { return a == b; }
#endif

#if defined(__F16C__)
#define HAS_F16 1
#else
#define HAS_F16 0
#endif

/* One row of W against the N rows of x (fp32, [N, in]): acc[n] = sum_i w[i] x[n, i].
 *
 * One or two rows of x (batch 1, a prompt's last rows): U independent accumulators, U vectors
 * of the row per iteration: one sequential stream per thread through the weights (measured
 * here, 49 GPT-2 matrices: 46-49 GB/s, against 39-41 for R rows read side by side, R streams;
 * 42 for a layout packed so R rows interleave). The first pass over the row (n == 0) also asks
 * for the weights PREFETCH bytes ahead, as non-temporal (prefetchnta: __builtin_prefetch's
 * locality 0): a whole decode step of GPT-2 124M on the AMD EPYC host here, same-process A/B in
 * random order, fp32 64.7 -> 82.6 tok/s and bf16 135.5 -> 155 (T0 prefetches at the same
 * distance gained about half of that, 4096 bytes ahead less). Builds without vectors (W == 1)
 * move less than a line per iteration and do not prefetch.
 *
 * TILE_MIN or more rows of x (a batch): up to G of them at a time against the row (tile_*), each
 * weight vector loaded and widened once for all of them, one accumulator a row of x. That
 * turns G loads of W into one: the batch is then bound by the FMAs, not the loads. Measured
 * over GPT-2's 49 matrices at 8 rows, 2 threads (AMD EPYC Zen 5): the AVX2 build, as a host
 * without AVX-512 compiles it, fp32 22.4 -> 17.0 ms (oneDNN's AVX2 GEMM 20.7) and bf16 17.2 ->
 * 11.9 (oneDNN on an fp32 copy, what such a host has otherwise: 22.2); 2 or 4 rows of W side
 * by side (fewer loads of x) measured slower, the extra streams cost more than the loads.
 * Two more things a tile needs (rows_*): its rows of x in L1, since every weight vector meets
 * all of them (8 rows of mlp.c_proj's 3072 inputs are 96 KB: past L1, each of those loads waited
 * on L2), so past X_L1 bytes the input is cut in pieces, each piece of every row of this block
 * of W in turn, the sums added up over the pieces; and a prefetch farther ahead than the one-row
 * loop's (a row of W takes several times longer to go through). Whole decode steps at batch 8,
 * same-process A/B, these two and the aligned buffers below together: AVX2 build fp32 19.7 ->
 * 15.3 ms, bf16 15.4 -> 11.9; AVX-512 build fp32 25.8 -> 16.9, bf16 16.1 -> 8.7 (7.6 with the
 * bf16 dot products further down, which replace these tiles for bf16 where the CPU has them).
 * Builds without vectors keep the one-row loop (its U accumulators: a scalar one a row of x
 * would sum 1600 products in one chain). */
#define U 8
#define G 8
#define TILE_MIN 3
#define PREFETCH 2048
#define TILE_PREFETCH 4096 /* bytes; at 2048 the AVX2 build's fp32 tiles took ~9 % longer */
#define X_L1 24576         /* bytes of x a tile keeps in L1 (32-48 KB on current x86 cores) */
#define RB 128             /* rows of W per block: the sums of a block, RB x (N <= 64) floats */
#define LINES(WT) (W > 1 ? (int)(U * W * sizeof(WT) / 64) : 0)
#define DEFINE_TILE(NAME, WT, VLOAD, SLOAD, GG)                                                  \
    static inline void NAME##GG(const WT *w, const float *x, long ldx, long in, long pf, float *acc) { \
        vec a[GG];                                                                               \
        for (int g = 0; g < GG; g++) a[g] = vzero();                                             \
        long i = 0;                                                                              \
        for (; i + W <= in; i += W) {                                                            \
            if (pf && ((i * (long)sizeof(WT)) & 63) == 0)                                        \
                __builtin_prefetch((const char *)(w + i) + pf, 0, 0);                            \
            vec wv = VLOAD(w + i);                                                               \
            for (int g = 0; g < GG; g++) a[g] = vfma(wv, vload(x + g * ldx + i), a[g]);          \
        }                                                                                        \
        for (int g = 0; g < GG; g++) {                                                           \
            float s = vsum(a[g]);                                                                \
            for (long j = i; j < in; j++) s += SLOAD(w[j]) * x[g * ldx + j];                     \
            acc[g] += s;                                                                         \
        }                                                                                        \
    }
/* out[(r - r0) N + n] = row r of W . x[n] for r0 <= r < r1, by tiles (TILE##g: g rows of x of
 * type XT at a time): the rows of x in groups of equal size (11: 6 + 5), the input in pieces
 * when a group's rows of x would not fit in X_L1 bytes */
#define DEFINE_TILED(NAME, WT, XT, TILE)                                                         \
    static void NAME(const WT *w, long r0, long r1, const XT *x, long N, long in, float *out) {  \
        long groups = (N + G - 1) / G, widest = (N + groups - 1) / groups;                      \
        long chunks = (widest * in * (long)sizeof(XT) + X_L1 - 1) / X_L1 + (in == 0); /* >= 1 */ \
        long kb = ((in + chunks - 1) / chunks + 31) / 32 * 32;                                   \
        for (long i = 0; i < (r1 - r0) * N; i++) out[i] = 0.0f;                                  \
        for (long k0 = 0; k0 < in; k0 += kb) {                                                   \
            long kn = in - k0 < kb ? in - k0 : kb;                                               \
            /* prefetch TILE_PREFETCH bytes ahead in the order the rows are read: */             \
            long pf = kn == in ? TILE_PREFETCH                                                   \
                               : (TILE_PREFETCH + kn * (long)sizeof(WT) - 1) / (kn * (long)sizeof(WT)) * in * (long)sizeof(WT); \
            for (long r = r0; r < r1; r++) {                                                     \
                const WT *wr = w + r * in + k0;                                                  \
                float *o = out + (r - r0) * N;                                                   \
                for (long n = 0, k = 0; k < groups; k++) {                                       \
                    long g = (N - n + groups - k - 1) / (groups - k);                            \
                    const XT *xn = x + n * in + k0;                                              \
                    long p = n == 0 ? pf : 0;                                                    \
                    switch (g) {                                                                 \
                    case 1: TILE##1(wr, xn, in, kn, p, o + n); break;                            \
                    case 2: TILE##2(wr, xn, in, kn, p, o + n); break;                            \
                    case 3: TILE##3(wr, xn, in, kn, p, o + n); break;                            \
                    case 4: TILE##4(wr, xn, in, kn, p, o + n); break;                            \
                    case 5: TILE##5(wr, xn, in, kn, p, o + n); break;                            \
                    case 6: TILE##6(wr, xn, in, kn, p, o + n); break;                            \
                    case 7: TILE##7(wr, xn, in, kn, p, o + n); break;                            \
                    default: TILE##8(wr, xn, in, kn, p, o + n); break;                           \
                    }                                                                            \
                    n += g;                                                                      \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }
#define DEFINE_ROW(NAME, WT, VLOAD, SLOAD)                                                       \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 1)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 2)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 3)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 4)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 5)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 6)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 7)                                                \
    DEFINE_TILE(NAME##_tile, WT, VLOAD, SLOAD, 8)                                                \
    static void NAME(const WT *w, const float *x, long N, long in, float *acc) {                 \
        for (long n = 0; n < N; n++) {                                                           \
            const float *xn = x + n * in;                                                        \
            vec a[U];                                                                            \
            for (int u = 0; u < U; u++) a[u] = vzero();                                          \
            long i = 0;                                                                          \
            for (; i + U * W <= in; i += U * W) {                                                \
                if (n == 0)                                                                      \
                    for (int k = 0; k < LINES(WT); k++)                                          \
                        __builtin_prefetch((const char *)(w + i) + PREFETCH + 64 * k, 0, 0);     \
                for (int u = 0; u < U; u++) a[u] = vfma(VLOAD(w + i + u * W), vload(xn + i + u * W), a[u]); \
            }                                                                                    \
            for (; i + W <= in; i += W) a[0] = vfma(VLOAD(w + i), vload(xn + i), a[0]);          \
            for (int u = 1; u < U; u++) a[0] = vadd(a[0], a[u]);                                 \
            float s = vsum(a[0]);                                                                \
            for (; i < in; i++) s += SLOAD(w[i]) * xn[i];                                        \
            acc[n] = s;                                                                          \
        }                                                                                        \
    }                                                                                            \
    DEFINE_TILED(NAME##_tiled, WT, float, NAME##_tile)                                           \
    static void NAME##_rows(const WT *w, long r0, long r1, const float *x, long N, long in, float *out) { \
        if (W == 1 || N < TILE_MIN) {                                                            \
            for (long r = r0; r < r1; r++) NAME(w + r * in, x, N, in, out + (r - r0) * N);       \
            return;                                                                              \
        }                                                                                        \
        NAME##_tiled(w, r0, r1, x, N, in, out);                                                  \
    }

static inline float id_f32(float v) { return v; }
DEFINE_ROW(row_f32, float, vload, id_f32)
DEFINE_ROW(row_bf16, uint16_t, vload_bf16, bf16_f32)
#if HAS_F16
DEFINE_ROW(row_f16, uint16_t, vload_f16, f16_f32)
#endif

#if defined(__AVX512BF16__)
/* bf16 weights against bf16 rows of x (a bf16 model's activations are bf16 values already) by
 * AVX512_BF16's dot products (vdpbf16ps): each lane adds two exact bf16 products to its fp32
 * sum per instruction, 32 weights a vector, so a tile does twice the multiply-adds per
 * instruction of the fp32 one and loads x at half the bytes. (Inputs and sums below 2^-126
 * count as 0 there, as the instruction defines.) */
#define HAS_DPBF16 1
#define DEFINE_DPTILE(GG)                                                                        \
    static inline void dp_tile##GG(const uint16_t *w, const uint16_t *x, long ldx, long in, long pf, float *acc) { \
        __m512 a[GG];                                                                            \
        for (int g = 0; g < GG; g++) a[g] = _mm512_setzero_ps();                                 \
        long i = 0;                                                                              \
        for (; i + 32 <= in; i += 32) {                                                          \
            if (pf) __builtin_prefetch((const char *)(w + i) + pf, 0, 0);                        \
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);                                   \
            for (int g = 0; g < GG; g++)                                                         \
                a[g] = _mm512_dpbf16_ps(a[g], wv, (__m512bh)_mm512_loadu_si512(x + g * ldx + i)); \
        }                                                                                        \
        for (int g = 0; g < GG; g++) {                                                           \
            float s = _mm512_reduce_add_ps(a[g]);                                                \
            for (long j = i; j < in; j++) s += bf16_f32(w[j]) * bf16_f32(x[g * ldx + j]);        \
            acc[g] += s;                                                                         \
        }                                                                                        \
    }
DEFINE_DPTILE(1)
DEFINE_DPTILE(2)
DEFINE_DPTILE(3)
DEFINE_DPTILE(4)
DEFINE_DPTILE(5)
DEFINE_DPTILE(6)
DEFINE_DPTILE(7)
DEFINE_DPTILE(8)
DEFINE_TILED(rows_bf16_dp, uint16_t, uint16_t, dp_tile)
#else
#define HAS_DPBF16 0
#endif

/* Which dtypes this build serves: bit d set for dtype code d (F32, BF16, F16). */
int minigpt2_dtypes(void) { return (1 << F32) | (1 << BF16) | (HAS_F16 << F16); }

/* The vector width in fp32 lanes this build was compiled for (16: AVX-512, 8: AVX2, 1: C). */
int minigpt2_lanes(void) { return W; }

/* 1 where bf16 products of TILE_MIN or more rows run on AVX512_BF16's dot products (rows_bf16_dp) */
int minigpt2_bf16_dot(void) { return HAS_DPBF16; }

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

/* Whether N rows of x in dtype run on the bf16 dot products (which read x as bf16) */
static inline int on_dot(int dtype, long N) { return HAS_DPBF16 && dtype == BF16 && N >= TILE_MIN; }

/* out[(r - r0) N + n] = row r of W [out, in] . x[n] for r0 <= r < r1 and the N (<= 64) rows of
 * x; xh: x as bf16 (exactly: a bf16 model's activations) where on_dot, else unused (NULL) */
static inline void rows_any(int dtype, const void *w, long r0, long r1, const float *x, const uint16_t *xh, long N,
                            long in, float *out) {
    if (dtype == F32) row_f32_rows((const float *)w, r0, r1, x, N, in, out);
#if HAS_DPBF16
    else if (on_dot(dtype, N)) rows_bf16_dp((const uint16_t *)w, r0, r1, xh, N, in, out);
#endif
    else if (dtype == BF16) row_bf16_rows((const uint16_t *)w, r0, r1, x, N, in, out);
#if HAS_F16
    else row_f16_rows((const uint16_t *)w, r0, r1, x, N, in, out);
#endif
    (void)xh;
}

/* n floats rounded up to whole 64-byte lines, and an allocation of n floats that starts on one:
 * a vector load of x that straddles two lines costs about two (on the AMD EPYC Zen 5 here, 8 rows
 * of fp32 over GPT-2's 49 matrices, AVX-512: 29.4 ms with x 16 bytes off a line, 19.3 on one) */
static inline size_t round_lines(size_t n) { return (n + 15) / 16 * 16; }
static inline float *alloc_floats(size_t n) { return (float *)aligned_alloc(64, round_lines(n) * sizeof(float)); }

/* b[o] in fp32, or 0 without a bias (b NULL) */
static inline float bias_at(int dtype, const void *b, long o) { return b ? in_f32(dtype, b, o) : 0.0f; }

/* y[N, out] = x[N, in] W[out, in]^T + b[out] (b may be NULL); W, b, x, y all of `dtype`,
 * contiguous. fp32 accumulation, one rounding to `dtype` at the end. Returns 0, -1 for a
 * dtype this build does not serve, -2 when out of memory. Runs on omp_get_max_threads()
 * threads (torch's setting on the calling thread), each on a contiguous block of rows of W,
 * when the matrix is large enough to gain from them. */
int minigpt2_linear(int dtype, const void *w, const void *b, const void *x, void *y, long N, long out, long in) {
    if (dtype < 0 || dtype > F16 || !((minigpt2_dtypes() >> dtype) & 1)) return -1;
    if (N <= 0 || out <= 0) return 0;
    /* x in fp32 (half-precision x widened exactly), one copy per call. Pieces of 64 rows (and a
     * last one of 3 or more) run on the bf16 dot products where the build has them, reading x as
     * it is: no copy when every piece does. */
    const int dp = on_dot(dtype, (N - 1) % 64 + 1); /* (the last piece is the shortest) */
    const float *xf = dp ? NULL : (const float *)x;
    float *xbuf = NULL;
    if (dtype != F32 && !dp) {
        xbuf = alloc_floats((size_t)(N * in));
        if (!xbuf) return -2;
        for (long i = 0; i < N * in; i++) xbuf[i] = in_f32(dtype, x, i);
        xf = xbuf;
    }
    int nt = omp_get_max_threads();
    if (nt > out) nt = (int)out;
    if ((double)out * (double)in < 32768.0) nt = 1; /* a parallel region costs more than the work */
    float *accs = alloc_floats((size_t)nt * RB * 64);
    if (!accs) {
        free(xbuf);
        return -2;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long r0 = out * t / T, r1 = out * (t + 1) / T;
        float *acc = accs + (size_t)t * RB * 64;
        for (long rb = r0; rb < r1; rb += RB) {
            long re = rb + RB < r1 ? rb + RB : r1;
            for (long n0 = 0; n0 < N; n0 += 64) {
                long nn = N - n0 < 64 ? N - n0 : 64;
                rows_any(dtype, w, rb, re, xf ? xf + n0 * in : NULL, dtype == BF16 ? (const uint16_t *)x + n0 * in : NULL, nn, in, acc);
                for (long o = rb; o < re; o++) {
                    float bias = bias_at(dtype, b, o);
                    for (long n = 0; n < nn; n++) store(dtype, y, (n0 + n) * out + o, acc[(o - rb) * nn + n] + bias);
                }
            }
        }
    }
    free(accs);
    free(xbuf);
    return 0;
}

/* ---------------------------------------------------------------- one token's attention
 * out[b, h, :] = softmax(scale * q[b, h, :] . k[b, h, s, :] over s, masked) . v[b, h, s, :]
 * for one new token per row (a decode step), fp32 throughout (half-precision q, k, v widened
 * exactly, the output rounded once). q: (B, nh, hs) with strides (qsb, qsh) and its last dim
 * contiguous; k, v: (B, nh, S, hs) with strides (sb, sh, ss) each and the last dim contiguous
 * (the KV cache's views); mask: NULL, or bytes (mask_rows = 1 or B, S) with row stride S,
 * nonzero = may attend; out: (B, nh, hs) contiguous. A row with every key masked gets NaN,
 * as softmax over all -inf does in torch. Heads run in parallel on the OpenMP team when the
 * work is large enough to gain from it. Returns 0, -1 for a dtype this build does not serve,
 * -2 when out of memory. */

/* e^y for y in [-87, 87] (callers clamp): y = k ln2 + r, |r| <= ln2 / 2, e^r by a degree-7
 * Taylor polynomial (relative error < 2e-8); plain arithmetic, so loops of it vectorize */
static inline float exp_clamped(float y) {
    float k = __builtin_rintf(y * 1.44269504088896341f);
    float r = y - k * 0.693145751953125f - k * 1.428606765330187e-06f; /* ln2 in two parts */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    k = k > -126.0f ? k : -126.0f; /* (a NaN y: keeps the conversion below defined; p is NaN) */
    int32_t e = (int32_t)((uint32_t)((int32_t)k + 127) << 23);
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

/* scores[s] = k[s] . q over the S keys of one head, 8 keys at a time, then one: 8 independent
 * sums (one accumulator chain a key would wait on the FMA latency: a head is only hs / W vectors
 * long) */
#define SCORES_BLOCK(NB, VLOAD, SLOAD)                                                           \
    for (; s + NB <= S; s += NB) {                                                               \
        vec a[NB];                                                                               \
        for (int j = 0; j < NB; j++) a[j] = vzero();                                             \
        long d = 0;                                                                              \
        for (; d + W <= hs; d += W) {                                                            \
            vec qv = vload(q + d);                                                               \
            for (int j = 0; j < NB; j++) a[j] = vfma(VLOAD(kp + (s + j) * kss + d), qv, a[j]);   \
        }                                                                                        \
        for (int j = 0; j < NB; j++) {                                                           \
            float t = vsum(a[j]);                                                                \
            for (long e = d; e < hs; e++) t += SLOAD(kp[(s + j) * kss + e]) * q[e];              \
            sc[s + j] = t;                                                                       \
        }                                                                                        \
    }
#define DEFINE_SCORES(NAME, WT, VLOAD, SLOAD)                                                    \
    static void NAME(const WT *kp, long kss, const float *q, long S, long hs, float *sc) {       \
        long s = 0;                                                                              \
        SCORES_BLOCK(8, VLOAD, SLOAD)                                                            \
        SCORES_BLOCK(1, VLOAD, SLOAD)                                                            \
    }
/* o = sum_s p[s] v[s] over the S values of one head: blocks of 8, then 4, then 1 vectors of o
 * held in registers across all s (one multiply-add chain per vector, independent of each other) */
#define VALUES_BLOCK(NB, VLOAD)                                                                  \
    for (; d + NB * W <= hs; d += NB * W) {                                                      \
        vec a[NB];                                                                               \
        for (int j = 0; j < NB; j++) a[j] = vzero();                                             \
        for (long s = 0; s < S; s++) {                                                           \
            vec ps = vset1(p[s]);                                                                \
            for (int j = 0; j < NB; j++) a[j] = vfma(VLOAD(vp + s * vss + d + j * W), ps, a[j]); \
        }                                                                                        \
        for (int j = 0; j < NB; j++) vstore(o + d + j * W, a[j]);                                \
    }
#define DEFINE_VALUES(NAME, WT, VLOAD, SLOAD)                                                    \
    static void NAME(const WT *vp, long vss, const float *p, long S, long hs, float *o) {        \
        long d = 0;                                                                              \
        VALUES_BLOCK(8, VLOAD)                                                                   \
        VALUES_BLOCK(4, VLOAD)                                                                   \
        VALUES_BLOCK(1, VLOAD)                                                                   \
        for (; d < hs; d++) {                                                                    \
            float a = 0.0f;                                                                      \
            for (long s = 0; s < S; s++) a += p[s] * SLOAD(vp[s * vss + d]);                     \
            o[d] = a;                                                                            \
        }                                                                                        \
    }
DEFINE_SCORES(scores_f32, float, vload, id_f32)
DEFINE_SCORES(scores_bf16, uint16_t, vload_bf16, bf16_f32)
DEFINE_VALUES(values_f32, float, vload, id_f32)
DEFINE_VALUES(values_bf16, uint16_t, vload_bf16, bf16_f32)
#if HAS_F16
DEFINE_SCORES(scores_f16, uint16_t, vload_f16, f16_f32)
DEFINE_VALUES(values_f16, uint16_t, vload_f16, f16_f32)
#endif

/* One (row, head) pair: o = softmax(scale * qf . k[s] over s < S, masked) . v[s] in fp32, into
 * o (hs floats, not yet divided by the sum of the weights: that is returned). k0, v0: the
 * element offsets of the head's first key in k and first value in v, consecutive positions
 * kss / vss elements apart; m: NULL or S bytes, nonzero = may attend; p: S floats of scratch.
 * Returns the sum of the weights (0, and o zero, when every key is masked). The weights are
 * e^(score - max) by exp_clamped, 0 below e^-87 (a weight under 1e-37 of the largest). */
static float attend(int dtype, const float *qf, const void *k, long k0, long kss, const void *v, long v0, long vss,
                    const uint8_t *m, long S, long hs, float scale, float *p, float *o) {
    if (dtype == F32) scores_f32((const float *)k + k0, kss, qf, S, hs, p);
    else if (dtype == BF16) scores_bf16((const uint16_t *)k + k0, kss, qf, S, hs, p);
#if HAS_F16
    else scores_f16((const uint16_t *)k + k0, kss, qf, S, hs, p);
#endif
    float mx = -INFINITY;
    for (long s = 0; s < S; s++) {
        p[s] = (m && !m[s]) ? -INFINITY : scale * p[s];
        if (p[s] > mx) mx = p[s];
    }
    if (mx == -INFINITY) { /* every key masked */
        for (long d = 0; d < hs; d++) o[d] = 0.0f;
        return 0.0f;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (long s = 0; s < S; s++) {
        float y = p[s] - mx; /* <= 0; -inf where masked */
        float e = y < -87.0f ? 0.0f : exp_clamped(y);
        p[s] = e;
        sum += e;
    }
    if (dtype == F32) values_f32((const float *)v + v0, vss, p, S, hs, o);
    else if (dtype == BF16) values_bf16((const uint16_t *)v + v0, vss, p, S, hs, o);
#if HAS_F16
    else values_f16((const uint16_t *)v + v0, vss, p, S, hs, o);
#endif
    return sum;
}

int minigpt2_attention_one(int dtype, const void *q, const void *k, const void *v, const uint8_t *mask,
                           long mask_rows, void *out, long B, long nh, long S, long hs, long qsb, long qsh,
                           long ksb, long ksh, long kss, long vsb, long vsh, long vss, float scale) {
    if (dtype < 0 || dtype > F16 || !((minigpt2_dtypes() >> dtype) & 1)) return -1;
    long pairs = B * nh;
    if (pairs <= 0 || hs <= 0) return 0;
    int nt = omp_get_max_threads();
    if (nt > pairs) nt = (int)pairs;
    if ((double)pairs * (double)S * (double)hs < 65536.0) nt = 1;
    /* each thread's scratch (scores, q and the output in fp32), allocated before the team starts:
     * every thread of a team must reach the work-sharing loop below */
    size_t per = (size_t)(S > 0 ? S : 1) + 2 * (size_t)hs;
    float *scratch = (float *)malloc((size_t)nt * per * sizeof(float));
    if (!scratch) return -2;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *p = scratch + (size_t)omp_get_thread_num() * per;
        float *qf = p + (S > 0 ? S : 1);
        float *o = qf + hs;
#pragma omp for schedule(static)
        for (long bh = 0; bh < pairs; bh++) {
            long b = bh / nh, h = bh % nh;
            for (long d = 0; d < hs; d++) qf[d] = in_f32(dtype, q, b * qsb + h * qsh + d);
            const uint8_t *m = mask ? mask + (mask_rows == 1 ? 0 : b) * S : NULL;
            float sum = attend(dtype, qf, k, b * ksb + h * ksh, kss, v, b * vsb + h * vsh, vss, m, S, hs, scale, p, o);
            float inv = 1.0f / sum; /* sum == 0: every key masked, NaN below, as torch's softmax gives */
            for (long d = 0; d < hs; d++) store(dtype, out, bh * hs + d, sum == 0.0f ? NAN : o[d] * inv);
        }
    }
    free(scratch);
    return 0;
}

/* ---------------------------------------------------------------- tanh GELU, in place
 * x <- 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) on n half-precision values, computed in
 * fp32 and rounded once, as torch's F.gelu(x, approximate="tanh") on bf16 / fp16: for a
 * prompt's MLP activation, where torch's bf16 GELU took ~2 ms a layer at 1000 x 3072 here.
 * Written as 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u)), which has no cancellation for negative x
 * (1 + tanh(u) -> 0 there), e^y by exp_clamped (above); plain loops the compiler vectorizes (with
 * -fno-trapping-math, which lets it turn the compares into selects; for 1000 x 3072: AVX-512
 * 0.52 ms, AVX2 1.06 ms, scalar 4.9 ms). Returns 0, -1 for a dtype this build does not serve. */
/* buf[j] <- GELU(buf[j]) for j < m, in fp32 */
static inline void gelu_span(float *buf, long m) {
#pragma omp simd
    for (long j = 0; j < m; j++) {
        float v = buf[j];
        float y = -1.5957691216057308f * (v + 0.044715f * v * v * v); /* -2u */
        float big = y > 87.0f; /* e^y past fp32: |result| < 1e-36 (x < -10), flushed to 0 (-0 for v < 0) */
        y = y > 87.0f ? 87.0f : (y < -87.0f ? -87.0f : y);
        buf[j] = big != 0.0f ? v * 0.0f : v / (1.0f + exp_clamped(y));
    }
}

int minigpt2_gelu_tanh_(int dtype, void *x, long n) {
    if (dtype != BF16 && !(dtype == F16 && HAS_F16)) return -1;
    int nt = omp_get_max_threads();
    if (n < 65536) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long i0 = n * t / T, i1 = n * (t + 1) / T;
        uint16_t *p = (uint16_t *)x;
        float buf[256];
        for (long c = i0; c < i1; c += 256) {
            long m = i1 - c < 256 ? i1 - c : 256;
            if (dtype == BF16)
                for (long j = 0; j < m; j++) buf[j] = bf16_f32(p[c + j]);
            else
                for (long j = 0; j < m; j++) buf[j] = in_f32(dtype, p, c + j);
            gelu_span(buf, m);
            if (dtype == BF16)
                for (long j = 0; j < m; j++) p[c + j] = f32_bf16(buf[j]);
            else
                for (long j = 0; j < m; j++) store(dtype, p, c + j, buf[j]);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- one decode step, whole
 * GPT-2's forward for one new token per row (a decode step), every layer, in one call and one
 * OpenMP parallel region: the team streams each matrix (each thread its contiguous block of
 * rows, as minigpt2_linear) and meets at a barrier between the phases that need the whole of
 * the previous one, five a layer. The same arithmetic as the model's forward in `dtype`, with
 * its roundings: every tensor the model would store in half precision (the layer norms' and
 * the products' outputs, the attention output, the residual stream after each addition, the
 * GELU, the logits) is rounded to it here at the same place, and kept in fp32 in between.
 * In fp32 nothing is rounded; the GELU is the tanh form written as x / (1 + e^(-2u)) (gelu_span),
 * within a few fp32 units of 0.5 x (1 + tanh(u)).
 *
 * Why: a token of GPT-2 124M in bf16 reads ~250 MB in ~4.6 ms here, and the same layer norms,
 * cache writes, attention, residual additions and GELUs issued as ~200 torch ops from Python
 * took another ~1 ms (docs/performance.md). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W, MPROJ_B, PER_LAYER };

typedef struct {
    int dtype;                 /* F32, BF16 or F16: every tensor below but logits, scales and the ids */
    long B, C, n_head, inner, n_layer, vocab, n_positions;
    const int64_t *ids;        /* (B): this step's token per row */
    const int64_t *positions;  /* (position_rows): one position for every row (1) or one per row (B) */
    long position_rows;
    const void *wte, *wpe;     /* (vocab, C), (n_positions, C) */
    const void *const *params; /* n_layer x PER_LAYER: LN weight and bias (C), c_attn, attn.c_proj, c_fc, mlp.c_proj
                                * as [out, in] and their biases (out) (NULL: none) */
    const float *scales;       /* (n_layer): the attention's scale per layer */
    float eps;                 /* every LayerNorm's epsilon */
    const void *lnf_w, *lnf_b; /* (C) */
    const void *unembed;       /* (vocab, C), or NULL: ln_f's output goes to hidden instead of logits */
    void *kv;                  /* the cache: (layer l, k|v i, row b, head h, position s, d) at
                                * l kv_l + i kv_kv + b kv_b + h kv_h + s kv_s + d */
    long kv_l, kv_kv, kv_b, kv_h, kv_s, max_len;
    long past;                 /* positions already cached: this token's keys and values go to position past */
    const int64_t *write_pos;  /* NULL, or (B): row n's keys and values go to position write_pos[n] <= past instead
                                * (a server's rows at different lengths; the mask hides what each row must not see) */
    const uint8_t *mask;       /* NULL, or (B, past + 1) bytes: nonzero = may attend */
    float *logits;             /* (B, vocab), written (with unembed) */
    void *hidden;              /* (B, C) of dtype, written (without unembed) */
} step_args;

static inline float rnd(int dtype, float v) {
    if (dtype == BF16) return bf16_f32(f32_bf16(v));
#if HAS_F16
    if (dtype == F16) return f16_f32(f32_f16(v));
#endif
    return v;
}

/* out[n] = LayerNorm(x[n]) for N rows of C: mean and variance in fp32 (two passes), the
 * output rounded to dtype (and, with outh, also written there as bf16) */
static void layer_norm_rows(int dtype, const float *x, long N, long C, const void *w, const void *b, float eps,
                            float *out, uint16_t *outh) {
    for (long n = 0; n < N; n++) {
        const float *xn = x + n * C;
        float *on = out + n * C;
        vec a = vzero();
        long i = 0;
        for (; i + W <= C; i += W) a = vadd(a, vload(xn + i));
        float s = vsum(a);
        for (; i < C; i++) s += xn[i];
        float mean = s / (float)C;
        vec m = vset1(mean);
        a = vzero();
        for (i = 0; i + W <= C; i += W) {
            vec d = vsub(vload(xn + i), m);
            a = vfma(d, d, a);
        }
        float ss = vsum(a);
        for (; i < C; i++) ss += (xn[i] - mean) * (xn[i] - mean);
        float rstd = 1.0f / sqrtf(ss / (float)C + eps);
        if (dtype == F32) {
            const float *wf = (const float *)w, *bf = (const float *)b;
            for (i = 0; i < C; i++) on[i] = (xn[i] - mean) * rstd * wf[i] + bf[i];
        } else {
            for (i = 0; i < C; i++) on[i] = rnd(dtype, (xn[i] - mean) * rstd * in_f32(dtype, w, i) + in_f32(dtype, b, i));
        }
        if (outh)
            for (i = 0; i < C; i++) outh[n * C + i] = f32_bf16(on[i]);
    }
}

/* x[n] += W in[n] + b (each sum rounded to dtype, then the addition) for thread t's share of
 * the C outputs: attn.c_proj and mlp.c_proj adding into the residual stream; acc: RB x B floats */
static void add_projection(int dtype, const void *w, const void *b, const float *in, const uint16_t *inh, long n_in,
                           float *x, long B, long C, int t, int T, float *acc) {
    for (long rb = C * t / T, hi = C * (t + 1) / T, re; rb < hi; rb = re) {
        re = rb + RB < hi ? rb + RB : hi;
        rows_any(dtype, w, rb, re, in, inh, B, n_in, acc);
        for (long r = rb; r < re; r++) {
            const float *ar = acc + (r - rb) * B;
            float bias = bias_at(dtype, b, r);
            for (long n = 0; n < B; n++) x[n * C + r] = rnd(dtype, x[n * C + r] + rnd(dtype, ar[n] + bias));
        }
    }
}

/* Returns 0; -1 for a dtype this build does not serve, -2 when out of memory, -3 for sizes it
 * does not take (B outside 1..64, C not n_head x head size, the cache full, a write position
 * outside 0..past), -4 for a token id or position outside the embeddings. */
int minigpt2_decode_step(const step_args *a) {
    int dtype = a->dtype;
    if (dtype < 0 || dtype > F16 || !((minigpt2_dtypes() >> dtype) & 1)) return -1;
    const long B = a->B, C = a->C, nh = a->n_head, inner = a->inner, L = a->n_layer, V = a->vocab;
    const long hs = nh > 0 ? C / nh : 0, past = a->past, S = past + 1;
    if (B <= 0 || B > 64 || nh <= 0 || hs * nh != C || inner <= 0 || past < 0 || S > a->max_len) return -3;
    for (long n = 0; n < B; n++) {
        int64_t id = a->ids[n], p = a->positions[a->position_rows == 1 ? 0 : n];
        if (id < 0 || id >= V || p < 0 || p >= a->n_positions) return -4;
        if (a->write_pos && (a->write_pos[n] < 0 || a->write_pos[n] > past)) return -3;
    }
    int nt = omp_get_max_threads();
    /* x (the residual stream), q, attention out, MLP activation; then each thread's layer norm,
     * scores, head output and sums: each on its own 64-byte lines. With the bf16 dot products,
     * the products' inputs (attention out, MLP activation, each thread's layer norm) as bf16
     * too, in as many floats as hold them. */
    const int dp = on_dot(dtype, B);
    const size_t hC = dp ? round_lines((B * C + 1) / 2) : 0, hI = dp ? round_lines((B * inner + 1) / 2) : 0;
    size_t shared = 3 * round_lines(B * C) + round_lines(B * inner) + hC + hI;
    size_t per = round_lines(B * C) + round_lines(S) + round_lines(hs) + RB * (size_t)B + hC;
    float *buf = alloc_floats(shared + (size_t)nt * per);
    if (!buf) return -2;
    float *x = buf, *q = x + round_lines(B * C), *att = q + round_lines(B * C), *fc = att + round_lines(B * C);
    uint16_t *atth = dp ? (uint16_t *)(fc + round_lines(B * inner)) : NULL, *fch = dp ? (uint16_t *)(fc + round_lines(B * inner) + hC) : NULL;
    float *priv = fc + round_lines(B * inner) + hC + hI;
    for (long n = 0; n < B; n++) {
        long id = (long)a->ids[n], p = (long)a->positions[a->position_rows == 1 ? 0 : n];
        for (long i = 0; i < C; i++) x[n * C + i] = rnd(dtype, in_f32(dtype, a->wte, id * C + i) + in_f32(dtype, a->wpe, p * C + i));
    }
    const long kv_l = a->kv_l, kv_kv = a->kv_kv, kv_b = a->kv_b, kv_h = a->kv_h, kv_s = a->kv_s;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *ln = priv + (size_t)t * per, *sc = ln + round_lines(B * C), *o = sc + round_lines(S), *acc = o + round_lines(hs);
        uint16_t *lnh = dp ? (uint16_t *)(acc + RB * B) : NULL;
        for (long l = 0; l < L; l++) {
            const void *const *P = a->params + l * PER_LAYER;
            /* ln_1 (each thread its own copy: no barrier), q|k|v: k and v straight into the cache */
            layer_norm_rows(dtype, x, B, C, P[LN1_W], P[LN1_B], a->eps, ln, lnh);
            for (long rb = 3 * C * t / T, hi = 3 * C * (t + 1) / T, re; rb < hi; rb = re) { /* this thread's rows, RB at a time */
                re = rb + RB < hi ? rb + RB : hi;
                rows_any(dtype, P[ATTN_W], rb, re, ln, lnh, B, C, acc);
                for (long r = rb; r < re; r++) {
                    const float *ar = acc + (r - rb) * B;
                    float bias = bias_at(dtype, P[ATTN_B], r);
                    if (r < C) {
                        for (long n = 0; n < B; n++) q[n * C + r] = rnd(dtype, ar[n] + bias);
                    } else {
                        long j = r - C, which = j / C, h = j % C / hs, d = j % hs;
                        for (long n = 0; n < B; n++) {
                            long at = a->write_pos ? (long)a->write_pos[n] : past;
                            store(dtype, a->kv, l * kv_l + which * kv_kv + n * kv_b + h * kv_h + at * kv_s + d, ar[n] + bias);
                        }
                    }
                }
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (long bh = 0; bh < B * nh; bh++) {
                long n = bh / nh, h = bh % nh, base = l * kv_l + n * kv_b + h * kv_h;
                float sum = attend(dtype, q + n * C + h * hs, a->kv, base, kv_s, a->kv, base + kv_kv, kv_s,
                                   a->mask ? a->mask + n * S : NULL, S, hs, a->scales[l], sc, o);
                float inv = 1.0f / sum; /* sum == 0: every key masked, NaN, as torch's softmax gives */
                for (long d = 0; d < hs; d++) att[n * C + h * hs + d] = sum == 0.0f ? NAN : rnd(dtype, o[d] * inv);
                if (atth)
                    for (long d = 0; d < hs; d++) atth[n * C + h * hs + d] = f32_bf16(att[n * C + h * hs + d]);
            } /* (the loop's implicit barrier: the projection reads every head) */
            add_projection(dtype, P[APROJ_W], P[APROJ_B], att, atth, C, x, B, C, t, T, acc);
#pragma omp barrier
            layer_norm_rows(dtype, x, B, C, P[LN2_W], P[LN2_B], a->eps, ln, lnh);
            const long f0 = inner * t / T, f1 = inner * (t + 1) / T;
            for (long rb = f0, re; rb < f1; rb = re) {
                re = rb + RB < f1 ? rb + RB : f1;
                rows_any(dtype, P[FC_W], rb, re, ln, lnh, B, C, acc);
                for (long r = rb; r < re; r++) {
                    const float *ar = acc + (r - rb) * B;
                    float bias = bias_at(dtype, P[FC_B], r);
                    for (long n = 0; n < B; n++) fc[n * inner + r] = rnd(dtype, ar[n] + bias);
                }
            }
            for (long n = 0; n < B; n++) { /* GELU on this thread's own outputs: no barrier between */
                float *f = fc + n * inner;
                gelu_span(f + f0, f1 - f0);
                if (dtype != F32)
                    for (long r = f0; r < f1; r++) f[r] = rnd(dtype, f[r]);
                if (fch)
                    for (long r = f0; r < f1; r++) fch[n * inner + r] = f32_bf16(f[r]);
            }
#pragma omp barrier
            add_projection(dtype, P[MPROJ_W], P[MPROJ_B], fc, fch, inner, x, B, C, t, T, acc);
#pragma omp barrier
        }
        layer_norm_rows(dtype, x, B, C, a->lnf_w, a->lnf_b, a->eps, ln, lnh);
        if (a->unembed) {
            for (long rb = V * t / T, hi = V * (t + 1) / T, re; rb < hi; rb = re) {
                re = rb + RB < hi ? rb + RB : hi;
                rows_any(dtype, a->unembed, rb, re, ln, lnh, B, C, acc);
                for (long r = rb; r < re; r++)
                    for (long n = 0; n < B; n++) a->logits[n * V + r] = rnd(dtype, acc[(r - rb) * B + n]);
            }
        } else if (t == 0) { /* the unembedding runs on another kernel (native.py): ln_f's output, rounded already */
            for (long i = 0; i < B * C; i++) store(dtype, a->hidden, i, ln[i]);
        }
    }
    free(buf);
    return 0;
}

/* torch.max(x, dim=-1) of `rows` contiguous rows of n fp32 values: each row's maximum and its
 * first index (ties: the first; a NaN wins over every number, the first NaN; an all -inf row:
 * index 0), as torch's. Greedy decoding takes it once a token over 50257 logits, where torch's
 * reduction took ~27 us warm and 60-120 us right after a decode step (caches cold) on the AMD
 * EPYC host here. Two vector passes over the row: the maximum (vmax passes NaNs over, so they
 * are flagged apart and, if any, the first found by a scalar scan), then the first vector that
 * holds it. Returns 0, or -1 for n < 1 or rows < 0. */
int minigpt2_max_rows(const float *x, long rows, long n, float *values, int64_t *indices) {
    if (n < 1 || rows < 0) return -1;
    long body = n / W * W;
    for (long r = 0; r < rows; r++) {
        const float *p = x + r * n;
        vec vm = vset1(p[0]);
        unsigned nan = 0;
        for (long i = 0; i < body; i += W) {
            vec v = vload(p + i);
            vm = vmax(v, vm);
            nan |= vnans(v);
        }
        float m = vmax_all(vm);
        for (long i = body; i < n; i++) {
            m = p[i] > m ? p[i] : m;
            nan |= p[i] != p[i];
        }
        long at = -1;
        if (nan) { /* rare: the first NaN, scalar */
            at = 0;
            while (p[at] == p[at]) at++;
        } else {
            vec want = vset1(m);
            for (long i = 0; i < body && at < 0; i += W) {
                unsigned hit = veq(vload(p + i), want);
                if (hit) at = i + __builtin_ctz(hit);
            }
            if (at < 0) {
                at = body;
                while (p[at] != m) at++;
            }
        }
        values[r] = p[at];
        indices[r] = at;
    }
    return 0;
}
