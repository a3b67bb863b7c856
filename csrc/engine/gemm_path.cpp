#include "engine/gemm_path.h"

namespace tandem {

void GemmScratch::reserve(int threads, int64_t k) {
    if (static_cast<int>(tiles_.size()) < threads) {
        tiles_.resize(static_cast<size_t>(threads));
        rows_.resize(static_cast<size_t>(threads));
    }
    for (int t = 0; t < threads; ++t) {
        auto& tile = tiles_[static_cast<size_t>(t)];
        const int64_t elems = kGemmRows * gemm_tile_ld(k);
        if (static_cast<int64_t>(tile.size()) < elems) tile.resize(static_cast<size_t>(elems));
        auto& row = rows_[static_cast<size_t>(t)];
        if (static_cast<int64_t>(row.size()) < k) row.resize(static_cast<size_t>(k));
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
