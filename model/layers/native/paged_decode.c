/* Paged decode attention on the CPU: one query per sequence, reading each context row where it
 * sits in the cache (no gathered copy, no cast of the cache).
 *
 * A cache layer is rows [S, row] (slot = block * block_size + offset). Head h's key is the
 * concatenation of two segments of a row, row[a_off[h] : a_off[h] + a_w] and
 * row[b_off[h] : b_off[h] + b_w] (b_w may be 0), and its value is row[v_off[h] : v_off[h] + v_w]:
 *   grouped-query [K of every kv head | V of every kv head]: a = K of kv head h / G, b empty,
 *                                                             v = V of that kv head;
 *   MLA [c_kv (L) | k_rope of every head (H*R)]: a = c_kv, b = head h's k_rope, v = c_kv.
 * q [B, H, a_w + b_w] float32 (strides in floats), out [B, H, v_w] float32 (contiguous).
 * Sequence b's query sits at position lens[b] - 1 and sees keys max(0, p - window) .. p (window < 0:
 * all of them). Scores are scale * q.k, softmax in float32, exp(s - max) summed in key order.
 * A head's arithmetic does not depend on the batch around it (nor on the task it shares). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define DEFINE_ROW_OPS(NAME, T, LOAD)                                                         \
    static inline float dot_##NAME(const float *q, const T *row, int64_t n) {                 \
        float s = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+:s)")                                                    \
        for (int64_t i = 0; i < n; i++) s += q[i] * LOAD(row[i]);                             \
        return s;                                                                             \
    }                                                                                         \
    /* four rows at once: four independent sums (one would be a chain of dependent adds) */   \
    static inline void dot4_##NAME(const float *q, const T *r, int64_t stride, int64_t n,    \
                                   float *out) {                                              \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                     \
        const T *r1 = r + stride, *r2 = r1 + stride, *r3 = r2 + stride;                       \
        _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                          \
        for (int64_t i = 0; i < n; i++) {                                                     \
            s0 += q[i] * LOAD(r[i]);                                                          \
            s1 += q[i] * LOAD(r1[i]);                                                         \
            s2 += q[i] * LOAD(r2[i]);                                                         \
            s3 += q[i] * LOAD(r3[i]);                                                         \
        }                                                                                     \
        out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;                                   \
    }                                                                                         \
    static inline void axpy_##NAME(float *o, float w, const T *row, int64_t n) {              \
        _Pragma("omp simd")                                                                   \
        for (int64_t i = 0; i < n; i++) o[i] += w * LOAD(row[i]);                             \
    }

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define LOAD_F16(x) ((float)(x))
DEFINE_ROW_OPS(f32, float, LOAD_F32)
DEFINE_ROW_OPS(bf16, uint16_t, LOAD_BF16)
DEFINE_ROW_OPS(f16, _Float16, LOAD_F16)

/* e^x for x <= 0 (Cephes' single-precision polynomial, within 2 ulp of expf): plain arithmetic, so
 * the loop over a row of scores vectorizes (libm's expf is a call per score). Scores of -inf
 * (keys in no block) weigh 0. */
static inline float exp_nonpositive(float x) {
    float y = x < -87.0f ? -87.0f : x;
    float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;        /* round to nearest */
    float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x == -INFINITY ? 0.0f : p * two_n;
}

/* softmax weights of one head's scores, in place: e^(s - max); returns their sum, in key order */
static float softmax_weights(float *scores, int64_t n) {
    float m = -INFINITY;
    for (int64_t k = 0; k < n; k++) m = scores[k] > m ? scores[k] : m;
    if (m == -INFINITY) {
        memset(scores, 0, (size_t)n * sizeof(float));
        return 0.0f;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; k++) scores[k] = exp_nonpositive(scores[k] - m);
    float total = 0.0f;
    for (int64_t k = 0; k < n; k++) total += scores[k];
    return total;
}

