/* Paged decode attention on the CPU: one query token per sequence over its paged KV context,
 * read in place from the cache (no gather). Built at run time by kernels/native.py with the
 * host compiler (-O3 -march=native -fopenmp) and called through ctypes.
 *
 * One work item is one (sequence, KV head): its query heads' scores over every key in the
 * context (or the window), a softmax, the weighted sum of the values. Items are independent
 * and each sums in a fixed order, so a sequence's result never depends on its batch (batch
 * invariance) nor on the thread that ran it. Arithmetic is float32 throughout: dot products in
 * 16 lanes summed pairwise (bfloat16 queries and keys: the products by pairs, as vdpbf16ps
 * computes them; see score_rows_pairs), exp by a degree-6 polynomial (relative error ~2e-7),
 * the output rounded to nearest even when bf16.
 *
 * KV caches of float32, bfloat16 or fp8 (float8_e4m3fn / float8_e5m2, no scale). fp8 rows are
 * widened exactly to bfloat16 (widen_fp8: every fp8 value is one), once per block and KV
 * head, and read from there by the bfloat16 cache's code: an fp8 cache gives exactly the
 * bits of a bfloat16 cache holding the same values, which, for float32 queries, are those of
 * a float32 cache holding them (a bfloat16 row is widened to float32 exactly, then the same
 * arithmetic).
 *
 * OpenMP: linking -fopenmp records libgomp.so.1, which the loader resolves to the one torch
 * already loaded, so the kernel runs on torch's own thread team.
 */
/* GCC's RTL global CSE / PRE and its load CSE after register allocation took 32 of the 46 s
 * this file's -O3 build spent (-ftime-report, GCC on a Zen 3), over the many always-inlined
 * 16-lane loops; off, it builds in 13 s (x86-64 without vectors: 66 -> 14 s) and the paged
 * decode kernel ran as fast (30 layers x 64 sequences, float32 and fp8 caches: within 3%,
 * the faster side without them). They only drop redundant loads and expressions: no
 * arithmetic changes, so no bits (the native tests compare every build's bits). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-gcse", "no-gcse-after-reload")
#endif
#include "common.h"
#include "entry_points.h"

/* One row of D elements as float32. */
static inline void load_row(const void *p, int dtype, int64_t D, float *restrict out) {
    if (dtype == BF16) {
        const uint16_t *h = (const uint16_t *)p;
        for (int64_t d = 0; d < D; d++) out[d] = bf16_to_f32(h[d]);
    } else {
        memcpy(out, p, (size_t)D * sizeof(float));
    }
}

/* max / sum of n floats in LANES partial results combined pairwise: a fixed order for a
 * given n, and no serial dependency chain. */
#if defined(__AVX512F__)
#include <immintrin.h>
/* The same on 16 lanes in one register: maxps(a, b) is a > b ? a : b, the scalar select
 * (NaN and signed zeros included); the tail's values into lane 0 one by one, then the tree
 * (l, l + 8), (l, l + 4), (l, l + 2), (l, l + 1) by shuffles instead of through memory: a
 * prompt row's ~128 scores made the scalar tails and trees about half of softmax. */
static inline float max_lanes(const float *restrict s, int64_t n) {
    __m512 p = _mm512_set1_ps(s[0]);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) p = _mm512_max_ps(_mm512_loadu_ps(s + j), p);
    float p0 = _mm512_cvtss_f32(p);
    for (; j < n; j++) p0 = s[j] > p0 ? s[j] : p0;
    p = _mm512_mask_mov_ps(p, 1, _mm512_set1_ps(p0));
    p = _mm512_max_ps(_mm512_shuffle_f32x4(p, p, 0xee), p); /* lanes 8-15 onto 0-7 */
    p = _mm512_max_ps(_mm512_shuffle_f32x4(p, p, 0x55), p); /* 4-7 onto 0-3 */
    p = _mm512_max_ps(_mm512_permute_ps(p, 0xee), p);       /* 2-3 onto 0-1 */
    p = _mm512_max_ps(_mm512_permute_ps(p, 0x55), p);       /* 1 onto 0 */
    return _mm512_cvtss_f32(p);
}

static inline float sum_lanes(const float *restrict s, int64_t n) {
    __m512 p = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) p = _mm512_add_ps(p, _mm512_loadu_ps(s + j));
    float p0 = _mm512_cvtss_f32(p);
    for (; j < n; j++) p0 += s[j];
    p = _mm512_mask_mov_ps(p, 1, _mm512_set1_ps(p0));
    p = _mm512_add_ps(p, _mm512_shuffle_f32x4(p, p, 0xee));
    p = _mm512_add_ps(p, _mm512_shuffle_f32x4(p, p, 0x55));
    p = _mm512_add_ps(p, _mm512_permute_ps(p, 0xee));
    p = _mm512_add_ps(p, _mm512_permute_ps(p, 0x55));
    return _mm512_cvtss_f32(p);
}
#else
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
#endif

