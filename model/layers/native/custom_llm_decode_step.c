/* A whole decode step of the CustomLLM family's layers in one call: for every layer, RMSNorm → the
 * fused c_kv | c_q | k_rope product → the fused q_nope | q_rope product of c_q → rotate_half RoPE of
 * q_rope and k_rope → the [c_kv | k_rope] row written to the paged latent cache → queries absorbed
 * through W_uk → paged latent attention → outputs through W_uv → output product → residual →
 * RMSNorm → the DeepSeek MoE (shared experts, sigmoid routing with a bias, top-k renormalised,
 * each routed expert over the rows routed to it) → residual; float32 rows, the projections and
 * experts in the integer-dot formats of quant_matmul.c.
 *
 * The order of every sum the layer-by-layer path makes between kernels is kept: shared experts
 * summed in order (and averaged when more than one), routed experts' weighted outputs added in
 * expert order from zero, shared + routed, then the residual.
 *
 * Shapes: h [M, d] float32, updated in place (one decode token per sequence, in sequence order);
 * cos / sin [M, r] (rope_cos_sin's tables). A cache layer is rows [S, L + H·r]. Returns 0, or 1
 * when scratch memory could not be had. */
#include "decode_step.h"

typedef struct {
    const float *input_norm, *post_norm;    /* [d] each */
    DotWeight input_proj;          /* [2L + H·r, d]: c_kv | c_q | k_rope */
    DotWeight query_proj;          /* [H·nope + H·r, L]: q_nope | q_rope */
    const float *w_uk;             /* [H, nope, L] float32 */
    const float *w_uv;             /* [H, hd, L] float32 */
    DotWeight o;                   /* [d, H·hd] */
    const float *router;           /* [E, d] float32, row-major */
    const float *routing_bias;     /* [E] */
    const DotWeight *gate_up;      /* [S + E]: shared experts, then routed ones: [2I, d] each */
    const DotWeight *down;         /* [S + E]: [d, I] each */
    void *cache;                   /* [slots, L + H·r] */
} CustomLayer;

typedef struct {
    int64_t hidden, heads, head_dim, rope_dim, latent, expert_hidden, shared_experts, routed_experts, top_k;
    float eps, scale;
    int32_t cache_dtype;           /* paged_decode.c's F32 / BF16 / F16 */
    const int64_t *a_off, *b_off, *v_off;    /* [H]: paged_decode's MLA offsets */
} CustomShape;

/* rotate_half RoPE, in place, of `heads` heads of width r at x (row m's heads `row` floats after
 * row m - 1's), with cos / sin [M, r]: x·cos + [-x₂, x₁]·sin */
static void rope_heads(float *x, int64_t M, int64_t row, int64_t heads, int64_t r, const float *cos,
                       const float *sin) {
    int64_t half = r / 2;
    float v[r];
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < heads; j++) {
            float *head = x + m * row + j * r;
            const float *c = cos + m * r, *s = sin + m * r;
            memcpy(v, head, (size_t)r * sizeof(float));
            for (int64_t i = 0; i < half; i++) head[i] = v[i] * c[i] + (-v[i + half]) * s[i];
            for (int64_t i = half; i < r; i++) head[i] = v[i] * c[i] + v[i - half] * s[i];
        }
}

/* whether a per-head product over M rows of a float32 weight of `weights` values is split between
 * threads: when the weight is 128 KB or more (one thread alone streams it at about half the memory's
 * bandwidth; the 973M model's W_uk and W_uv are 288 and 576 KB a layer), or the work is 256k
 * multiply-adds or more */
static inline int worth_splitting(int64_t M, int64_t weights) {
    return weights >= 32768 || M * weights >= 262144;
}

/* out[m, h, j] = Σ_i x[m, h, i] · w[h, i, j] (w [H, I, J]), x rows x_stride / heads x_head floats
 * apart, out rows out_stride / heads out_head apart: the absorbed query (i = nope, j = latent) */
