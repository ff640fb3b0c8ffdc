/* Products of float32 activations with int4 or int8 weights through 8-bit integer dot products
 * (AVX512-VNNI `vpdpbusd`: 16 lanes, each summing 4 unsigned × signed byte products), as llama.cpp
 * multiplies its Q4/Q8 blocks, with one difference: each row of activations is quantized on the fly,
 * per group of 32 columns, to two int8 digits, x ≈ xs · (256 · hi + lo) with xs = max|x| / (127 · 256)
 * (hi = round(x / (256 xs)), lo = round of the rest in 1/256ths): about 15 bits relative to the
 * group's largest value instead of llama.cpp's 8, finer than bfloat16 for all but the group's
 * smallest values. (With 8 bits, a group holding one of this model family's outlier activations
 * rounds its other values to a few levels: the built-in model's perplexity moved by 0.5-1.8 % with
 * perturbations of 1e-7 in its inputs.) No weight is ever dequantized to float, and one pass over the
 * packed weights serves every row of a batch.
 *
 * The 16 lanes of a register are 16 output features: a lane multiplies 4 consecutive columns of its
 * weight row by the same 4 activation bytes (broadcast), so a group of 32 columns is 8 `vpdpbusd`
 * per digit into an int32 register per (16 features, row), 256 · hi-sum + lo-sum, then one conversion
 * and two multiply-adds apply the group's scales. No horizontal sums.
 *
 * Shapes: x [M, K] float32 (row stride x_stride), out [M, N] float32 (row stride out_stride). N is
 * padded to Np, a multiple of 64 ("tiles" of 4 blocks of 16 features), K to Kp (a multiple of 32),
 * G = Kp / 32. A tile's weights for one group are one record, so a pass over a tile reads one
 * sequential stream (what the hardware prefetchers follow best).
 *
 * int4 weights (GGUF Q4_1's form): w[n, k] = scale[n, g] * code[n, k] + minimum[n, g], g = k / 32,
 * codes 0..15. packed uint8 [Np / 64, G, 1536]; record (tile t, group g):
 *   bytes [0, 1024): [4 blocks][4 chunks][64]: chunk i of block b holds, at byte 4l + j, the code of
 *     feature 64t + 16b + l at column 32g + 8i + j in its low nibble, 32g + 8i + 4 + j in its high one;
 *   bytes [1024, 1280): scale float32 [4 blocks][16]; bytes [1280, 1536): minimum float32 [4][16].
 *   y[m, n] = sum_g scale[n, g] * xs[m, g] * (code[n, g] . q[m, g]) + minimum[n, g] * xsum[m, g]
 * with q = 256 · hi + lo the activations' codes, xs their scales and xsum the float sum of the group's x.
 *
 * int8 weights: w[n, k] = scale[n] * code[n, k], codes -127..127 stored as code + 128 (unsigned):
 * packed uint8 [Np / 64, G, 2048]; record (t, g) = [8 quads][4 blocks][64]: byte 4l + j of quad u,
 * block b = column 32g + 4u + j of feature 64t + 16b + l; scale float32 [Np].
 *   y[m, n] = scale[n] * (sum_g xs[m, g] * ((code + 128)[n, g] . q[m, g]) - 128 * sum_g xs[m, g] * qsum[m, g])
 *
 * Padding holds code 0 with scale and minimum 0 (int4) or code 128 with scale 0 (int8), and q = 0 in
 * padded columns, so it adds nothing. Integer dot products are exact; only the order of the float
 * sums differs between the AVX512 path and the portable one (used where the CPU lacks AVX512-VNNI).
 * Every function returns 0, or 1 when scratch memory could not be allocated. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define LANES 16

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

typedef struct {
    int8_t *q;             /* [M, Kp] int8 high digits, then [M, Kp] low digits (`lo`) */
    int8_t *lo;
    float *scale;          /* [M, G]: xs */
    float *sum;            /* [M, G]: xsum, the float sum of the group's x */
    float *offset;         /* [M]: 128 * sum_g xs * qsum (the int8 weights' offset) */
} Activations;

static void free_activations(Activations *a) {
    free(a->q);
    free(a->scale);
    free(a->sum);
    free(a->offset);
}

