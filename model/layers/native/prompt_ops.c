/* The element-wise steps of a prompt chunk's layer on bfloat16 activations, one pass each where PyTorch
 * takes several ops and a float32 copy of every tensor (README.md, "Speed on a CPU"):
 *
 * prompt_rope_qkv: a fused q|k|v product's bfloat16 rows [T, (H + 2KV)·hd] → rotate_half RoPE of the
 *   H query and KV key heads (float32 arithmetic; cos / sin [T, H + KV, hd] as model/families/llama.py's
 *   `Rope`: query rows pre-scaled, sin signed; every query head's row is the same, and every key head's,
 *   so only heads 0 and H are read), the rotated keys and the values written to their cache
 *   slots in the cache's dtype, the queries out as bfloat16 [T, H, hd] and, when kv_out is given, the
 *   [K | V] rows as bfloat16 [T, 2·KV·hd] rounded from the cache's values (what gathering the cache
 *   and converting it gives, so a prompt attends alike whether its keys come from here or the cache).
 * prompt_swiglu: gate|up bfloat16 rows [T, 2I] → silu(gate)·up as bfloat16 [T, I], rounded once (with
 *   AVX512-BF16 from a float32 value within 2e-4: e^-x and the division approximated, 32 at a time).
 * prompt_add_rms_norm: the residual add of a product's bfloat16 output and the next norm (below). */
#include "decode_step.h"

/* GCC's loops over 512-bit vectors where the CPU has them (its default for -march=native is 256 bits):
 * the conversions and the norm's passes halve with the width */
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

#define CHUNK 256                                       /* values converted per pass of a row */

#ifdef __AVX512BF16__
/* 16 bfloat16 values → float32 (exact: the bits shifted up) */
static inline __m512 bf16_16_to_ps(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}
#endif

/* bf16_to_f32 / f32_to_bf16 over n values: with AVX512-BF16, 16 / 32 at a time (its conversion rounds
 * alike but flushes float32 subnormals to zero), the rest in loops the compiler vectorizes */
static void bf16_to_f32_n(const uint16_t *src, float *dst, int64_t n) {
    int64_t done = 0;
#ifdef __AVX512BF16__
    for (; done + 16 <= n; done += 16) _mm512_storeu_ps(dst + done, bf16_16_to_ps(src + done));
#endif
#pragma omp simd
    for (int64_t i = done; i < n; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &bits, sizeof bits);
    }
}

static void f32_to_bf16_n(const float *src, uint16_t *dst, int64_t n) {
    int64_t done = 0;
#ifdef __AVX512BF16__
    for (; done + 32 <= n; done += 32)
        _mm512_storeu_si512((void *)(dst + done), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + done + 16),
                                                                               _mm512_loadu_ps(src + done)));
#endif
#pragma omp simd
    for (int64_t i = done; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, quiet_nan = (bits >> 16) | 0x40u;
        dst[i] = (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
    }
}

WIDE_VECTORS void prompt_rope_qkv(const uint16_t *qkv, int64_t T, int64_t H, int64_t KV, int64_t hd, const float *cos,
                     const float *sin, const int64_t *slots, void *cache, int32_t cache_dtype, uint16_t *q_out,
                     uint16_t *kv_out) {
    const int64_t rotated_heads = H + KV, width = (H + 2 * KV) * hd, kv_width = 2 * KV * hd, half = hd / 2;
#pragma omp parallel for schedule(static) if (T * width >= 32768)
    for (int64_t t = 0; t < T; t++) {
        float x[width], out[rotated_heads * hd];        /* this token's q|k|v; its rotated q|k, then v */
        bf16_to_f32_n(qkv + t * width, x, width);
        for (int64_t j = 0; j < rotated_heads; j++) {
            const int64_t table_row = t * rotated_heads + (j < H ? 0 : H);     /* heads alike: see above */
            const float *c = cos + table_row * hd, *s = sin + table_row * hd;
            const float *in = x + j * hd;
            float *o = out + j * hd;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) o[i] = in[i] * c[i] + in[i + half] * s[i];
#pragma omp simd
            for (int64_t i = half; i < hd; i++) o[i] = in[i] * c[i] + in[i - half] * s[i];
        }
        f32_to_bf16_n(out, q_out + t * H * hd, H * hd);
        float *kv = out + H * hd;                        /* [K | V]: the rotated keys, then the values */
        memcpy(kv + KV * hd, x + rotated_heads * hd, (size_t)(KV * hd) * sizeof(float));
        write_rows(cache, cache_dtype, kv_width, kv, kv_width, 1, slots + t);
        if (!kv_out) continue;
        if (cache_dtype == F16) f16_to_f32_n((const _Float16 *)cache + slots[t] * kv_width, kv, kv_width);
        f32_to_bf16_n(kv, kv_out + t * kv_width, kv_width);
    }
}

