#include "engine/gemm_path.h"

#include <algorithm>

namespace tandem {

void GemmScratch::reserve(int threads, int64_t k, int tiles) {
    if (static_cast<int>(tiles_.size()) < threads) {
        tiles_.resize(static_cast<size_t>(threads));
        rows_.resize(static_cast<size_t>(threads));
    }
    tile_elems_ = static_cast<size_t>(kGemmRows * gemm_tile_ld(k));
    for (int t = 0; t < threads; ++t) {
        auto& tile = tiles_[static_cast<size_t>(t)];
        const size_t elems = tile_elems_ * static_cast<size_t>(std::max(1, tiles));
        if (tile.size() < elems) tile.resize(elems);
        auto& row = rows_[static_cast<size_t>(t)];
        if (static_cast<int64_t>(row.size()) < k) row.resize(static_cast<size_t>(k));
    }
}

int gemm_block_tiles(int64_t k) {
    const int64_t tile_bytes = kGemmRows * gemm_tile_ld(k) * 2;
    return static_cast<int>(std::clamp<int64_t>((640 << 10) / tile_bytes, 1, kGemmBlockTiles));
}

int64_t gemm_token_block(int64_t k) {
    const int64_t pair = 2 * kGemmGroup;  // tile_gemm runs two groups at a time
    return std::max<int64_t>(pair, (384 << 10) / (2 * k) / pair * pair);
}

void gemm_row_block(const GemmKernels& g, GemmScratch& scratch, int thread, const WeightMatrix& w,
                    const uint8_t* matrix, int64_t r0, int64_t nr, const uint16_t* act, int64_t n_tok, float* out,
                    int64_t out_stride) {
    const int64_t tiles = (nr + kGemmRows - 1) / kGemmRows;
    for (int64_t i = 0; i < tiles; ++i)
        g.dequant_tile(w.ggml_type, matrix + (r0 + i * kGemmRows) * w.row_bytes, w.row_bytes,
                       std::min(kGemmRows, nr - i * kGemmRows), w.cols, scratch.tile(thread, static_cast<int>(i)),
                       scratch.row(thread));
    const int64_t block = gemm_token_block(w.cols);
    for (int64_t t0 = 0; t0 < n_tok; t0 += block) {  // packed token t0 (a multiple of 32) at act + t0 * cols
        const int64_t nt = std::min(block, n_tok - t0);
        for (int64_t i = 0; i < tiles; ++i)
            g.tile_gemm(scratch.tile(thread, static_cast<int>(i)), w.cols, act + t0 * w.cols, nt,
                        out + t0 * out_stride + r0 + i * kGemmRows, out_stride, std::min(kGemmRows, nr - i * kGemmRows));
    }
}

void pack_for_gemm(ThreadPool& pool, const GemmKernels& kernels, const float* x, int64_t x_stride,
                   const int64_t* index, int64_t n, int64_t k, uint16_t* dst) {
    pool.parallel_for(gemm_groups(n) / 2, [&](int64_t i, int) {
        float tmp[32];
        kernels.pack_act(x, x_stride, index, n, k, 2 * i, 2 * i + 2, dst, tmp);
    });
}

}  // namespace tandem