/* The portable per-block scores and per-head values: four keys per dot (four independent sums),
 * each head's output summed over its keys in order, then scaled by 1 / Σ weights. */
#define DEFINE_PORTABLE_PARTS(NAME, T)                                                        \
    static inline void scores_block_##NAME(const float *qa, const T *r, int64_t row, int64_t lo, int64_t hi, \
                                           int64_t a_off, int64_t a_w, int64_t b_off, int64_t b_w, \
                                           float scale, float *sc) {                          \
        int64_t k = lo;                                                                       \
        const T *rk = r;                                                                      \
        for (; k + 4 <= hi; k += 4, rk += 4 * row) {                                          \
            float a4[4], b4[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                    \
            dot4_##NAME(qa, rk + a_off, row, a_w, a4);                                        \
            if (b_w) dot4_##NAME(qa + a_w, rk + b_off, row, b_w, b4);                         \
            for (int j = 0; j < 4; j++) sc[k + j] = (a4[j] + b4[j]) * scale;                  \
        }                                                                                     \
        for (; k < hi; k++, rk += row) {                                                      \
            float s = dot_##NAME(qa, rk + a_off, a_w);                                        \
            if (b_w) s += dot_##NAME(qa + a_w, rk + b_off, b_w);                              \
            sc[k] = s * scale;                                                                \
        }                                                                                     \
    }                                                                                         \
    static inline void head_values_##NAME(const T *cache, int64_t row, const int64_t *table, int64_t first, \
                                          int64_t n, int64_t block_size, int64_t v_off, const float *w, \
                                          float inv, float *o, int64_t v_w) {                 \
        memset(o, 0, (size_t)v_w * sizeof(float));                                           \
        for (int64_t k0 = first - first % block_size; k0 < n; k0 += block_size) {            \
            int64_t block = table[k0 / block_size];                                           \
            if (block < 0) continue;                                                          \
            int64_t lo = k0 > first ? k0 : first, hi = k0 + block_size < n ? k0 + block_size : n; \
            const T *v = cache + (block * block_size + lo - k0) * row + v_off;               \
            for (int64_t k = lo; k < hi; k++, v += row) axpy_##NAME(o, w[k - first], v, v_w);  \
        }                                                                                     \
        for (int64_t i = 0; i < v_w; i++) o[i] *= inv;                                        \
    }

DEFINE_PORTABLE_PARTS(f32, float)
DEFINE_PORTABLE_PARTS(bf16, uint16_t)
DEFINE_PORTABLE_PARTS(f16, _Float16)

/* the next block's rows into the cache while this block's are scored, by a task of several heads (a
 * sequence's in a batch; a task of one head reads a small part of each row): the blocks of a
 * sequence lie anywhere in the cache, where the hardware's prefetcher does not follow. Each head
 * asks for its share of the block's bytes (bytes from .. to) before its scores: asked all at once,
 * the requests queue behind each other and the loads of the block being scored wait for them (16
 * sequences × 400 keys, float16 cache, 2-core Xeon: 9.3-9.8 → 7.7-8.3 ms for 30 layers). */
static inline void prefetch_part(const char *rows, int64_t from, int64_t to) {
    for (int64_t at = from; at < to; at += 64) __builtin_prefetch(rows + at, 0, 3);
}

/* One task: sequence b's heads h0 .. h0 + count - 1 (offsets of those heads), each row read once per
 * block for all of them. A head's arithmetic is the same whatever its task's size: its scores
 * (SCORES: one block's keys lo .. hi - 1), then its weights, then its values (VALUES) summed in key
 * order. scores: [count, n - first] of scratch. ATTR: the functions' target attributes.
 * DEFINE_TASK_SCORES: the scores part, of every head of the task. */
