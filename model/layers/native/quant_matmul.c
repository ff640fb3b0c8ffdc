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
 * codes 0..15. packed uint8 [Np / 64, G, R]; record (tile t, group g) of R = 1280 bytes when every
 * scale and minimum is a float16 value (GGUF's Q4_0 / Q4_1, `--quantization int4`), else 1536:
 *   bytes [0, 1024): [4 blocks][4 chunks][64]: chunk i of block b holds, at byte 4l + j, the code of
 *     feature 64t + 16b + l at column 32g + 8i + j in its low nibble, 32g + 8i + 4 + j in its high one;
 *   then scale [4 blocks][16], then minimum [4][16], float16 (R = 1280) or float32 (R = 1536).
 *   y[m, n] = sum_g scale[n, g] * xs[m, g] * (code[n, g] . q[m, g]) + minimum[n, g] * xsum[m, g]
 * with q = 256 · hi + lo the activations' codes, xs their scales and xsum the float sum of the group's x.
 *
 * int8 weights: w[n, k] = scale[n] * code[n, k], codes -127..127 stored as code + 128 (unsigned):
 * packed uint8 [Np / 64, G, 2048]; record (t, g) = [8 quads][4 blocks][64]: byte 4l + j of quad u,
 * block b = column 32g + 4u + j of feature 64t + 16b + l; scale float32 [Np].
 *   y[m, n] = scale[n] * (sum_g xs[m, g] * ((code + 128)[n, g] . q[m, g]) - 128 * sum_g xs[m, g] * qsum[m, g])
 *
 * With AMX (Intel's tile unit: `tdpbsud`, a 16-row × 16-feature block of int32 sums of signed ×
 * unsigned byte products per instruction) and a batch of rows, the same integer sums come from the
 * tiles instead: per group of 32 columns and block of 16 features, the high and the low digits of 16
 * rows each times the block's codes (int4: unpacked to one byte each; int8: read in place, the records
 * already are the tile's layout), stored, and scaled into float accumulators as above. Same integer
 * products, same float arithmetic per group; only where one call's rows run.
 *
 * Padding holds code 0 with scale and minimum 0 (int4) or code 128 with scale 0 (int8), and q = 0 in
 * padded columns (and, for the tiles, in the rows up to a multiple of 16), so it adds nothing. Integer dot products are exact; only the order of the float
 * sums differs between the AVX512 paths and the portable one (used where the CPU lacks AVX512-VNNI).
 * Every function returns 0, or 1 when scratch memory could not be allocated. */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define GROUP 32
#define LANES 16

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

static int path(void);           /* the best path this CPU allows (entry points, below) */
enum { PORTABLE, VNNI_PATH, AMX_PATH };


typedef struct {
    int8_t *q;             /* [Mp, Kp] int8 high digits, then [Mp, Kp] low digits (`lo`); Mp = M, or M
                            * rounded up to 16 for the tiles, the rows past M zero */
    int8_t *lo;
    float *scale;          /* [Mp, G]: xs */
    float *sum;            /* [Mp, G]: xsum, the float sum of the group's x */
    float *offset;         /* [M]: 128 * sum_g xs * qsum (the int8 weights' offset) */
} Activations;

static void free_activations(Activations *a) {
    free(a->q);
    free(a->scale);
    free(a->sum);
    free(a->offset);
}

/* Mp >= M rows, those past M zero (no sums, scale 0) */
static int alloc_activations(Activations *a, int64_t M, int64_t Mp, int64_t Kp) {
    int64_t G = Kp / GROUP;
    size_t qbytes = (size_t)(2 * Mp * Kp + 63) / 64 * 64;
    a->q = aligned_alloc(64, qbytes ? qbytes : 64);
    a->scale = calloc((size_t)(Mp * G + 1), sizeof(float));
    a->sum = calloc((size_t)(Mp * G + 1), sizeof(float));
    a->offset = malloc(sizeof(float) * (M + 1));
    if (!a->q || !a->scale || !a->sum || !a->offset) {
        free_activations(a);
        return 1;
    }
    a->lo = a->q + Mp * Kp;
    if (Mp > M) {
        memset(a->q + M * Kp, 0, (size_t)((Mp - M) * Kp));
        memset(a->lo + M * Kp, 0, (size_t)((Mp - M) * Kp));
    }
    return 0;
}

/* one group of n <= 32 floats → 32 high and 32 low digits (zero beyond n), its scale xs, float sum
 * and code sum (of 256 · hi + lo). The digits are relative to the group's largest |x|, or to
 * `row_amax` when that is not negative (the whole row's: one scale for all its groups) */
static inline void quantize_group(const float *x, int64_t n, int8_t *hi, int8_t *lo, float *scale, float *sum,
                                  int32_t *qsum, float row_amax) {
    float amax = 0.0f, s = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = fabsf(x[i]);
        amax = v > amax ? v : amax;
        s += x[i];
    }
    if (row_amax >= 0.0f) amax = row_amax;
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

/* quantize_group with AVX512: the same float arithmetic per value (the float sum in another order) */
VNNI static inline void quantize_group_avx512(const float *x, int64_t n, int8_t *hi, int8_t *lo, float *scale,
                                              float *sum, int32_t *qsum, float row_amax) {
    __mmask16 first = (__mmask16)(n >= LANES ? 0xFFFF : (1u << n) - 1);
    __mmask16 second = (__mmask16)(n >= GROUP ? 0xFFFF : (n > LANES ? (1u << (n - LANES)) - 1 : 0));
    __m512 x0 = _mm512_maskz_loadu_ps(first, x), x1 = _mm512_maskz_loadu_ps(second, x + LANES);
    float amax = row_amax >= 0.0f ? row_amax : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 inverse = _mm512_set1_ps(inv), steps = _mm512_set1_ps(256.0f);
    const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    __m512i total = _mm512_setzero_si512();
    for (int half = 0; half < 2; half++) {
        __m512 u = _mm512_mul_ps(half ? x1 : x0, inverse);
        __m512 h = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(u, h), steps),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm512_min_ps(_mm512_max_ps(l, bottom), top);
        __m512i hi32 = _mm512_cvtps_epi32(h), lo32 = _mm512_cvtps_epi32(l);
        _mm_storeu_si128((__m128i *)(hi + half * LANES), _mm512_cvtepi32_epi8(hi32));
        _mm_storeu_si128((__m128i *)(lo + half * LANES), _mm512_cvtepi32_epi8(lo32));
        total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(hi32, 8), lo32));
    }
    *scale = amax / (127.0f * 256.0f);
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    *qsum = _mm512_reduce_add_epi32(total);
}

