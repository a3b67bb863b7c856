#include "engine/moe_op.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include "engine/activations.h"
#include "engine/numa.h"

namespace tandem {
namespace {

using Task = MoETask;

// A task's cost in token-rows: rows × (tokens + kRowTokens), kRowTokens standing for
// reading (or rewriting) its weight rows once.
constexpr int64_t kRowTokens = 16;

// (expert, row tile, assignment tile) tasks over the active experts, of about equal
// cost: about eight per thread, so that the threads that run out steal what is left in
// small pieces. An expert with many tokens gets short row tiles, one with few tokens
// long ones (up to 256 rows where its tokens are plain rows, so that a tile's weights
// stay in L2 while they stream past; any length on laid-out tokens, which the kernels
// take 16 rows at a time). An expert with laid-out tokens takes tiles of
// laid_out_token_tile assignments (k: the dot length), usually all of them.
void make_tasks(const std::vector<int64_t>& count, const std::vector<int64_t>& offset, const MoELaidOut& laid,
                int64_t rows, int64_t k, int threads, std::vector<Task>& tasks) {
    tasks.clear();
    int64_t max_count = 0, total = 0;
    for (int64_t c : count) {
        if (c > 0) total += rows * (c + kRowTokens);
        max_count = std::max(max_count, c);
    }
    const int64_t plain_tokens = std::min<int64_t>(std::max<int64_t>(max_count, 1), 64);
    const int64_t target = std::max<int64_t>(1, total / (8 * static_cast<int64_t>(threads)));
    for (size_t e = 0; e < count.size(); ++e) {
        if (count[e] == 0) continue;
        const bool on_laid = laid.laid(static_cast<int64_t>(e));
        const int64_t tokens = on_laid ? laid_out_token_tile(count[e], k) : plain_tokens;
        for (int64_t a0 = 0; a0 < count[e]; a0 += tokens) {
            const int64_t na = std::min(tokens, count[e] - a0);
            const int64_t most = on_laid ? rows : std::min<int64_t>(rows, 256);
            const int64_t want = std::clamp<int64_t>(target / (na + kRowTokens), 16, most);
            const int64_t tiles = (rows + want - 1) / want;
            const int64_t nr = std::min(rows, ((rows + tiles - 1) / tiles + 15) / 16 * 16);  // equal tiles
            for (int64_t r0 = 0; r0 < rows; r0 += nr)
                tasks.push_back(Task{static_cast<int64_t>(e), r0, std::min(nr, rows - r0), offset[e] + a0, na, false,
                                     on_laid});
        }
    }
}

// Spins until flag is set, offering the core to others after a while: with more threads
// than cores the thread that sets it may be waiting for this one's core.
void wait_for(const std::atomic<int64_t>& flag) {
    for (int spins = 0; flag.load(std::memory_order_acquire) == 0; ++spins) {
        if (spins < 4096) cpu_relax();
        else std::this_thread::yield();
    }
}

}  // namespace

bool MoELaidOut::plan(const LaidOutKernel* with, int64_t min_tokens, int64_t k, const std::vector<int64_t>& count,
                      const std::vector<char>& on_gemm) {
    kernel = with;
    group_bytes = kernel != nullptr ? kernel->group_bytes(k) : 0;
    at.assign(count.size(), -1);
    jobs.clear();
    bool plain = false;
    size_t bytes = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(count.size()); ++e) {
        const int64_t c = count[e];
        if (c == 0 || on_gemm[e]) continue;
        if (kernel == nullptr || c < min_tokens) {
            plain = true;
            continue;
        }
        at[e] = static_cast<int64_t>(bytes);
        bytes += static_cast<size_t>(laid_out_groups(c)) * group_bytes;
        for (int64_t p = 0; p < laid_out_groups(c); ++p) {
            jobs.push_back(e);
            jobs.push_back(p);
        }
    }
    if (bytes > 0) base = aligned_scratch(buf, bytes);
    return plain;
}