#define DEFINE_TASK_SCORES(TASK_SCORES, T, ATTR, SCORES)                                      \
    ATTR static inline void TASK_SCORES(const float *q, int64_t q_stride_h, const T *cache, int64_t row, \
                                        const int64_t *table, int64_t first, int64_t n, int64_t block_size, \
                                        int64_t count, const int64_t *a_off, int64_t a_w, const int64_t *b_off, \
                                        int64_t b_w, float scale, float *scores) {            \
        int64_t keys = n - first;                                                             \
        for (int64_t k0 = first - first % block_size; k0 < n; k0 += block_size) {            \
            int64_t block = table[k0 / block_size];                                           \
            int64_t lo = k0 > first ? k0 : first, hi = k0 + block_size < n ? k0 + block_size : n; \
            const T *r = cache + (block * block_size + lo - k0) * row;                       \
            const char *next = count > 1 && k0 + block_size < n && table[k0 / block_size + 1] >= 0 \
                ? (const char *)(cache + table[k0 / block_size + 1] * block_size * row) : NULL; \
            const int64_t next_bytes = block_size * row * (int64_t)sizeof(T);                  \
            const int64_t share = (next_bytes / 64 + count - 1) / count * 64;                  \
            for (int64_t c = 0; c < count; c++) {                                             \
                if (next) prefetch_part(next, c * share, (c + 1) * share < next_bytes ? (c + 1) * share : next_bytes); \
                float *sc = scores + c * keys - first;                                        \
                if (block < 0)                                                                \
                    for (int64_t k = lo; k < hi; k++) sc[k] = -INFINITY;                      \
                else                                                                          \
                    SCORES(q + c * q_stride_h, r, row, lo, hi, a_off[c], a_w, b_off[c], b_w, scale, sc); \
            }                                                                                 \
        }                                                                                     \
    }

#define DEFINE_TASK(TASK, T, ATTR, SCORES, VALUES)                                            \
    DEFINE_TASK_SCORES(TASK##_scores, T, ATTR, SCORES)                                        \
    ATTR static void TASK(const float *q, int64_t q_stride_h, const T *cache, int64_t row,    \
                          const int64_t *table, int64_t first, int64_t n, int64_t block_size, \
                          int64_t count, const int64_t *a_off, int64_t a_w, const int64_t *b_off, \
                          int64_t b_w, const int64_t *v_off, int64_t v_w, float scale, float *scores, \
                          float *o) {                                                         \
        int64_t keys = n - first;                                                             \
        TASK##_scores(q, q_stride_h, cache, row, table, first, n, block_size, count, a_off, a_w, b_off, b_w, \
                      scale, scores);                                                         \
        for (int64_t c = 0; c < count; c++) {                                                 \
            float total = softmax_weights(scores + c * keys, keys);                           \
            VALUES(cache, row, table, first, n, block_size, v_off[c], scores + c * keys,       \
                   total > 0.0f ? 1.0f / total : 0.0f, o + c * v_w, v_w);                     \
        }                                                                                     \
    }

#define NO_ATTR
DEFINE_TASK(task_f32, float, NO_ATTR, scores_block_f32, head_values_f32)
DEFINE_TASK(task_bf16, uint16_t, NO_ATTR, scores_block_bf16, head_values_bf16)
DEFINE_TASK(task_f16, _Float16, NO_ATTR, scores_block_f16, head_values_f16)

/* ---- AVX-512 tasks --------------------------------------------------------------------------
 * The same task with 16 keys' scores at a time: one accumulator register per key (16 lanes of
 * q·k products each), the 16 then summed across lanes together (a transpose-and-add tree: 45
 * instructions for 16 sums, where one sum alone takes ~8), and each head's output accumulated in
 * registers over all its keys. Used where the widths are multiples of 16 (v_w up to 256) and the
 * CPU has AVX-512F; keys left over in a block (fewer than 16) are summed one at a time. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

AVX512 static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
AVX512 static inline __m512 load16_f16(const _Float16 *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* 2^t, 16 at a time, t clamped to [-127, 126] (below -126: 0 or a subnormal, so -inf gives 0): 2^n ·
 * 2^f with f in [-0.5, 0.5] by a degree-6 Taylor polynomial (relative error ~1e-7) */
