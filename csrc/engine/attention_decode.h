// Attention of one new position against the cached keys and values of one
// sequence (a decode step), grouped-query: query head h reads kv head
// h / (n_q_heads / n_kv_heads). A pool task takes the query heads of one kv head (or
// a block of them) on the variant's attend_chunk kernel, which reads each key and value
// once for a block; long caches are split over positions and the chunks merged.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "kernels/kernel_api.h"

namespace tandem {

struct DecodeAttention {
    const float* q = nullptr;  // [n_q_heads, d]
    int64_t n_q_heads = 0, d = 0;
    const float* k = nullptr;  // head h, position i at k + h * k_head_stride + i * k_row_stride
    const float* v = nullptr;  // likewise with v's strides, dv floats per position
    int64_t n_kv_heads = 0, t = 0, dv = 0;
    int64_t k_head_stride = 0, k_row_stride = 0, v_head_stride = 0, v_row_stride = 0;
    float scale = 1.0f;
    float* out = nullptr;  // [n_q_heads, dv]
};

void attention_decode(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                      std::vector<float>& scratch);

}  // namespace tandem