#ifdef __AVX512BF16__
/* silu(gate)·up for 16: e^-x by exp2_16_rounded_next, 1 / (1 + e^-x) by the reciprocal estimate (relative
 * error 2^-14): within 2e-4 of the float32 value, which is rounded to bfloat16 next */
static inline __m512 silu_times_16(__m512 gate, __m512 up) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f),
                                   exp2_16_rounded_next(_mm512_mul_ps(gate, _mm512_set1_ps(-1.4426950408889634f))));
    return _mm512_mul_ps(_mm512_mul_ps(gate, _mm512_rcp14_ps(d)), up);
}
#endif

WIDE_VECTORS void prompt_swiglu(const uint16_t *gate_up, int64_t T, int64_t I, uint16_t *act) {
#pragma omp parallel for schedule(static) if (T * I >= 65536)
    for (int64_t t = 0; t < T; t++) {
        int64_t done = 0;
#ifdef __AVX512BF16__
        const uint16_t *gate = gate_up + t * 2 * I, *up = gate + I;
        for (; done + 32 <= I; done += 32) {
            const __m512 lo = silu_times_16(bf16_16_to_ps(gate + done), bf16_16_to_ps(up + done));
            const __m512 hi = silu_times_16(bf16_16_to_ps(gate + done + 16), bf16_16_to_ps(up + done + 16));
            _mm512_storeu_si512((void *)(act + t * I + done), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
#endif
        for (int64_t start = done; start < I; start += CHUNK) {
            const int64_t n = I - start < CHUNK ? I - start : CHUNK;
            float gate[CHUNK], up[CHUNK];
            bf16_to_f32_n(gate_up + t * 2 * I + start, gate, n);
            bf16_to_f32_n(gate_up + t * 2 * I + I + start, up, n);
            silu_times(gate, up, n, gate);
            f32_to_bf16_n(gate, act + t * I + start, n);
        }
    }
}

/* The residual add and the next RMSNorm of a prompt chunk's layer: h [T, d] float32 += y [T, d]
 * bfloat16, then out [T, d] bfloat16 = w · h / sqrt(mean(h²) + eps) (rms_norm.c's arithmetic), rounded
 * once: where PyTorch converts y to float32, adds, normalises and converts back in four passes. */
WIDE_VECTORS void prompt_add_rms_norm(float *h, const uint16_t *y, int64_t T, int64_t d, const float *w, float eps,
                                      uint16_t *out) {
#pragma omp parallel for schedule(static) if (T * d >= 32768)
    for (int64_t t = 0; t < T; t++) {
        float *row = h + t * d;
        float normed[CHUNK];
        for (int64_t start = 0; start < d; start += CHUNK) {
            const int64_t n = d - start < CHUNK ? d - start : CHUNK;
            bf16_to_f32_n(y + t * d + start, normed, n);
#pragma omp simd
            for (int64_t i = 0; i < n; i++) row[start + i] += normed[i];
        }
        float squares = 0.0f;
#pragma omp simd reduction(+:squares)
        for (int64_t i = 0; i < d; i++) squares += row[i] * row[i];
        const float inv = 1.0f / sqrtf(squares / (float)d + eps);
        for (int64_t start = 0; start < d; start += CHUNK) {
            const int64_t n = d - start < CHUNK ? d - start : CHUNK;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) normed[i] = w[start + i] * (row[start + i] * inv);
            f32_to_bf16_n(normed, out + t * d + start, n);
        }
    }
}
