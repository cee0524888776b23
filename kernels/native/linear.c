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

static inline __attribute__((always_inline)) void rows_nv(
    const float *x, int64_t x_stride, const float *wt, int64_t K, int64_t N, const float *bias,
    float *y, int64_t y_stride, int64_t m_lo, int64_t m_hi, int64_t n0, const int NV)
{
    int64_t m = m_lo;
    for (; m + ROWS <= m_hi; m += ROWS) tile(x, x_stride, wt, K, N, bias, y, y_stride, m, n0, ROWS, NV);
    for (; m < m_hi; m++) tile(x, x_stride, wt, K, N, bias, y, y_stride, m, n0, 1, NV);
}

/* Rows [m_lo, m_hi) x column tile t (TILE columns; the last tile also takes the tail). */
static void rows_of_tile(const float *x, int64_t x_stride, const float *wt, int64_t K,
                         int64_t N, const float *bias, float *y, int64_t y_stride,
                         int64_t m_lo, int64_t m_hi, int64_t t)
{
    const int64_t whole = N / LANES, n0 = t * TILE;
    const int64_t nv = whole - t * NVEC < NVEC ? whole - t * NVEC : NVEC;
    switch (nv) {
    case 4: rows_nv(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 4); break;
    case 3: rows_nv(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 3); break;
    case 2: rows_nv(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 2); break;
    case 1: rows_nv(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, n0, 1); break;
    default: break; /* no whole vector: the tail below only */
    }
    if (n0 + TILE >= whole * LANES && whole * LANES < N)
        tail_columns(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, whole * LANES);
}

/* Column tiles of an N-wide output: whole TILE-column groups, at least one. */
static inline int64_t column_tiles(int64_t N) {
    const int64_t whole = N / LANES, t = (whole + NVEC - 1) / NVEC;
    return t > 0 ? t : 1;
}

/* y [M, N] (row stride y_stride) = x [M, K] (row stride x_stride) @ wt [K, N] (+ bias [N]). */
void linear_f32(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *wt,
                int64_t N, const float *bias, float *y, int64_t y_stride, int num_threads)
{
    const int64_t tiles = column_tiles(N);
    const int64_t chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
    const int parallel = M * N * K >= PARALLEL_MACS && num_threads > 1;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t item = 0; item < tiles * chunks; item++) {
        const int64_t t = item % tiles, c = item / tiles;
        const int64_t m_lo = c * ROW_CHUNK, m_hi = m_lo + ROW_CHUNK < M ? m_lo + ROW_CHUNK : M;
        rows_of_tile(x, x_stride, wt, K, N, bias, y, y_stride, m_lo, m_hi, t);
    }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* A mixture-of-experts layer's experts over float32, SiLU-gated (Qwen3-MoE, Mixtral):
 *   out[t] = sum_j topw[t, j] * W2_e (silu(G_e x_t) * U_e x_t),  e = ids[t, j],  j in order,
 * with w13t [E, H, 2I] each expert's [gate | up] transposed and w2t [E, I, H] each expert's
 * down transposed. The routed (token, slot) pairs are grouped by expert (stable) into xs,
 * so each expert's weights are read once per 4 rows; every pair's arithmetic is the same FMA
 * chains whatever else was routed with it, and a token sums its slots in slot order: a
 * token's result never depends on its batch. Scratch: xs [T * k, H], hid [T * k, 2I],
 * ys [T * k, H].
 * Returns 0; -1 when memory for the grouping could not be had; 1 + p for the first pair whose
 * expert id is outside [0, E) (nothing computed). */
int64_t moe_silu_f32(const float *x, int64_t T, int64_t H, int64_t x_stride,
                     const float *w13t, const float *w2t, int64_t E, int64_t I,
                     const int64_t *ids, const float *topw, int64_t k, float *out,
                     float *xs, float *hid, float *ys, int num_threads)
{
    const int64_t P = T * k;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return 1 + p;
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(P + 2 * E + 1));
    if (start == NULL) return -1;
    int64_t *fill = start + E + 1, *pos = fill + E; /* pos[p]: pair p's row in xs / ys */
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t p = 0; p < P; p++) pos[p] = fill[ids[p]]++;
    const int parallel = P * H * I >= PARALLEL_MACS / 4 && num_threads > 1;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++)
            memcpy(xs + pos[p] * H, x + (p / k) * x_stride, sizeof(float) * (size_t)H);
        /* work items: (expert, chunk of its rows, column tile); gate|up over 2I columns,
         * then down over H */
        for (int phase = 0; phase < 2; phase++) {
            const int64_t N = phase == 0 ? 2 * I : H, K = phase == 0 ? H : I;
            const int64_t tiles = column_tiles(N), chunks = (P + ROW_CHUNK - 1) / ROW_CHUNK + E;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < chunks * tiles; item++) {
                const int64_t t = item % tiles, c = item / tiles;
                int64_t e = 0, seen = 0; /* the c-th chunk over the experts' rows, in order */
                for (; e < E; e++) {
                    const int64_t n = (start[e + 1] - start[e] + ROW_CHUNK - 1) / ROW_CHUNK;
                    if (c < seen + n) break;
                    seen += n;
                }
                if (e == E) continue;
                const int64_t lo = start[e] + (c - seen) * ROW_CHUNK;
                const int64_t hi = lo + ROW_CHUNK < start[e + 1] ? lo + ROW_CHUNK : start[e + 1];
                if (phase == 0)
                    rows_of_tile(xs, H, w13t + e * H * 2 * I, K, N, NULL, hid, 2 * I, lo, hi, t);
                else
                    rows_of_tile(hid, 2 * I, w2t + e * I * H, K, N, NULL, ys, H, lo, hi, t);
            }
            if (phase == 0) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < P; r++) {
                    float *h = hid + r * 2 * I;
                    for (int64_t i = 0; i < I; i++) h[i] = silu(h[i]) * h[I + i];
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *o = out + t * H;
            const float *y0 = ys + pos[t * k] * H;
            for (int64_t h = 0; h < H; h++) o[h] = topw[t * k] * y0[h];
            for (int64_t j = 1; j < k; j++) {
                const float w = topw[t * k + j], *y = ys + pos[t * k + j] * H;
                for (int64_t h = 0; h < H; h++) o[h] += w * y[h];
            }
        }
    }
    free(start);
    return 0;
}
