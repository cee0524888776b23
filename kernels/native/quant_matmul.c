/* Projections through 4-bit and 8-bit weights on the CPU, y = x @ W^T, by integer dot
 * products.
 *
 * W in groups of 32 along K, per group and output row: int4 w = q * d + c (q in [0, 15]; GGUF
 * Q4_1's d and m exactly, Q4_0's d and -8d, Q4_K's folded scales, RTN's float32 scales rounded
 * to float16), or int8 w = q * d (q in [-128, 127]: GGUF Q8_0; per-channel int8 with its scale
 * repeated per group); d and c are float16. Each row of x is quantized per group of 32 to
 * 16 bits: dx = max|x| / 32767, qx = round(x / dx), sx = dx * sum(qx) (relative error 2^-16 of
 * the group's largest value: finer than bf16 activations; int8 activations, as llama.cpp's
 * Q4 x Q8 dot products use, tripled the next-token KL divergence of SmolLM2 Q4_1 here). With
 * QM_ACT8 added to `bits` (quantization="w4a8") rows are quantized to 8 bits instead (dx =
 * max|x| / 127): the code is then one signed byte, so one byte dot product per int4 code
 * instead of two (high and low bytes), ~1.6x from 64 rows on; for int8 weights (w4a8's Q8_0
 * head) AVX-512 VNNI multiplies (q + 128) as unsigned bytes by the signed codes, four per
 * vpdpbusd, and takes 128 S (S = sum of the group's codes, kept in the row's unused low-byte
 * half) from the exact sum; other builds multiply the same codes as 16-bit values. Then
 *
 *     y[m, n] = sum over groups g of  (d[n, g] * dx[m, g]) * sum_j q[n, j] qx[m, j]
 *                                    (+ c[n, g] * sx[m, g] for int4)
 *
 * The inner sum is an exact int32 (at most 32 * 128 * 32767), the same whatever instructions
 * compute it: for int4, qx = 256 xh + xl (xh signed, xl unsigned bytes) and two byte dot
 * products (vpdpbusd, or vpmaddubsw + vpmaddwd: pairs stay within int16), so the codes are
 * never widened; for int8, vpdpwssd or vpmaddwd over codes widened to 16 bits; or scalar
 * code. The sum over groups is one or two fused
 * multiply-adds per group, in group order, in every path. So a row's result does not depend
 * on the row count, the tiling, the thread or the build (AVX-512 VNNI, AVX-512, AVX2, scalar):
 * decode rows, speculative verify rows and prompt rows agree bit for bit.
 *
 * torch's `_weight_int4pack_mm_for_cpu` widens each code to a float and multiplies by the
 * bf16 activation: about 15 GB/s of weights at one row here, and its cost grows with every
 * row.
 *
 * int4 layout (native.pack_int4_weight): blocks of 16 output rows; per block and group, 320
 * bytes: 256 of codes, then d[16] and c[16] as float16. Codes in 4 chunks of 64 bytes; chunk t
 * byte 4j + i = q[row j, 8t + i] | q[row j, 8t + 4 + i] << 4, so one load gives, per 32-bit
 * lane (an output row), 4 codes for k = 8t..8t+3 (low nibbles) and 4 for 8t+4..8t+7.
 * int8 layout (native.pack_int8_weight): per block and group, 544 bytes: 16 chunks of 32 bytes
 * (chunk t byte 2j + e = q[row j, 2t + e]), then d[16] as float16. Two more int8 forms add 32
 * bytes (576): with QM_HALF (GGUF Q6_K: a scale per 16 values) d[16] is the group's first 16
 * values' scales and d2[16] follows for the second 16, whose integer sums are kept apart:
 * y += (d dx) S_lo + (d2 dx) S_hi, two fused multiply-adds in that order; with QM_ZERO (Q5_1,
 * Q5_K: w = q d + c) c[16] follows and is added as int4's, c sx; with both (Q2_K: a scale and a
 * zero per 16 values, 640 bytes) d, d2, then c and c2, each half's zero times its own sum of
 * the row's codes (sxl: dx S_lo, dx S_hi).
 */
#include "common.h"
#include "entry_points.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QM_LANES 16
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define QM_LANES 8
#else
#define QM_LANES 1
#endif

#define QG 32 /* values per group */
#define QB 16 /* output rows per block */
#define G4_BYTES (QB * QG / 2 + 2 * QB * 2) /* 320 */
#define G8_BYTES (QB * QG + QB * 2)         /* 544 */
#define QMAX 32767
#define QMAX8 127 /* 8-bit activations (QM_ACT8) */
#define QM_ACT8 16 /* added to bits: int4 weights times activations quantized to 8 bits */
#define QM_HALF 32 /* added to 8 bits: a scale per 16 values (GGUF Q6_K), two per group */
#define QM_ZERO 64 /* added to 8 bits: a zero per group, w = q * d + c (GGUF Q5_1 / Q5_K);
                    * with QM_HALF one per 16 values (GGUF Q2_K) */
#define EXT_HALF 1 /* tile's EXT: the int8 weight's extra per-group values */
#define EXT_ZERO 2
#define MT 4 /* rows of x per tile */
#define NBMAX 4 /* blocks per tile: 4 for one row (8 independent chains), 2 for MT rows */
#define PARALLEL_MACS (1 << 18)

/* Bytes per block of 16 output rows and group of 32: codes, then float16 scales (and the
 * second half's scales or the zeros). */
static inline int64_t group_bytes(const int BITS, const int EXT) {
    /* int8: + the second half's scales (HALF), + the zeros (ZERO), + the second half's zeros */
    return BITS == 4 ? G4_BYTES : G8_BYTES + 2 * QB * (!!(EXT & EXT_HALF) + !!(EXT & EXT_ZERO) +
                                                      (EXT == (EXT_HALF | EXT_ZERO)));
}

/* Vector width of this build's quantized path: 16, 8, or 1 (scalar). */
int64_t int4_lanes(void) { return QM_LANES; }

static inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13)); /* inf, NaN */
    if (e != 0) return bits_f32(sign | ((e + 112) << 23) | (m << 13));
    const float mag = (float)m * 5.9604644775390625e-8f; /* subnormal: m * 2^-24, exact */
    return sign ? -mag : mag; /* (-0.0f + mag would drop the sign) */
}