AVX512 static inline __m512 exp2_16(__m512 t) {
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(126.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 2^t for a value rounded to bfloat16 next (a softmax weight, a SwiGLU output), half exp2_16's work: a
 * degree-3 polynomial on [-0.5, 0.5] (relative error 7.5e-5, under bfloat16's 2^-9) times 2^n, no
 * clamping: t far below zero gives 0, above 128 inf, t ±inf or NaN gives NaN. */
AVX512 static inline __m512 exp2_16_rounded_next(__m512 t) {
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p = _mm512_set1_ps(0.0551716531f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2426111615f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609919f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999280713f));
    return _mm512_scalef_ps(p, n);
}

/* softmax_weights 16 scores at a time: e^(s - max) as 2^((s - max)·log2 e) (exp2_16, within ~1e-7 of
 * expf), -inf scores (keys in no block) weighing exactly 0; the sum lane-wise, then across lanes */
AVX512 static float softmax_weights512(float *scores, int64_t n) {
    __m512 most = _mm512_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(scores + k));
    float m = _mm512_reduce_max_ps(most);
    for (; k < n; k++) m = scores[k] > m ? scores[k] : m;
    if (m == -INFINITY) {
        memset(scores, 0, (size_t)n * sizeof(float));
        return 0.0f;
    }
    const __m512 shift = _mm512_set1_ps(m), log2e = _mm512_set1_ps(1.4426950408889634f);
    __m512 sum = _mm512_setzero_ps();
    for (k = 0; k < n; k += 16) {
        const __mmask16 lanes = n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(lanes, scores + k);
        const __mmask16 weighed = _mm512_mask_cmp_ps_mask(lanes, s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 w = _mm512_maskz_mov_ps(weighed, exp2_16(_mm512_mul_ps(_mm512_sub_ps(s, shift), log2e)));
        _mm512_mask_storeu_ps(scores + k, lanes, w);
        sum = _mm512_add_ps(sum, w);
    }
    return _mm512_reduce_add_ps(sum);
}

/* lane j of the result = the sum of the 16 lanes of v[j] */
AVX512 static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; i++)          /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {        /* per 128-bit lane L: the sums of L's 4 lanes of v[4i .. 4i+3] */
        __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

#define DEFINE_GROUP_VALUES(NAME, T)                                                            \
    /* G heads' outputs o + h·v_w (v_w = 16·NV) = inv[h] · Σ_k w[h·w_stride + k] · v_k[v_off ..], keys \
     * in order, sums in registers (G·NV of them: 16 at most) */                              \
    AVX512 static inline __attribute__((always_inline)) void group_values_##NAME(               \
            const T *cache, int64_t row, const int64_t *table, int64_t first, int64_t n, int64_t block_size, \
            int64_t v_off, const float *w, int64_t w_stride, const float *inv, float *o, const int NV, \
            const int G) {                                                                    \
        __m512 acc[4][16];                                                                    \
        for (int h = 0; h < G; h++)                                                           \
            for (int i = 0; i < NV; i++) acc[h][i] = _mm512_setzero_ps();                     \
        for (int64_t k0 = first - first % block_size; k0 < n; k0 += block_size) {            \
            int64_t block = table[k0 / block_size];                                           \
            if (block < 0) continue;                                                          \
            int64_t lo = k0 > first ? k0 : first, hi = k0 + block_size < n ? k0 + block_size : n; \
            const T *v = cache + (block * block_size + lo - k0) * row + v_off;               \
            for (int64_t k = lo; k < hi; k++, v += row) {                                     \
                __m512 values[16];                                                            \
                for (int i = 0; i < NV; i++) values[i] = load16_##NAME(v + 16 * i);            \
                for (int h = 0; h < G; h++) {                                                 \
                    __m512 wk = _mm512_set1_ps(w[h * w_stride + k - first]);                  \
                    for (int i = 0; i < NV; i++) acc[h][i] = _mm512_fmadd_ps(wk, values[i], acc[h][i]); \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int h = 0; h < G; h++)                                                           \
            for (int i = 0; i < NV; i++)                                                      \
                _mm512_storeu_ps(o + h * NV * 16 + 16 * i, _mm512_mul_ps(acc[h][i], _mm512_set1_ps(inv[h]))); \
    }

DEFINE_GROUP_VALUES(f32, float)
DEFINE_GROUP_VALUES(bf16, uint16_t)
DEFINE_GROUP_VALUES(f16, _Float16)

#define DEFINE_TASK512(NAME, T)                                                               \
    /* scores of the 16 rows r, r + row, …: q·[row[a_off..] | row[b_off..]] * scale */         \
    AVX512 static inline void scores16_##NAME(const float *q, const T *r, int64_t row, int64_t a_off, \
                                              int64_t a_w, int64_t b_off, int64_t b_w, float scale, \
                                              float *out) {                                   \
        __m512 acc[16];                                                                       \
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();                            \
        for (int64_t i = 0; i < a_w; i += 16) {                                               \
            __m512 qv = _mm512_loadu_ps(q + i);                                               \
            for (int j = 0; j < 16; j++)                                                      \
                acc[j] = _mm512_fmadd_ps(qv, load16_##NAME(r + j * row + a_off + i), acc[j]); \
        }                                                                                     \
        for (int64_t i = 0; i < b_w; i += 16) {                                               \
            __m512 qv = _mm512_loadu_ps(q + a_w + i);                                         \
            for (int j = 0; j < 16; j++)                                                      \
                acc[j] = _mm512_fmadd_ps(qv, load16_##NAME(r + j * row + b_off + i), acc[j]); \
        }                                                                                     \
        _mm512_storeu_ps(out, _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale)));        \
    }                                                                                         \
    AVX512 static inline float score1_##NAME(const float *q, const T *r, int64_t a_off, int64_t a_w, \
                                             int64_t b_off, int64_t b_w, float scale) {       \
        __m512 acc = _mm512_setzero_ps();                                                     \
        for (int64_t i = 0; i < a_w; i += 16)                                                 \
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_##NAME(r + a_off + i), acc);  \
        for (int64_t i = 0; i < b_w; i += 16)                                                 \
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + a_w + i), load16_##NAME(r + b_off + i), acc); \
        return _mm512_reduce_add_ps(acc) * scale;                                             \
    }                                                                                         \
    /* o[0 .. 16·NV) = inv · Σ_k w[k] · v_k[v_off ..], keys in order, sums in registers */      \
    AVX512 static inline __attribute__((always_inline)) void values_##NAME(                  \
            const T *cache, int64_t row, const int64_t *table, int64_t first, int64_t n,       \
            int64_t block_size, int64_t v_off, const float *w, float inv, float *o, const int NV) { \
        group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, 0, &inv, o, NV, 1); \
    }                                                                                         \
    AVX512 static inline void scores_block512_##NAME(const float *qa, const T *r, int64_t row, int64_t lo, \
                                                     int64_t hi, int64_t a_off, int64_t a_w, int64_t b_off, \
                                                     int64_t b_w, float scale, float *sc) {   \
        int64_t k = lo;                                                                       \
        for (; k + 16 <= hi; k += 16)                                                         \
            scores16_##NAME(qa, r + (k - lo) * row, row, a_off, a_w, b_off, b_w, scale, sc + k); \
        for (; k < hi; k++)                                                                   \
            sc[k] = score1_##NAME(qa, r + (k - lo) * row, a_off, a_w, b_off, b_w, scale);     \
    }                                                                                         \
    AVX512 static inline void head_values512_##NAME(const T *cache, int64_t row, const int64_t *table, \
                                                    int64_t first, int64_t n, int64_t block_size, \
                                                    int64_t v_off, const float *w, float inv, float *o, \
                                                    int64_t v_w) {                            \
        switch (v_w / 16) {                                                                   \
        case 1: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 1); break; \
        case 2: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 2); break; \
        case 4: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 4); break; \
        case 8: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 8); break; \
        case 12: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 12); break; \
        default: values_##NAME(cache, row, table, first, n, block_size, v_off, w, inv, o, 16); break; \
        }                                                                                     \
    }