/* max |x[i]| of a row of K floats */
static float abs_max(const float *x, int64_t K) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    return amax;
}

VNNI static float abs_max_avx512(const float *x, int64_t K) {
    __m512 most = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    if (k < K) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << (K - k)) - 1), x + k)));
    return _mm512_reduce_max_ps(most);
}

/* a row of K floats (Kp with the zeros after them) as quantize_group_avx512 makes each group's digits
 * relative to the row's largest |x|, `amax`; returns the sum of every group's code sum. Only for the
 * tiles (one scale a row): none of the per-group reductions, nor the float sums only int4 reads. */
VNNI static int64_t quantize_row_whole_avx512(const float *x, int64_t K, int64_t Kp, int8_t *hi, int8_t *lo,
                                              float amax) {
    const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f), steps = _mm512_set1_ps(256.0f);
    const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    __m512i total = _mm512_setzero_si512();        /* a lane's sum stays under 2^31 for K < 2^20 */
    for (int64_t first = 0; first < Kp; first += LANES) {
        int64_t n = K - first;
        __mmask16 lanes = (__mmask16)(n >= LANES ? 0xFFFF : (n > 0 ? (1u << n) - 1 : 0));
        __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + first), inverse);
        __m512 h = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(u, h), steps),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm512_min_ps(_mm512_max_ps(l, bottom), top);
        __m512i hi32 = _mm512_cvtps_epi32(h), lo32 = _mm512_cvtps_epi32(l);
        _mm_storeu_si128((__m128i *)(hi + first), _mm512_cvtepi32_epi8(hi32));
        _mm_storeu_si128((__m128i *)(lo + first), _mm512_cvtepi32_epi8(lo32));
        total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(hi32, 8), lo32));
    }
    return _mm512_reduce_add_epi32(total);
}

/* row m's groups; `whole_row`: digits relative to the row's largest |x| (one scale for the row,
 * repeated in each of its groups' entries; the float sums left zero), else to each group's */
