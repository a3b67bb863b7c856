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
    // Types whose dot kernels take AMX-INT8 tiles at prompt sizes (a laid-out kernel: Q4_K,
    // Q5_K, Q6_K) keep them at every token count: they beat the bf16 tiles there (BENCHMARKS.md).
    bool int8_first = false;

    bool takes(const WeightMatrix& w, int64_t n_tok) const {
        return kernels != nullptr && n_tok >= min_tokens && w.cols % 32 == 0 && kernels->supports(w.ggml_type) &&
               !(int8_first && w.kernel->laid_out != nullptr);
    }
};

// Dequantized tiles (one, or a row block's several) and one row of floats per pool thread.
class GemmScratch {
public:
    void reserve(int threads, int64_t k, int tiles = 1);
    uint16_t* tile(int thread, int i = 0) {
        return tiles_[static_cast<size_t>(thread)].data() + static_cast<size_t>(i) * tile_elems_;
    }
    float* row(int thread) { return rows_[static_cast<size_t>(thread)].data(); }

private:
    std::vector<std::vector<uint16_t>> tiles_;
    std::vector<std::vector<float>> rows_;
    size_t tile_elems_ = 0;
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

// A row block of up to kGemmBlockTiles tiles (nr <= kGemmRows * kGemmBlockTiles), on the
// calling thread: its tiles are dequantized once, then every block of tokens runs
// against each of them while the block's packed tokens stay in L2. One tile at a time
// would stream the whole call's packed tokens from memory again for every 32 rows.
constexpr int kGemmBlockTiles = 4;

// How many tiles a row block takes for rows of k columns (keeping its bf16 tiles
// within about 640 KiB of L2), and how many tokens one token block has (about 384 KiB
// of packed tokens, a multiple of two groups).
int gemm_block_tiles(int64_t k);
int64_t gemm_token_block(int64_t k);

void gemm_row_block(const GemmKernels& g, GemmScratch& scratch, int thread, const WeightMatrix& w,
                    const uint8_t* matrix, int64_t r0, int64_t nr, const uint16_t* act, int64_t n_tok, float* out,
                    int64_t out_stride);

}  // namespace tandem