/* Row of x (K values, float32 or bf16) -> qx[K], dx[G], sx[G]. Rounding by the 1.5 * 2^23
 * trick (to nearest, ties to even) so plain C vectorizes and every build gives the same
 * codes. A NaN or infinite value makes its group's dx non-finite, so the outputs it touches
 * are too. */
static inline __attribute__((always_inline)) void quantize_row_t(
    const void *x, const int dtype, int64_t K, const int A8, int16_t *restrict qx,
    uint8_t *restrict xhl, float *restrict dx, float *restrict sx, float *restrict sxl)
{
    const int32_t qmax = A8 ? QMAX8 : QMAX;
    for (int64_t g = 0; g < K / QG; g++) {
        float v[QG];
        uint32_t top = 0;
        for (int i = 0; i < QG; i++) {
            v[i] = load_elem(x, dtype, g * QG + i);
            const uint32_t a = f32_bits(v[i]) & 0x7fffffffu;
            top = a > top ? a : top; /* integer max: order-free, a NaN wins */
        }
        const float amax = bits_f32(top);
        const float id = amax > 0.0f && top < 0x7f800000u ? (float)qmax / amax : 0.0f;
        int32_t s = 0, s_lo = 0;
        for (int i = 0; i < QG; i++) {
            int32_t q = (int32_t)(f32_bits(v[i] * id + 12582912.0f) - 0x4b400000u);
            q = q > qmax ? qmax : (q < -qmax ? -qmax : q);
            qx[g * QG + i] = (int16_t)q;
            /* xh: signed high byte, xl: unsigned low byte; 8-bit: xh is the code itself */
            xhl[2 * g * QG + i] = (uint8_t)(A8 ? q & 0xff : q >> 8);
            xhl[2 * g * QG + QG + i] = (uint8_t)(A8 ? 0 : q & 0xff);
            s += q;
            s_lo += i < QG / 2 ? q : 0;
        }
        if (A8) { /* S and the first half's S: see tile's int8 x 8-bit */
            memcpy(xhl + 2 * g * QG + QG, &s, sizeof(s));
            memcpy(xhl + 2 * g * QG + QG + 4, &s_lo, sizeof(s_lo));
        }
        dx[g] = amax / (float)qmax;
        sx[g] = dx[g] * (float)s;
        sxl[2 * g] = dx[g] * (float)s_lo; /* QM_HALF | QM_ZERO: each half's zero term */
        sxl[2 * g + 1] = dx[g] * (float)(s - s_lo);
    }
}

#if QM_LANES == 16
/* quantize_row_t on AVX-512: the same integer max, the same float multiply then add of the
 * 1.5 * 2^23 trick (as separate roundings: the _round forms, which GCC never fuses into an
 * FMA), the same clamps, exact integer sums, and the same IEEE divisions and products for the
 * scales, so the same codes, scales and sums. 16 groups at a time: their maxima first, then
 * one vector division each for id and dx (two scalar divisions a group were the loop's
 * longest chain), the codes a group at a time, then sx and sxl as vectors. GCC's code for
 * quantize_row_t kept each group's reductions and stores scalar: ~4% of the 64-request run. */
static inline __attribute__((always_inline)) void quantize_row_16(
    const void *x, const int dtype, int64_t K, const int A8, int16_t *restrict qx,
    uint8_t *restrict xhl, float *restrict dx, float *restrict sx, float *restrict sxl)
{
    const int32_t qmax = A8 ? QMAX8 : QMAX;
    const __m512i mag = _mm512_set1_epi32(0x7fffffff), hiq = _mm512_set1_epi32(qmax);
    const __m512i loq = _mm512_set1_epi32(-qmax), bias = _mm512_set1_epi32(0x4b400000);
    const __m512 magic = _mm512_set1_ps(12582912.0f), qmaxf = _mm512_set1_ps((float)qmax);
    const int64_t G = K / QG;
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int n = G - g0 < 16 ? (int)(G - g0) : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        __m512 v[16][2];
        uint32_t tops[16] = {0};
        for (int i = 0; i < n; i++) {
            const int64_t g = g0 + i;
            if (dtype == BF16) {
                const __m512i h = _mm512_loadu_si512((const uint16_t *)x + g * QG);
                v[i][0] = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
                v[i][1] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
            } else {
                v[i][0] = _mm512_loadu_ps((const float *)x + g * QG);
                v[i][1] = _mm512_loadu_ps((const float *)x + g * QG + 16);
            }
            tops[i] = _mm512_reduce_max_epu32(
                _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(v[i][0]), mag),
                                 _mm512_and_si512(_mm512_castps_si512(v[i][1]), mag)));
        }
        /* id = amax > 0 && finite ? qmax / amax : 0, and dx = amax / qmax, per group */
        const __m512i top = _mm512_loadu_si512(tops);
        const __m512 amax = _mm512_castsi512_ps(top);
        const __mmask16 ok = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ)
            & _mm512_cmplt_epu32_mask(top, _mm512_set1_epi32(0x7f800000));
        const __m512 idv = _mm512_maskz_div_ps(ok, qmaxf, amax);
        const __m512 dxv = _mm512_div_ps(amax, qmaxf);
        float ids[16];
        int32_t sums[16], los[16];
        _mm512_storeu_ps(ids, idv);
        for (int i = 0; i < n; i++) {
            const int64_t g = g0 + i;
            const __m512 vid = _mm512_set1_ps(ids[i]);
            __m512i q[2];
            for (int h = 0; h < 2; h++) {
                const __m512 m = _mm512_mul_round_ps(v[i][h], vid,
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m512 r = _mm512_add_round_ps(m, magic,
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[h] = _mm512_max_epi32(
                    _mm512_min_epi32(_mm512_sub_epi32(_mm512_castps_si512(r), bias), hiq), loq);
                _mm256_storeu_si256((__m256i *)(qx + g * QG + 16 * h), _mm512_cvtepi32_epi16(q[h]));
                /* xh: signed high byte, xl: unsigned low byte; 8-bit: xh is the code itself */
                _mm_storeu_si128((__m128i *)(xhl + 2 * g * QG + 16 * h),
                                 _mm512_cvtepi32_epi8(A8 ? q[h] : _mm512_srai_epi32(q[h], 8)));
                _mm_storeu_si128((__m128i *)(xhl + 2 * g * QG + QG + 16 * h),
                                 A8 ? _mm_setzero_si128() : _mm512_cvtepi32_epi8(q[h]));
            }
            los[i] = _mm512_reduce_add_epi32(q[0]);
            sums[i] = los[i] + _mm512_reduce_add_epi32(q[1]);
            if (A8) { /* S and the first half's S: see tile's int8 x 8-bit */
                memcpy(xhl + 2 * g * QG + QG, &sums[i], sizeof(sums[i]));
                memcpy(xhl + 2 * g * QG + QG + 4, &los[i], sizeof(los[i]));
            }
        }
        /* dx, sx = dx S, and per half dx S_lo, dx (S - S_lo) (QM_HALF | QM_ZERO's zero terms) */
        const __m512i sv = _mm512_maskz_loadu_epi32(live, sums), lv = _mm512_maskz_loadu_epi32(live, los);
        const __m512 sxv = _mm512_mul_ps(dxv, _mm512_cvtepi32_ps(sv));
        const __m512 a = _mm512_mul_ps(dxv, _mm512_cvtepi32_ps(lv));
        const __m512 b = _mm512_mul_ps(dxv, _mm512_cvtepi32_ps(_mm512_sub_epi32(sv, lv)));
        _mm512_mask_storeu_ps(dx + g0, live, dxv);
        _mm512_mask_storeu_ps(sx + g0, live, sxv);
        const __m512 i0 = _mm512_permutex2var_ps(
            a, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), b);
        const __m512 i1 = _mm512_permutex2var_ps(
            a, _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8), b);
        const __mmask16 live0 = (__mmask16)(n >= 8 ? 0xffffu : (1u << (2 * n)) - 1);
        const __mmask16 live1 = (__mmask16)(n <= 8 ? 0u : n == 16 ? 0xffffu : (1u << (2 * (n - 8))) - 1);
        _mm512_mask_storeu_ps(sxl + 2 * g0, live0, i0);
        _mm512_mask_storeu_ps(sxl + 2 * g0 + 16, live1, i1);
    }
}
#define QUANTIZE_ROW quantize_row_16
#else
#define QUANTIZE_ROW quantize_row_t
#endif