MoEOp::MoEOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix gate, WeightMatrix up,
             WeightMatrix down, GemmPath gemm)
    : pool_(std::move(pool)), kernels_(kernels), gate_(gate), up_(up), down_(down), gemm_(gemm) {
    if (up.n_experts != gate.n_experts || down.n_experts != gate.n_experts || up.rows != gate.rows ||
        up.cols != gate.cols || down.rows != gate.cols || down.cols != gate.rows)
        throw std::invalid_argument("experts: gate, up and down shapes disagree");
    for (const WeightMatrix* w : {&gate_, &up_, &down_}) place_rows(*pool_, *w);
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
    if (n_tok == 1 && k > 0 && !(gemm_.takes(gate_, 1) && gemm_.takes(up_, 1) && gemm_.takes(down_, 1)))
        return forward_one(call);
    clock_.start();
    if (k <= 0) {
        std::memset(call.out, 0, sizeof(float) * static_cast<size_t>(n_tok * H));
        return;
    }
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
    // Gate and up share one layout of x where both kernels take the same one.
    const LaidOutKernel* lg = gate_.kernel->laid_out;
    const LaidOutKernel* lu = up_.kernel->laid_out;
    const LaidOutKernel* ld = down_.kernel->laid_out;
    const bool gate_up_laid = lg != nullptr && lu != nullptr && lg->lay_out == lu->lay_out;
    const int64_t gate_up_min = gate_up_laid ? std::max(lg->min_tokens, lu->min_tokens) : 0;
    const bool x_plain = laid_x_.plan(gate_up_laid ? lg : nullptr, gate_up_min, H, count_, on_gemm_);
    const bool h_plain = laid_h_.plan(ld, ld != nullptr ? ld->min_tokens : 0, I, count_, on_gemm_);
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

    clock_.mark(kMoEGroup);

    // 2. Activations of every token, prepared once, then gathered per assignment
    //    so an expert's tokens are contiguous rows for the kernel, or laid out
    //    once per expert for kernels that take laid-out tokens.
    auto gather = [&](const WeightMatrix& w, std::vector<uint8_t>& per_token, std::vector<uint8_t>& out) {
        const size_t arb = act_row_bytes(w.kernel->act, H);
        uint8_t* tok = scratch(per_token, arb * n_tok);
        prepare_activations(pool, kernels_, w.kernel->act, call.x, n_tok, H, H, tok);
        uint8_t* dst = scratch(out, arb * n_assign);
        if (!x_plain) return dst;  // every expert's rows are packed or laid out from the per-token rows
        auto copy = [&](int64_t a) { std::memcpy(dst + a * arb, tok + assignment_token_[a] * arb, arb); };
        if (n_assign <= 64) {  // decode: a few rows, not worth a loop on the pool
            for (int64_t a = 0; a < n_assign; ++a) copy(a);
        } else {
            pool.parallel_for(n_assign, [&](int64_t a, int) {
                const int64_t e = assignment_expert_[a];
                if (!on_gemm_[e] && !laid_x_.laid(e)) copy(a);  // the others' rows are packed or laid out instead
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
    if (!laid_x_.jobs.empty()) {
        const size_t arb = act_row_bytes(gate_.kernel->act, H);
        pool.parallel_for(static_cast<int64_t>(laid_x_.jobs.size() / 2), [&](int64_t j, int) {
            const int64_t e = laid_x_.jobs[2 * j], first = laid_x_.jobs[2 * j + 1] * kLaidOutGroup;
            laid_x_.kernel->lay_out(x_act_.data(), arb, assignment_token_.data() + offset_[e] + first,
                                    std::min(kLaidOutGroup, count_[e] - first), H, laid_x_.tokens(e, first));
        });
    }
    if (any_gemm) pack(call.x, H, H, true, packed_x_.data(), packed_x_at_);
    clock_.mark(kMoEActivations);
    const size_t arb_gate = act_row_bytes(gate_.kernel->act, H);
    const size_t arb_up = act_row_bytes(up_.kernel->act, H);

    // 3. gate and up for each (expert, row tile, token tile), both from one layout of
    //    the expert's tokens where they have one; h = silu(gate) * up in place.
    gate_out_.resize(std::max<size_t>(gate_out_.size(), static_cast<size_t>(n_assign * I)));
    up_out_.resize(std::max<size_t>(up_out_.size(), static_cast<size_t>(n_assign * I)));
    float* g = gate_out_.data();
    float* u = up_out_.data();
    make_tasks(dot_count_, offset_, laid_x_, I, H, pool.size(), tasks_);
    append_gemm_tasks(I, tasks_);
    const std::vector<Task>& tasks = tasks_;
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
        const Task& t = tasks[i];
        if (t.gemm) {
            const uint16_t* xs = packed_x_.data() + packed_x_at_[t.expert];
            gemm_rows(*gk, gemm_scratch_, thread, gate_, gate_.matrix(t.expert), t.r0, t.nr, xs, t.na, g + t.a0 * I, I);
            gemm_rows(*gk, gemm_scratch_, thread, up_, up_.matrix(t.expert), t.r0, t.nr, xs, t.na, u + t.a0 * I, I);
        } else if (t.laid) {
            const uint8_t* xs = laid_x_.tokens(t.expert, t.a0 - offset_[t.expert]);
            lg->dot_rows(gate_.matrix(t.expert) + t.r0 * gate_.row_bytes, gate_.row_bytes, t.nr, H, xs, t.na,
                         g + t.a0 * I + t.r0, I);
            lu->dot_rows(up_.matrix(t.expert) + t.r0 * up_.row_bytes, up_.row_bytes, t.nr, H, xs, t.na,
                         u + t.a0 * I + t.r0, I);
        } else {
            gate_.kernel->dot_rows(gate_.matrix(t.expert) + t.r0 * gate_.row_bytes, gate_.row_bytes, t.nr, H,
                                   act_gate + t.a0 * arb_gate, arb_gate, t.na, g + t.a0 * I + t.r0, I);
            up_.kernel->dot_rows(up_.matrix(t.expert) + t.r0 * up_.row_bytes, up_.row_bytes, t.nr, H,
                                 act_up + t.a0 * arb_up, arb_up, t.na, u + t.a0 * I + t.r0, I);
        }
        for (int64_t a = t.a0; a < t.a0 + t.na; ++a) kernels_.silu_mul(g + a * I + t.r0, u + a * I + t.r0, t.nr);
    });
    clock_.mark(kMoEGateUp);

    // 4. down: h rows prepared for the down type (or packed), then the same kinds of tasks.
    const ActFormat down_format = down_.kernel->act;
    const size_t arb_down = act_row_bytes(down_format, I);
    uint8_t* h_act = nullptr;
    if (any_dot) {
        h_act = scratch(h_act_, arb_down * n_assign);
        if (!any_gemm && laid_h_.jobs.empty()) {
            prepare_activations(pool, kernels_, down_format, g, n_assign, I, I, h_act);
        } else if (h_plain) {
            pool.parallel_for(n_assign, [&](int64_t a, int) {
                const int64_t e = assignment_expert_[a];
                if (!on_gemm_[e] && !laid_h_.laid(e))
                    prepare_activation_row(kernels_, down_format, g + a * I, I, h_act + a * arb_down);
            });
        }
        // The laid-out experts' rows: prepared and laid out by the same task, a group at a time.
        pool.parallel_for(static_cast<int64_t>(laid_h_.jobs.size() / 2), [&](int64_t j, int) {
            const int64_t e = laid_h_.jobs[2 * j], first = laid_h_.jobs[2 * j + 1] * kLaidOutGroup;
            const int64_t a0 = offset_[e] + first, n = std::min(kLaidOutGroup, count_[e] - first);
            for (int64_t a = a0; a < a0 + n; ++a)
                prepare_activation_row(kernels_, down_format, g + a * I, I, h_act + a * arb_down);
            laid_h_.kernel->lay_out(h_act + a0 * arb_down, arb_down, nullptr, n, I, laid_h_.tokens(e, first));
        });
    }
    if (any_gemm) pack(g, I, I, false, packed_h_.data(), packed_h_at_);
    clock_.mark(kMoEHidden);
    y_.resize(std::max<size_t>(y_.size(), static_cast<size_t>(n_assign * H)));
    float* y = y_.data();
    make_tasks(dot_count_, offset_, laid_h_, H, I, pool.size(), tasks_);
    append_gemm_tasks(H, tasks_);
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
        const Task& t = tasks[i];
        if (t.gemm) {
            const uint16_t* hs = packed_h_.data() + packed_h_at_[t.expert];
            gemm_rows(*gk, gemm_scratch_, thread, down_, down_.matrix(t.expert), t.r0, t.nr, hs, t.na, y + t.a0 * H, H);
            return;
        }
        if (t.laid) {
            ld->dot_rows(down_.matrix(t.expert) + t.r0 * down_.row_bytes, down_.row_bytes, t.nr, I,
                         laid_h_.tokens(t.expert, t.a0 - offset_[t.expert]), t.na, y + t.a0 * H + t.r0, H);
            return;
        }
        down_.kernel->dot_rows(down_.matrix(t.expert) + t.r0 * down_.row_bytes, down_.row_bytes, t.nr, I,
                               h_act + t.a0 * arb_down, arb_down, t.na, y + t.a0 * H + t.r0, H);
    });
    clock_.mark(kMoEDown);

    // 5. out[t] = Σ_j w[t, j] · y[assignment of (t, j)], slots in order, so the
    //    sum is the same whatever the thread count, and the same as forward_one's
    //    (add_scaled onto zeros, slot by slot). Column chunks keep one token's
    //    reduction parallel; each task clears its own chunk, with no pass over
    //    the whole output first.
    constexpr int64_t kChunk = 256;
    const int64_t chunks = (H + kChunk - 1) / kChunk;
    pool.parallel_for(n_tok * chunks, [&](int64_t i, int) {
        const int64_t tok = i / chunks, c0 = (i % chunks) * kChunk, c1 = std::min(H, c0 + kChunk);
        float* o = call.out + tok * H;
        std::fill(o + c0, o + c1, 0.0f);
        for (int64_t j = 0; j < k; ++j) {
            const int64_t a = slot_assignment_[tok * k + j];
            if (a >= 0) kernels_.add_scaled(call.weights[tok * k + j], y + a * H + c0, c1 - c0, o + c0);
        }
    });
    clock_.mark(kMoESum);
    if (n_tok > 1) pool.rest();  // decode (one token) keeps its workers spinning for the next op
}