static void quantize_row(const float *x, int64_t m, int64_t K, int64_t x_stride, int64_t Kp, Activations *a,
                         int whole_row, int vector) {
    int64_t G = Kp / GROUP;
    double offset = 0.0;
    float row_amax = -1.0f;
    if (whole_row) row_amax = (vector ? abs_max_avx512 : abs_max)(x + m * x_stride, K);
    if (whole_row && vector) {
        /* the same offset as the loop below: each of its terms and their sum are exact in double */
        int64_t total = quantize_row_whole_avx512(x + m * x_stride, K, Kp, a->q + m * Kp, a->lo + m * Kp,
                                                  row_amax);
        float scale = row_amax / (127.0f * 256.0f);
        for (int64_t g = 0; g < G; g++) a->scale[m * G + g] = scale;
        a->offset[m] = (float)(128.0 * scale * (double)total);
        return;
    }
    for (int64_t g = 0; g < G; g++) {
        int64_t first = g * GROUP, n = K - first;
        n = n < 0 ? 0 : (n > GROUP ? GROUP : n);
        int32_t qsum;
        (vector ? quantize_group_avx512 : quantize_group)(x + m * x_stride + first, n, a->q + m * Kp + first,
                                                          a->lo + m * Kp + first, &a->scale[m * G + g],
                                                          &a->sum[m * G + g], &qsum, row_amax);
        offset += 128.0 * a->scale[m * G + g] * qsum;
    }
    a->offset[m] = (float)offset;
}

/* every row's groups (quantize_row) */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t x_stride, int64_t Kp, Activations *a,
                          int whole_row) {
    int vector = path() >= VNNI_PATH;
#pragma omp parallel for schedule(static) if (M * K >= 16384)
    for (int64_t m = 0; m < M; m++) quantize_row(x, m, K, x_stride, Kp, a, whole_row, vector);
}

/* ---- portable path ---------------------------------------------------------------------------- */

#define Q4_RECORD_HALF 1280     /* int4 records with float16 scales and minimums */
#define Q4_RECORD_FLOAT 1536    /* with float32 ones */
#define Q4_RECORD(half) ((half) ? Q4_RECORD_HALF : Q4_RECORD_FLOAT)

/* scale (which 0) or minimum (which 1) of feature `lane` of a record */
static inline float q4_scale_of(const uint8_t *record, int half, int which, int64_t lane) {
    if (half) {
        _Float16 v;
        memcpy(&v, record + 1024 + which * 128 + lane * 2, sizeof v);
        return (float)v;
    }
    float v;
    memcpy(&v, record + 1024 + which * 256 + lane * 4, sizeof v);
    return v;
}

/* the same for the 16 features of block b */
VNNI static inline __m512 q4_scales16(const uint8_t *record, int half, int which, int64_t b) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(record + 1024 + which * 128 + b * 32)));
    return _mm512_loadu_ps((const float *)(record + 1024 + which * 256 + b * 64));
}
#define Q8_RECORD 2048
#define TILE_BLOCKS 4

