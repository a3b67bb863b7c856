#include "engine/attention_decode.h"

#include <algorithm>
#include <cmath>

namespace tandem {
namespace {

// Positions per chunk below which splitting a head's cache is not worth a merge.
constexpr int64_t kMinChunk = 64;

}  // namespace

void attention_decode(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                      std::vector<float>& scratch) {
    const int64_t group = a.n_q_heads / a.n_kv_heads;
    const int64_t threads = pool.size();
    // Split each kv head's positions into chunks when there are fewer heads than about two
    // tasks per thread: one thread would otherwise stream a long cache alone.
    const int64_t want = (2 * threads + a.n_kv_heads - 1) / a.n_kv_heads;
    const int64_t n_chunks = std::max<int64_t>(1, std::min(want, a.t / kMinChunk));
    const int64_t chunk = (a.t + n_chunks - 1) / n_chunks;
    const int64_t per_head = a.dv + 2;  // a chunk's partial: out[dv], max, sum
    const size_t scores = static_cast<size_t>(threads * chunk);
    const size_t partials = n_chunks > 1 ? static_cast<size_t>(a.n_q_heads * n_chunks * per_head) : 0;
    if (scratch.size() < scores + partials) scratch.resize(scores + partials);
    float* part = scratch.data() + scores;

    if (n_chunks == 1) {  // one task per query head
        pool.parallel_for(a.n_q_heads, [&](int64_t h, int thread) {
            const int64_t g = h / group;
            float* out = a.out + h * a.dv;
            float top, sum;
            kernels.attend_chunk(a.q + h * a.d, a.k + g * a.k_head_stride, a.k_row_stride, a.t, a.d, a.scale,
                                 a.v + g * a.v_head_stride, a.v_row_stride, a.dv, scratch.data() + thread * chunk, out,
                                 &top, &sum);
            const float inv = 1.0f / sum;
            for (int64_t c = 0; c < a.dv; ++c) out[c] *= inv;
        });
        return;
    }
    // One task per (kv head, chunk), for every query head of the group: the chunk's keys and
    // values are read from memory once and then from cache.
    pool.parallel_for(a.n_kv_heads * n_chunks, [&](int64_t task, int thread) {
        const int64_t g = task / n_chunks, c = task % n_chunks;
        const int64_t p0 = c * chunk, len = std::min(chunk, a.t - p0);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            float* p = part + (h * n_chunks + c) * per_head;
            if (len <= 0) {  // rounding left this chunk empty: it adds nothing
                std::fill(p, p + a.dv + 2, 0.0f);
                p[a.dv] = -INFINITY;
                continue;
            }
            kernels.attend_chunk(a.q + h * a.d, a.k + g * a.k_head_stride + p0 * a.k_row_stride, a.k_row_stride, len,
                                 a.d, a.scale, a.v + g * a.v_head_stride + p0 * a.v_row_stride, a.v_row_stride, a.dv,
                                 scratch.data() + thread * chunk, p, p + a.dv, p + a.dv + 1);
        }
    });
    // Merge: out = Σ_c e^(m_c - M) out_c / Σ_c e^(m_c - M) sum_c.
    pool.parallel_for(a.n_q_heads, [&](int64_t h, int) {
        const float* first = part + h * n_chunks * per_head;
        float top = -INFINITY;
        for (int64_t c = 0; c < n_chunks; ++c) top = std::max(top, first[c * per_head + a.dv]);
        float* out = a.out + h * a.dv;
        std::fill(out, out + a.dv, 0.0f);
        float total = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) {
            const float* p = first + c * per_head;
            const float w = std::exp(p[a.dv] - top);
            total += w * p[a.dv + 1];
            for (int64_t i = 0; i < a.dv; ++i) out[i] += w * p[i];
        }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < a.dv; ++i) out[i] *= inv;
    });
}

}  // namespace tandem