static int alloc_activations(Activations *a, int64_t M, int64_t Kp) {
    int64_t G = Kp / GROUP;
    size_t qbytes = (size_t)(2 * M * Kp + 63) / 64 * 64;
    a->q = aligned_alloc(64, qbytes ? qbytes : 64);
    a->scale = malloc(sizeof(float) * (M * G + 1));
    a->sum = malloc(sizeof(float) * (M * G + 1));
    a->offset = malloc(sizeof(float) * (M + 1));
    if (!a->q || !a->scale || !a->sum || !a->offset) {
        free_activations(a);
        return 1;
    }
    a->lo = a->q + M * Kp;
    return 0;
}

/* one group of n <= 32 floats → 32 high and 32 low digits (zero beyond n), its scale xs, float sum
 * and code sum (of 256 · hi + lo) */
static inline void quantize_group(const float *x, int64_t n, int8_t *hi, int8_t *lo, float *scale, float *sum,
                                  int32_t *qsum) {
    float amax = 0.0f, s = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = fabsf(x[i]);
        amax = v > amax ? v : amax;
        s += x[i];
    }
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t total = 0;
    for (int64_t i = 0; i < GROUP; i++) {
        float u = i < n ? x[i] * inv : 0.0f;
        float h = nearbyintf(u);
        float l = nearbyintf((u - h) * 256.0f);
        l = l > 127.0f ? 127.0f : (l < -127.0f ? -127.0f : l);
        hi[i] = (int8_t)h;
        lo[i] = (int8_t)l;
        total += 256 * (int32_t)h + (int32_t)l;
    }
    *scale = amax / (127.0f * 256.0f);
    *sum = s;
    *qsum = total;
}

static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t x_stride, int64_t Kp, Activations *a) {
    int64_t G = Kp / GROUP;
#pragma omp parallel for schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        double offset = 0.0;
        for (int64_t g = 0; g < G; g++) {
            int64_t first = g * GROUP, n = K - first;
            n = n < 0 ? 0 : (n > GROUP ? GROUP : n);
            int32_t qsum;
            quantize_group(x + m * x_stride + first, n, a->q + m * Kp + first, a->lo + m * Kp + first,
                           &a->scale[m * G + g], &a->sum[m * G + g], &qsum);
            offset += 128.0 * a->scale[m * G + g] * qsum;
        }
        a->offset[m] = (float)offset;
    }
}

/* ---- portable path ---------------------------------------------------------------------------- */

#define Q4_RECORD 1536
#define Q8_RECORD 2048
#define TILE_BLOCKS 4

static void q4_portable(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, float *out,
                        int64_t out_stride) {
    int64_t G = Kp / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t t = n / 64, b = n / LANES % TILE_BLOCKS, l = n % LANES;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *q = a->q + m * Kp, *lo = a->lo + m * Kp;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *record = w + (t * G + g) * Q4_RECORD;
                const float *scale = (const float *)(record + 1024), *minimum = (const float *)(record + 1280);
                int32_t dot = 0;
                for (int64_t i = 0; i < 4; i++)
                    for (int64_t j = 0; j < 4; j++) {
                        uint8_t byte = record[(b * 4 + i) * 64 + 4 * l + j];
                        int64_t c0 = g * GROUP + 8 * i + j, c1 = c0 + 4;
                        dot += (byte & 15) * (256 * q[c0] + lo[c0]) + (byte >> 4) * (256 * q[c1] + lo[c1]);
                    }
                acc += (float)dot * (scale[b * LANES + l] * a->scale[m * G + g]) +
                       minimum[b * LANES + l] * a->sum[m * G + g];
            }
            out[m * out_stride + n] = acc;
        }
    }
}

static void q8_portable(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, const float *scale,
                        int64_t N, float *out, int64_t out_stride) {
    int64_t G = Kp / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t t = n / 64, b = n / LANES % TILE_BLOCKS, l = n % LANES;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *q = a->q + m * Kp, *lo = a->lo + m * Kp;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *record = w + (t * G + g) * Q8_RECORD;
                int32_t dot = 0;
                for (int64_t u = 0; u < 8; u++)
                    for (int64_t j = 0; j < 4; j++) {
                        int64_t c = g * GROUP + 4 * u + j;
                        dot += record[(u * TILE_BLOCKS + b) * 64 + 4 * l + j] * (256 * q[c] + lo[c]);
                    }
                acc += (float)dot * a->scale[m * G + g];
            }
            out[m * out_stride + n] = scale[n] * (acc - a->offset[m]);
        }
    }
}

/* ---- AVX512-VNNI path ------------------------------------------------------------------------- */

/* A tile is NB blocks of 16 features × R rows of activations (NB * R independent dpbusd chains);
 * NB and R are constants at each call site, so the loops unroll and the accumulators stay in
 * registers. */