static void q4_portable(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, float *out,
                        int64_t out_stride, int half) {
    int64_t G = Kp / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t t = n / 64, b = n / LANES % TILE_BLOCKS, l = n % LANES;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *q = a->q + m * Kp, *lo = a->lo + m * Kp;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *record = w + (t * G + g) * Q4_RECORD(half);
                int32_t dot = 0;
                for (int64_t i = 0; i < 4; i++)
                    for (int64_t j = 0; j < 4; j++) {
                        uint8_t byte = record[(b * 4 + i) * 64 + 4 * l + j];
                        int64_t c0 = g * GROUP + 8 * i + j, c1 = c0 + 4;
                        dot += (byte & 15) * (256 * q[c0] + lo[c0]) + (byte >> 4) * (256 * q[c1] + lo[c1]);
                    }
                acc += (float)dot * (q4_scale_of(record, half, 0, b * LANES + l) * a->scale[m * G + g]) +
                       q4_scale_of(record, half, 1, b * LANES + l) * a->sum[m * G + g];
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

/* Records are read in order, one stream per thread; the hardware prefetcher alone keeps ~70 % of the
 * memory bandwidth busy (18 of 25 GB/s on a 2-core Xeon), asking for the record PREFETCH_RECORDS
 * ahead as each is started all of it (25 GB/s). Only the first pass over a tile asks (b0 = 0, first
 * rows): later passes read what it brought. */
#define PREFETCH_RECORDS 4

static inline void prefetch_ahead(const uint8_t *record, int64_t record_bytes) {
    const char *ahead = (const char *)record + PREFETCH_RECORDS * record_bytes;
    for (int64_t line = 0; line < record_bytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}

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
                                int64_t Kp, const uint8_t *w, int64_t N, float *out, int64_t out_stride, const int half) {
    const int64_t G = Kp / GROUP;
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    __m512 acc[MAX_TILE];
    for (int c = 0; c < NB * R; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *record = w + (t * G + g) * Q4_RECORD(half);
        if (b0 == 0 && m0 == 0) prefetch_ahead(record, Q4_RECORD(half));
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
        for (int nb = 0; nb < NB; nb++) {
            __m512 ws = q4_scales16(record, half, 0, b0 + nb), mn = q4_scales16(record, half, 1, b0 + nb);
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
        if (b0 == 0 && m0 == 0) prefetch_ahead(record, Q8_RECORD);
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
                         int64_t out_stride, int half) {
    if (half) TILED(q4_tile, Kp, w, N, out, out_stride, 1);
    else TILED(q4_tile, Kp, w, N, out, out_stride, 0);
}

VNNI static void q8_vnni(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, const float *scale,
                         int64_t N, float *out, int64_t out_stride) {
    TILED(q8_tile, Kp, w, scale, N, out, out_stride);
}

/* ---- AMX path ----------------------------------------------------------------------------------- */

/* Compilers from GCC 11 and clang 12 know the tile intrinsics; older ones build without this path. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define HAVE_AMX_COMPILER 1
#define AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")))

#define TILE_ROWS 16           /* rows of activations per tile */
/* the tile registers used (literal numbers: GCC's intrinsics paste them into the instruction); two
 * pairs of sum tiles, so that group g + 1's products run on the tile unit while the vector unit scales
 * group g's sums */
#define T_HI 0                 /* high digits of the activations */
#define T_LO 1                 /* their low digits */
#define T_CODES 2              /* weight codes */
#define T_SUM_HI_EVEN 3        /* int32 sums of the high digits' products, even groups */
#define T_SUM_LO_EVEN 4        /* of the low digits' */
#define T_SUM_HI_ODD 5
#define T_SUM_LO_ODD 6

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* A: 16 rows × 32 digits (one group); B: 8 rows (column quads) × 16 features × 4 codes; C: 16 × 16 int32 */
AMX static void load_tile_config(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    config.rows[T_HI] = config.rows[T_LO] = TILE_ROWS;
    config.bytes_per_row[T_HI] = config.bytes_per_row[T_LO] = GROUP;
    config.rows[T_CODES] = GROUP / 4;
    config.bytes_per_row[T_CODES] = 64;
    for (int t = T_SUM_HI_EVEN; t <= T_SUM_LO_ODD; t++) {
        config.rows[t] = TILE_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* sums [2][16 rows][16 features] int32 of one group: [0] the high digits of 16 rows times the codes,
 * [1] the low digits times them */
typedef int32_t GroupSums[2][TILE_ROWS][LANES];

/* Group g's products (rows m0 .. m0 + 15 × the B tile at `codes`, its rows `stride` bytes apart) into
 * the sum tiles of g's parity. Its sums are stored by store_group, issued after the vector code has
 * read the previous group's: tile stores hold back later loads, so a store issued before them would
 * make the vector unit wait for these products. */
#define GROUP_PRODUCTS(SUM_HI, SUM_LO, digits, lows, Kp, codes, stride)                           \
    do {                                                                                          \
        _tile_loadd(T_HI, digits, Kp);                                                            \
        _tile_loadd(T_LO, lows, Kp);                                                              \
        _tile_loadd(T_CODES, codes, stride);                                                      \
        _tile_zero(SUM_HI);                                                                       \
        _tile_zero(SUM_LO);                                                                       \
        _tile_dpbsud(SUM_HI, T_HI, T_CODES);                                                      \
        _tile_dpbsud(SUM_LO, T_LO, T_CODES);                                                      \
    } while (0)

AMX static inline void group_products(const Activations *a, int64_t m0, int64_t g, int64_t Kp, const uint8_t *codes,
                                      int64_t stride) {
    const int8_t *digits = a->q + m0 * Kp + g * GROUP, *lows = a->lo + m0 * Kp + g * GROUP;
    if (g & 1) GROUP_PRODUCTS(T_SUM_HI_ODD, T_SUM_LO_ODD, digits, lows, Kp, codes, stride);
    else GROUP_PRODUCTS(T_SUM_HI_EVEN, T_SUM_LO_EVEN, digits, lows, Kp, codes, stride);
}

AMX static inline void store_group(int64_t g, GroupSums sums[2]) {
    if (g & 1) {
        _tile_stored(T_SUM_HI_ODD, sums[1][0], 64);
        _tile_stored(T_SUM_LO_ODD, sums[1][1], 64);
    } else {
        _tile_stored(T_SUM_HI_EVEN, sums[0][0], 64);
        _tile_stored(T_SUM_LO_EVEN, sums[0][1], 64);
    }
}

/* row r's int32 dot of a group: 256 · (high digits' sum) + (low digits' sum) */
AMX static inline __m512 group_dot(GroupSums sums, int r) {
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512((const void *)sums[0][r]), 8),
                                               _mm512_load_si512((const void *)sums[1][r])));
}

/* int4 codes of block b in a record → the B tile: quad 2i = chunk i's low nibbles, 2i + 1 its high ones */
AMX static inline void unpack_codes(const uint8_t *record, int b, uint8_t codes[GROUP / 4][64]) {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
        __m512i bytes = _mm512_loadu_si512((const void *)(record + (b * 4 + i) * 64));
        _mm512_store_si512((void *)codes[2 * i], _mm512_and_si512(bytes, low_nibbles));
        _mm512_store_si512((void *)codes[2 * i + 1], _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles));
    }
}

