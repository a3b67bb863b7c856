#include "engine/rope.h"

#include <algorithm>

namespace tandem {

void rope_half(ThreadPool& pool, const RopeArgs& a) {
    const int64_t half = a.d / 2;
    const int64_t rows = a.batch * a.tokens;
    // Rows of (batch, position), every head of each; small prompts in one task.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, rows / (4 * pool.size()) + 1));
    auto body = [&](int64_t task, int) {
        const int64_t r1 = std::min(rows, (task + 1) * chunk);
        for (int64_t r = task * chunk; r < r1; ++r) {
            const int64_t b = r / a.tokens, t = r % a.tokens;
            const float* c = a.cos + b * a.cs_b + t * a.d;
            const float* s = a.sin + b * a.cs_b + t * a.d;
            for (int64_t h = 0; h < a.heads; ++h) {
                const float* x = a.x + b * a.x_b + h * a.x_h + t * a.x_t;
                float* y = a.out + b * a.out_b + h * a.out_h + t * a.out_t;
                for (int64_t i = 0; i < half; ++i) {
                    const float lo = x[i], hi = x[i + half];
                    y[i] = lo * c[i] - hi * s[i];
                    y[i + half] = hi * c[i + half] + lo * s[i + half];
                }
            }
        }
    };
    const int64_t tasks = (rows + chunk - 1) / chunk;
    if (tasks == 1) return body(0, 0);
    pool.parallel_for(tasks, [&](int64_t i, int thread) { body(i, thread); });
    pool.rest();  // a prompt's op: torch runs next
}

}  // namespace tandem