// One token (decode): two parallel loops. The first computes h_j = silu(gate_j x) * up_j x
// for every slot j in row tiles; the second gives each task a tile of output rows and
// sums w_j down_j h_j over the slots in slot order, so no reduction loop follows and the
// result equals the many-token path's bit for bit.
void MoEOp::forward_one(const MoECall& call) {
    const int64_t k = call.top_k, E = gate_.n_experts;
    const int64_t H = gate_.cols, I = gate_.rows;
    ThreadPool& pool = *pool_;
    const int64_t threads = pool.size();
    slots_.clear();
    for (int64_t j = 0; j < k; ++j)
        if (call.ids[j] >= 0 && call.ids[j] < E) slots_.push_back(j);
    const int64_t n = static_cast<int64_t>(slots_.size());
    if (n == 0) {
        std::memset(call.out, 0, sizeof(float) * static_cast<size_t>(H));
        return;
    }
    clock_.start();
    const ActFormat fg = gate_.kernel->act, fu = up_.kernel->act, fd = down_.kernel->act;
    const size_t arb_g = act_row_bytes(fg, H), arb_u = act_row_bytes(fu, H), arb_d = act_row_bytes(fd, I);
    uint8_t* xg = scratch(x_act_, arb_g);
    prepare_activation_row(kernels_, fg, call.x, H, xg);
    uint8_t* xu = xg;
    if (fu != fg) {
        xu = scratch(x_act_up_, arb_u);
        prepare_activation_row(kernels_, fu, call.x, H, xu);
    }
    clock_.mark(kMoEActivations);
    const DecodeSplit split = decode_split();
    if (split.one_loop) return one_loop(call, split, xg, xu);
    gate_out_.resize(std::max<size_t>(gate_out_.size(), static_cast<size_t>(n * I)));
    up_out_.resize(std::max<size_t>(up_out_.size(), static_cast<size_t>(n * I)));
    float* g = gate_out_.data();
    float* u = up_out_.data();
    const int64_t tile_i = choose_tiles(I * n, 1, static_cast<int>(threads)).rows;
    const int64_t tiles_i = (I + tile_i - 1) / tile_i;
    pool.parallel_for(n * tiles_i, [&](int64_t task, int) {
        const int64_t s = task / tiles_i, r0 = (task % tiles_i) * tile_i, nr = std::min(tile_i, I - r0);
        one_token_gate_up(call.ids[slots_[s]], r0, nr, xg, xu, g + s * I, u + s * I);
    });
    clock_.mark(kMoEGateUp);
    uint8_t* h = scratch(h_act_, arb_d * n);
    for (int64_t s = 0; s < n; ++s) prepare_activation_row(kernels_, fd, g + s * I, I, h + s * arb_d);
    clock_.mark(kMoEHidden);
    // Output rows: at least two tiles per thread, at most 256 rows, a multiple of 4.
    const int64_t even = (H + 2 * threads - 1) / (2 * threads);
    const int64_t tile_h = std::clamp<int64_t>((even + 3) / 4 * 4, 4, 256);
    const int64_t tiles_h = (H + tile_h - 1) / tile_h;
    y_.resize(std::max<size_t>(y_.size(), static_cast<size_t>(threads * tile_h)));
    pool.parallel_for(tiles_h, [&](int64_t task, int thread) {
        const int64_t r0 = task * tile_h, nr = std::min(tile_h, H - r0);
        float* o = call.out + r0;
        float* tmp = y_.data() + thread * tile_h;
        std::fill(o, o + nr, 0.0f);
        for (int64_t s = 0; s < n; ++s) {
            const int64_t j = slots_[s], e = call.ids[j];
            down_.kernel->dot_rows(down_.matrix(e) + r0 * down_.row_bytes, down_.row_bytes, nr, I, h + s * arb_d,
                                   arb_d, 1, tmp, nr);
            kernels_.add_scaled(call.weights[j], tmp, nr, o);
        }
    });
    clock_.mark(kMoEDown);  // the weighted sum is inside the down loop
}

