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

}  // namespace

MoEOp::MoEOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix gate, WeightMatrix up,
             WeightMatrix down, GemmPath gemm)
    : pool_(std::move(pool)), kernels_(kernels), gate_(gate), up_(up), down_(down), gemm_(gemm) {
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
    assignment_expert_.resize(std::max<int64_t>(n_assign, 1));
    cursor_.assign(offset_.begin(), offset_.end());
    for (int64_t s = 0; s < n_tok * k; ++s) {
        const int64_t e = call.ids[s];
        if (e < 0 || e >= E) continue;
        const int64_t a = cursor_[e]++;
        slot_assignment_[s] = a;
        assignment_token_[a] = s / k;
        assignment_expert_[a] = e;
    }
    if (n_assign == 0) return;

    // Which experts take the bf16 tile path; the rest take the 8-bit dot kernels.
    on_gemm_.assign(E, 0);
    dot_count_.assign(count_.begin(), count_.end());
    packed_x_at_.assign(E, 0);
    packed_h_at_.assign(E, 0);
    pack_jobs_.clear();
    size_t packed_x_elems = 0, packed_h_elems = 0;
    bool any_dot = false;
    for (int64_t e = 0; e < E; ++e) {
        const int64_t c = count_[e];
        if (c == 0) continue;
        if (!(gemm_.takes(gate_, c) && gemm_.takes(up_, c) && gemm_.takes(down_, c))) {
            any_dot = true;
            continue;
        }
        on_gemm_[e] = 1;
        dot_count_[e] = 0;
        packed_x_at_[e] = static_cast<int64_t>(packed_x_elems);
        packed_h_at_[e] = static_cast<int64_t>(packed_h_elems);
        packed_x_elems += gemm_act_elems(c, H);
        packed_h_elems += gemm_act_elems(c, I);
        for (int64_t p = 0; p < gemm_groups(c) / 2; ++p) {
            pack_jobs_.push_back(e);
            pack_jobs_.push_back(p);
        }
    }
    const bool any_gemm = !pack_jobs_.empty();
    const GemmKernels* gk = gemm_.kernels;
    if (any_gemm) {
        if (packed_x_.size() < packed_x_elems) packed_x_.resize(packed_x_elems);
        if (packed_h_.size() < packed_h_elems) packed_h_.resize(packed_h_elems);
        gemm_scratch_.reserve(pool.size(), std::max(H, I));
    }
    // Packs the rows of the tile-path experts, one task per (expert, pair of groups).
    auto pack = [&](const float* src, int64_t stride, int64_t cols, bool by_token, uint16_t* dst,
                    const std::vector<int64_t>& at) {
        pool.parallel_for(static_cast<int64_t>(pack_jobs_.size() / 2), [&](int64_t j, int) {
            const int64_t e = pack_jobs_[2 * j], p = pack_jobs_[2 * j + 1];
            float tmp[32];
            const float* rows = by_token ? src : src + offset_[e] * stride;
            const int64_t* index = by_token ? assignment_token_.data() + offset_[e] : nullptr;
            gk->pack_act(rows, stride, index, count_[e], cols, 2 * p, 2 * p + 2, dst + at[e], tmp);
        });
    };

    // 2. Activations of every token, prepared once, then gathered per assignment
    //    so an expert's tokens are contiguous rows for the kernel.
    auto gather = [&](const WeightMatrix& w, std::vector<uint8_t>& per_token, std::vector<uint8_t>& out) {
        const size_t arb = act_row_bytes(w.kernel->act, H);
        uint8_t* tok = scratch(per_token, arb * n_tok);
        prepare_activations(pool, kernels_, w.kernel->act, call.x, n_tok, H, H, tok);
        uint8_t* dst = scratch(out, arb * n_assign);
        auto copy = [&](int64_t a) { std::memcpy(dst + a * arb, tok + assignment_token_[a] * arb, arb); };
        if (n_assign <= 64) {  // decode: a few rows, not worth a loop on the pool
            for (int64_t a = 0; a < n_assign; ++a) copy(a);
        } else {
            pool.parallel_for(n_assign, [&](int64_t a, int) {
                if (!on_gemm_[assignment_expert_[a]]) copy(a);  // rows of tile-path experts are packed instead
            });
        }
        return dst;
    };
    const uint8_t* act_gate = nullptr;
    const uint8_t* act_up = nullptr;
    if (any_dot) {
        act_gate = gather(gate_, x_act_, gathered_);
        act_up = up_.kernel->act == gate_.kernel->act ? act_gate : gather(up_, x_act_up_, gathered_up_);
    }
    if (any_gemm) pack(call.x, H, H, true, packed_x_.data(), packed_x_at_);
    const size_t arb_gate = act_row_bytes(gate_.kernel->act, H);
    const size_t arb_up = act_row_bytes(up_.kernel->act, H);

    // 3. gate and up for each (expert, row tile, token tile); h = silu(gate) * up in place.
    gate_out_.resize(std::max<size_t>(gate_out_.size(), static_cast<size_t>(n_assign * I)));
    up_out_.resize(std::max<size_t>(up_out_.size(), static_cast<size_t>(n_assign * I)));
    float* g = gate_out_.data();
    float* u = up_out_.data();
    make_tasks(dot_count_, offset_, I, pool.size(), tasks_);
    append_gemm_tasks(I, tasks_);
    const std::vector<Task>& tasks = tasks_;
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
        const Task& t = tasks[i];
        if (t.gemm) {
            const uint16_t* xs = packed_x_.data() + packed_x_at_[t.expert];
            gemm_rows(*gk, gemm_scratch_, thread, gate_, gate_.matrix(t.expert), t.r0, t.nr, xs, t.na, g + t.a0 * I, I);
            gemm_rows(*gk, gemm_scratch_, thread, up_, up_.matrix(t.expert), t.r0, t.nr, xs, t.na, u + t.a0 * I, I);
        } else {
            gate_.kernel->dot_rows(gate_.matrix(t.expert) + t.r0 * gate_.row_bytes, gate_.row_bytes, t.nr, H,
                                   act_gate + t.a0 * arb_gate, arb_gate, t.na, g + t.a0 * I + t.r0, I);
            up_.kernel->dot_rows(up_.matrix(t.expert) + t.r0 * up_.row_bytes, up_.row_bytes, t.nr, H,
                                 act_up + t.a0 * arb_up, arb_up, t.na, u + t.a0 * I + t.r0, I);
        }
        for (int64_t a = t.a0; a < t.a0 + t.na; ++a) kernels_.silu_mul(g + a * I + t.r0, u + a * I + t.r0, t.nr);
    });

    // 4. down: h rows prepared for the down type (or packed), then the same kinds of tasks.
    const ActFormat down_format = down_.kernel->act;
    const size_t arb_down = act_row_bytes(down_format, I);
    uint8_t* h_act = nullptr;
    if (any_dot) {
        h_act = scratch(h_act_, arb_down * n_assign);
        if (!any_gemm) {
            prepare_activations(pool, kernels_, down_format, g, n_assign, I, I, h_act);
        } else {
            pool.parallel_for(n_assign, [&](int64_t a, int) {
                if (!on_gemm_[assignment_expert_[a]])
                    prepare_activation_row(kernels_, down_format, g + a * I, I, h_act + a * arb_down);
            });
        }
    }
    if (any_gemm) pack(g, I, I, false, packed_h_.data(), packed_h_at_);
    y_.resize(std::max<size_t>(y_.size(), static_cast<size_t>(n_assign * H)));
    float* y = y_.data();
    make_tasks(dot_count_, offset_, H, pool.size(), tasks_);
    append_gemm_tasks(H, tasks_);
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
        const Task& t = tasks[i];
        if (t.gemm) {
            const uint16_t* hs = packed_h_.data() + packed_h_at_[t.expert];
            gemm_rows(*gk, gemm_scratch_, thread, down_, down_.matrix(t.expert), t.r0, t.nr, hs, t.na, y + t.a0 * H, H);
            return;
        }
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
    if (n_tok > 1) pool.rest();  // decode (one token) keeps its workers spinning for the next op
}

void MoEOp::append_gemm_tasks(int64_t rows, std::vector<Task>& tasks) const {
    for (int64_t e = 0; e < static_cast<int64_t>(on_gemm_.size()); ++e)
        if (on_gemm_[e])
            for (int64_t r0 = 0; r0 < rows; r0 += kGemmRows)
                tasks.push_back(Task{e, r0, std::min(kGemmRows, rows - r0), offset_[e], count_[e], true});
}

}  // namespace tandem
