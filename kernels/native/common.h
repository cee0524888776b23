/* What the native CPU kernels share: bf16 and fp8 conversions and 16-float vectors. */
#ifndef SPLITSERVE_NATIVE_COMMON_H
#define SPLITSERVE_NATIVE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

/* Element types (kernels/native.py's _DTYPES / KV_DTYPE_CODES). E4M3 (float8_e4m3fn) and E5M2
 * (float8_e5m2) are KV cache types only: stored with no scale, read widened exactly. */
enum { F32 = 0, BF16 = 1, E4M3 = 2, E5M2 = 3 };

#define IS_FP8(dtype) ((dtype) == E4M3 || (dtype) == E5M2)

/* Bytes per element of `dtype`. */
static inline size_t dtype_size(int dtype) {
    return dtype == F32 ? 4 : dtype == BF16 ? 2 : 1;
}

/* A float's bits and back (no aliasing: memcpy compiles to a register move). */
static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    return bits_f32((uint32_t)h << 16);
}

static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t nan = (u >> 16) | 0x40u; /* quiet NaN */
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    /* a select, not a branch: loops over it vectorize (a quantized projection's bf16 output
     * rows were stored one branchy scalar at a time: ~20% of its time at 512 rows) */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#if defined(__AVX2__)
#include <immintrin.h>
/* f32_to_bf16 of 8 lanes: the same integer steps (round to nearest even, NaN quieted). GCC
 * leaves loops over f32_to_bf16 scalar (~10 instructions a value). */
static inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    /* |u| as a signed int32 is never negative: the signed compare is the unsigned one */
    const __m256i is_nan = _mm256_cmpgt_epi32(
        _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan); /* every lane <= 0xffff */
    /* per 128-bit half: its 4 words twice; quadwords 0 and 2 are the 8 in order */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
#endif

#if defined(__AVX512F__)
/* f32_to_bf16 of 16 lanes, the same integer steps: equal to it on all 2^32 float32 bit
 * patterns (an exhaustive check when it was written). */
static inline __m256i bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, nan));
}
#endif

/* n floats as bfloat16 (f32_to_bf16 each), by vectors where the build has them. */
static inline void store_bf16_row(uint16_t *restrict o, const float *restrict v, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(o + i), bf16x16(_mm512_loadu_ps(v + i)));
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i *)(o + i), bf16x8(_mm256_loadu_ps(v + i)));
#endif
    for (; i < n; i++) o[i] = f32_to_bf16(v[i]);
}

/* An fp8 byte as float32, exactly (torch's .float() of every byte, NaN and inf included):
 * e4m3fn (bias 7, no inf, 0x7f NaN) and e5m2 (bias 15, exponent 31 inf / NaN). A normal
 * magnitude is its bits shifted under float32's exponent, rebiased; a subnormal one (exponent
 * field 0) its 3 / 2-bit integer times 2^-9 / 2^-16 (no float32 subnormal is ever formed, so
 * DAZ / FTZ cannot change it). */
static inline float fp8_to_f32(uint8_t b, int dtype) {
    const uint32_t m = b & 0x7fu, s = (uint32_t)(b & 0x80u) << 24;
    uint32_t u;
    if (dtype == E4M3) {
        u = m < 8 ? f32_bits((float)m * 0x1p-9f) : (m << 20) + (120u << 23);
        u = m == 0x7fu ? 0x7fc00000u : u;
    } else {
        u = m < 4 ? f32_bits((float)m * 0x1p-16f) : (m << 21) + (112u << 23);
        u = m >= 0x7cu ? u | 0x7f800000u : u;
    }
    return bits_f32(u | s);
}

/* float32 -> fp8 byte as kernels/reference.py's to_cache_dtype stores it: clamped to the
 * largest finite value (448 e4m3fn, 57344 e5m2; inf too), then rounded to nearest even from
 * float32 in one rounding: normal results (from 2^-6 / 2^-14 on) by the bit trick of
 * f32_to_bf16 at 3 / 2 mantissa bits (a carry moves into the exponent, as it should);
 * subnormal ones as the integer nearest |f| * 2^9 / 2^16, rounded by adding 2^23 in float32
 * (exact scaling, then the add's one rounding to nearest even). NaN -> 0x7f with its sign,
 * as torch. Branch-free (selects), so loops over it vectorize. */