static void per_head_product(const float *x, int64_t x_stride, int64_t x_head, const float *w, int64_t M,
                             int64_t H, int64_t I, int64_t J, float *out, int64_t out_stride, int64_t out_head) {
#pragma omp parallel for collapse(2) schedule(static) if (worth_splitting(M, H * I * J))
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < H; h++) {
            const float *xh = x + m * x_stride + h * x_head, *wh = w + h * I * J;
            float *o = out + m * out_stride + h * out_head;
            memset(o, 0, (size_t)J * sizeof(float));
            for (int64_t i = 0; i < I; i++) {
                float xi = xh[i];
#pragma omp simd
                for (int64_t j = 0; j < J; j++) o[j] += xi * wh[i * J + j];
            }
        }
}

/* out[m, h, v] = Σ_l x[m, h, l] · w[h, v, l] (w [H, V, L]): the attention output through W_uv */
static void per_head_output(const float *x, const float *w, int64_t M, int64_t H, int64_t V, int64_t L, float *out) {
#pragma omp parallel for collapse(2) schedule(static) if (worth_splitting(M, H * V * L))
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < H; h++) {
            const float *xh = x + (m * H + h) * L;
            for (int64_t v = 0; v < V; v++) {
                const float *wr = w + (h * V + v) * L;
                float s = 0.0f;
#pragma omp simd reduction(+:s)
                for (int64_t l = 0; l < L; l++) s += xh[l] * wr[l];
                out[(m * H + h) * V + v] = s;
            }
        }
}

/* one SwiGLU expert over rows x [n, d] → y [n, d] (gu [n, 2I], act [n, I] scratch) */
static int expert(const DotWeight *gate_up, const DotWeight *down, const float *x, int64_t n, int64_t d, int64_t I,
                  float *gu, float *act, float *y) {
    int failed = product(gate_up, x, n, d, gu);
    swiglu(gu, n, I, act);
    return failed | product(down, act, n, I, y);
}

/* top-k of sigmoid(router · x + bias) per row, renormalised: experts [M, k] in descending score
 * (ties: the lower index first), weights [M, k] */
static void route(const float *x, int64_t M, int64_t d, const float *router, const float *bias, int64_t E, int64_t k,
                  int64_t *experts, float *weights) {
    for (int64_t m = 0; m < M; m++) {
        float score[E];
        int used[E];
        for (int64_t e = 0; e < E; e++) {
            const float *w = router + e * d, *xm = x + m * d;
            float s = 0.0f;
#pragma omp simd reduction(+:s)
            for (int64_t i = 0; i < d; i++) s += xm[i] * w[i];
            score[e] = 1.0f / (1.0f + expf(-(s + bias[e])));
            used[e] = 0;
        }
        float total = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (!used[e] && (best < 0 || score[e] > score[best])) best = e;
            used[best] = 1;
            experts[m * k + j] = best;
            weights[m * k + j] = score[best];
            total += score[best];
        }
        for (int64_t j = 0; j < k; j++) weights[m * k + j] /= total;
    }
}