// Rows [r0, r0 + nr) of one token's h for expert e: g = silu(gate_e x) * up_e x, in g's rows
// (u: up's rows, scratch); xg, xu: x prepared for gate's and up's kernels.
void MoEOp::one_token_gate_up(int64_t e, int64_t r0, int64_t nr, const uint8_t* xg, const uint8_t* xu, float* g,
                              float* u) const {
    const int64_t H = gate_.cols;
    const size_t arb_g = act_row_bytes(gate_.kernel->act, H), arb_u = act_row_bytes(up_.kernel->act, H);
    gate_.kernel->dot_rows(gate_.matrix(e) + r0 * gate_.row_bytes, gate_.row_bytes, nr, H, xg, arb_g, 1, g + r0,
                           gate_.rows);
    up_.kernel->dot_rows(up_.matrix(e) + r0 * up_.row_bytes, up_.row_bytes, nr, H, xu, arb_u, 1, u + r0, up_.rows);
    kernels_.silu_mul(g + r0, u + r0, nr);
}

// One token in one parallel loop. Tasks are handed out in order: first the gate/up tiles
// of every slot, slot by slot, then the down tiles, slot by slot. The task that finishes
// a slot's last gate/up tile prepares its h and marks it ready; a down task of that slot
// waits for the mark (every gate/up task is already taken by then, so the wait is at most
// one task long). The task that finishes a down tile's last slot sums w_j down_j h_j over
// the slots in slot order, as forward_one's two loops and the many-token path do, so all
// three agree bit for bit. No barrier stands between gate/up and down: threads done with
// gate/up start on the first slots' down rows at once.
// On several NUMA nodes (engine/numa.h) each group of threads has its own rows of every
// matrix, and its own counters for them: a thread takes its group's gate/up tiles, then
// the other groups' left, then its group's down tiles, then the others'.
void MoEOp::one_loop(const MoECall& call, const DecodeSplit& split, const uint8_t* xg, const uint8_t* xu) {
    const int64_t H = gate_.cols, I = gate_.rows, n = static_cast<int64_t>(slots_.size());
    ThreadPool& pool = *pool_;
    const int64_t threads = pool.size();
    const int groups = pool.n_nodes();
    const ActFormat fd = down_.kernel->act;
    const size_t arb_d = act_row_bytes(fd, I);
    const int64_t rows_i = one_token_rows(I, n, threads, gate_.row_bytes + up_.row_bytes, split);
    const int64_t rows_h = one_token_rows(H, n, threads, down_.row_bytes, split);
    // Row tiles node by node: tiles [first_i[g], first_i[g + 1]) of I are group g's.
    auto cut = [&](int64_t rows, int64_t tile, std::vector<int64_t>& starts, std::vector<int64_t>& first) {
        starts.clear();
        first.assign(1, 0);
        for (int g = 0; g < groups; ++g) {
            const int64_t end = node_row_edge(pool, rows, g + 1);
            for (int64_t r0 = node_row_edge(pool, rows, g); r0 < end; r0 += tile) starts.push_back(r0);
            first.push_back(static_cast<int64_t>(starts.size()));
        }
        starts.push_back(rows);  // a tile ends where the next begins
    };
    cut(I, rows_i, tile_i_, first_i_);
    cut(H, rows_h, tile_h_, first_h_);
    const int64_t tiles_i = first_i_[groups], tiles_h = first_h_[groups];
    gate_out_.resize(std::max<size_t>(gate_out_.size(), static_cast<size_t>(n * I)));
    up_out_.resize(std::max<size_t>(up_out_.size(), static_cast<size_t>(n * I)));
    y_.resize(std::max<size_t>(y_.size(), static_cast<size_t>(n * H)));
    float* g = gate_out_.data();
    float* u = up_out_.data();
    float* y = y_.data();
    uint8_t* h = scratch(h_act_, arb_d * n);
    std::atomic<int64_t>* gate_up_left = counters_.get(static_cast<size_t>(2 * n + tiles_h + 2 * groups));
    std::atomic<int64_t>* ready = gate_up_left + n;
    std::atomic<int64_t>* slots_left = ready + n;
    std::atomic<int64_t>* next_gate_up = slots_left + tiles_h;  // per group
    std::atomic<int64_t>* next_down = next_gate_up + groups;
    for (int64_t s = 0; s < n; ++s) {
        gate_up_left[s].store(tiles_i, std::memory_order_relaxed);
        ready[s].store(0, std::memory_order_relaxed);
    }
    for (int64_t t = 0; t < tiles_h; ++t) slots_left[t].store(n, std::memory_order_relaxed);
    for (int q = 0; q < groups; ++q) {
        next_gate_up[q].store(0, std::memory_order_relaxed);
        next_down[q].store(0, std::memory_order_relaxed);
    }  // parallel_for's publication orders these before the loop

    pool.parallel_for(threads, [&](int64_t, int thread) {
        const int own = pool.node_of_thread(thread);
        for (int q = 0; q < groups; ++q) {  // gate/up: the group's tiles, then the others'
            const int grp = (own + q) % groups;
            const int64_t count = first_i_[grp + 1] - first_i_[grp];
            for (;;) {
                const int64_t i = next_gate_up[grp].fetch_add(1, std::memory_order_relaxed);
                if (i >= n * count) break;
                const int64_t s = i / count, tile = first_i_[grp] + i % count;
                const int64_t r0 = tile_i_[tile], nr = tile_i_[tile + 1] - r0;
                one_token_gate_up(call.ids[slots_[s]], r0, nr, xg, xu, g + s * I, u + s * I);
                if (gate_up_left[s].fetch_sub(1, std::memory_order_acq_rel) == 1) {
                    prepare_activation_row(kernels_, fd, g + s * I, I, h + s * arb_d);
                    ready[s].store(1, std::memory_order_release);
                }
            }
        }
        for (int q = 0; q < groups; ++q) {  // down, the same way
            const int grp = (own + q) % groups;
            const int64_t count = first_h_[grp + 1] - first_h_[grp];
            for (;;) {
                const int64_t i = next_down[grp].fetch_add(1, std::memory_order_relaxed);
                if (i >= n * count) break;
                const int64_t s = i / count, tile = first_h_[grp] + i % count;
                const int64_t r0 = tile_h_[tile], nr = tile_h_[tile + 1] - r0;
                wait_for(ready[s]);
                const int64_t e = call.ids[slots_[s]];
                down_.kernel->dot_rows(down_.matrix(e) + r0 * down_.row_bytes, down_.row_bytes, nr, I,
                                       h + s * arb_d, arb_d, 1, y + s * H + r0, H);
                if (slots_left[tile].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
                float* o = call.out + r0;
                std::fill(o, o + nr, 0.0f);
                for (int64_t j = 0; j < n; ++j) kernels_.add_scaled(call.weights[slots_[j]], y + j * H + r0, nr, o);
            }
        }
    });
    clock_.mark(kMoEDown);  // gate/up, h and down in one loop, timed as one
}

void MoEOp::append_gemm_tasks(int64_t rows, std::vector<Task>& tasks) const {
    for (int64_t e = 0; e < static_cast<int64_t>(on_gemm_.size()); ++e)
        if (on_gemm_[e])
            for (int64_t r0 = 0; r0 < rows; r0 += kGemmRows)
                tasks.push_back(Task{e, r0, std::min(kGemmRows, rows - r0), offset_[e], count_[e], true});
}

}  // namespace tandem