/* Softmax of n scores in place (after the optional soft cap). */
static void softmax(float *restrict s, int64_t n, float soft_cap) {
    if (soft_cap > 0.0f)
        for (int64_t j = 0; j < n; j++) s[j] = soft_cap * tanh_fast(s[j] / soft_cap);
    const float m = max_lanes(s, n);
    for (int64_t j = 0; j < n; j++) s[j] = exp_nonpos(s[j] - m);
    const float inv = 1.0f / sum_lanes(s, n);
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

#define MAX_CHUNKS 16 /* head_dim up to 256 */
#ifndef PREFILL_TILE
#define PREFILL_TILE 16 /* prompt rows of one sequence per work item */
#endif

#if defined(__AVX512F__) && defined(HAVE_SHUFFLEVECTOR) && !defined(SPLITSERVE_ROW_SUMS)
#define BATCHED_SUMS 1
/* Lane sums of 16 vectors at once: lane r of the result is hsum16(a[r]), the same pairs in
 * the same order ((l, l + 8), then (l, l + 4), (l, l + 2), (l, l + 1)), so the same bits, for
 * ~3 shuffles and adds a row instead of ~8. */
static inline __attribute__((always_inline)) v16f sums16(const v16f *a) {
    v16f l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; i++)
        l1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1],
                                        0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
              + __builtin_shufflevector(a[2 * i], a[2 * i + 1],
                                        8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        l2[i] = __builtin_shufflevector(l1[2 * i], l1[2 * i + 1],
                                        0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
              + __builtin_shufflevector(l1[2 * i], l1[2 * i + 1],
                                        4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        l3[i] = __builtin_shufflevector(l2[2 * i], l2[2 * i + 1],
                                        0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
              + __builtin_shufflevector(l2[2 * i], l2[2 * i + 1],
                                        2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(l3[0], l3[1],
                                   0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(l3[0], l3[1],
                                   1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#endif

/* bfloat16 queries and keys: dot products by pairs of elements, as AVX-512 BF16's vdpbf16ps
 * computes them. Lane l of a 32-element chunk holds elements 2l (low half of the 32-bit word)
 * and 2l + 1 (high half); the lane adds the high pair's product, then the low pair's, each sum
 * rounded to float32 (the products of two bfloat16 values are exact in float32), with
 * bfloat16 inputs of zero exponent read as zero and float32 results of zero exponent
 * flushed to zero (the instruction's DAZ / FTZ). The lanes are then summed as score_rows
 * sums them. Half the multiplies of widening each key to float32 and no widening at all;
 * other builds compute the same sums in float32 vectors, so the same bits. */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SCORE_DPBF16 1
#endif

/* Native vectors. Every sum in this file is defined over 16 float32 lanes (LANES): lane l of
 * a row's dot product accumulates elements c * 16 + l, chunk by chunk, then the lanes are
 * summed in hsum16's pairs. An AVX-512 register holds the 16 lanes; an AVX2 build holds them
 * as PARTS = 2 registers of VL = 8 lanes (4 of 4 without AVX): native chunk k covers lanes
 * (k % PARTS) * VL .. of 16-lane chunk k / PARTS, and accumulates into acc[k % PARTS], so each
 * lane still sums the same products in the same order, and hsum_parts adds the parts in
 * hsum16's pairs: the same bits in every build. Written this way because GCC keeps a 64-byte
 * vector that no register can hold in memory: on AVX2 the kernel spent most of its time
 * moving the 16-lane accumulators through the stack. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
#define PARTS (LANES / VL)
#define MAX_NATIVE (MAX_CHUNKS * PARTS) /* native vectors of a head_dim-256 row */
typedef float vn __attribute__((vector_size(VL * 4)));
typedef uint32_t vnu __attribute__((vector_size(VL * 4)));
typedef uint16_t vnh __attribute__((vector_size(VL * 2)));

/* VL elements of a float32 or bfloat16 row as float32 (exact). */
static inline __attribute__((always_inline)) vn loadn(const void *p, int dtype) {
    vn f;
#if VL == 16
    /* GCC builds the generic widening below from two 8-lane halves here (vpmovzxwd ymm,
     * extract, insert: 4 ops a vector); one vpmovzxwd zmm and a shift are the same bits */
    if (dtype == BF16) {
        const __m512i u = _mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
        memcpy(&f, &u, sizeof f);
        return f;
    }
#endif
    if (dtype == BF16) {
        vnh h;
        memcpy(&h, p, sizeof h);
        const vnu u = __builtin_convertvector(h, vnu) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, p, sizeof f);
    }
    return f;
}

/* hsum16 of the 16 lanes held in PARTS native vectors: (l, l + 8), then (l, l + 4), (l, l + 2),
 * (l, l + 1), as hsum16 adds them. */
static inline __attribute__((always_inline)) float hsum_parts(const vn *a) {
#if VL == 16
    return hsum16(a[0]);
#elif VL == 8
    const v8f s8 = a[0] + a[1];
#ifdef HAVE_SHUFFLEVECTOR
    const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3)
        + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else
    const v4f s4 = {s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]};
#endif
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
#else
    const v4f s4 = (a[0] + a[2]) + (a[1] + a[3]); /* s8's lanes 0-3 and 4-7, then s4 */
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
#endif
}

struct qpairs { /* one query head, D / 32 chunks */
#ifdef SCORE_DPBF16
    __m512i w[MAX_CHUNKS / 2];
#else
    vn hi[MAX_NATIVE / 2], lo[MAX_NATIVE / 2];
#endif
};

#ifndef SCORE_DPBF16
/* float32 bits of zero exponent to (signed) zero: DAZ of the bfloat16 inputs, FTZ of the
 * sums */
static inline __attribute__((always_inline)) vn flush(vnu u) {
    const vnu tiny = (vnu)((u & 0x7f800000u) == 0);
    u &= ~(tiny & 0x7fffffffu);
    vn f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) vnu bitsn(vn f) {
    vnu u;
    memcpy(&u, &f, sizeof u);
    return u;
}
#endif

/* A bfloat16 query head as stored: 32-element chunks of 16 words (native: 2 * VL elements
 * of VL words each, k = 0 .. D / (2 VL)). */
static inline __attribute__((always_inline)) void load_pairs(const char *q, const int64_t D,
                                                             struct qpairs *out) {
#ifdef SCORE_DPBF16
    for (int64_t c = 0; c < D / 32; c++) memcpy(&out->w[c], q + 64 * c, 64);
#else
    for (int64_t k = 0; k < D / (2 * VL); k++) {
        vnu w;
        memcpy(&w, q + 4 * VL * k, sizeof w);
        out->hi[k] = flush(w & 0xffff0000u);
        out->lo[k] = flush(w << 16);
    }
#endif
}

/* acc + native chunk k of the query's pairs times the key's (k: 32-element chunk k on
 * DPBF16 builds, where VL is 16). */
static inline __attribute__((always_inline)) vn dot_pairs(vn acc, const struct qpairs *q,
                                                          int64_t k, const char *key) {
#ifdef SCORE_DPBF16
    __m512i kw;
    memcpy(&kw, key, sizeof kw);
    return (vn)_mm512_dpbf16_ps((__m512)acc, (__m512bh)q->w[k], (__m512bh)kw);
#else
    vnu w;
    memcpy(&w, key, sizeof w);
    acc = flush(bitsn(acc + q->hi[k] * flush(w & 0xffff0000u)));
    return flush(bitsn(acc + q->lo[k] * flush(w << 16)));
#endif
}

/* The 16 lane sums (in PARTS native vectors, acc) of one K row's dot product with a query
 * head: the query's float32 vectors (qv: D / VL of them) times the row widened to float32,
 * or, by pairs (qp), as dot_pairs computes. */
static inline __attribute__((always_inline)) void row_dot(
    const vn *qv, const struct qpairs *qp, const char *row, const int dtype, const int64_t D,
    const int pairs, vn *acc)
{
    for (int p = 0; p < PARTS; p++) acc[p] = (vn){0};
    if (pairs) {
        for (int64_t k = 0; k < D / (2 * VL); k++)
            acc[k % PARTS] = dot_pairs(acc[k % PARTS], qp, k, row + 4 * VL * k);
    } else {
        const size_t esize = dtype == BF16 ? 2 : 4;
        for (int64_t k = 0; k < D / VL; k++)
            acc[k % PARTS] += qv[k] * loadn(row + (size_t)(k * VL) * esize, dtype);
    }
}

/* Scores of one query head against `count` consecutive K rows (`stride` bytes apart): the
 * query in registers, one dot product per row in 16 lanes (row_dot), the lanes then summed
 * pairwise (16 rows at a time where the vector width allows: the same sums). */
static inline __attribute__((always_inline)) void score_keys(
    const vn *qv, const struct qpairs *qp, const char *k, int64_t stride, int64_t count,
    float scale, float *restrict out, const int dtype, const int64_t D, const int pairs)
{
    int64_t j = 0;
#ifdef BATCHED_SUMS
    for (; j + LANES <= count; j += LANES) {
        v16f acc[LANES];
        for (int r = 0; r < LANES; r++)
            row_dot(qv, qp, k + (j + r) * stride, dtype, D, pairs, &acc[r]);
        const v16f s = sums16(acc) * scale;
        memcpy(out + j, &s, sizeof s);
    }
#endif
    for (; j < count; j++) {
        vn acc[PARTS];
        row_dot(qv, qp, k + j * stride, dtype, D, pairs, acc);
        out[j] = hsum_parts(acc) * scale;
    }
}

/* score_keys for a float32 query head (q) and K rows of `dtype`. */
static inline __attribute__((always_inline)) void score_rows(
    const float *restrict q, const char *k, int64_t stride, int64_t count, float scale,
    float *restrict out, const int dtype, const int64_t D)
{
    vn qv[MAX_NATIVE];
    for (int64_t c = 0; c < D / VL; c++) memcpy(&qv[c], q + c * VL, sizeof qv[c]);
    score_keys(qv, NULL, k, stride, count, scale, out, dtype, D, 0);
}

/* score_keys for a bfloat16 query head (q: its D values as stored) and bfloat16 keys, by
 * pairs. */
static inline __attribute__((always_inline)) void score_rows_pairs(
    const char *q, const char *k, int64_t stride, int64_t count, float scale,
    float *restrict out, const int64_t D)
{
    struct qpairs qp;
    load_pairs(q, D, &qp);
    score_keys(NULL, &qp, k, stride, count, scale, out, BF16, D, 1);
}

/* Native vectors of accumulators a pass keeps in registers: a whole head_dim-256 row on
 * AVX-512 (32 registers), 8 elsewhere (AVX2 has 16). */
#if VL == 16
#define ACC_VECS 16
#else
#define ACC_VECS 8
#endif

/* acc += sum_j p[j] * V row j over `count` consecutive rows, in row order, for the G query
 * heads of one KV head at once (head g: acc + g * D, its probabilities p + g * p_stride): each
 * value row is read (and widened) once for all of them, W native vectors of columns at a time
 * with G * W <= ACC_VECS accumulators in registers (each lane's sum is over j in order
 * whatever W: the same bits). */
static inline __attribute__((always_inline)) void accumulate_rows_group(
    float *restrict acc, const float *restrict p, int64_t p_stride, const char *v,
    int64_t stride, int64_t count, const int dtype, const int64_t D, const int G)
{
    const size_t esize = dtype == BF16 ? 2 : 4;
    const int64_t C = D / VL, W = C < ACC_VECS / G ? C : ACC_VECS / G;
    for (int64_t k0 = 0; k0 < C; k0 += W) {
        const int64_t w = C - k0 < W ? C - k0 : W;
        vn a[ACC_VECS];
        for (int g = 0; g < G; g++)
            for (int64_t c = 0; c < w; c++)
                memcpy(&a[g * W + c], acc + g * D + (k0 + c) * VL, sizeof a[0]);
        for (int64_t j = 0; j < count; j++) {
            const char *row = v + j * stride + (size_t)(k0 * VL) * esize;
            vn r[ACC_VECS];
            for (int64_t c = 0; c < w; c++) r[c] = loadn(row + (size_t)(c * VL) * esize, dtype);
            for (int g = 0; g < G; g++) {
                const float pj = p[g * p_stride + j];
                for (int64_t c = 0; c < w; c++) a[g * W + c] += pj * r[c];
            }
        }
        for (int g = 0; g < G; g++)
            for (int64_t c = 0; c < w; c++)
                memcpy(acc + g * D + (k0 + c) * VL, &a[g * W + c], sizeof a[0]);
    }
}

/* accumulate_rows_group for one head. */
static inline __attribute__((always_inline)) void accumulate_rows(
    float *restrict acc, const float *restrict p, const char *v, int64_t stride, int64_t count,
    const int dtype, const int64_t D)
{
    accumulate_rows_group(acc, p, 0, v, stride, count, dtype, D, 1);
}

/* accumulate_rows_group with G a constant (1-8); 0 when a row's G heads cannot share the
 * reads (AVX-512: G * D / 16 > 16; the caller then runs accumulate_rows per head). */
static inline __attribute__((always_inline)) int accumulate_group(
    float *restrict acc, const float *restrict p, int64_t p_stride, const char *v,
    int64_t stride, int64_t count, const int dtype, const int64_t D, int64_t group)
{
    if (VL == 16 && group * (D / VL) > ACC_VECS) return 0;
    switch (group) {
    case 1: accumulate_rows_group(acc, p, p_stride, v, stride, count, dtype, D, 1); return 1;
    case 2: accumulate_rows_group(acc, p, p_stride, v, stride, count, dtype, D, 2); return 1;
    case 3: accumulate_rows_group(acc, p, p_stride, v, stride, count, dtype, D, 3); return 1;
    case 4: accumulate_rows_group(acc, p, p_stride, v, stride, count, dtype, D, 4); return 1;
    case 8: accumulate_rows_group(acc, p, p_stride, v, stride, count, dtype, D, 8); return 1;
    default: return 0;
    }
}

/* accumulate_group, or where its G heads cannot share the reads, accumulate_rows head by
 * head (head g: acc + g * D, its probabilities p + g * p_stride): the same sums either way. */
static inline __attribute__((always_inline)) void accumulate_heads(
    float *restrict acc, const float *restrict p, int64_t p_stride, const char *v,
    int64_t stride, int64_t count, const int dtype, const int64_t D, int64_t G)
{
    if (!accumulate_group(acc, p, p_stride, v, stride, count, dtype, D, G))
        for (int64_t g = 0; g < G; g++)
            accumulate_rows(acc + g * D, p + g * p_stride, v, stride, count, dtype, D);
}

/* Ask for bytes [lo, hi) from p, one KV head's part of the next block's rows of this item
 * (part_bounds), while the current block is computed: blocks sit at random places in the
 * pool, beyond what the hardware prefetchers guess. Into L2 (prefetcht1), and one KV head's share at a time: a
 * whole block asked for into L1 at once (96 lines for 3 heads x 64) stalled on the full miss
 * queue, and decode attention over a 30-layer pool ran at ~9 GB/s; this way at ~16 GB/s
 * (2.1 -> 1.2 ms a layer at 64 sequences of ~400 tokens; the bits do not change). */
static inline void prefetch_range(const char *p, int64_t lo, int64_t hi) {
    if (p == NULL) return;
    for (int64_t off = lo; off < hi; off += 64) __builtin_prefetch(p + off, 0, 2);
}

/* Bytes [lo, hi) of part `part` of `parts` of a block's `bytes` (lo down to a cache line).
 * run_item works them out once per work item for its first PF_PARTS KV heads (two 64-bit
 * divisions a call, three calls a block and KV head, were ~2.5% of the decode pass; lo_of /
 * hi_of: those, or NULL to compute). */
#define PF_PARTS 16
static inline void part_bounds(int64_t bytes, int64_t part, int64_t parts, const int64_t *lo_of,
                               const int64_t *hi_of, int64_t *lo, int64_t *hi) {
    if (part < PF_PARTS && lo_of != NULL) {
        *lo = lo_of[part], *hi = hi_of[part];
        return;
    }
    *lo = bytes * part / parts / 64 * 64;
    *hi = bytes * (part + 1) / parts;
}

/* One KV head's bfloat16 rows [0, count) of a block (`stride` bytes apart) as float32 at
 * out[r * D]: exact, so using the converted rows gives the bits of using the bfloat16 ones.
 * A GQA group's query heads then share one conversion (a block of one head stays in L1)
 * instead of each converting the same rows again. */
static inline __attribute__((always_inline)) void widen_rows(
    const char *rows, int64_t stride, int64_t count, float *restrict out, const int64_t D)
{
    for (int64_t r = 0; r < count; r++)
        for (int64_t c = 0; c < D / VL; c++) {
            const vn f = loadn(rows + r * stride + (size_t)(c * VL) * 2, BF16);
            memcpy(out + r * D + c * VL, &f, sizeof f);
        }
}

static float fp8_f32[2][256];     /* [0] e4m3fn, [1] e5m2: every byte's value */
static uint16_t fp8_bf16[2][256];  /* the same as bfloat16 bits (exact: the float32's high half) */

#if VL == 16 && defined(__AVX512VBMI__)
/* AVX-512 VBMI: 64 bytes at a time by two 128-entry byte tables (vpermi2b), the low and the
 * high byte of each magnitude's bfloat16, the byte's sign bit or'd into the high one: the
 * bits of fp8_bf16, which is how the tables are made (and they are used only when every
 * negative byte's entry is its magnitude's with the sign bit set, checked at load). The
 * table loop ran at ~0.6 ns a byte, and made an fp8 cache's decode ~2x a bfloat16 one's on
 * a Zen 5 (48.8 vs 25.5 ms a step, 30 layers x 64 sequences). */
#define FP8_VBMI 1
static __m512i fp8_lo[2][2], fp8_hi[2][2];
static int fp8_vbmi[2];

/* 64 fp8 bytes -> their 64 bfloat16 words, in order, in *w0 (0-31) and *w1 (32-63). */
static inline __attribute__((always_inline)) void fp8_words64(const uint8_t *src, int t,
                                                              __m512i *w0, __m512i *w1) {
    const __m512i x = _mm512_loadu_si512(src);
    const __m512i lo = _mm512_permutex2var_epi8(fp8_lo[t][0], x, fp8_lo[t][1]);
    const __m512i hi = _mm512_or_si512(_mm512_permutex2var_epi8(fp8_hi[t][0], x, fp8_hi[t][1]),
                                       _mm512_and_si512(x, _mm512_set1_epi8((char)0x80)));
    /* per 128-bit lane k: a = words 16k .. 16k + 7, b = 16k + 8 .. 16k + 15 */
    const __m512i a = _mm512_unpacklo_epi8(lo, hi), b = _mm512_unpackhi_epi8(lo, hi);
    *w0 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), b);
    *w1 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), b);
}
#endif

