#include "engine/linear_op.h"

#include <algorithm>
#include <stdexcept>

#include "engine/activations.h"
#include "engine/numa.h"

namespace tandem {

TileShape choose_tiles(int64_t total_rows, int64_t n_tok, int threads) {
    // About eight tasks per thread so stealing can even out uneven cores, but
    // tiles of at least 16 rows so a task's fixed cost (an atomic, the first
    // cache misses) stays small next to its dot products; at most 256 rows so
    // a tile's weights stay in L2 while its tokens stream past. 32 tokens of
    // prepared activations are at most 32 * 292 bytes per 256 columns.
    int64_t rows = total_rows / (8 * static_cast<int64_t>(threads));
    rows = std::clamp<int64_t>((rows + 15) / 16 * 16, 16, 256);
    return TileShape{rows, std::min<int64_t>(std::max<int64_t>(n_tok, 1), 64)};
}

namespace {
DecodeSplit g_decode_split;
}  // namespace

void set_decode_split(const DecodeSplit& split) {
    if (split.tasks_per_thread < 1) throw std::invalid_argument("decode split: at least one task a thread");
    if (split.max_task_bytes < 1) throw std::invalid_argument("decode split: tasks of at least one byte");
    g_decode_split = split;
}

DecodeSplit decode_split() { return g_decode_split; }

int64_t one_token_rows(int64_t rows, int64_t n, int64_t threads, size_t row_bytes, const DecodeSplit& split) {
    const int64_t per_matrix = std::max<int64_t>(1, (split.tasks_per_thread * threads + n - 1) / std::max<int64_t>(n, 1));
    const int64_t by_count = (rows + per_matrix - 1) / per_matrix;
    const int64_t by_bytes = split.max_task_bytes / static_cast<int64_t>(std::max<size_t>(row_bytes, 1));
    const int64_t want = std::min(by_count, by_bytes);
    const int64_t tiles = (rows + std::max<int64_t>(want, 1) - 1) / std::max<int64_t>(want, 1);  // equal tiles
    return std::min(rows, std::max<int64_t>(16, ((rows + tiles - 1) / tiles + 15) / 16 * 16));
}

int64_t laid_out_token_tile(int64_t n_tok, int64_t k) {
    // A task runs each 16-row weight tile against all of its tokens' B operands
    // (k + k / 64 bytes a token): at most 512 KiB of them, so that they stay in
    // L2 (2 MiB a core on the AMX Xeons) next to the weights streaming past, and
    // at most 256 tokens; up to there, more tokens share each rewrite of a
    // weight tile into A operands.
    const int64_t cap = std::clamp<int64_t>((int64_t{512} << 10) / k / kLaidOutGroup * kLaidOutGroup,
                                            4 * kLaidOutGroup, 256);
    const int64_t tiles = (n_tok + cap - 1) / cap;
    return ((n_tok + tiles - 1) / tiles + kLaidOutGroup - 1) / kLaidOutGroup * kLaidOutGroup;
}

uint8_t* aligned_scratch(std::vector<uint8_t>& buf, size_t n) {
    uint8_t* p = scratch(buf, n + 63);
    return p + (-reinterpret_cast<uintptr_t>(p) & 63);
}

LinearOp::LinearOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix weight,
                   GemmPath gemm)
    : pool_(std::move(pool)), kernels_(kernels), weight_(weight), gemm_(gemm) {
    place_rows(*pool_, weight_);
}