/* int4: block b of tile t (16 features) × rows m0 .. m0 + 15. Codes are unpacked two groups ahead,
 * products issued one ahead of the scaling. */
AMX static inline void q4_amx_block(const Activations *a, int64_t m0, int64_t t, int b, int64_t Kp,
                                    const uint8_t *w, int64_t N, float *out, int64_t out_stride, const int half,
                                    int64_t M) {
    const int64_t G = Kp / GROUP;
    _Alignas(64) uint8_t codes[2][GROUP / 4][64];
    _Alignas(64) GroupSums sums[2];
    __m512 acc[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < 2 && g < G; g++) unpack_codes(w + (t * G + g) * Q4_RECORD(half), b, codes[g]);
    group_products(a, m0, 0, Kp, &codes[0][0][0], 64);
    for (int64_t g = 0; g < G; g++) {
        if (g + 1 < G) group_products(a, m0, g + 1, Kp, &codes[(g + 1) & 1][0][0], 64);
        store_group(g, sums);
        if (g + 2 < G) unpack_codes(w + (t * G + g + 2) * Q4_RECORD(half), b, codes[g & 1]);
        const uint8_t *record = w + (t * G + g) * Q4_RECORD(half);
        if (b == 0 && m0 == 0) prefetch_ahead(record, Q4_RECORD(half));
        __m512 ws = q4_scales16(record, half, 0, b), mn = q4_scales16(record, half, 1, b);
#pragma GCC unroll 16
        for (int r = 0; r < TILE_ROWS; r++) {
            int64_t at = (m0 + r) * G + g;
            acc[r] = _mm512_fmadd_ps(group_dot(sums[g & 1], r), _mm512_mul_ps(ws, _mm512_set1_ps(a->scale[at])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a->sum[at]), acc[r]);
        }
    }
    for (int r = 0; r < TILE_ROWS && m0 + r < M; r++)
        store_lanes(out + (m0 + r) * out_stride, t * 64 + b * LANES, N, acc[r]);
}

/* the output of block b's sums (hi, lo: [16 rows][16 features] int32) for rows m0 .. m0 + 15 */
AMX static inline void q8_amx_store(const Activations *a, int64_t m0, int64_t n0, int64_t G, const int32_t *hi,
                                    const int32_t *lo, const float *scale, int64_t N, float *out, int64_t out_stride,
                                    int64_t M) {
    __m512 ws = _mm512_loadu_ps(scale + n0);
    for (int r = 0; r < TILE_ROWS && m0 + r < M; r++) {
        /* 256 · Σhi in float: Σhi may pass int32's range once multiplied */
        __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(hi + r * LANES))),
                                     _mm512_set1_ps(256.0f),
                                     _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(lo + r * LANES))));
        __m512 acc = _mm512_mul_ps(dot, _mm512_set1_ps(a->scale[(m0 + r) * G]));
        store_lanes(out + (m0 + r) * out_stride, n0, N, _mm512_mul_ps(ws, _mm512_sub_ps(acc, _mm512_set1_ps(a->offset[m0 + r]))));
    }
}