#ifdef FP8_VBMI
/* A decode step's fp8 values on VBMI, without putting the words back in order: per row, the
 * two table lookups, then unpacklo / unpackhi of the low and high bytes give the bfloat16
 * words of elements 16k + 0..7 (wa) and 16k + 8..15 (wb) in 128-bit lane k, and each word
 * widens to float32 in place, the low words of the dwords by a shift and the high ones by a
 * mask: 4 shuffles a row instead of widen_fp8's 6 and loadn's 4 more (shuffles, 2 a cycle
 * here, were what bounded the value pass: 9.5 instead of ~14 cycles a row for 3 heads, one
 * core of a Zen 5, hot in L1). Accumulator vector v (of 4 per 64 elements) lane d then holds
 * element fp8_perm_elem(v, d): the item's sums stay in that order until fp8_unpermute puts
 * them back, once. Each element's sum is accumulate_rows_group's: the same products, in row
 * order, multiplied then added, so the same bits. */
static inline int fp8_perm_elem(int v, int d) {
    return 16 * (d / 4) + 8 * (v / 2) + 2 * (d % 4) + (v % 2);
}

/* The rows fit: whole 64-element chunks, the G heads' sums all in registers. */
static inline int fp8_perm_fits(int64_t D, int64_t group) {
    return D % 64 == 0 && group >= 1 && group <= 4 && group * (D / 16) <= ACC_VECS;
}

