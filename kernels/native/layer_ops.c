/* The small per-layer ops of a transformer step on the CPU, each one call instead of a chain
 * of torch ops: RMSNorm with its fused residual add, and (q/k RMSNorm,) rotary embedding and
 * the K/V store into the paged cache. At decode sizes a torch op costs 3-30 us of dispatch
 * and allocation whatever its size, and a layer ran ~15 of them around its projections.
 *
 * Same arithmetic as the references in kernels/reference.py, float32 inside, rounded to the
 * tensor's dtype where the reference rounds:
 * - rotary: x * [cos | cos] + [x2 | x1] * [-sin | sin], two products then one sum, as the
 *   reference does it (fp-contract off below, so no fused multiply-add): bit-identical.
 * - RMSNorm: the sum of squares in 16 lanes summed pairwise, so the mean may differ from
 *   torch's in the last bit; each row alone, so a row's result never depends on its batch.
 * - K/V store: each value rounded to the cache's dtype as kernels/kv_cache.py's to_cache_dtype does
 *   (bfloat16 to nearest even; fp8 clamped to its largest finite value, then to nearest even
 *   from float32: f32_to_fp8), so the same bytes.
 *
 * Small calls run on the calling thread; from PARALLEL_ELEMS elements on, on torch's OpenMP
 * team (see decode_attention.c).
 */
#pragma GCC optimize("fp-contract=off")
#include "common.h"
#include "entry_points.h"

#define PARALLEL_ELEMS (1 << 16)

/* 1 / sqrt(mean(v^2) + eps) of n floats: 16 lanes, summed pairwise. */
static inline float inv_rms(const float *restrict v, int64_t n, float eps) {
    v16f acc = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        v16f x;
        memcpy(&x, v + j, sizeof x);
        acc += x * x;
    }
    float tail = 0.0f;
    for (; j < n; j++) tail += v[j] * v[j];
    return 1.0f / sqrtf((hsum16(acc) + tail) / (float)n + eps);
}

/* out[i] = norm(v)[i] * w[i], rounded as the reference: float32 (v * r) * w; bf16
 * bf16(bf16(v * r) * w), transformers' order. */
static inline void normed(const float *v, int64_t n, float r, const void *w, int dtype,
                          float *out) {  /* in place allowed: out may be v */
    for (int64_t i = 0; i < n; i++)
        out[i] = round_to(round_to(v[i] * r, dtype) * load_elem(w, dtype, i), dtype);
}

/* RMSNorm of `rows` rows of H elements (row r at x + r * x_stride elements), weight [H] of
 * the same dtype. With a residual (row stride r_stride), x + residual, rounded to the dtype,
 * is written to res_out and normalized. out and res_out are packed [rows, H].
 * Returns 0, or -1 when scratch memory could not be had. */
/* One row of rms_norm: v (H floats of scratch) gets x (+ residual, rounded to the dtype, also
 * written to res_out), out gets the normed row. quant_matmul.c's fused norm + projection calls
 * it, so the projection's input is the same as after rms_norm. */
static inline __attribute__((always_inline)) void rms_norm_row_t(
    const void *xr, const void *rr, const int dtype, int64_t H, const void *weight, float eps,
    float *restrict v, void *o, void *ro)
{
    if (rr != NULL) {
        for (int64_t i = 0; i < H; i++) {
            v[i] = round_to(load_elem(xr, dtype, i) + load_elem(rr, dtype, i), dtype);
            store_elem(ro, dtype, i, v[i]);
        }
    } else {
        for (int64_t i = 0; i < H; i++) v[i] = load_elem(xr, dtype, i);
    }
    const float inv = inv_rms(v, H, eps);
    for (int64_t i = 0; i < H; i++)
        store_elem(o, dtype, i, round_to(v[i] * inv, dtype) * load_elem(weight, dtype, i));
}

/* The dtype a constant in the loops, so they vectorize (the same arithmetic, the same bits). */
void rms_norm_row(const void *xr, const void *rr, int dtype, int64_t H, const void *weight,
                  float eps, float *v, void *o, void *ro)
{
    if (dtype == BF16) rms_norm_row_t(xr, rr, BF16, H, weight, eps, v, o, ro);
    else rms_norm_row_t(xr, rr, F32, H, weight, eps, v, o, ro);
}

