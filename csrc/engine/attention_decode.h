// Attention of one new position against the cached keys and values of one
// sequence (a decode step), grouped-query: query head h reads kv head
// h / (n_q_heads / n_kv_heads). A pool task takes the query heads of one kv head (or
// a block of them) on the variant's attend_chunk kernel, which reads each key and value
// once for a block; long caches are split over positions and the chunks merged.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"
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

// The attention and then the output projection out = W · attention(...) in one parallel
// loop, W taken by kv-head groups of columns: W · x = Σ_g W[:, cols of group g] · x_g. A
// group's columns start as soon as its heads are done, while other groups' heads still
// read the cache; each row sums its groups' partials in group order, so the result does
// not depend on the threads (it differs from one whole-row dot by float rounding).
// Only where output_by_groups_fits.
struct OutputByGroups {
    const WeightMatrix* w = nullptr;  // rows × (n_q_heads · dv)
    float* out = nullptr;             // [rows]
    std::vector<uint8_t>* act = nullptr;      // scratch: each group's prepared activation
    std::vector<float>* partial = nullptr;    // scratch: [groups][rows]
};
bool output_by_groups_fits(const WeightMatrix& w, int64_t n_kv_heads);
void attention_decode_output(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                             std::vector<float>& scratch, const OutputByGroups& o);

// Whether fused decode layers take attention_decode_output (TANDEM_CPU_DECODE_O_GROUPS), process-wide.
void set_decode_output_by_groups(bool on);
bool decode_output_by_groups();

}  // namespace tandem