static inline uint8_t f32_to_fp8(float f, int dtype) {
    const int e4 = dtype == E4M3;
    const uint32_t u = f32_bits(f), s = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    const uint32_t big = e4 ? 0x43e00000u : 0x47600000u;       /* 448, 57344 */
    const uint32_t min_normal = e4 ? 0x3c800000u : 0x38800000u; /* 2^-6, 2^-14 */
    const int shift = e4 ? 20 : 21;
    const uint32_t c = a > big ? big : a;
    const uint32_t normal = ((c + ((1u << (shift - 1)) - 1u) + ((c >> shift) & 1u)) >> shift)
        - (e4 ? 120u << 3 : 112u << 2);
    const uint32_t sub = f32_bits(bits_f32(c) * (e4 ? 0x1p9f : 0x1p16f) + 0x1p23f) - 0x4b000000u;
    const uint32_t r = c < min_normal ? sub : normal;
    return (uint8_t)((a > 0x7f800000u ? 0x7fu : r) | s);
}

/* v rounded to `dtype` and back (the value a tensor of that dtype holds). */
static inline float round_to(float v, int dtype) {
    return dtype == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

/* 16 floats: GCC's vector extension, one AVX-512 register or two AVX2 ones, whichever
 * -march=native gives. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* Lanes summed pairwise, (l, l + 8), then (l, l + 4), ...: in registers (a round trip
 * through memory stalled on store forwarding). __builtin_shufflevector: GCC >= 12, clang; older compilers sum through memory. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif

static inline float hsum16(v16f a) {
#ifdef HAVE_SHUFFLEVECTOR
    const v8f s8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7)
        + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3)
        + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
#else /* the same sums through memory (slower: store forwarding) */
    float l[LANES];
    memcpy(l, &a, sizeof l);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) l[i] += l[i + w];
    return l[0];
#endif
}

/* 16 fp8 bytes as float32: fp8_to_f32 lane by lane, in vectors (selects by masks). */
static inline __attribute__((always_inline)) v16f load16_fp8(const void *p, const int dtype) {
    v16b b;
    memcpy(&b, p, sizeof b);
    const v16u x = __builtin_convertvector(b, v16u);
    const v16u m = x & 0x7fu, s = (x & 0x80u) << 24;
    const int e4 = dtype == E4M3;
    const v16f subf = __builtin_convertvector((v16i)m, v16f) * (e4 ? 0x1p-9f : 0x1p-16f);
    v16u sub;
    memcpy(&sub, &subf, sizeof sub);
    const v16u normal = e4 ? (m << 20) + (120u << 23) : (m << 21) + (112u << 23);
    const v16u is_sub = (v16u)(m < (e4 ? 8u : 4u));
    v16u u = (sub & is_sub) | (normal & ~is_sub);
    if (e4) {
        const v16u nan = (v16u)(m == 0x7fu);
        u = (u & ~nan) | (0x7fc00000u & nan);
    } else {
        u |= (v16u)(m >= 0x7cu) & 0x7f800000u;
    }
    u |= s;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) v16f load16(const void *p, int dtype) {
    v16f f;
    if (IS_FP8(dtype)) {
        f = load16_fp8(p, dtype);
    } else if (dtype == BF16) {
        v16h h;
        memcpy(&h, p, sizeof h);
        v16u u = __builtin_convertvector(h, v16u) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, p, sizeof f);
    }
    return f;
}

/* tanh(x) as x P(x^2) / Q(x^2), the minimax rational that Eigen's fast tanh uses, with x
 * clamped to +-7.9988 (where tanh rounds to 1): relative error below 4e-7 over the float
 * range (measured against float64), no branch, so the soft-cap loop vectorizes. libm's tanhf,
 * ~8x slower here, was most of a soft-capped model's attention time. */