/* quantize_row_t (quantize_row_16 on AVX-512) with the dtype and the code width as constants,
 * so its loops vectorize (the same integer and float operations, so the same codes). */
static void quantize_row(const void *x, int dtype, int64_t K, int A8, int16_t *restrict qx,
                         uint8_t *restrict xhl, float *restrict dx, float *restrict sx,
                         float *restrict sxl)
{
    if (dtype == BF16) {
        if (A8) QUANTIZE_ROW(x, BF16, K, 1, qx, xhl, dx, sx, sxl);
        else QUANTIZE_ROW(x, BF16, K, 0, qx, xhl, dx, sx, sxl);
    } else {
        if (A8) QUANTIZE_ROW(x, F32, K, 1, qx, xhl, dx, sx, sxl);
        else QUANTIZE_ROW(x, F32, K, 0, qx, xhl, dx, sx, sxl);
    }
}

/* Row m's outputs n0 .. n0 + 15 from v, those below n_end (N): a last block of a weight
 * whose N is not a multiple of 16 holds padding rows, computed and never stored. */
static inline void store_row(void *y, int dtype, int64_t y_stride, int64_t n_end, int64_t m,
                             int64_t n0, const float *v)
{
    if (n0 + QB > n_end) { /* the last, partial block */
        for (int64_t j = 0; n0 + j < n_end; j++) store_elem(y, dtype, m * y_stride + n0 + j, v[j]);
        return;
    }
    if (dtype == F32) {
        memcpy((float *)y + m * y_stride + n0, v, sizeof(float) * QB);
        return;
    }
    if (dtype == BF16) { /* one vectorized loop (f32_to_bf16 is branch-free) */
        uint16_t *o = (uint16_t *)y + m * y_stride + n0;
        for (int j = 0; j < QB; j++) o[j] = f32_to_bf16(v[j]);
        return;
    }
    for (int j = 0; j < QB; j++) store_elem(y, dtype, m * y_stride + n0 + j, v[j]);
}

static inline int32_t quad_at(const uint8_t *p) {
    int32_t a;
    memcpy(&a, p, 4);
    return a;
}

static inline int32_t pair_at(const int16_t *p) {
    int32_t a;
    memcpy(&a, p, 4);
    return a;
}

#if QM_LANES == 16
/* acc + sums of 4 products of unsigned bytes of u and signed bytes of v (each pair's sum
 * within int16: callers keep |u v| <= 2 * 255 * 15). */
static inline __m512i dot4(__m512i acc, __m512i u, __m512i v) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, v);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, v),
                                                   _mm512_set1_epi16(1)));
#endif
}

