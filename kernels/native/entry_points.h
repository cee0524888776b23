/* The kernels one source file calls in another (quant_matmul.c's decode_layer and fused
 * norm): their definitions include this too, so the compiler checks that they agree. */
#ifndef SPLITSERVE_NATIVE_ENTRY_POINTS_H
#define SPLITSERVE_NATIVE_ENTRY_POINTS_H

#include <stdint.h>

/* layer_ops.c: one row of rms_norm (v: H floats of scratch). */
void rms_norm_row(const void *xr, const void *rr, int dtype, int64_t H, const void *weight,
                  float eps, float *v, void *o, void *ro);

int64_t rotary_store_kv(
    const void *q, const void *k, const void *v, int dtype,
    int64_t q_st, int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh,
    int64_t T, int64_t NH, int64_t NKV, int64_t D, int64_t rot,
    const int64_t *positions, const float *table, int64_t table_stride, int64_t max_pos,
    const void *q_norm, const void *k_norm, float eps, void *q_out,
    void *k_cache, void *v_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    int64_t num_blocks, int64_t block_size, const int64_t *slots, int num_threads);

int64_t paged_decode_attention(
    const void *query, int q_dtype, int64_t q_stride_b, int64_t q_stride_h,
    const void *key_cache, const void *value_cache, int kv_dtype,
    int64_t stride_block, int64_t stride_token, int64_t stride_head,
    const int32_t *block_tables, int64_t table_stride, int64_t max_blocks, int64_t num_blocks,
    const int32_t *context_lens,
    void *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
    float scale, int64_t window, float soft_cap, int num_threads);

#endif