#define MAX_TILE 8

VNNI static inline __m512i bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

VNNI static inline void store_lanes(float *out, int64_t n0, int64_t N, __m512 v) {
    int64_t left = N - n0;
    if (left >= LANES) _mm512_storeu_ps(out + n0, v);
    else if (left > 0) _mm512_mask_storeu_ps(out + n0, (__mmask16)((1u << left) - 1), v);
}

/* Blocks b0 .. b0 + NB - 1 of tile t (NB = 4: the whole record; 2: half of it) × rows m0 .. m0 + R - 1 */
VNNI static inline void q4_tile(const Activations *a, int64_t m0, const int R, int64_t t, int b0, const int NB,
                                int64_t Kp, const uint8_t *w, int64_t N, float *out, int64_t out_stride) {
    const int64_t G = Kp / GROUP;
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    __m512 acc[MAX_TILE];
    for (int c = 0; c < NB * R; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *record = w + (t * G + g) * Q4_RECORD;
        __m512i dots[MAX_TILE], lows[MAX_TILE];
        for (int c = 0; c < NB * R; c++) dots[c] = lows[c] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            __m512i lo[TILE_BLOCKS], hi[TILE_BLOCKS];
            for (int nb = 0; nb < NB; nb++) {
                __m512i bytes = _mm512_loadu_si512((const void *)(record + ((b0 + nb) * 4 + i) * 64));
                lo[nb] = _mm512_and_si512(bytes, low_nibbles);
                hi[nb] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
            }
            for (int r = 0; r < R; r++) {
                const int8_t *q = a->q + (m0 + r) * Kp + g * GROUP + 8 * i, *ql = q + (a->lo - a->q);
                __m512i xa = bcast4(q), xb = bcast4(q + 4), la = bcast4(ql), lb = bcast4(ql + 4);
                for (int nb = 0; nb < NB; nb++) {
                    dots[nb * R + r] = _mm512_dpbusd_epi32(dots[nb * R + r], lo[nb], xa);
                    dots[nb * R + r] = _mm512_dpbusd_epi32(dots[nb * R + r], hi[nb], xb);
                    lows[nb * R + r] = _mm512_dpbusd_epi32(lows[nb * R + r], lo[nb], la);
                    lows[nb * R + r] = _mm512_dpbusd_epi32(lows[nb * R + r], hi[nb], lb);
                }
            }
        }
        for (int c = 0; c < NB * R; c++) dots[c] = _mm512_add_epi32(_mm512_slli_epi32(dots[c], 8), lows[c]);
        const float *scale = (const float *)(record + 1024), *minimum = (const float *)(record + 1280);
        for (int nb = 0; nb < NB; nb++) {
            __m512 ws = _mm512_loadu_ps(scale + (b0 + nb) * LANES);
            __m512 mn = _mm512_loadu_ps(minimum + (b0 + nb) * LANES);
            for (int r = 0; r < R; r++) {
                int64_t at = (m0 + r) * G + g;
                __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(a->scale[at]));
                acc[nb * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[nb * R + r]), s, acc[nb * R + r]);
                acc[nb * R + r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a->sum[at]), acc[nb * R + r]);
            }
        }
    }
    for (int nb = 0; nb < NB; nb++)
        for (int r = 0; r < R; r++)
            store_lanes(out + (m0 + r) * out_stride, t * 64 + (b0 + nb) * LANES, N, acc[nb * R + r]);
}

