/* Causal attention of prompts from position 0, each over its own keys, bfloat16 in and out, on Intel's
 * tile unit (AMX-BF16): per (prompt, query head, block of 16 queries), the scores of blocks of 32 keys in
 * tiles, the softmax weights in AVX-512, their products with V summed in tiles that hold the block's output.
 *
 * q [T, H, hd] bfloat16 (pre-scaled or times `scale`), kv [T, 2·KV·hd] bfloat16 = [K of every kv head |
 * V of every kv head], prompt s being rows starts[s] .. starts[s + 1] - 1; query head h reads kv head
 * h / (H / KV). out [T, H, hd] bfloat16. hd 32 or 64
 * (the output's hd / 16 tiles, the block's queries in hd / 32, one tile for scores or weights and one for
 * K or V fill the eight). Scores and sums in float32 (the
 * tile unit's bfloat16 products accumulate in float32), weights exp(s - shift) rounded to bfloat16 for
 * the product with V, the output divided by the float32 sum of the unrounded weights. The shift is the
 * maximum of each query's first 32 scores (one pass: a softmax is the same whatever its scores are
 * shifted by); where a later score exceeds it by so much that a query's weights sum past 2^64, the
 * block is redone with the true maximum, found in a first pass.
 *
 * Before the loop the keys and values are laid out once per call as the tile unit's B operands (pairs
 * of bfloat16 along the summed dimension): K^T per 16 keys × 32 dims, V per 32 keys × 16 dims. The
 * queries are read in place (a block's 16 rows H·hd apart). Returns 0; 1 when this CPU or compiler has no
 * AMX-BF16, or memory could not be had (nothing written). */
#include "decode_step.h"

int prompt_attention_has_amx_bf16(void);

#ifdef HAVE_AMX_COMPILER
#define AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")))

#define Q_ROWS 16              /* queries per block */
#define KEYS 32                /* keys per block: two 16-key score tiles, one 32-key product with V */
#define MAX_HD 64              /* the output's hd / 16 tiles stay in tile registers */
/* tile registers (literal numbers, as quant_matmul.c's) */
#define T_SCORES 0             /* 16 queries × 16 keys of scores, float32, or × 32 keys of weights, bfloat16 */
#define T_WEIGHTS 0
#define T_QUERY0 1             /* 16 queries × dims 0..31, bfloat16; T_QUERY1: dims 32..63 */
#define T_QUERY1 2
#define T_OPERAND 3            /* K^T (16 dim pairs × 16 keys × 2) or V (16 key pairs × 16 dims × 2) */
#define T_OUT0 4               /* output dims 0..15 of the 16 queries, float32; T_OUT1..3: dims 16..63 */
#define T_OUT1 5
#define T_OUT2 6
#define T_OUT3 7

/* keys 32·kb .. 32·kb + 31 and their values, of kv head g, as B operands: K^T tiles
 * [T32 / 16][hd / 32][16][32], V tiles [T32 / 32][hd / 16][16][32] of the head (T32: T rounded up to 32,
 * the keys past T zero) */
static void lay_out_key_block(const uint16_t *kv, int64_t T, int64_t KV, int64_t hd, int64_t g, int64_t kb,
                              uint16_t *keys, uint16_t *values) {
    const int64_t row = 2 * KV * hd, chunks = hd / 32, blocks = hd / 16;
    for (int64_t block = 2 * kb; block < 2 * kb + 2; block++)
        for (int64_t c = 0; c < chunks; c++) {
            uint32_t *tile = (uint32_t *)(keys + (block * chunks + c) * 512);      /* [16 dim pairs][16 keys] */
            for (int64_t n = 0; n < 16; n++) {
                int64_t key = block * 16 + n;
                const uint16_t *k = kv + key * row + g * hd + c * 32;
                for (int64_t p = 0; p < 16; p++) {
                    uint32_t pair = 0;
                    if (key < T) memcpy(&pair, k + 2 * p, sizeof pair);
                    tile[p * 16 + n] = pair;
                }
            }
        }
    for (int64_t b = 0; b < blocks; b++) {
        uint16_t *tile = values + (kb * blocks + b) * 512;                         /* [16 key pairs][16 dims][2] */
        for (int64_t p = 0; p < 16; p++)
            for (int64_t e = 0; e < 2; e++) {
                int64_t key = kb * 32 + 2 * p + e;
                const uint16_t *v = kv + key * row + KV * hd + g * hd + b * 16;
                for (int64_t n = 0; n < 16; n++) tile[p * 32 + 2 * n + e] = key < T ? v[n] : 0;
            }
    }
}

