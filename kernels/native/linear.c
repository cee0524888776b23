/* Projections through small float32 weights on the CPU: y = x @ W^T (+ bias), with W kept
 * transposed, wt = W^T [K, N] contiguous.
 *
 * oneDNN's inner product costs ~15-25 us a call whatever its size (primitive lookup, its
 * thread team), which is most of a decode step of a model whose weights are a few thousand
 * values wide; torch's other GEMMs choose their code by the row count, so a row's bits would
 * change with the step's batch. Here every output element is one fused multiply-add chain
 * over k = 0 .. K-1 in order, then + bias: the same instructions whatever the row count, the
 * tiling, the thread that runs it (vector lanes and the scalar tail give the same bits, an
 * FMA rounds once either way). So a row's result never depends on its batch, and decode rows,
 * speculative verify rows and prompt rows through one weight agree bit for bit.
 *
 * Tiles: ROWS rows x up to NVEC 16-float vectors of columns, their accumulators in registers,
 * one pass over k reading each weight row segment once for the ROWS rows. Work items are
 * (column tile, row range) pairs, on torch's OpenMP team from PARALLEL_MACS multiply-adds on.
 */
#pragma GCC optimize("fp-contract=fast")
#include "common.h"

#ifdef __AVX512F__
#define ROWS 4 /* 4 x 4 accumulators: 16 of the 32 zmm registers */
#else
#define ROWS 2 /* 2 x 4 x 2 ymm: 16 ymm registers on AVX2 */
#endif
#define NVEC 4
#define TILE (NVEC * LANES)
#define PARALLEL_MACS (1 << 18)
#define ROW_CHUNK 64 /* rows per work item when there are many */

/* Rows [m0, m0 + R) x vectors [n0, n0 + NV * 16): R and NV constants where inlined. */
static inline __attribute__((always_inline)) void tile(
    const float *restrict x, int64_t x_stride, const float *restrict wt, int64_t K, int64_t N,
    const float *restrict bias, float *restrict y, int64_t y_stride, int64_t m0, int64_t n0,
    const int R, const int NV)
{
    v16f acc[ROWS][NVEC];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (v16f){0};
    const float *xr[ROWS];
    for (int r = 0; r < R; r++) xr[r] = x + (m0 + r) * x_stride;
    for (int64_t k = 0; k < K; k++) {
        const float *w = wt + k * N + n0;
        v16f wv[NVEC];
        for (int v = 0; v < NV; v++) memcpy(&wv[v], w + v * LANES, sizeof wv[v]);
        for (int r = 0; r < R; r++) {
            const float xv = xr[r][k];
            for (int v = 0; v < NV; v++) acc[r][v] += xv * wv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            if (bias != NULL) {
                v16f b;
                memcpy(&b, bias + n0 + v * LANES, sizeof b);
                acc[r][v] += b;
            }
            memcpy(y + (m0 + r) * y_stride + n0 + v * LANES, &acc[r][v], sizeof acc[r][v]);
        }
}

/* The columns past the last whole vector, one element at a time: the same FMA chain. */
static void tail_columns(const float *restrict x, int64_t x_stride, const float *restrict wt,
                         int64_t K, int64_t N, const float *restrict bias, float *restrict y,
                         int64_t y_stride, int64_t m_lo, int64_t m_hi, int64_t n_lo)
{
    for (int64_t m = m_lo; m < m_hi; m++)
        for (int64_t n = n_lo; n < N; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(x[m * x_stride + k], wt[k * N + n], acc);
            if (bias != NULL) acc += bias[n];
            y[m * y_stride + n] = acc;
        }
}

static inline __attribute__((always_inline)) void rows_of_tile(
    const float *x, int64_t x_stride, const float *wt, int64_t K, int64_t N, const float *bias,
    float *y, int64_t y_stride, int64_t m_lo, int64_t m_hi, int64_t n0, const int NV)
{
    int64_t m = m_lo;
    for (; m + ROWS <= m_hi; m += ROWS) tile(x, x_stride, wt, K, N, bias, y, y_stride, m, n0, ROWS, NV);
    for (; m < m_hi; m++) tile(x, x_stride, wt, K, N, bias, y, y_stride, m, n0, 1, NV);
}

/* y [M, N] (row stride y_stride) = x [M, K] (row stride x_stride) @ wt [K, N] (+ bias [N]). */
void linear_f32(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *wt,
                int64_t N, const float *bias, float *y, int64_t y_stride, int num_threads)
{
    const int64_t whole = N / LANES;              /* whole 16-column vectors */
    const int64_t tiles = (whole + NVEC - 1) / NVEC;
    const int64_t chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
    const int64_t items = tiles * chunks;
    const int parallel = M * N * K >= PARALLEL_MACS && num_threads > 1;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t t = item % tiles, c = item / tiles;
        const int64_t m_lo = c * ROW_CHUNK, m_hi = m_lo + ROW_CHUNK < M ? m_lo + ROW_CHUNK : M;
        const int64_t n0 = t * TILE;
        const int64_t nv = whole - t * NVEC < NVEC ? whole - t * NVEC : NVEC;
        switch (nv) {
        case 4: rows_of_tile(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 4); break;
        case 3: rows_of_tile(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 3); break;
        case 2: rows_of_tile(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 2); break;
        default: rows_of_tile(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 1); break;
        }
    }
    if (whole * LANES < N)
        tail_columns(x, x_stride, wt, K, N, bias, y, y_stride, 0, M, whole * LANES);
}
