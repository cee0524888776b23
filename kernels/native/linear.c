/* Projections through small float32 weights on the CPU: y = x @ W^T (+ bias), with W packed
 * once (see rows_of_tile: W^T in blocks of 64 columns, each contiguous).
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
 * Tiles: ROWS rows x up to NVEC vectors of columns (16 floats on AVX-512, 8 on AVX2), their
 * accumulators in registers, one pass over k reading each weight row segment once for the
 * ROWS rows (6 x 4 on AVX-512: 0.95-1.25x oneDNN from 16 to 2,048 rows at 64-768 wide; 4 x 4
 * gave 0.77-0.86x; 6 x 2 on AVX2). Each pass over a block also prefetches a share of the
 * next block into L2 (rows_nv), so weights stream in from memory behind the arithmetic. Every
 * lane and the scalar tail run the same FMA chain, so the AVX2 and AVX-512 builds give the
 * same bits too. Work items are (column tile, row range) pairs, on
 * torch's OpenMP team from PARALLEL_MACS multiply-adds on.
 */
#pragma GCC optimize("fp-contract=fast")
#include "common.h"

#ifdef __AVX512F__
typedef v16f vec; /* one zmm register */
#define VL 16
#define NVEC 4 /* vectors of columns per pass: 6 x 4 accumulators, 24 of the 32 zmm registers */
#else
typedef v8f vec; /* one ymm register: arrays of two-register vectors went through the stack */
#define VL 8
#define NVEC 2 /* 6 x 2 accumulators, 12 of the 16 ymm registers (4 x 4 went through the stack:
                  5x slower; 4 x 2 ran 5-10% slower from 64 rows on) */
#endif
#define ROWS 6 /* rows per pass; rows_nv's tail cases assume 6 */
#define TILE 64 /* columns per packed block (native.LINEAR_TILE): 1 pass of 4 x 16 lanes, 4 of 2 x 8 */
#define PARALLEL_MACS (1 << 18)
#define ROW_CHUNK 64 /* rows per work item when there are many */

/* Rows [m0, m0 + R) x vectors [n0, n0 + NV * VL) of the output, whose weights sit at
 * w (row k at w + k * ldw): R and NV constants where inlined. */
static inline __attribute__((always_inline)) void tile(
    const float *restrict x, int64_t x_stride, const float *restrict w, int64_t ldw, int64_t K,
    const float *restrict bias, float *restrict y, int64_t y_stride, int64_t m0, int64_t n0,
    const int R, const int NV, const float *pf, int64_t pf_k, int64_t pf_step)
{
    vec acc[ROWS][NVEC];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vec){0};
    const float *xr = x + m0 * x_stride;
    for (int64_t k = 0; k < K; k++) {
        const float *wk = w + k * ldw;
        if (pf != NULL && k == pf_k) { /* the next block's row pf_k, into L2 (see rows_nv) */
            for (int v = 0; v < NV; v++) __builtin_prefetch(pf + k * ldw + v * VL, 0, 2);
            pf_k += pf_step;
        }
        vec wv[NVEC];
        for (int v = 0; v < NV; v++) memcpy(&wv[v], wk + v * VL, sizeof wv[v]);
        for (int r = 0; r < R; r++) {
            const float xv = xr[r * x_stride + k];
            for (int v = 0; v < NV; v++) acc[r][v] += xv * wv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            if (bias != NULL) {
                vec b;
                memcpy(&b, bias + n0 + v * VL, sizeof b);
                acc[r][v] += b;
            }
            memcpy(y + (m0 + r) * y_stride + n0 + v * VL, &acc[r][v], sizeof acc[r][v]);
        }
}

/* Output columns [n_lo, n_hi) one element at a time (their weights from column c_lo of the
 * block at w, rows ldw apart): the same FMA chain as the vector lanes. */
static void tail_columns(const float *restrict x, int64_t x_stride, const float *restrict w,
                         int64_t ldw, int64_t c_lo, int64_t K, const float *restrict bias,
                         float *restrict y, int64_t y_stride, int64_t m_lo, int64_t m_hi,
                         int64_t n_lo, int64_t n_hi)
{
    for (int64_t m = m_lo; m < m_hi; m++)
        for (int64_t n = n_lo; n < n_hi; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc = __builtin_fmaf(x[m * x_stride + k], w[k * ldw + c_lo + (n - n_lo)], acc);
            if (bias != NULL) acc += bias[n];
            y[m * y_stride + n] = acc;
        }
}

/* Rows [m_lo, m_hi) through one group of NV vectors: passes of ROWS rows over the block's
 * k-rows, the first from memory, the others from L2. pf: the same columns of the next block
 * (or NULL), whose k-rows the passes prefetch in turn (pass p takes k = p, p + P, ...), so
 * the next block streams in while this one is computed from cache. */
static inline __attribute__((always_inline)) void rows_nv(
    const float *x, int64_t x_stride, const float *w, int64_t ldw, int64_t K, const float *bias,
    float *y, int64_t y_stride, int64_t m_lo, int64_t m_hi, int64_t n0, const int NV,
    const float *pf)
{
    const int64_t passes = (m_hi - m_lo + ROWS - 1) / ROWS;
    int64_t m = m_lo, p = 0;
    for (; m + ROWS <= m_hi; m += ROWS, p++)
        tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, ROWS, NV, pf, p, passes);
    switch (m_hi - m) { /* the last rows in one pass as well (the weights read once more) */
    case 5: tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, 5, NV, pf, p, passes); break;
    case 4: tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, 4, NV, pf, p, passes); break;
    case 3: tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, 3, NV, pf, p, passes); break;
    case 2: tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, 2, NV, pf, p, passes); break;
    case 1: tile(x, x_stride, w, ldw, K, bias, y, y_stride, m, n0, 1, NV, pf, p, passes); break;
    default: break;
    }
}

