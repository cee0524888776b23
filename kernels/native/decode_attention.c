/* Paged decode attention on the CPU: one query token per sequence over its paged KV context,
 * read in place from the cache (no gather). Built at run time by kernels/native.py with the
 * host compiler (-O3 -march=native -fopenmp) and called through ctypes.
 *
 * One work item is one (sequence, KV head): its query heads' scores over every key in the
 * context (or the window), a softmax, the weighted sum of the values. Items are independent
 * and each sums in a fixed order, so a sequence's result never depends on its batch (batch
 * invariance) nor on the thread that ran it. Arithmetic is float32 throughout: dot products in
 * 16 lanes summed pairwise, exp by a degree-6 polynomial (relative error ~2e-7), the output
 * rounded to nearest even when bf16.
 *
 * OpenMP: linking -fopenmp records libgomp.so.1, which the loader resolves to the one torch
 * already loaded, so the kernel runs on torch's own thread team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

enum { F32 = 0, BF16 = 1 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One row of D elements as float32. */
static inline void load_row(const void *p, int dtype, int64_t D, float *restrict out) {
    if (dtype == BF16) {
        const uint16_t *h = (const uint16_t *)p;
        for (int64_t d = 0; d < D; d++) out[d] = bf16_to_f32(h[d]);
    } else {
        memcpy(out, p, (size_t)D * sizeof(float));
    }
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e) split into integer and
 * fraction, 2^f by a minimax polynomial on [0, 1). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float fi = floorf(t);
    float f = t - fi;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t e = (int32_t)fi + 127;
    uint32_t bits = (uint32_t)e << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

/* 16 floats: GCC's vector extension, one AVX-512 register or two AVX2 ones, whichever
 * -march=native gives. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f load16(const void *p, int dtype) {
    v16f f;
    if (dtype == BF16) {
        v16h h;
        memcpy(&h, p, sizeof h);
        v16u u = __builtin_convertvector(h, v16u) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, p, sizeof f);
    }
    return f;
}

/* Dot product of q (float32, D % LANES == 0) with a K row in the cache's dtype: 16 lanes,
 * then the lanes summed pairwise. */
static inline float dot_row(const float *restrict q, const void *k, int dtype, int64_t D) {
    const size_t esize = dtype == BF16 ? 2 : 4;
    v16f acc = {0};
    for (int64_t d = 0; d < D; d += LANES) {
        v16f qv;
        memcpy(&qv, q + d, sizeof qv);
        acc += qv * load16((const char *)k + (size_t)d * esize, dtype);
    }
    float lanes[LANES];
    memcpy(lanes, &acc, sizeof lanes);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
    return lanes[0];
}

/* out[d] += p * v[d] */
static inline void axpy_row(float *restrict out, float p, const void *v, int dtype, int64_t D) {
    if (dtype == BF16) {
        const uint16_t *h = (const uint16_t *)v;
        for (int64_t d = 0; d < D; d++) out[d] += p * bf16_to_f32(h[d]);
    } else {
        const float *f = (const float *)v;
        for (int64_t d = 0; d < D; d++) out[d] += p * f[d];
    }
}

/* max / sum of n floats in LANES partial results combined pairwise: a fixed order for a
 * given n, and no serial dependency chain. */
static inline float max_lanes(const float *restrict s, int64_t n) {
    float part[LANES];
    for (int l = 0; l < LANES; l++) part[l] = s[0];
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) part[l] = s[j + l] > part[l] ? s[j + l] : part[l];
    for (; j < n; j++) part[0] = s[j] > part[0] ? s[j] : part[0];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] = part[l + w] > part[l] ? part[l + w] : part[l];
    return part[0];
}

static inline float sum_lanes(const float *restrict s, int64_t n) {
    float part[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) part[l] += s[j + l];
    for (; j < n; j++) part[0] += s[j];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    return part[0];
}