VNNI static inline void q8_tile(const Activations *a, int64_t m0, const int R, int64_t t, int b0, const int NB,
                                int64_t Kp, const uint8_t *w, const float *scale, int64_t N, float *out,
                                int64_t out_stride) {
    const int64_t G = Kp / GROUP;
    __m512 acc[MAX_TILE];
    for (int c = 0; c < NB * R; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *record = w + (t * G + g) * Q8_RECORD;
        __m512i dots[MAX_TILE], lows[MAX_TILE];
        for (int c = 0; c < NB * R; c++) dots[c] = lows[c] = _mm512_setzero_si512();
        for (int u = 0; u < 8; u++) {
            __m512i codes[TILE_BLOCKS];
            for (int nb = 0; nb < NB; nb++)
                codes[nb] = _mm512_loadu_si512((const void *)(record + (u * TILE_BLOCKS + b0 + nb) * 64));
            for (int r = 0; r < R; r++) {
                __m512i x = bcast4(a->q + (m0 + r) * Kp + g * GROUP + 4 * u);
                __m512i xl = bcast4(a->lo + (m0 + r) * Kp + g * GROUP + 4 * u);
                for (int nb = 0; nb < NB; nb++) {
                    dots[nb * R + r] = _mm512_dpbusd_epi32(dots[nb * R + r], codes[nb], x);
                    lows[nb * R + r] = _mm512_dpbusd_epi32(lows[nb * R + r], codes[nb], xl);
                }
            }
        }
        for (int c = 0; c < NB * R; c++) dots[c] = _mm512_add_epi32(_mm512_slli_epi32(dots[c], 8), lows[c]);
        for (int r = 0; r < R; r++) {
            __m512 xs = _mm512_set1_ps(a->scale[(m0 + r) * G + g]);
            for (int nb = 0; nb < NB; nb++)
                acc[nb * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[nb * R + r]), xs, acc[nb * R + r]);
        }
    }
    for (int nb = 0; nb < NB; nb++) {
        int64_t n0 = t * 64 + (b0 + nb) * LANES;
        __m512 ws = _mm512_loadu_ps(scale + n0);
        for (int r = 0; r < R; r++) {
            __m512 y = _mm512_mul_ps(ws, _mm512_sub_ps(acc[nb * R + r], _mm512_set1_ps(a->offset[m0 + r])));
            store_lanes(out + (m0 + r) * out_stride, n0, N, y);
        }
    }
}

/* One row: the whole tile (4 pairs of chains, one stream). More rows: each half tile (2 blocks) × 2
 * rows at a time; the half's weights come from the cache after the first 2 rows. */
#define TILED(TILE, ...)                                                                          \
    do {                                                                                          \
        int64_t tiles = (N + 63) / 64;                                                            \
        _Pragma("omp parallel for schedule(static)")                                              \
        for (int64_t t = 0; t < tiles; t++) {                                                     \
            if (M == 1) {                                                                         \
                TILE(a, 0, 1, t, 0, 4, __VA_ARGS__);                                              \
                continue;                                                                         \
            }                                                                                     \
            for (int half = 0; half < 4; half += 2)                                               \
                for (int64_t m0 = 0; m0 < M; m0 += 2) {                                           \
                    if (M - m0 >= 2) TILE(a, m0, 2, t, half, 2, __VA_ARGS__);                     \
                    else TILE(a, m0, 1, t, half, 2, __VA_ARGS__);                                 \
                }                                                                                 \
        }                                                                                         \
    } while (0)

VNNI static void q4_vnni(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, float *out,
                         int64_t out_stride) {
    TILED(q4_tile, Kp, w, N, out, out_stride);
}

VNNI static void q8_vnni(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, const float *scale,
                         int64_t N, float *out, int64_t out_stride) {
    TILED(q8_tile, Kp, w, scale, N, out, out_stride);
}

/* ---- entry points ----------------------------------------------------------------------------- */

static int use_vnni = -1;      /* -1: not yet asked; set by vnni_path() or quant_matmul_force_portable() */

int quant_matmul_has_vnni(void) {
    if (use_vnni < 0) {
        __builtin_cpu_init();
        use_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vnni");
    }
    return use_vnni;
}

/* tests: take the portable path on this CPU too (0) or the CPU's best again (1) */
void quant_matmul_force_portable(int portable) {
    use_vnni = -1;
    if (portable) use_vnni = 0;
    else quant_matmul_has_vnni();
}

int q4_matmul(const float *x, int64_t M, int64_t K, int64_t x_stride, const uint8_t *w, int64_t N, int64_t Kp,
              float *out, int64_t out_stride) {
    Activations a;
    if (alloc_activations(&a, M, Kp)) return 1;
    quantize_rows(x, M, K, x_stride, Kp, &a);
    if (quant_matmul_has_vnni()) q4_vnni(&a, M, Kp, w, N, out, out_stride);
    else q4_portable(&a, M, Kp, w, N, out, out_stride);
    free_activations(&a);
    return 0;
}

int q8_matmul(const float *x, int64_t M, int64_t K, int64_t x_stride, const uint8_t *w, const float *scale,
              int64_t N, int64_t Kp, float *out, int64_t out_stride) {
    Activations a;
    if (alloc_activations(&a, M, Kp)) return 1;
    quantize_rows(x, M, K, x_stride, Kp, &a);
    if (quant_matmul_has_vnni()) q8_vnni(&a, M, Kp, w, scale, N, out, out_stride);
    else q8_portable(&a, M, Kp, w, scale, N, out, out_stride);
    free_activations(&a);
    return 0;
}