/* int8: the record's quads of block b are the B tile as they lie (rows 4 blocks · 64 bytes apart).
 * The activations carry one scale per row (quantize_rows' whole_row), so no group needs scaling of
 * its own: every group's products accumulate in the same two sum tiles (high digits, low digits),
 * stored once per block, and a row's output is scale[n] · (xs · (256 · Σhi + Σlo) − offset). The
 * tile unit and the weights' bytes bound it, not the vector code a per-group scaling costs. */
AMX static inline void q8_amx_block(const Activations *a, int64_t m0, int64_t t, int b, int64_t Kp,
                                    const uint8_t *w, const float *scale, int64_t N, float *out, int64_t out_stride,
                                    int64_t M) {
    const int64_t G = Kp / GROUP;
    _Alignas(64) GroupSums sums;
    _tile_zero(T_SUM_HI_EVEN);
    _tile_zero(T_SUM_LO_EVEN);
    for (int64_t g = 0; g < G; g++) {
        _tile_loadd(T_HI, a->q + m0 * Kp + g * GROUP, Kp);
        _tile_loadd(T_LO, a->lo + m0 * Kp + g * GROUP, Kp);
        _tile_loadd(T_CODES, w + (t * G + g) * Q8_RECORD + b * 64, TILE_BLOCKS * 64);
        _tile_dpbsud(T_SUM_HI_EVEN, T_HI, T_CODES);
        _tile_dpbsud(T_SUM_LO_EVEN, T_LO, T_CODES);
        if (b == 0 && m0 == 0) prefetch_ahead(w + (t * G + g) * Q8_RECORD, Q8_RECORD);
    }
    _tile_stored(T_SUM_HI_EVEN, sums[0], 64);
    _tile_stored(T_SUM_LO_EVEN, sums[1], 64);
    q8_amx_store(a, m0, t * 64 + b * LANES, G, &sums[0][0][0], &sums[1][0][0], scale, N, out, out_stride, M);
}

/* every (block of 16 features, 16 rows) is one task; a thread loads the tile configuration once */
#define BLOCKED(BLOCK, ...)                                                                       \
    do {                                                                                          \
        int64_t blocks = (N + LANES - 1) / LANES, row_tiles = (M + TILE_ROWS - 1) / TILE_ROWS;    \
        _Pragma("omp parallel")                                                                   \
        {                                                                                         \
            load_tile_config();                                                                   \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t task = 0; task < blocks * row_tiles; task++) {                           \
                int64_t block = task / row_tiles, m0 = task % row_tiles * TILE_ROWS;              \
                BLOCK(a, m0, block / TILE_BLOCKS, (int)(block % TILE_BLOCKS), __VA_ARGS__, M);    \
            }                                                                                     \
            _tile_release();                                                                      \
        }                                                                                         \
    } while (0)

AMX static void q4_amx(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, float *out,
                       int64_t out_stride, int half) {
    if (half) BLOCKED(q4_amx_block, Kp, w, N, out, out_stride, 1);
    else BLOCKED(q4_amx_block, Kp, w, N, out, out_stride, 0);
}

/* int8 over an even number of groups: two blocks (32 features) × rows m0 .. m0 + 15 a task, 64 columns
 * (two groups) a product. Group g + 1's quads follow group g's in the record layout (records of a
 * tile lie one after the other, 8 quads of 4 · 64 bytes each), so one B tile of 16 quads at the
 * records' 256-byte row stride covers both groups; the activation tiles, loaded once per two groups,
 * serve both blocks. Against q8_amx_block: a quarter of the activation tile loads and half of the
 * products per weight byte, and four independent sums in flight instead of two (on a 2-core Xeon
 * a 16-row product ran at 13 GB/s per core, bound by the tile unit's loads and the chain of
 * products into one sum tile, not by memory). Tile registers: Q8W_* (load_full_tiles). */
#define Q8W_HI 0
#define Q8W_LO 1
#define Q8W_CODES0 2
#define Q8W_CODES1 3
#define Q8W_SUM_HI0 4
#define Q8W_SUM_LO0 5
#define Q8W_SUM_HI1 6
#define Q8W_SUM_LO1 7