static inline __m512i dot2(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

/* Rows [m0, m0 + R) of the output x blocks [b0, b0 + NB) (16 output rows each); BITS 4 or 8. */
static inline __attribute__((always_inline)) void tile(
    const int BITS, const int A8, const int EXT, const int16_t *qx, const uint8_t *xhl, const float *dx, const float *sx, const float *sxl, int64_t K,
    const uint8_t *w, int64_t b0, void *y, int ydt, int64_t y_stride, int64_t n_end, int64_t m0, const int R,
    const int NB)
{
    const int64_t G = K / QG, GB = group_bytes(BITS, EXT);
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[MT][NBMAX];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i is[MT][NBMAX], ih[MT][NBMAX]; /* ih: EXT_HALF's second half */
        int lo_done = 0; /* EXT_HALF: the first half's FMA was made in the loop */
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) is[r][b] = ih[r][b] = _mm512_setzero_si512();
        const int16_t *xg = qx + m0 * K + g * QG;
        if (BITS == 4) { /* qx = 256 xh + xl: two byte dot products per code, two chains */
            const uint8_t *hl = xhl + 2 * (m0 * K + g * QG);
            __m512i il[MT][NBMAX];
            for (int r = 0; r < R; r++)
                for (int b = 0; b < NB; b++) il[r][b] = _mm512_setzero_si512();
            for (int t = 0; t < 4; t++) {
                __m512i lo[NBMAX], hi[NBMAX];
                for (int b = 0; b < NB; b++) {
                    const __m512i v = _mm512_loadu_si512(w + ((b0 + b) * G + g) * GB + 64 * t);
                    lo[b] = _mm512_and_si512(v, low);
                    hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                for (int r = 0; r < R; r++) {
                    const uint8_t *xr = hl + 2 * r * K + 8 * t;
                    const __m512i ha = _mm512_set1_epi32(quad_at(xr));
                    const __m512i hc = _mm512_set1_epi32(quad_at(xr + 4));
                    if (A8) { /* the 8-bit code is all of x: no low bytes; the high nibbles'
                               * products in il, so two chains of four (exact int32 sums) */
                        for (int b = 0; b < NB; b++) {
                            is[r][b] = dot4(is[r][b], lo[b], ha);
                            il[r][b] = dot4(il[r][b], hi[b], hc);
                        }
                        continue;
                    }
                    for (int b = 0; b < NB; b++) {
                        is[r][b] = dot4(is[r][b], lo[b], ha); /* codes unsigned, xh signed */
                        is[r][b] = dot4(is[r][b], hi[b], hc);
                    }
                    const __m512i la = _mm512_set1_epi32(quad_at(xr + QG));
                    const __m512i lc = _mm512_set1_epi32(quad_at(xr + QG + 4));
                    for (int b = 0; b < NB; b++) {
                        il[r][b] = dot4(il[r][b], la, lo[b]); /* xl unsigned, codes signed */
                        il[r][b] = dot4(il[r][b], lc, hi[b]);
                    }
                }
            }
            for (int r = 0; r < R; r++)
                for (int b = 0; b < NB; b++)
                    is[r][b] = A8 ? _mm512_add_epi32(is[r][b], il[r][b])
                                  : _mm512_add_epi32(_mm512_slli_epi32(is[r][b], 8), il[r][b]);
        }
#ifdef __AVX512VNNI__
        else if (A8) { /* int8 x 8-bit: (q + 128) unsigned times the signed code, minus 128 S */
            const __m512i quads = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                                   25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                                   18, 2, 17, 1, 16, 0);
            const __m512i bias = _mm512_set1_epi8((char)0x80);
            const uint8_t *hl = xhl + 2 * (m0 * K + g * QG);
            /* odd u's products: two chains of four (exact int32 sums); EXT_HALF: the second
             * half's (u >= 4), kept apart for its own scale */
            __m512i io[MT][NBMAX];
            for (int r = 0; r < R; r++)
                for (int b = 0; b < NB; b++) io[r][b] = _mm512_setzero_si512();
            for (int u = 0; u < 8; u++) { /* k = 4u .. 4u + 3: chunks 2u and 2u + 1 */
                __m512i wq[NBMAX];
                for (int b = 0; b < NB; b++) {
                    const __m512i v = _mm512_loadu_si512(w + ((b0 + b) * G + g) * GB + 64 * u);
                    /* lane j: row j's pair from chunk 2u, then its pair from chunk 2u + 1 */
                    wq[b] = _mm512_xor_si512(_mm512_permutexvar_epi16(quads, v), bias);
                }
                for (int r = 0; r < R; r++) {
                    const __m512i xa = _mm512_set1_epi32(quad_at(hl + 2 * r * K + 4 * u));
                    if (EXT & EXT_HALF ? u >= 4 : (u & 1))
                        for (int b = 0; b < NB; b++) io[r][b] = dot4(io[r][b], wq[b], xa);
                    else
                        for (int b = 0; b < NB; b++) is[r][b] = dot4(is[r][b], wq[b], xa);
                }
            }
            for (int r = 0; r < R; r++) {
                int32_t sum, lo_sum;
                memcpy(&sum, hl + 2 * r * K + QG, sizeof(sum));
                memcpy(&lo_sum, hl + 2 * r * K + QG + 4, sizeof(lo_sum));
                if (EXT & EXT_HALF) {
                    const __m512i fix = _mm512_set1_epi32(lo_sum * 128);
                    const __m512i fix2 = _mm512_set1_epi32((sum - lo_sum) * 128);
                    for (int b = 0; b < NB; b++) {
                        ih[r][b] = _mm512_sub_epi32(io[r][b], fix2);
                        is[r][b] = _mm512_sub_epi32(is[r][b], fix);
                    }
                    continue;
                }
                const __m512i fix = _mm512_set1_epi32(sum * 128);
                for (int b = 0; b < NB; b++)
                    is[r][b] = _mm512_sub_epi32(_mm512_add_epi32(is[r][b], io[r][b]), fix);
            }
        }
#endif
        else { /* int8: codes widened to 16 bits (with QM_ACT8 the 8-bit codes, as int16) */
            for (int t = 0; t < 8; t++) {
                if ((EXT & EXT_HALF) && t == 4) { /* the first half's FMA now (the same order
                                                  * as the VNNI path's), is reused */
                    for (int b = 0; b < NB; b++) {
                        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(
                            (const __m256i *)(w + ((b0 + b) * G + g) * GB + 512)));
                        for (int r = 0; r < R; r++) {
                            acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r][b]),
                                _mm512_mul_ps(d, _mm512_set1_ps(dx[(m0 + r) * G + g])), acc[r][b]);
                            is[r][b] = _mm512_setzero_si512();
                        }
                    }
                    lo_done = 1;
                }
                __m512i wv[NBMAX][2];
                for (int b = 0; b < NB; b++) {
                    const __m512i v = _mm512_loadu_si512(w + ((b0 + b) * G + g) * GB + 64 * t);
                    wv[b][0] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(v));
                    wv[b][1] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1));
                }
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 2; i++) {
                        const __m512i xp = _mm512_set1_epi32(pair_at(xg + r * K + 4 * t + 2 * i));
                        for (int b = 0; b < NB; b++) is[r][b] = dot2(is[r][b], wv[b][i], xp);
                    }
            }
            if (EXT & EXT_HALF)
                for (int r = 0; r < R; r++)
                    for (int b = 0; b < NB; b++) ih[r][b] = is[r][b];
        }
        for (int b = 0; b < NB; b++) {
            const uint8_t *s = w + ((b0 + b) * G + g) * GB + (BITS == 4 ? 256 : 512);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
            for (int r = 0; r < R; r++) {
                const int64_t i = (m0 + r) * G + g;
                const __m512 dd = _mm512_mul_ps(d, _mm512_set1_ps(dx[i]));
                if (!lo_done) acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r][b]), dd, acc[r][b]);
                if (BITS == 8 && (EXT & EXT_HALF)) {
                    const __m512 d2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32)));
                    acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih[r][b]),
                                                _mm512_mul_ps(d2, _mm512_set1_ps(dx[i])), acc[r][b]);
                }
                if (BITS == 8 && EXT == (EXT_HALF | EXT_ZERO)) { /* each half's zero */
                    const __m512 c = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 64)));
                    const __m512 c2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 96)));
                    acc[r][b] = _mm512_fmadd_ps(c, _mm512_set1_ps(sxl[2 * i]), acc[r][b]);
                    acc[r][b] = _mm512_fmadd_ps(c2, _mm512_set1_ps(sxl[2 * i + 1]), acc[r][b]);
                } else if (BITS == 4 || (EXT & EXT_ZERO)) {
                    const __m512 c = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32)));
                    acc[r][b] = _mm512_fmadd_ps(c, _mm512_set1_ps(sx[i]), acc[r][b]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            const int64_t n0 = (b0 + b) * QB, at = (m0 + r) * y_stride + n0;
            if (n0 + QB <= n_end && ydt == BF16) { /* whole block: f32_to_bf16 on 16 lanes */
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), bf16x16(acc[r][b]));
                continue;
            }
            if (n0 + QB <= n_end && ydt == F32) {
                _mm512_storeu_ps((float *)y + at, acc[r][b]);
                continue;
            }
            float out[QB];
            _mm512_storeu_ps(out, acc[r][b]);
            store_row(y, ydt, y_stride, n_end, m0 + r, n0, out);
        }
}

