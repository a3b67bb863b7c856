#include "engine/moe_op.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/activations.h"
#include "engine/linear_op.h"

namespace tandem {
namespace {

using Task = MoETask;

// (expert, row tile, assignment tile) tasks over the active experts.
void make_tasks(const std::vector<int64_t>& count, const std::vector<int64_t>& offset, int64_t rows, int threads,
                std::vector<Task>& tasks) {
    tasks.clear();
    int64_t active = 0, max_count = 0;
    for (int64_t c : count) {
        active += c > 0;
        max_count = std::max(max_count, c);
    }
    const TileShape tile = choose_tiles(rows * std::max<int64_t>(active, 1), max_count, threads);
    for (size_t e = 0; e < count.size(); ++e) {
        for (int64_t a0 = 0; a0 < count[e]; a0 += tile.tokens)
            for (int64_t r0 = 0; r0 < rows; r0 += tile.rows)
                tasks.push_back(Task{static_cast<int64_t>(e), r0, std::min(tile.rows, rows - r0),
                                     offset[e] + a0, std::min(tile.tokens, count[e] - a0)});
    }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

MoEOp::MoEOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix gate, WeightMatrix up,
             WeightMatrix down)
    : pool_(std::move(pool)), kernels_(kernels), gate_(gate), up_(up), down_(down) {
    if (up.n_experts != gate.n_experts || down.n_experts != gate.n_experts || up.rows != gate.rows ||
        up.cols != gate.cols || down.rows != gate.cols || down.cols != gate.rows)
        throw std::invalid_argument("experts: gate, up and down shapes disagree");
}

void MoEOp::submit(const MoECall& call) {
    pool_->submit([this, call] { forward(call); });
}

void MoEOp::sync() { pool_->wait_idle(); }

void MoEOp::forward(const MoECall& call) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t n_tok = call.n_tok, k = call.top_k, E = gate_.n_experts;
    const int64_t H = gate_.cols, I = gate_.rows;
    if (n_tok <= 0) return;
    std::memset(call.out, 0, sizeof(float) * static_cast<size_t>(n_tok * H));
    if (k <= 0) return;
    ThreadPool& pool = *pool_;

    // 1. Group the (token, slot) pairs by expert: assignment a of expert e lies
    //    in [offset[e], offset[e] + count[e]), tokens in ascending order.
    count_.assign(E, 0);
    for (int64_t s = 0; s < n_tok * k; ++s)
        if (call.ids[s] >= 0 && call.ids[s] < E) ++count_[call.ids[s]];
    offset_.assign(E, 0);
    int64_t n_assign = 0;
    for (int64_t e = 0; e < E; ++e) {
        offset_[e] = n_assign;
        n_assign += count_[e];
    }
    slot_assignment_.assign(n_tok * k, -1);
    assignment_token_.resize(std::max<int64_t>(n_assign, 1));
    cursor_.assign(offset_.begin(), offset_.end());
    for (int64_t s = 0; s < n_tok * k; ++s) {
        const int64_t e = call.ids[s];
        if (e < 0 || e >= E) continue;
        const int64_t a = cursor_[e]++;
        slot_assignment_[s] = a;
        assignment_token_[a] = s / k;
    }
    if (n_assign == 0) return;

    // 2. Activations of every token, prepared once, then gathered per assignment
    //    so an expert's tokens are contiguous rows for the kernel.
    auto gather = [&](const WeightMatrix& w, std::vector<uint8_t>& per_token, std::vector<uint8_t>& out) {
        const size_t arb = act_row_bytes(w.kernel->act, H);
        uint8_t* tok = scratch(per_token, arb * n_tok);
        prepare_activations(pool, kernels_, w.kernel->act, call.x, n_tok, H, H, tok);
        uint8_t* dst = scratch(out, arb * n_assign);
        for (int64_t a = 0; a < n_assign; ++a) std::memcpy(dst + a * arb, tok + assignment_token_[a] * arb, arb);
        return dst;
    };
    const uint8_t* act_gate = gather(gate_, x_act_, gathered_);
    const bool same_format = up_.kernel->act == gate_.kernel->act;
    const uint8_t* act_up = same_format ? act_gate : gather(up_, x_act_up_, gathered_up_);
    const size_t arb_gate = act_row_bytes(gate_.kernel->act, H);
    const size_t arb_up = act_row_bytes(up_.kernel->act, H);

    // 3. gate and up for each (expert, row tile, token tile); h = silu(gate) * up in place.
    gate_out_.resize(std::max<size_t>(gate_out_.size(), static_cast<size_t>(n_assign * I)));
    up_out_.resize(std::max<size_t>(up_out_.size(), static_cast<size_t>(n_assign * I)));
    float* g = gate_out_.data();
    float* u = up_out_.data();
    make_tasks(count_, offset_, I, pool.size(), tasks_);
    const std::vector<Task>& tasks = tasks_;
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
        const Task& t = tasks[i];
        gate_.kernel->dot_rows(gate_.matrix(t.expert) + t.r0 * gate_.row_bytes, gate_.row_bytes, t.nr, H,
                               act_gate + t.a0 * arb_gate, arb_gate, t.na, g + t.a0 * I + t.r0, I);
        up_.kernel->dot_rows(up_.matrix(t.expert) + t.r0 * up_.row_bytes, up_.row_bytes, t.nr, H,
                             act_up + t.a0 * arb_up, arb_up, t.na, u + t.a0 * I + t.r0, I);
        for (int64_t a = t.a0; a < t.a0 + t.na; ++a)
            for (int64_t r = t.r0; r < t.r0 + t.nr; ++r) g[a * I + r] = silu(g[a * I + r]) * u[a * I + r];
    });

    // 4. down: h rows prepared for the down type, then (expert, row tile, token tile) again.
    const ActFormat down_format = down_.kernel->act;
    const size_t arb_down = act_row_bytes(down_format, I);
    uint8_t* h_act = scratch(h_act_, arb_down * n_assign);
    prepare_activations(pool, kernels_, down_format, g, n_assign, I, I, h_act);
    y_.resize(std::max<size_t>(y_.size(), static_cast<size_t>(n_assign * H)));
    float* y = y_.data();
    make_tasks(count_, offset_, H, pool.size(), tasks_);
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
        const Task& t = tasks[i];
        down_.kernel->dot_rows(down_.matrix(t.expert) + t.r0 * down_.row_bytes, down_.row_bytes, t.nr, I,
                               h_act + t.a0 * arb_down, arb_down, t.na, y + t.a0 * H + t.r0, H);
    });

    // 5. out[t] = Σ_j w[t, j] · y[assignment of (t, j)], slots in order, so the
    //    sum is the same whatever the thread count. Column chunks keep one
    //    token's reduction parallel at decode.
    constexpr int64_t kChunk = 256;
    const int64_t chunks = (H + kChunk - 1) / kChunk;
    pool.parallel_for(n_tok * chunks, [&](int64_t i, int) {
        const int64_t tok = i / chunks, c0 = (i % chunks) * kChunk, c1 = std::min(H, c0 + kChunk);
        float* o = call.out + tok * H;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t a = slot_assignment_[tok * k + j];
            if (a < 0) continue;
            const float wt = call.weights[tok * k + j];
            const float* ya = y + a * H;
            for (int64_t c = c0; c < c1; ++c) o[c] += wt * ya[c];
        }
    });
}

}  // namespace tandem
