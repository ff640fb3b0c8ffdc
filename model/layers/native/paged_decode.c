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
 * Each (sequence, head) is one task: its arithmetic does not depend on the batch around it. */
#include <math.h>
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

/* one (sequence, head): scores into `scores`, then the weighted sum of the values into o */
#define DEFINE_TASK(NAME, T)                                                                  \
    static void task_##NAME(const float *qa, const T *cache, int64_t row, const int64_t *table, \
                            int64_t first, int64_t n, int64_t block_size, int64_t a_off,     \
                            int64_t a_w, int64_t b_off, int64_t b_w, int64_t v_off,          \
                            int64_t v_w, float scale, float *scores, float *o) {             \
        float m = -INFINITY;                                                                  \
        for (int64_t k = first; k < n; k++) {                                                 \
            int64_t block = table[k / block_size];                                            \
            float s = -INFINITY;                                                              \
            if (block >= 0) {                                                                 \
                const T *r = cache + (block * block_size + k % block_size) * row;            \
                s = dot_##NAME(qa, r + a_off, a_w);                                           \
                if (b_w) s += dot_##NAME(qa + a_w, r + b_off, b_w);                           \
                s *= scale;                                                                   \
            }                                                                                 \
            scores[k - first] = s;                                                            \
            if (s > m) m = s;                                                                 \
        }                                                                                     \
        memset(o, 0, (size_t)v_w * sizeof(float));                                            \
        float total = 0.0f;                                                                   \
        for (int64_t k = first; k < n; k++) {                                                 \
            float s = scores[k - first];                                                      \
            if (s == -INFINITY) continue;                                                     \
            float w = expf(s - m);                                                            \
            total += w;                                                                       \
            int64_t block = table[k / block_size];                                            \
            axpy_##NAME(o, w, cache + (block * block_size + k % block_size) * row + v_off, v_w); \
        }                                                                                     \
        float inv = total > 0.0f ? 1.0f / total : 0.0f;                                       \
        for (int64_t i = 0; i < v_w; i++) o[i] *= inv;                                        \
    }

DEFINE_TASK(f32, float)
DEFINE_TASK(bf16, uint16_t)
DEFINE_TASK(f16, _Float16)

/* returns 0, or -1 for an unknown dtype or no memory */
int paged_decode(const float *q, int64_t q_stride_b, int64_t q_stride_h, const void *cache,
                 int dtype, int64_t row, const int64_t *tables, int64_t max_blocks,
                 const int64_t *lens, int64_t block_size, int64_t num_seqs, int64_t heads,
                 const int64_t *a_off, int64_t a_w, const int64_t *b_off, int64_t b_w,
                 const int64_t *v_off, int64_t v_w, float scale, int64_t window, float *out) {
    if (dtype != F32 && dtype != BF16 && dtype != F16) return -1;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; b++) longest = lens[b] > longest ? lens[b] : longest;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc((size_t)longest * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_seqs * heads; t++) {
            if (!scores) continue;
            int64_t b = t / heads, h = t % heads, n = lens[b];
            int64_t first = window >= 0 && n - 1 - window > 0 ? n - 1 - window : 0;
            const float *qa = q + b * q_stride_b + h * q_stride_h;
            const int64_t *table = tables + b * max_blocks;
            float *o = out + t * v_w;
            if (dtype == F32)
                task_f32(qa, (const float *)cache, row, table, first, n, block_size, a_off[h], a_w,
                         b_off[h], b_w, v_off[h], v_w, scale, scores, o);
            else if (dtype == BF16)
                task_bf16(qa, (const uint16_t *)cache, row, table, first, n, block_size, a_off[h],
                          a_w, b_off[h], b_w, v_off[h], v_w, scale, scores, o);
            else
                task_f16(qa, (const _Float16 *)cache, row, table, first, n, block_size, a_off[h],
                         a_w, b_off[h], b_w, v_off[h], v_w, scale, scores, o);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