#elif QM_LANES == 8
/* The same over the two 8-row halves of each block. */
static inline __attribute__((always_inline)) void tile(
    const int BITS, const int A8, const int EXT, const int16_t *qx, const uint8_t *xhl, const float *dx, const float *sx, const float *sxl, int64_t K,
    const uint8_t *w, int64_t b0, void *y, int ydt, int64_t y_stride, int64_t n_end, int64_t m0, const int R,
    const int NB)
{
    const int64_t G = K / QG, GB = group_bytes(BITS, EXT);
    for (int b = 0; b < NB; b++) {
        __m256 acc[MT][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *blk = w + ((b0 + b) * G + g) * GB;
            const int16_t *xg = qx + m0 * K + g * QG;
            __m256i is[MT][2], ih[MT][2]; /* ih: EXT_HALF's second half */
            for (int r = 0; r < R; r++) is[r][0] = is[r][1] = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {
                if (BITS == 4) { /* rows 8h..8h+7: bytes 32h..32h+31 of each chunk */
                    const uint8_t *hl = xhl + 2 * (m0 * K + g * QG);
                    const __m256i one = _mm256_set1_epi16(1), low8 = _mm256_set1_epi8(0x0f);
                    for (int pass = 0; pass < (A8 ? 1 : 2); pass++) {
                        for (int t = 0; t < 4; t++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * t + 32 * h));
                            const __m256i lo = _mm256_and_si256(v, low8);
                            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low8);
                            for (int r = 0; r < R; r++) {
                                const uint8_t *xr = hl + 2 * r * K + pass * QG + 8 * t;
                                const __m256i xa = _mm256_set1_epi32(quad_at(xr));
                                const __m256i xc = _mm256_set1_epi32(quad_at(xr + 4));
                                const __m256i p = pass == 0
                                    ? _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xc))
                                    : _mm256_add_epi16(_mm256_maddubs_epi16(xa, lo), _mm256_maddubs_epi16(xc, hi));
                                is[r][h] = _mm256_add_epi32(is[r][h], _mm256_madd_epi16(p, one));
                            }
                        }
                        if (pass == 0 && !A8)
                            for (int r = 0; r < R; r++) is[r][h] = _mm256_slli_epi32(is[r][h], 8);
                    }
                } else {
                    for (int t = 0; t < 16; t++) {
                        if ((EXT & EXT_HALF) && t == 8) { /* the first half's FMA now (the
                                                          * same order as the epilogue's) */
                            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 512 + 16 * h)));
                            for (int r = 0; r < R; r++) {
                                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r][h]),
                                    _mm256_mul_ps(d, _mm256_set1_ps(dx[(m0 + r) * G + g])), acc[r][h]);
                                is[r][h] = _mm256_setzero_si256();
                            }
                        }
                        const __m256i wv = _mm256_cvtepi8_epi16(
                            _mm_loadu_si128((const __m128i *)(blk + 32 * t + 16 * h)));
                        for (int r = 0; r < R; r++)
                            is[r][h] = _mm256_add_epi32(is[r][h], _mm256_madd_epi16(
                                wv, _mm256_set1_epi32(pair_at(xg + r * K + 2 * t))));
                    }
                    if (EXT & EXT_HALF)
                        for (int r = 0; r < R; r++) ih[r][h] = is[r][h];
                }
            }
            const uint8_t *s = blk + (BITS == 4 ? 256 : 512);
            for (int h = 0; h < 2; h++) {
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 16 * h)));
                for (int r = 0; r < R; r++) {
                    const int64_t i = (m0 + r) * G + g;
                    if (!(BITS == 8 && (EXT & EXT_HALF))) /* (HALF's first FMA: in the loop) */
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r][h]),
                                                    _mm256_mul_ps(d, _mm256_set1_ps(dx[i])), acc[r][h]);
                    if (BITS == 8 && (EXT & EXT_HALF)) {
                        const __m256 d2 = _mm256_cvtph_ps(
                            _mm_loadu_si128((const __m128i *)(s + 32 + 16 * h)));
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ih[r][h]),
                                                    _mm256_mul_ps(d2, _mm256_set1_ps(dx[i])), acc[r][h]);
                    }
                    if (BITS == 8 && EXT == (EXT_HALF | EXT_ZERO)) { /* each half's zero */
                        const __m256 c = _mm256_cvtph_ps(
                            _mm_loadu_si128((const __m128i *)(s + 64 + 16 * h)));
                        const __m256 c2 = _mm256_cvtph_ps(
                            _mm_loadu_si128((const __m128i *)(s + 96 + 16 * h)));
                        acc[r][h] = _mm256_fmadd_ps(c, _mm256_set1_ps(sxl[2 * i]), acc[r][h]);
                        acc[r][h] = _mm256_fmadd_ps(c2, _mm256_set1_ps(sxl[2 * i + 1]), acc[r][h]);
                    } else if (BITS == 4 || (EXT & EXT_ZERO)) {
                        const __m256 c = _mm256_cvtph_ps(
                            _mm_loadu_si128((const __m128i *)(s + 32 + 16 * h)));
                        acc[r][h] = _mm256_fmadd_ps(c, _mm256_set1_ps(sx[i]), acc[r][h]);
                    }
                }
            }
        }
        for (int r = 0; r < R; r++) {
            const int64_t n0 = (b0 + b) * QB, at = (m0 + r) * y_stride + n0;
            if (n0 + QB <= n_end && ydt == BF16) { /* whole block: f32_to_bf16 on 8 lanes */
                _mm_storeu_si128((__m128i *)((uint16_t *)y + at), bf16x8(acc[r][0]));
                _mm_storeu_si128((__m128i *)((uint16_t *)y + at + 8), bf16x8(acc[r][1]));
                continue;
            }
            if (n0 + QB <= n_end && ydt == F32) {
                _mm256_storeu_ps((float *)y + at, acc[r][0]);
                _mm256_storeu_ps((float *)y + at + 8, acc[r][1]);
                continue;
            }
            float out[QB];
            _mm256_storeu_ps(out, acc[r][0]);
            _mm256_storeu_ps(out + 8, acc[r][1]);
            store_row(y, ydt, y_stride, n_end, m0 + r, n0, out);
        }
    }
}