DEFINE_TASK512(f32, float)
DEFINE_TASK512(bf16, uint16_t)
DEFINE_TASK512(f16, _Float16)
/* Heads of a task that read the same values (grouped-query attention's heads of one kv head; every head
 * of a latent cache), up to 4 of hd ≤ 64, sum their outputs over each value row loaded once; each head's
 * arithmetic is the single head's, in the same order. (Converting a 16-bit cache's key rows once for
 * such heads, instead of once a head, measured slower where the cache streams from memory.) */

/* the heads from c sharing head c's value offset: c .. returned - 1 */
static int64_t group_end(const int64_t *v_off, int64_t c, int64_t count) {
    int64_t g = c + 1;
    while (g < count && v_off[g] == v_off[c]) g++;
    return g;
}

#define DEFINE_GROUPED_VALUES(NAME, T)                                                        \
    /* group_values for G heads (2 .. 4) of v_w 16, 32 or 64; 0 where it does not take them */ \
    AVX512 static int grouped_values_##NAME(const T *cache, int64_t row, const int64_t *table, int64_t first, \
                                            int64_t n, int64_t block_size, int64_t v_off, const float *w, \
                                            int64_t w_stride, const float *inv, float *o, int64_t v_w, int64_t G) { \
        switch (G * 100 + v_w / 16) {                                                         \
        case 201: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 1, 2); return 1; \
        case 202: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 2, 2); return 1; \
        case 204: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 4, 2); return 1; \
        case 301: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 1, 3); return 1; \
        case 302: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 2, 3); return 1; \
        case 304: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 4, 3); return 1; \
        case 401: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 1, 4); return 1; \
        case 402: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 2, 4); return 1; \
        case 404: group_values_##NAME(cache, row, table, first, n, block_size, v_off, w, w_stride, inv, o, 4, 4); return 1; \
        default: return 0;                                                                    \
        }                                                                                     \
    }

