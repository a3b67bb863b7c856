// The decode attention kernel on one core: 32 query heads over 4 kv heads of 128 floats
// (Qwen3-30B-A3B's attention), called one query head at a time (as every task did before
// a task took up to four heads of a kv head) and four or eight heads a call.
// g++ -O2 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -Icsrc \
//   benchmarks/attend_chunk_bench.cpp -o /tmp/attend_chunk_bench && /tmp/attend_chunk_bench
#include "kernels/prelude.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

namespace tandem::bench {
using namespace tandem::detail;
#include "kernels/simd.inc"
#include "kernels/silu.inc"
#include "kernels/attention.inc"
}  // namespace tandem::bench

int main() {
    constexpr int kHeads = 32, kKv = 4, kDim = 128, kGroup = kHeads / kKv;
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (const int t : {128, 512, 2048}) {
        std::vector<float> q(kHeads * kDim), k(kKv * t * kDim), v(kKv * t * kDim), out(kHeads * kDim);
        std::vector<float> scores(kGroup * t), top(kHeads), sum(kHeads);
        for (auto* buf : {&q, &k, &v})
            for (float& x : *buf) x = normal(rng);
        for (const int per_call : {1, 4, 8}) {
            double best = 1e30;
            for (int round = 0; round < 7; ++round) {
                const auto t0 = std::chrono::steady_clock::now();
                for (int rep = 0; rep < 20; ++rep)
                    for (int h = 0; h < kHeads; h += per_call) {
                        const int64_t kv = h / kGroup * t * kDim;
                        tandem::bench::attend_chunk(q.data() + h * kDim, per_call, k.data() + kv, kDim, t, kDim,
                                                    0.088f, v.data() + kv, kDim, kDim, scores.data(),
                                                    out.data() + h * kDim, kDim, top.data() + h, sum.data() + h, 1);
                    }
                const std::chrono::duration<double, std::micro> spent = std::chrono::steady_clock::now() - t0;
                best = std::min(best, spent.count() / 20);
            }
            std::printf("t=%5d, %d query heads a call: %8.1f us for all 32 heads (best of 7)\n", t, per_call, best);
        }
    }
}