/* all eight tile registers 16 rows × 64 bytes: the products in pairs here, prompt_attention.c's tiles */
__attribute__((target("amx-tile"))) static void load_full_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

AMX static inline void q8_amx_pair(const Activations *a, int64_t m0, int64_t t, int b0, int64_t Kp,
                                   const uint8_t *w, const float *scale, int64_t N, float *out, int64_t out_stride,
                                   int64_t M) {
    const int64_t G = Kp / GROUP;
    _Alignas(64) int32_t sums[4][TILE_ROWS][LANES];
    _tile_zero(Q8W_SUM_HI0);
    _tile_zero(Q8W_SUM_LO0);
    _tile_zero(Q8W_SUM_HI1);
    _tile_zero(Q8W_SUM_LO1);
    for (int64_t g = 0; g < G; g += 2) {
        const uint8_t *record = w + (t * G + g) * Q8_RECORD;
        _tile_loadd(Q8W_HI, a->q + m0 * Kp + g * GROUP, Kp);
        _tile_loadd(Q8W_LO, a->lo + m0 * Kp + g * GROUP, Kp);
        _tile_loadd(Q8W_CODES0, record + b0 * 64, TILE_BLOCKS * 64);
        _tile_loadd(Q8W_CODES1, record + (b0 + 1) * 64, TILE_BLOCKS * 64);
        _tile_dpbsud(Q8W_SUM_HI0, Q8W_HI, Q8W_CODES0);
        _tile_dpbsud(Q8W_SUM_LO0, Q8W_LO, Q8W_CODES0);
        _tile_dpbsud(Q8W_SUM_HI1, Q8W_HI, Q8W_CODES1);
        _tile_dpbsud(Q8W_SUM_LO1, Q8W_LO, Q8W_CODES1);
        if (b0 == 0 && m0 == 0) prefetch_ahead(record, 2 * Q8_RECORD);
    }
    _tile_stored(Q8W_SUM_HI0, sums[0], 64);
    _tile_stored(Q8W_SUM_LO0, sums[1], 64);
    _tile_stored(Q8W_SUM_HI1, sums[2], 64);
    _tile_stored(Q8W_SUM_LO1, sums[3], 64);
    int64_t n0 = t * 64 + b0 * LANES;
    q8_amx_store(a, m0, n0, G, &sums[0][0][0], &sums[1][0][0], scale, N, out, out_stride, M);
    if (n0 + LANES < N) q8_amx_store(a, m0, n0 + LANES, G, &sums[2][0][0], &sums[3][0][0], scale, N, out, out_stride, M);
}

AMX static void q8_amx(const Activations *a, int64_t M, int64_t Kp, const uint8_t *w, const float *scale,
                       int64_t N, float *out, int64_t out_stride) {
    BLOCKED(q8_amx_block, Kp, w, scale, N, out, out_stride);
}

/* q8_amx_pair's products (an even number of groups) with the rows' quantizing in the same parallel
 * region: one fork and join a product, not two (one of them idle: a 16 × 576 quantizing runs alone
 * on one thread), and each thread asks for the first records of its share of the weights before it
 * quantizes its rows, so that they stream in meanwhile instead of missing when its products start
 * (a product paid ~14 µs before it streamed, 120 products a 16-row step). Tasks are split between
 * the threads in contiguous shares, as a static schedule would. */