#else
/* Scalar: the same integer sums and the same fused multiply-adds per group. */
static void tile(const int BITS, const int A8, const int EXT, const int16_t *qx, const uint8_t *xhl, const float *dx, const float *sx, const float *sxl, int64_t K,
                 const uint8_t *w, int64_t b0, void *y, int ydt, int64_t y_stride, int64_t n_end, int64_t m0,
                 const int R, const int NB)
{
    const int64_t G = K / QG, GB = group_bytes(BITS, EXT);
    for (int b = 0; b < NB; b++)
        for (int r = 0; r < R; r++) {
            float out[QB];
            for (int j = 0; j < QB; j++) {
                float acc = 0.0f;
                for (int64_t g = 0; g < G; g++) {
                    const uint8_t *blk = w + ((b0 + b) * G + g) * GB;
                    const int16_t *xr = qx + (m0 + r) * K + g * QG;
                    int32_t is = 0, ih = 0; /* ih: EXT_HALF's second half */
                    if (BITS == 4) {
                        for (int t = 0; t < 4; t++)
                            for (int i = 0; i < 4; i++) {
                                const uint8_t byte = blk[64 * t + 4 * j + i];
                                is += (byte & 15) * xr[8 * t + i] + (byte >> 4) * xr[8 * t + 4 + i];
                            }
                    } else {
                        for (int t = 0; t < 16; t++)
                            for (int e = 0; e < 2; e++) {
                                const int32_t p = (int8_t)blk[32 * t + 2 * j + e] * xr[2 * t + e];
                                if ((EXT & EXT_HALF) && t >= 8) ih += p;
                                else is += p;
                            }
                    }
                    const uint8_t *s = blk + (BITS == 4 ? 256 : 512);
                    uint16_t dh;
                    memcpy(&dh, s + 2 * j, 2);
                    const int64_t i = (m0 + r) * G + g;
                    acc = fmaf((float)is, half_to_f32(dh) * dx[i], acc);
                    if (BITS == 8 && (EXT & EXT_HALF)) {
                        uint16_t dh2;
                        memcpy(&dh2, s + 32 + 2 * j, 2);
                        acc = fmaf((float)ih, half_to_f32(dh2) * dx[i], acc);
                    }
                    if (BITS == 8 && EXT == (EXT_HALF | EXT_ZERO)) { /* each half's zero */
                        uint16_t ch, ch2;
                        memcpy(&ch, s + 64 + 2 * j, 2);
                        memcpy(&ch2, s + 96 + 2 * j, 2);
                        acc = fmaf(half_to_f32(ch), sxl[2 * i], acc);
                        acc = fmaf(half_to_f32(ch2), sxl[2 * i + 1], acc);
                    } else if (BITS == 4 || (EXT & EXT_ZERO)) {
                        uint16_t ch;
                        memcpy(&ch, s + 32 + 2 * j, 2);
                        acc = fmaf(half_to_f32(ch), sx[i], acc);
                    }
                }
                out[j] = acc;
            }
            store_row(y, ydt, y_stride, n_end, m0 + r, (b0 + b) * QB, out);
        }
}
#endif

/* Rows [m_lo, m_hi) x blocks [b_lo, b_hi): tiles of MT rows x 2 blocks (constants inlined). */
static inline __attribute__((always_inline)) void rows_blocks(
    const int BITS, const int A8, const int EXT, const int16_t *qx, const uint8_t *xhl, const float *dx, const float *sx, const float *sxl, int64_t K,
    const uint8_t *w, void *y, int ydt, int64_t y_stride, int64_t n_end, int64_t m_lo, int64_t m_hi,
    int64_t b_lo, int64_t b_hi)
{
    for (int64_t b = b_lo; b < b_hi; b += NBMAX) {
        const int64_t nb = b + NBMAX <= b_hi ? NBMAX : b_hi - b;
        int64_t m = m_lo;
        for (; m + MT <= m_hi; m += MT)
            for (int64_t c = b; c < b + nb; c += 2) {
                if (c + 2 <= b + nb) tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, c, y, ydt, y_stride, n_end, m, MT, 2);
                else tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, c, y, ydt, y_stride, n_end, m, MT, 1);
            }
        for (; m < m_hi; m++) {
            if (nb == 4) tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, b, y, ydt, y_stride, n_end, m, 1, 4);
            else if (nb == 3) tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, b, y, ydt, y_stride, n_end, m, 1, 3);
            else if (nb == 2) tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, b, y, ydt, y_stride, n_end, m, 1, 2);
            else tile(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, b, y, ydt, y_stride, n_end, m, 1, 1);
        }
    }
}

/* rows_blocks with its format as constants: one function per served format, so each
 * inlines its own tile loops. */
#define ROWS_BLOCKS(NAME, BITS, A8, EXT)                                                        \
    static void NAME(const int16_t *qx, const uint8_t *xhl, const float *dx, const float *sx,   \
                     const float *sxl, int64_t K, const uint8_t *w, void *y, int ydt,           \
                     int64_t y_stride,                                                          \
                     int64_t n_end, int64_t m_lo, int64_t m_hi, int64_t b_lo, int64_t b_hi)     \
    {                                                                                           \
        rows_blocks(BITS, A8, EXT, qx, xhl, dx, sx, sxl, K, w, y, ydt, y_stride, n_end, m_lo,   \
                    m_hi, b_lo, b_hi);                                                          \
    }
