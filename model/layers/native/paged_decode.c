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

/* One task: sequence b's heads h0 .. h0 + count - 1 (offsets of those heads), each row read once for
 * all of them. A head's arithmetic is the same whatever its task's size: its scores, then its
 * weights, then its values summed in key order. scores: [count, n - first] of scratch. */
#define DEFINE_TASK(NAME, T)                                                                  \
    static void task_##NAME(const float *q, int64_t q_stride_h, const T *cache, int64_t row,  \
                            const int64_t *table, int64_t first, int64_t n, int64_t block_size, \
                            int64_t count, const int64_t *a_off, int64_t a_w, const int64_t *b_off, \
                            int64_t b_w, const int64_t *v_off, int64_t v_w, float scale, float *scores, \
                            float *o) {                                                       \
        int64_t keys = n - first;                                                             \
        for (int64_t k0 = first - first % block_size; k0 < n; k0 += block_size) {            \
            int64_t block = table[k0 / block_size];                                           \
            int64_t lo = k0 > first ? k0 : first, hi = k0 + block_size < n ? k0 + block_size : n; \
            const T *r = cache + (block * block_size + lo - k0) * row;                       \
            for (int64_t c = 0; c < count; c++) {                                             \
                float *sc = scores + c * keys - first;                                        \
                if (block < 0) {                                                              \
                    for (int64_t k = lo; k < hi; k++) sc[k] = -INFINITY;                      \
                    continue;                                                                 \
                }                                                                             \
                const float *qa = q + c * q_stride_h;                                         \
                int64_t k = lo;                                                               \
                const T *rk = r;                                                              \
                for (; k + 4 <= hi; k += 4, rk += 4 * row) {                                  \
                    float a4[4], b4[4] = {0.0f, 0.0f, 0.0f, 0.0f};                            \
                    dot4_##NAME(qa, rk + a_off[c], row, a_w, a4);                             \
                    if (b_w) dot4_##NAME(qa + a_w, rk + b_off[c], row, b_w, b4);              \
                    for (int j = 0; j < 4; j++) sc[k + j] = (a4[j] + b4[j]) * scale;          \
                }                                                                             \
                for (; k < hi; k++, rk += row) {                                              \
                    float s = dot_##NAME(qa, rk + a_off[c], a_w);                             \
                    if (b_w) s += dot_##NAME(qa + a_w, rk + b_off[c], b_w);                   \
                    sc[k] = s * scale;                                                        \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        float inv[count];                                                                     \
        for (int64_t c = 0; c < count; c++) {                                                 \
            float total = softmax_weights(scores + c * keys, keys);                           \
            inv[c] = total > 0.0f ? 1.0f / total : 0.0f;                                      \
        }                                                                                     \
        memset(o, 0, (size_t)(count * v_w) * sizeof(float));                                  \
        for (int64_t k0 = first - first % block_size; k0 < n; k0 += block_size) {            \
            int64_t block = table[k0 / block_size];                                           \
            if (block < 0) continue;                                                          \
            int64_t lo = k0 > first ? k0 : first, hi = k0 + block_size < n ? k0 + block_size : n; \
            const T *v = cache + (block * block_size + lo - k0) * row;                       \
            for (int64_t k = lo; k < hi; k++, v += row)                                       \
                for (int64_t c = 0; c < count; c++)                                           \
                    axpy_##NAME(o + c * v_w, scores[c * keys + k - first], v + v_off[c], v_w); \
        }                                                                                     \
        for (int64_t c = 0; c < count; c++)                                                   \
            for (int64_t i = 0; i < v_w; i++) o[c * v_w + i] *= inv[c];                       \
    }

DEFINE_TASK(f32, float)
DEFINE_TASK(bf16, uint16_t)
DEFINE_TASK(f16, _Float16)

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
            if (dtype == F32)
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
