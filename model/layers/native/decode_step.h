/* What the whole-step decode kernels (llama_decode_step.c, custom_llm_decode_step.c) share: the
 * product, attention and norm kernels compiled into their library, a weight in an integer-dot format
 * as the C side sees it, and the element-wise steps of a layer (residual adds, cache writes,
 * SwiGLU). Included by those files, not compiled on its own. */
#ifndef DECODE_STEP_H
#define DECODE_STEP_H
#include "quant_matmul.c"
#include "paged_decode.c"
#include "rms_norm.c"

typedef struct {
    int64_t bits;                  /* 4: int4-dot; 8: int8-dot */
    const uint8_t *packed;         /* the packed records */
    const float *scale;            /* int8-dot: [Np]; int4-dot: unused */
    int64_t out_features;
    int64_t in_padded;             /* Kp: the input width rounded up to 32 */
    int64_t half_scales;           /* int4-dot: 1 when its records hold float16 scales, 0 float32 ones */
} DotWeight;

/* out [M, N] = x [M, K] (rows x_stride floats apart) W^T */
static int product_strided(const DotWeight *w, const float *x, int64_t M, int64_t K, int64_t x_stride, float *out) {
    if (M == 0) return 0;
    if (w->bits == 4)
        return q4_matmul(x, M, K, x_stride, w->packed, w->out_features, w->in_padded, out, w->out_features,
                         (int)w->half_scales);
    return q8_matmul(x, M, K, x_stride, w->packed, w->scale, w->out_features, w->in_padded, out, w->out_features);
}

static int product(const DotWeight *w, const float *x, int64_t M, int64_t K, float *out) {
    return product_strided(w, x, M, K, K, out);
}

/* rows [M, n] += add [M, n] */
static void add_rows(float *rows, const float *add, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) rows[i] += add[i];
}

static inline uint16_t f32_to_bf16(float f) {          /* round to nearest even, as PyTorch's cast */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu)) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* n float32 values to float16 (round to nearest even) and back, 8 at a time in F16C where the compiler
 * targets it (GCC 12 leaves `(_Float16)x` loops scalar) */
static void f32_to_f16_n(const float *src, _Float16 *dst, int64_t n) {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = (_Float16)src[i];
}

static void f16_to_f32_n(const _Float16 *src, float *dst, int64_t n) {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = (float)src[i];
}

/* the first `width` floats of each of M rows (`row` floats apart) into its cache slot, a cache row
 * being `width` values of the cache's dtype */
static void write_rows(void *cache, int dtype, int64_t width, const float *kv, int64_t row, int64_t M,
                       const int64_t *slots) {
    for (int64_t m = 0; m < M; m++) {
        const float *src = kv + m * row;
        if (dtype == F32) {
            memcpy((float *)cache + slots[m] * width, src, (size_t)width * sizeof(float));
        } else if (dtype == BF16) {
            uint16_t *dst = (uint16_t *)cache + slots[m] * width;
            for (int64_t i = 0; i < width; i++) dst[i] = f32_to_bf16(src[i]);
        } else {
            f32_to_f16_n(src, (_Float16 *)cache + slots[m] * width, width);
        }
    }
}

/* silu(x) = x·σ(x) = x / (1 + e^-x), from e^-|x| (exp_nonpositive: vectorizes, within 2 ulp of expf)
 * so that nothing overflows, with one division (what bounds a vectorized loop of these) */
static inline float silu(float x) {
    float e = exp_nonpositive(-fabsf(x));
    return (x >= 0.0f ? x : x * e) / (1.0f + e);
}


/* silu(gate[i]) · up[i] for i < n into out. With AVX-512, 16 at a time: e^-x by exp2_16 and the
 * division as a reciprocal estimate refined once (~1e-7): the division is what bounds the plain loop. */
static void silu_times(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 log2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(gate + i);
        __m512 d = _mm512_add_ps(one, exp2_16(_mm512_mul_ps(x, log2e)));        /* 1 + e^-x, finite */
        __m512 r = _mm512_rcp14_ps(d);
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, two));                      /* one Newton step */
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(x, r), _mm512_loadu_ps(up + i)));
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++) out[j] = silu(gate[j]) * up[j];
}

/* SwiGLU: act[m, i] = silu(gate[m, i]) · up[m, i] from gate|up rows [M, 2I] */
static void swiglu(const float *gate_up, int64_t M, int64_t I, float *act) {
#pragma omp parallel for schedule(static) if (M * I >= 65536)
    for (int64_t m = 0; m < M; m++) silu_times(gate_up + m * 2 * I, gate_up + m * 2 * I + I, I, act + m * I);
}

#endif