#define STARTING_RECORDS 8
AMX static void q8_amx_pairs_quantizing(const float *x, int64_t M, int64_t K, int64_t x_stride, int64_t Kp,
                                        Activations *a, const uint8_t *w, const float *scale, int64_t N,
                                        float *out, int64_t out_stride) {
    const int64_t G = Kp / GROUP;
    const int64_t pairs = (N + 2 * LANES - 1) / (2 * LANES), row_tiles = (M + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t tasks = pairs * row_tiles;
#pragma omp parallel
    {
        int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t per = tasks / threads, extra = tasks % threads;
        int64_t first = me * per + (me < extra ? me : extra), last = first + per + (me < extra ? 1 : 0);
        if (first < last) {
            int64_t t = first / row_tiles / 2;
            int64_t records = G < STARTING_RECORDS ? G : STARTING_RECORDS;
            const char *start = (const char *)(w + t * G * Q8_RECORD);
            for (int64_t line = 0; line < records * Q8_RECORD; line += 64) _mm_prefetch(start + line, _MM_HINT_T0);
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x, m, K, x_stride, Kp, a, 1, 1);
        load_full_tiles();
        for (int64_t task = first; task < last; task++) {
            int64_t pair = task / row_tiles, m0 = task % row_tiles * TILE_ROWS;
            q8_amx_pair(a, m0, pair / 2, (int)(pair % 2) * 2, Kp, w, scale, N, out, out_stride, M);
        }
        _tile_release();
    }
}
#endif

/* ---- entry points ----------------------------------------------------------------------------- */

/* the paths, slowest first; `best` is what this CPU (and its kernel's permission) allows */
static int best = -1, chosen = -1;     /* -1: not yet asked; `chosen` may be lowered by tests */

/* rows from which a call takes the tiles (fewer: the VNNI loops, faster there: a tile of 16 rows
 * costs the same however few are used) */
#define AMX_MIN_ROWS 12

static int cpu_has_amx(void) {
#ifdef HAVE_AMX_COMPILER
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 24 & 1) || !(edx >> 25 & 1)) return 0;
    /* Linux hands a process the tile state only on request (else the first tile instruction faults) */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static int path(void) {
    if (best < 0) {
        __builtin_cpu_init();
        int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vnni");
        best = !vnni ? PORTABLE : (cpu_has_amx() ? AMX_PATH : VNNI_PATH);
        if (chosen < 0 || chosen > best) chosen = best;
    }
    return chosen;
}

int quant_matmul_has_vnni(void) { return path() >= VNNI_PATH; }

int quant_matmul_has_amx(void) { return path() >= AMX_PATH; }

/* rows from which a product takes the tiles (AMX_MIN_ROWS, for callers that round as the tiles do) */
int quant_matmul_amx_min_rows(void) { return AMX_MIN_ROWS; }

/* tests: the best path this CPU allows, at most `highest` (0: portable, 1: AVX512-VNNI, 2: AMX); returns the one taken */
int quant_matmul_force_path(int highest) {
    path();
    chosen = highest < best ? highest : best;
    return chosen;
}

static int tiles_for(int64_t M) {
#ifdef HAVE_AMX_COMPILER
    return path() == AMX_PATH && M >= AMX_MIN_ROWS;
#else
    (void)M;
    return 0;
#endif
}

/* half: the records hold float16 scales and minimums (1280 bytes), else float32 ones (1536) */
int q4_matmul(const float *x, int64_t M, int64_t K, int64_t x_stride, const uint8_t *w, int64_t N, int64_t Kp,
              float *out, int64_t out_stride, int half) {
    Activations a;
    int tiles = tiles_for(M);
    if (alloc_activations(&a, M, tiles ? (M + 15) / 16 * 16 : M, Kp)) return 1;
    quantize_rows(x, M, K, x_stride, Kp, &a, 0);
#ifdef HAVE_AMX_COMPILER
    if (tiles) q4_amx(&a, M, Kp, w, N, out, out_stride, half);
    else
#endif
    if (path() >= VNNI_PATH) q4_vnni(&a, M, Kp, w, N, out, out_stride, half);
    else q4_portable(&a, M, Kp, w, N, out, out_stride, half);
    free_activations(&a);
    return 0;
}

int q8_matmul(const float *x, int64_t M, int64_t K, int64_t x_stride, const uint8_t *w, const float *scale,
              int64_t N, int64_t Kp, float *out, int64_t out_stride) {
    Activations a;
    int tiles = tiles_for(M);
    if (alloc_activations(&a, M, tiles ? (M + 15) / 16 * 16 : M, Kp)) return 1;
#ifdef HAVE_AMX_COMPILER
    if (tiles && Kp / GROUP % 2 == 0) {                       /* the tiles in pairs, quantizing alongside */
        q8_amx_pairs_quantizing(x, M, K, x_stride, Kp, &a, w, scale, N, out, out_stride);
        free_activations(&a);
        return 0;
    }
#endif
    quantize_rows(x, M, K, x_stride, Kp, &a, tiles);          /* the tiles sum whole rows: one scale a row */
#ifdef HAVE_AMX_COMPILER
    if (tiles) q8_amx(&a, M, Kp, w, scale, N, out, out_stride);
    else
#endif
    if (path() >= VNNI_PATH) q8_vnni(&a, M, Kp, w, scale, N, out, out_stride);
    else q8_portable(&a, M, Kp, w, scale, N, out, out_stride);
    free_activations(&a);
    return 0;
}