int64_t rms_norm(const void *x, int dtype, int64_t rows, int64_t H, int64_t x_stride,
                 const void *residual, int64_t r_stride, const void *weight, float eps,
                 void *out, void *res_out, int num_threads)
{
    const size_t esize = dtype == BF16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel for num_threads(num_threads) if (rows * H >= PARALLEL_ELEMS) \
    schedule(static) reduction(| : failed)
    for (int64_t r = 0; r < rows; r++) {
        float *v = scratch((size_t)H);
        if (v == NULL) { failed = 1; continue; }
        rms_norm_row((const char *)x + (size_t)(r * x_stride) * esize,
                     residual != NULL ? (const char *)residual + (size_t)(r * r_stride) * esize : NULL,
                     dtype, H, weight, eps, v, (char *)out + (size_t)(r * H) * esize,
                     residual != NULL ? (char *)res_out + (size_t)(r * H) * esize : NULL);
    }
    return failed ? -1 : 0;
}

/* Shapes and strides of one rotary_store_kv call. */
struct rope_call {
    const void *q, *k, *v; int dtype;
    int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;
    int64_t NH, NKV, D, rot;
    const int64_t *positions; const float *table; int64_t table_stride;
    const void *q_norm, *k_norm; float eps;
    void *q_out;
    void *k_cache, *v_cache; int kv_dtype;
    int64_t stride_block, stride_token, stride_head, block_size;
    const int64_t *slots;
};

/* One head row: optional RMSNorm, then the rotary embedding of its first `rot` dims, in
 * float32, each value rounded to the model's dtype (the reference's tensors). */
static inline void rope_row(const struct rope_call *c, const char *x, const void *norm,
                            const float *cs, float *restrict tmp, float *restrict out) {
    const int64_t D = c->D, half = c->rot / 2;
    for (int64_t i = 0; i < D; i++) tmp[i] = load_elem(x, c->dtype, i);
    if (norm != NULL) normed(tmp, D, inv_rms(tmp, D, c->eps), norm, c->dtype, tmp);
    const float *cos = cs, *sin = cs + half;
    for (int64_t i = 0; i < half; i++) {
        const float a = tmp[i] * cos[i], b = tmp[i + half] * -sin[i];
        out[i] = round_to(a + b, c->dtype);
    }
    for (int64_t i = half; i < c->rot; i++) {
        const float a = tmp[i] * cos[i - half], b = tmp[i - half] * sin[i - half];
        out[i] = round_to(a + b, c->dtype);
    }
    for (int64_t i = c->rot; i < D; i++) out[i] = tmp[i];
}

static inline char *cache_row(const struct rope_call *c, void *cache, int64_t slot, int64_t h) {
    const size_t esize = dtype_size(c->kv_dtype);
    return (char *)cache + (size_t)((slot / c->block_size) * c->stride_block
        + (slot % c->block_size) * c->stride_token + h * c->stride_head) * esize;
}

/* Token t: its query heads rotated into q_out [T, NH, D]; its key heads rotated and its value
 * heads stored at its slot of the paged cache (a negative slot stores nothing), in the
 * cache's dtype (float32, bfloat16, float8_e4m3fn or float8_e5m2). */
static int rope_token(const struct rope_call *c, int64_t t) {
    const int64_t D = c->D;
    float *buf = scratch((size_t)(2 * D));
    if (buf == NULL) return 1;
    float *tmp = buf, *row = buf + D;
    const size_t esize = c->dtype == BF16 ? 2 : 4;
    const float *cs = c->table + c->positions[t] * c->table_stride;
    for (int64_t h = 0; h < c->NH; h++) {
        rope_row(c, (const char *)c->q + (size_t)(t * c->q_st + h * c->q_sh) * esize, c->q_norm,
                 cs, tmp, row);
        char *o = (char *)c->q_out + (size_t)((t * c->NH + h) * D) * esize;
        store_values(o, c->dtype, row, D);
    }
    const int64_t slot = c->slots[t];
    if (slot < 0) return 0;
    for (int64_t h = 0; h < c->NKV; h++) {
        rope_row(c, (const char *)c->k + (size_t)(t * c->k_st + h * c->k_sh) * esize, c->k_norm,
                 cs, tmp, row);
        store_values(cache_row(c, c->k_cache, slot, h), c->kv_dtype, row, D);
        const char *vr = (const char *)c->v + (size_t)(t * c->v_st + h * c->v_sh) * esize;
        char *vo = cache_row(c, c->v_cache, slot, h);
        if (c->kv_dtype == c->dtype) {
            memcpy(vo, vr, (size_t)D * esize);
        } else {
            for (int64_t i = 0; i < D; i++) tmp[i] = load_elem(vr, c->dtype, i);
            store_values(vo, c->kv_dtype, tmp, D);
        }
    }
    return 0;
}

