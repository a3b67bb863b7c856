#include "engine/attention_decode.h"

#include <algorithm>
#include <cmath>

namespace tandem {
namespace {

// Positions per chunk below which splitting a head's cache is not worth a merge.
constexpr int64_t kMinChunk = 64;

// One head's chunks merged: out = Σ_c e^(m_c - M) out_c / Σ_c e^(m_c - M) sum_c, the chunks'
// partials (out[dv], max, sum) per_head floats apart from first.
void merge_chunks(const float* first, int64_t n_chunks, int64_t per_head, int64_t dv, float* out) {
    float top = -INFINITY;
    for (int64_t c = 0; c < n_chunks; ++c) top = std::max(top, first[c * per_head + dv]);
    std::fill(out, out + dv, 0.0f);
    float total = 0.0f;
    for (int64_t c = 0; c < n_chunks; ++c) {
        const float* p = first + c * per_head;
        const float w = std::exp(p[dv] - top);
        total += w * p[dv + 1];
        for (int64_t i = 0; i < dv; ++i) out[i] += w * p[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < dv; ++i) out[i] *= inv;
}

}  // namespace

void attention_decode(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                      std::vector<float>& scratch) {
    const int64_t group = a.n_q_heads / a.n_kv_heads;
    const int64_t threads = pool.size();
    // A task takes the query heads of one kv head (the kernel reads each key and value once
    // for a block of them, and the task's chunk of the cache comes from memory once) and,
    // when there are fewer kv heads than about two tasks per thread, a chunk of the
    // positions: one thread would otherwise stream a long cache alone. A cache too short to
    // split that far splits the heads instead, into blocks of four, or one each.
    const int64_t want = (2 * threads + a.n_kv_heads - 1) / a.n_kv_heads;
    const int64_t n_chunks = std::max<int64_t>(1, std::min(want, a.t / kMinChunk));
    const auto tasks_of = [&](int64_t h) { return a.n_kv_heads * n_chunks * ((group + h - 1) / h); };
    int64_t heads = group;
    if (tasks_of(heads) < 2 * threads) heads = std::min<int64_t>(group, 4);
    if (tasks_of(heads) < 2 * threads && n_chunks == 1) heads = 1;
    const int64_t blocks = (group + heads - 1) / heads;  // per kv head
    const int64_t chunk = (a.t + n_chunks - 1) / n_chunks;
    const int64_t per_head = a.dv + 2;  // a chunk's partial: out[dv], max, sum
    const int64_t per_thread = heads * chunk + 2 * heads;  // scores, then one chunk's max and sum
    const size_t scores = static_cast<size_t>(threads * per_thread);
    const size_t partials = n_chunks > 1 ? static_cast<size_t>(a.n_q_heads * n_chunks * per_head) : 0;
    if (scratch.size() < scores + partials) scratch.resize(scores + partials);
    float* part = scratch.data() + scores;
    // Per (kv head, block of heads): chunks still to finish; the task that finishes the last
    // merges the block's heads, so no second loop follows.
    thread_local LoopCounters counters;  // the thread that leads the loop owns them
    const int64_t n_blocks = n_chunks > 1 ? a.n_kv_heads * blocks : 0;
    std::atomic<int64_t>* left = counters.get(static_cast<size_t>(n_blocks));
    for (int64_t i = 0; i < n_blocks; ++i) left[i].store(n_chunks, std::memory_order_relaxed);

    pool.parallel_for(a.n_kv_heads * n_chunks * blocks, [&](int64_t task, int thread) {
        const int64_t g = task / (n_chunks * blocks), c = task / blocks % n_chunks, b = task % blocks;
        const int64_t h0 = g * group + b * heads, nh = std::min(heads, group - b * heads);
        const int64_t p0 = c * chunk, len = std::min(chunk, a.t - p0);
        float* mine = scratch.data() + thread * per_thread;
        const float* k = a.k + g * a.k_head_stride + p0 * a.k_row_stride;
        const float* v = a.v + g * a.v_head_stride + p0 * a.v_row_stride;
        if (n_chunks == 1) {  // the whole cache: normalized in place
            float* top = mine + heads * chunk;
            float* sum = top + heads;
            float* out = a.out + h0 * a.dv;
            kernels.attend_chunk(a.q + h0 * a.d, nh, k, a.k_row_stride, len, a.d, a.scale, v, a.v_row_stride, a.dv,
                                 mine, out, a.dv, top, sum, 1);
            for (int64_t i = 0; i < nh; ++i) {
                const float inv = 1.0f / sum[i];
                for (int64_t col = 0; col < a.dv; ++col) out[i * a.dv + col] *= inv;
            }
            return;
        }
        float* p = part + (h0 * n_chunks + c) * per_head;  // head i's partial at p + i * n_chunks * per_head
        const int64_t stride = n_chunks * per_head;
        if (len <= 0) {  // rounding left this chunk empty: it adds nothing
            for (int64_t i = 0; i < nh; ++i) {
                std::fill(p + i * stride, p + i * stride + a.dv + 2, 0.0f);
                p[i * stride + a.dv] = -INFINITY;
            }
        } else {
            kernels.attend_chunk(a.q + h0 * a.d, nh, k, a.k_row_stride, len, a.d, a.scale, v, a.v_row_stride, a.dv,
                                 mine, p, stride, p + a.dv, p + a.dv + 1, stride);
        }
        if (left[g * blocks + b].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        for (int64_t h = h0; h < h0 + nh; ++h)
            merge_chunks(part + h * n_chunks * per_head, n_chunks, per_head, a.dv, a.out + h * a.dv);
    });
}

}  // namespace tandem