/* scores of the block's 16 queries × keys 32·kb .. 32·kb + 31 → scores [16][32] float32 */
AMX_BF16 static inline void block_scores(const uint16_t *keys, int64_t hd, int64_t kb, float *scores) {
    const int64_t chunks = hd / 32;
    for (int half = 0; half < 2; half++) {
        const uint16_t *k = keys + (2 * kb + half) * chunks * 512;
        _tile_zero(T_SCORES);
        _tile_loadd(T_OPERAND, k, 64);
        _tile_dpbf16ps(T_SCORES, T_QUERY0, T_OPERAND);
        if (chunks > 1) {
            _tile_loadd(T_OPERAND, k + 512, 64);
            _tile_dpbf16ps(T_SCORES, T_QUERY1, T_OPERAND);
        }
        _tile_stored(T_SCORES, scores + half * 16, KEYS * 4);
    }
}

/* the block's 16 query rows (`stride` bytes apart; hd / 32 tiles) into T_QUERY0, T_QUERY1 */
AMX_BF16 static inline void load_queries(const uint16_t *queries, int64_t stride, int64_t hd) {
    _tile_loadd(T_QUERY0, queries, stride);
    if (hd > 32) _tile_loadd(T_QUERY1, queries + 32, stride);
}

/* scores of keys a query may not see (past its position) → -1e30 (a weight of 0); `visible`: keys of the
 * block it sees */
AMX_BF16 static inline void mask_row(__m512 *lo, __m512 *hi, int64_t visible) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 masked = _mm512_set1_ps(-1e30f);                 /* finite: exp2_16_rounded_next gives 0 */
    int32_t v = visible < 0 ? 0 : visible > KEYS ? KEYS : (int32_t)visible;
    *lo = _mm512_mask_mov_ps(masked, _mm512_cmplt_epi32_mask(lanes, _mm512_set1_epi32(v)), *lo);
    *hi = _mm512_mask_mov_ps(masked, _mm512_cmplt_epi32_mask(lanes, _mm512_set1_epi32(v - 16)), *hi);
}

/* the weights [16 queries][32 keys] in T_WEIGHTS times V tiles v (one per 16 dims) into the output tiles */
#define VALUE_PRODUCT(V, BLOCKS, B, TILE)                                                         \
    if (BLOCKS > B) {                                                                             \
        _tile_loadd(T_OPERAND, V + B * 512, 64);                                                  \
        _tile_dpbf16ps(TILE, T_WEIGHTS, T_OPERAND);                                               \
    }
#define VALUE_PRODUCTS(V, BLOCKS)                                                                 \
    VALUE_PRODUCT(V, BLOCKS, 0, T_OUT0)                                                           \
    VALUE_PRODUCT(V, BLOCKS, 1, T_OUT1)                                                           \
    VALUE_PRODUCT(V, BLOCKS, 2, T_OUT2)                                                           \
    VALUE_PRODUCT(V, BLOCKS, 3, T_OUT3)