/* q [T, NH, D], k / v [T, NKV, D] (strided, the model's dtype), positions [T], the
 * [max_pos, rot] table of [cos | sin] (float32), optional per-head RMSNorm weights [D] for q
 * and k. Writes the rotated queries to q_out (packed [T, NH, D]) and each token's rotated K
 * and its V to the paged cache at slots[t].
 * Returns 0; -1 when scratch memory could not be had; or, before anything is written,
 * 1 + 2 t when positions[t] is outside [0, max_pos), 2 + 2 t when slots[t] is past the cache. */
int64_t rotary_store_kv(
    const void *q, const void *k, const void *v, int dtype,
    int64_t q_st, int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh,
    int64_t T, int64_t NH, int64_t NKV, int64_t D, int64_t rot,
    const int64_t *positions, const float *table, int64_t table_stride, int64_t max_pos,
    const void *q_norm, const void *k_norm, float eps, void *q_out,
    void *k_cache, void *v_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    int64_t num_blocks, int64_t block_size, const int64_t *slots, int num_threads)
{
    for (int64_t t = 0; t < T; t++) {
        if (positions[t] < 0 || positions[t] >= max_pos) return 1 + 2 * t;
        if (slots[t] >= num_blocks * block_size) return 2 + 2 * t;
    }
    const struct rope_call c = {
        q, k, v, dtype, q_st, q_sh, k_st, k_sh, v_st, v_sh, NH, NKV, D, rot,
        positions, table, table_stride, q_norm, k_norm, eps, q_out,
        k_cache, v_cache, kv_dtype, stride_block, stride_token, stride_head, block_size, slots,
    };
    int failed = 0;
#pragma omp parallel for num_threads(num_threads) if (T * (NH + 2 * NKV) * D >= PARALLEL_ELEMS) \
    schedule(static) reduction(| : failed)
    for (int64_t t = 0; t < T; t++) failed |= rope_token(&c, t);
    return failed ? -1 : 0;
}

/* out = cap * tanh(x / cap) over n float32 values (a soft-capped model's logits): the
 * reference's three roundings, with tanh_fast for torch's tanh. */
void softcap(const float *x, float *out, int64_t n, float cap, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (n >= 4 * PARALLEL_ELEMS) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = cap * tanh_fast(x[i] / cap);
}

/* A gated MLP's activation: x [T, 2I] (rows x_stride apart) = [gate | up] -> out [T, I]
 * contiguous, act(gate) * up with act SiLU (kind 0) or tanh-GELU (kind 1). One pass (torch
 * ran the activation and the product as two, writing and reading [T, I] once more); each
 * element alone, so a row's values never depend on its batch. */
void act_and_mul(const float *x, int64_t T, int64_t I, int64_t x_stride, float *out, int kind,
                 int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T * I >= 4 * PARALLEL_ELEMS) \
    schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * x_stride, *u = g + I;
        float *o = out + t * I;
        if (kind == 0)
            for (int64_t i = 0; i < I; i++) o[i] = silu_fast(g[i]) * u[i];
        else
            for (int64_t i = 0; i < I; i++) o[i] = gelu_tanh_fast(g[i]) * u[i];
    }
}

/* Index of each row's largest value (the first one on ties; a NaN wins, the first NaN, as
 * torch's argmax): rows of `cols` float32 values, `stride` apart. LANES running maxima
 * over interleaved columns, combined at the end. */
void argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out,
                 int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * cols >= 4 * PARALLEL_ELEMS) \
    schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float best[LANES];
        int64_t at[LANES];
        for (int l = 0; l < LANES; l++) { best[l] = -INFINITY; at[l] = -1; }
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES)
            for (int l = 0; l < LANES; l++) {
                const float v = row[j + l];
                const int take = at[l] < 0 || v > best[l] || (v != v && best[l] == best[l]);
                best[l] = take ? v : best[l];
                at[l] = take ? j + l : at[l];
            }
        float m = -INFINITY;
        int64_t idx = -1;
        for (int l = 0; l < LANES; l++) {  /* the lanes' winners: larger, NaN, or earlier */
            if (at[l] < 0) continue;
            const float v = best[l];
            const int vnan = v != v, mnan = m != m;
            if (idx < 0 || (vnan && !mnan) || (vnan == mnan && !vnan && v > m)
                || (vnan == mnan && (vnan || v == m) && at[l] < idx)) { m = v; idx = at[l]; }
        }
        for (; j < cols; j++) {
            const float v = row[j];
            const int vnan = v != v, mnan = m != m;
            if (idx < 0 || (vnan && !mnan) || (!vnan && !mnan && v > m)) { m = v; idx = j; }
        }
        out[r] = idx < 0 ? 0 : idx;
    }
}
