// The routed experts of one MoE layer in one call:
//   out[t] = Σ_j w[t, j] · down_e(silu(gate_e(x[t])) · up_e(x[t])),  e = ids[t, j]
// Tokens are grouped by expert, so each active expert's weights are read once
// for all of its tokens; no Python runs per expert. forward() runs on the
// calling thread (which leads the pool); submit() queues the same work on the
// pool's driver thread and returns at once, sync() waits for it. An expert
// with many tokens (prefill) takes the bf16 tile path when the engine has one
// (engine/gemm_path.h); the others take the 8-bit dot kernels, on tokens laid
// out once per expert where the kernel can (MoELaidOut).
#pragma once

#include <array>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/gemm_path.h"
#include "engine/linear_op.h"
#include "engine/phase_clock.h"
#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace tandem {

struct MoECall {
    int64_t n_tok = 0;
    int64_t top_k = 0;
    const float* x = nullptr;        // [n_tok, hidden]
    const int64_t* ids = nullptr;    // [n_tok, top_k]; ids outside [0, n_experts) are skipped
    const float* weights = nullptr;  // [n_tok, top_k]
    float* out = nullptr;            // [n_tok, hidden], overwritten
};

// Rows [r0, r0 + nr) of one expert's matrix for its assignments [a0, a0 + na).
struct MoETask {
    int64_t expert, r0, nr, a0, na;
    bool gemm = false;  // the bf16 tile path: nr <= kGemmRows, every assignment of the expert
    bool laid = false;  // the kernels' laid-out tokens (MoELaidOut)
};

// One phase's activations for the experts whose kernels take laid-out tokens
// (LaidOutKernel): each such expert's rows are laid out once per call, in a
// parallel pass of one task per group of 16, and all of its tasks read them.
struct MoELaidOut {
    const LaidOutKernel* kernel = nullptr;
    size_t group_bytes = 0;
    std::vector<int64_t> at;    // per expert: offset of its first group from base; -1: plain rows
    std::vector<int64_t> jobs;  // (expert, group) pairs, one layout task each
    std::vector<uint8_t> buf;
    uint8_t* base = nullptr;  // 64-byte aligned, in buf

    // The experts with at least min_tokens assignments, except those on the tile path,
    // take laid-out tokens from `with` (none where it is null). Returns whether any expert on the
    // dot path is left to plain rows.
    bool plan(const LaidOutKernel* with, int64_t min_tokens, int64_t k, const std::vector<int64_t>& count,
              const std::vector<char>& on_gemm);
    bool laid(int64_t e) const { return at[e] >= 0; }
    // Expert e's tokens from its assignment `first` on (a multiple of kLaidOutGroup).
    uint8_t* tokens(int64_t e, int64_t first) const { return base + at[e] + first / kLaidOutGroup * group_bytes; }
};

// Where a many-token call spends its time, for profiling (off unless asked for).
enum MoEPhase : int { kMoEGroup, kMoEActivations, kMoEGateUp, kMoEHidden, kMoEDown, kMoESum, kMoEPhases };
inline const char* const kMoEPhaseNames[kMoEPhases] = {"group", "activations", "gate_up",
                                                       "hidden_activations", "down", "weighted_sum"};

class MoEOp {
public:
    // gate, up: [E, inter, hidden]; down: [E, hidden, inter].
    MoEOp(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, WeightMatrix gate, WeightMatrix up,
          WeightMatrix down, GemmPath gemm = {});
    // A submitted call may still be running on the driver thread: wait for it.
    ~MoEOp() { pool_->wait_idle(); }
    MoEOp(const MoEOp&) = delete;
    MoEOp& operator=(const MoEOp&) = delete;

    void forward(const MoECall& call);
    void submit(const MoECall& call);
    void sync();

    int64_t n_experts() const { return gate_.n_experts; }
    int64_t hidden() const { return gate_.cols; }
    int64_t inter() const { return gate_.rows; }

    // Profiling of many-token calls (one-token calls are not timed).
    void set_profiling(bool on) { clock_.set(on); }
    const std::array<int64_t, kMoEPhases>& phase_ns() const { return clock_.ns(); }
    int64_t profiled_calls() const { return clock_.calls(); }

private:
    std::shared_ptr<ThreadPool> pool_;
    const VariantKernels& kernels_;
    WeightMatrix gate_, up_, down_;
    GemmPath gemm_;
    std::mutex mutex_;  // scratch below belongs to one call at a time
    PhaseClock<kMoEPhases> clock_;

    // Per-call scratch, grown as needed and reused.
    std::vector<int64_t> count_, offset_, cursor_, slot_assignment_, assignment_token_, assignment_expert_;
    std::vector<int64_t> dot_count_, packed_x_at_, packed_h_at_;
    std::vector<int64_t> pack_jobs_;  // (expert, group pair) pairs
    std::vector<char> on_gemm_;
    std::vector<uint16_t> packed_x_, packed_h_;
    GemmScratch gemm_scratch_;
    std::vector<MoETask> tasks_;
    std::vector<uint8_t> x_act_, x_act_up_, gathered_, gathered_up_, h_act_;
    std::vector<float> gate_out_, up_out_, y_;
    MoELaidOut laid_x_, laid_h_;  // x for gate and up, h for down

    void append_gemm_tasks(int64_t rows, std::vector<MoETask>& tasks) const;
    void forward_one(const MoECall& call);
    void one_loop(const MoECall& call, const DecodeSplit& split, const uint8_t* xg, const uint8_t* xu);
    void one_token_gate_up(int64_t e, int64_t r0, int64_t nr, const uint8_t* xg, const uint8_t* xu, float* g,
                           float* u) const;
    std::vector<int64_t> slots_;  // forward_one: the slots with a valid expert id
    std::vector<int64_t> tile_i_, first_i_, tile_h_, first_h_;  // one_loop's row tiles, node by node
    // one_loop's counters: gate/up tiles left per slot, whether a slot's h is ready, slots
    // left per down tile, the next task.
    LoopCounters counters_;
};

}  // namespace tandem
