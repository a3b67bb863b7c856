#include "engine/router.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tandem {

void softmax_top_k(const float* logits, int64_t n_experts, int64_t k, bool renormalize, float* scratch,
                   int64_t* ids, float* weights) {
    const float top = *std::max_element(logits, logits + n_experts);
    float sum = 0.0f;
    for (int64_t e = 0; e < n_experts; ++e) sum += (scratch[e] = std::exp(logits[e] - top));
    if (!std::isfinite(sum)) {  // a NaN (or infinite) logit: no expert can be ranked
        std::fill(ids, ids + k, int64_t{-1});
        std::fill(weights, weights + k, 0.0f);
        return;
    }
    float picked = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < n_experts; ++e)
            if (scratch[e] >= 0.0f && (best < 0 || scratch[e] > scratch[best])) best = e;
        // k <= n_experts and every probability is >= 0 until taken: best is always found
        ids[j] = best;
        weights[j] = scratch[best] / sum;
        picked += weights[j];
        scratch[best] = -1.0f;  // taken
    }
    if (renormalize && picked > 0.0f)
        for (int64_t j = 0; j < k; ++j) weights[j] /= picked;
}

void softmax_top_k_rows(ThreadPool& pool, const float* logits, int64_t n, int64_t n_experts, int64_t k,
                        bool renormalize, int64_t* ids, float* weights) {
    constexpr int64_t kChunk = 16;
    auto rows = [&](int64_t r0, int64_t r1) {
        std::vector<float> scratch(static_cast<size_t>(n_experts));
        for (int64_t r = r0; r < r1; ++r)
            softmax_top_k(logits + r * n_experts, n_experts, k, renormalize, scratch.data(), ids + r * k,
                          weights + r * k);
    };
    if (n <= kChunk) return rows(0, n);
    pool.parallel_for((n + kChunk - 1) / kChunk,
                      [&](int64_t i, int) { rows(i * kChunk, std::min(n, (i + 1) * kChunk)); });
    pool.rest();  // a prompt's op: torch runs next
}

}  // namespace tandem