ROWS_BLOCKS(rows_blocks4, 4, 0, 0)
ROWS_BLOCKS(rows_blocks4a8, 4, 1, 0)
ROWS_BLOCKS(rows_blocks8, 8, 0, 0)
ROWS_BLOCKS(rows_blocks8a8, 8, 1, 0)
ROWS_BLOCKS(rows_blocks8h, 8, 0, EXT_HALF)
ROWS_BLOCKS(rows_blocks8ha8, 8, 1, EXT_HALF)
ROWS_BLOCKS(rows_blocks8z, 8, 0, EXT_ZERO)
ROWS_BLOCKS(rows_blocks8za8, 8, 1, EXT_ZERO)
ROWS_BLOCKS(rows_blocks8hz, 8, 0, EXT_HALF | EXT_ZERO)
ROWS_BLOCKS(rows_blocks8hza8, 8, 1, EXT_HALF | EXT_ZERO)

typedef void (*rows_blocks_fn)(const int16_t *, const uint8_t *, const float *, const float *,
                               const float *, int64_t, const uint8_t *, void *, int, int64_t,
                               int64_t, int64_t, int64_t, int64_t, int64_t);

#define ROW_CHUNK 64 /* rows of x per work item */

enum { PRO_NONE = 0, PRO_RMS_NORM = 1, PRO_SILU_MUL = 2, PRO_GELU_TANH_MUL = 3 };

struct prologue {
    int kind;
    const void *residual; int64_t r_stride; /* PRO_RMS_NORM: rms_norm's operands */
    const void *norm_w; float eps; void *res_out;
};

/* act(gate) * up of one row [gate | up] (K each) into buf, the dtype and the activation
 * constants so the loop vectorizes. */
static inline __attribute__((always_inline)) void act_mul_row(
    const void *xr, const int xdt, const int silu, int64_t K, float *restrict buf)
{
    for (int64_t i = 0; i < K; i++) {
        const float g = load_elem(xr, xdt, i), u = load_elem(xr, xdt, K + i);
        const float a = round_to(silu ? silu_fast(g) : gelu_tanh_fast(g), xdt);
        buf[i] = round_to(a * u, xdt);
    }
}

/* Row m of the projection's input, computed by the prologue into `buf` (2K floats): the
 * values rms_norm or silu/gelu_tanh_and_mul would have written, in the same dtype. */
static const void *prologue_row(const struct prologue *p, const void *x, int xdt, int64_t m,
                                int64_t K, int64_t x_stride, float *buf, int *dt)
{
    const size_t esz = xdt == BF16 ? 2 : 4;
    const char *xr = (const char *)x + (size_t)(m * x_stride) * esz;
    *dt = xdt;
    if (p->kind == PRO_NONE) return xr;
    if (p->kind == PRO_RMS_NORM) {
        void *o = buf + K;
        rms_norm_row(xr, p->residual != NULL ? (const char *)p->residual + (size_t)(m * p->r_stride) * esz : NULL,
                     xdt, K, p->norm_w, p->eps, buf, o,
                     p->residual != NULL ? (char *)p->res_out + (size_t)(m * K) * esz : NULL);
        return o;
    }
    *dt = F32; /* [gate | up] -> act(gate) * up, each product rounded as the tensors would be */
    const int silu = p->kind == PRO_SILU_MUL;
    if (xdt == BF16 && silu) act_mul_row(xr, BF16, 1, K, buf);
    else if (xdt == BF16) act_mul_row(xr, BF16, 0, K, buf);
    else if (silu) act_mul_row(xr, F32, 1, K, buf);
    else act_mul_row(xr, F32, 0, K, buf);
    return buf;
}

static int64_t quant_matmul(int bits, const void *x, int xdt, int64_t M, int64_t K,
                            int64_t x_stride, const struct prologue *pro, const uint8_t *w,
                            int64_t N, void *y, int ydt, int64_t y_stride, int num_threads)
{
    const int A8 = (bits & QM_ACT8) != 0;
    const int ext = (bits & QM_HALF ? EXT_HALF : 0) | (bits & QM_ZERO ? EXT_ZERO : 0);
    bits &= ~(QM_ACT8 | QM_HALF | QM_ZERO);
    static const rows_blocks_fn fns[2][5] = {
        {rows_blocks4, rows_blocks8, rows_blocks8h, rows_blocks8z, rows_blocks8hz},
        {rows_blocks4a8, rows_blocks8a8, rows_blocks8ha8, rows_blocks8za8, rows_blocks8hza8}};
    const rows_blocks_fn run = fns[A8][bits == 4 ? 0 : 1 + ext];
    const int64_t G = K / QG, NBLK = (N + QB - 1) / QB; /* the last block may be partial */
    if (M == 0) return 0;
    void *buf = malloc(4 * (size_t)(M * K) + sizeof(float) * 4 * (size_t)(M * G));
    if (buf == NULL) return -1;
    float *dx = (float *)buf, *sx = dx + M * G, *sxl = sx + M * G; /* sxl: each half's sx */
    int16_t *qx = (int16_t *)(sxl + 2 * M * G);
    uint8_t *xhl = (uint8_t *)(qx + M * K); /* per row and group: 32 high bytes, 32 low */
    const int threads = M * N * K >= PARALLEL_MACS && num_threads > 1 ? num_threads : 1;
    /* blocks per work item: an even share, a few items per thread */
    int64_t chunk = (NBLK + 4 * threads - 1) / (4 * threads);
    chunk = chunk < 2 ? 2 : (chunk + 1) / 2 * 2;
    const int64_t bchunks = (NBLK + chunk - 1) / chunk, mchunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *row = pro->kind == PRO_NONE ? NULL : scratch((size_t)(2 * K));
#pragma omp for schedule(static) reduction(| : failed)
        for (int64_t m = 0; m < M; m++) {
            if (pro->kind != PRO_NONE && row == NULL) { failed = 1; continue; }
            int dt;
            const void *in = prologue_row(pro, x, xdt, m, K, x_stride, row, &dt);
            quantize_row(in, dt, K, A8, qx + m * K, xhl + 2 * m * K, dx + m * G, sx + m * G,
                         sxl + 2 * m * G);
        }
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < bchunks * mchunks; item++) {
                const int64_t bc = item % bchunks, mc = item / bchunks;
                const int64_t b_lo = bc * chunk, b_hi = b_lo + chunk < NBLK ? b_lo + chunk : NBLK;
                const int64_t m_lo = mc * ROW_CHUNK;
                const int64_t m_hi = m_lo + ROW_CHUNK < M ? m_lo + ROW_CHUNK : M;
                run(qx, xhl, dx, sx, sxl, K, w, y, ydt, y_stride, N, m_lo, m_hi, b_lo, b_hi);
            }
        }
    }
    free(buf);
    return failed ? -1 : 0;
}