void LinearOp::forward(const float* x, int64_t n_tok, int64_t x_stride, float* out) {
    if (n_tok <= 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (gemm_.takes(weight_, n_tok)) {
        forward_gemm(x, n_tok, x_stride, out);
        pool_->rest();
        return;
    }
    const WeightMatrix& w = weight_;
    if (w.kernel->laid_out != nullptr && n_tok >= w.kernel->laid_out->min_tokens) {
        forward_laid_out(x, n_tok, x_stride, out);
        pool_->rest();
        return;
    }
    const ActFormat format = w.kernel->act;
    const size_t arb = act_row_bytes(format, w.cols);
    uint8_t* act = scratch(act_, arb * static_cast<size_t>(n_tok));
    prepare_activations(*pool_, kernels_, format, x, n_tok, w.cols, x_stride, act);

    const TileShape tile = choose_tiles(w.rows, n_tok, pool_->size());
    const int64_t tok_tiles = (n_tok + tile.tokens - 1) / tile.tokens;
    // Row tiles node by node (engine/numa.h): group g's rows for group g's threads.
    row_tiles_.clear();
    node_tasks_.assign(static_cast<size_t>(pool_->n_nodes()), 0);
    for (int g = 0; g < pool_->n_nodes(); ++g) {
        const int64_t end = node_row_edge(*pool_, w.rows, g + 1);
        for (int64_t r0 = node_row_edge(*pool_, w.rows, g); r0 < end; r0 += tile.rows) {
            row_tiles_.push_back(r0);
            node_tasks_[static_cast<size_t>(g)] += tok_tiles;
        }
    }
    const DotRowsFn dot = w.kernel->dot_rows;
    // Token tiles innermost in the task order: consecutive tasks of one thread's
    // range share weight rows, which then come from cache.
    pool_->parallel_for_nodes(node_tasks_.data(), [&](int64_t task, int) {
        const int64_t i = task / tok_tiles, r0 = row_tiles_[static_cast<size_t>(i)];
        const int64_t t0 = (task % tok_tiles) * tile.tokens;
        // A tile ends where the next begins (slices of the groups are adjacent).
        const int64_t end = i + 1 < static_cast<int64_t>(row_tiles_.size()) ? row_tiles_[i + 1] : w.rows;
        const int64_t nr = end - r0;
        const int64_t nt = std::min(tile.tokens, n_tok - t0);
        dot(w.data + r0 * w.row_bytes, w.row_bytes, nr, w.cols, act + t0 * arb, arb, nt, out + t0 * w.rows + r0,
            w.rows);
    });
    if (n_tok > 1) pool_->rest();  // decode (one token) keeps its workers spinning for the next op
}

// The tokens are quantized and laid out once, a group of 16 per task; then each
// task is a row tile against a token tile of up to 256 tokens (laid_out_token_tile).
void LinearOp::forward_laid_out(const float* x, int64_t n_tok, int64_t x_stride, float* out) {
    const WeightMatrix& w = weight_;
    const LaidOutKernel& lo = *w.kernel->laid_out;
    const size_t arb = act_row_bytes(w.kernel->act, w.cols), gb = lo.group_bytes(w.cols);
    uint8_t* act = scratch(act_, arb * static_cast<size_t>(n_tok));
    uint8_t* laid = aligned_scratch(laid_, gb * static_cast<size_t>(laid_out_groups(n_tok)));
    pool_->parallel_for(laid_out_groups(n_tok), [&](int64_t g, int) {
        const int64_t t0 = g * kLaidOutGroup, nt = std::min(kLaidOutGroup, n_tok - t0);
        for (int64_t t = t0; t < t0 + nt; ++t)
            prepare_activation_row(kernels_, w.kernel->act, x + t * x_stride, w.cols, act + t * arb);
        lo.lay_out(act + t0 * arb, arb, nullptr, nt, w.cols, laid + g * gb);
    });

    const int64_t tokens = laid_out_token_tile(n_tok, w.cols);
    const int64_t tok_tiles = (n_tok + tokens - 1) / tokens;
    // Rows for about eight tasks per thread over all the token tiles.
    const int64_t rows = choose_tiles(w.rows * tok_tiles, n_tok, pool_->size()).rows;
    const int64_t row_tiles = (w.rows + rows - 1) / rows;
    // Row tiles innermost: consecutive tasks of one thread's range share a token
    // tile, whose B operands then come from L2.
    pool_->parallel_for(tok_tiles * row_tiles, [&](int64_t task, int) {
        const int64_t t0 = (task / row_tiles) * tokens, r0 = (task % row_tiles) * rows;
        const int64_t nt = std::min(tokens, n_tok - t0), nr = std::min(rows, w.rows - r0);
        lo.dot_rows(w.data + r0 * w.row_bytes, w.row_bytes, nr, w.cols, laid + t0 / kLaidOutGroup * gb, nt,
                    out + t0 * w.rows + r0, w.rows);
    });
}

void LinearOp::forward_gemm(const float* x, int64_t n_tok, int64_t x_stride, float* out) {
    const WeightMatrix& w = weight_;
    const GemmKernels& g = *gemm_.kernels;
    if (packed_.size() < gemm_act_elems(n_tok, w.cols)) packed_.resize(gemm_act_elems(n_tok, w.cols));
    pack_for_gemm(*pool_, g, x, x_stride, nullptr, n_tok, w.cols, packed_.data());
    // Row blocks of several tiles, but at least two blocks per thread.
    const int64_t tiles = (w.rows + kGemmRows - 1) / kGemmRows;
    const int64_t per_block = std::clamp<int64_t>(tiles / (2 * pool_->size()), 1, gemm_block_tiles(w.cols));
    const int64_t block_rows = per_block * kGemmRows;
    gemm_scratch_.reserve(pool_->size(), w.cols, static_cast<int>(per_block));
    pool_->parallel_for((w.rows + block_rows - 1) / block_rows, [&](int64_t i, int thread) {
        const int64_t r0 = i * block_rows;
        gemm_row_block(g, gemm_scratch_, thread, w, w.data, r0, std::min(block_rows, w.rows - r0), packed_.data(),
                       n_tok, out, w.rows);
    });
}

}  // namespace tandem