DEFINE_GROUPED_VALUES(f32, float)
DEFINE_GROUPED_VALUES(bf16, uint16_t)
DEFINE_GROUPED_VALUES(f16, _Float16)

/* the AVX-512 task: DEFINE_TASK's, heads sharing their values summed together (group_values) */
#define DEFINE_GROUPED_TASK512(TASK, NAME, T)                                                 \
    DEFINE_TASK_SCORES(TASK##_scores, T, AVX512, scores_block512_##NAME)                      \
    AVX512 static void TASK(const float *q, int64_t q_stride_h, const T *cache, int64_t row,  \
                            const int64_t *table, int64_t first, int64_t n, int64_t block_size, \
                            int64_t count, const int64_t *a_off, int64_t a_w, const int64_t *b_off, \
                            int64_t b_w, const int64_t *v_off, int64_t v_w, float scale, float *scores, \
                            float *o) {                                                       \
        const int64_t keys = n - first;                                                       \
        TASK##_scores(q, q_stride_h, cache, row, table, first, n, block_size, count, a_off, a_w, b_off, b_w, \
                      scale, scores);                                                         \
        for (int64_t c = 0, g; c < count; c = g) {            /* up to 4 heads sharing their values */ \
            g = group_end(v_off, c, count);                                             \
            g = g - c > 4 ? c + 4 : g;                                                        \
            float inv[4];                                                                     \
            for (int64_t h = c; h < g; h++) {                                                 \
                float total = softmax_weights512(scores + h * keys, keys);                    \
                inv[h - c] = total > 0.0f ? 1.0f / total : 0.0f;                              \
            }                                                                                 \
            if (g - c > 1 && grouped_values_##NAME(cache, row, table, first, n, block_size, v_off[c], \
                                                   scores + c * keys, keys, inv, o + c * v_w, v_w, g - c)) \
                continue;                                                                     \
            for (int64_t h = c; h < g; h++)                                                   \
                head_values512_##NAME(cache, row, table, first, n, block_size, v_off[h], scores + h * keys, \
                                      inv[h - c], o + h * v_w, v_w);                          \
        }                                                                                     \
    }