/* y [M, N] (float32 or bf16, rows y_stride apart) = f(x) @ W^T, W packed as above (bits 4 or
 * 8); K a multiple of 32; N any (the packed weight padded to whole blocks of 16). f: the identity (x [M, K], rows x_stride apart); rms_norm
 * with its residual add (residual rows r_stride apart, x + residual written to res_out
 * [M, K]; no residual: x alone is normed); or silu / gelu_tanh(gate) * up of x = [gate | up]
 * [M, 2K]. 0, or -1 when scratch could not be had. */
int64_t quant_matmul_fused(int bits, const void *x, int xdt, int64_t M, int64_t K,
                           int64_t x_stride, int kind, const void *residual, int64_t r_stride,
                           const void *norm_w, float eps, void *res_out, const uint8_t *w,
                           int64_t N, void *y, int ydt, int64_t y_stride, int num_threads)
{
    const struct prologue pro = {kind, residual, r_stride, norm_w, eps, res_out};
    return quant_matmul(bits, x, xdt, M, K, x_stride, &pro, w, N, y, ydt, y_stride, num_threads);
}

/* ------------------------------------------------------------------ a whole decode layer
 * A pre-norm layer (Llama shape: x += attn(norm(x)); x += mlp(norm(x))) for a step of decode
 * rows, with quantized projections, in one call: the same kernels in the same order as the
 * separate calls (quant_matmul with its norm / activation prologues, rotary_store_kv,
 * paged_decode_attention), so the same bits; what it saves is the ~6 Python calls per layer
 * (~10 us each against ~100 us of kernels for a small model's layer at one row). Non-zero
 * return: nothing was reported (the caller reruns the layer through the separate calls,
 * which raise the precise error; the rerun rewrites the same K/V). */

struct decode_layer_args { /* native.DecodeLayerArgs mirrors it field for field */
    int64_t M, H, I, NH, NKV, D, rot;
    int64_t dtype, kv_dtype, threads, act;
    int64_t bits_qkv, bits_o, bits_gu, bits_down;
    const uint8_t *w_qkv, *w_o, *w_gu, *w_down;
    const void *norm1, *norm2;
    double eps1, eps2;
    const int64_t *positions;
    const float *table;
    int64_t table_stride, max_pos;
    const void *q_norm, *k_norm;
    double qk_eps;
    void *k_cache, *v_cache;
    int64_t stride_block, stride_token, stride_head, num_blocks, block_size;
    const int64_t *slots;
    const int32_t *block_tables;
    int64_t table_row_stride, max_blocks;
    const int32_t *context_lens;
    double scale, soft_cap;
    int64_t window;
    const void *x, *residual; /* residual NULL: the first layer (x is the residual) */
    void *out, *res_out;
};

int64_t decode_layer(const struct decode_layer_args *a)
{
    const int64_t M = a->M, H = a->H, I = a->I, Q = a->NH * a->D, KV = a->NKV * a->D;
    const int64_t NQKV = Q + 2 * KV;
    const int dt = (int)a->dtype, th = (int)a->threads;
    const size_t esz = dt == BF16 ? 2 : 4;
    char *buf = malloc(esz * (size_t)(M * (NQKV + 2 * Q + 2 * H + 2 * I)));
    if (buf == NULL) return -1;
    char *qkv = buf, *q_out = qkv + esz * (size_t)(M * NQKV), *attn = q_out + esz * (size_t)(M * Q);
    char *o = attn + esz * (size_t)(M * Q), *res1 = o + esz * (size_t)(M * H);
    char *gu = res1 + esz * (size_t)(M * H);
    int64_t rc;
    const struct prologue norm1 = {PRO_RMS_NORM, a->residual, H, a->norm1, (float)a->eps1, res1};
    rc = quant_matmul((int)a->bits_qkv, a->x, dt, M, H, H, &norm1, a->w_qkv, NQKV, qkv, dt, NQKV, th);
    if (rc == 0)
        rc = rotary_store_kv(qkv, qkv + esz * (size_t)Q, qkv + esz * (size_t)(Q + KV), dt,
                             NQKV, a->D, NQKV, a->D, NQKV, a->D, M, a->NH, a->NKV, a->D, a->rot,
                             a->positions, a->table, a->table_stride, a->max_pos, a->q_norm,
                             a->k_norm, (float)a->qk_eps, q_out, a->k_cache, a->v_cache,
                             (int)a->kv_dtype, a->stride_block, a->stride_token, a->stride_head,
                             a->num_blocks, a->block_size, a->slots, th);
    if (rc == 0)
        rc = paged_decode_attention(q_out, dt, Q, a->D, a->k_cache, a->v_cache, (int)a->kv_dtype,
                                    a->stride_block, a->stride_token, a->stride_head,
                                    a->block_tables, a->table_row_stride, a->max_blocks,
                                    a->num_blocks, a->context_lens, attn, M, a->NH, a->NKV, a->D,
                                    a->block_size, (float)a->scale, a->window,
                                    (float)a->soft_cap, th);
    const struct prologue none = {PRO_NONE, NULL, 0, NULL, 0.0f, NULL};
    if (rc == 0)
        rc = quant_matmul((int)a->bits_o, attn, dt, M, Q, Q, &none, a->w_o, H, o, dt, H, th);
    const struct prologue norm2 = {PRO_RMS_NORM, a->residual != NULL ? (const void *)res1 : a->x,
                                   H, a->norm2, (float)a->eps2, a->res_out};
    if (rc == 0)
        rc = quant_matmul((int)a->bits_gu, o, dt, M, H, H, &norm2, a->w_gu, 2 * I, gu, dt, 2 * I, th);
    const struct prologue act = {(int)a->act, NULL, 0, NULL, 0.0f, NULL};
    if (rc == 0)
        rc = quant_matmul((int)a->bits_down, gu, dt, M, I, 2 * I, &act, a->w_down, H, a->out, dt, H, th);
    free(buf);
    return rc;
}
