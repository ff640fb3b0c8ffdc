/* A whole decode step of the Llama family's layers in one call: for every layer, RMSNorm → fused
 * q|k|v product → rotate_half RoPE → [K | V] rows written to the paged cache → paged attention →
 * output product → residual → RMSNorm → fused gate|up product → SwiGLU → down product → residual,
 * over float32 rows, with the weights in the integer-dot formats of quant_matmul.c.
 *
 * The same kernels as the layer-by-layer path (the products of quant_matmul.c, the attention of
 * paged_decode.c, the norm of rms_norm.c, compiled into this library), without the ~60 PyTorch ops
 * and the Python between them that a layer costs otherwise: at one row those cost more than the
 * products themselves.
 *
 * Shapes: h [M, d] float32, updated in place (M rows, one decode token per sequence, in sequence
 * order). cos / sin [M, H + KV, hd]: the step's rotation tables, query rows pre-multiplied by the
 * attention scale, sin carrying rotate_half's sign (model/families/llama.py's `Rope`), so
 * rope(x) = x·cos + swap_halves(x)·sin and scores need no scale. A cache layer is rows
 * [S, 2·KV·hd] = [K of every kv head | V of every kv head] in float32, bfloat16 or float16.
 * Returns 0, or 1 when scratch memory could not be had (h is then partly updated). */
#include "decode_step.h"

typedef struct {
    const float *input_norm;       /* [d] */
    const float *post_norm;        /* [d] */
    DotWeight qkv;                 /* [(H + 2KV)·hd, d] */
    DotWeight o;                   /* [d, H·hd] */
    DotWeight gate_up;             /* [2I, d] */
    DotWeight down;                /* [d, I] */
    void *cache;                   /* [S, 2·KV·hd] */
} LlamaLayer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
    int32_t cache_dtype;           /* paged_decode.c's F32 / BF16 / F16 */
    const int64_t *a_off, *b_off, *v_off;    /* [H]: paged_decode's key / value offsets per head */
} LlamaShape;

/* rotate_half RoPE of the H + KV heads at the front of each q|k|v row, in place */
static void rotate(float *qkv, int64_t M, int64_t row, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    int64_t half = hd / 2;
    float x[hd];
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < heads; j++) {
            float *head = qkv + m * row + j * hd;
            const float *c = cos + (m * heads + j) * hd, *s = sin + (m * heads + j) * hd;
            memcpy(x, head, (size_t)hd * sizeof(float));
#pragma omp simd
            for (int64_t i = 0; i < half; i++) head[i] = x[i] * c[i] + x[i + half] * s[i];
#pragma omp simd
            for (int64_t i = half; i < hd; i++) head[i] = x[i] * c[i] + x[i - half] * s[i];
        }
}

int llama_decode_layers(float *h, int64_t M, const LlamaShape *shape, const LlamaLayer *layers,
                        int64_t num_layers, const float *cos, const float *sin, const int64_t *slots,
                        const int64_t *tables, int64_t max_blocks, const int64_t *lens, int64_t block_size,
                        int64_t window) {
    const int64_t d = shape->hidden, H = shape->heads, KV = shape->kv_heads, hd = shape->head_dim;
    const int64_t I = shape->intermediate, qkv_width = (H + 2 * KV) * hd;
    size_t floats = (size_t)M * (size_t)(d + qkv_width + H * hd + d + 2 * I + I);
    float *scratch = malloc(floats * sizeof(float));
    if (!scratch) return 1;
    float *normed = scratch, *qkv = normed + M * d, *attn = qkv + M * qkv_width, *proj = attn + M * H * hd;
    float *gate_up = proj + M * d, *act = gate_up + M * 2 * I;
    int failed = 0;
    for (int64_t l = 0; l < num_layers && !failed; l++) {
        const LlamaLayer *layer = &layers[l];
        rms_norm(h, M, d, d, layer->input_norm, shape->eps, normed);
        failed |= product(&layer->qkv, normed, M, d, qkv);                          /* [M, (H+2KV)·hd] */
        rotate(qkv, M, qkv_width, H + KV, hd, cos, sin);
        write_rows(layer->cache, shape->cache_dtype, 2 * KV * hd, qkv + H * hd, qkv_width, M, slots);
        failed |= paged_decode(qkv, qkv_width, hd, layer->cache, shape->cache_dtype, 2 * KV * hd, tables,
                               max_blocks, lens, block_size, M, H, shape->a_off, hd, shape->b_off, 0,
                               shape->v_off, hd, 1.0f, window, attn) != 0;          /* [M, H, hd] */
        failed |= product(&layer->o, attn, M, H * hd, proj);                         /* [M, d] */
        add_rows(h, proj, M * d);
        rms_norm(h, M, d, d, layer->post_norm, shape->eps, normed);
        failed |= product(&layer->gate_up, normed, M, d, gate_up);                   /* [M, 2I] */
        swiglu(gate_up, M, I, act);                                                  /* [M, I] */
        failed |= product(&layer->down, act, M, I, proj);                            /* [M, d] */
        add_rows(h, proj, M * d);
    }
    free(scratch);
    return failed ? 1 : 0;
}