static inline __attribute__((always_inline)) void accumulate_fp8_perm_group(
    float *restrict acc, const float *restrict p, int64_t p_stride, const char *v,
    int64_t stride, int64_t count, const int t, const int64_t D, const int G)
{
    const int64_t C = D / 16;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u), sign = _mm512_set1_epi8((char)0x80);
    vn a[ACC_VECS];
    for (int64_t i = 0; i < G * C; i++) memcpy(&a[i], acc + (i / C) * D + (i % C) * 16, sizeof a[0]);
    for (int64_t j = 0; j < count; j++) {
        vn r[ACC_VECS];
        for (int64_t d = 0; d < D; d += 64) {
            const __m512i x = _mm512_loadu_si512(v + j * stride + d);
            const __m512i lo = _mm512_permutex2var_epi8(fp8_lo[t][0], x, fp8_lo[t][1]);
            const __m512i hi = _mm512_or_si512(
                _mm512_permutex2var_epi8(fp8_hi[t][0], x, fp8_hi[t][1]), _mm512_and_si512(x, sign));
            const __m512i wa = _mm512_unpacklo_epi8(lo, hi), wb = _mm512_unpackhi_epi8(lo, hi);
            const __m512i f[4] = {_mm512_slli_epi32(wa, 16), _mm512_and_si512(wa, high),
                                  _mm512_slli_epi32(wb, 16), _mm512_and_si512(wb, high)};
            for (int h = 0; h < 4; h++) memcpy(&r[d / 16 + h], &f[h], sizeof r[0]);
        }
        for (int g = 0; g < G; g++) {
            const float pj = p[g * p_stride + j];
            for (int64_t c = 0; c < C; c++) a[g * C + c] += pj * r[c];
        }
    }
    for (int64_t i = 0; i < G * C; i++) memcpy(acc + (i / C) * D + (i % C) * 16, &a[i], sizeof a[0]);
}

/* accumulate_fp8_perm_group with G a constant (fp8_perm_fits(D, G) holds). */
static inline __attribute__((always_inline)) void accumulate_fp8_perm(
    float *restrict acc, const float *restrict p, int64_t p_stride, const char *v,
    int64_t stride, int64_t count, const int t, const int64_t D, int64_t group)
{
    switch (group) {
    case 1: accumulate_fp8_perm_group(acc, p, p_stride, v, stride, count, t, D, 1); break;
    case 2: accumulate_fp8_perm_group(acc, p, p_stride, v, stride, count, t, D, 2); break;
    case 3: accumulate_fp8_perm_group(acc, p, p_stride, v, stride, count, t, D, 3); break;
    default: accumulate_fp8_perm_group(acc, p, p_stride, v, stride, count, t, D, 4); break;
    }
}

/* nq heads' sums (D apart) from accumulate_fp8_perm's order back to element order. */
static void fp8_unpermute(float *acc, int64_t nq, int64_t D) {
    for (int64_t i = 0; i < nq * D; i += 64) {
        float tmp[64];
        memcpy(tmp, acc + i, sizeof tmp);
        for (int v = 0; v < 4; v++)
            for (int d = 0; d < 16; d++) acc[i + fp8_perm_elem(v, d)] = tmp[16 * v + d];
    }
}
#endif