/* the output tiles, divided by each query's sum of weights, → out rows (the block's queries before T) */
AMX_BF16 static void finish_block(float *acc, const __m512 *row_sum, int64_t T, int64_t H, int64_t hd, int64_t q0,
                                  uint16_t *out, int64_t h) {
    const int64_t blocks = hd / 16;
    _tile_stored(T_OUT0, acc, hd * 4);
    if (blocks > 1) _tile_stored(T_OUT1, acc + 16, hd * 4);
    if (blocks > 2) _tile_stored(T_OUT2, acc + 32, hd * 4);
    if (blocks > 3) _tile_stored(T_OUT3, acc + 48, hd * 4);
    for (int64_t r = 0; r < Q_ROWS && q0 + r < T; r++) {
        const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(row_sum[r]));
        uint16_t *o = out + ((q0 + r) * H + h) * hd;
        for (int64_t i = 0; i < hd; i += 32) {
            const __m512 lo = _mm512_mul_ps(_mm512_load_ps(acc + r * hd + i), inverse);
            const __m512 hi = _mm512_mul_ps(_mm512_load_ps(acc + r * hd + i + 16), inverse);
            _mm512_storeu_si512((void *)(o + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

/* The block of 16 queries from q0 (in T_QUERY0/1): its weights exp(scale·s - bias[r]) (2^·: bias in
 * log2 units) over keys 0 .. last and their products with V summed in the output tiles, each query's
 * weights summed into row_sum. Scores are computed two blocks deep: the tile unit computes block
 * kb + 1's while the vector unit reads block kb's. */
AMX_BF16 static inline __attribute__((always_inline)) void weighted_values(
        const uint16_t *keys, const uint16_t *values, int64_t hd, int64_t q0,
        int64_t key_blocks, const float *bias, float to_exp2, __m512 *row_sum) {
    _Alignas(64) float scores[2][Q_ROWS * KEYS];
    _Alignas(64) uint16_t weights[Q_ROWS * KEYS];
    const int64_t blocks = hd / 16;
    for (int r = 0; r < Q_ROWS; r++) row_sum[r] = _mm512_setzero_ps();
    _tile_zero(T_OUT0);
    _tile_zero(T_OUT1);
    _tile_zero(T_OUT2);
    _tile_zero(T_OUT3);
    block_scores(keys, hd, 0, scores[0]);
    for (int64_t kb = 0; kb < key_blocks; kb++) {
        if (kb + 1 < key_blocks) block_scores(keys, hd, kb + 1, scores[(kb + 1) & 1]);
        const float *block = scores[kb & 1];
        const int diagonal = kb * KEYS + KEYS - 1 > q0;          /* some key lies past some query */
        for (int r = 0; r < Q_ROWS; r++) {
            __m512 lo = _mm512_load_ps(block + r * KEYS), hi = _mm512_load_ps(block + r * KEYS + 16);
            if (diagonal) mask_row(&lo, &hi, q0 + r - kb * KEYS + 1);
            const __m512 factor = _mm512_set1_ps(to_exp2), shift = _mm512_set1_ps(bias[r]);
            lo = _mm512_fmsub_ps(lo, factor, shift);
            hi = _mm512_fmsub_ps(hi, factor, shift);
            lo = exp2_16_rounded_next(lo);
            hi = exp2_16_rounded_next(hi);
            row_sum[r] = _mm512_add_ps(row_sum[r], _mm512_add_ps(lo, hi));
            _mm512_store_si512((void *)(weights + r * KEYS), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        _tile_loadd(T_WEIGHTS, weights, KEYS * 2);
        const uint16_t *v = values + kb * blocks * 512;
        VALUE_PRODUCTS(v, blocks)
    }
}

/* keys 0 .. last of the block of 16 queries from q0 (the last one's, or T - 1) */
static int64_t key_blocks_of(int64_t q0, int64_t T) {
    const int64_t last = q0 + Q_ROWS - 1 < T - 1 ? q0 + Q_ROWS - 1 : T - 1;
    return (last + KEYS) / KEYS;
}

/* one (query head h, block of 16 queries from q0: rows `stride` bytes apart), in two passes over its keys:
 * each query's maximum score, then the weights shifted by it (none above 1) */
AMX_BF16 static void two_pass_block(const uint16_t *queries, int64_t stride, const uint16_t *keys,
                                    const uint16_t *values, int64_t T, int64_t H, int64_t hd, int64_t q0, float scale,
                                    uint16_t *out, int64_t h) {
    _Alignas(64) float scores[Q_ROWS * KEYS], acc[Q_ROWS * MAX_HD];
    __m512 row_max[Q_ROWS], row_sum[Q_ROWS];
    float bias[Q_ROWS];
    const int64_t key_blocks = key_blocks_of(q0, T);
    const float to_exp2 = scale * 1.4426950408889634f;
    for (int r = 0; r < Q_ROWS; r++) row_max[r] = _mm512_set1_ps(-INFINITY);
    load_queries(queries, stride, hd);
    for (int64_t kb = 0; kb < key_blocks; kb++) {
        block_scores(keys, hd, kb, scores);
        const int diagonal = kb * KEYS + KEYS - 1 > q0;
        for (int r = 0; r < Q_ROWS; r++) {
            __m512 lo = _mm512_load_ps(scores + r * KEYS), hi = _mm512_load_ps(scores + r * KEYS + 16);
            if (diagonal) mask_row(&lo, &hi, q0 + r - kb * KEYS + 1);
            row_max[r] = _mm512_max_ps(row_max[r], _mm512_max_ps(lo, hi));
        }
    }
    for (int r = 0; r < Q_ROWS; r++) bias[r] = _mm512_reduce_max_ps(row_max[r]) * to_exp2;
    weighted_values(keys, values, hd, q0, key_blocks, bias, to_exp2, row_sum);
    finish_block(acc, row_sum, T, H, hd, q0, out, h);
}

/* the same in one pass: softmax is the same whatever a row's scores are shifted by, and the shift only
 * keeps e^x in float32's range; the maximum of the first block of keys (which holds the first key, often
 * the largest) serves for all. Weights whose sum stays within 2^64 (each one within it too) keep the
 * output's sums finite in float32 and bfloat16: where a query's sum exceeds it (or is inf or NaN: a weight
 * past float32's range), returns 1 (nothing written) and the block is redone in two passes. */
AMX_BF16 static int one_pass_block(const uint16_t *queries, int64_t stride, const uint16_t *keys,
                                   const uint16_t *values, int64_t T, int64_t H, int64_t hd, int64_t q0, float scale,
                                   uint16_t *out, int64_t h) {
    _Alignas(64) float scores[Q_ROWS * KEYS], acc[Q_ROWS * MAX_HD];
    __m512 row_sum[Q_ROWS];
    float bias[Q_ROWS];
    const float to_exp2 = scale * 1.4426950408889634f;
    load_queries(queries, stride, hd);
    block_scores(keys, hd, 0, scores);
    for (int r = 0; r < Q_ROWS; r++) {
        __m512 lo = _mm512_load_ps(scores + r * KEYS), hi = _mm512_load_ps(scores + r * KEYS + 16);
        if (KEYS - 1 > q0) mask_row(&lo, &hi, q0 + r + 1);
        bias[r] = _mm512_reduce_max_ps(_mm512_max_ps(lo, hi)) * to_exp2;
    }
    weighted_values(keys, values, hd, q0, key_blocks_of(q0, T), bias, to_exp2, row_sum);
    for (int r = 0; r < Q_ROWS; r++)
        if (!(_mm512_reduce_add_ps(row_sum[r]) <= 0x1p64f)) return 1;
    finish_block(acc, row_sum, T, H, hd, q0, out, h);
    return 0;
}

/* query head h's block of 16 queries from q0, read in place from q [T, H, hd] (the last block, past T,
 * from a zero-padded copy) */
AMX_BF16 static void query_block(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t T,
                                 int64_t H, int64_t hd, int64_t q0, float scale, uint16_t *out, int64_t h) {
    _Alignas(64) uint16_t padded[Q_ROWS * MAX_HD];
    const uint16_t *queries = q + (q0 * H + h) * hd;
    int64_t stride = H * hd * (int64_t)sizeof(uint16_t);
    if (q0 + Q_ROWS > T) {
        memset(padded, 0, sizeof padded);
        for (int64_t r = 0; q0 + r < T; r++) memcpy(padded + r * hd, queries + r * H * hd, (size_t)hd * sizeof(uint16_t));
        queries = padded;
        stride = hd * (int64_t)sizeof(uint16_t);
    }
    if (one_pass_block(queries, stride, keys, values, T, H, hd, q0, scale, out, h))
        two_pass_block(queries, stride, keys, values, T, H, hd, q0, scale, out, h);
}

/* The prompts of one call: prompt s is rows starts[s] .. starts[s + 1] - 1 of q, kv and out, its keys
 * and values laid out from key_offset[s] (KV · T32 · hd each, T32 its length rounded up to 32). */
typedef struct {
    const uint16_t *q, *kv;
    uint16_t *out, *keys, *values;
    const int64_t *starts;
    int64_t prompts, H, KV, hd;
    int64_t *key_offset;         /* [prompts + 1] */
    int64_t *layout_first;       /* [prompts + 1]: the first of each prompt's KV · T32 / 32 layout tasks */
    int64_t *blocks;             /* [query blocks of all prompts]: prompt · 2^32 + block, longest first */
} Prompts;

static int64_t length_of(const Prompts *p, int64_t s) { return p->starts[s + 1] - p->starts[s]; }

static int64_t rounded_32(int64_t n) { return (n + 31) / 32 * 32; }

/* the prompt whose range of `first` (nondecreasing, first[0] = 0) holds i */
static int64_t prompt_of(const int64_t *first, int64_t prompts, int64_t i) {
    int64_t lo = 0, hi = prompts - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* this thread's share of the (query head, block of 16 queries) tasks, inside the parallel region */
AMX_BF16 static void attend(const Prompts *p, float scale) {
    const int64_t H = p->H, hd = p->hd, group = p->H / p->KV, row = H * hd;
    int64_t count = 0;
    for (int64_t s = 0; s < p->prompts; s++) count += (length_of(p, s) + 15) / 16;
    load_full_tiles();                  /* every tile 16 rows × 64 bytes (quant_matmul.c) */
    /* the longest blocks (the last queries) first, so that the short ones even out the threads */
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < H * count; task++) {
        const int64_t block = p->blocks[task / H], s = block >> 32, qb = block & 0xffffffff, h = task % H;
        const int64_t T = length_of(p, s), T32 = rounded_32(T), own = p->key_offset[s] + (h / group) * T32 * hd;
        query_block(p->q + p->starts[s] * row, p->keys + own, p->values + own, T, H, hd, qb * 16, scale,
                    p->out + p->starts[s] * row, h);
    }
    _tile_release();
}

int prompt_attention_has_amx_bf16(void) {
    /* quant_matmul's AMX path asked Linux for the tile state; AMX-BF16 is CPUID leaf 7 EDX bit 22, read
     * once (CPUID traps to the hypervisor in a virtual machine: tens of µs) */
    static int amx_bf16 = -1;
    if (amx_bf16 < 0) {
        unsigned eax, ebx, ecx, edx;
        amx_bf16 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1);
    }
    return quant_matmul_has_amx() && amx_bf16;
}

int prompt_causal_attention(const uint16_t *q, const uint16_t *kv, const int64_t *starts, int64_t prompts, int64_t H,
                            int64_t KV, int64_t hd, float scale, uint16_t *out) {
    if (!prompt_attention_has_amx_bf16() || hd % 32 || hd > MAX_HD || H % KV || prompts < 1) return 1;
    Prompts p = {q, kv, out, NULL, NULL, starts, prompts, H, KV, hd, NULL, NULL, NULL};
    int64_t most_blocks = 0, count = 0;
    p.key_offset = malloc((size_t)(prompts + 1) * sizeof(int64_t));
    p.layout_first = malloc((size_t)(prompts + 1) * sizeof(int64_t));
    if (p.key_offset && p.layout_first) {
        p.key_offset[0] = p.layout_first[0] = 0;
        for (int64_t s = 0; s < prompts; s++) {
            const int64_t T32 = rounded_32(length_of(&p, s)), blocks = (length_of(&p, s) + 15) / 16;
            p.key_offset[s + 1] = p.key_offset[s] + KV * T32 * hd;
            p.layout_first[s + 1] = p.layout_first[s] + KV * (T32 / 32);
            most_blocks = blocks > most_blocks ? blocks : most_blocks;
            count += blocks;
        }
        p.keys = malloc((size_t)p.key_offset[prompts] * sizeof(uint16_t));
        p.values = malloc((size_t)p.key_offset[prompts] * sizeof(uint16_t));
        p.blocks = malloc((size_t)(count ? count : 1) * sizeof(int64_t));
    }
    const int ready = p.key_offset && p.layout_first && p.keys && p.values && p.blocks;
    if (ready) {
        int64_t n = 0;
        for (int64_t qb = most_blocks - 1; qb >= 0; qb--)
            for (int64_t s = 0; s < prompts; s++)
                if (qb < (length_of(&p, s) + 15) / 16) p.blocks[n++] = s << 32 | qb;
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < p.layout_first[prompts]; i++) {
                const int64_t s = prompt_of(p.layout_first, prompts, i), T = length_of(&p, s), T32 = rounded_32(T);
                const int64_t g = (i - p.layout_first[s]) / (T32 / 32), kb = (i - p.layout_first[s]) % (T32 / 32);
                const int64_t own = p.key_offset[s] + g * T32 * hd;
                lay_out_key_block(kv + starts[s] * 2 * KV * hd, T, KV, hd, g, kb, p.keys + own, p.values + own);
            }
            attend(&p, scale);
        }
    }
    free(p.key_offset);
    free(p.layout_first);
    free(p.keys);
    free(p.values);
    free(p.blocks);
    return !ready;
}
#else
int prompt_attention_has_amx_bf16(void) { return 0; }

int prompt_causal_attention(const uint16_t *q, const uint16_t *kv, const int64_t *starts, int64_t prompts, int64_t H,
                            int64_t KV, int64_t hd, float scale, uint16_t *out) {
    (void)q, (void)kv, (void)starts, (void)prompts, (void)H, (void)KV, (void)hd, (void)scale, (void)out;
    return 1;
}
#endif