/* The packed weight (native.pack_linear_weight): W^T cut into blocks of TILE columns, each
 * [K, TILE] contiguous (a tile's k-loop walks one contiguous run), then the last N % TILE
 * columns as one [K, N % TILE] block. Rows [m_lo, m_hi) x block t: its whole vectors in
 * passes of up to NVEC, the columns past them one at a time. */
static void rows_of_tile(const float *x, int64_t x_stride, const float *wp, int64_t K,
                         int64_t N, const float *bias, float *y, int64_t y_stride,
                         int64_t m_lo, int64_t m_hi, int64_t t)
{
    const int64_t full = N / TILE, n0 = t * TILE;
    const float *w = wp + t * K * TILE;
    const int64_t width = t < full ? TILE : N - full * TILE, nvec = width / VL;
    /* the next full block's same columns, prefetched while this one is computed */
    const float *next = t + 1 < full ? w + K * TILE : NULL;
    for (int64_t v0 = 0; v0 < nvec; v0 += NVEC) {
        const float *wv = w + v0 * VL, *pf = next != NULL ? next + v0 * VL : NULL;
        const int64_t c0 = n0 + v0 * VL;
        switch (nvec - v0 < NVEC ? nvec - v0 : NVEC) {
        case 4: rows_nv(x, x_stride, wv, width, K, bias, y, y_stride, m_lo, m_hi, c0, 4, pf); break;
        case 3: rows_nv(x, x_stride, wv, width, K, bias, y, y_stride, m_lo, m_hi, c0, 3, pf); break;
        case 2: rows_nv(x, x_stride, wv, width, K, bias, y, y_stride, m_lo, m_hi, c0, 2, pf); break;
        default: rows_nv(x, x_stride, wv, width, K, bias, y, y_stride, m_lo, m_hi, c0, 1, pf); break;
        }
    }
    if (nvec * VL < width)
        tail_columns(x, x_stride, w, width, nvec * VL, K, bias, y, y_stride, m_lo, m_hi,
                     n0 + nvec * VL, n0 + width);
}

/* Floats per vector of this build (16: AVX-512, 8: AVX2): native.linear_max reads it. */
int64_t linear_lanes(void) { return VL; }

/* Weight blocks of an N-wide output: whole TILE-column blocks, then the rest if any. */
static inline int64_t column_tiles(int64_t N) {
    return N / TILE + (N % TILE ? 1 : 0);
}

/* y [M, N] (row stride y_stride) = x [M, K] (row stride x_stride) @ W^T (+ bias [N]), with
 * W [N, K] packed as rows_of_tile reads it (wp). */
void linear_f32(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *wp,
                int64_t N, const float *bias, float *y, int64_t y_stride, int num_threads)
{
    const int64_t tiles = column_tiles(N);
    const int64_t chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
    const int parallel = M * N * K >= PARALLEL_MACS && num_threads > 1;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t item = 0; item < tiles * chunks; item++) {
        const int64_t t = item % tiles, c = item / tiles;
        const int64_t m_lo = c * ROW_CHUNK, m_hi = m_lo + ROW_CHUNK < M ? m_lo + ROW_CHUNK : M;
        rows_of_tile(x, x_stride, wp, K, N, bias, y, y_stride, m_lo, m_hi, t);
    }
}

/* A mixture-of-experts layer's experts over float32, SiLU-gated (Qwen3-MoE, Mixtral):
 *   out[t] = sum_j topw[t, j] * W2_e (silu(G_e x_t) * U_e x_t),  e = ids[t, j],  j in order,
 * with w13 [E, 2I * H] each expert's [gate | up] and w2 [E, H * I] each expert's down,
 * packed as rows_of_tile reads them. The routed (token, slot) pairs are grouped by expert
 * (stable) into xs, so each expert's weights are read once per ROWS rows; every pair's
 * arithmetic is the same FMA chains whatever else was routed with it, and a token sums its
 * slots in slot order: a token's result never depends on its batch. Scratch: xs [T * k, H], hid [T * k, 2I],
 * ys [T * k, H].
 * Returns 0; -1 when memory for the grouping could not be had; 1 + p for the first pair whose
 * expert id is outside [0, E) (nothing computed). */
int64_t moe_silu_f32(const float *x, int64_t T, int64_t H, int64_t x_stride,
                     const float *w13, const float *w2, int64_t E, int64_t I,
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
                    rows_of_tile(xs, H, w13 + e * H * 2 * I, K, N, NULL, hid, 2 * I, lo, hi, t);
                else
                    rows_of_tile(hid, 2 * I, w2 + e * I * H, K, N, NULL, ys, H, lo, hi, t);
            }
            if (phase == 0) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < P; r++) {
                    float *h = hid + r * 2 * I;
                    for (int64_t i = 0; i < I; i++) h[i] = silu_fast(h[i]) * h[I + i];
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
