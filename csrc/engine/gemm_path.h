// The prefill path of the linear and MoE ops (kernels/gemm_bf16.inc): which
// calls take it, per-thread scratch for its dequantized tiles, and packing of
// the tokens on the pool.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace tandem {

struct GemmPath {
    const GemmKernels* kernels = nullptr;  // null: every call takes the 8-bit dot kernels
    int64_t min_tokens = 32;               // fewer tokens than this per matrix: dot kernels

    bool takes(const WeightMatrix& w, int64_t n_tok) const {
        return kernels != nullptr && n_tok >= min_tokens && w.cols % 32 == 0 && kernels->supports(w.ggml_type);
    }
};

// One dequantized tile and one row of floats per pool thread.
class GemmScratch {
public:
    void reserve(int threads, int64_t k);
    uint16_t* tile(int thread) { return tiles_[static_cast<size_t>(thread)].data(); }
    float* row(int thread) { return rows_[static_cast<size_t>(thread)].data(); }

private:
    std::vector<std::vector<uint16_t>> tiles_;
    std::vector<std::vector<float>> rows_;
};

// Packs n rows (see GemmKernels::pack_act) into dst, one pool task per pair of groups.
void pack_for_gemm(ThreadPool& pool, const GemmKernels& kernels, const float* x, int64_t x_stride,
                   const int64_t* index, int64_t n, int64_t k, uint16_t* dst);

// Rows [r0, r0 + nr) of w (nr <= kGemmRows) for n_tok packed tokens, on the calling thread.
inline void gemm_rows(const GemmKernels& g, GemmScratch& scratch, int thread, const WeightMatrix& w,
                      const uint8_t* matrix, int64_t r0, int64_t nr, const uint16_t* act, int64_t n_tok, float* out,
                      int64_t out_stride) {
    uint16_t* tile = scratch.tile(thread);
    g.dequant_tile(w.ggml_type, matrix + r0 * w.row_bytes, w.row_bytes, nr, w.cols, tile, scratch.row(thread));
    g.tile_gemm(tile, w.cols, act, n_tok, out + r0, out_stride, nr);
}

}  // namespace tandem