static inline float tanh_fast(float x) {
    const float c = 7.99881172180175781f;
    x = x < -c ? -c : (x > c ? c : x);
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}

/* exp(x) for x <= 0 (attention scores minus their maximum; -|x| for a sigmoid): 2^(x log2 e)
 * split into integer and fraction, 2^f by a minimax polynomial on [0, 1); a NaN stays NaN.
 * Written with integer selects only (the clamp: the larger bit pattern of two floats <= 0 is
 * the more negative one; the floor: truncation of t + 128 > 0), because GCC kept float
 * compares as branches (IEEE traps) and so never vectorized a loop around this. */
static inline float exp_nonpos(float x) {
    const uint32_t u = f32_bits(x), lo = 0xc2ae0000u; /* -87.0f */
    const float xc = bits_f32(u > lo && u <= 0xff800000u ? lo : u);
    const float t = xc * 1.44269504088896341f;
    const int32_t ti = (int32_t)(t + 128.0f) - 128; /* floor(t): t >= -125.6 */
    const float f = t - (float)ti;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const float r = p * bits_f32((uint32_t)(ti + 127) << 23);
    return (u & 0x7fffffffu) > 0x7f800000u ? x : r; /* NaN in, NaN out */
}

/* sigmoid(y) from e = exp(-|y|): 1 / (1 + e), or e / (1 + e) below zero (no overflow, no
 * cancellation: relative error that of exp_nonpos; the choice by the sign bit, an integer
 * select, so the loop vectorizes). */
static inline float sigmoid_fast(float y) {
    const float e = exp_nonpos(-fabsf(y));
    const float num = bits_f32(f32_bits(y) >> 31 ? f32_bits(e) : 0x3f800000u);
    return num / (1.0f + e);
}

/* SiLU: v * sigmoid(v). */
static inline float silu_fast(float v) {
    return v * sigmoid_fast(v);
}

/* torch's gelu(approximate="tanh"), 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))), as
 * v * sigmoid(2 sqrt(2 / pi) (v + 0.044715 v^3)) (the same function): 1 + tanh cancels to a
 * few ulp of tanh when the gate is very negative, the sigmoid does not. */
static inline float gelu_tanh_fast(float v) {
    return v * sigmoid_fast(1.5957691216057308f * (v + 0.044715f * v * v * v));
}

static inline float load_elem(const void *p, int dtype, int64_t i) {
    if (IS_FP8(dtype)) return fp8_to_f32(((const uint8_t *)p)[i], dtype);
    return dtype == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, int dtype, int64_t i, float v) {
    if (IS_FP8(dtype)) ((uint8_t *)p)[i] = f32_to_fp8(v, dtype);
    else if (dtype == BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* n floats stored as `dtype` (bf16 and fp8 rounded to nearest even, fp8 saturating), the
 * dtype a constant in each loop. */
static inline void store_values(void *p, int dtype, const float *restrict v, int64_t n) {
    switch (dtype) {
    case E4M3: for (int64_t i = 0; i < n; i++) ((uint8_t *)p)[i] = f32_to_fp8(v[i], E4M3); break;
    case E5M2: for (int64_t i = 0; i < n; i++) ((uint8_t *)p)[i] = f32_to_fp8(v[i], E5M2); break;
    case BF16: store_bf16_row((uint16_t *)p, v, n); break;
    default: memcpy(p, v, (size_t)n * sizeof(float));
    }
}

/* Per-thread scratch (rows, accumulators, scores), grown as needed and kept: OpenMP's
 * threads live as long as the process, and a malloc/free per work item cost a few percent of
 * a single-stream decode step. Each source file has its own (static). */
static __thread float *scratch_buf = NULL;
static __thread size_t scratch_cap = 0;

static inline float *scratch(size_t floats) {
    if (floats > scratch_cap) {
        float *grown = (float *)realloc(scratch_buf, floats * sizeof(float));
        if (grown == NULL) return NULL;
        scratch_buf = grown;
        scratch_cap = floats;
    }
    return scratch_buf;
}

#endif
