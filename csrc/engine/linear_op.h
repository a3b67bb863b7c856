// y = x W^T for one quantized weight matrix: dense layers and the lm head on
// the CPU. Activations are quantized once per call, then row tiles × token
// tiles of the output are spread over the pool; each task reads its weight
// rows once for all the tokens of its tile. Where the weight's kernel takes
// laid-out tokens, the call lays its tokens out once and the tasks share that.
// Calls with many tokens take the bf16 prefill path instead when the engine
// has one (engine/gemm_path.h).
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "engine/gemm_path.h"
#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace tandem {

class LinearOp {
public:
    LinearOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix weight,
             GemmPath gemm = {});

    // x: [n_tok, cols] float32 rows x_stride floats apart; out: [n_tok, rows] float32, contiguous.
    void forward(const float* x, int64_t n_tok, int64_t x_stride, float* out);

    const WeightMatrix& weight() const { return weight_; }

private:
    std::shared_ptr<ThreadPool> pool_;
    const VariantKernels& kernels_;
    WeightMatrix weight_;
    GemmPath gemm_;
    std::mutex mutex_;  // scratch is per op
    std::vector<uint8_t> act_;
    std::vector<uint16_t> packed_;
    GemmScratch gemm_scratch_;

    std::vector<uint8_t> laid_;  // the call's tokens laid out (LaidOutKernel)
    std::vector<int64_t> row_tiles_;   // a dot call's row tiles, node by node (first rows)
    std::vector<int64_t> node_tasks_;  // and its tasks per node group

    void forward_gemm(const float* x, int64_t n_tok, int64_t x_stride, float* out);
    void forward_laid_out(const float* x, int64_t n_tok, int64_t x_stride, float* out);
};

// Shared by the linear and MoE ops: out[t * out_stride + r] for r in [0, rows),
// t in [0, n_tok), as (row tile × token tile) tasks on the pool.
struct TileShape {
    int64_t rows;
    int64_t tokens;
};
TileShape choose_tiles(int64_t total_rows, int64_t n_tok, int threads);

// How one-token (decode) calls divide their work; process-wide. one_loop: the experts'
// gate/up and down in one parallel loop (MoEOp), else two with a barrier between.
// tasks_per_thread: how many tasks a thread gets, about, in a one-token loop: more even
// out uneven cores, fewer give each task longer runs of rows to stream. max_task_bytes:
// the most weight bytes a task reads where the matrices are large (DeepSeek-V3's experts),
// so that the loop's last tasks keep the others waiting for little.
struct DecodeSplit {
    bool one_loop = true;
    int tasks_per_thread = 4;
    int64_t max_task_bytes = int64_t{256} << 10;
};
void set_decode_split(const DecodeSplit& split);
DecodeSplit decode_split();

// Rows of a one-token task over n matrices of `rows` rows each, row_bytes the weight bytes
// a task reads per row: every matrix in equal tiles, about split.tasks_per_thread tasks a
// thread in all, at most split.max_task_bytes a task, a multiple of 16 rows (or all rows).
int64_t one_token_rows(int64_t rows, int64_t n, int64_t threads, size_t row_bytes, const DecodeSplit& split);

// Tokens per task where the kernel takes laid-out tokens (LaidOutKernel): a multiple of
// kLaidOutGroup, the n_tok tokens split evenly into the fewest such tiles.
int64_t laid_out_token_tile(int64_t n_tok, int64_t k);

// buf grown to hold n bytes from a 64-byte boundary inside it; that boundary.
uint8_t* aligned_scratch(std::vector<uint8_t>& buf, size_t n);

}  // namespace tandem