/* Filled when the library loads (fp8_to_f32 of every byte), before any call can read them. */
__attribute__((constructor)) static void fp8_tables(void) {
    for (int i = 0; i < 256; i++)
        for (int t = 0; t < 2; t++) {
            const float f = fp8_to_f32((uint8_t)i, t ? E5M2 : E4M3);
            fp8_f32[t][i] = f;
            fp8_bf16[t][i] = (uint16_t)(f32_bits(f) >> 16);
        }
#ifdef FP8_VBMI
    for (int t = 0; t < 2; t++) {
        uint8_t lo[128], hi[128];
        fp8_vbmi[t] = 1;
        for (int i = 0; i < 128; i++) {
            lo[i] = (uint8_t)(fp8_bf16[t][i] & 0xff);
            hi[i] = (uint8_t)(fp8_bf16[t][i] >> 8);
            fp8_vbmi[t] &= fp8_bf16[t][i + 128] == (fp8_bf16[t][i] | 0x8000u);
        }
        fp8_lo[t][0] = _mm512_loadu_si512(lo), fp8_lo[t][1] = _mm512_loadu_si512(lo + 64);
        fp8_hi[t][0] = _mm512_loadu_si512(hi), fp8_hi[t][1] = _mm512_loadu_si512(hi + 64);
    }
#endif
}

/* fp8 rows [0, count) of one KV head in a block (`stride` bytes apart) as bfloat16 at
 * out[r * D], exactly: every e4m3 / e5m2 value is a bfloat16. Keys scored by pairs (bfloat16
 * queries) are read through these rows, once per block and KV head, by the bfloat16 cache's
 * code, so the bits are a bfloat16 cache's holding the same values. By table, one load per
 * byte: a vector conversion (integer ops and selects over 16 lanes) ran at 3.4 ns a byte on
 * AVX2 (Zen 3) against 0.6 for the table, and made decode 3x the float32 cache's time. */
static __attribute__((noinline)) void widen_fp8(const char *rows, int64_t stride, int64_t count,
                                                uint16_t *restrict out, int dtype, int64_t D) {
    const uint16_t *tab = fp8_bf16[dtype == E5M2];
    for (int64_t r = 0; r < count; r++) {
        const uint8_t *src = (const uint8_t *)rows + r * stride;
        int64_t d = 0;
#ifdef FP8_VBMI
        const int t = dtype == E5M2;
        for (; fp8_vbmi[t] && d + 64 <= D; d += 64) {
            __m512i w0, w1;
            fp8_words64(src + d, t, &w0, &w1);
            _mm512_storeu_si512(out + r * D + d, w0);
            _mm512_storeu_si512(out + r * D + d + 32, w1);
        }
#endif
        for (; d < D; d++) out[r * D + d] = tab[src[d]];
    }
}

/* fp8 rows as float32 at out[r * D], exactly (the float32 cache's code then reads them: the
 * same bits as a float32 cache holding these values). Used wherever the rows would otherwise
 * go fp8 -> bfloat16 -> float32: float32 queries, and values (one pass instead of two), but
 * a decode step's values on AVX-512 VBMI: there accumulate_fp8_perm widens each row in
 * registers (where its heads fit, else widen_fp8's words, half the bytes, are read as a
 * bfloat16 cache's values: 22.2-23.2 ms a step against 23.8-25.4 this way, 30 layers x 64
 * sequences of ~340 tokens, 2-core Zen 5). A prompt tile reads each block's values once for
 * 16 rows: float32 there. */