/* Softmax of n scores in place (after the optional soft cap). */
static void softmax(float *restrict s, int64_t n, float soft_cap) {
    if (soft_cap > 0.0f)
        for (int64_t j = 0; j < n; j++) s[j] = soft_cap * tanhf(s[j] / soft_cap);
    const float m = max_lanes(s, n);
    for (int64_t j = 0; j < n; j++) s[j] = exp_nonpos(s[j] - m);
    const float inv = 1.0f / sum_lanes(s, n);
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

/* Returns 0, or -1 when a work item could not get its scratch memory (out is then partial).
 *
 * A work item is a sequence's KV heads [h0, h0 + nh): all of them when there are enough
 * sequences to keep every thread busy (each token's K/V row is then read whole, once), one
 * per item otherwise. Either way each head's arithmetic is the same. */
int paged_decode_attention(
    const void *query, int q_dtype, int64_t q_stride_b, int64_t q_stride_h,
    const void *key_cache, const void *value_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens,
    void *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
    float scale, int64_t window, float soft_cap, int num_threads)
{
    const int64_t group = H / KVH;
    const int64_t per_item = B >= 4 * (int64_t)num_threads ? KVH : 1;
    const int64_t items = B * (KVH / per_item);
    const size_t q_esize = q_dtype == BF16 ? 2 : 4, kv_esize = kv_dtype == BF16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        const int64_t b = item / (KVH / per_item), h0 = (item % (KVH / per_item)) * per_item;
        const int64_t nq = per_item * group; /* query heads of this item */
        const int64_t ctx = context_lens[b];
        const int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
        const int64_t n = ctx - start;
        char *o = (char *)out + (size_t)((b * H + h0 * group) * D) * q_esize;
        if (n <= 0) { /* no key at all: zeros, as documented */
            memset(o, 0, (size_t)(nq * D) * q_esize);
            continue;
        }
        float *buf = (float *)malloc(sizeof(float) * (size_t)(nq * D * 2 + nq * n));
        if (buf == NULL) { failed = 1; continue; }
        float *qf = buf, *acc = buf + nq * D, *scores = buf + 2 * nq * D;
        for (int64_t i = 0; i < nq; i++) {
            const char *qp = (const char *)query
                + (size_t)(b * q_stride_b + (h0 * group + i) * q_stride_h) * q_esize;
            load_row(qp, q_dtype, D, qf + i * D);
        }
        const int32_t *table = block_tables + b * table_stride;
        /* pass 1: scores, block by block */
        for (int64_t t0 = start - start % block_size; t0 < ctx; t0 += block_size) {
            const char *blk = (const char *)key_cache
                + (size_t)(table[t0 / block_size] * stride_block + h0 * stride_head) * kv_esize;
            const int64_t lo = t0 < start ? start : t0, hi = t0 + block_size < ctx ? t0 + block_size : ctx;
            for (int64_t t = lo; t < hi; t++) {
                const char *row = blk + (size_t)((t - t0) * stride_token) * kv_esize;
                for (int64_t kh = 0; kh < per_item; kh++) {
                    const char *kp = row + (size_t)(kh * stride_head) * kv_esize;
                    for (int64_t g = 0; g < group; g++) {
                        const int64_t i = kh * group + g;
                        scores[i * n + (t - start)] = dot_row(qf + i * D, kp, kv_dtype, D) * scale;
                    }
                }
            }
        }
        for (int64_t i = 0; i < nq; i++) softmax(scores + i * n, n, soft_cap);
        /* pass 2: the weighted sum of the values */
        memset(acc, 0, sizeof(float) * (size_t)(nq * D));
        for (int64_t t0 = start - start % block_size; t0 < ctx; t0 += block_size) {
            const char *blk = (const char *)value_cache
                + (size_t)(table[t0 / block_size] * stride_block + h0 * stride_head) * kv_esize;
            const int64_t lo = t0 < start ? start : t0, hi = t0 + block_size < ctx ? t0 + block_size : ctx;
            for (int64_t t = lo; t < hi; t++) {
                const char *row = blk + (size_t)((t - t0) * stride_token) * kv_esize;
                for (int64_t kh = 0; kh < per_item; kh++) {
                    const char *vp = row + (size_t)(kh * stride_head) * kv_esize;
                    for (int64_t g = 0; g < group; g++) {
                        const int64_t i = kh * group + g;
                        axpy_row(acc + i * D, scores[i * n + (t - start)], vp, kv_dtype, D);
                    }
                }
            }
        }
        for (int64_t i = 0; i < nq; i++) {
            const float *a = acc + i * D;
            if (q_dtype == BF16) {
                uint16_t *h = (uint16_t *)o + i * D;
                for (int64_t d = 0; d < D; d++) h[d] = f32_to_bf16(a[d]);
            } else {
                memcpy((float *)o + i * D, a, sizeof(float) * (size_t)D);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