int custom_llm_decode_layers(float *h, int64_t M, const CustomShape *shape, const CustomLayer *layers,
                             int64_t num_layers, const float *cos, const float *sin, const int64_t *slots,
                             const int64_t *tables, int64_t max_blocks, const int64_t *lens, int64_t block_size,
                             int64_t window) {
    const int64_t d = shape->hidden, H = shape->heads, hd = shape->head_dim, r = shape->rope_dim;
    const int64_t L = shape->latent, nope = hd - r, I = shape->expert_hidden, S = shape->shared_experts;
    const int64_t E = shape->routed_experts, k = shape->top_k;
    const int64_t in_width = 2 * L + H * r, query_width = H * nope + H * r, row = L + H * r;
    size_t floats = (size_t)M * (size_t)(d + in_width + query_width + row + H * (L + r) + H * L + H * hd + d +
                                         2 * I + I + 4 * d + k);
    float *scratch = malloc(floats * sizeof(float));
    int64_t *experts = malloc((size_t)(M * k + M) * sizeof(int64_t));
    if (!scratch || !experts) {
        free(scratch);
        free(experts);
        return 1;
    }
    float *normed = scratch, *proj_in = normed + M * d, *proj_q = proj_in + M * in_width;
    float *cache_rows = proj_q + M * query_width, *q = cache_rows + M * row, *att = q + M * H * (L + r);
    float *out = att + M * H * L, *proj = out + M * H * hd, *gu = proj + M * d, *act = gu + M * 2 * I;
    float *y = act + M * I, *moe = y + M * d, *routed = moe + M * d, *xe = routed + M * d;
    float *weights = xe + M * d;
    int64_t *rows_of_expert = experts + M * k;
    int failed = 0;
    for (int64_t l = 0; l < num_layers && !failed; l++) {
        const CustomLayer *layer = &layers[l];
        /* attention */
        rms_norm(h, M, d, d, layer->input_norm, shape->eps, normed);
        failed |= product(&layer->input_proj, normed, M, d, proj_in);            /* [M, c_kv | c_q | k_rope] */
        failed |= product_strided(&layer->query_proj, proj_in + L, M, L, in_width, proj_q);  /* [M, q_nope | q_rope] */
        rope_heads(proj_q + H * nope, M, query_width, H, r, cos, sin);
        rope_heads(proj_in + 2 * L, M, in_width, H, r, cos, sin);
        for (int64_t m = 0; m < M; m++) {                                         /* [c_kv | k_rope] rows */
            memcpy(cache_rows + m * row, proj_in + m * in_width, (size_t)L * sizeof(float));
            memcpy(cache_rows + m * row + L, proj_in + m * in_width + 2 * L, (size_t)(H * r) * sizeof(float));
        }
        write_rows(layer->cache, shape->cache_dtype, row, cache_rows, row, M, slots);
        per_head_product(proj_q, query_width, nope, layer->w_uk, M, H, nope, L, q, H * (L + r), L + r);
        for (int64_t m = 0; m < M; m++)                                           /* q = [q_latent | q_rope] */
            for (int64_t hh = 0; hh < H; hh++)
                memcpy(q + (m * H + hh) * (L + r) + L, proj_q + m * query_width + H * nope + hh * r,
                       (size_t)r * sizeof(float));
        failed |= paged_decode(q, H * (L + r), L + r, layer->cache, shape->cache_dtype, row, tables, max_blocks,
                               lens, block_size, M, H, shape->a_off, L, shape->b_off, r, shape->v_off, L, shape->scale,
                               window, att) != 0;                                 /* [M, H, L] */
        per_head_output(att, layer->w_uv, M, H, hd, L, out);                      /* [M, H·hd] */
        failed |= product(&layer->o, out, M, H * hd, proj);
        add_rows(h, proj, M * d);
        /* mixture of experts */
        rms_norm(h, M, d, d, layer->post_norm, shape->eps, normed);
        for (int64_t s = 0; s < S; s++) {
            failed |= expert(&layer->gate_up[s], &layer->down[s], normed, M, d, I, gu, act, s ? y : moe);
            if (s) add_rows(moe, y, M * d);
        }
        if (S > 1)
            for (int64_t i = 0; i < M * d; i++) moe[i] /= (float)S;
        route(normed, M, d, layer->router, layer->routing_bias, E, k, experts, weights);
        memset(routed, 0, (size_t)(M * d) * sizeof(float));
        for (int64_t e = 0; e < E; e++) {
            int64_t n = 0;
            for (int64_t m = 0; m < M; m++)
                for (int64_t j = 0; j < k; j++)
                    if (experts[m * k + j] == e) {
                        rows_of_expert[n] = m * k + j;                            /* (row, slot) */
                        memcpy(xe + n * d, normed + m * d, (size_t)d * sizeof(float));
                        n++;
                    }
            if (!n) continue;
            failed |= expert(&layer->gate_up[S + e], &layer->down[S + e], xe, n, d, I, gu, act, y);
            for (int64_t t = 0; t < n; t++) {
                int64_t m = rows_of_expert[t] / k;
                float w = weights[rows_of_expert[t]];
                float *dst = routed + m * d;
                const float *src = y + t * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) dst[i] += src[i] * w;
            }
        }
        add_rows(moe, routed, M * d);
        add_rows(h, moe, M * d);
    }
    free(scratch);
    free(experts);
    return failed ? 1 : 0;
}