DEFINE_GROUPED_TASK512(task512_f32, f32, float)
DEFINE_GROUPED_TASK512(task512_bf16, bf16, uint16_t)
DEFINE_GROUPED_TASK512(task512_f16, f16, _Float16)

static int use_avx512 = -1;    /* -1: not yet asked; set by wide_path() or paged_decode_force_portable() */

static int wide_path(int64_t a_w, int64_t b_w, int64_t v_w) {
    if (use_avx512 < 0) {
        __builtin_cpu_init();
        use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    int64_t nv = v_w / 16;
    return use_avx512 && a_w % 16 == 0 && b_w % 16 == 0 && v_w % 16 == 0 &&
           (nv == 1 || nv == 2 || nv == 4 || nv == 8 || nv == 12 || nv == 16);
}

/* tests: the portable tasks on this CPU too (1), or the CPU's best again (0) */
void paged_decode_force_portable(int portable) {
    use_avx512 = -1;
    if (portable) use_avx512 = 0;
}

/* A task is one sequence's heads, all of them (each context row read once, front to back) when that
 * makes two tasks per thread or more, else one (sequence, head). Returns 0, or -1 for an unknown
 * dtype or no memory. */
int paged_decode(const float *q, int64_t q_stride_b, int64_t q_stride_h, const void *cache,
                 int dtype, int64_t row, const int64_t *tables, int64_t max_blocks,
                 const int64_t *lens, int64_t block_size, int64_t num_seqs, int64_t heads,
                 const int64_t *a_off, int64_t a_w, const int64_t *b_off, int64_t b_w,
                 const int64_t *v_off, int64_t v_w, float scale, int64_t window, float *out) {
    if (dtype != F32 && dtype != BF16 && dtype != F16) return -1;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; b++) longest = lens[b] > longest ? lens[b] : longest;
    int64_t per_task = num_seqs >= 2 * omp_get_max_threads() ? heads : 1, groups = heads / per_task;
    int wide = wide_path(a_w, b_w, v_w);
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc((size_t)(longest * per_task) * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_seqs * groups; t++) {
            if (!scores) continue;
            int64_t b = t / groups, h = t % groups * per_task, n = lens[b];
            int64_t first = window >= 0 && n - 1 - window > 0 ? n - 1 - window : 0;
            const float *qh = q + b * q_stride_b + h * q_stride_h;
            const int64_t *table = tables + b * max_blocks;
            float *o = out + (b * heads + h) * v_w;
            if (wide && dtype == F32)
                task512_f32(qh, q_stride_h, (const float *)cache, row, table, first, n, block_size, per_task,
                            a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
            else if (wide && dtype == BF16)
                task512_bf16(qh, q_stride_h, (const uint16_t *)cache, row, table, first, n, block_size, per_task,
                             a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
            else if (wide)
                task512_f16(qh, q_stride_h, (const _Float16 *)cache, row, table, first, n, block_size, per_task,
                            a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
            else if (dtype == F32)
                task_f32(qh, q_stride_h, (const float *)cache, row, table, first, n, block_size, per_task,
                         a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
            else if (dtype == BF16)
                task_bf16(qh, q_stride_h, (const uint16_t *)cache, row, table, first, n, block_size, per_task,
                          a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
            else
                task_f16(qh, q_stride_h, (const _Float16 *)cache, row, table, first, n, block_size, per_task,
                         a_off + h, a_w, b_off + h, b_w, v_off + h, v_w, scale, scores, o);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