static __attribute__((noinline)) void widen_fp8_f32(const char *rows, int64_t stride,
                                                    int64_t count, float *restrict out, int dtype,
                                                    int64_t D) {
    const float *tab = fp8_f32[dtype == E5M2];
    for (int64_t r = 0; r < count; r++) {
        const uint8_t *src = (const uint8_t *)rows + r * stride;
        int64_t d = 0;
#ifdef FP8_VBMI
        const int t = dtype == E5M2;
        for (; fp8_vbmi[t] && d + 64 <= D; d += 64) { /* the bfloat16 words, widened exactly */
            __m512i w[2];
            fp8_words64(src + d, t, &w[0], &w[1]);
            for (int h = 0; h < 4; h++) {
                const __m256i half = h & 1 ? _mm512_extracti64x4_epi64(w[h / 2], 1)
                                           : _mm512_castsi512_si256(w[h / 2]);
                _mm512_storeu_si512(out + r * D + d + 16 * h,
                                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
            }
        }
#endif
        for (; d < D; d++) out[r * D + d] = tab[src[d]];
    }
}

/* nq heads' float32 results (acc, D apart) into o in the query's dtype (bf16 rounded to
 * nearest even). */
static inline void store_heads(char *o, int q_dtype, const float *acc, int64_t nq, int64_t D) {
    for (int64_t i = 0; i < nq; i++) {
        const float *a = acc + i * D;
        if (q_dtype == BF16) {
            store_bf16_row((uint16_t *)o + i * D, a, D);
        } else {
            memcpy((float *)o + i * D, a, sizeof(float) * (size_t)D);
        }
    }
}

/* Shapes and strides of one call, shared by its work items. */
struct call {
    const void *query; int q_dtype; int64_t q_stride_b, q_stride_h;
    const void *key_cache, *value_cache;
    int64_t stride_block, stride_token, stride_head;
    const int32_t *block_tables; int64_t table_stride; const int32_t *context_lens;
    void *out; int64_t H, KVH, D, block_size, window, group, per_item;
    float scale, soft_cap;
    int kv_src; /* the cache's dtype as stored: the work items' kv_dtype, or fp8 (then BF16) */
};

/* Address of token `t` of `block`, KV head `h`, in `cache`. */
static inline const char *kv_row(const struct call *c, const void *cache, int64_t block,
                                 int64_t t, int64_t h, size_t kv_esize) {
    return (const char *)cache
        + (size_t)(block * c->stride_block + h * c->stride_head + t * c->stride_token) * kv_esize;
}

/* Query row b's head h, as stored. */
static inline const char *q_row(const struct call *c, int64_t b, int64_t h) {
    return (const char *)c->query
        + (size_t)(b * c->q_stride_b + h * c->q_stride_h) * (c->q_dtype == BF16 ? 2 : 4);
}

/* The rows of KV heads h0.. in the block after the one holding token t0, or NULL past ctx:
 * what each pass prefetches while it computes the current block. */
static inline const char *next_block(const struct call *c, const void *cache,
                                     const int32_t *table, int64_t t0, int64_t ctx, int64_t h0,
                                     size_t kv_esize) {
    const int64_t bs = c->block_size;
    return t0 + bs < ctx ? kv_row(c, cache, table[t0 / bs + 1], 0, h0, kv_esize) : NULL;
}

/* One work item: query row b (its heads in query and out), attending to the first ctx
 * tokens of the sequence whose block table is `table`, KV heads [h0, h0 + per_item). Inlined
 * once per cache dtype, so the dtype is a constant in the loops. Returns 0, or 1 when its
 * scratch memory failed. */
static inline __attribute__((always_inline)) int run_item(
    const struct call *c, int64_t b, int64_t ctx, const int32_t *table, int64_t h0,
    const int kv_dtype, const int64_t D)
{
    const int64_t group = c->group, per_item = c->per_item, bs = c->block_size;
    /* an fp8 cache: run as bfloat16 (kv_dtype), its rows widened to bfloat16 first */
    const int fp8 = kv_dtype == BF16 && IS_FP8(c->kv_src);
    const size_t q_esize = c->q_dtype == BF16 ? 2 : 4;
    const size_t kv_esize = fp8 ? 1 : kv_dtype == BF16 ? 2 : 4;
    const int64_t nq = per_item * group; /* query heads of this item */
    const int64_t start = (c->window > 0 && ctx > c->window) ? ctx - c->window : 0;
    const int64_t n = ctx - start;
    char *o = (char *)c->out + (size_t)((b * c->H + h0 * group) * D) * q_esize;
    if (n <= 0) { /* no key at all: zeros, as documented */
        memset(o, 0, (size_t)(nq * D) * q_esize);
        return 0;
    }
    /* bfloat16 queries and keys: scores by pairs, straight from the cache (no float32 query) */
    const int pairs = kv_dtype == BF16 && c->q_dtype == BF16 && D % 32 == 0;
    /* bfloat16 rows read by more than one query head are widened once per block */
    const int widen = kv_dtype == BF16 && group > 1;
    /* fp8 keys not scored by pairs, and fp8 values: straight to float32 rows in `wide` */
    const int f8keys = fp8 && !pairs;
    float *buf = scratch((size_t)(nq * D * 2 + nq * n + (widen || fp8 ? bs * D : 0)
                                  + (fp8 ? bs * D / 2 : 0)));
    if (buf == NULL) return 1;
    float *qf = buf, *acc = buf + nq * D, *scores = buf + 2 * nq * D;
    float *wide = scores + nq * n;
    uint16_t *w8 = (uint16_t *)(wide + (widen || fp8 ? bs * D : 0)); /* fp8 keys as bfloat16 */
    const int64_t wide_stride = D * (int64_t)sizeof(float), w8_stride = D * 2;
    for (int64_t i = 0; i < nq && !pairs; i++) /* by pairs, scores read the query as stored */
        load_row(q_row(c, b, h0 * group + i), c->q_dtype, D, qf + i * D);
    /* pass 1: scores, block by block; within a block, head by head */
    const int64_t row_stride = c->stride_token * (int64_t)kv_esize;
    /* bytes of a block's rows of this item's heads (one run when the item has every head) */
    const int64_t span = (bs - 1) * row_stride
        + ((per_item - 1) * c->stride_head + D) * (int64_t)kv_esize;
    int64_t pf_lo[PF_PARTS], pf_hi[PF_PARTS]; /* each KV head's part of a block's span */
    for (int64_t kh = 0; kh < per_item && kh < PF_PARTS; kh++)
        part_bounds(span, kh, per_item, NULL, NULL, &pf_lo[kh], &pf_hi[kh]);
    for (int64_t t0 = start - start % bs; t0 < ctx; t0 += bs) {
        const int64_t lo = t0 < start ? start : t0, hi = t0 + bs < ctx ? t0 + bs : ctx;
        const char *blk = kv_row(c, c->key_cache, table[t0 / bs], lo - t0, h0, kv_esize);
        /* ask for K two blocks ahead (the first block: the next one too) and for this block's
         * V, which the second pass then finds in L2 */
        const int first_block = t0 == start - start % bs;
        const char *next = first_block ? next_block(c, c->key_cache, table, t0, ctx, h0, kv_esize)
                                       : NULL;
        const char *next2 = t0 + 2 * bs < ctx
            ? kv_row(c, c->key_cache, table[t0 / bs + 2], 0, h0, kv_esize) : NULL;
        const char *vnext = kv_row(c, c->value_cache, table[t0 / bs], 0, h0, kv_esize);
        for (int64_t kh = 0; kh < per_item; kh++) {
            int64_t plo, phi;
            part_bounds(span, kh, per_item, pf_lo, pf_hi, &plo, &phi);
            prefetch_range(next, plo, phi); /* NULL past the first block */
            prefetch_range(next2, plo, phi);
            prefetch_range(vnext, plo, phi);
            const char *rows = blk + (size_t)(kh * c->stride_head) * kv_esize;
            int64_t rs = row_stride;
            if (f8keys) {
                widen_fp8_f32(rows, row_stride, hi - lo, wide, c->kv_src, D);
            } else {
                if (fp8) {
                    widen_fp8(rows, row_stride, hi - lo, w8, c->kv_src, D);
                    rows = (const char *)w8, rs = w8_stride;
                }
                if (widen && !pairs) widen_rows(rows, rs, hi - lo, wide, D);
            }
            for (int64_t g = 0; g < group; g++) {
                float *s = scores + (kh * group + g) * n + (lo - start);
                const float *qh = qf + (kh * group + g) * D;
                if (pairs)
                    score_rows_pairs(q_row(c, b, h0 * group + kh * group + g), rows, rs,
                                     hi - lo, c->scale, s, D);
                else if (widen || f8keys)
                    score_rows(qh, (const char *)wide, wide_stride, hi - lo, c->scale, s, F32, D);
                else
                    score_rows(qh, rows, rs, hi - lo, c->scale, s, kv_dtype, D);
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) softmax(scores + i * n, n, c->soft_cap);
    /* pass 2: the weighted sum of the values, the same way */
    memset(acc, 0, sizeof(float) * (size_t)(nq * D));
#ifdef FP8_VBMI
    /* fp8 values by fp8_vbmi's tables: summed in a permuted order, put back at the end */
    const int vperm = fp8 && fp8_vbmi[c->kv_src == E5M2] && fp8_perm_fits(D, group);
#endif
    for (int64_t t0 = start - start % bs; t0 < ctx; t0 += bs) {
        const int64_t lo = t0 < start ? start : t0, hi = t0 + bs < ctx ? t0 + bs : ctx;
        const char *blk = kv_row(c, c->value_cache, table[t0 / bs], lo - t0, h0, kv_esize);
        const char *next = next_block(c, c->value_cache, table, t0, ctx, h0, kv_esize);
        for (int64_t kh = 0; kh < per_item; kh++) {
            int64_t plo, phi;
            part_bounds(span, kh, per_item, pf_lo, pf_hi, &plo, &phi);
            prefetch_range(next, plo, phi);
            const char *rows = blk + (size_t)(kh * c->stride_head) * kv_esize;
            int64_t rs = row_stride;
            float *const ah = acc + kh * group * D; /* this KV head's query heads */
            const float *const ph = scores + kh * group * n + (lo - start);
#ifdef FP8_VBMI
            if (vperm) {
                accumulate_fp8_perm(ah, ph, n, rows, row_stride, hi - lo, c->kv_src == E5M2, D,
                                    group);
                continue;
            }
            if (fp8 && fp8_vbmi[c->kv_src == E5M2]) { /* as a bfloat16 cache's values */
                widen_fp8(rows, row_stride, hi - lo, w8, c->kv_src, D);
                accumulate_heads(ah, ph, n, (const char *)w8, w8_stride, hi - lo, BF16, D, group);
                continue;
            }
#endif
            if (fp8) { /* as a float32 cache's values */
                widen_fp8_f32(rows, row_stride, hi - lo, wide, c->kv_src, D);
                accumulate_heads(ah, ph, n, (const char *)wide, wide_stride, hi - lo, F32, D, group);
                continue;
            }
            if (accumulate_group(ah, ph, n, rows, rs, hi - lo, kv_dtype, D, group))
                continue;
            if (widen) widen_rows(rows, rs, hi - lo, wide, D);
            for (int64_t g = 0; g < group; g++) {
                float *a = ah + g * D;
                const float *p = ph + g * n;
                if (widen)
                    accumulate_rows(a, p, (const char *)wide, wide_stride, hi - lo, F32, D);
                else
                    accumulate_rows(a, p, rows, rs, hi - lo, kv_dtype, D);
            }
        }
    }
#ifdef FP8_VBMI
    if (vperm) fp8_unpermute(acc, nq, D);
#endif
    store_heads(o, c->q_dtype, acc, nq, D);
    return 0;
}

/* T consecutive prompt rows of one sequence at once: rows b .. b + T - 1 of the query, row r
 * attending to the first ctx0 + r tokens (or its window), KV heads [h0, h0 + per_item). Each
 * row gets exactly run_item's arithmetic: the same score_rows calls over the same key ranges
 * of each block, the same softmax, the same value sums in the same order, so the same bits.
 * What the tile shares is the reading: each block's key and value rows are loaded (and
 * widened, for bfloat16) once for all T rows and their query heads instead of once a row, so
 * long prompts no longer stream their context from memory once per row. Returns 0, or 1 when
 * its scratch memory failed. */
static inline __attribute__((always_inline)) int run_tile(
    const struct call *c, int64_t b, int64_t T, int64_t ctx0, const int32_t *table, int64_t h0,
    const int kv_dtype, const int64_t D)
{
    const int64_t group = c->group, per_item = c->per_item, bs = c->block_size;
    const int fp8 = kv_dtype == BF16 && IS_FP8(c->kv_src); /* as run_item */
    const size_t q_esize = c->q_dtype == BF16 ? 2 : 4;
    const size_t kv_esize = fp8 ? 1 : kv_dtype == BF16 ? 2 : 4;
    const int64_t nq = per_item * group, win = c->window;
    const int64_t ctx_last = ctx0 + T - 1;
    const int64_t first = (win > 0 && ctx0 > win) ? ctx0 - win : 0; /* row 0's start: the least */
    const int64_t nmax = ctx_last - ((win > 0 && ctx_last > win) ? ctx_last - win : 0);
    const int widen = kv_dtype == BF16;
    const int pairs = kv_dtype == BF16 && c->q_dtype == BF16 && D % 32 == 0; /* as run_item */
    float *buf = scratch((size_t)(T * nq * D * 2 + T * nq * nmax + (widen ? bs * D : 0)
                                  + (fp8 ? bs * D / 2 : 0)));
    if (buf == NULL) return 1;
    float *qf = buf, *acc = buf + T * nq * D, *scores = acc + T * nq * D;
    float *wide = scores + T * nq * nmax;
    uint16_t *w8 = (uint16_t *)(wide + (widen ? bs * D : 0)); /* fp8 rows as bfloat16 */
    const int64_t wide_stride = D * (int64_t)sizeof(float), w8_stride = D * 2;
    for (int64_t r = 0; r < T && !pairs; r++)
        for (int64_t i = 0; i < nq; i++)
            load_row(q_row(c, b + r, h0 * group + i), c->q_dtype, D, qf + (r * nq + i) * D);
    const int64_t row_stride = c->stride_token * (int64_t)kv_esize;
    for (int pass = 0; pass < 2; pass++) {
        const void *cache = pass == 0 ? c->key_cache : c->value_cache;
        if (pass == 1) memset(acc, 0, sizeof(float) * (size_t)(T * nq * D));
        for (int64_t t0 = first - first % bs; t0 < ctx_last; t0 += bs) {
            const int64_t lo = t0 < first ? first : t0, hi = t0 + bs < ctx_last ? t0 + bs : ctx_last;
            const char *blk = kv_row(c, cache, table[t0 / bs], lo - t0, h0, kv_esize);
            for (int64_t kh = 0; kh < per_item; kh++) {
                const char *rows = blk + (size_t)(kh * c->stride_head) * kv_esize;
                int64_t rs = row_stride;
                const int by_pairs = pass == 0 && pairs; /* keys read as they are */
                if (fp8 && !by_pairs) { /* straight to float32, as run_item */
                    widen_fp8_f32(rows, row_stride, hi - lo, wide, c->kv_src, D);
                } else {
                    if (fp8) {
                        widen_fp8(rows, row_stride, hi - lo, w8, c->kv_src, D);
                        rows = (const char *)w8, rs = w8_stride;
                    }
                    if (widen && !by_pairs) widen_rows(rows, rs, hi - lo, wide, D);
                }
                const char *src = widen && !by_pairs ? (const char *)wide : rows;
                const int64_t src_stride = widen && !by_pairs ? wide_stride : rs;
                const int sdt = widen && !by_pairs ? F32 : kv_dtype;
                for (int64_t r = 0; r < T; r++) {
                    const int64_t ctx = ctx0 + r, start = (win > 0 && ctx > win) ? ctx - win : 0;
                    const int64_t rlo = lo > start ? lo : start, rhi = hi < ctx ? hi : ctx;
                    if (rlo >= rhi) continue;
                    const char *from = src + (rlo - lo) * src_stride;
                    float *sc = scores + (r * nq + kh * group) * nmax + (rlo - start);
                    if (by_pairs) {
                        for (int64_t g = 0; g < group; g++)
                            score_rows_pairs(q_row(c, b + r, h0 * group + kh * group + g), from,
                                             src_stride, rhi - rlo, c->scale, sc + g * nmax, D);
                    } else if (pass == 0) {
                        for (int64_t g = 0; g < group; g++)
                            score_rows(qf + (r * nq + kh * group + g) * D, from, src_stride,
                                       rhi - rlo, c->scale, sc + g * nmax, sdt, D);
                    } else {
                        float *a = acc + (r * nq + kh * group) * D;
                        if (!accumulate_group(a, sc, nmax, from, src_stride, rhi - rlo, sdt, D, group))
                            for (int64_t g = 0; g < group; g++)
                                accumulate_rows(a + g * D, sc + g * nmax, from, src_stride,
                                                rhi - rlo, sdt, D);
                    }
                }
            }
        }
        if (pass == 0)
            for (int64_t r = 0; r < T; r++) {
                const int64_t ctx = ctx0 + r, start = (win > 0 && ctx > win) ? ctx - win : 0;
                for (int64_t i = 0; i < nq; i++)
                    softmax(scores + (r * nq + i) * nmax, ctx - start, c->soft_cap);
            }
    }
    for (int64_t r = 0; r < T; r++) {
        char *o = (char *)c->out + (size_t)(((b + r) * c->H + h0 * group) * D) * q_esize;
        store_heads(o, c->q_dtype, acc + r * nq * D, nq, D);
    }
    return 0;
}

static int dispatch_tile(const struct call *c, int64_t b, int64_t T, int64_t ctx0,
                         const int32_t *table, int64_t h0, int kv_dtype, int64_t D) {
    if (kv_dtype == BF16 || IS_FP8(kv_dtype)) /* fp8: the bfloat16 code (c->kv_src) */
        return D == 64 ? run_tile(c, b, T, ctx0, table, h0, BF16, 64)
             : D == 128 ? run_tile(c, b, T, ctx0, table, h0, BF16, 128)
             : run_tile(c, b, T, ctx0, table, h0, BF16, D);
    return D == 64 ? run_tile(c, b, T, ctx0, table, h0, F32, 64)
         : D == 128 ? run_tile(c, b, T, ctx0, table, h0, F32, 128)
         : run_tile(c, b, T, ctx0, table, h0, F32, D);
}

/* dtype and the common head sizes as constants in the loops */
static int dispatch(const struct call *c, int64_t b, int64_t ctx, const int32_t *table,
                    int64_t h0, int kv_dtype, int64_t D) {
    if (kv_dtype == BF16 || IS_FP8(kv_dtype)) /* fp8: the bfloat16 code (c->kv_src) */
        return D == 64 ? run_item(c, b, ctx, table, h0, BF16, 64)
             : D == 128 ? run_item(c, b, ctx, table, h0, BF16, 128)
             : D == 32 ? run_item(c, b, ctx, table, h0, BF16, 32)
             : D == 16 ? run_item(c, b, ctx, table, h0, BF16, 16)
             : run_item(c, b, ctx, table, h0, BF16, D);
    return D == 64 ? run_item(c, b, ctx, table, h0, F32, 64)
         : D == 128 ? run_item(c, b, ctx, table, h0, F32, 128)
         : D == 32 ? run_item(c, b, ctx, table, h0, F32, 32)
         : D == 16 ? run_item(c, b, ctx, table, h0, F32, 16)
         : run_item(c, b, ctx, table, h0, F32, D);
}

/* Returns 0; -1 when a work item could not get its scratch memory (out is then partial); or,
 * before anything is computed, 1 + b * (max_blocks + 1) + col for the first bad input:
 * col = max_blocks when context_lens[b] is outside [0, max_blocks * block_size], else
 * block_tables[b, col] is an id outside [0, num_blocks) that the context covers.
 *
 * A work item is a sequence's KV heads [h0, h0 + nh): all of them when there are enough
 * sequences to keep every thread busy (each token's K/V row is then read whole, once), one
 * per item otherwise. Either way each head's arithmetic is the same. */
int64_t paged_decode_attention(
    const void *query, int q_dtype, int64_t q_stride_b, int64_t q_stride_h,
    const void *key_cache, const void *value_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    const int32_t *block_tables, int64_t table_stride, int64_t max_blocks, int64_t num_blocks,
    const int32_t *context_lens,
    void *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
    float scale, int64_t window, float soft_cap, int num_threads)
{
    /* every block id the kernel may read is checked first (a few ints per sequence) */
    for (int64_t b = 0; b < B; b++) {
        const int64_t ctx = context_lens[b];
        if (ctx < 0 || ctx > max_blocks * block_size) return 1 + b * (max_blocks + 1) + max_blocks;
        const int32_t *table = block_tables + b * table_stride;
        for (int64_t col = 0; col < (ctx + block_size - 1) / block_size; col++)
            if (table[col] < 0 || table[col] >= num_blocks) return 1 + b * (max_blocks + 1) + col;
    }
    const int64_t per_item = B >= 4 * (int64_t)num_threads ? KVH : 1;
    const struct call c = {
        query, q_dtype, q_stride_b, q_stride_h, key_cache, value_cache,
        stride_block, stride_token, stride_head, block_tables, table_stride, context_lens,
        out, H, KVH, D, block_size, window, H / KVH, per_item, scale, soft_cap, kv_dtype,
    };
    const int64_t per_seq = KVH / per_item, items = B * per_seq;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        const int64_t b = item / per_seq, h0 = (item % per_seq) * per_item;
        failed |= dispatch(&c, b, context_lens[b], block_tables + b * table_stride, h0,
                           kv_dtype, D);
    }
    return failed ? -1 : 0;
}

/* Causal attention of prompt chunks over the paged cache, each query row as a decode row of
 * its own: token i of sequence s's chunk (rows query_start_loc[s] ..) sits at position
 * context_lens[s] - q_len + i and attends to every position up to its own (or its window), so
 * it runs the arithmetic a decode step would for that token. Only the sequences listed in
 * seqs (n_seqs of them) are computed. Returns 0; -1 when a work item could not get its
 * scratch; before anything is computed, 1 + s * (max_blocks + 2) + col for the first bad
 * input of listed sequence s: col = max_blocks + 1 when its chunk is empty-negative or longer
 * than its context, col = max_blocks when context_lens[s] is outside [0, max_blocks *
 * block_size], else block_tables[s, col] is outside [0, num_blocks). */
int64_t paged_prefill_attention(
    const void *query, int q_dtype, int64_t q_stride_b, int64_t q_stride_h,
    const void *key_cache, const void *value_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    const int32_t *block_tables, int64_t table_stride, int64_t max_blocks, int64_t num_blocks,
    const int32_t *query_start_loc, const int32_t *context_lens, const int64_t *seqs,
    int64_t n_seqs, void *out, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
    float scale, int64_t window, float soft_cap, int num_threads)
{
    int64_t tiles = 0; /* tiles of up to PREFILL_TILE consecutive rows of one sequence */
    for (int64_t i = 0; i < n_seqs; i++) {
        const int64_t s = seqs[i], ctx = context_lens[s];
        const int64_t q_len = (int64_t)query_start_loc[s + 1] - query_start_loc[s];
        if (q_len < 0 || q_len > ctx) return 1 + s * (max_blocks + 2) + max_blocks + 1;
        if (ctx > max_blocks * block_size) return 1 + s * (max_blocks + 2) + max_blocks;
        const int32_t *table = block_tables + s * table_stride;
        for (int64_t col = 0; col < (ctx + block_size - 1) / block_size; col++)
            if (table[col] < 0 || table[col] >= num_blocks) return 1 + s * (max_blocks + 2) + col;
        tiles += (q_len + PREFILL_TILE - 1) / PREFILL_TILE;
    }
    /* per tile: its sequence, first query row, rows, and the first row's context */
    int64_t *tile_seq = malloc(sizeof(int64_t) * 4 * (size_t)(tiles > 0 ? tiles : 1));
    if (tile_seq == NULL) return -1;
    int64_t *tile_t = tile_seq + tiles, *tile_n = tile_t + tiles, *tile_ctx = tile_n + tiles;
    for (int64_t i = 0, k = 0; i < n_seqs; i++) {
        const int64_t s = seqs[i], lo = query_start_loc[s], hi = query_start_loc[s + 1];
        for (int64_t t = lo; t < hi; t += PREFILL_TILE, k++) {
            tile_seq[k] = s;
            tile_t[k] = t;
            tile_n[k] = hi - t < PREFILL_TILE ? hi - t : PREFILL_TILE;
            tile_ctx[k] = context_lens[s] - (hi - lo) + (t - lo) + 1;
        }
    }
    const int64_t per_item = tiles >= 4 * (int64_t)num_threads ? KVH : 1;
    const struct call c = {
        query, q_dtype, q_stride_b, q_stride_h, key_cache, value_cache,
        stride_block, stride_token, stride_head, block_tables, table_stride, context_lens,
        out, H, KVH, D, block_size, window, H / KVH, per_item, scale, soft_cap, kv_dtype,
    };
    const int64_t per_seq = KVH / per_item;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t item = 0; item < tiles * per_seq; item++) {
        const int64_t k = item / per_seq, h0 = (item % per_seq) * per_item;
        failed |= dispatch_tile(&c, tile_t[k], tile_n[k], tile_ctx[k],
                                block_tables + tile_seq[k] * table_stride, h0, kv_dtype, D);
    }
    free(tile_seq);
    return failed ? -1 : 0;
}
